"""Forged packets for attack tests (stdlib only; run inside a lab's external host).

``python3 forge.py plain SRC DST ID``      an ICMP echo request from any source
                                          (raw IP, routed by the sender's table)
``python3 forge.py vxlan NODE SRC DST ID``  the same request wrapped in VXLAN
                                          (VNI 4096) to NODE:4789
``python3 forge.py udp NODE PORT SRC DST ID`` the bare IP packet as the payload
                                          of a UDP datagram to NODE:PORT

Each packet's ICMP identifier is ID, so a capture at the target can tell
which one arrived.
"""

from __future__ import annotations

import socket
import struct
import sys


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_echo(ident: int) -> bytes:
    payload = b"overlaycni-forged"
    head = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    return struct.pack("!BBHHH", 8, 0, checksum(head + payload), ident, 1) + payload


def ip_packet(src: str, dst: str, ident: int) -> bytes:
    body = icmp_echo(ident)
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident, 0, 64, socket.IPPROTO_ICMP, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    head = head[:10] + struct.pack("!H", checksum(head)) + head[12:]
    return head + body


def main(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "plain":
        src, dst, ident = argv[1], argv[2], int(argv[3])
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        for _ in range(3):
            s.sendto(ip_packet(src, dst, ident), (dst, 0))
    elif kind == "vxlan":
        node, src, dst, ident = argv[1], argv[2], argv[3], int(argv[4])
        vxlan = struct.pack("!BBHI", 0x08, 0, 0, 4096 << 8)
        eth = bytes.fromhex("020000000001" "020000000002") + struct.pack("!H", 0x0800)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(3):
            s.sendto(vxlan + eth + ip_packet(src, dst, ident), (node, 4789))
    elif kind == "udp":
        node, port, src, dst, ident = argv[1], int(argv[2]), argv[3], argv[4], int(argv[5])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(3):
            s.sendto(ip_packet(src, dst, ident), (node, port))
    else:
        raise SystemExit(f"unknown kind {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
