"""Who may work on which pod attachment at once.

* ADD, DEL and CHECK of one attachment hold its lock: a repeated or racing
  request waits for the one in flight and then sees what it left. Different
  attachments proceed in parallel. An ADD or DEL that gives up at its
  deadline while the batcher still works on it leaves its lock to the
  batcher, which releases it when that work (and its undoing) is done: the
  next request on the attachment starts from a settled state.
* The leak reaper takes an attachment's lock only if it is free (never
  waits, never touches an attachment with a request in flight).
* GC holds the node lock: it waits until no attachment lock is held, and
  new requests wait until GC is done (GC compares the whole node's
  allocations with the whole node's veths; a request in between would make
  it remove a pod that is being added). A waiting GC goes first, so a
  stream of ADDs cannot starve it.

Attachments are keyed by their host veth name (``host_veth_name(cid,
ifname)``), so a veth that no allocation accounts for still maps to the
lock of the attachment that would own it. Every wait is bounded by the
request's deadline (``overlaycni.deadline``): past it, ``DeadlineExceeded``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from .. import deadline
from ..errors import DeadlineExceeded


class AttachmentLocks:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: set[str] = set()
        self._node_held = False
        self._node_waiting = 0

    def busy(self, key: str) -> bool:
        with self._cond:
            return key in self._held

    def acquire(self, key: str, *, wait: bool = True) -> bool:
        """Take ``key``'s lock (waiting no longer than the request's deadline:
        then ``DeadlineExceeded``); ``wait=False``: False at once when the
        attachment or the node is busy. Whoever took it releases it, on any
        thread (the batcher releases an abandoned request's lock once its
        work is settled)."""
        def free() -> bool:
            return not self._node_held and not self._node_waiting and key not in self._held

        with self._cond:
            if not self._cond.wait_for(free, deadline.remaining() if wait else 0):
                if wait:
                    raise DeadlineExceeded(f"attachment {key}: another request on it did not finish in time")
                return False
            self._held.add(key)
            return True

    def release(self, key: str) -> None:
        with self._cond:
            self._held.discard(key)
            self._cond.notify_all()

    @contextmanager
    def attachment(self, key: str, *, wait: bool = True) -> Iterator[bool]:
        """Hold ``key``'s lock for the body. ``wait=False``: yields False at
        once (holding nothing) when the attachment or the node is busy."""
        if not self.acquire(key, wait=wait):
            yield False
            return
        try:
            yield True
        finally:
            self.release(key)

    @contextmanager
    def node(self) -> Iterator[None]:
        """Hold the whole node: no attachment lock is held during the body."""
        with self._cond:
            self._node_waiting += 1
            try:
                ok = self._cond.wait_for(lambda: not self._node_held and not self._held, deadline.remaining())
            finally:
                self._node_waiting -= 1
            if not ok:
                self._cond.notify_all()  # requests held off by our waiting may go on
                raise DeadlineExceeded("GC: requests in flight on this node did not finish in time")
            self._node_held = True
        try:
            yield
        finally:
            with self._cond:
                self._node_held = False
                self._cond.notify_all()


class _Lock(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...


@contextmanager
def kernel_lock_within_deadline(lock: _Lock) -> Iterator[None]:
    """Hold the node's kernel lock (shared with full reconciles), waited for
    no longer than the current request's deadline."""
    wait = deadline.remaining()
    if not lock.acquire(timeout=-1 if wait is None else wait):
        raise DeadlineExceeded("the node's kernel state is being reconciled; try again")
    try:
        yield
    finally:
        lock.release()
