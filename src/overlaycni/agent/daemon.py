"""The node agent's lifecycle.

Start: open the datastore -> read the cluster network -> find the underlay
from the node IP -> take a lease and register the node (re-claiming its
block by name) -> full reconcile -> serve the CNI socket and /metrics ->
print one ``{"event": "ready"}`` line. ``start`` builds the running state in
one object (``node.RunningNode``: the loops, the CNI operations, the policy
controller); before it there is only configuration.

Running: the loops of ``RunningNode``, the repair loop (``repair.Repairer``:
kernel events about our objects changed by others) and the CNI socket server
(one thread per request).

Stop (SIGTERM/SIGINT, ``shutdown``): prompt, bounded and clean
(``agent.stopping``): no new requests, the batch in flight answered, every
loop woken and joined against one deadline, the lease given up, the kernel
handles closed. The kernel state stays: pods keep working, and a restarted
agent adopts what is there.

Health (``/healthz``, ``agent status``): ready only while the datastore
answers, this node's name and block are its own (``conflicts``) and its
enforcement is in place (``repair``); ``reasons`` says what is wrong.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import threading
import time
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, IPv6Network
from typing import Any

from .. import ipam
from ..config import ClusterNetwork, IPFamily
from ..dataplane import Dataplane, NodeState
from ..datastore import Store, open_datastore
from ..errors import DatastoreCredentialsError, DatastoreError, DatastoreURLError, OverlayCNIError
from ..trace import RequestTrace
from .cniops import NodeContext
from .heap import limit_arenas
from .imports import lean_pyroute2
from .metrics import AgentMetrics, serve_http
from .node import AgentOptions, RunningNode
from .repair import NoEvents, Repairer
from .server import claim_socket_path, serve_unix
from .stopping import SignalRelay, StopClock, revoke_lease
from .wireguard import KeyRotator, NodeKey, record_identity

log = logging.getLogger(__name__)
LOG_LEVEL_ENV = "OVERLAYCNI_LOG_LEVEL"  # DEBUG shows datastore fail-over, lock waits and data-plane batches


class Agent:
    def __init__(
        self,
        opts: AgentOptions,
        *,
        store: Store | None = None,
        dataplane: Dataplane | None = None,
    ) -> None:
        """``dataplane`` (with its NetworkPolicy table) defaults to the Linux
        implementation in the agent's own namespace."""
        self.opts = opts
        self._store = store
        self._dp = dataplane
        self.metrics = AgentMetrics()
        self.stop_event = threading.Event()
        self.node: RunningNode | None = None
        self.rotator: KeyRotator | None = None  # backend wireguard only
        self.repair: Repairer | None = None
        self._events: Any = None
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        self._http: Any = None
        self._stopped = False
        self._signals: SignalRelay | None = None  # ``handle_signals``
        self.stragglers: list[str] = []  # after ``shutdown``: threads that did not stop in time
        self.stop_phases: dict[str, float] = {}  # after ``shutdown``: seconds per step

    @property
    def state(self) -> NodeState | None:
        """The node's desired state as last programmed (None before ``start``)."""
        return self.node.state if self.node is not None else None

    # ----- start ----------------------------------------------------------------
    def _open(self) -> Store:
        deadline = time.monotonic() + self.opts.startup_timeout
        while True:
            try:
                if self._store is None:
                    self._store = open_datastore(self.opts.datastore, credentials=self.opts.etcd)
                ipam.get_cluster(self._store, self.opts.cluster)
                return self._store
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
        claim_socket_path(o.socket)  # before anything else: a path that is not our stale socket stops the start
        store = self._open()
        net = ipam.get_cluster(store, o.cluster)
        wg_key = NodeKey(o.wireguard_key) if net.backend == "wireguard" else None
        if self._dp is None:
            lean_pyroute2()  # before the data plane imports it: only the netlink parts it uses (``imports``)
            from ..dataplane.linux import LinuxDataplane, WireGuardSettings

            self._dp = LinuxDataplane(wireguard=WireGuardSettings(mode=o.wireguard_mode, socket_dir=o.wireguard_socket_dir))
        info = self._dp.node_info(o.node_ip, backend=net.backend, mtu=net.mtu)
        # Host veths a DEL parked before a crash (``agent.quarantine``): their pods are deleted; the
        # reaper releases their allocations (no pod veth) once they are gone.
        self._dp.delete_parked_veths()
        node_ip_v6 = self._node_ip_v6(net)
        self.metrics.watch_drops(self._dp.drop_counters)
        # Pods of an earlier run use the block on the kernel's gateway address:
        # claim exactly that one again (never a new block under live pods).
        used = self._dp.adopted_block(net.node_cidr_size) if self._dp.list_pod_veths() else None
        lease = store.grant_lease(o.lease_ttl)
        try:
            record = ipam.register_node(
                store, o.cluster, o.node, o.node_ip, vtep_mac=info.vtep_mac, lease=lease, mtu=info.underlay_mtu,
                block=used, node_ip_v6=node_ip_v6, **record_identity(wg_key, net.wireguard_port),
            )
        except OverlayCNIError:
            with contextlib.suppress(OverlayCNIError):
                store.revoke_lease(lease)
            raise
        start_rev = store.revision()
        node = RunningNode(
            o, NodeContext(cluster=o.cluster, network=net, record=record, pod_mtu=info.pod_mtu),
            store=store, dp=self._dp, lease=lease, metrics=self.metrics, stop=self.stop_event,
            local_pod_mtu=info.pod_mtu, wg_key=wg_key,
        )
        self.node = node
        self._server = serve_unix(o.socket, functools.partial(self._handle, node), self._observe, on_trace=self._trace)
        if o.metrics_addr:
            self._http = serve_http(o.metrics_addr, self.metrics, self.health, flows=node.flows.buffer if node.flows else None)
        self._spawn("lease", node.lease_loop)
        self._spawn("peers", node.peer_selection.loop)
        self._spawn("watch", node.watch_loop, start_rev)
        self._spawn("resync", node.resync_loop)
        self._spawn("policy", node.policy.run)
        if wg_key is not None:
            self.rotator = KeyRotator(
                store, cluster=o.cluster, node=o.node, node_key=wg_key,
                reconcile=node.resync, publish=node.publish_record, stop=self.stop_event,
            )  # fmt: skip
            self._spawn("wgrotate", self.rotator.run)
        self._spawn("reaper", node.reap_loop)
        try:
            self._events = self._dp.kernel_events()
        except OSError as exc:  # no netlink multicast here: repairs wait for a resync or a poll
            log.warning("kernel events unavailable (%s): changes to this node's objects are found by polling", exc)
            self._events = NoEvents(self.stop_event)
        self.repair = Repairer(node, self._events, interval=o.resync_interval)
        self._spawn("repair", self.repair.run)
        if node.flows is not None:
            self._spawn("flows", node.flows.run)
        self.metrics.ready.set(1)
        return {
            "event": "ready",
            "node": o.node,
            "cluster": o.cluster,
            "node_ip": str(o.node_ip),
            "node_ip_v6": str(record.node_ip_v6) if record.node_ip_v6 else None,
            "block": str(record.block),
            "block_v6": str(record.block_v6) if record.block_v6 else None,
            "vtep_mac": info.vtep_mac,
            "backend": net.backend,
            "pod_mtu": node.ctx.pod_mtu,
            "wireguard_public_key": wg_key.key.public if wg_key else None,
            "underlay": info.underlay_ifname,
            "socket": o.socket,
            "metrics": self._metrics_url(),
            "pid": os.getpid(),
        }

    def _node_ip_v6(self, net: ClusterNetwork) -> IPv6Address | None:
        """Dual-stack: ``--node-ip-v6``, else the underlay's address in the IPv6
        node subnet. Without one, IPv6 pod traffic to other nodes still rides
        VXLAN or WireGuard (over IPv4), but the direct backend cannot route
        this node's IPv6 block and IPv6 egress has no source to take."""
        v6 = net.family(IPFamily.ipv6)
        if v6 is None:
            return None
        assert self._dp is not None
        found = self.opts.node_ip_v6 or self._dp.find_node_ip_v6(self.opts.node_ip, subnet=IPv6Network(v6.node_subnet_cidr))
        if found is None:
            log.warning("dual-stack: no IPv6 address in %s on the underlay (--node-ip-v6 to give one): "
                        "IPv6 egress and backend direct need it", v6.node_subnet_cidr)
        return found

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
    def _handle(self, node: RunningNode, req: Any) -> dict[str, Any] | None:
        if req.command == "AGENT_STATUS":
            return self.health()
        result = node.ops.handle(req)
        if req.command == "ADD" and result is not None:
            ips = result.get("ips") or [{}]
            with contextlib.suppress(KeyError, ValueError, TypeError):
                ip = IPv4Interface(ips[0]["address"])
                v6 = next((IPv6Interface(e["address"]) for e in ips[1:] if ":" in str(e.get("address", ""))), None)
                ns, name = req.pod if req.pod else (None, None)
                node.attached(ipam.Allocation(
                    ip=ip, gateway=IPv4Address(ips[0]["gateway"]), container_id=req.container_id, ifname=req.ifname,
                    node=node.ctx.record.name, pod_namespace=ns, pod_name=name, ip_v6=v6,
                ))
        elif req.command == "DEL":
            node.detached(req.container_id, req.ifname)
        return result

    def _observe(self, command: str, outcome: str, seconds: float) -> None:
        self.metrics.requests.labels(command, outcome).inc()
        self.metrics.latency.labels(command).observe(seconds)

    def reasons(self) -> list[str]:
        """Why this node is not ready (empty: it is)."""
        n = self.node
        if n is None or not self.metrics.ready._value.get():  # noqa: SLF001
            return ["starting or stopping"]
        out = [f"conflict: {message}" for message in n.conflicts.values()]
        if self.repair is not None:
            out += self.repair.missing
        if not n.datastore_ok:
            out.append(f"datastore unreachable: {n.last_error}")
        return out

    def _trace(self, trace: RequestTrace) -> None:
        """Each phase of an answered request into ``overlaycni_cni_phase_seconds``."""
        for phase, seconds in trace.durations().items():
            self.metrics.phases.labels(trace.command, phase).observe(seconds)

    def health(self) -> dict[str, Any]:
        n = self.node
        datastore_ok = n is not None and n.datastore_ok
        reasons = self.reasons()
        return {
            "ready": not reasons,
            "reasons": reasons,
            "node": self.opts.node,
            "cluster": self.opts.cluster,
            "node_ip": str(self.opts.node_ip),
            "block": str(n.ctx.record.block) if n else None,
            "block_v6": str(n.ctx.record.block_v6) if n and n.ctx.record.block_v6 else None,
            "backend": n.ctx.network.backend if n else None,
            "peers": len(n.state.peers) if n else 0,
            "peers_not_live": list(n.not_live) if n else [],
            "peers_disabled": dict(n.disabled) if n else {},
            "conflicts": dict(n.conflicts) if n else {},
            "pod_mtu": n.ctx.pod_mtu if n else None,
            "pods": len(n.state.pods) if n else 0,
            "datastore": getattr(self._store, "url", self.opts.datastore),
            "datastore_ok": datastore_ok,
            "datastore_tls": self._tls_status(),
            "last_resync_age": round(time.time() - n.last_resync, 1) if n else None,
            "last_error": n.last_error if n else None,
            "policy_error": n.policy.last_error if n else None,
            "policy_passes": dict(n.policy.passes) if n else {},
            "bad_records": dict(n.bad.counts) if n else {},
            "last_repair": self.repair.last_repair if self.repair else None,
            "wireguard": self._wg_health(),
            "reaped": n.reaper.status() if n else None,
            "quarantine": n.ops.quarantine.status() if n else None,
            "flow_log": n.flow_log_status() if n else None,
            "pid": os.getpid(),
        }

    def _wg_health(self) -> dict[str, Any] | None:
        """Backend wireguard: the public key, rotations, and the device as it reports itself."""
        n = self.node
        if n is None or n.wg_key is None:
            return None
        out: dict[str, Any] = {"public_key": n.wg_key.key.public, "rotations": self.rotator.rotations if self.rotator else 0}
        try:
            dev = n.dp.wireguard_device()
        except OverlayCNIError as exc:
            return {**out, "error": exc.message}
        if dev is not None:
            out.update(implementation=dev.implementation, pid=dev.pid, listen_port=dev.listen_port, peers=len(dev.peers),
                       peers_with_handshake=sum(1 for p in dev.peers if p.last_handshake))  # fmt: skip
        return out

    def _tls_status(self) -> dict[str, Any] | None:
        """The client certificate in use (etcds://): rotations show here."""
        status = getattr(self._store, "tls_status", None)
        return status() if status is not None else None

    # ----- stop -----------------------------------------------------------------
    def handle_signals(self) -> None:
        """SIGTERM and SIGINT stop the agent cleanly (its lease given up). Installed
        before ``start``: a runtime may stop the agent as soon as it reads "ready".
        The handler never takes a lock (``stopping.SignalRelay``)."""
        self._signals = SignalRelay(self.stop_event)
        self._signals.install()
        self._spawn("signals", self._signals.run)

    def run_forever(self) -> None:
        while not self.stop_event.wait(1.0):
            pass
        self.shutdown()

    def shutdown(self) -> None:
        """Stop cleanly and promptly, in ``agent.stopping``'s order; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        clock = StopClock()
        self.stop_event.set()
        self.metrics.ready.set(0)
        if self._signals is not None:
            self._signals.wake()  # a stop that is not a signal ends the relay thread too
        n = self.node
        with clock.step("socket"):
            if self._server is not None:
                self._server.shutdown(timeout=clock.left())  # no new requests; the socket file is gone
        with clock.step("wake"):
            self._wake_loops()
        with clock.step("batch"):
            if n is not None and not n.ops.close(timeout=clock.left()):  # the batch in flight is answered
                self.stragglers.append("cni-batch")
            if self._server is not None and not self._server.wait_idle(clock.left()):
                self.stragglers.append("cni-request")
        with clock.step("threads"):
            for t in self._threads:
                t.join(timeout=clock.left())
        self.stragglers += [t.name for t in self._threads if t.is_alive()]
        if self.stragglers:
            log.warning("stop: %s still running after %.1f s; stopping without them (the data plane is closed under them)",
                        ", ".join(self.stragglers), clock.seconds)
        with clock.step("lease"):
            if n is not None and n.datastore_ok and self._store is not None:
                revoke_lease(self._store, n.lease)
        with clock.step("close"):
            if self._dp is not None:
                self._dp.close()
            if self._store is not None:
                self._store.close()
        self.stop_phases = clock.phases
        log.info("agent stopped in %s; pods keep their network", clock.summary())

    def _wake_loops(self) -> None:
        """Close what loops block on (each then returns at once) and wake those waiting on a condition."""
        if self._events is not None:
            self._events.close()
        wake_watches = getattr(self._store, "wake_watches", None)  # etcd (SQLite's watches wait on the stop itself)
        if wake_watches is not None:
            wake_watches()
        n = self.node
        if n is not None:
            if n.flows is not None:
                n.flows.close()
            n.policy.wake()
            n.peer_selection.wake()
        if self._http is not None:
            self._http.shutdown(timeout=1.0)
            self._http.server_close()


def run_agent(opts: AgentOptions) -> int:
    logging.basicConfig(
        level=os.environ.get(LOG_LEVEL_ENV, "INFO").upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s overlaycni-agent[" + opts.node + "] %(message)s",
    )
    limit_arenas()  # before any thread (heap.py)
    agent = Agent(opts)
    agent.handle_signals()
    try:
        ready = agent.start()
    except BaseException:
        agent.shutdown()
        raise
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    log.info("ready: node %s ip %s block %s", opts.node, opts.node_ip, ready["block"])
    agent.run_forever()
    # Stopped and closed: exit now. The interpreter's own teardown (every
    # module's objects freed one by one) took 0.2-0.3 s, most of a stop
    # (``bench/stop.py``), and would wait for any thread named in the stop's
    # warning that is not a daemon (a CNI request thread). Our files and
    # sockets are closed already; only the log needs flushing.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
