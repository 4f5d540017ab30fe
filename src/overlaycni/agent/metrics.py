"""Prometheus metrics, /healthz and /flows (the flow log, ``agent.flows``) of the agent."""

from __future__ import annotations

import json
import logging
import selectors
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..errors import BadRecord, OverlayCNIError

if TYPE_CHECKING:
    from .flows import FlowBuffer

log = logging.getLogger(__name__)

PHASE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._drops: _DropCollector | None = None
        r = self.registry
        self.requests = Counter(
            "overlaycni_cni_requests", "CNI requests served, by command and outcome", ["command", "result"], registry=r
        )
        self.latency = Histogram(
            "overlaycni_cni_request_seconds", "CNI request latency inside the agent", ["command"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.phases = Histogram(
            "overlaycni_cni_phase_seconds",
            "Time a CNI request spent in each phase inside the agent (agent.trace: read, queue, lock, netns, "
            "batch, ipam, kernel, conntrack, policy, reply)",
            ["command", "phase"], buckets=PHASE_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "overlaycni_cni_batch_size", "Requests applied together in one batch (group commit), by command",
            ["command"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r,
        )
        self.peers = Gauge("overlaycni_peers", "Peer nodes programmed on this node", registry=r)
        self.peers_not_live = Gauge(
            "overlaycni_peers_not_live",
            "Programmed peers whose agent does not hold its lease (their routes stay while their block is theirs)",
            registry=r,
        )
        self.peers_disabled = Gauge(
            "overlaycni_peers_disabled", "Node records left out because they collide with another node", registry=r
        )
        self.peer_conflicts = Counter(
            "overlaycni_peer_conflicts", "Peers disabled for a collision (each new collision once)", registry=r
        )
        self.repairs = Counter(
            "overlaycni_repairs",
            "Kernel objects restored after another process removed or changed them, by kind of object",
            ["object"], registry=r,
        )
        self.foreign_changes = Counter(
            "overlaycni_foreign_changes",
            "Changes other processes made to this node's tables, device, addresses, routes or neighbours (seen as kernel events)",
            registry=r,
        )
        self.enforcement_ok = Gauge(
            "overlaycni_enforcement_ok", "0 while a change to this node's tables, device or routes is not repaired",
            registry=r,
        )
        self.enforcement_ok.set(1)
        self.node_conflict = Gauge(
            "overlaycni_node_conflict", "1 while this node's name or block is held by another node", registry=r
        )
        self.allocated = Gauge("overlaycni_allocated_ips", "Pod IPs allocated on this node", registry=r)
        self.reconciles = Counter("overlaycni_reconciles", "Full reconciles run", registry=r)
        self.reconcile_changes = Counter("overlaycni_reconcile_changes", "Kernel changes made by reconciles", registry=r)
        self.reconcile_errors = Counter("overlaycni_reconcile_errors", "Reconcile and watch errors", registry=r)
        self.ready = Gauge("overlaycni_ready", "1 when the agent is ready to serve ADD", registry=r)
        self.reaped = Counter(
            "overlaycni_reaped", "Pod addresses the leak reaper released (their pod veth was gone)", registry=r
        )
        self.bad_records = Counter(
            "overlaycni_bad_records",
            "Datastore records skipped because they do not decode (each version of a key once), by kind",
            ["kind"], registry=r,
        )
        self.policy_verdicts = Counter(
            "overlaycni_policy_verdicts",
            "New flows the policy table decided and logged, by direction, verdict and deciding policy "
            "(a deny counts once per policy isolating the pod; policy is empty when none isolates it)",
            ["direction", "verdict", "namespace", "policy"], registry=r,
        )
        self.flow_log_dropped = Counter(
            "overlaycni_flow_log_dropped",
            "Flow records not kept, by reason: ratelimit (kernel rules), socket (lost before the agent read them), "
            "buffer (evicted from the full ring), malformed",
            ["reason"], registry=r,
        )

    def watch_drops(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Export ``overlaycni_dropped_packets_total{rule}``: ``read()`` (the node's
        nftables drop counters, read from the kernel at each scrape). Called again, the
        new ``read`` replaces the old one."""
        if self._drops is None:
            self._drops = _DropCollector(read)
            self.registry.register(self._drops)
        self._drops.read = read

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


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


class _DropCollector:
    NAME = "overlaycni_dropped_packets"
    HELP = "Packets dropped by the node's nftables filters (anti-spoofing, source validation, pods' ARP and IPv6), by rule"

    def __init__(self, read: Callable[[], Mapping[str, int]]) -> None:
        self.read = read

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.NAME, self.HELP, labels=["rule"])

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.NAME, self.HELP, labels=["rule"])
        try:
            counts = self.read()
        except OverlayCNIError as exc:  # the scrape goes on without this family's samples
            log.warning("reading the drop counters: %s", exc)
            counts = {}
        for rule, packets in sorted(counts.items()):
            family.add_metric([rule], packets)
        yield family


def serve_http(
    addr: str, metrics: AgentMetrics, health: Callable[[], dict[str, Any]], *, flows: FlowBuffer | None = None
) -> AgentHTTPServer:
    """Serve /metrics, /healthz and /flows on ``host:port`` (port 0: pick one)."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            extra: tuple[tuple[str, str], ...] = ()
            url = urlsplit(self.path)
            if url.path == "/flows":
                from .flows import answer_flows

                a = answer_flows(flows, parse_qs(url.query))
                body, ctype, code, extra = a.body, a.content_type, a.code, a.headers
            elif self.path.startswith("/metrics"):
                body, ctype, code = metrics.exposition(), CONTENT_TYPE_LATEST, 200
            elif self.path.startswith("/healthz"):
                h = health()
                body, ctype = json.dumps(h).encode(), "application/json"
                code = 200 if h.get("ready") else 503
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for name, value in extra:
                self.send_header(name, value)
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the reader left (a /flows follow stopped with Ctrl-C)

        def log_message(self, *args: Any) -> None:
            pass

    server = AgentHTTPServer((host, int(port or 0)), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


class AgentHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` whose ``shutdown`` returns at once. The base
    class's ``serve_forever`` looks for a shutdown request every
    ``poll_interval`` (0.5 s), which the agent's stop would wait out; here
    ``shutdown`` wakes the loop through a socket pair instead (the agent's
    unix socket server does the same)."""

    daemon_threads = True  # a request in flight (a /flows long poll) does not hold the agent's exit

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        del poll_interval  # woken by ``shutdown`` instead of polling
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self, selectors.EVENT_READ)
                sel.register(self._wake_r, selectors.EVENT_READ)
                while not self._stopping.is_set():
                    for key, _ in sel.select():
                        if key.fileobj is self and not self._stopping.is_set():
                            self._handle_request_noblock()  # type: ignore[attr-defined]  # what serve_forever calls
                    self.service_actions()
        finally:
            self._stopped.set()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop ``serve_forever`` and wait for it (at most ``timeout`` seconds)."""
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # closed already: the loop has ended
        self._stopped.wait(timeout)

    def server_close(self) -> None:
        super().server_close()
        self._wake_r.close()
        self._wake_w.close()
