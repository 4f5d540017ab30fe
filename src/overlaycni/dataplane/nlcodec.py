"""The netlink wire format shared by every raw netlink codec of the project
(rtnetlink on the pod path, ``linux/rtnl.py``; its kernel monitor,
``linux/monitor.py``; nfnetlink for NFLOG, ``nflog.py``, set elements,
``linux/nftelements.py``, and conntrack, ``linux/conntrack.py``).

A message is a ``struct nlmsghdr`` (length, type, flags, sequence, port id)
and a family header, then attributes: each a ``struct nlattr`` (length
including its 4-byte head, type) and a payload padded to 4 bytes; the two
top bits of the type are flags (``NLA_F_NESTED``, ``NLA_F_NET_BYTEORDER``).
Source: the kernel's ``include/uapi/linux/netlink.h`` and
Documentation/userspace-api/netlink/intro.rst.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
NLA = struct.Struct("=HH")  # nlattr: len, type
ERR = struct.Struct("=i")  # nlmsgerr's error (negative errno; 0: an ACK)
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # the type without its two flag bits


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    length = NLA.size + len(payload)
    return NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def attributes(buf: bytes, off: int, end: int | None = None) -> dict[int, bytes]:
    """The attributes in ``buf`` from ``off`` to ``end`` (default: its end;
    one message inside a multicast datagram gives its own end), by type
    without flag bits. A truncated attribute ends the walk."""
    end = len(buf) if end is None else end
    out: dict[int, bytes] = {}
    while off + NLA.size <= end:
        length, kind = NLA.unpack_from(buf, off)
        if length < NLA.size or off + length > end:
            break
        out[kind & NLA_TYPE_MASK] = buf[off + NLA.size : off + length]
        off += (length + 3) & ~3
    return out


def iter_messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, nlmsg seq, message) of each netlink message in one datagram."""
    off, end = 0, len(data)
    while off + HDR.size <= end:
        length, kind, _flags, seq, _pid = HDR.unpack_from(data, off)
        if length < HDR.size or off + length > end:
            return  # truncated: the kernel never sends this; a broken datagram ends here
        yield kind, seq, data[off : off + length]
        off += (length + 3) & ~3


def error_code(msg: bytes) -> int:
    """The errno of an ``NLMSG_ERROR`` message (0: an ACK)."""
    return -ERR.unpack_from(msg, HDR.size)[0]
