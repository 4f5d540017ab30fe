"""What one batch of CNI jobs does (group commit; the queue is ``batch``).

A batch, in order, each step once for the whole batch:

1. IPAM: ``reserve_many`` (one read and one transaction for every ADD) and
   ``get_allocations`` (one read for every DEL);
2. kernel, under the node's kernel lock: ``attach_pods`` (one data-plane
   call: one netlink batch for the veth pairs, one route batch, one
   nftables transaction); the ADDs that succeeded are answered now (their
   callers wait for the NetworkPolicy pass in their own threads); then
   ``park_pods`` for the DELs (their host veths down, renamed, left for
   the drain to delete: ``agent.quarantine``) and ``detach_pods`` for what
   must be undone;
3. the DELs whose veth is parked (or gone) are answered, their allocations
   quarantined (``agent.quarantine``: held until one coalesced conntrack
   walk and one release transaction, run when the batcher is idle);
4. for the failed ADDs: conntrack flushed in one walk (per family), then
   IPAM ``release_many`` (one read and one transaction); they are answered.

Before step 1, the quarantine is drained at once when an ADD of the batch
needs it: the same attachment quarantined, a requested address
quarantined; and after step 1, the ADDs the pool turned away
(``PoolExhausted``) while addresses were quarantined are reserved again
after a drain.

Every answer is per job, with the rules of a request alone (``cniops``): a
failed ADD undoes what it made (its veth if it may have made one, its
address if it reserved it) and is answered once that is done; a repeated
ADD never takes back a live pod's veth; a DEL releases only this node's
allocation, after its veth is gone, and only after its conntrack entries
are (the quarantine); a fresh
reservation whose veth already exists (a leftover no allocation accounted
for) has it removed and is attached again. A job whose caller gave up while
the batch ran is undone like a failed ADD. Each step's time goes to the
trace of every job it served (``overlaycni.trace``).

Dual-stack: each ADD's allocation has an address per family (``reserve_many``
writes both in the batch's transaction, ``ipam.podbatch6``), its
``PodAttachment`` carries the IPv6 one (``ip6``) into the same
``attach_pods`` steps, the conntrack walk takes every address of every
released allocation (IPv6 ones in the ``AF_INET6`` table) and
``release_many`` deletes both. A single-stack batch is as it was.

Deadlines: the steps of the jobs' own work wait no longer than the latest
deadline among them; undoing gets ``ROLLBACK_SECONDS`` of its own. A
detach that meets the deadline while queued on the data plane's worker
stays queued and runs before any later attach (the worker is first in,
first out), so undoing counts it as done, as ``cniops`` always has.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from .. import deadline, ipam, trace
from ..dataplane import Dataplane, PodAttachment, PodInterface
from ..datastore import Store
from ..errors import (
    AttachmentConflict,
    BadRecord,
    Conflict,
    DeadlineExceeded,
    InterfaceExists,
    NotFound,
    OverlayCNIError,
    PoolExhausted,
)
from ..ipam import Allocation
from ..trace import Phases
from .batch import ROLLBACK_SECONDS, Added, Job
from .locks import kernel_lock_within_deadline
from .quarantine import Quarantine

log = logging.getLogger(__name__)


@dataclass
class _Undo:
    """What a batch must take back for one job: its veth, its address."""

    job: Job
    alloc: Allocation | None
    detach: bool
    release: bool
    error: BaseException | None = None  # the ADD's own error, answered once it is undone


class Commit:
    """``Batcher``'s ``apply`` for the node's CNI jobs."""

    def __init__(
        self, store: Store, dp: Dataplane, *, cluster: str, node: str, kernel_lock: threading.RLock,
        on_bad: Callable[[BadRecord], None], on_batch: Callable[[str, int], None] | None = None,
        on_attached: Callable[[list[Allocation]], None] | None = None,
    ) -> None:
        """``on_attached``: told of the pods each batch attached while it still
        holds the kernel lock (``agent.podlog``: a reconcile that read the
        allocations before must not program older addresses over them)."""
        self.store, self.dp, self.cluster, self.node = store, dp, cluster, node
        self.kernel_lock, self.on_bad, self.on_batch = kernel_lock, on_bad, on_batch
        self.on_attached = on_attached
        self.quarantine = Quarantine(store, dp, cluster=cluster, node=node, on_bad=on_bad)

    def __call__(self, batch: list[Job]) -> None:
        self.quarantine.busy()
        live = [j for j in batch if j.kind == "UNDO" or not j.cancelled]  # given up before the start: skipped
        adds = [j for j in live if j.kind == "ADD"]
        dels = [j for j in live if j.kind == "DEL"]
        undo = [_Undo(j, j.undo.alloc, j.undo.ours, j.undo.fresh) for j in live if j.kind == "UNDO" and j.undo]
        if self.on_batch is not None:
            for kind, jobs in (("ADD", adds), ("DEL", dels)):
                if jobs:
                    self.on_batch(kind, len(jobs))
        with _until([j.end for j in adds]):
            answers = self._reserve_and_attach(adds, undo)
        for job, added in answers:
            if not job.deliver(added):  # its caller gave up meanwhile: take it back
                undo.append(_Undo(job, added.alloc, detach=added.ours, release=added.fresh))
        with _until([j.end for j in dels]):
            dels, allocs = self._read(dels)
        with _until([j.end for j in dels], floor=ROLLBACK_SECONDS if undo else None):
            detached = self._detach(dels, undo)
            self._forget(dels, allocs, detached, undo)

    # ----- ADD ---------------------------------------------------------------------------
    def _reserve_and_attach(self, adds: list[Job], undo: list[_Undo]) -> list[tuple[Job, Added]]:
        if not adds:
            return []
        if any(self.quarantine.needed_by((j.container_id, j.ifname), j.requested_ips) for j in adds):
            with self._step(adds, "quarantine"):
                self.quarantine.drain()
            # still quarantined (the drain failed): reserving would hand its old, unflushed allocation back
            waiting = [j for j in adds if self.quarantine.needed_by((j.container_id, j.ifname))]
            for job in waiting:
                job.deliver(error=Conflict(
                    f"ADD {job.container_id} {job.ifname}: the addresses of its previous attachment are still being "
                    "released (their conntrack entries are not flushed yet); try again",
                    details=self.quarantine.last_error or ""))
            adds = [j for j in adds if j not in waiting]
            if not adds:
                return []
        got = self._reserve(adds)
        full = [n for n, res in enumerate(got) if isinstance(res, PoolExhausted)]
        if full and len(self.quarantine):  # quarantined addresses would make room: drain, then try those again
            with self._step([adds[n] for n in full], "quarantine"):
                self.quarantine.drain()
            for n, res in zip(full, self._reserve([adds[n] for n in full]), strict=True):
                got[n] = res
        reserved: list[tuple[Job, Allocation, bool]] = []
        for job, res in zip(adds, got, strict=True):
            if isinstance(res, OverlayCNIError):
                job.deliver(error=res)
            elif job.cancelled:
                undo.append(_Undo(job, res[0], detach=False, release=res[1]))
            else:
                reserved.append((job, *res))
        if not reserved:
            return []
        out: list[tuple[Job, Added]] = []
        veths: set[str] | None = set()
        try:
            with self._step([j for j, _, _ in reserved], "kernel"), self._kernel():
                if any(not fresh for _, _, fresh in reserved):
                    # a repeated ADD whose veth exists must not undo it: only what this ADD makes is ours
                    veths = None
                    veths = set(self.dp.list_pod_veths())
                results = self._attach(reserved)
                if self.on_attached is not None:
                    self.on_attached([a for (_j, a, _f), res in zip(reserved, results, strict=True)
                                      if isinstance(res, PodInterface)])
        except Exception as exc:  # noqa: BLE001 - the kernel lock, the worker, a bug: every job of the step, undone
            results = [exc] * len(reserved)
        for (job, alloc, fresh), attached in zip(reserved, results, strict=True):
            ours = fresh or (veths is not None and job.key not in veths)  # unknown: never take a live veth
            if isinstance(attached, PodInterface):
                out.append((job, Added(attached, alloc, fresh, ours)))
                continue
            log.info("ADD %s %s failed (%s); undoing %s", job.container_id, job.ifname, attached,
                     "the attachment" if fresh else "its veth" if ours else "nothing (it existed before)")
            undo.append(_Undo(job, alloc, detach=ours and not isinstance(attached, AttachmentConflict), release=fresh,
                              error=attached))
        return out

    def _reserve(self, adds: list[Job]) -> list[tuple[Allocation, bool] | OverlayCNIError]:
        with self._step(adds, "ipam"):
            try:
                return ipam.reserve_many(self.store, self.cluster, self.node, [
                    ipam.Reservation(j.container_id, j.ifname, j.pod, requested_ips=j.requested_ips) for j in adds])
            except OverlayCNIError as exc:
                return [exc] * len(adds)

    def _attach(self, reserved: list[tuple[Job, Allocation, bool]]) -> list[PodInterface | Exception]:
        def specs(items: Sequence[tuple[Job, Allocation, bool]]) -> list[PodAttachment]:
            return [PodAttachment(j.container_id, j.ifname, j.netns, a.ip, a.gateway, j.mtu, j.netns_fd,
                                  ip6=a.addresses[1] if a.ip_v6 is not None else None) for j, a, _ in items]

        results = self.dp.attach_pods(specs(reserved))
        # The pod's interface exists while parked veths do: maybe a parked pod end in the same namespace
        # (a DEL, then an ADD of another container ID into it): delete the parked veths, try once more.
        held = [n for n, res in enumerate(results) if isinstance(res, InterfaceExists)]
        if held and self.quarantine.parked_count:
            try:
                with self._step([reserved[n][0] for n in held], "quarantine"):
                    self.quarantine.delete_parked()
            except OverlayCNIError as exc:
                log.warning("ADD: deleting the parked veths failed (%s)", exc)
            else:
                for n, res in zip(held, self.dp.attach_pods(specs([reserved[n] for n in held])), strict=True):
                    results[n] = res
        # A fresh reservation whose veth exists: no allocation accounted for that veth (a crash between
        # release and cleanup): a leftover, removed before attaching again.
        again = [n for n, ((_j, _a, fresh), res) in enumerate(zip(reserved, results, strict=True))
                 if fresh and isinstance(res, AttachmentConflict)]
        if again:
            for n in again:
                log.warning("ADD %s %s: removing leftover host veth %s first", reserved[n][0].container_id,
                            reserved[n][0].ifname, reserved[n][0].key)
            self.dp.detach_pods([(reserved[n][0].container_id, reserved[n][0].ifname) for n in again])
            for n, res in zip(again, self.dp.attach_pods(specs([reserved[n] for n in again])), strict=True):
                results[n] = res
        return results

    # ----- DEL and undoing -----------------------------------------------------------------
    def _read(self, dels: list[Job]) -> tuple[list[Job], list[Allocation | None]]:
        """The DELs' allocations, in one read (a DEL whose read fails is answered with that error)."""
        if not dels:
            return [], []
        with self._step(dels, "ipam"):
            try:
                got = ipam.get_allocations(self.store, self.cluster, [(j.container_id, j.ifname) for j in dels])
            except OverlayCNIError as exc:
                for job in dels:
                    job.deliver(error=exc)
                return [], []
        out: list[Allocation | None] = []
        for res in got:
            if isinstance(res, BadRecord):
                self.on_bad(res)
                res = None  # never release what cannot be read; `ipam check` shows it
            out.append(res)
        return dels, out

    def _detach(self, dels: list[Job], undo: list[_Undo]) -> dict[int, Exception | None]:
        """Remove the veths of the DELs and of the undone ADDs; the error of each (by id of its job)."""
        gone = [u.job for u in undo if u.detach]  # deleted now: their addresses are flushed in this batch
        jobs = dels + gone
        if not jobs:
            return {}
        errs: list[Exception | None] = []
        try:
            with self._step(jobs, "kernel"), self._kernel():
                try:
                    errs = self.dp.park_pods([(j.container_id, j.ifname) for j in dels]) if dels else []
                except DeadlineExceeded as exc:
                    # queued behind the attach on the worker: it runs in order, before any later attach
                    errs = [exc] * len(dels)
                self.quarantine.parked(sum(e is None for e in errs))  # an upper bound: some were gone already
                try:
                    errs += self.dp.detach_pods([(j.container_id, j.ifname) for j in gone]) if gone else []
                except DeadlineExceeded:
                    errs += [None] * len(gone)
        except Exception as exc:  # noqa: BLE001 - the kernel lock, or the data plane as a whole
            errs = errs + [exc] * (len(jobs) - len(errs))
        return {id(j): e for j, e in zip(jobs, errs, strict=True)}

    def _forget(self, dels: list[Job], allocs: list[Allocation | None], detached: dict[int, Exception | None],
                undo: list[_Undo]) -> None:
        """Answer the DELs whose veth is gone and quarantine their addresses;
        flush and release what the undone ADDs reserved, then answer them."""
        release: list[tuple[Job, Allocation]] = []
        for job, alloc in zip(dels, allocs, strict=True):
            err = detached.get(id(job))
            if err is not None:
                job.deliver(error=err)
            elif alloc is None:
                job.deliver(None)
            elif alloc.node != self.node:
                log.info("DEL %s %s: its address %s is held by node %s, not by this node: not releasing it",
                         job.container_id, job.ifname, alloc.ip.ip, alloc.node)
                job.deliver(None)
            else:
                release.append((job, alloc))
        self.quarantine.put(a for _, a in release)  # before the answer: a next ADD of it finds it quarantined
        for job, _alloc in release:
            job.deliver(None)
        if not undo:
            return
        flush = [(u.job, u.alloc) for u in undo if u.detach and u.alloc is not None and detached.get(id(u.job)) is None]
        free = [(u.job, u.alloc) for u in undo if u.release and u.alloc is not None
                and (not u.detach or detached.get(id(u.job)) is None)]
        failed = self._flush(flush)
        free = [(j, a) for j, a in free if id(j) not in failed]
        released = self._release(free)
        for u in undo:
            err = failed.get(id(u.job)) or released.get(id(u.job)) or (detached.get(id(u.job)) if u.detach else None)
            if err is not None:
                log.warning("ADD %s %s: rollback incomplete (%s); the leak reaper or the runtime's DEL finishes it",
                            u.job.container_id, u.job.ifname, err)
            u.job.deliver(None, u.error)  # a failed ADD's error, once undone; an UNDO's caller hears it is done

    def _flush(self, items: list[tuple[Job, Allocation]]) -> dict[int, Exception]:
        if not items:
            return {}
        failed: dict[int, Exception] = {}
        with self._step([j for j, _ in items], "conntrack"):
            try:
                self.dp.flush_conntrack_many([ip for _, a in items for ip in a.ips])  # both families
            except OverlayCNIError:
                for job, alloc in items:  # one at a time, to charge the failure to its own address
                    try:
                        for ip in alloc.ips:
                            self.dp.flush_conntrack(ip)
                    except OverlayCNIError as exc:
                        failed[id(job)] = exc
        return failed

    def _release(self, items: list[tuple[Job, Allocation]]) -> dict[int, Exception]:
        if not items:
            return {}
        with self._step([j for j, _ in items], "ipam"):
            try:
                got = ipam.release_many(self.store, self.cluster, [(a.container_id, a.ifname) for _, a in items],
                                        node=self.node)
            except NotFound:
                return {}  # the cluster itself is gone: nothing left to release
            except OverlayCNIError as exc:
                return {id(j): exc for j, _ in items}
        return {id(j): r for (j, _), r in zip(items, got, strict=True) if isinstance(r, OverlayCNIError)}

    # ----- helpers ---------------------------------------------------------------------------
    def _kernel(self) -> AbstractContextManager[None]:
        """The kernel lock (shared with full reconciles), waited for no longer than the deadline."""
        return kernel_lock_within_deadline(self.kernel_lock)

    @contextmanager
    def _step(self, jobs: Sequence[Job], name: str) -> Iterator[None]:
        """Time one shared step: its phases (the data plane's too) go to every job's trace."""
        rec = Phases()
        start = time.monotonic()
        try:
            with trace.recording(rec):
                yield
        finally:
            rec.add(name, time.monotonic() - start)
            for job in jobs:
                job.record(rec)


@contextmanager
def _until(ends: list[float | None], *, floor: float | None = None) -> Iterator[None]:
    """The batcher's deadline for a step: the latest of its jobs' (none if one has none), at least ``floor`` from now."""
    seconds = None if not ends or None in ends else max(e for e in ends if e is not None) - time.monotonic()
    if floor is not None and ends and seconds is None:
        floor = None  # a job without a deadline: no limit at all
    if floor is not None:
        seconds = floor if seconds is None else max(seconds, floor)
    if seconds is None:
        yield
        return
    with deadline.fresh(seconds):
        yield
