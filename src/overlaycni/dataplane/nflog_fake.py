"""The ``VerdictLog`` port in memory (``FakeDataplane.open_verdict_log``)."""

from __future__ import annotations

import queue

from .nflog import CaptureStats, LoggedPacket


class FakeVerdictLog:
    """The ``VerdictLog`` port in memory: tests ``push`` packets the kernel
    would have logged, ``lose`` messages and ``ratelimit`` flows."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[LoggedPacket | None] = queue.SimpleQueue()  # None: ``close`` woke the reader
        self.counts = {"received": 0, "lost": 0, "malformed": 0, "ratelimited": 0, "overruns": 0}
        self.closed = False

    def push(self, *packets: LoggedPacket) -> None:
        for p in packets:
            self.queue.put(p)

    def lose(self, n: int) -> None:
        self.counts["lost"] += n
        self.counts["overruns"] += 1

    def ratelimit(self, n: int) -> None:
        self.counts["ratelimited"] += n

    def receive(self, timeout: float) -> list[LoggedPacket]:
        if self.closed:
            return []
        try:
            first = self.queue.get(timeout=timeout)
        except queue.Empty:
            return []
        if first is None:
            return []
        out = [first]
        while len(out) < 256:
            try:
                more = self.queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                break
            out.append(more)
        self.counts["received"] += len(out)
        return out

    def stats(self) -> CaptureStats:
        return CaptureStats(**self.counts)

    def close(self) -> None:
        """Wakes a ``receive`` at once (the kernel's port does the same)."""
        self.closed = True
        self.queue.put(None)
