"""The leak reaper: addresses held for pods that no longer exist on this node.

A pod's address leaks when its sandbox goes away without a CNI DEL (a
runtime crash, ``ip netns del`` behind the runtime's back, an agent killed
in the middle of an ADD's rollback). The pod's veth pair dies with its
namespace, so "this node's allocation has no host veth" is the sign.

The reaper passes once at agent start and then every ``interval`` seconds, or
sooner when a noted allocation's grace ends first (``next_wait``): a leak is
released about ``grace`` after it is first seen, not up to ``interval``
later. The pass at start matters after a crash: a DEL's quarantine is kept
in memory, so a SIGKILL right after a DEL leaves its allocation without a
veth, released ``grace`` after the restart (it was ``interval + grace``,
4 minutes with the defaults; found by ``bench/soak.py``). A pass lists this
node's allocations and its pod veths. An allocation without a veth is noted with the time it was first
seen so; one still without a veth ``grace`` seconds later is released the
way DEL releases (conntrack entries flushed, then the address, only if it is
held by this node), through ``CNIOps.reap``: under the attachment's lock,
taken only if free (never during an ADD, DEL or CHECK in flight), after
checking once more that the veth is absent. A veth that reappears clears
the note. The grace period covers an ADD between its reservation and its
veth, and a pod a runtime is still setting up. Each release is logged
(address, container, interface, pod, how long it was missing), counted
(``overlaycni_reaped_total``) and kept in ``recent`` for ``agent status``.
Notes live in memory: a restarted agent starts every grace period anew
(late, never early). An allocation the DEL quarantine holds
(``agent.quarantine``) is the batcher's to release and is skipped; one
whose quarantine a crash lost is an allocation without a veth like any
other, and this is what releases it. Rejected: checking the pod namespace paths (the
datastore does not hold them, and a runtime may move or bind-mount them).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import ipam
from ..dataplane import host_veth_name
from ..errors import OverlayCNIError
from .cniops import CNIOps

log = logging.getLogger(__name__)
DEFAULT_INTERVAL = 120.0
DEFAULT_GRACE = 60.0
MIN_WAIT = 1.0  # seconds: the shortest wait between two passes that ``next_wait`` gives


@dataclass(frozen=True)
class Reaped:
    ip: str
    container_id: str
    ifname: str
    pod: str | None
    missing_for: float
    at: float  # wall clock

    def to_dict(self) -> dict[str, Any]:
        return {"ip": self.ip, "container_id": self.container_id, "ifname": self.ifname, "pod": self.pod,
                "missing_for": round(self.missing_for, 1), "at": round(self.at, 1)}


class Reaper:
    def __init__(
        self, ops: CNIOps, *, grace: float = DEFAULT_GRACE, on_reaped: Callable[[Reaped], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ops = ops
        self.grace = grace
        self.on_reaped = on_reaped
        self.clock = clock
        self.total = 0
        self.recent: deque[Reaped] = deque(maxlen=20)
        self.last_error: str | None = None
        self._missing: dict[tuple[str, str], float] = {}  # (container_id, ifname) -> first seen without a veth

    def sweep(self) -> list[Reaped]:
        """One pass; returns what it released."""
        ops = self.ops
        allocations = ipam.list_allocations(ops.store, ops.ctx.cluster, node=ops.node, on_bad=ops.report_bad)
        if not ops.quarantine.parked_count and ops.dp.list_parked_veths():
            ops.dp.delete_parked_veths()  # left by a crash (the quarantine drains its own): see ``agent.quarantine``
        live = set(ops.dp.list_pod_veths())
        now = self.clock()
        seen: set[tuple[str, str]] = set()
        out: list[Reaped] = []
        for a in allocations:
            key = (a.container_id, a.ifname)
            if host_veth_name(*key) in live or ops.quarantine.needed_by(key):
                continue
            seen.add(key)
            first = self._missing.setdefault(key, now)
            if now - first < self.grace:
                continue
            try:
                released = ops.reap(a)
            except OverlayCNIError as exc:
                self.last_error = f"{a.ip.ip} ({a.container_id} {a.ifname}): {exc}"
                log.warning("reaper: could not release %s", self.last_error)
                continue
            if released is None:
                continue
            seen.discard(key)
            pod = f"{a.pod_namespace}/{a.pod_name}" if a.pod_name else None
            r = Reaped(str(a.ip.ip), a.container_id, a.ifname, pod, now - first, time.time())
            log.warning("reaped %s of container %s %s%s: its host veth has been gone for %.0f s",
                        r.ip, r.container_id, r.ifname, f" (pod {pod})" if pod else "", r.missing_for)
            self.total += 1
            self.recent.append(r)
            if self.on_reaped is not None:
                self.on_reaped(r)
            out.append(r)
        self._missing = {k: v for k, v in self._missing.items() if k in seen}
        return out

    def next_wait(self, interval: float) -> float:
        """Seconds until the next pass: ``interval``, or sooner when a noted
        allocation's grace ends first (never sooner than ``MIN_WAIT``, so a
        release that keeps failing is not retried in a tight loop)."""
        if not self._missing:
            return interval
        due = min(self._missing.values()) + self.grace - self.clock()
        return min(interval, max(due, MIN_WAIT))

    def status(self) -> dict[str, Any]:
        return {"total": self.total, "pending": len(self._missing), "recent": [r.to_dict() for r in self.recent],
                "last_error": self.last_error}
