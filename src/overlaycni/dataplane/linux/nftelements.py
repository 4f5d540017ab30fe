"""Set and map element updates straight over nfnetlink, without libnftables.

Design note. libnftables fills its cache before it runs a command: for an
``add element`` that is every table, chain, set and object of the ruleset
(nft 1.0.6, ``src/cache.c``: ``NFT_CACHE_TABLE | NFT_CACHE_CHAIN |
NFT_CACHE_SET | NFT_CACHE_OBJECT``), so one element costs a dump of the
whole ruleset: measured in a namespace holding the 10,000-pod / 2,500-policy
policy table (about 2,750 sets), one element add took ~20 ms, against ~1 ms
at 1,000 / 250. The NetworkPolicy table changes by elements on every pod and
label event, so those transactions go here instead: one nfnetlink batch
(``NFNL_MSG_BATCH_BEGIN``, one ``NFT_MSG_DELSETELEM`` / ``NFT_MSG_NEWSETELEM``
per set and verb, ``NFNL_MSG_BATCH_END``) that the kernel applies as one
transaction, all or nothing, like ``nft -f`` would. Every message asks for an
acknowledgement; the kernel answers a batch while ``sendmsg`` runs, so the
answers are read (without waiting) and every message must have one.

Only what can be encoded without the set's declaration is taken: element
commands (``add``/``delete element``) whose values are IPv4 or IPv6
addresses, an address . port concatenation (each field padded to 32-bit
registers: the port big-endian, then two bytes of padding) or an
address-keyed map entry whose value is a ``jump``. Anything else (other commands, other element types, a
batch larger than ``MAX_ELEMENTS``) returns None from ``encode`` and goes to
libnftables as before. Wire format: ``linux/netfilter/nf_tables.h`` and
``nfnetlink.h`` (the uapi headers), netlink(7).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from ipaddress import ip_address
from typing import Any

from ..nlcodec import attr, nested

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 0x2
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA = 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFT_JUMP = -3
FAMILIES = {"inet": 1, "ip": 2, "arp": 3, "ip6": 10}  # NFPROTO_*
MAX_ELEMENTS = 4096  # larger updates (a set added whole) go to libnftables
_CHUNK = 256  # elements per message, well under a page each

Batch = list[tuple[int, int, str, str, list[bytes]]]  # (msg type, nfproto, table, set, encoded elements)


def _string(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def _address(value: Any) -> bytes | None:
    """An IPv4 or IPv6 address in network order; None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        return ip_address(value).packed
    except ValueError:
        return None


def _key(value: Any) -> bytes | None:
    """The key bytes of one element value; None: not ours to encode."""
    if isinstance(value, dict) and set(value) == {"concat"} and len(value["concat"]) == 2:
        ip, port = value["concat"]
        packed = _address(ip)
        if packed is None or type(port) is not int or not 0 <= port <= 0xFFFF:
            return None
        return packed + struct.pack("!H", port) + b"\0\0"
    return _address(value)


def _element(value: Any, *, delete: bool) -> bytes | None:
    if isinstance(value, list) and len(value) == 2:  # a map entry [key, verdict]
        key, verdict = value
        packed = _address(key)
        if packed is None:
            return None
        if delete:
            return nested(NFTA_LIST_ELEM, nested(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, packed)))
        target = verdict.get("jump", {}).get("target") if isinstance(verdict, dict) and set(verdict) == {"jump"} else None
        if not isinstance(target, str):
            return None
        data = nested(
            NFTA_DATA_VERDICT, attr(NFTA_VERDICT_CODE, struct.pack("!i", NFT_JUMP)), _string(NFTA_VERDICT_CHAIN, target)
        )
        return nested(
            NFTA_LIST_ELEM, nested(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, packed)), nested(NFTA_SET_ELEM_DATA, data)
        )
    packed = _key(value)
    if packed is None:
        return None
    return nested(NFTA_LIST_ELEM, nested(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, packed)))


def encode(commands: list[dict[str, Any]]) -> Batch | None:
    """The batch of ``commands`` when every one is an element add or delete
    of values this module encodes; None otherwise (libnftables runs them)."""
    out: Batch = []
    total = 0
    for cmd in commands:
        if len(cmd) != 1:
            return None
        ((verb, body),) = cmd.items()
        if verb not in ("add", "delete") or set(body) != {"element"}:
            return None
        obj = body["element"]
        family = FAMILIES.get(obj.get("family"))
        if family is None or not isinstance(obj.get("table"), str) or not isinstance(obj.get("name"), str):
            return None
        elems = []
        for value in obj.get("elem", []):
            e = _element(value, delete=verb == "delete")
            if e is None:
                return None
            elems.append(e)
        total += len(elems)
        if total > MAX_ELEMENTS:
            return None
        kind = NFT_MSG_DELSETELEM if verb == "delete" else NFT_MSG_NEWSETELEM
        out.append((kind, family, obj["table"], obj["name"], elems))
    return out


def _message(kind: int, flags: int, seq: int, family: int, res_id: int, payload: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + payload
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


class NftElements:
    """An nfnetlink socket of the current network namespace (create it on
    the namespace's worker thread) that applies element batches."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # acknowledgements without the request echoed
        self.sock.bind((0, 0))
        self.seq = 0

    def apply(self, batch: Batch) -> None:
        """Run ``batch`` as one transaction; OSError (with the kernel's errno) when refused."""
        if not batch:
            return
        self.seq += 1
        first = self.seq
        msgs = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first, 0, NFNL_SUBSYS_NFTABLES, b"")]
        acks = 0
        for kind, family, table, name, elems in batch:
            for i in range(0, len(elems), _CHUNK):
                self.seq += 1
                flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0)
                payload = (
                    _string(NFTA_SET_ELEM_LIST_TABLE, table)
                    + _string(NFTA_SET_ELEM_LIST_SET, name)
                    + nested(NFTA_SET_ELEM_LIST_ELEMENTS, *elems[i : i + _CHUNK])
                )
                msgs.append(_message((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, self.seq, family, 0, payload))
                acks += 1
        self.seq += 1
        msgs.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, self.seq, 0, NFNL_SUBSYS_NFTABLES, b""))
        self.sock.sendall(b"".join(msgs))
        # nfnetlink runs the batch inside sendmsg: every answer is queued by now
        failure = 0
        while True:
            try:
                data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            offset = 0
            while offset + 20 <= len(data):
                length, kind, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
                if kind == NLMSG_ERROR and first <= seq <= self.seq:
                    (code,) = struct.unpack_from("=i", data, offset + 16)
                    acks -= 1 if seq != first else 0
                    failure = failure or -code
                offset += max(length + (-length % 4), 20)
        if failure:
            raise OSError(failure, f"element update refused: {os.strerror(failure)}")
        if acks:
            raise OSError(errno.EPROTO, f"element update: {acks} message(s) not acknowledged")

    def close(self) -> None:
        self.sock.close()
