"""The agent's flow log: packets the policy table logged -> flow records.

One thread (``FlowCollector.run``) reads the node's ``VerdictLog`` port (an
NFLOG group, ``dataplane.linux.nflog``) in bounded batches and turns each
packet into a ``FlowRecord``: the prefix gives direction and verdict (and
for an allow the digest of the allowing rule, ``policy.flowlog``); the
addresses become pods through the policy controller's current inventory
(``update``, called after every load); a deny is attributed to the
policies that isolate the pod in that direction (``engine.selecting``).
Records go to the ring (``agents.flows.FlowBuffer``) and the counters
``overlaycni_policy_verdicts_total{direction, verdict, namespace, policy}``.

What is not recorded is counted in ``overlaycni_flow_log_dropped_total
{reason}``: ``ratelimit`` (the kernel rules decided the flow without
logging it: per-source rate or node cap), ``socket`` (messages the netlink
socket lost, from NFLOG sequence gaps), ``buffer`` (records evicted from the
full ring) and ``malformed`` (a message or prefix that is not ours).

The rule digests of the previous inventory are kept next to the current
ones, so a packet logged just before a policy change still names its rule.

On by default (``agent --no-flow-logs`` turns it off), because of what
``bench/policy.py`` measures on two pods of one node under the 500-policy
table (two sessions of three runs, on a shared 2-core machine; medians of
the runs, ranges over the runs): established packets never reach a log
rule (the base chains accept them first), so iperf3 throughput with flow
logs is that without them within the noise (ratios 1.02-1.36 in one
session, 0.83-1.06, median 0.93, in the other at a load average of 7-17,
where single rounds ranged 0.37-9.7); a new connection costs the kernel
one more chain of at most five rules and, when logged, one NFLOG message
and about 30 us of this thread (decode 12, record 20). At the default
limits (100 new flows a second per source, burst 200; 1,000 a second per
node), connections per CPU second (client, server and collector together,
the steadier measure on a shared machine) stay at 0.94-0.95 and 1.01-1.06
(median 1.02) of no logging, and new connections per second at 0.89-1.04
and 1.20-2.14 (above 1: the noise of the load); the collector's share is
bounded whatever the traffic (at most about 3% of a core). Logging every
flow instead leaves 0.46-0.59 and 0.57-0.60 of the connections per CPU
second: the limits, not the capture, are what make it cheap enough to
leave on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..dataplane.nflog import CaptureStats, LoggedPacket
from ..dataplane.ports import VerdictLog
from ..errors import OverlayCNIError
from ..policy.engine import selecting
from ..policy.flowlog import FlowLogSpec, RuleRef, parse_prefix, rule_index
from ..policy.model import NamespaceInfo, NetworkPolicy, PodInfo
from .flows import FlowBuffer, FlowEndpoint, FlowRecord
from .metrics import AgentMetrics

log = logging.getLogger(__name__)
STATS_EVERY = 1.0
PLAUSIBLE_SKEW = 300.0  # a kernel timestamp further than this from now is not wall-clock time
DEFAULT_BUFFER = 10000


@dataclass(frozen=True)
class FlowLogOptions:
    """Flow logging on a node: the kernel side (``spec``) and the ring size."""

    spec: FlowLogSpec = field(default_factory=FlowLogSpec)
    buffer: int = DEFAULT_BUFFER


@dataclass(frozen=True)
class _View:
    """One inventory, with what records derive from it memoised (a view is
    replaced whole, never edited, so the memos stay true)."""

    pods: dict[Any, PodInfo]  # both families' addresses
    policies: tuple[NetworkPolicy, ...]
    rules: dict[str, RuleRef]
    endpoints: dict[Any, FlowEndpoint] = field(default_factory=dict)
    isolating: dict[tuple[Any, str], tuple[str, ...]] = field(default_factory=dict)

    def endpoint(self, ip: Any) -> FlowEndpoint:
        e = self.endpoints.get(ip)
        if e is None:
            pod = self.pods.get(ip)
            e = self.endpoints[ip] = FlowEndpoint(str(ip), pod.name if pod else None, pod.namespace if pod else None)
        return e

    def isolated_by(self, ip: Any, direction: str) -> tuple[str, ...]:
        """The policies isolating the pod at ``ip`` in ``direction`` (Ingress/Egress)."""
        key = (ip, direction)
        found = self.isolating.get(key)
        if found is None:
            pod = self.pods.get(ip)
            found = tuple(p.key for p in selecting(pod, direction, policies=self.policies)) if pod else ()
            self.isolating[key] = found
        return found


class FlowCollector:
    def __init__(
        self,
        source: VerdictLog,
        *,
        node: str,
        buffer: FlowBuffer,
        metrics: AgentMetrics,
        stop: threading.Event,
        options: FlowLogOptions,
    ) -> None:
        self.source, self.node, self.buffer = source, node, buffer
        self.metrics, self.stop, self.options = metrics, stop, options
        self._view = _View({}, (), {})
        self._previous_rules: dict[str, RuleRef] = {}
        self._counters: dict[tuple[str, str, str, str], Any] = {}  # label values -> the counter child
        self._seen = CaptureStats()
        self._evicted = 0
        self.dropped = {"ratelimit": 0, "socket": 0, "buffer": 0, "malformed": 0}
        self._stats_lock = threading.Lock()
        self.recorded = 0
        self.last_error: str | None = None

    # ----- the inventory (from the policy controller) ------------------------------------
    def update(self, pods: Iterable[PodInfo], namespaces: Iterable[NamespaceInfo], policies: Iterable[NetworkPolicy]) -> None:
        """The controller's latest inventory; records resolve against it."""
        del namespaces  # not needed: isolation depends on the pod's namespace name only
        pols = tuple(policies)
        current = rule_index(pols)
        by_ip: dict[Any, PodInfo] = {}
        for p in pods:  # both addresses of a dual-stack pod name it
            by_ip[p.ip] = p
            if p.ip_v6 is not None:
                by_ip[p.ip_v6] = p
        self._view = _View(by_ip, pols, {**self._previous_rules, **current})
        self._previous_rules = current

    # ----- one packet -> one record -------------------------------------------------------
    def record(self, pkt: LoggedPacket, *, now: float) -> FlowRecord | None:
        """The record for one logged packet; None when its prefix is not ours."""
        tag = parse_prefix(pkt.prefix)
        if tag is None:
            return None
        view = self._view
        policies: tuple[str, ...] = ()
        rule = None
        if tag.verdict == "deny":
            subject = pkt.dst if tag.direction == "ingress" else pkt.src
            policies = view.isolated_by(subject, tag.direction.capitalize())
        elif tag.digest is not None:
            ref = view.rules.get(tag.digest)
            if ref is not None:
                policies, rule = (ref.policy,), ref.name
            else:
                policies, rule = (), f"{tag.direction}[?]"
        when = pkt.time if pkt.time is not None and abs(pkt.time - now) < PLAUSIBLE_SKEW else now
        return FlowRecord(
            time=when, node=self.node, direction=tag.direction, verdict=tag.verdict, proto=pkt.proto,
            dport=pkt.dport, src=view.endpoint(pkt.src), dst=view.endpoint(pkt.dst), policies=policies, rule=rule,
        )  # fmt: skip

    def _count(self, r: FlowRecord) -> None:
        subject = r.dst if r.direction == "ingress" else r.src
        for key in r.policies or (f"{subject.namespace or ''}/",):
            ns, _, name = key.partition("/")
            child = self._counters.get((r.direction, r.verdict, ns, name))
            if child is None:
                child = self._counters[(r.direction, r.verdict, ns, name)] = self.metrics.policy_verdicts.labels(
                    r.direction, r.verdict, ns, name
                )
            child.inc()

    # ----- the loop -------------------------------------------------------------------------
    def handle(self, packets: list[LoggedPacket], *, now: float) -> None:
        for pkt in packets:
            r = self.record(pkt, now=now)
            if r is None:
                with self._stats_lock:
                    self._drop("malformed", 1)
                continue
            self.buffer.append(r)
            self.recorded += 1
            self._count(r)

    def poll_stats(self) -> None:
        """Fold the capture's and the ring's losses into the drop counters.
        Called every second by ``run`` and by the policy controller right
        before it applies a render (a whole-table replace restarts the
        kernel's counter: what it counted must be read first)."""
        with self._stats_lock:
            s = self.source.stats()
            old, self._seen = self._seen, s
            self._drop("ratelimit", s.ratelimited - old.ratelimited)
            self._drop("socket", s.lost - old.lost)
            self._drop("malformed", s.malformed - old.malformed)
            evicted = self.buffer.evicted
            self._drop("buffer", evicted - self._evicted)
            self._evicted = evicted

    def before_apply(self) -> None:
        """``poll_stats`` for the policy controller: a failure here is the
        flow log's, never the policy pass's."""
        try:
            self.poll_stats()
        except OverlayCNIError as exc:
            self.last_error = str(exc)
            log.debug("flow log: reading the counters before a policy pass failed: %s", exc)

    def _drop(self, reason: str, n: int) -> None:
        if n > 0:
            self.dropped[reason] += n
            self.metrics.flow_log_dropped.labels(reason).inc(n)

    def close(self) -> None:
        """``stop`` was set: wake ``run`` (the capture socket is closed, so
        its receive returns at once) and give the NFLOG group back."""
        self.source.close()

    def run(self) -> None:
        next_stats = 0.0
        while not self.stop.is_set():
            try:
                packets = self.source.receive(0.5)
                if self.stop.is_set():
                    break
                now = time.time()
                self.handle(packets, now=now)
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + STATS_EVERY
                    self.poll_stats()
                self.last_error = None
            except OverlayCNIError as exc:
                if self.last_error != str(exc):
                    log.warning("flow log: %s", exc)
                self.last_error = str(exc)
                self.stop.wait(1.0)
        self.source.close()

    def status(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "group": self.options.spec.group,
            "buffered": len(self.buffer),
            "capacity": self.buffer.capacity,
            "recorded": self.recorded,
            "dropped": dict(self.dropped),
            "error": self.last_error,
        }
