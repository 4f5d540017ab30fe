"""NetworkPolicy on a node: the agent keeps ``table inet overlaycni`` in step
with the datastore.

Inputs, all under the cluster's prefix:
* ``policies/<ns>/<name>``  the NetworkPolicy manifests (``policy apply``);
* ``namespaces/<ns>``       namespace labels;
* ``pods/<ns>/<name>``      pod labels and named ports (the control plane
                            writes them: the lab, or a controller);
* the IPAM allocations      which pod has which IP on which node: the truth
                            for addresses, so a pod is covered even before
                            (or without) a metadata record.

Every change under those prefixes marks the state dirty (one resumable
watch, ``datastore.watch``); a debounced loop renders the whole table for
this node (pure: ``policy.render``) and hands it to the data plane's
``PolicyTable`` port, which applies only the set/map elements that changed
when the chains are the same (a label change, a new pod), or the whole table
atomically when they are not (a new or changed policy). A periodic full pass
re-applies from scratch, so a table changed behind the agent's back is
repaired. A record that does not decode is skipped and reported
(``on_bad``); every other record is still programmed.

A new pod is unprotected until the next pass (tens of milliseconds), as in
Kubernetes, where policy programming is asynchronous to pod start-up too.
"""

from __future__ import annotations

import logging
import threading
import time

from .. import ipam
from ..dataplane.ports import PolicyTable
from ..datastore import Event, Store
from ..datastore.keys import BadRecordHandler, cluster_root, ips_prefix, namespaces_prefix, pods_prefix, policies_prefix
from ..datastore.watch import watch_loop
from ..errors import OverlayCNIError
from ..policy import NamespaceInfo, NetworkPolicy, PodInfo, records, render_node
from ..policy.stored import join_inventory as inventory

log = logging.getLogger(__name__)
DEBOUNCE = 0.05


class PolicyController:
    def __init__(
        self,
        store: Store,
        *,
        cluster: str,
        node: str,
        stop: threading.Event,
        table: PolicyTable,
        on_bad: BadRecordHandler,
        full_every: float = 60.0,
    ):
        """``table`` is the node's ``inet overlaycni`` (the data plane's port);
        ``on_bad`` hears of every record skipped because it does not decode."""
        self.store = store
        self.table = table
        self.cluster = cluster
        self.node = node
        self.stop = stop
        self.on_bad = on_bad
        self.full_every = full_every
        self.dirty = threading.Event()
        # With no policy in the cluster the table is the same whatever the
        # pods are: pod and namespace events then cost nothing (no render on
        # the CNI ADD path). A policy event always triggers a pass.
        self.has_policies = True
        self.last_error: str | None = None
        self.passes = {"none": 0, "elements": 0, "full": 0}
        self._last_full = 0.0
        self._inputs = (policies_prefix(cluster), pods_prefix(cluster), namespaces_prefix(cluster), ips_prefix(cluster))

    def load(self) -> tuple[list[PodInfo], list[NamespaceInfo], list[NetworkPolicy]]:
        c, bad = self.cluster, self.on_bad
        policies = records.load_policies(self.store, c, on_bad=bad)
        pod_records = records.load_pods(self.store, c, on_bad=bad)
        ns_records = records.load_namespaces(self.store, c, on_bad=bad)
        pods, namespaces = inventory(ipam.list_allocations(self.store, c, on_bad=bad), pod_records, ns_records)
        return pods, namespaces, policies

    def sync(self, *, full: bool = False) -> str:
        pods, namespaces, policies = self.load()
        if full:
            self.table.reset()  # re-apply everything: repairs a table changed behind our back
        how = self.table.sync(render_node(self.node, pods=pods, namespaces=namespaces, policies=policies))
        self.passes[how] += 1
        self.has_policies = bool(policies)
        if how != "none":
            log.info("policy: %s update (%d policies, %d pods)", how, len(policies), len(pods))
        return how

    def run(self) -> None:
        """Watch the inputs in one thread, apply in this one."""
        threading.Thread(target=self._watch, name="policy-watch", daemon=True).start()
        self.dirty.set()
        while not self.stop.is_set():
            full = time.monotonic() - self._last_full > self.full_every
            if not self.dirty.wait(timeout=1.0) and not full:
                continue
            self.stop.wait(DEBOUNCE)  # let a burst of events collapse into one pass
            self.dirty.clear()
            try:
                self.sync(full=full)
                if full:
                    self._last_full = time.monotonic()
                self.last_error = None
            except OverlayCNIError as exc:
                self.last_error = str(exc)
                log.warning("policy pass failed (%s); retrying", exc)
                self.stop.wait(1.0)
                self.dirty.set()

    def _on_event(self, ev: Event) -> None:
        if ev.key.startswith(self._inputs[0]) or (self.has_policies and ev.key.startswith(self._inputs)):
            self.dirty.set()

    def _watch(self) -> None:
        watch_loop(
            self.store, cluster_root(self.cluster), stop=self.stop, on_event=self._on_event, on_relist=self.dirty.set
        )
