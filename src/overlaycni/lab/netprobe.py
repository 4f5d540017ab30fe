"""Probe servers and probes for ``lab probe`` (stdlib only, run inside pods).

``python3 -I -S netprobe.py serve PORT...`` serves TCP and UDP on every PORT
of the pod (all addresses, both families: one IPv6 socket per port and
protocol with ``IPV6_V6ONLY`` off takes IPv4 too, as IPv4-mapped addresses,
RFC 3493 section 5.3; IPv4 only where the pod has no IPv6): a TCP client
gets ``ok`` on connect, a UDP datagram gets ``ok`` back, so a probe can tell
"connected" from "dropped". Probes take IPv4 and IPv6 addresses.
It prints ``{"event": "ready"}`` once every socket is bound.

``python3 -I -S netprobe.py probe --protocol tcp|udp --port N [--timeout S]
IP...`` probes every IP at once (one thread each) and prints a JSON list of
booleans in the same order: TCP connected and read ``ok``; UDP got ``ok``
back within the timeout (three tries, a third of the timeout each).

Kept free of overlaycni imports so it starts fast: ``lab probe`` runs one
probe process per source pod.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import selectors
import socket
import sys
import time


def listen(kind: int, port: int) -> socket.socket:
    """A socket bound to every address of both families on ``port`` (IPv4
    only if IPv6 is not available)."""
    try:
        s = socket.socket(socket.AF_INET6, kind)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address: tuple[str, int] = ("::", port)
    except OSError:
        s = socket.socket(socket.AF_INET, kind)
        address = ("0.0.0.0", port)
    if kind == socket.SOCK_STREAM:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(address)
    return s


def serve(ports: list[int]) -> None:
    sel = selectors.DefaultSelector()
    for port in ports:
        t = listen(socket.SOCK_STREAM, port)
        t.listen(256)
        t.setblocking(False)
        sel.register(t, selectors.EVENT_READ, "tcp")
        u = listen(socket.SOCK_DGRAM, port)
        u.setblocking(False)
        sel.register(u, selectors.EVENT_READ, "udp")
    print(json.dumps({"event": "ready", "ports": ports}), flush=True)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            try:
                if key.data == "tcp":
                    c, _ = s.accept()  # type: ignore[union-attr]
                    c.setblocking(False)
                    try:
                        c.send(b"ok")
                    except OSError:
                        pass
                    sel.register(c, selectors.EVENT_READ, "conn")
                elif key.data == "conn":
                    if not s.recv(64):  # type: ignore[union-attr]
                        sel.unregister(s)
                        s.close()  # type: ignore[union-attr]
                else:
                    _, addr = s.recvfrom(64)  # type: ignore[union-attr]
                    s.sendto(b"ok", addr)  # type: ignore[union-attr]
            except BlockingIOError:
                pass
            except OSError:
                try:
                    sel.unregister(s)
                    s.close()  # type: ignore[union-attr]
                except (KeyError, ValueError, OSError):
                    pass


def probe_tcp(ip: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(2) == b"ok"
    except OSError:
        return False


def probe_udp(ip: str, port: int, timeout: float) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout / 3)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                s.sendto(b"hi", (ip, port))
                data, _ = s.recvfrom(64)
                return data == b"ok"
            except TimeoutError:
                continue
            except OSError:
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))  # e.g. ICMP refused while starting
    return False


def main() -> int:
    ap = argparse.ArgumentParser(prog="netprobe")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("ports", type=int, nargs="+")
    p = sub.add_parser("probe")
    p.add_argument("--protocol", choices=("tcp", "udp"), default="tcp")
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("ips", nargs="*")
    args = ap.parse_args()
    if args.cmd == "serve":
        serve(args.ports)
        return 0
    fn = probe_tcp if args.protocol == "tcp" else probe_udp
    if not args.ips:
        print("[]")
        return 0
    with cf.ThreadPoolExecutor(len(args.ips)) as ex:
        results = list(ex.map(lambda ip: fn(ip, args.port, args.timeout), args.ips))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
