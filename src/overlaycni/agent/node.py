"""The running node: everything the agent's loops share, built once by
``Agent.start`` (nothing here is "not started yet").

Loops (each in its own thread, all ending when ``stop`` is set; the kernel
work of every loop and of CNI requests shares ``kernel_lock``):

* lease keeper: refreshes the lease every TTL/3; a lost lease (the store
  expired it while we could not reach it) is replaced and the liveness
  record ``leases/<node>`` written again. The node record itself stays
  (peers keep this node's routes through an outage of the control plane);
* node watch (``datastore.watch``): a put or delete of a node record is
  folded into the node view, and the peer selection thread re-selects the
  peers and programs the difference (``agent.peers``). A compacted or broken
  watch, or a failed event, falls back to a full resync and resumes;
* resync: every ``resync_interval`` seconds the full desired state is
  recomputed from the datastore and the kernel reconciled to it (Calico
  style), which also catches anything an event missed, and refreshes which
  peers are live. The pods a CNI batch attached after the allocations were
  read are laid over them under the kernel lock (``podlog``: a re-ADD's new
  address must not lose its element to a listing older than it);
* repair (``agent.repair``): kernel events about our objects trigger a
  reconcile from the last desired state, without the datastore;
* the policy controller (``agent.policy``);
* the leak reaper: at start and every ``reap_interval`` seconds (sooner
  when a noted address's grace ends first), releases this node's addresses
  whose pod veth has been gone for ``reap_grace`` seconds (``agent.reaper``).
* the flow log collector (``agent.flowlog``), when flow logs are on and the
  node's NFLOG group could be bound (otherwise the policy table is rendered
  without log rules and ``/healthz`` says why).

A record that does not decode (``BadRecord``) is skipped wherever it is met
and reported once per version (one log line naming the key and the problem,
one count in ``overlaycni_bad_records_total{kind}``): a bad node record
counts as absent (in the watch as in a resync), a bad allocation leaves its
pod's kernel state alone (routes of live veths are never removed), a bad
policy, pod or namespace is left out of the policy table. A peer that
collides with another (``select_peers``) is left out, logged once and
counted in ``overlaycni_peer_conflicts_total``. Every other record is still
programmed.

This node's own record: when it vanishes (``node delete --force`` under a
running agent) the agent claims exactly its old block again and restores
the allocations of its live pods; it never takes a new block while pods use
the old one. If the block (or the name) is held by another node now, the
conflict is reported (``/healthz`` 503, ``conflicts``) and nothing is claimed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from .. import ipam
from ..dataplane import Dataplane, NodeState, PodEndpoint, ReconcileReport, host_veth_name
from ..datastore import EtcdCredentials, Store
from ..errors import DatastoreError, NodeConflict, NotFound, OverlayCNIError
from .cniops import REQUEST_DEADLINE, CNIOps, NodeContext
from .coalesce import Coalescer
from .desired import PeerSelection, node_state, peer_of, select_peers
from .flowlog import FlowCollector, FlowLogOptions
from .flows import FlowBuffer
from .heap import release_free_memory
from .metrics import AgentMetrics, BadRecords
from .peers import NodeView, PeerSelector, keep_peers, keep_view
from .podlog import PodLog
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
    node_ip_v6: IPv6Address | None = None  # dual-stack: None finds it on the underlay (``Agent.start``)
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
    flow_log: FlowLogOptions | None = field(default_factory=FlowLogOptions)  # None: flow logs off


class RunningNode(PeerSelector):
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
        local_pod_mtu: int,
        wg_key: NodeKey | None = None,
    ) -> None:
        """Reconciles the kernel once (raising if that fails: the agent does not start half-done).
        ``wg_key``: the node's WireGuard key (backend wireguard)."""
        self.opts, self.ctx = opts, ctx
        self.wg_key = wg_key
        self.store, self.dp, self.lease = store, dp, lease
        self.metrics, self.stop = metrics, stop
        self.local_pod_mtu = local_pod_mtu  # what the local underlay allows
        self.kernel_lock = threading.RLock()
        self.bad = BadRecords(metrics)
        self.last_resync = 0.0
        self.last_error: str | None = None
        self.datastore_ok = True
        self.conflicts: dict[str, str] = {}  # "name" | "record" -> held by another node (why)
        self.disabled: dict[str, str] = {}  # peer -> why it is not programmed
        self.not_live: tuple[str, ...] = ()
        self.view = NodeView(ipam.ClusterNodes(records=(ctx.record,), live={}, claims={}))
        self._view_lock = threading.Lock()  # the watch folds events into ``view``; a resync replaces it
        self.view_epoch = 0  # full reconciles so far (each replaced ``view`` with a fresh listing)
        self.peer_selection = Coalescer(self.select_peers, stop=stop, name="peer selection")
        # this node's allocations as last read, and since then as ADD and DEL left them
        # (what ``node delete`` released under a running agent is restored from here)
        self.allocations: dict[tuple[str, str], ipam.Allocation] = {}
        self.podlog = PodLog()  # what the CNI batches attached, for reconciles that read before (``podlog``)
        self.state = NodeState(node_ip=ctx.record.node_ip, block=ctx.record.block, pod_cidr=ctx.network.pod_cidr)
        self.state = self._reconcile()
        release_free_memory()  # the first full reconcile's transient structures (heap.py)
        self.flow_log_error: str | None = None
        self.flows = self._open_flow_log()
        self.policy = PolicyController(
            store, cluster=ctx.cluster, node=ctx.record.name, stop=stop, table=dp.policy_table, on_bad=self.bad.report,
            flow_log=self.flows.options.spec if self.flows else None,
            on_inventory=self.flows.update if self.flows else None,
            before_apply=self.flows.before_apply if self.flows else None,
            families=ctx.network.ip_families,
        )  # fmt: skip
        self.ops = CNIOps(
            store, dp, ctx, kernel_lock=self.kernel_lock, policy_programmed=self.policy.programmed,
            request_deadline=opts.request_deadline, on_bad=self.bad.report,
            on_batch=lambda command, size: metrics.batch_size.labels(command).observe(size),
            on_attached=self.podlog.attached,
        )
        self.reaper = Reaper(self.ops, grace=opts.reap_grace, on_reaped=lambda _r: metrics.reaped.inc())

    def _open_flow_log(self) -> FlowCollector | None:
        """The flow log collector; None when off, or when the NFLOG group
        cannot be bound (the node then works without flow logs)."""
        opts = self.opts.flow_log
        if opts is None:
            return None
        try:
            source = self.dp.open_verdict_log(group=opts.spec.group)
        except OverlayCNIError as exc:
            self.flow_log_error = str(exc)
            log.warning("flow logs off: %s", exc)
            return None
        return FlowCollector(
            source, node=self.ctx.record.name, buffer=FlowBuffer(opts.buffer), metrics=self.metrics, stop=self.stop,
            options=opts,
        )  # fmt: skip

    def flow_log_status(self) -> dict[str, Any]:
        if self.flows is not None:
            return self.flows.status()
        return {"enabled": False, "error": self.flow_log_error}

    # ----- full reconcile -----------------------------------------------------------
    def resync(self) -> None:
        """Recompute the desired state from the datastore and reconcile."""
        self.state = self._reconcile()

    def _reconcile(self) -> NodeState:
        c = self.ctx
        view = ipam.cluster_nodes(self.store, c.cluster, on_bad=self.bad.report)
        if view.record(c.record.name) != c.record:
            if not self._reclaim(view):
                return self.state  # a conflict: keep the kernel as it is, say so in /healthz
            view = ipam.cluster_nodes(self.store, c.cluster, on_bad=self.bad.report)
        self._ensure_live(view)
        with self._view_lock:
            held = self.view.snapshot()
        view = keep_view(held, view)  # the held objects where nothing changed
        with self.podlog.reading() as mark:  # before the read: what a batch attaches after it is laid over it
            allocations = ipam.list_allocations(self.store, c.cluster, node=c.record.name, on_bad=self.bad.report)
            selection = select_peers(c.network, c.record, view.records, live=view.live, claims=view.claims)
            with self.kernel_lock:
                allocations = self.podlog.merge(allocations, mark)
                state, report = self._program(view, selection, allocations)
        self.last_resync = time.time()
        self.datastore_ok = True
        self._note(selection)
        m = self.metrics
        m.reconciles.inc()
        m.reconcile_changes.inc(len(report.changes))
        m.allocated.set(len(allocations))
        if report.changes:
            log.info("reconcile: %d change(s): %s", len(report.changes), "; ".join(report.changes[:10]))
        if report.errors:
            m.reconcile_errors.inc(len(report.errors))
            self.last_error = "; ".join(report.errors[:3])
            log.warning("reconcile errors: %s", self.last_error)
        else:  # the current trouble, not history: a full, clean resync ends it (a datastore outage, say)
            self.last_error = None
        return state

    def _program(
        self, view: ipam.ClusterNodes, selection: PeerSelection, allocations: list[ipam.Allocation]
    ) -> tuple[NodeState, ReconcileReport]:
        """The full reconcile's kernel step (under the kernel lock)."""
        c = self.ctx
        state = node_state(
            c.network, c.record, selection.records, allocations, present_veths=self.dp.list_pod_veths(),
            wireguard_key=self.wg_key.key if self.wg_key else None,
        )
        state = keep_peers(self.state, state)
        report = self.dp.reconcile(state)
        self.state = state
        self.podlog.settled()  # the state holds every attachment so far (the batches wait for this lock)
        with self._view_lock:
            self.view = NodeView(view)
            self.view_epoch += 1  # a selection from an older listing must not undo this one
        self.allocations = {(a.container_id, a.ifname): a for a in allocations}
        self._set_mtu(state)
        return state, report

    def current_state(self) -> NodeState:
        """The last full reconcile's state with the pods attached since laid over it (under the
        kernel lock): what the repairer reconciles to (``podlog``)."""
        newer = self.podlog.since(self.podlog.settled_mark)
        if not newer:
            return self.state
        pods = [p for p in self.state.pods if p.host_veth not in newer] + [
            PodEndpoint(ip=a.ip.ip, host_veth=veth, ip_v6=a.ip_v6.ip if a.ip_v6 is not None else None)
            for veth, a in newer.items()
        ]
        return replace(self.state, pods=tuple(sorted(pods, key=lambda p: int(p.ip))))

    def _set_mtu(self, state: NodeState) -> None:
        self.ctx.pod_mtu = state.mtu if state.mtu is not None else self.local_pod_mtu

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

    # ----- this node's own record ----------------------------------------------------
    def _reclaim(self, view: ipam.ClusterNodes) -> bool:
        """Our record is gone or not ours: write it again with exactly our
        block. False (and ``conflict`` set) when another node holds the block
        or the name."""
        c, rec = self.ctx, self.ctx.record
        try:
            new = ipam.register_node(
                self.store, c.cluster, rec.name, rec.node_ip, vtep_mac=rec.vtep_mac, lease=self.lease, mtu=rec.mtu,
                block=rec.block, node_ip_v6=rec.node_ip_v6, **record_identity(self.wg_key, c.network.wireguard_port),
            )
        except NodeConflict:
            try:
                if self._has_pods():
                    raise
                new = ipam.register_node(  # nothing uses the old block: a new one is fine
                    self.store, c.cluster, rec.name, rec.node_ip, vtep_mac=rec.vtep_mac, lease=self.lease, mtu=rec.mtu,
                    node_ip_v6=rec.node_ip_v6, **record_identity(self.wg_key, c.network.wireguard_port),
                )
            except NodeConflict as exc2:
                self._set_conflict("record", f"{exc2.message} ({exc2.details})" if exc2.details else exc2.message)
                return False
        had = view.record(rec.name)
        log.warning("node record %s; written again (block %s)", "was deleted" if had is None else "was changed", new.block)
        c.record = new
        self._restore_allocations()
        self._set_conflict("record", None)
        return True

    def _ensure_live(self, view: ipam.ClusterNodes) -> None:
        """Our liveness record is ours (our lease, our node IP); write it again if
        it is missing, report a conflict if another machine holds our name."""
        c = self.ctx
        mine = view.live.get(c.record.name)
        if mine is not None and mine.lease == self.lease and mine.node_ip == c.record.node_ip:
            self._set_conflict("name", None)
            return
        try:
            ipam.renew_liveness(self.store, c.cluster, c.record.name, c.record.node_ip, self.lease)
            self._set_conflict("name", None)
        except NodeConflict as exc:
            self._set_conflict("name", exc.message)
        except NotFound:  # our lease lapsed: the lease keeper takes a new one
            pass

    def _has_pods(self) -> bool:
        return bool(self.state.pods) or bool(self.dp.list_pod_veths())

    def _restore_allocations(self) -> None:
        """Re-reserve the addresses of live pods (``node delete`` released them)."""
        c = self.ctx
        live = set(self.dp.list_pod_veths())
        for a in list(self.allocations.values()):
            if host_veth_name(a.container_id, a.ifname) not in live:
                continue
            pod = (a.pod_namespace, a.pod_name) if a.pod_namespace and a.pod_name else None
            try:
                ipam.allocate(self.store, c.cluster, c.record.name, a.container_id, a.ifname, pod=pod,
                              requested_ips=[x.ip for x in (a.ip, a.ip_v6) if x is not None])  # fmt: skip
            except OverlayCNIError as exc:
                log.warning("pod %s %s keeps %s, but its reservation could not be restored: %s",
                            a.container_id, a.ifname, a.ip.ip, exc)

    def attached(self, alloc: ipam.Allocation) -> None:
        """An ADD succeeded (``Agent`` tells us)."""
        self.allocations[(alloc.container_id, alloc.ifname)] = alloc

    def detached(self, container_id: str, ifname: str) -> None:
        """A DEL succeeded."""
        self.allocations.pop((container_id, ifname), None)

    def _set_conflict(self, kind: str, message: str | None) -> None:
        if message is None:
            if self.conflicts.pop(kind, None) is not None:
                log.info("node conflict (%s) resolved", kind)
        elif self.conflicts.get(kind) != message:
            log.error("node conflict: %s", message)
            self.conflicts[kind] = message
        self.metrics.node_conflict.set(1 if self.conflicts else 0)

    def publish_record(self) -> None:
        """Write this node's record again (a rotated WireGuard key), with its own block."""
        c, rec = self.ctx, self.ctx.record
        c.record = ipam.register_node(
            self.store, c.cluster, rec.name, rec.node_ip, vtep_mac=rec.vtep_mac, lease=self.lease, mtu=rec.mtu,
            block=rec.block, **record_identity(self.wg_key, c.network.wireguard_port),
        )
        log.info("node record written again (block %s)", c.record.block)

    # ----- loops ------------------------------------------------------------------------
    def lease_loop(self) -> None:
        period = max(0.5, self.opts.lease_ttl / 3)
        while not self.stop.wait(period):
            try:
                try:
                    self.store.refresh_lease(self.lease)
                except NotFound:
                    log.warning("lease expired; taking a new one (this node showed as not live meanwhile)")
                    self.lease = self.store.grant_lease(self.opts.lease_ttl)
                    c = self.ctx
                    ipam.renew_liveness(self.store, c.cluster, c.record.name, c.record.node_ip, self.lease)
                    self._set_conflict("name", None)
                self.datastore_ok = True
            except NodeConflict as exc:
                self._set_conflict("name", exc.message)
            except OverlayCNIError as exc:
                self.datastore_ok = False
                self.last_error = f"lease: {exc}"
                log.warning("lease refresh failed: %s", exc)

    def resync_loop(self) -> None:
        while not self.stop.wait(self.opts.resync_interval):
            if self.safe_resync("periodic"):
                release_free_memory()  # the reconcile's transient structures: back to the kernel (heap.py)

    def reap_loop(self) -> None:
        if self.opts.reap_interval <= 0:
            return
        wait = 0.0  # a pass at start: what a crash left (the DEL quarantine is memory) is noted at once
        while not self.stop.wait(wait):
            try:
                self.reaper.sweep()
            except OverlayCNIError as exc:
                self.reaper.last_error = str(exc)
                log.warning("reaper pass failed: %s", exc)
            wait = self.reaper.next_wait(self.opts.reap_interval)


__all__ = ["AgentOptions", "BadRecords", "RunningNode", "keep_peers", "keep_view", "peer_of"]
