"""Wake up when a process exits: one thread, one ``pidfd`` per watched process.

Design note. ``pidfd_open(2)`` (Linux 5.3) gives a file descriptor that
becomes readable when the process exits, for any process, not only a child:
wireguard-go started by an earlier agent (now adopted) is watched the same
way as one this agent started. One thread selects on all of them and on a
self-pipe (new pids, shutdown), and calls ``on_exit(pid)`` on that thread.
Rejected: polling ``/proc`` (a delay of one period, and work when nothing
happens), ``waitpid`` (children only), SIGCHLD (children only, and signal
handlers belong to the main thread).
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable


class ProcessWatcher:
    """One thread that wakes when a watched process exits (``pidfd_open``)."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="ocni-wg-watch", daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        with self._lock:
            if pid in self._fds or self._closed:
                return
            try:
                self._fds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                return
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._w, b"x")
        except BlockingIOError:
            pass

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    break
                fds = dict(self._fds)
            ready, _, _ = select.select([self._r, *fds.values()], [], [])
            if self._r in ready:
                try:
                    os.read(self._r, 4096)
                except BlockingIOError:
                    pass
            for pid, fd in fds.items():
                if fd in ready:
                    with self._lock:
                        self._fds.pop(pid, None)
                    os.close(fd)
                    if not self._closed:
                        self._on_exit(pid)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._wake()
        self._thread.join(timeout=5)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        os.close(self._r)
        os.close(self._w)
