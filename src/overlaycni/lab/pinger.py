"""Ping many destinations at once from one namespace (stdlib only).

``python3 -I -S pinger.py [--rounds 4] [--wait 1.0] DST...`` sends one ICMP
echo request to every destination over a raw socket (paced, so a burst does
not overflow the kernel's per-CPU backlog on the veth hops), collects the
replies (matched by identifier, sequence and source), re-sends to the silent
ones for a few rounds (waiting 1, 2, 3 ... x ``--wait``: a first contact can
wait up to 0.8 s for a proxy-ARP answer), and prints a JSON list of the
destinations that answered.
IPv6 destinations get ICMPv6 echo requests (type 128) over an ICMPv6 raw
socket, whose checksum the kernel fills in (RFC 3542 section 3.1); a run
may mix both families (one socket each).
``lab check`` runs it inside each pod's namespace: one process per source
pod instead of one ``ping`` per pair, which keeps a 200-pod matrix (39,800
pairs) to seconds. Kept free of overlaycni imports so it starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import time

PACE_BATCH = 16
PACE_PAUSE = 0.005


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


ECHO_REQUEST = {4: 8, 6: 128}
ECHO_REPLY = {4: 0, 6: 129}


def echo_request(ident: int, seq: int, payload: bytes, *, version: int = 4) -> bytes:
    """An ICMP echo request; for ICMPv6 the checksum stays 0 (the kernel sets it)."""
    kind = ECHO_REQUEST[version]
    if version == 6:
        return struct.pack("!BBHHH", kind, 0, 0, ident, seq) + payload
    header = struct.pack("!BBHHH", kind, 0, 0, ident, seq)
    return struct.pack("!BBHHH", kind, 0, checksum(header + payload), ident, seq) + payload


def _canonical(dst: str) -> tuple[str, int]:
    """(the address as recvfrom spells it, IP version)."""
    if ":" in dst:
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, dst)), 6
    return dst, 4


def _open(version: int, want: int) -> socket.socket:
    if version == 6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    # replies arrive while we still send: room for all of them (root may force it)
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), want)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
    return sock


def ping_all(dsts: list[str], *, rounds: int = 3, wait: float = 1.0, size: int = 56) -> set[str]:
    ident = os.getpid() & 0xFFFF
    payload = bytes(range(256))[:size] * (size // 256 + 1)
    payload = payload[:size]
    canon = {d: _canonical(d) for d in dsts}
    index = {canon[d][0]: i for i, d in enumerate(dsts)}
    by_canon = {canon[d][0]: d for d in dsts}
    reached: set[str] = set()
    errors: dict[str, int] = {}  # reason -> count
    want = max(1 << 20, 4096 * len(dsts))
    socks = {v: _open(v, want) for v in sorted({v for _, v in canon.values()})}
    version_of = {s.fileno(): v for v, s in socks.items()}
    try:
        for round_ in range(rounds):
            todo = [d for d in dsts if d not in reached]
            if not todo:
                break
            for n, d in enumerate(todo, 1):
                if n % PACE_BATCH == 0:
                    time.sleep(PACE_PAUSE)  # bursts beyond the per-CPU backlog (1000) would be dropped on the veths
                addr, version = canon[d]
                try:
                    socks[version].sendto(echo_request(ident, index[addr] & 0xFFFF, payload, version=version), (addr, 0))
                except OSError as exc:
                    reason = os.strerror(exc.errno) if exc.errno is not None else str(exc)
                    errors[reason] = errors.get(reason, 0) + 1  # e.g. no route: stays unreached
            deadline = time.monotonic() + wait * (1 + round_)
            while len(reached) < len(dsts):
                left = deadline - time.monotonic()
                ready = select.select(list(socks.values()), [], [], left)[0] if left > 0 else []
                if not ready:
                    break
                for sock in ready:
                    version = version_of[sock.fileno()]
                    packet, peer = sock.recvfrom(65535)
                    src = peer[0]
                    start = (packet[0] & 0x0F) * 4 if version == 4 else 0  # raw ICMPv6 sockets get no IP header
                    if len(packet) < start + 8:
                        continue
                    icmp_type, _, _, rid, rseq = struct.unpack("!BBHHH", packet[start : start + 8])
                    if icmp_type == ECHO_REPLY[version] and rid == ident and src in index and index[src] & 0xFFFF == rseq:
                        reached.add(by_canon[src])
    finally:
        for sock in socks.values():
            sock.close()
    if errors:
        print(json.dumps({"send_errors": errors}), file=sys.stderr)
    return reached


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--wait", type=float, default=1.0)
    ap.add_argument("dst", nargs="*")
    args = ap.parse_args()
    reached = ping_all(args.dst, rounds=args.rounds, wait=args.wait)
    json.dump(sorted(reached), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
