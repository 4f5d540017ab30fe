"""Group commit of a node's concurrent CNI ADDs and DELs: the queue.

Design note. The agent sees every CNI request of its node, so requests that
arrive together can share their datastore round trips and their kernel
work. ``CNIOps`` checks each request in its own thread (the attachment
lock, CNI_NETNS opened and validated) and hands it to the ``Batcher`` as a
``Job``; one batcher thread takes *everything queued* as one batch, applies
it (``commit.Commit``: one reservation transaction, one data-plane call,
one conntrack walk, one release transaction for the whole batch), answers
each job, and takes the next batch: requests that arrive while a batch is
applied form the next one. A lone request is a batch of one and starts at
once (no timer, no waiting for company); the only cost is one thread hop
each way. Jobs for the same attachment never share a batch (a later one
waits for the next, in order). Rejected: a batching window (it would add its
length to every lone ADD), and a leader among the waiting request threads
(the leader's own deadline would bound the others' work).

Deadlines: a caller waits for its job no longer than its request's
deadline. Past it, it marks the job cancelled, waits up to
``ROLLBACK_SECONDS`` for the batcher to be done with it, and answers 11.
A job cancelled before its batch starts leaves the queue at once; one
cancelled while its batch runs is undone by the batcher (it owns what it
made), and only then settled. The attachment's lock is released when the
job settles, not when the caller leaves, so the next request on that
attachment finds a settled state. A job owns a duplicate of its pod's
namespace descriptor, closed when it settles: the batcher may use it after
the caller has gone.

Idle work (``idle``, the DELs' quarantine, ``agent.quarantine``): when
nothing is queued and the idle work is due, the batcher thread runs it;
requests that arrive meanwhile form the next batch once it is done. On
``close`` the jobs queued and the batch in flight are applied and answered,
later jobs are refused (11, "try again"), and the idle work runs once more
(a clean stop leaves nothing quarantined).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import deadline, trace
from ..cidr import IPAddress
from ..dataplane import PodInterface
from ..errors import DeadlineExceeded
from ..ipam import Allocation
from ..trace import Phases, RequestTrace

log = logging.getLogger(__name__)
ROLLBACK_SECONDS = 0.75  # what undoing a failed ADD may take past its deadline (3.5 + 0.75 < the shim's 4.5)
MAX_BATCH = 256


@dataclass(frozen=True)
class Added:
    """An ADD's answer: the pod's interface, its allocation, and what this
    ADD made (``fresh``: the reservation; ``ours``: the veth may be ours)."""

    pod: PodInterface
    alloc: Allocation
    fresh: bool
    ours: bool


@dataclass(eq=False)
class Job:
    kind: str  # "ADD", "DEL" or "UNDO" (an ADD's rollback after its policy wait failed)
    container_id: str
    ifname: str
    key: str  # the attachment (its host veth name)
    netns: str = ""
    netns_fd: int | None = None  # ADD: owned by the job, closed when it settles
    pod: tuple[str, str] | None = None
    requested_ips: tuple[IPAddress, ...] = ()  # the ips capability: at most one per family
    mtu: int = 0
    undo: Added | None = None  # UNDO: what to undo
    end: float | None = None  # the caller's deadline (monotonic)
    trace: RequestTrace | None = None
    submitted: float = 0.0
    answer: Any = None
    error: BaseException | None = None
    cancelled: bool = False
    _answered: threading.Event = field(default_factory=threading.Event)
    _settled: threading.Event = field(default_factory=threading.Event)
    _after: list[Callable[[], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def deliver(self, answer: Any = None, error: BaseException | None = None) -> bool:
        """Answer the caller; False when it gave up already (the batcher then owns the undoing)."""
        with self._lock:
            if self.cancelled or self._answered.is_set():
                return False
            self.answer, self.error = answer, error
            self._answered.set()
            return True

    def record(self, phases: Phases, *, batch: int = 0) -> None:
        """Add a shared step's time to the trace (and the batch's size), while
        the caller still waits: it reads the trace once answered or gone."""
        with self._lock:
            if self.trace is not None and not self.cancelled and not self._answered.is_set():
                self.trace.merge(phases)
                self.trace.batch = batch or self.trace.batch

    def cancel(self) -> bool:
        """The caller gives up; False when the answer came first."""
        with self._lock:
            if self._answered.is_set():
                return False
            self.cancelled = True
            return True

    def settle(self) -> None:
        """The batcher is done with the job: its fd closed, ``after`` callbacks run."""
        with self._lock:
            if self._settled.is_set():
                return
            self._settled.set()
            after, self._after = self._after, []
        if self.netns_fd is not None:
            os.close(self.netns_fd)
            self.netns_fd = None
        for fn in after:
            fn()

    def after_settled(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the job is settled (now, if it is)."""
        with self._lock:
            if not self._settled.is_set():
                self._after.append(fn)
                return
        fn()


class IdleWork(Protocol):
    def due(self) -> float | None:
        """Seconds until it should run (0: now); None: nothing to do."""

    def drain(self) -> None: ...


class Batcher:
    """One thread applying batches of jobs with ``apply`` (``commit.Commit``):
    everything queued when it is free is the next batch; ``idle`` runs when nothing is."""

    def __init__(
        self, apply: Callable[[list[Job]], None], *, max_batch: int = MAX_BATCH, idle: IdleWork | None = None
    ) -> None:
        self.apply, self.max_batch, self.idle = apply, max_batch, idle
        self.batches = 0
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="cni-batch", daemon=True)
        self._thread.start()

    # ----- the caller's side ------------------------------------------------------------
    def run(self, job: Job) -> Any:
        """Queue ``job``, wait for its answer within the request's deadline
        (then: cancel, wait ``ROLLBACK_SECONDS`` for the batcher to settle
        it, ``DeadlineExceeded``); returns the answer or raises its error."""
        job.end = _deadline_end()
        job.trace = trace.request()
        job.submitted = time.monotonic()
        with self._cond:
            if self._closed:
                job.settle()
                raise DeadlineExceeded("the agent is stopping; try again")
            self._queue.append(job)
            self._cond.notify()
        if not job._answered.wait(deadline.remaining()) and job.cancel():
            with self._cond:
                queued = job in self._queue
                if queued:  # its batch has not started: nothing was made, nothing to wait for
                    self._queue.remove(job)
            if queued:
                job.settle()
            job._settled.wait(ROLLBACK_SECONDS)
            raise DeadlineExceeded(
                f"{job.kind} {job.container_id} {job.ifname}: not done before the request's deadline"
                + ("" if job._settled.is_set() else "; the agent finishes undoing it")
            )
        if job.error is not None:
            raise job.error
        return job.answer

    def queued(self) -> int:
        """Jobs waiting for the next batch."""
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float = 5.0) -> bool:
        """Refuse new jobs, finish the batch in flight (and the idle work),
        and wait up to ``timeout`` seconds for the thread to end; False if it
        has not (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()

    # ----- the batcher thread -----------------------------------------------------------
    def _take(self) -> list[Job] | None:
        """The next batch; [] when the idle work is due; None once closed."""
        with self._cond:
            while not self._queue and not self._closed:
                wait = self.idle.due() if self.idle is not None else None
                if wait is not None and wait <= 0:
                    return []
                self._cond.wait(wait)
            if not self._queue:
                return None
            batch: list[Job] = []
            keys: set[str] = set()
            later: list[Job] = []
            while self._queue and len(batch) < self.max_batch:
                job = self._queue.popleft()
                (later if job.key in keys else batch).append(job)
                keys.add(job.key)
            self._queue.extendleft(reversed(later))  # the same attachment again: the next batch, in order
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                self._idle()
                continue
            started = time.monotonic()
            for job in batch:
                job.record(Phases({"batch": started - job.submitted}), batch=len(batch))
            try:
                self.apply(batch)
            except BaseException as exc:  # noqa: BLE001 - a bug must not stop the node's CNI requests
                log.exception("CNI batch of %d failed", len(batch))
                for job in batch:
                    job.deliver(error=exc)
            finally:
                for job in batch:
                    job.settle()
            self.batches += 1
        if self.idle is not None and self.idle.due() is not None:
            self._idle()  # a clean stop: nothing left quarantined (best effort)

    def _idle(self) -> None:
        assert self.idle is not None
        try:
            self.idle.drain()
        except BaseException:  # noqa: BLE001 - a bug must not stop the node's CNI requests
            log.exception("the batcher's idle work failed")


def _deadline_end() -> float | None:
    left = deadline.remaining()
    return None if left is None else time.monotonic() + left
