"""The CNI operations the agent performs for the plugin shim.

ADD:   allocate (IPAM, idempotent per containerID+ifname) -> attach the pod
       (veth, address, routes, anti-spoofing element) -> result. A failure
       after allocation detaches what was made and releases the IP, so a
       failed ADD leaves nothing behind.
DEL:   detach (a missing netns or veth is fine) -> release. Repeatable.
CHECK: the allocation still exists and matches prevResult; the pod's
       interface, address and routes are as ADD left them.
GC:    release every allocation of this node not in the valid attachments,
       and remove project-owned host veths that no allocation accounts for.
STATUS: the datastore answers and the node is registered.

Pod operations on one (containerID, ifname) are serialised by a per-key lock;
different pods proceed in parallel, except for the kernel step, which shares
one lock with full reconciles (a reconcile must not see half a pod).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from .. import ipam
from ..cni.protocol import CNIRequest, add_result, prev_result_ip
from ..config import ClusterNetwork
from ..dataplane import Dataplane, host_veth_name
from ..datastore import Store
from ..errors import (
    CNI_CHECK_FAILED,
    CNI_INVALID_CONFIG,
    CNI_IO_FAILURE,
    CNI_NOT_AVAILABLE,
    CNI_UNKNOWN_CONTAINER,
    CNIError,
    DatastoreError,
    InterfaceExists,
    OverlayCNIError,
)
from ..ipam import NodeRecord

log = logging.getLogger(__name__)


@dataclass
class NodeContext:
    """What the CNI operations need to know about this node (set by the daemon)."""

    cluster: str
    network: ClusterNetwork
    record: NodeRecord
    pod_mtu: int


class KeyedLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], list[Any]] = {}

    def acquire(self, key: tuple[str, str]) -> None:
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        entry[0].acquire()

    def release(self, key: tuple[str, str]) -> None:
        with self._guard:
            entry = self._locks[key]
            entry[0].release()
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[key]


class CNIOps:
    def __init__(
        self,
        store: Store,
        dataplane: Dataplane,
        ctx: NodeContext,
        *,
        kernel_lock: threading.RLock,
    ) -> None:
        self.store = store
        self.dp = dataplane
        self.ctx = ctx
        self.kernel_lock = kernel_lock
        self.locks = KeyedLocks()

    # ----- dispatch -----------------------------------------------------------
    def handle(self, req: CNIRequest) -> dict[str, Any] | None:
        if req.command in ("ADD", "DEL", "CHECK"):
            key = (req.container_id, req.ifname)
            self.locks.acquire(key)
            op = {"ADD": self.add, "DEL": self.delete, "CHECK": self.check}[req.command]
            try:
                return op(req)
            finally:
                self.locks.release(key)
        if req.command == "GC":
            self.gc(req)
            return None  # success with no output
        if req.command == "STATUS":
            self.status(req)
            return None
        raise CNIError(CNI_NOT_AVAILABLE, f"unsupported command {req.command}")

    # ----- ADD ----------------------------------------------------------------
    def add(self, req: CNIRequest) -> dict[str, Any]:
        c = self.ctx
        alloc = ipam.allocate(
            self.store,
            c.cluster,
            c.record.name,
            req.container_id,
            req.ifname,
            pod=req.pod,
            requested_ip=req.requested_ip,
        )
        try:
            with self.kernel_lock:
                pod_if = self.dp.attach_pod(
                    container_id=req.container_id,
                    ifname=req.ifname,
                    netns_path=req.netns,
                    ip=alloc.ip,
                    gateway=alloc.gateway,
                    mtu=c.pod_mtu,
                )
        except BaseException as exc:
            log.debug("ADD %s %s failed after allocating %s: %s", req.container_id, req.ifname, alloc.ip, exc)
            if isinstance(exc, InterfaceExists) and host_veth_name(req.container_id, req.ifname) in self.dp.list_pod_veths():
                raise  # a repeated ADD: the interface and its IP belong to the first, successful one
            try:  # nothing usable was built for this attachment: give its IP back
                ipam.release(self.store, c.cluster, req.container_id, req.ifname)
            except OverlayCNIError:
                pass  # GC will find it; the original error matters more
            raise
        dns = req.config.get("dns") if isinstance(req.config.get("dns"), dict) else None
        return add_result(
            req.version,
            host_veth=pod_if.host_veth,
            host_mac=pod_if.host_mac,
            ifname=pod_if.ifname,
            mac=pod_if.mac,
            mtu=pod_if.mtu,
            sandbox=pod_if.sandbox,
            ip=pod_if.ip,
            gateway=pod_if.gateway,
            dns=dns,
        )

    # ----- DEL ----------------------------------------------------------------
    def delete(self, req: CNIRequest) -> None:
        with self.kernel_lock:
            self.dp.detach_pod(container_id=req.container_id, ifname=req.ifname, netns_path=req.netns or None)
        ipam.release(self.store, self.ctx.cluster, req.container_id, req.ifname)
        return None

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
        expected = prev_result_ip(prev)
        if expected is None or expected[0] != alloc.ip:
            raise CNIError(
                CNI_CHECK_FAILED,
                f"prevResult address {expected[0] if expected else None} does not match the reservation {alloc.ip}",
            )
        problems = self.dp.check_pod(
            container_id=req.container_id,
            ifname=req.ifname,
            netns_path=req.netns,
            ip=alloc.ip,
            gateway=alloc.gateway,
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
        released = ipam.gc(self.store, c.cluster, valid, node=c.record.name)
        keep = {host_veth_name(cid, ifn) for cid, ifn in valid}
        for a in ipam.list_allocations(self.store, c.cluster, node=c.record.name):
            keep.add(host_veth_name(a.container_id, a.ifname))
        with self.kernel_lock:
            for a in released:
                try:
                    self.dp.detach_pod(container_id=a.container_id, ifname=a.ifname, netns_path=None)
                except OverlayCNIError as exc:
                    errors.append(str(exc))
            for veth in self.dp.list_pod_veths():
                if veth not in keep:
                    try:
                        self.dp.delete_pod_veth(veth)
                    except OverlayCNIError as exc:
                        errors.append(str(exc))
        if errors:
            raise CNIError(CNI_IO_FAILURE, "GC finished with errors", details="; ".join(errors))
        return None

    # ----- STATUS -------------------------------------------------------------
    def status(self, req: CNIRequest) -> None:
        try:
            ipam.get_node(self.store, self.ctx.cluster, self.ctx.record.name)
        except DatastoreError as exc:
            raise CNIError(CNI_NOT_AVAILABLE, "the datastore is not reachable", details=str(exc)) from None
        except OverlayCNIError as exc:
            raise CNIError(CNI_NOT_AVAILABLE, "this node is not registered", details=str(exc)) from None
        return None
