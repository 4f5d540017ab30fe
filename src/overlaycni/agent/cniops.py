"""The CNI operations the agent performs for the plugin shim.

ADD:   check CNI_NETNS (``Dataplane.open_pod_netns``: an nsfs network
       namespace that is neither the node's own nor the host's; a bad one
       is refused before anything else) -> reserve the addresses (IPAM,
       idempotent per containerID+ifname, one per family of the cluster;
       it says whether this ADD made the reservation) -> attach the pod
       through the checked descriptor (veth, addresses, routes, anti-spoofing
       element) -> with NetworkPolicy in the cluster, wait until a policy
       pass holding the new address reached the kernel -> result. A failure
       undoes exactly what this ADD made: the veth if it may have made one,
       the addresses if it reserved them. An attachment that existed before
       (a repeated ADD) keeps its addresses, veth and routes: the same netns
       gives "interface exists", another netns is refused.
DEL:   remove the host veth (a missing netns or veth is fine) -> answer;
       the addresses stay quarantined (``agent.quarantine``: allocated,
       never handed out) until their conntrack entries are flushed, then
       they are released, but only ones held by *this* node. A cluster,
       allocation or veth that is already gone is success with nothing to
       do.
CHECK: the allocation still exists and matches prevResult (every family);
       the pod's interface, addresses and routes are as ADD left them.
GC:    with the node lock (no request in flight): release every allocation
       of this node not in the valid attachments, remove their veths and
       conntrack entries, and remove project-owned host veths that no
       allocation accounts for.
STATUS: the datastore answers and the node is registered.
Reaping (``reap``, driven by ``agent.reaper``): an allocation whose veth is
       gone is released like a DEL, if no request holds its lock.

ADD and DEL go through the node's batcher (``agent.batch`` and
``agent.commit``, group commit):
this module checks each request in its own thread (the attachment lock,
CNI_NETNS), hands it over as a ``Job``, and waits for its answer; the
reservation, the attachment, the quarantine, the conntrack flush and the
release happen there, for every request that arrived together at once, with the rules
above applied per request. The policy wait runs here, in the request's
thread (one policy pass serves every ADD waiting); if it fails, the ADD's
rollback goes through the batcher as an ``UNDO`` job.

Each request runs under one deadline (``request_deadline``, shorter than the
plugin's 4.5 s reply timeout) that bounds every wait below it: the
attachment lock, the datastore, the kernel lock and worker, the policy
pass. Past it the request fails with code 11; an ADD's rollback then gets a
short budget of its own (``ROLLBACK_SECONDS``). Crash safety: the address is
reserved before the kernel is touched and released after it is cleaned, so
a crash in between leaves an allocation without a veth, which the reaper
(or the runtime's DEL) releases.

Locks (``agent.locks``): one per attachment (ADD/DEL/CHECK, and the reaper
without waiting), the node lock for GC; the kernel steps also share
``kernel_lock`` with full reconciles (a reconcile must not see half a pod).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any

from .. import deadline, ipam, trace
from ..cidr import IPAddress
from ..cni.protocol import CNIRequest, add_result, prev_result_problems
from ..config import ClusterNetwork
from ..dataplane import Dataplane, host_veth_name
from ..datastore import Store
from ..errors import (
    CNI_CHECK_FAILED,
    CNI_INVALID_CONFIG,
    CNI_IO_FAILURE,
    CNI_NOT_AVAILABLE,
    CNI_UNKNOWN_CONTAINER,
    BadRecord,
    CNIError,
    DatastoreError,
    NotFound,
    OverlayCNIError,
)
from ..ipam import Allocation, NodeRecord
from .batch import ROLLBACK_SECONDS, Added, Batcher, Job
from .commit import Commit
from .locks import AttachmentLocks, kernel_lock_within_deadline

log = logging.getLogger(__name__)
REQUEST_DEADLINE = 3.5  # seconds; the shim waits 4.5 s for an answer


@dataclass
class NodeContext:
    """What the CNI operations need to know about this node (set by the daemon)."""

    cluster: str
    network: ClusterNetwork
    record: NodeRecord
    pod_mtu: int


class CNIOps:
    def __init__(
        self,
        store: Store,
        dataplane: Dataplane,
        ctx: NodeContext,
        *,
        kernel_lock: threading.RLock,
        policy_programmed: Callable[[], None] | None = None,
        request_deadline: float = REQUEST_DEADLINE,
        on_bad: Callable[[BadRecord], None] | None = None,
        on_batch: Callable[[str, int], None] | None = None,
        on_attached: Callable[[list[Allocation]], None] | None = None,
    ) -> None:
        """``policy_programmed``: blocks until the node's NetworkPolicy table
        holds every allocation made so far (``PolicyController.programmed``);
        ``on_batch(command, size)`` hears of every batch the batcher applies;
        ``on_attached`` of the pods each batch attached, under the kernel lock
        (``agent.podlog``)."""
        self.store = store
        self.dp = dataplane
        self.ctx = ctx
        self.kernel_lock = kernel_lock
        self.policy_programmed = policy_programmed
        self.request_deadline = request_deadline
        self.on_bad = on_bad
        self.locks = AttachmentLocks()
        commit = Commit(store, dataplane, cluster=ctx.cluster, node=ctx.record.name, kernel_lock=kernel_lock,
                        on_bad=self.report_bad, on_batch=on_batch, on_attached=on_attached)
        self.quarantine = commit.quarantine
        self.batcher = Batcher(commit, idle=commit.quarantine)

    @property
    def node(self) -> str:
        return self.ctx.record.name

    def close(self, timeout: float = 5.0) -> bool:
        """Finish the batch in flight (``Batcher.close``); False if it took longer than ``timeout``."""
        return self.batcher.close(timeout)

    # ----- dispatch -----------------------------------------------------------
    def handle(self, req: CNIRequest) -> dict[str, Any] | None:
        with deadline.within(self.request_deadline):
            if req.command in ("ADD", "DEL"):
                key = host_veth_name(req.container_id, req.ifname)
                with trace.phase("lock"):
                    self.locks.acquire(key)
                jobs: list[Job] = []
                try:
                    if req.command == "ADD":
                        return self.add(req, jobs)
                    self.delete(req, jobs)
                    return None
                finally:
                    # a job the batcher still works on (its caller gave up) keeps the attachment until it settles
                    release = functools.partial(self.locks.release, key)
                    if jobs:
                        jobs[-1].after_settled(release)
                    else:
                        release()
            if req.command == "CHECK":
                with ExitStack() as held:
                    with trace.phase("lock"):
                        held.enter_context(self.locks.attachment(host_veth_name(req.container_id, req.ifname)))
                    self.check(req)
                    return None
            if req.command == "GC":
                self.gc(req)
                return None  # success with no output
            if req.command == "STATUS":
                self.status(req)
                return None
        raise CNIError(CNI_NOT_AVAILABLE, f"unsupported command {req.command}")

    def _kernel(self) -> AbstractContextManager[None]:
        """The kernel lock, waited for no longer than the request's deadline."""
        return kernel_lock_within_deadline(self.kernel_lock)

    # ----- ADD ----------------------------------------------------------------
    def add(self, req: CNIRequest, jobs: list[Job]) -> dict[str, Any]:
        key = host_veth_name(req.container_id, req.ifname)
        with trace.phase("netns"), self.dp.open_pod_netns(req.netns) as netns_fd:
            owned = os.dup(netns_fd) if netns_fd is not None else None  # the job's own: the batcher may outlive us
        job = Job("ADD", req.container_id, req.ifname, key, netns=req.netns, netns_fd=owned, pod=req.pod,
                  requested_ips=self._requested_ips(req), mtu=self.ctx.pod_mtu)
        jobs.append(job)
        added: Added = self.batcher.run(job)
        if self.policy_programmed is not None and req.pod is not None:  # policies select Kubernetes pods only
            try:
                with trace.phase("policy"):
                    self.policy_programmed()
            except BaseException as exc:
                log.info("ADD %s %s failed (%s); undoing %s", req.container_id, req.ifname, exc,
                         "the attachment" if added.fresh else "its veth" if added.ours else "nothing (it existed before)")
                undo = Job("UNDO", req.container_id, req.ifname, key, undo=added)
                jobs.append(undo)
                with deadline.fresh(ROLLBACK_SECONDS):
                    try:
                        self.batcher.run(undo)
                    except OverlayCNIError as rollback:
                        log.warning("ADD %s %s: rollback incomplete (%s); the leak reaper or the runtime's DEL "
                                    "finishes it", req.container_id, req.ifname, rollback)
                raise
        pod_if = added.pod
        dns = req.config.get("dns") if isinstance(req.config.get("dns"), dict) else None
        result = add_result(
            req.version,
            host_veth=pod_if.host_veth,
            host_mac=pod_if.host_mac,
            ifname=pod_if.ifname,
            mac=pod_if.mac,
            mtu=pod_if.mtu,
            sandbox=pod_if.sandbox,
            addresses=pod_if.addresses,
            dns=dns,
        )
        t = trace.request()
        if t is not None and trace.wants_debug(req.args):
            result["debug"] = t.to_debug()
        return result

    def _requested_ips(self, req: CNIRequest) -> tuple[IPAddress, ...]:
        """The ``ips`` capability's addresses, one per family the cluster has."""
        ips = req.requested_ips
        for ip in ips:
            try:
                self.ctx.network.family_of(ip)
            except ValueError as exc:
                raise CNIError(CNI_INVALID_CONFIG, f"runtimeConfig.ips: {exc}") from None
        return ips

    # ----- DEL ----------------------------------------------------------------
    def delete(self, req: CNIRequest, jobs: list[Job]) -> None:
        job = Job("DEL", req.container_id, req.ifname, host_veth_name(req.container_id, req.ifname), netns=req.netns)
        jobs.append(job)
        self.batcher.run(job)
        return None

    def _forget(self, alloc: Allocation) -> Allocation | None:
        """The kernel side is gone: flush the address's flows, then release it here."""
        for ip in alloc.ips:  # every family of the attachment
            self.dp.flush_conntrack(ip)
        try:
            return ipam.release(self.store, self.ctx.cluster, alloc.container_id, alloc.ifname, node=self.node)
        except NotFound:
            return None  # the cluster itself is gone: nothing left to release

    # ----- CHECK --------------------------------------------------------------
    def check(self, req: CNIRequest) -> None:
        prev = req.prev_result
        if prev is None:
            raise CNIError(CNI_INVALID_CONFIG, "CHECK needs prevResult in the network config")
        alloc = ipam.get_allocation(self.store, self.ctx.cluster, req.container_id, req.ifname)
        if alloc is None:
            raise CNIError(
                CNI_UNKNOWN_CONTAINER,
                f"no IP is reserved for container {req.container_id} interface {req.ifname}",
            )
        mismatch = prev_result_problems(prev, alloc.addresses)
        if mismatch:
            raise CNIError(CNI_CHECK_FAILED, "; ".join(mismatch))
        with self.dp.open_pod_netns(req.netns) as netns_fd:
            problems = self.dp.check_pod(
                container_id=req.container_id,
                ifname=req.ifname,
                netns_path=req.netns,
                netns_fd=netns_fd,
                addresses=alloc.addresses,
            )
        for iface in prev.get("interfaces") or []:
            if iface.get("sandbox") and iface.get("name") != req.ifname:
                problems.append(f"prevResult names interface {iface.get('name')}, not {req.ifname}")
        if problems:
            raise CNIError(CNI_CHECK_FAILED, "pod network does not match prevResult", details="; ".join(problems))
        return None

    # ----- GC -----------------------------------------------------------------
    def gc(self, req: CNIRequest) -> None:
        valid = req.valid_attachments
        c = self.ctx
        errors: list[str] = []
        with self.locks.node():
            veths = set(self.dp.list_pod_veths())
            before = ipam.list_allocations(self.store, c.cluster, node=self.node, on_bad=self.report_bad)
            try:
                ipam.gc(self.store, c.cluster, valid, node=self.node)
            except OverlayCNIError as exc:
                errors.append(str(exc))  # it released what it could: find out below what that was
            after = ipam.list_allocations(self.store, c.cluster, node=self.node, on_bad=self.report_bad)
            still = {(a.container_id, a.ifname) for a in after}
            released = [a for a in before if (a.container_id, a.ifname) not in still]
            keep = {host_veth_name(cid, ifn) for cid, ifn in valid} | {host_veth_name(*k) for k in still}
            with self._kernel():
                for a in released:
                    try:
                        self.dp.detach_pod(container_id=a.container_id, ifname=a.ifname, netns_path=None)
                    except OverlayCNIError as exc:
                        errors.append(str(exc))
                for veth in sorted(veths - keep):
                    try:
                        self.dp.delete_pod_veth(veth)
                    except OverlayCNIError as exc:
                        errors.append(str(exc))
                try:  # the parked veths of answered DELs (``agent.quarantine``): no pod's any more
                    self.quarantine.delete_parked()
                except OverlayCNIError as exc:
                    errors.append(str(exc))
            for a in released:
                try:
                    for ip in a.ips:
                        self.dp.flush_conntrack(ip)
                except OverlayCNIError as exc:
                    errors.append(str(exc))
        if errors:
            raise CNIError(CNI_IO_FAILURE, "GC finished with errors", details="; ".join(errors))
        return None

    # ----- reaping (agent.reaper) ---------------------------------------------
    def reap(self, alloc: Allocation) -> Allocation | None:
        """Release ``alloc`` if its veth is still gone and no request holds
        its attachment (never waits for one). Returns what was released."""
        host = host_veth_name(alloc.container_id, alloc.ifname)
        with self.locks.attachment(host, wait=False) as held:
            if not held:
                return None  # an ADD, DEL or CHECK is in flight: not now
            if host in self.dp.list_pod_veths():
                return None  # (re)attached meanwhile
            return self._forget(alloc)

    # ----- STATUS -------------------------------------------------------------
    def status(self, req: CNIRequest) -> None:
        try:
            ipam.get_node(self.store, self.ctx.cluster, self.node)
        except DatastoreError as exc:
            raise CNIError(CNI_NOT_AVAILABLE, "the datastore is not reachable", details=str(exc)) from None
        except OverlayCNIError as exc:
            raise CNIError(CNI_NOT_AVAILABLE, "this node is not registered", details=str(exc)) from None
        return None

    def report_bad(self, exc: BadRecord) -> None:
        if self.on_bad is not None:
            self.on_bad(exc)
        else:
            log.warning("skipping %s", exc)
