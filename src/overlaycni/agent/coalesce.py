"""Run a recomputation once per burst of changes, not once per change.

Design note. The node watch hands the agent one node record at a time, and
choosing the peers (``desired.select_peers``) looks at every record: at
5,000 nodes one selection is ~0.08 s, so a burst of joins (a scale-up, a
re-list of the watch) cost O(n) per event. ``Coalescer`` runs its function
on its own thread whenever asked; requests that arrive while it runs make
one more run after it, however many they are (group commit, as the CNI
batcher does for pod requests). Every request is followed by a run that
starts after it, so nothing is lost: the last run sees every change folded
in before it started. A lone request runs at once (no timer). Rejected: a
debounce window (it delays every lone node event by its length).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Coalescer:
    """``request()`` from any thread; ``loop()`` is the thread that runs ``fn``."""

    def __init__(self, fn: Callable[[], None], *, stop: threading.Event, name: str) -> None:
        self.fn, self.stop, self.name = fn, stop, name
        self.runs = 0  # how many times fn ran
        self.requests = 0  # how many requests it served
        self._cond = threading.Condition()
        self._pending = 0  # requests since the current run started
        self._running = False

    def request(self) -> None:
        with self._cond:
            self._pending += 1
            self._cond.notify_all()

    def wake(self) -> None:
        """``stop`` was set: the loop ends now, not at its next poll."""
        with self._cond:
            self._cond.notify_all()

    def idle(self, timeout: float) -> bool:
        """Wait until no request is pending or running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._running, timeout)

    def loop(self) -> None:
        """Run ``fn`` once per batch of requests until ``stop`` is set; an
        exception in ``fn`` is logged (``fn`` reports its own failures) and
        the loop goes on."""
        while not self.stop.is_set():
            with self._cond:
                if not self._cond.wait_for(lambda: self._pending > 0 or self.stop.is_set(), timeout=0.5):
                    continue
                if self.stop.is_set():
                    break
                served, self._pending = self._pending, 0
                self._running = True
            try:
                self.fn()
            except Exception:  # noqa: BLE001 - a bug must not end the loop
                log.exception("%s failed", self.name)
            finally:
                with self._cond:
                    self._running = False
                    self.runs += 1
                    self.requests += served
                    self._cond.notify_all()
