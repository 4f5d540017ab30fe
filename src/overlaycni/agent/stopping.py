"""The agent's stop: prompt, bounded, clean (``Agent.shutdown`` runs it).

Design note. What a container runtime and systemd expect of a node agent
on SIGTERM: it stops taking requests at once, finishes the batch in flight,
gives up its lease (so peers know it is gone), closes its kernel handles
and exits, within a bound that depends on nothing but that work; pods keep
their network. In this order:

1. the CNI socket stops taking requests and its file is removed
   (``server.CNISocketServer.shutdown``: its accept loop is woken through a
   socket pair, not its poll);
2. every loop is woken: each waits on the agent's ``stop_event`` or on a
   handle that is closed now, which ends the wait at once: kernel events
   and the flow log's NFLOG socket (``dataplane.linux.wake``), the etcd
   watches (``EtcdStore.wake_watches``), the metrics server
   (``metrics.AgentHTTPServer``), the policy and peer selection threads
   (their ``wake``). No loop starts new work after the stop (no resync,
   repair, policy pass, peer selection or key rotation), except the policy
   pass an ADD in flight waits for;
3. the batch in flight is applied and answered (``batch.Batcher.close``),
   and every request already read is answered (11, "try again", if no pool
   thread had started it);
4. the loops are joined against one deadline (``STOP_SECONDS`` from step
   1, steps 3 and 4 included), not a timeout each in turn; a thread still
   running then is named in a warning (``stragglers``);
5. the lease is revoked within ``REVOKE_SECONDS`` (``overlaycni.deadline``
   cuts the store's waits), so the node shows as not live at once and
   ``node delete`` needs no ``--force``; peers keep its routes (its record
   and block stay), so a restart is invisible to the data path;
6. the data plane (its kernel handles and worker thread) and the store are
   closed: nothing touches the kernel after "agent stopped" is logged with
   the seconds each step took. ``run_agent`` then exits without the
   interpreter's teardown (0.2-0.3 s of freeing objects, more under load).

Signals: Python runs a handler in the main thread between two bytecodes,
also while that thread holds a lock, so a handler that takes one
(``Event.set`` takes the event's) can deadlock the main thread for good;
the ``signal`` module's documentation warns against synchronization
primitives in handlers. ``SignalRelay``'s handler only writes a byte to a
pipe; its thread reads it and sets the stop.

Measured by ``bench/stop.py`` (SIGTERM -> exit, per step, against a
baseline tree in the same run). systemd's ``TimeoutStopSec``
(deploy/overlaycni-agent.service) is well above the bounds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator

from .. import deadline
from ..datastore import Store
from ..errors import OverlayCNIError

log = logging.getLogger(__name__)
STOP_SECONDS = 4.0  # stop -> the batch in flight answered and every loop joined (one deadline for all)
REVOKE_SECONDS = 2.0  # then the lease revoke (a stalled store must not hold the stop)


class SignalRelay:
    """SIGTERM and SIGINT set ``stop`` from a thread of their own, never from
    the handler (see the module note). The pipe stays open for the process's
    life: a late signal must never write into a reused descriptor."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._w, False)

    def install(self) -> None:
        """Install the handlers (main thread only); ``run`` is the relay thread."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, *_: object) -> None:
        self.wake()

    def wake(self) -> None:
        """Also how a stop that is not a signal ends ``run``."""
        with contextlib.suppress(OSError):  # the pipe is full: a wake is pending already
            os.write(self._w, b"x")

    def run(self) -> None:
        os.read(self._r, 1)
        self.stop.set()


class StopClock:
    """The stop's one deadline, and the seconds each step took."""

    def __init__(self, seconds: float | None = None) -> None:
        """``seconds``: the deadline (default ``STOP_SECONDS``)."""
        self.seconds = STOP_SECONDS if seconds is None else seconds
        self.started = time.monotonic()
        self.end = self.started + self.seconds
        self.phases: dict[str, float] = {}

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = time.monotonic() - t0

    def summary(self) -> str:
        steps = ", ".join(f"{k} {v:.2f}" for k, v in self.phases.items())
        return f"{time.monotonic() - self.started:.2f} s ({steps})"


def revoke_lease(store: Store, lease: int) -> None:
    """Give the lease up within ``REVOKE_SECONDS``; a failure is logged (the lease then lapses at its TTL)."""
    try:  # not live from now on; the node record (and peers' routes) stay
        with deadline.within(REVOKE_SECONDS):
            store.revoke_lease(lease)
    except OverlayCNIError as exc:
        log.warning("stop: lease not revoked (%s); peers see this node as not live once its TTL passes", exc)
