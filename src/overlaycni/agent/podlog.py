"""The pods the CNI batches attached, for reconciles whose pod list is older.

A full reconcile reads the node's allocations from the datastore, then
takes the kernel lock and programs them; the repairer programs the state
of the last full reconcile. CNI batches attach pods in between, under the
same kernel lock. A pod the older list does not name is safe: the engine
keeps the routes and ``pod_endpoints`` elements of live pod veths it does
not know. A pod it names with *other* addresses is not: a DEL, then an ADD
of the same attachment (same container ID and ifname, so the same host veth
name) that got another address. Programmed from the older list, the new
address's anti-spoofing element would be removed (the pod's traffic dropped
until the next reconcile) and the old address, perhaps another pod's by
now, routed into this pod.

So each batch logs its attachments here, under the kernel lock, with a
sequence number. A full reconcile takes a mark before it reads
(``reading``) and, under the kernel lock, lays every attachment logged
since over what it read (``merge``); the repairer lays those logged since
the last full reconcile over its state (``since(settled_mark)``). An entry
is dropped once the node's state holds it and no reconcile that started
before it is still running. Cost to an ADD: one dict update per batch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from ..dataplane import host_veth_name
from ..ipam import Allocation


def _veth(a: Allocation) -> str:
    return host_veth_name(a.container_id, a.ifname)


class PodLog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._log: dict[str, tuple[int, Allocation]] = {}  # host veth -> (sequence, its allocation)
        self._readers: list[int] = []  # the marks of the full reconciles running now
        self.settled_mark = 0  # the node's state holds every attachment logged up to here

    def attached(self, allocations: Iterable[Allocation]) -> None:
        """A batch attached these pods (called under the kernel lock)."""
        allocations = list(allocations)
        if not allocations:
            return
        with self._lock:
            self._seq += 1
            for a in allocations:
                self._log[_veth(a)] = (self._seq, a)

    @contextmanager
    def reading(self) -> Iterator[int]:
        """A full reconcile: the mark to ``merge`` from, held until it is done."""
        with self._lock:
            mark = self._seq
            self._readers.append(mark)
        try:
            yield mark
        finally:
            with self._lock:
                self._readers.remove(mark)
                self._trim()

    def since(self, mark: int) -> dict[str, Allocation]:
        """The attachments logged after ``mark``, by host veth (the latest of each)."""
        with self._lock:
            return {veth: a for veth, (seq, a) in self._log.items() if seq > mark}

    def merge(self, allocations: Iterable[Allocation], mark: int) -> list[Allocation]:
        """``allocations`` (read after ``mark`` was taken), each attachment logged
        since in place of what was read for its veth."""
        newer = self.since(mark)
        return [a for a in allocations if _veth(a) not in newer] + list(newer.values())

    def settled(self) -> None:
        """The node's state now holds every attachment logged so far (called under the kernel lock)."""
        with self._lock:
            self.settled_mark = self._seq
            self._trim()

    def __len__(self) -> int:
        return len(self._log)

    def _trim(self) -> None:
        floor = min([self.settled_mark, *self._readers])
        if any(seq <= floor for seq, _ in self._log.values()):
            self._log = {veth: e for veth, e in self._log.items() if e[0] > floor}
