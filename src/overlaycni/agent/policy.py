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
watch, ``datastore.watch``); a debounced loop loads the inventory and hands
it to the node's incremental table state (``policy.incremental.NodePolicy``),
which changes only what the changed pods, namespaces and policies touch and
yields the commands of that change: set and map elements for a label, an
address or a new pod; the policy's chains and the sets it alone uses for a
policy. They go to the data plane's ``PolicyTable`` port in one transaction
(``update``). The first pass, a periodic full pass, a pass after a refused
update and an inventory the state does not follow exactly (two pods of one
address) render the whole table instead (``policy.render``) and replace it
atomically, so a table changed behind the agent's back is repaired. A
record that does not decode is skipped and reported (``on_bad``); every
other record is still programmed.

A new pod is never unprotected: while the cluster has any NetworkPolicy, a
CNI ADD calls ``programmed()`` after attaching the pod and returns only once
a pass that *started* after the call has reached the kernel. Such a pass
read the allocations after the ADD wrote its own, so the new address is in
every set and verdict map the render puts it in. Passes are numbered when
they start; waiters skip the debounce, and ADDs that arrive during a pass
share the next one (one pass serves a burst). A pass that fails makes the
waiting ADDs fail (the CNI layer rolls them back); the wait is bounded by
the request's deadline. With no policy in the cluster ``programmed()``
returns at once: a table without policies lets every pod through anyway.

Stop: once ``stop`` is set the loop runs no pass but those ADDs wait for,
and ends when none waits; an ADD that needs a pass after that (its batch
was in flight when the agent stopped) runs the pass in its own thread, one
at a time, so the batch in flight is answered as it would have been.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .. import deadline
from ..dataplane.ports import PolicyTable
from ..datastore import Event, Store
from ..datastore.keys import BadRecordHandler, cluster_root, ips_prefix, namespaces_prefix, pods_prefix, policies_prefix
from ..datastore.watch import watch_loop
from ..errors import DataplaneError, DeadlineExceeded, OverlayCNIError, PolicyApplyError
from ..families import IPFamily
from ..policy import NamespaceInfo, NetworkPolicy, PodInfo, render_node
from ..policy.flowlog import FlowLogSpec
from ..policy.incremental import NodePolicy
from ..policy.stored import InventoryCache

log = logging.getLogger(__name__)
DEBOUNCE = 0.05
InventoryListener = Callable[[list[PodInfo], list[NamespaceInfo], list[NetworkPolicy]], None]


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
        flow_log: FlowLogSpec | None = None,
        on_inventory: InventoryListener | None = None,
        before_apply: Callable[[], None] | None = None,
        families: tuple[IPFamily, ...] | None = None,
    ):
        """``table`` is the node's ``inet overlaycni`` (the data plane's port);
        ``on_bad`` hears of every record skipped because it does not decode.
        ``flow_log`` renders the flow log rules (``policy.flowlog``);
        ``on_inventory`` hears every inventory a pass loaded (the flow log
        resolves addresses against it); ``before_apply`` runs right before a
        render goes to the kernel (the flow log reads its counter, which a
        whole-table replace restarts). ``families`` are the cluster's (a
        dual-stack table holds its IPv6 sets and rules before the first pod
        has an IPv6 address)."""
        self.store = store
        self.families = families
        self.table = table
        self.cluster = cluster
        self.node = node
        self.stop = stop
        self.on_bad = on_bad
        self.full_every = full_every
        self.flow_log = flow_log
        self.on_inventory = on_inventory
        self.before_apply = before_apply
        self.dirty = threading.Event()
        # With no policy in the cluster the table is the same whatever the
        # pods are: pod and namespace events then cost nothing (no render on
        # the CNI ADD path). A policy event always triggers a pass. With flow
        # logs on the table holds every local pod, so every event counts.
        self.has_policies = True
        self.last_error: str | None = None
        self.passes = {"none": 0, "elements": 0, "rules": 0, "full": 0}
        self.state: NodePolicy | None = None  # the table as the kernel holds it (None: unknown)
        self.incremental_off: str | None = None  # why incremental updates are off (a whole render disagreed)
        self._inventory = InventoryCache()
        self._last_full = 0.0
        # pass numbering for programmed(): started, last applied, last failed (+ why)
        self._passes = threading.Condition()
        self._started = self._applied = self._failed = 0
        self._failure = ""
        self._waiters = 0
        self._ended = False  # the loop has ended (the agent stops): ``programmed`` runs its pass itself
        self._inline = threading.Lock()  # one such pass at a time
        self._inputs = (policies_prefix(cluster), pods_prefix(cluster), namespaces_prefix(cluster), ips_prefix(cluster))

    def load(self) -> tuple[list[PodInfo], list[NamespaceInfo], list[NetworkPolicy]]:
        """The inventory at one store revision; records unchanged since the
        last pass keep their decoded objects (``InventoryCache``)."""
        return self._inventory.load(self.store, self.cluster, on_bad=self.on_bad)

    def sync(self, *, full: bool = False) -> str:
        """One pass: "none", "elements" or "rules" (an incremental update),
        or "full" (the whole table replaced)."""
        pods, namespaces, policies = self.load()
        if self.on_inventory is not None:
            self.on_inventory(pods, namespaces, policies)
        state = self.state
        if state is not None:
            state.update(pods=pods, namespaces=namespaces, policies=policies)  # the state follows every pass
        how = None
        if not full and state is not None and state.exact and self.incremental_off is None:
            how = self._incremental(state, lambda: self._render(pods, namespaces, policies))
        if how is None:
            self.state = None  # until the kernel took the whole table
            self.table.reset()  # re-apply everything: repairs a table changed behind our back
            doc = self._render(pods, namespaces, policies)
            if self.before_apply is not None:
                self.before_apply()  # a whole-table replace restarts the flow log's counter
            how = self.table.sync(doc)
            if state is None or not state.exact:
                state = NodePolicy(self.node, pods=pods, namespaces=namespaces, policies=policies,
                                   flow_log=self.flow_log, families=self.families)  # fmt: skip
            state.mark_applied()
            self.state = state
            if state.exact and self.incremental_off is None and (why := state.describes(doc)) is not None:
                self.incremental_off = why  # never program a table the render would not: whole renders from now on
                log.error("policy: the incremental table differs from the render (%s); rendering whole from now on",
                          why)  # fmt: skip
        self.passes[how] += 1
        self.has_policies = bool(policies)
        if how != "none":
            log.info("policy: %s update (%d policies, %d pods)", how, len(policies), len(pods))
        return how

    def _render(self, pods: list[PodInfo], namespaces: list[NamespaceInfo], policies: list[NetworkPolicy]) -> dict:
        return render_node(self.node, pods=pods, namespaces=namespaces, policies=policies, flow_log=self.flow_log,
                           families=self.families)  # fmt: skip

    def _incremental(self, state: NodePolicy, render: Callable[[], dict]) -> str | None:
        """Apply only what changed since the last pass; None: render whole instead."""
        commands = state.take_changes()
        if not commands:
            return "none"
        try:
            self.table.update(commands, render=render)
        except DataplaneError as exc:
            log.warning("policy: incremental update refused (%s); replacing the table", exc)
            return None
        only_elements = all("element" in body for cmd in commands for body in cmd.values())
        return "elements" if only_elements else "rules"

    def programmed(self) -> None:
        """Return once a pass that started after this call has reached the
        kernel (at once when the cluster has no policy). Raises
        ``PolicyApplyError`` if that pass failed, ``DeadlineExceeded`` when
        the request's deadline passes first."""
        if not self.has_policies:
            return
        with self._passes:
            inline = self._ended
            if not inline:
                target = self._started + 1
                self._waiters += 1
        if inline:
            self._pass_here()
            return
        self.dirty.set()
        try:
            with self._passes:
                done = self._passes.wait_for(lambda: max(self._applied, self._failed) >= target, deadline.remaining())
                if not done:
                    raise DeadlineExceeded("NetworkPolicy for the new pod was not programmed in time")
                if self._applied < target:
                    raise PolicyApplyError(f"NetworkPolicy for the new pod could not be programmed: {self._failure}")
        finally:
            with self._passes:
                self._waiters -= 1
            if self.stop.is_set():
                self.dirty.set()  # the loop ends once no ADD waits: let it look now

    def _pass_here(self) -> None:
        """The pass an ADD needs once the loop has ended (the agent stops)."""
        with self._inline:
            try:
                self.sync()
            except OverlayCNIError as exc:
                raise PolicyApplyError(f"NetworkPolicy for the new pod could not be programmed: {exc}") from None

    def _ending(self) -> bool:
        """Stopped, and no ADD waits for a pass: the loop ends (later ADDs run their pass themselves)."""
        if not self.stop.is_set():
            return False
        with self._passes:
            if self._waiters:
                return False
            self._ended = True
            return True

    def run(self) -> None:
        """Watch the inputs in one thread, apply in this one, until ``stop``
        (then ``wake``); returns once the watch thread has ended too."""
        watcher = threading.Thread(target=self._watch, name="policy-watch", daemon=True)
        watcher.start()
        self.dirty.set()
        while not self._ending():
            full = time.monotonic() - self._last_full > self.full_every
            if not self.dirty.wait(timeout=1.0) and not full:
                continue
            if not self._waiters:
                self.stop.wait(DEBOUNCE)  # let a burst of events collapse into one pass
            if self._ending():
                break  # no pass after the stop unless an ADD in flight waits for it (its answer needs it)
            self.dirty.clear()
            with self._passes:
                self._started += 1
                number = self._started
            try:
                self.sync(full=full)
                if full:
                    self._last_full = time.monotonic()
                self.last_error = None
                with self._passes:
                    self._applied = number
                    self._passes.notify_all()
            except OverlayCNIError as exc:
                self.last_error = str(exc)
                with self._passes:
                    self._failed, self._failure = number, str(exc)
                    self._passes.notify_all()
                log.warning("policy pass failed (%s); retrying", exc)
                self.stop.wait(1.0)
                self.dirty.set()
        watcher.join()  # it ends within its store's watch poll (``datastore.watch``)

    def wake(self) -> None:
        """``stop`` was set: ``run`` ends now, not at its next poll."""
        self.dirty.set()

    def _on_event(self, ev: Event) -> None:
        every = self.has_policies or self.flow_log is not None
        if ev.key.startswith(self._inputs[0]) or (every and ev.key.startswith(self._inputs)):
            self.dirty.set()

    def _watch(self) -> None:
        watch_loop(
            self.store, cluster_root(self.cluster), stop=self.stop, on_event=self._on_event, on_relist=self.dirty.set
        )
