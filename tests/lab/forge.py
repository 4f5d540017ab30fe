"""Forged packets for attack tests (stdlib only; run inside a test's or lab's
own namespace, e.g. the external host: ``ip netns exec NS python3 forge.py``).

``plain SRC DST ID``                 an ICMP echo request from any source (raw
                                     IP, routed by the sender's table); IPv6
                                     addresses make it an ICMPv6 echo request
``vxlan NODE SRC DST ID [OUTER_SRC [INNER_DMAC]]``
                                     the same request wrapped in VXLAN (VNI
                                     4096) to NODE:4789; with OUTER_SRC the
                                     outer IPv4 header is forged too (raw),
                                     INNER_DMAC is the inner frame's
                                     destination (the receiving VTEP's MAC);
                                     SRC/DST may be IPv6 (inner ethertype
                                     0x86dd), the outer header stays IPv4
``udp NODE PORT SRC DST ID``         the bare IP packet as the payload of a
                                     UDP datagram to NODE:PORT
``arp IFACE OP SMAC SIP TIP``        one ARP frame (OP request or reply) sent
                                     on IFACE: sender SMAC/SIP, target TIP,
                                     to the broadcast MAC

Each ICMP request carries ID as its identifier (and IP ID), so a capture at
the target tells which one arrived. Every packet is sent three times.
"""

from __future__ import annotations

import socket
import struct
import sys

VNI = 4096
VXLAN_PORT = 4789


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: str, dst: str, proto: int, body: bytes, ident: int) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident & 0xFFFF, 0, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:] + body


def icmp_echo(src: str, dst: str, ident: int) -> bytes:
    payload = b"overlaycni-forged"
    head = struct.pack("!BBHHH", 8, 0, 0, ident & 0xFFFF, 1)
    body = struct.pack("!BBHHH", 8, 0, checksum(head + payload), ident & 0xFFFF, 1) + payload
    return ipv4(src, dst, socket.IPPROTO_ICMP, body, ident)


def is_ipv6(addr: str) -> bool:
    return ":" in addr


def icmp6_echo(src: str, dst: str, ident: int) -> bytes:
    """An ICMPv6 echo request (RFC 4443) in an IPv6 header (RFC 8200); the
    checksum covers the pseudo-header."""
    s6, d6 = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    body = struct.pack("!BBHHH", 128, 0, 0, ident & 0xFFFF, 1) + b"overlaycni-forged"
    pseudo = s6 + d6 + struct.pack("!I3xB", len(body), socket.IPPROTO_ICMPV6)
    body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
    return struct.pack("!IHBB", 0x60000000, len(body), socket.IPPROTO_ICMPV6, 64) + s6 + d6 + body


def echo(src: str, dst: str, ident: int) -> bytes:
    return icmp6_echo(src, dst, ident) if is_ipv6(src) else icmp_echo(src, dst, ident)


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def vxlan_frame(inner: bytes, inner_dmac: str) -> bytes:
    ethertype = 0x86DD if inner[0] >> 4 == 6 else 0x0800
    eth = mac(inner_dmac) + mac("02:00:00:00:00:02") + struct.pack("!H", ethertype)
    return struct.pack("!BBHI", 0x08, 0, 0, VNI << 8) + eth + inner


def send_raw(packet: bytes, dst: str) -> None:
    """Send a whole IP packet (header included: IPPROTO_RAW implies it for both families)."""
    s = socket.socket(socket.AF_INET6 if is_ipv6(dst) else socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for _ in range(3):
        s.sendto(packet, (dst, 0))


def main(argv: list[str]) -> None:
    kind, args = argv[0], argv[1:]
    if kind == "plain":
        src, dst, ident = args[0], args[1], int(args[2])
        send_raw(echo(src, dst, ident), dst)
    elif kind == "vxlan":
        node, src, dst, ident = args[0], args[1], args[2], int(args[3])
        outer_src = args[4] if len(args) > 4 else None
        frame = vxlan_frame(echo(src, dst, ident), args[5] if len(args) > 5 else "02:00:00:00:00:01")
        if outer_src is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for _ in range(3):
                s.sendto(frame, (node, VXLAN_PORT))
        else:  # UDP checksum 0: allowed over IPv4 (RFC 768), and what VXLAN senders commonly use
            udp = struct.pack("!HHHH", 49152 + ident % 1000, VXLAN_PORT, 8 + len(frame), 0) + frame
            send_raw(ipv4(outer_src, node, socket.IPPROTO_UDP, udp, ident), node)
    elif kind == "udp":
        node, port, src, dst, ident = args[0], int(args[1]), args[2], args[3], int(args[4])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(3):
            s.sendto(icmp_echo(src, dst, ident), (node, port))
    elif kind == "arp":
        iface, op, smac, sip, tip = args
        code = {"request": 1, "reply": 2}[op]
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, code, mac(smac), socket.inet_aton(sip),
                          b"\0" * 6, socket.inet_aton(tip))  # fmt: skip
        frame = b"\xff" * 6 + mac(smac) + struct.pack("!H", 0x0806) + arp
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind((iface, 0))
        for _ in range(3):
            s.send(frame)
    else:
        raise SystemExit(f"unknown kind {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
