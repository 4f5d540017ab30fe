"""Where a CNI request's time goes inside the agent (pure).

Every request the agent's socket server serves gets one ``RequestTrace``:
the time its connection was accepted, the time its request line was
complete, and the seconds it spent in each phase below. The server makes it
the current trace of the pool thread that serves the request (a
``ContextVar``, like ``deadline``); the layers below add to it with
``phase(name)``. The data plane's worker runs a call under the caller's
trace (``run_under``), so the kernel steps time themselves where they run;
the batcher (``agent.batch``) times a batch's shared steps once and adds them
to every request of the batch (``RequestTrace.merge``). When the request is
answered the agent observes each phase in
``overlaycni_cni_phase_seconds{command,phase}``.

Phases, in a request's order:

=========  =================================================================
read       connection accepted -> the whole request line has arrived
queue      request complete -> a pool thread starts serving it
lock       waiting for the attachment's lock (a request on it in flight, GC)
netns      CNI_NETNS checked and opened (``netnscheck``)
batch      waiting for the batch to start (the batch before it is applied)
ipam       the datastore: reading, reserving or releasing addresses
kernel     the data plane's part, seen from the request (its queue included):
  veth       veth pairs made (or removed) and the pod side configured
  sysctl     the host veths' proxy ARP settings
  route      the node's /32 routes to the pods
  nft        the anti-spoofing set elements
conntrack  flushing the released addresses' conntrack entries (DEL)
policy     waiting for a NetworkPolicy pass holding the new pod (ADD)
reply      answer built -> answer written to the socket
=========  =================================================================

Stamps are ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every
process of the machine): ``bench/cni.py`` puts the plugin's process start
and exit on the same axis as the agent's ``accepted`` and ``answered``,
which tells process start + connect and reply read + exit apart from the
agent's own time. A request whose ``CNI_ARGS`` holds ``OVERLAYCNI_DEBUG=timings``
gets its trace in the ADD result's ``debug`` member (the bench asks; a
runtime never does). Cost: a few ``time.monotonic()`` calls per phase.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

PHASES = ("read", "queue", "lock", "netns", "batch", "ipam", "kernel", "veth", "sysctl", "route", "nft", "conntrack",
          "policy", "reply")
T = TypeVar("T")
DEBUG_ARG = "OVERLAYCNI_DEBUG"  # CNI_ARGS key; the value "timings" asks for the trace in the result

@dataclass
class RequestTrace:
    accepted: float  # monotonic: the connection was accepted
    complete: float  # the request line had arrived
    served: float = 0.0  # a pool thread started on it
    answered: float = 0.0  # the answer was built
    sent: float = 0.0  # the answer was written
    command: str = "?"
    batch: int = 0  # requests in the batch this one was applied in (0: not batched)
    phases: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + max(0.0, seconds)

    def merge(self, other: RequestTrace | Phases) -> None:
        """Add every phase of ``other`` (a batch's shared steps) to this request's."""
        for name, seconds in other.phases.items():
            self.add(name, seconds)

    def durations(self) -> dict[str, float]:
        """Every phase that took time, with read/queue/reply from the stamps."""
        out = {"read": self.complete - self.accepted}
        if self.served:
            out["queue"] = self.served - self.complete
        out.update(self.phases)
        if self.sent and self.answered:
            out["reply"] = self.sent - self.answered
        return {k: max(0.0, v) for k, v in out.items()}

    def to_debug(self) -> dict[str, Any]:
        """What a result's ``debug`` member carries (seconds; stamps are monotonic)."""
        return {
            "timings": {k: round(v, 6) for k, v in self.durations().items() if k != "reply"},
            "accepted": round(self.accepted, 6),
            "answered": round(time.monotonic(), 6),
            "batch": self.batch,
        }


@dataclass
class Phases:
    """Phases without a request: what a batch of requests spent together."""

    phases: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + max(0.0, seconds)


Recorder = RequestTrace | Phases
_CURRENT: ContextVar[Recorder | None] = ContextVar("overlaycni_trace", default=None)


def current() -> Recorder | None:
    return _CURRENT.get()


def request() -> RequestTrace | None:
    """The current request's trace (None outside a request, or in a batch's steps)."""
    t = _CURRENT.get()
    return t if isinstance(t, RequestTrace) else None


@contextmanager
def recording(into: Recorder | None) -> Iterator[None]:
    """Make ``into`` the current recorder for the body (None: record nothing)."""
    token = _CURRENT.set(into)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def run_under(into: Recorder | None, fn: Callable[[], T]) -> T:
    """``fn()`` recording into ``into`` (another thread's trace: the data plane's worker)."""
    if into is None:
        return fn()
    with recording(into):
        return fn()


@contextmanager
def serving(trace: RequestTrace) -> Iterator[RequestTrace]:
    """Make ``trace`` the current one for the body (the pool thread serving it)."""
    trace.served = time.monotonic()
    try:
        with recording(trace):
            yield trace
    finally:
        trace.answered = trace.answered or time.monotonic()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the body's duration to the current trace's ``name`` (no trace: nothing)."""
    t = _CURRENT.get()
    if t is None:
        yield
        return
    start = time.monotonic()
    try:
        yield
    finally:
        t.add(name, time.monotonic() - start)


def wants_debug(args: Any) -> bool:
    """The request asked for its trace (``CNI_ARGS`` ``OVERLAYCNI_DEBUG=timings``)."""
    return str(args.get(DEBUG_ARG, "")).lower() == "timings"
