"""The running node: everything the agent's loops share, built once by
``Agent.start`` (nothing here is "not started yet").

Loops (each in its own thread, all ending when ``stop`` is set; the kernel
work of every loop and of CNI requests shares ``kernel_lock``):

* lease keeper: refreshes the lease every TTL/3; a lost lease (the store
  expired it while we could not reach it) is replaced and the node record
  written again;
* node watch (``datastore.watch``): a put programs one peer
  (``ensure_peer``), a delete removes one (``delete_peer``); a compacted or
  broken watch, or a failed event, falls back to a full resync and resumes;
* resync: every ``resync_interval`` seconds the full desired state is
  recomputed from the datastore and the kernel reconciled to it (Calico
  style), which also catches anything an event missed;
* the policy controller (``agent.policy``);
* the leak reaper: every ``reap_interval`` seconds, releases this node's
  addresses whose pod veth has been gone for ``reap_grace`` seconds
  (``agent.reaper``).

A record that does not decode (``BadRecord``) is skipped wherever it is met
and reported once per version (one log line naming the key and the problem,
one count in ``overlaycni_bad_records_total{kind}``): a bad node record
counts as absent (in the watch as in a resync), a bad allocation leaves its
pod's kernel state alone (routes of live veths are never removed), a bad
policy, pod or namespace is left out of the policy table. Every other
record is still programmed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

from .. import ipam
from ..dataplane import Dataplane, NodeState, Peer
from ..datastore import EtcdCredentials, Event, Store
from ..datastore.keys import nodes_prefix, split_key
from ..datastore.watch import watch_loop
from ..errors import BadRecord, DatastoreError, NotFound, OverlayCNIError
from .cniops import REQUEST_DEADLINE, CNIOps, NodeContext
from .desired import node_state, peer_of
from .metrics import AgentMetrics
from .policy import PolicyController
from .reaper import DEFAULT_GRACE, DEFAULT_INTERVAL, Reaper
from .wireguard import DEFAULT_KEY_FILE, NodeKey, record_identity

log = logging.getLogger(__name__)
DEFAULT_SOCKET = "/run/overlaycni/agent.sock"


@dataclass(frozen=True)
class AgentOptions:
    """How the agent was started (the ``overlaycni agent run`` flags)."""

    cluster: str
    node: str
    node_ip: IPv4Address
    datastore: str | None = None
    etcd: EtcdCredentials | None = None  # etcds:// TLS files and etcd user (None: the environment)
    socket: str = DEFAULT_SOCKET
    metrics_addr: str | None = "127.0.0.1:9161"
    lease_ttl: int = 15
    resync_interval: float = 30.0
    startup_timeout: float = 60.0
    wireguard_key: str = DEFAULT_KEY_FILE  # backend wireguard: the node's private key file
    wireguard_socket_dir: str = "/var/run/wireguard"  # wireguard-go's UAPI socket dir
    wireguard_mode: str = "auto"  # auto | kernel | userspace
    request_deadline: float = REQUEST_DEADLINE  # each CNI request's time inside the agent (< the shim's 4.5 s)
    reap_interval: float = DEFAULT_INTERVAL  # 0: no leak reaper
    reap_grace: float = DEFAULT_GRACE


class BadRecords:
    """Records skipped because they do not decode: logged and counted once
    per (key, revision), however many loops meet them."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics
        self.counts: dict[str, int] = {}  # kind -> records skipped
        self._seen: dict[str, int] = {}  # key -> revision last reported
        self._lock = threading.Lock()

    def report(self, exc: BadRecord) -> None:
        with self._lock:
            if self._seen.get(exc.key) == exc.revision:
                return
            self._seen[exc.key] = exc.revision
            self.counts[exc.kind] = self.counts.get(exc.kind, 0) + 1
        log.warning("skipping %s", exc)
        self.metrics.bad_records.labels(exc.kind).inc()


class RunningNode:
    def __init__(
        self,
        opts: AgentOptions,
        ctx: NodeContext,
        *,
        store: Store,
        dp: Dataplane,
        lease: int,
        metrics: AgentMetrics,
        stop: threading.Event,
        wg_key: NodeKey | None = None,
    ) -> None:
        """Reconciles the kernel once (raising if that fails: the agent does not start half-done).
        ``wg_key``: the node's WireGuard key (backend wireguard)."""
        self.opts, self.ctx = opts, ctx
        self.wg_key = wg_key
        self.store, self.dp, self.lease = store, dp, lease
        self.metrics, self.stop = metrics, stop
        self.kernel_lock = threading.RLock()
        self.bad = BadRecords(metrics)
        self.last_resync = 0.0
        self.last_error: str | None = None
        self.datastore_ok = True
        self.state = self._reconcile()
        self.policy = PolicyController(
            store, cluster=ctx.cluster, node=ctx.record.name, stop=stop, table=dp.policy_table, on_bad=self.bad.report
        )
        self.ops = CNIOps(
            store, dp, ctx, kernel_lock=self.kernel_lock, policy_programmed=self.policy.programmed,
            request_deadline=opts.request_deadline, on_bad=self.bad.report,
        )
        self.reaper = Reaper(self.ops, grace=opts.reap_grace, on_reaped=lambda _r: metrics.reaped.inc())

    # ----- full reconcile -----------------------------------------------------------
    def resync(self) -> None:
        """Recompute the desired state from the datastore and reconcile."""
        self.state = self._reconcile()

    def _reconcile(self) -> NodeState:
        c = self.ctx
        nodes = ipam.list_nodes(self.store, c.cluster, on_bad=self.bad.report)
        if not any(n.name == c.record.name for n in nodes):
            self._reregister()
            nodes = ipam.list_nodes(self.store, c.cluster, on_bad=self.bad.report)
        allocations = ipam.list_allocations(self.store, c.cluster, node=c.record.name, on_bad=self.bad.report)
        with self.kernel_lock:
            state = node_state(c.network, c.record, nodes, allocations, present_veths=self.dp.list_pod_veths(),
                               wireguard_key=self.wg_key.key if self.wg_key else None)  # fmt: skip
            report = self.dp.reconcile(state)
            self.state = state
        self.last_resync = time.time()
        self.datastore_ok = True
        m = self.metrics
        m.reconciles.inc()
        m.reconcile_changes.inc(len(report.changes))
        m.peers.set(len(state.peers))
        m.allocated.set(len(allocations))
        if report.changes:
            log.info("reconcile: %d change(s): %s", len(report.changes), "; ".join(report.changes[:10]))
        if report.errors:
            m.reconcile_errors.inc(len(report.errors))
            self.last_error = "; ".join(report.errors[:3])
            log.warning("reconcile errors: %s", self.last_error)
        return state

    def safe_resync(self, why: str) -> bool:
        try:
            self.resync()
            return True
        except OverlayCNIError as exc:
            self._failed(f"{why} resync", exc)
            return False

    def _failed(self, what: str, exc: OverlayCNIError) -> None:
        self.datastore_ok = not isinstance(exc, DatastoreError)
        self.metrics.reconcile_errors.inc()
        self.last_error = f"{what}: {exc}"
        log.warning("%s failed: %s", what, exc)

    def _reregister(self) -> None:
        o, c = self.ctx, self.ctx.record
        try:
            self.store.refresh_lease(self.lease)
        except NotFound:
            self.lease = self.store.grant_lease(self.opts.lease_ttl)
        self.ctx.record = ipam.register_node(
            self.store, o.cluster, c.name, c.node_ip, vtep_mac=c.vtep_mac, lease=self.lease,
            **record_identity(self.wg_key, self.ctx.network.wireguard_port),
        )
        log.info("node record re-registered (block %s)", self.ctx.record.block)

    def publish_record(self) -> None:
        """Write this node's record again (a rotated WireGuard key)."""
        self._reregister()

    # ----- loops ------------------------------------------------------------------------
    def lease_loop(self) -> None:
        period = max(0.5, self.opts.lease_ttl / 3)
        while not self.stop.wait(period):
            try:
                try:
                    self.store.refresh_lease(self.lease)
                except NotFound:
                    log.warning("lease expired; taking a new one")
                    self._reregister()
                self.datastore_ok = True
            except OverlayCNIError as exc:
                self.datastore_ok = False
                self.last_error = f"lease: {exc}"
                log.warning("lease refresh failed: %s", exc)

    def resync_loop(self) -> None:
        while not self.stop.wait(self.opts.resync_interval):
            self.safe_resync("periodic")

    def reap_loop(self) -> None:
        if self.opts.reap_interval <= 0:
            return
        while not self.stop.wait(self.opts.reap_interval):
            try:
                self.reaper.sweep()
            except OverlayCNIError as exc:
                self.reaper.last_error = str(exc)
                log.warning("reaper pass failed: %s", exc)

    def watch_loop(self, start_revision: int) -> None:
        """Node records: one peer per event; a full resync whenever the watch re-lists."""
        watch_loop(
            self.store,
            nodes_prefix(self.ctx.cluster),
            stop=self.stop,
            on_event=self.on_node_event,
            on_relist=self.resync,
            start_revision=start_revision,
            on_error=lambda exc: self._failed("node watch", exc),
        )

    def on_node_event(self, ev: Event) -> None:
        me = self.ctx.record.name
        parts = split_key(ev.key)
        name = parts.rest[0] if parts is not None and parts.rest else ev.key
        record = None
        if ev.kind == "put":
            try:
                record = ipam.decode_node(ev)
            except BadRecord as exc:
                self.bad.report(exc)  # and the node counts as absent, as in a resync
        if record is None and name == me:
            self.safe_resync("own record deleted")
            return
        with self.kernel_lock:
            old = next((p for p in self.state.peers if p.name == name), None)
            new = peer_of(record) if record is not None and record.name != me else None
            if old == new:
                return
            if old is not None and (new is None or (old.block, old.node_ip) != (new.block, new.node_ip)):
                self.dp.delete_peer(self.state, old)  # a changed MAC or WireGuard key is updated in place
                self.state = _with_peers(self.state, tuple(p for p in self.state.peers if p.name != name))
            if new is not None:
                self.state = _with_peers(self.state, (*(p for p in self.state.peers if p.name != name), new))
                self.dp.ensure_peer(self.state, new)
        if new is not None:
            log.info("peer %s %s (%s, block %s)", name, "updated" if old else "added", new.node_ip, new.block)
        else:
            log.info("peer %s removed", name)
        self.metrics.peers.set(len(self.state.peers))


def _with_peers(state: NodeState, peers: tuple[Peer, ...]) -> NodeState:
    return replace(state, peers=tuple(sorted(peers, key=lambda p: p.name)))
