"""Sockets one thread waits on and another closes: the close wakes the waiter.

Design note. A thread blocked in ``select(2)`` on a socket is not woken
when another thread closes that socket: the kernel holds the file until
the call returns (its timeout), and closing an fd that another thread is
about to read races with the fd's number being reused. The agent's stop
(``agent.daemon``) must not wait out such timeouts, nor close a socket
under a reader. ``WaitableSockets`` adds a pipe to every ``select``;
``close`` writes to it, so a waiter returns at once, and the sockets are
closed by whoever leaves last: ``close`` itself when nobody waits, else
the waiter on its way out (after its reads). Once closed, a wait returns
nothing at once. See select(2) ("If a file descriptor being monitored by
select() is closed in another thread, the result is unspecified") and
pipe(7).
"""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class WaitableSockets:
    def __init__(self, socks: Sequence[socket.socket]) -> None:
        self.socks = tuple(socks)
        self._by_fd = {s.fileno(): s for s in self.socks}
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()
        self._waiters = 0
        self.closed = False
        self._released = False

    @contextmanager
    def ready(self, timeout: float) -> Iterator[list[socket.socket]]:
        """The sockets readable within ``timeout`` seconds ([] on a timeout, or
        once ``close`` was called); read them inside the block."""
        with self._lock:
            if self.closed:
                enter = False
            else:
                enter = True
                self._waiters += 1
        if not enter:
            yield []
            return
        try:
            readable, _, _ = select.select([*self._by_fd, self._r], [], [], timeout)
            yield [] if self.closed else [self._by_fd[fd] for fd in readable if fd != self._r]
        finally:
            with self._lock:
                self._waiters -= 1
                last = self.closed and not self._waiters
            if last:
                self._release()

    def close(self) -> None:
        """Wake any waiter; the sockets are closed once nobody uses them (idempotent)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            busy = self._waiters > 0
        if busy:
            try:
                os.write(self._w, b"x")
            except OSError:
                pass  # the pipe is full: a wake is pending already
        else:
            self._release()

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        for s in self.socks:
            s.close()
        os.close(self._r)
        os.close(self._w)
