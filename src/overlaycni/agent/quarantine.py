"""Quarantine: a DEL's addresses, unavailable until their conntrack flush.

Design note. A DEL must leave no conntrack entry of the pod behind for the
next pod given its address (``dataplane.linux.conntrack``), and that walk
costs ~9-10 ms of the kernel's own whatever the namespace holds (the hash is
shared by every namespace), after the ~14 ms veth delete that the reference
plugin pays too. What the flush protects is the *next* holder of the
address, not the DEL's caller: so a DEL is answered once the pod's veth is
parked (below: no packet of the pod can reach the node any more), and its allocation
stays held in the datastore, *quarantined*, until one coalesced walk flushes
every quarantined address and one transaction releases them all. The drain
runs on the batcher's thread when it has had nothing to do for
``QUIET_SECONDS`` (``Batcher``'s idle work; under a steady stream of
requests, once an address has waited ``MAX_AGE_SECONDS``), so it rarely
delays a request (one arriving during a drain waits for it: a walk), and
never overlaps a veth delete (a walk holds off the RCU grace periods a veth
delete waits for; measured, see ``conntrack``). The quiet period is what
makes a sequence of DELs (a node drained pod by pod, the runtime's DELs a
few ms apart) pay one walk at its end rather than one between every two
DELs, each holding up the next. It also runs at once, inside a batch,
before an ADD that needs a quarantined address: the same attachment again
(CNI: an ADD after a DEL of the same container ID and ifname must succeed,
with a clean address), an ADD asking for a quarantined address (the ``ips``
capability), or ADDs the pool turned away while addresses were quarantined.

Parked veths. Deleting the host veth is most of a DEL (the kernel's
unregistration waits for several RCU grace periods, ~15-20 ms), so a DEL
*parks* it instead (``PodOps.park_pods``: one RTM_NEWLINK sets it down,
renames it out of the pod veth names and puts it in ``model.PARK_GROUP``;
its routes go with the carrier, its elements in the same step): no packet
of the pod reaches the node and none reaches the pod, so the DEL is
answered. The drain then deletes every parked veth with one RTM_DELLINK by
group (one set of grace periods for all of them), *then* walks conntrack,
then releases: veth gone -> walk -> release, the order that keeps the
release exact. A DEL with nothing to release (no allocation, another
node's) parks too: the drain runs for parked veths alone as well. An ADD
of the same attachment drains first (its pod end still exists until then);
an ADD into a namespace whose interface a parked veth still holds gets
``InterfaceExists``, and the batch deletes the parked veths and retries it
once (``commit``). After a SIGKILL the parked veths are left: the agent
deletes them at start, before its first reconcile, the reaper's sweep and
CNI GC delete any they find while nothing is parked (no one else uses the
prefix or the group), and the reaper releases the allocations as below.

The address is never handed out before its flush: it stays allocated (its
handle and address keys untouched) until the drain's transaction deletes
them, and that runs only after the walk succeeded. The drain first reads
the handles again and flushes only addresses still held by this node for
the same attachment: one that GC or the reaper released meanwhile may
already belong to another pod, whose flows must not be flushed.

Kept in memory, not in the datastore: the quarantined state already *is*
the allocation record (held, never handed out); marking it ("releasing")
would put a datastore transaction back on the DEL's path, the very cost
this saves, and change a record other tools read. What memory loses on a
SIGKILL is only *when* the release happens: the allocation is left without
a veth, the leak reaper's trigger, so the reaper flushes and releases it
after its grace period (late, never early); a clean stop drains first.
``agent status`` shows what is quarantined; ``ipam list`` shows those
addresses still allocated, which they are, for the milliseconds until the
batcher is next idle. A failed drain (datastore or kernel) keeps
everything quarantined and is retried after ``RETRY_SECONDS``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .. import ipam
from ..cidr import IPAddress
from ..dataplane import Dataplane
from ..datastore import Store
from ..errors import BadRecord, NotFound, OverlayCNIError
from ..ipam import Allocation

log = logging.getLogger(__name__)
QUIET_SECONDS = 0.05  # the drain waits for the batcher to have been this long without a batch...
MAX_AGE_SECONDS = 1.0  # ...but an address waits no longer than this for it (a steady stream of requests)
RETRY_SECONDS = 1.0  # after a failed drain
SHOWN = 20  # addresses listed in ``status``


class Quarantine:
    """The allocations of answered DELs whose conntrack flush is still to come."""

    def __init__(
        self, store: Store, dp: Dataplane, *, cluster: str, node: str, on_bad: Callable[[BadRecord], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.dp, self.cluster, self.node, self.on_bad, self.clock = store, dp, cluster, node, on_bad, clock
        self._held: dict[tuple[str, str], Allocation] = {}
        self._parked = 0  # host veths parked since the last drain deleted them
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._busy_at = -QUIET_SECONDS  # the last batch's start
        self._oldest: float | None = None  # when the oldest address held was quarantined
        self.drains = 0
        self.released = 0
        self.last_error: str | None = None

    def put(self, allocs: Iterable[Allocation]) -> None:
        with self._lock:
            for a in allocs:
                self._held[(a.container_id, a.ifname)] = a
                if self._oldest is None:
                    self._oldest = self.clock()

    def parked(self, count: int) -> None:
        """``count`` host veths were parked: the next drain deletes them first."""
        if count <= 0:
            return
        with self._lock:
            self._parked += count
            if self._oldest is None:
                self._oldest = self.clock()

    @property
    def parked_count(self) -> int:
        with self._lock:
            return self._parked

    def delete_parked(self) -> None:
        """Delete every parked veth now (one batch); raises, and they stay counted, on failure."""
        with self._lock:
            count = self._parked
        self.dp.delete_parked_veths()
        with self._lock:
            self._parked -= min(count, self._parked)
            if not self._held and not self._parked:
                self._oldest = None

    def busy(self) -> None:
        """A batch starts: the drain waits for a quiet moment after it."""
        self._busy_at = self.clock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def due(self) -> float | None:
        """Seconds until the next drain should run (0: now); None when nothing is held."""
        with self._lock:
            if (not self._held and not self._parked) or self._oldest is None:
                return None
            oldest = self._oldest
        at = max(self._retry_at, min(self._busy_at + QUIET_SECONDS, oldest + MAX_AGE_SECONDS))
        return max(0.0, at - self.clock())

    def needed_by(self, attachment: tuple[str, str], requested: Iterable[IPAddress] = ()) -> bool:
        """An ADD of ``attachment`` (asking for ``requested``) must wait for the drain."""
        with self._lock:
            if attachment in self._held:
                return True
            wanted = set(requested)
            return bool(wanted) and any(ip in wanted for a in self._held.values() for ip in a.ips)

    def drain(self) -> None:
        """Flush and release everything quarantined now; on failure all of it stays (retried later)."""
        with self._lock:
            items = dict(self._held)
            parked = self._parked
        if not items and not parked:
            return
        try:
            if parked:  # first: no veth of a pod may be left when its flows are walked
                self.delete_parked()
            done = self._drain(list(items.values())) if items else []
        except Exception as exc:  # noqa: BLE001 - the datastore, the kernel, a bug: all of it stays, retried
            self.last_error = str(exc)
            self._retry_at = self.clock() + RETRY_SECONDS
            log.warning("quarantine: flushing and releasing %d addresses failed (%s); retrying in %.0f s",
                        len(items), exc, RETRY_SECONDS)
            return
        with self._lock:
            for key in done:
                if self._held.get(key) is items[key]:
                    del self._held[key]
            if not self._held and not self._parked:
                self._oldest = None
        self.drains += 1

    def _drain(self, allocs: list[Allocation]) -> list[tuple[str, str]]:
        """What left the quarantine: released, or no longer ours to release."""
        keys = [(a.container_id, a.ifname) for a in allocs]
        try:
            now = ipam.get_allocations(self.store, self.cluster, keys)
        except NotFound:
            return keys  # the cluster is gone: nothing left to release
        ours: list[Allocation] = []
        gone: list[tuple[str, str]] = []
        for a, cur in zip(allocs, now, strict=True):
            if isinstance(cur, BadRecord):
                self.on_bad(cur)  # never release what cannot be read; `ipam check` shows it
                gone.append((a.container_id, a.ifname))
            elif cur is None or cur.node != self.node or cur.ips != a.ips:
                gone.append((a.container_id, a.ifname))  # released meanwhile (GC, the reaper): maybe someone else's now
            else:
                ours.append(cur)
        if not ours:
            self._retry_at = 0.0
            return gone
        self.dp.flush_conntrack_many([ip for a in ours for ip in a.ips])  # one walk (per family); raises: all stay
        try:
            got = ipam.release_many(self.store, self.cluster, [(a.container_id, a.ifname) for a in ours], node=self.node)
        except NotFound:
            return keys
        failed = [(a, r) for a, r in zip(ours, got, strict=True) if isinstance(r, OverlayCNIError)]
        for a, err in failed:
            self.last_error = f"{a.ip.ip} ({a.container_id} {a.ifname}): {err}"
            log.warning("quarantine: could not release %s; retrying", self.last_error)
        self._retry_at = self.clock() + RETRY_SECONDS if failed else 0.0
        self.released += len(ours) - len(failed)
        failed_keys = {(a.container_id, a.ifname) for a, _ in failed}
        return gone + [(a.container_id, a.ifname) for a in ours if (a.container_id, a.ifname) not in failed_keys]

    def status(self) -> dict[str, Any]:
        with self._lock:
            held = list(self._held.values())
        return {"held": len(held), "parked": self.parked_count, "addresses": [str(ip) for a in held[:SHOWN] for ip in a.ips],
                "drains": self.drains, "released": self.released, "last_error": self.last_error}
