"""Kernel events about the objects this node owns, changed by someone else.

Design note. The agent must notice within seconds when its nftables tables,
its VXLAN device, its routes, neighbours, FDB entries or gateway address are
removed or changed behind its back (an operator's ``nft flush ruleset``, a
``ip link del``, another tool's cleanup), and restore them. Three ways were
weighed:

* a fingerprint poll: cheap per pass, but a route/neighbour dump and a
  table listing every second cost O(peers + pods) forever, and it still
  only finds a change up to a period later;
* ``nft monitor`` and ``ip monitor`` as subprocesses: a fork each, text to
  parse, and a second way into the namespace;
* netlink multicast groups, read here: the kernel pushes a message for
  every change as it happens, costing nothing while nothing changes. Chosen.

Two sockets, opened by the data plane's worker thread inside the node
namespace: rtnetlink (groups link, neighbour, IPv4 address, IPv4 route) and
nfnetlink (group nftables). A change matters when it touches our objects and
was not made by this process:

* rtnetlink sets a notification's ``nlmsg_pid`` to the port of the socket
  whose request caused it (0 for the kernel itself), so changes made through
  the data plane's own sockets (``own_ports``) are skipped; what remains and
  concerns an address on the tunnel device (``ocni.vxlan`` or ``ocni.wg``)
  or the gateway address (``lo:ocni``), a neighbour or FDB entry on it, or
  an IPv4 route of the main table, is reported. Link notifications carry
  port 0 whoever asked, so for the tunnel device a deletion, going down or
  a new MTU is reported whoever did it (when it was us, rarely, that costs
  one needless check);
* nftables ends every committed transaction with ``NFT_MSG_NEWGEN``, which
  carries the committing process's pid (``NFTA_GEN_PROC_PID``); the messages
  before it name their table (attribute 1 of every table, chain, rule, set
  and element message). A transaction that touched a table named
  ``overlaycni`` (either family) and was committed by another process is
  reported. Which pid the kernel gives this process (it differs inside a
  pid namespace) is learnt from our own first transaction on a throwaway
  set (``calibrate``).

A full socket buffer (``ENOBUFS``: events were lost) is reported too. What
the agent does with a report is its business (``agent.repair``: reconcile
from the last desired state, re-apply the policy table). ``close`` from
another thread wakes a ``wait`` at once (``wake.WaitableSockets``): the
agent's stop does not wait out the poll.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from ..model import GATEWAY_LABEL, VXLAN_IFNAME
from ..nlcodec import HDR, attributes
from ..wgmodel import WG_IFNAME
from .wake import WaitableSockets

TUNNELS = (VXLAN_IFNAME, WG_IFNAME)  # the node's tunnel device, whichever the backend

NETLINK_ROUTE, NETLINK_NETFILTER = 0, 12
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1
RTMGRP_LINK, RTMGRP_NEIGH, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x4, 0x10, 0x40
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSET, NFT_MSG_NEWGEN = 9, 15  # enum nf_tables_msg_types (linux/netfilter/nf_tables.h)
NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 20, 21
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWNEIGH, RTM_DELNEIGH = 24, 25, 28, 29
IFLA_IFNAME, IFLA_MTU, IFA_LABEL, RTA_DST, RTA_TABLE = 3, 4, 3, 1, 15
IFF_UP = 0x1
RT_TABLE_MAIN = 254
TABLE = "overlaycni"
CALIBRATION_SET = "ocni_calibrate"
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}



def _text(raw: bytes | None) -> str:
    return (raw or b"").split(b"\0", 1)[0].decode(errors="replace")


def _who(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f"pid {pid} ({f.read().strip()})"
    except OSError:
        return f"pid {pid}"


def calibration_commands(family: str, table: str) -> list[dict]:
    """A transaction that changes nothing in the end (a set added and deleted
    again) but is committed, so its NEWGEN tells which pid we are."""
    body = {"family": family, "table": table, "name": CALIBRATION_SET}
    return [{"add": {"set": {**body, "type": "ipv4_addr"}}}, {"delete": {"set": body}}]


class KernelMonitor:
    """Implements ``ports.KernelEvents``. Create it on the worker thread (its
    sockets then belong to the node namespace); ``wait`` from any one thread."""

    def __init__(self, *, own_ports: set[int]) -> None:
        self.own_ports = {p for p in own_ports if p}
        self.own_pids = {os.getpid()}
        self._calibrating = False
        self._touched: set[str] = set()
        self._seen: dict[str, tuple[int, bytes | None]] = {}  # tunnel -> (up flag, MTU) of its last notification
        self.index: dict[str, int] = {}  # tunnel -> its ifindex
        self.rt = self._socket(NETLINK_ROUTE)
        self.nf = self._socket(NETLINK_NETFILTER)
        try:
            self.rt.bind((0, RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE))
            self.nf.bind((0, 0))
            self.nf.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        except OSError:
            self.close()
            raise
        self._sockets = WaitableSockets([self.rt, self.nf])
        for name in TUNNELS:
            try:
                self.index[name] = socket.if_nametoindex(name)
            except OSError:
                pass

    @staticmethod
    def _socket(proto: int) -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, proto)
        try:
            s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE: bursts of set elements
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        return s

    def expect_calibration(self) -> None:
        """Our next transaction on ``CALIBRATION_SET`` names our pid (call before running it)."""
        self._calibrating = True

    def close(self) -> None:
        """Wakes a ``wait`` in another thread at once; idempotent."""
        waitable = getattr(self, "_sockets", None)
        if waitable is not None:
            waitable.close()
            return
        for s in (getattr(self, "rt", None), getattr(self, "nf", None)):
            if s is not None:
                s.close()

    def wait(self, timeout: float) -> list[str]:
        """Foreign changes to our objects seen within ``timeout`` seconds (or
        at once, if some are queued); [] when there were none, or once closed."""
        reasons: list[str] = []
        with self._sockets.ready(timeout) as ready:
            for s in ready:
                while True:
                    try:
                        data = s.recv(1 << 20, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno == errno.ENOBUFS:
                            reasons.append("kernel events were lost (socket buffer full): checking everything")
                            continue
                        raise
                    parse = self._route if s is self.rt else self._nft
                    reasons.extend(parse(data))
        return reasons

    # ----- rtnetlink ----------------------------------------------------------------
    def _route(self, data: bytes) -> list[str]:
        out = []
        off = 0
        while off + 16 <= len(data):
            length, kind, _flags, _seq, pid = HDR.unpack_from(data, off)
            if length < 16:
                break
            reason = self._route_msg(kind, pid, data, off + 16, off + length)
            if reason:
                out.append(reason)
            off += (length + 3) & ~3
        return out

    def _route_msg(self, kind: int, pid: int, buf: bytes, body: int, end: int) -> str | None:
        foreign = pid != 0 and pid not in self.own_ports
        verb = "deleted" if kind in (RTM_DELLINK, RTM_DELADDR, RTM_DELROUTE, RTM_DELNEIGH) else "changed"
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            index, flags = struct.unpack_from("=iI", buf, body + 4)
            attrs = attributes(buf, body + 16, end)
            name = _text(attrs.get(IFLA_IFNAME))
            if name not in TUNNELS:
                return None
            # The kernel sends link notifications with port 0 whoever asked: a
            # deletion always counts, and a change of the up flag or the MTU.
            seen = (flags & IFF_UP, attrs.get(IFLA_MTU))
            before = self._seen.pop(name, None)
            self.index.pop(name, None)
            if kind == RTM_NEWLINK:
                self._seen[name], self.index[name] = seen, index
            if kind == RTM_DELLINK:
                return f"link {name} deleted" + (f" by {_who(pid)}" if foreign else "")
            went_down = before is not None and before[0] and not seen[0]
            new_mtu = before is not None and before[1] is not None and before[1] != seen[1]
            if foreign or went_down or new_mtu:
                return f"link {name} changed" + (f" by {_who(pid)}" if foreign else " (down)" if went_down else " (MTU)")
            return None
        if not foreign:
            return None
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            (index,) = struct.unpack_from("=I", buf, body + 4)
            label = _text(attributes(buf, body + 8, end).get(IFA_LABEL))
            tunnel = self._tunnel(index)
            if label == GATEWAY_LABEL or tunnel:
                return f"address on {label or tunnel} {verb} by {_who(pid)}"
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE):
            family, dst_len, _s, _t, table = struct.unpack_from("=BBBBB", buf, body)
            attrs = attributes(buf, body + 12, end)
            if RTA_TABLE in attrs:
                (table,) = struct.unpack("=I", attrs[RTA_TABLE][:4])
            if family == socket.AF_INET and table == RT_TABLE_MAIN:
                dst = socket.inet_ntoa(attrs[RTA_DST][:4]) if RTA_DST in attrs else "0.0.0.0"
                return f"route {dst}/{dst_len} {verb} by {_who(pid)}"
        elif kind in (RTM_NEWNEIGH, RTM_DELNEIGH):
            (index,) = struct.unpack_from("=i", buf, body + 4)
            tunnel = self._tunnel(index)
            if tunnel:
                return f"neighbour or FDB entry on {tunnel} {verb} by {_who(pid)}"
        return None

    def _tunnel(self, index: int) -> str | None:
        return next((name for name, i in self.index.items() if index and i == index), None)

    # ----- nftables -----------------------------------------------------------------
    def _nft(self, data: bytes) -> list[str]:
        out = []
        off = 0
        while off + 20 <= len(data):
            length, kind, _flags, _seq, _pid = HDR.unpack_from(data, off)
            if length < 20:
                break
            if kind >> 8 == NFNL_SUBSYS_NFTABLES:
                reason = self._nft_msg(kind & 0xFF, data, off + 16, off + length)
                if reason:
                    out.append(reason)
            off += (length + 3) & ~3
        return out

    def _nft_msg(self, msg: int, buf: bytes, body: int, end: int) -> str | None:
        family = FAMILIES.get(buf[body], str(buf[body]))
        attrs = attributes(buf, body + 4, end)  # after struct nfgenmsg
        if msg != NFT_MSG_NEWGEN:
            if _text(attrs.get(1)) == TABLE:  # attribute 1 names the table in every object message
                self._touched.add(f"{family} {TABLE}")
                if msg == NFT_MSG_NEWSET and _text(attrs.get(2)) == CALIBRATION_SET:
                    self._touched.add("calibration")
            return None
        touched, self._touched = self._touched, set()
        raw_pid = attrs.get(NFTA_GEN_PROC_PID)
        pid = struct.unpack("!I", raw_pid[:4])[0] if raw_pid else 0
        if "calibration" in touched and self._calibrating:
            self._calibrating = False
            self.own_pids.add(pid)
            touched.discard("calibration")
        touched.discard("calibration")
        if not touched or pid in self.own_pids:
            return None
        name = _text(attrs.get(NFTA_GEN_PROC_NAME))
        return f"nftables table {', '.join(sorted(touched))} changed by pid {pid}" + (f" ({name})" if name else "")
