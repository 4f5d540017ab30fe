"""One deadline per request, seen by every layer the request calls (pure).

The agent gives each CNI request one deadline, shorter than the plugin's
reply timeout (4.5 s, ``cni/shim.py``), so that the agent, not the shim,
decides what happens when time runs out: it rolls back and answers 11
("try again later"), leaving nothing half done. Every wait below it is cut
to what is left: the attachment locks, the SQLite write lock and busy
timeout, etcd requests and their retries, the data plane's worker queue and
the policy pass an ADD waits for. A layer asks ``remaining(its own
limit)``; outside a request there is no deadline and the layer keeps its
own limit.

The deadline lives in a ``contextvars.ContextVar``: it follows the request
through every call on its thread and is invisible to other threads (the
data plane's worker reads it in the caller's thread, before it queues the
work). Nested scopes keep the earlier end; ``fresh`` replaces the scope for
a rollback, which must run even though the request's own time is up.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .errors import DeadlineExceeded

_END: ContextVar[float | None] = ContextVar("overlaycni_deadline", default=None)


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Run the body with a deadline ``seconds`` from now (an enclosing,
    earlier deadline stays in force)."""
    end = time.monotonic() + seconds
    outer = _END.get()
    token = _END.set(end if outer is None else min(outer, end))
    try:
        yield
    finally:
        _END.reset(token)


@contextmanager
def fresh(seconds: float) -> Iterator[None]:
    """Run the body with its own deadline, whatever the enclosing one was
    (a rollback after the request's deadline passed)."""
    token = _END.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _END.reset(token)


def remaining(limit: float | None = None) -> float | None:
    """Seconds left, at most ``limit``; ``limit`` itself when no deadline is
    set (None: wait as long as it takes). Never negative."""
    end = _END.get()
    if end is None:
        return limit
    left = max(0.0, end - time.monotonic())
    return left if limit is None else min(limit, left)


def active() -> bool:
    return _END.get() is not None


def check(what: str) -> None:
    """Raise ``DeadlineExceeded`` naming ``what`` if the deadline has passed."""
    end = _END.get()
    if end is not None and time.monotonic() >= end:
        raise DeadlineExceeded(f"{what}: the request's deadline passed")
