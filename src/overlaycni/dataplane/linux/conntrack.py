"""Conntrack entries of a released pod address (ctnetlink, raw).

Design note. When a pod's address is released, the connection tracking
entries that name it must go too: otherwise the next pod given that address
inherits the old pod's flows (an ``established`` entry lets its packets past
the NetworkPolicy table's ``ct state established,related accept``, and a
NAT binding sends them to the wrong place). Entries live in the namespace
whose hooks saw the packets: for a pod, its node's namespace, where every
one of its packets is forwarded (either family: a dual-stack pod's IPv6
address is flushed too, in one walk of both families' entries, each deleted
with its own family; see ``flush_addresses``). ``flush_address(ip)`` removes every entry
whose original tuple has ``ip`` as source (the pod's own connections, SNATed
or not) or destination (connections to the pod), then deletes each by its
original tuple (and zone). An entry that expired meanwhile (``ENOENT``)
counts as gone.

Cost: a conntrack dump walks the kernel's whole conntrack hash, which is
shared by every namespace (``nf_conntrack_buckets``, 262,144 here): 10-20 ms
per dump whatever the namespace holds. So the number of walks follows the
namespace's own entry count (``nf_conntrack_count``, a per-namespace file
kept open from the node namespace): none when it is 0; one unfiltered dump,
filtered here, up to ``SMALL_TABLE`` entries; otherwise two dumps filtered
by the kernel (``CTA_FILTER``, Linux 5.8+: source, then destination), each
entry checked again here, so a kernel that ignores the filter costs time,
never a wrong delete. A batch of DELs (``flush_addresses``) shares one
unfiltered walk while the table holds up to ``SMALL_TABLE`` entries per
address. The socket is opened in the node namespace by the
data plane's worker and then used on the caller's thread (under this
adapter's lock): a DEL's flush never holds up the ADDs queued on the worker. Rejected: the ``conntrack``
binary (a fork per DEL, and the same dumps), pyroute2's ``NFCTSocket``
(the same netlink messages at ~3x the cost through its asyncio loop), and a
filtered kernel flush (``IPCTNL_MSG_CT_DELETE`` without a tuple accepts only
mark/zone filters, not addresses). Measured and rejected: walking the table
while the veth is deleted (NEW events heard from before the walk to after
the delete would catch what the walk missed): the walk is 9 ms of the
kernel's own (the same with or without ``CTA_FILTER``, from a kept-open
socket: socket and namespace cost nothing), during which RCU grace periods
cannot end, and a veth delete is a series of grace periods: overlapped, the
delete took 32 ms instead of 14 (the walk still 9), so a DEL got slower.
What the agent does instead: a DEL is answered once the veth is gone and
its address is held back until one walk flushes every address DELeted
meanwhile, run when the agent is idle or before an ADD needs the address
(``agent.quarantine``).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv6Address

from ...errors import DataplaneError, PermissionDenied
from ..nlcodec import attr as _attr
from ..nlcodec import attributes as _attrs
from .rtnl import ERR, HDR, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 1, 2
NLA_F_NESTED = 0x8000
CTA_TUPLE_ORIG, CTA_ZONE, CTA_FILTER = 1, 18, 25
CTA_TUPLE_IP = 1
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_IP_V6_SRC, CTA_IP_V6_DST = 3, 4
CTA_FILTER_ORIG_FLAGS = 1
FILTER_IP_SRC, FILTER_IP_DST = 1 << 0, 1 << 1
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big endian, 0)
NO_CONNTRACK = (errno.EOPNOTSUPP, errno.EPROTONOSUPPORT, errno.ENOENT)
TIMEOUT = 10.0  # a dump of a very large table; never a hang
SMALL_TABLE = 1000  # entries: one unfiltered walk (parsed here) is cheaper than a second walk
COUNT_FILE = "/proc/sys/net/netfilter/nf_conntrack_count"  # per namespace (of the opener)


def _nested(kind: int, *children: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(children))


def _addresses(orig: bytes) -> tuple[bytes | None, bytes | None]:
    """(source, destination) of a CTA_TUPLE_ORIG payload, as raw bytes (4 or 16) each."""
    ip = _attrs(orig, 0).get(CTA_TUPLE_IP)
    if ip is None:
        return None, None
    fields = _attrs(ip, 0)
    return fields.get(CTA_IP_V4_SRC, fields.get(CTA_IP_V6_SRC)), fields.get(CTA_IP_V4_DST, fields.get(CTA_IP_V6_DST))


class LinuxConntrack:
    """One kept-open NETLINK_NETFILTER socket in the namespace it was created in."""

    def __init__(self) -> None:
        """Call it inside the namespace whose table it flushes."""
        self._lock = threading.Lock()
        self.seq = 0
        self._count_fd: int | None = None
        try:
            self._count_fd = os.open(COUNT_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass  # conntrack not loaded (yet): the count is unknown, the flush walks twice
        self.sock: socket.socket | None
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        except PermissionError:
            raise PermissionDenied("netlink (conntrack): needs root / CAP_NET_ADMIN") from None
        except OSError as exc:
            if exc.errno not in NO_CONNTRACK:
                raise DataplaneError(f"conntrack netlink socket: {exc.strerror}") from None
            self.sock = None  # no nfnetlink in this kernel: no conntrack entries either
            return
        self.sock.settimeout(TIMEOUT)
        self.sock.bind((0, 0))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self._count_fd is not None:
            os.close(self._count_fd)

    def count(self) -> int | None:
        """Entries in the namespace's table (None: unknown)."""
        if self._count_fd is None:
            return None
        try:
            return int(os.pread(self._count_fd, 32, 0))
        except (OSError, ValueError):
            return None

    def _header(self, kind: int, flags: int, body: bytes, *, family: int = socket.AF_INET) -> tuple[int, bytes]:
        self.seq = (self.seq + 1) & 0x7FFFFFFF
        msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | kind
        payload = NFGENMSG.pack(family, 0, 0) + body
        return self.seq, HDR.pack(HDR.size + len(payload), msg_type, flags, self.seq, 0) + payload

    def _messages(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """(type, payload after the nfgenmsg) of the answers to ``seq``; raises on an error."""
        assert self.sock is not None
        while True:
            data = self.sock.recv(1 << 20)
            off = 0
            while off + HDR.size <= len(data):
                length, msg_type, _flags, got_seq, _pid = HDR.unpack_from(data, off)
                if length < HDR.size:
                    return
                body = data[off + HDR.size : off + length]
                off += (length + 3) & ~3
                if got_seq != seq:
                    continue  # an answer to an earlier request that gave up
                if msg_type == NLMSG_DONE:
                    return
                if msg_type == NLMSG_ERROR:
                    (code,) = ERR.unpack_from(body, 0)
                    if code:
                        raise OSError(-code, "conntrack netlink")
                    return
                yield msg_type, body[NFGENMSG.size :]

    def _dump(self, ips: frozenset[bytes], flag: int, *, family: int = socket.AF_INET) -> list[tuple[bytes, int]]:
        """The delete keys (original tuple, zone) of the entries whose original
        source (``FILTER_IP_SRC``), destination (``FILTER_IP_DST``) or either
        (0: an unfiltered dump) is one of ``ips`` (4 or 16 raw bytes each; a
        filtered dump takes exactly one, IPv4), each with its entry's family.
        ``family`` AF_UNSPEC: the entries of both families in one walk."""
        body = b""
        if flag:
            (ip,) = ips
            field = CTA_IP_V4_SRC if flag == FILTER_IP_SRC else CTA_IP_V4_DST  # IPv4 only (see flush_addresses)
            body = _nested(CTA_TUPLE_ORIG, _nested(CTA_TUPLE_IP, _attr(field, ip)))
            body += _nested(CTA_FILTER, _attr(CTA_FILTER_ORIG_FLAGS, struct.pack("=I", flag)))
        seq, msg = self._header(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, body, family=family)
        assert self.sock is not None
        self.sock.sendall(msg)
        out: list[tuple[bytes, int]] = []
        for _type, payload in self._messages(seq):
            attrs = _attrs(payload, 0)
            orig = attrs.get(CTA_TUPLE_ORIG)
            if orig is None:
                continue
            src, dst = _addresses(orig)
            if not ((src in ips and flag != FILTER_IP_DST) or (dst in ips and flag != FILTER_IP_SRC)):
                continue  # unfiltered, or a kernel that ignores the filter (older than 5.8)
            zone = attrs.get(CTA_ZONE)
            entry_family = socket.AF_INET6 if len(src or dst or b"") == 16 else socket.AF_INET
            out.append((_nested(CTA_TUPLE_ORIG, orig) + (_attr(CTA_ZONE, zone) if zone is not None else b""), entry_family))
        return out

    def _delete(self, entry: bytes, *, family: int = socket.AF_INET) -> bool:
        seq, msg = self._header(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, entry, family=family)
        assert self.sock is not None
        self.sock.sendall(msg)
        try:
            for _ in self._messages(seq):
                pass
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False  # expired meanwhile
            raise
        return True

    def flush_address(self, ip: IPv4Address | IPv6Address) -> int:
        """Delete every entry whose original tuple names ``ip``; the number deleted."""
        return self.flush_addresses([ip])

    def flush_addresses(self, ips: Sequence[IPv4Address | IPv6Address]) -> int:
        """``flush_address`` for several addresses (a batch of DELs): one
        unfiltered walk matches them all while the namespace's table is
        small (up to ``SMALL_TABLE`` entries per address); a larger table
        gets two filtered walks per address. With any IPv6 address (a
        dual-stack batch): one unfiltered walk of both families' entries
        (``AF_UNSPEC``), whatever the table's size, each entry deleted with
        its own family: the kernel's IPv6 address filter is inverted on
        Linux 6.18 (measured: a ``CTA_FILTER`` dump of ``AF_INET6`` with
        source ``a`` answers every entry whose source is *not* ``a``, and
        one for an address nobody uses answers them all; IPv4 filters
        match), so a large table costs a dual-stack DEL one full walk
        parsed here, more than the filtered walks of IPv4 alone. (Taking
        the complement would be wrong on a kernel that fixes the filter.)"""
        wanted = sorted(set(ips), key=lambda ip: (ip.version, int(ip)))
        if self.sock is None or not wanted:
            return 0
        count = self.count()
        if count == 0:
            return 0
        what = ", ".join(map(str, wanted[:5])) + (", ..." if len(wanted) > 5 else "")
        with self._lock:
            try:
                dual = any(ip.version == 6 for ip in wanted)
                if dual or (count is not None and count <= SMALL_TABLE * len(wanted)):
                    found = self._dump(frozenset(ip.packed for ip in wanted), 0,
                                       family=socket.AF_UNSPEC if dual else socket.AF_INET)  # fmt: skip
                else:
                    found = [e for ip in wanted for flag in (FILTER_IP_SRC, FILTER_IP_DST)
                             for e in self._dump(frozenset([ip.packed]), flag)]
                return sum(self._delete(e, family=family) for e, family in dict.fromkeys(found))
            except TimeoutError:
                raise DataplaneError(f"conntrack entries of {what}: the kernel did not answer in {TIMEOUT:.0f} s") from None
            except OSError as exc:
                if exc.errno in NO_CONNTRACK:
                    return 0  # conntrack is not loaded in this namespace: nothing to flush
                raise DataplaneError(f"conntrack entries of {what}: {exc.strerror or exc}") from None
