"""NFLOG over nfnetlink: the messages, built and parsed (pure).

The policy table's log rules (``log group N prefix P``, see
``policy.flowlog``) hand the first packet of each flow they decide to the
kernel's nfnetlink_log, which sends it to whichever netlink socket bound
group N in that network namespace. The layout is the kernel's UAPI header
``include/uapi/linux/netfilter/nfnetlink_log.h`` (and ``nfnetlink.h`` for
the ``nfgenmsg`` header): every message is ``nlmsghdr`` + ``nfgenmsg``
(family, version 0, ``res_id`` = the group, big endian) + attributes. A
logged packet (``NFULNL_MSG_PACKET``) carries ``NFULA_PREFIX`` (the rule's
prefix, NUL-terminated), ``NFULA_PAYLOAD`` (the packet from its network
header, cut at the configured copy range), ``NFULA_SEQ`` (the group's
per-instance sequence number, when ``NFULNL_CFG_F_SEQ`` is set: a gap is an
exact count of messages the socket lost) and ``NFULA_TIMESTAMP`` (only when
the packet carries one; forwarded packets usually do not, so the reader's
receive time stands in). ``NFULNL_MSG_CONFIG`` binds a group and sets its
copy mode, batching (queue threshold, flush timeout, buffer size) and flags.

The rule side is nft(8): the ``log`` statement with ``group`` and
``prefix`` (at most 127 bytes), the ``limit`` statement and named limit
objects, and the set statement ``update @set { key limit ... }`` (a per-key
meter); their JSON is libnftables-json(5).

This module only turns bytes into values and back: the socket lives in
``linux/nflog.py`` (a kernel module, with the design note), and the fake
(``fake.FakeVerdictLog``) hands tests ``LoggedPacket`` values directly.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from .nlcodec import HDR, attributes
from .nlcodec import attr as _attr

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
MSG_PACKET = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
MSG_CONFIG = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NFNETLINK_V0 = 0

# enum nfulnl_attr_type
NFULA_PACKET_HDR, NFULA_TIMESTAMP, NFULA_PAYLOAD, NFULA_PREFIX, NFULA_SEQ = 1, 3, 9, 10, 12
# enum nfulnl_attr_config
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_NLBUFSIZ, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH, NFULA_CFG_FLAGS = 1, 2, 3, 4, 5, 6
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 0x02
NFULNL_CFG_F_SEQ = 0x0001

NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id (big endian, packed by hand)
TIMESTAMP = struct.Struct(">QQ")  # nfulnl_msg_packet_timestamp: sec, usec

# The policy table's named counter of packets its log rules decided without
# logging (per-source rate and node cap, ``policy.flowlog``).
RATELIMITED_COUNTER = "flowlog-ratelimited"
# Its per-source rate set: the packet path adds and times out its elements
# (``update @flowlog-rl``), so they are never drift (``policytable.repair``).
RATE_SET = "flowlog-rl"
RATE_SET_V6 = "flowlog-rl6"  # IPv6 sources, in a dual-stack cluster

PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}
_PORTS = {6, 17, 132}  # TCP, UDP, SCTP: source and destination port are the first 4 bytes


@dataclass(frozen=True)
class LoggedPacket:
    """One packet a log rule sent to userspace, decoded."""

    prefix: str
    src: IPv4Address | IPv6Address
    dst: IPv4Address | IPv6Address
    proto: str  # TCP, UDP, SCTP, ICMP, ICMPv6, or the IP protocol number
    dport: int | None  # None: no ports (ICMP), or the copy was cut before them
    time: float | None = None  # the kernel's timestamp, when the packet had one
    seq: int | None = None  # the group's sequence number (NFULNL_CFG_F_SEQ)


@dataclass(frozen=True)
class CaptureStats:
    """What a capture saw and what it could not: ``lost`` counts messages
    the socket dropped (sequence gaps: the receive buffer was full, ENOBUFS),
    ``malformed`` messages that did not decode, ``ratelimited`` packets the
    kernel rules decided without logging (per-source and global limits)."""

    received: int = 0
    lost: int = 0
    malformed: int = 0
    ratelimited: int = 0
    overruns: int = 0  # ENOBUFS reports (each stands for one or more lost messages)


# ----- building ---------------------------------------------------------------------


def config_request(
    group: int,
    *,
    seq: int,
    command: int | None = None,
    copy_range: int | None = None,
    qthresh: int | None = None,
    timeout_cs: int | None = None,
    nlbufsiz: int | None = None,
    flags: int | None = None,
) -> bytes:
    """An ``NFULNL_MSG_CONFIG`` request for ``group`` asking for an ACK.
    ``timeout_cs`` is the flush timeout in hundredths of a second."""
    if not 0 <= group <= 0xFFFF:
        raise ValueError(f"NFLOG group {group} is outside 0-65535")
    attrs = b""
    if command is not None:
        attrs += _attr(NFULA_CFG_CMD, struct.pack("=B", command))
    if copy_range is not None:
        attrs += _attr(NFULA_CFG_MODE, struct.pack(">IBx", copy_range, NFULNL_COPY_PACKET))
    if nlbufsiz is not None:
        attrs += _attr(NFULA_CFG_NLBUFSIZ, struct.pack(">I", nlbufsiz))
    if timeout_cs is not None:
        attrs += _attr(NFULA_CFG_TIMEOUT, struct.pack(">I", timeout_cs))
    if qthresh is not None:
        attrs += _attr(NFULA_CFG_QTHRESH, struct.pack(">I", qthresh))
    if flags is not None:
        attrs += _attr(NFULA_CFG_FLAGS, struct.pack(">H", flags))
    body = NFGEN.pack(socket.AF_UNSPEC, NFNETLINK_V0, socket.htons(group)) + attrs
    return HDR.pack(HDR.size + len(body), MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def packet_message(
    group: int, *, prefix: str, payload: bytes, seq: int | None = None, timestamp: float | None = None, family: int = 2
) -> bytes:
    """An ``NFULNL_MSG_PACKET`` as the kernel sends it (for tests of the decoder)."""
    attrs = _attr(NFULA_PACKET_HDR, struct.pack(">HBx", 0x0800, 2))
    if timestamp is not None:
        sec = int(timestamp)
        attrs += _attr(NFULA_TIMESTAMP, TIMESTAMP.pack(sec, round((timestamp - sec) * 1e6)))
    attrs += _attr(NFULA_PAYLOAD, payload)
    attrs += _attr(NFULA_PREFIX, prefix.encode() + b"\0")
    if seq is not None:
        attrs += _attr(NFULA_SEQ, struct.pack(">I", seq))
    body = NFGEN.pack(family, NFNETLINK_V0, socket.htons(group)) + attrs
    return HDR.pack(HDR.size + len(body), MSG_PACKET, 0, 0, 0) + body


# ----- parsing ----------------------------------------------------------------------


def decode_packet(msg: bytes) -> LoggedPacket | None:
    """A logged packet from one ``NFULNL_MSG_PACKET`` message; None when it
    carries no IP header this decoder understands (counted as malformed)."""
    attrs = attributes(msg, HDR.size + NFGEN.size)
    payload = attrs.get(NFULA_PAYLOAD)
    if payload is None:
        return None
    headers = decode_ip(payload)
    if headers is None:
        return None
    src, dst, proto, dport = headers
    prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("ascii", "replace")
    when = None
    if (raw := attrs.get(NFULA_TIMESTAMP)) is not None and len(raw) >= TIMESTAMP.size:
        sec, usec = TIMESTAMP.unpack_from(raw)
        when = sec + usec / 1e6
    seq = struct.unpack(">I", attrs[NFULA_SEQ][:4])[0] if len(attrs.get(NFULA_SEQ, b"")) >= 4 else None
    return LoggedPacket(prefix, src, dst, proto, dport, when, seq)


def decode_ip(payload: bytes) -> tuple[IPv4Address | IPv6Address, IPv4Address | IPv6Address, str, int | None] | None:
    """(source, destination, protocol, destination port) of an IPv4 or IPv6
    packet; IPv6 extension headers are not walked (the next header is taken
    as the protocol)."""
    if not payload:
        return None
    version = payload[0] >> 4
    src: IPv4Address | IPv6Address
    dst: IPv4Address | IPv6Address
    if version == 4 and len(payload) >= 20:
        ihl = (payload[0] & 0x0F) * 4
        if ihl < 20:
            return None
        number = payload[9]
        src, dst = IPv4Address(payload[12:16]), IPv4Address(payload[16:20])
        first_fragment = struct.unpack_from(">H", payload, 6)[0] & 0x1FFF == 0
        l4 = ihl if first_fragment else None
    elif version == 6 and len(payload) >= 40:
        number = payload[6]
        src, dst = IPv6Address(payload[8:24]), IPv6Address(payload[24:40])
        l4 = 40
    else:
        return None
    dport = None
    if number in _PORTS and l4 is not None and len(payload) >= l4 + 4:
        dport = struct.unpack_from(">H", payload, l4 + 2)[0]
    return src, dst, PROTOCOLS.get(number, str(number)), dport


class SeqTracker:
    """Counts messages lost between the kernel and the socket from the
    group's sequence numbers (32 bits, wrapping)."""

    def __init__(self) -> None:
        self.next: int | None = None
        self.lost = 0

    def see(self, seq: int | None) -> None:
        if seq is None:
            return
        if self.next is not None:
            gap = (seq - self.next) & 0xFFFFFFFF
            if gap < 0x80000000:  # a jump backwards is a re-bound group (a new instance), not a loss
                self.lost += gap
        self.next = (seq + 1) & 0xFFFFFFFF
