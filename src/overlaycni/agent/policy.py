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

Every change under those prefixes marks the state dirty; a debounced loop
renders the whole table for this node (pure: ``policy.render``) and applies
only the set/map elements that changed when the chains are the same (a label
change, a new pod), or the whole table atomically when they are not (a new
or changed policy). A periodic full pass re-applies from scratch, so a table
changed behind the agent's back is repaired.

A new pod is unprotected until the next pass (tens of milliseconds), as in
Kubernetes, where policy programming is asynchronous to pod start-up too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from .. import ipam
from ..datastore import Store
from ..errors import OverlayCNIError
from ..ipam import model as ipam_keys
from ..policy import NamedPort, NamespaceInfo, PodInfo
from ..policy import store_codec as codec
from ..policy.apply import NodePolicyTable

log = logging.getLogger("overlaycni.agent")
DEBOUNCE = 0.05


def inventory(
    allocations: Iterable[ipam.Allocation], pod_records: Iterable[Any], ns_records: Iterable[Any]
) -> tuple[list[PodInfo], list[NamespaceInfo]]:
    """Join allocations (IP, node) with pod metadata (labels, ports) (pure)."""
    meta: dict[tuple[str, str], tuple[dict, tuple[NamedPort, ...]]] = {}
    for rec in pod_records:
        meta[(rec.namespace, rec.name)] = (dict(rec.labels), rec.ports)
    pods = []
    for a in allocations:
        if not a.pod_namespace or not a.pod_name:
            continue  # not a Kubernetes pod (no K8S_POD_* args): no policy applies
        labels, ports = meta.get((a.pod_namespace, a.pod_name), ({}, ()))
        pods.append(PodInfo(a.pod_namespace, a.pod_name, a.ip.ip, a.node, labels, ports))
    namespaces = {ns.name: ns for ns in ns_records}
    for p in pods:
        namespaces.setdefault(p.namespace, NamespaceInfo(p.namespace, {}))
    return pods, list(namespaces.values())


class PolicyController:
    def __init__(
        self,
        store: Store,
        *,
        cluster: str,
        node: str,
        stop: threading.Event,
        table: Any = None,
        full_every: float = 60.0,
    ):
        """``table`` is the kernel port: ``sync(pods=, namespaces=, policies=)``
        and ``reset()``; by default the node's own ``inet overlaycni``."""
        self.store = store
        self.table = table if table is not None else NodePolicyTable(node)
        self.cluster = cluster
        self.node = node
        self.stop = stop
        self.full_every = full_every
        self.dirty = threading.Event()
        # With no policy in the cluster the table is the same whatever the
        # pods are: pod and namespace events then cost nothing (no render on
        # the CNI ADD path). A policy event always triggers a pass.
        self.has_policies = True
        self.last_error: str | None = None
        self.passes = {"none": 0, "elements": 0, "full": 0}
        self._last_full = 0.0

    def prefixes(self) -> tuple[str, ...]:
        return (
            codec.policies_prefix(self.cluster),
            codec.pods_prefix(self.cluster),
            codec.namespaces_prefix(self.cluster),
            ipam_keys.ips_prefix(self.cluster),
        )

    def load(self) -> tuple[list[PodInfo], list[NamespaceInfo], list[Any]]:
        policies = codec.load_policies(self.store, self.cluster)
        pod_records = []
        for kv in self.store.list(codec.pods_prefix(self.cluster)):
            try:
                pod_records.append(codec.pod_from_dict(codec.decode(kv.value, what=kv.key), path=kv.key))
            except OverlayCNIError as exc:
                log.warning("ignoring pod record %s: %s", kv.key, exc)
        ns_records = []
        for kv in self.store.list(codec.namespaces_prefix(self.cluster)):
            try:
                ns_records.append(codec.namespace_from_dict(codec.decode(kv.value, what=kv.key), path=kv.key))
            except OverlayCNIError as exc:
                log.warning("ignoring namespace record %s: %s", kv.key, exc)
        pods, namespaces = inventory(ipam.list_allocations(self.store, self.cluster), pod_records, ns_records)
        return pods, namespaces, policies

    def sync(self, *, full: bool = False) -> str:
        pods, namespaces, policies = self.load()
        if full:
            self.table.reset()  # re-apply everything: repairs a table changed behind our back
        how = self.table.sync(pods=pods, namespaces=namespaces, policies=policies)
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

    def _watch(self) -> None:
        prefix = ipam_keys.root(self.cluster)
        wanted = self.prefixes()
        policies = codec.policies_prefix(self.cluster)
        rev = self.store.revision()
        while not self.stop.is_set():
            try:
                for ev in self.store.watch(prefix, start_revision=rev + 1, stop=self.stop):
                    rev = max(rev, ev.revision)
                    if ev.key.startswith(policies) or (self.has_policies and ev.key.startswith(wanted)):
                        self.dirty.set()
            except OverlayCNIError as exc:
                log.warning("policy watch interrupted (%s)", exc)
                if self.stop.wait(1.0):
                    return
                try:
                    rev = self.store.revision()
                except OverlayCNIError:
                    continue
                self.dirty.set()
