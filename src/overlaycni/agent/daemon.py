"""The node agent's lifecycle.

Start: open the datastore -> read the cluster network -> find the underlay
from the node IP -> take a lease and register the node (re-claiming its
block by name) -> full reconcile -> serve the CNI socket and /metrics ->
print one ``{"event": "ready"}`` line.

Running, four loops share one kernel lock:
* lease keeper: refreshes the lease every TTL/3; a lost lease (the store
  expired it while we could not reach it) is replaced and the node record
  written again;
* watcher: node records under the cluster's prefix; a put programs one peer
  (``ensure_peer``), a delete removes one (``delete_peer``); a compacted or
  broken watch falls back to a full resync and resumes;
* resync: every ``resync_interval`` seconds the full desired state is
  recomputed from the datastore and the kernel reconciled to it (Calico
  style), which also catches anything an event missed;
* the CNI socket server (one thread per request).

Stop (SIGTERM/SIGINT): the loops end, the socket goes away, the kernel state
stays: pods keep working, and a restarted agent adopts what is there. The
lease is *not* revoked, so peers keep this node until the TTL passes; a
restart well within the TTL is invisible to them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from .. import ipam
from ..dataplane import Dataplane, NodeState
from ..datastore import EtcdCredentials, Store, open_datastore
from ..errors import DatastoreCredentialsError, DatastoreError, DatastoreURLError, NotFound, OverlayCNIError
from .cniops import CNIOps, NodeContext
from .desired import node_state, peer_of
from .metrics import AgentMetrics, serve_http
from .policy import PolicyController
from .server import serve_unix

log = logging.getLogger("overlaycni.agent")
DEFAULT_SOCKET = "/run/overlaycni/agent.sock"


@dataclass(frozen=True)
class AgentOptions:
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


class Agent:
    def __init__(
        self,
        opts: AgentOptions,
        *,
        store: Store | None = None,
        dataplane: Dataplane | None = None,
        policy_table: Any = None,
    ) -> None:
        """``dataplane`` and ``policy_table`` are the kernel ports; both
        default to the Linux implementations in the agent's own namespace.
        Inject fakes together: a fake data plane with the real policy port
        would program nftables in the caller's namespace."""
        if dataplane is not None and policy_table is None:
            raise ValueError("inject policy_table together with a fake dataplane")
        self.opts = opts
        self._policy_table = policy_table
        self._store = store
        self._dp = dataplane
        self.metrics = AgentMetrics()
        self.stop_event = threading.Event()
        self.kernel_lock = threading.RLock()
        self.state: NodeState | None = None
        self.ctx: NodeContext | None = None
        self.lease: int | None = None
        self.last_resync: float | None = None
        self.last_error: str | None = None
        self.datastore_ok = False
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        self._http: Any = None
        self.ops: CNIOps | None = None
        self.policy: PolicyController | None = None

    # ----- start ----------------------------------------------------------------
    @property
    def store(self) -> Store:
        assert self._store is not None
        return self._store

    @property
    def dp(self) -> Dataplane:
        assert self._dp is not None
        return self._dp

    def _open(self) -> None:
        deadline = time.monotonic() + self.opts.startup_timeout
        while True:
            try:
                if self._store is None:
                    self._store = open_datastore(self.opts.datastore, credentials=self.opts.etcd)
                ipam.get_cluster(self._store, self.opts.cluster)
                self.datastore_ok = True
                return
            except (DatastoreURLError, DatastoreCredentialsError):
                raise  # the settings are wrong: waiting will not fix them
            except DatastoreError as exc:  # not up yet (e.g. etcd starting)
                if time.monotonic() > deadline:
                    raise
                log.warning("datastore not ready (%s); retrying", exc)
                self._store = None
                self.stop_event.wait(1.0)
                if self.stop_event.is_set():
                    raise

    def start(self) -> dict[str, Any]:
        o = self.opts
        self._open()
        net = ipam.get_cluster(self.store, o.cluster)
        if self._dp is None:
            from ..dataplane.linux import LinuxDataplane

            self._dp = LinuxDataplane()
        info = self.dp.node_info(o.node_ip, backend=net.backend, mtu=net.mtu)
        self.lease = self.store.grant_lease(o.lease_ttl)
        record = ipam.register_node(self.store, o.cluster, o.node, o.node_ip, vtep_mac=info.vtep_mac, lease=self.lease)
        self.ctx = NodeContext(cluster=o.cluster, network=net, record=record, pod_mtu=info.pod_mtu)
        start_rev = self.store.revision()
        self.resync()
        self.ops = CNIOps(self.store, self.dp, self.ctx, kernel_lock=self.kernel_lock, on_change=self._count_pods)
        self._server = serve_unix(o.socket, self._handle, self._observe)
        if o.metrics_addr:
            self._http = serve_http(o.metrics_addr, self.metrics, self.health)
        self._spawn("lease", self._lease_loop)
        self._spawn("watch", self._watch_loop, start_rev)
        self._spawn("resync", self._resync_loop)
        self.policy = PolicyController(
            self.store, cluster=o.cluster, node=o.node, stop=self.stop_event, table=self._policy_table
        )
        self._spawn("policy", self.policy.run)
        self.metrics.ready.set(1)
        ready = {
            "event": "ready",
            "node": o.node,
            "cluster": o.cluster,
            "node_ip": str(o.node_ip),
            "block": str(record.block),
            "vtep_mac": info.vtep_mac,
            "backend": net.backend,
            "pod_mtu": info.pod_mtu,
            "underlay": info.underlay_ifname,
            "socket": o.socket,
            "metrics": self._metrics_url(),
            "pid": os.getpid(),
        }
        return ready

    def _metrics_url(self) -> str | None:
        if self._http is None:
            return None
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # ----- requests -------------------------------------------------------------
    def _handle(self, req: Any) -> dict[str, Any] | None:
        if req.command == "AGENT_STATUS":
            return self.health()
        assert self.ops is not None
        return self.ops.handle(req)

    def _observe(self, command: str, outcome: str, seconds: float) -> None:
        self.metrics.requests.labels(command, outcome).inc()
        self.metrics.latency.labels(command).observe(seconds)

    def _count_pods(self) -> None:
        pass  # the resync loop refreshes the gauges; ADD/DEL stay off the datastore

    def health(self) -> dict[str, Any]:
        ctx = self.ctx
        return {
            "ready": bool(self.metrics.ready._value.get()) and self.datastore_ok,  # noqa: SLF001
            "node": self.opts.node,
            "cluster": self.opts.cluster,
            "node_ip": str(self.opts.node_ip),
            "block": str(ctx.record.block) if ctx else None,
            "backend": ctx.network.backend if ctx else None,
            "peers": len(self.state.peers) if self.state else 0,
            "pods": len(self.state.pods) if self.state else 0,
            "datastore": getattr(self._store, "url", self.opts.datastore),
            "datastore_ok": self.datastore_ok,
            "datastore_tls": self._tls_status(),
            "last_resync_age": round(time.time() - self.last_resync, 1) if self.last_resync else None,
            "last_error": self.last_error,
            "policy_error": self.policy.last_error if self.policy else None,
            "policy_passes": dict(self.policy.passes) if self.policy else {},
            "pid": os.getpid(),
        }

    def _tls_status(self) -> dict[str, Any] | None:
        """The client certificate in use (etcds://): rotations show here."""
        status = getattr(self._store, "tls_status", None)
        return status() if status is not None else None

    # ----- reconcile --------------------------------------------------------------
    def resync(self) -> None:
        """Recompute the desired state from the datastore and reconcile."""
        assert self.ctx is not None
        c = self.ctx
        nodes = ipam.list_nodes(self.store, c.cluster)
        if not any(n.name == c.record.name for n in nodes):
            self._reregister()
            nodes = ipam.list_nodes(self.store, c.cluster)
        allocations = ipam.list_allocations(self.store, c.cluster, node=c.record.name)
        with self.kernel_lock:
            state = node_state(c.network, c.record, nodes, allocations, present_veths=self.dp.list_pod_veths())
            report = self.dp.reconcile(state)
            self.state = state
        self.last_resync = time.time()
        self.datastore_ok = True
        self.metrics.reconciles.inc()
        self.metrics.reconcile_changes.inc(len(report.changes))
        self.metrics.peers.set(len(state.peers))
        self.metrics.allocated.set(len(allocations))
        if report.changes:
            log.info("reconcile: %d change(s): %s", len(report.changes), "; ".join(report.changes[:10]))
        if report.errors:
            self.metrics.reconcile_errors.inc(len(report.errors))
            self.last_error = "; ".join(report.errors[:3])
            log.warning("reconcile errors: %s", self.last_error)

    def _reregister(self) -> None:
        assert self.ctx is not None
        o = self.opts
        vtep = self.ctx.record.vtep_mac
        try:
            self.store.refresh_lease(self.lease)  # type: ignore[arg-type]
        except (NotFound, TypeError):
            self.lease = self.store.grant_lease(o.lease_ttl)
        record = ipam.register_node(self.store, o.cluster, o.node, o.node_ip, vtep_mac=vtep, lease=self.lease)
        self.ctx.record = record
        log.info("node record re-registered (block %s)", record.block)

    def _lease_loop(self) -> None:
        period = max(0.5, self.opts.lease_ttl / 3)
        while not self.stop_event.wait(period):
            try:
                try:
                    self.store.refresh_lease(self.lease)  # type: ignore[arg-type]
                except NotFound:
                    log.warning("lease expired; taking a new one")
                    self._reregister()
                self.datastore_ok = True
            except OverlayCNIError as exc:
                self.datastore_ok = False
                self.last_error = f"lease: {exc}"
                log.warning("lease refresh failed: %s", exc)

    def _resync_loop(self) -> None:
        while not self.stop_event.wait(self.opts.resync_interval):
            self._safe_resync("periodic")

    def _safe_resync(self, why: str) -> bool:
        try:
            self.resync()
            return True
        except OverlayCNIError as exc:
            self.datastore_ok = not isinstance(exc, DatastoreError)
            self.metrics.reconcile_errors.inc()
            self.last_error = f"{why} resync: {exc}"
            log.warning("%s resync failed: %s", why, exc)
            return False

    def _watch_loop(self, start_rev: int) -> None:
        assert self.ctx is not None
        prefix = ipam.nodes_prefix(self.ctx.cluster)
        rev = start_rev
        while not self.stop_event.is_set():
            try:
                for ev in self.store.watch(prefix, start_revision=rev + 1, stop=self.stop_event):
                    rev = max(rev, ev.revision)
                    self._on_node_event(ev)
            except OverlayCNIError as exc:  # compacted, or the connection broke
                self.metrics.reconcile_errors.inc()
                self.last_error = f"watch: {exc}"
                log.warning("watch interrupted (%s); resyncing", exc)
                if self.stop_event.wait(1.0):
                    return
                try:
                    rev = self.store.revision()
                except OverlayCNIError:
                    self.datastore_ok = False
                    continue
                self._safe_resync("watch")

    def _on_node_event(self, ev: Any) -> None:
        assert self.ctx is not None and self.state is not None
        me = self.ctx.record.name
        try:
            if ev.kind == "put":
                record = ipam.node_from_kv(ev)
                if record.name == me:
                    return
                peer = peer_of(record)
                with self.kernel_lock:
                    others = tuple(p for p in self.state.peers if p.name != peer.name)
                    old = next((p for p in self.state.peers if p.name == peer.name), None)
                    if old is not None and old != peer:
                        self.dp.delete_peer(self.state, old)
                    if old != peer:
                        self.state = _with_peers(self.state, others + (peer,))
                        self.dp.ensure_peer(self.state, peer)
                        log.info("peer %s %s (%s, block %s)", peer.name, "updated" if old else "added", peer.node_ip, peer.block)
            else:
                name = ev.key.rstrip("/").rsplit("/", 1)[-1]
                if name == me:
                    self._safe_resync("own record deleted")
                    return
                with self.kernel_lock:
                    old = next((p for p in self.state.peers if p.name == name), None)
                    if old is not None:
                        self.dp.delete_peer(self.state, old)
                        self.state = _with_peers(self.state, tuple(p for p in self.state.peers if p.name != name))
                        log.info("peer %s removed", name)
            self.metrics.peers.set(len(self.state.peers))
        except OverlayCNIError as exc:
            self.metrics.reconcile_errors.inc()
            self.last_error = f"peer event: {exc}"
            log.warning("peer event %s %s failed (%s); full resync", ev.kind, ev.key, exc)
            self._safe_resync("event")

    # ----- stop -----------------------------------------------------------------
    def run_forever(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        while not self.stop_event.wait(1.0):
            pass
        self.shutdown()

    def shutdown(self) -> None:
        self.stop_event.set()
        self.metrics.ready.set(0)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            try:
                os.unlink(self.opts.socket)
            except FileNotFoundError:
                pass
        if self._http is not None:
            self._http.shutdown()
        for t in self._threads:
            t.join(timeout=2.0)
        if self._dp is not None:
            self._dp.close()
        if self._store is not None:
            self._store.close()
        log.info("agent stopped; pods keep their network")


def _with_peers(state: NodeState, peers: tuple[Any, ...]) -> NodeState:
    from dataclasses import replace

    return replace(state, peers=tuple(sorted(peers, key=lambda p: p.name)))


def run_agent(opts: AgentOptions) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s overlaycni-agent[" + opts.node + "] %(message)s",
    )
    agent = Agent(opts)
    try:
        ready = agent.start()
    except BaseException:
        agent.shutdown()
        raise
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    log.info("ready: node %s ip %s block %s", opts.node, opts.node_ip, ready["block"])
    agent.run_forever()
    return 0
