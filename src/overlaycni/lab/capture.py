"""Packet captures inside lab namespaces (tcpdump), and their parsing.

A capture runs ``timeout T tcpdump -c N -U -w FILE`` inside one lab
namespace, so it is bounded both in time and in packets; ``start`` returns
once tcpdump reports it is listening, ``stop`` interrupts it and reads the
file back with ``tcpdump -n -r`` (reading a file sends no packet). The
parser is pure: tcpdump prints a VXLAN packet as the outer line followed by
the inner packet on the next line without a timestamp. With ``vxlan=True``
the file is read with ``-T vxlan``: tcpdump otherwise picks a decoder by
port, and an outer source port such as 49152 is taken for another protocol.
IPv6 packets (``IP6`` lines, ``ICMP6, echo request``) parse alike, inside
VXLAN too (the outer header stays IPv4: one VXLAN device carries both
families over the IPv4 underlay).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

from ..errors import DataplaneError
from . import netns

_TS = re.compile(r"^\d{2}:\d{2}:\d{2}\.\d+ ")
_IP = re.compile(r"^IP6? (\S+) > (\S+?): (.*)$")
_VNI = re.compile(r"VXLAN, flags \[I\] \(0x08\), vni (\d+)")
_LEN = re.compile(r"length (\d+)\s*$")


IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True)
class Packet:
    """One captured IP packet (IPv4 or IPv6); for VXLAN, ``outer_*`` and
    ``vni`` are set and ``src``/``dst``/``what`` describe the inner packet."""

    src: IPAddress
    dst: IPAddress
    what: str  # e.g. "ICMP echo request, id 7, seq 1, length 85" or "ICMP6, echo request, id 7, seq 1, length 85"
    outer_src: IPAddress | None = None
    outer_dst: IPAddress | None = None
    vni: int | None = None
    text: str = ""

    @property
    def version(self) -> int:
        return self.src.version

    @property
    def icmp_request(self) -> bool:
        return self.what.startswith(("ICMP echo request", "ICMP6, echo request"))

    @property
    def icmp_reply(self) -> bool:
        return self.what.startswith(("ICMP echo reply", "ICMP6, echo reply"))

    @property
    def length(self) -> int | None:
        m = _LEN.search(self.what)
        return int(m.group(1)) if m else None


def _addr(text: str) -> IPAddress | None:
    """``10.0.0.1``, ``fd00::4``, or either with ``.PORT`` (tcpdump's
    address + port)."""
    for candidate in (text, text.rpartition(".")[0]):
        try:
            return ip_address(candidate)
        except ValueError:
            continue
    return None


def _ip_line(line: str) -> tuple[IPAddress, IPAddress, str] | None:
    m = _IP.match(line)
    if not m:
        return None
    src, dst = _addr(m.group(1)), _addr(m.group(2))
    if src is None or dst is None:
        return None
    return src, dst, m.group(3)


def parse_tcpdump(text: str) -> list[Packet]:
    """Packets from ``tcpdump -n -r`` output (with timestamps)."""
    records: list[list[str]] = []
    for line in text.splitlines():
        if _TS.match(line):
            records.append([line[_TS.match(line).end() :]])  # type: ignore[union-attr]
        elif records and line.strip():
            records[-1].append(line.strip())
    out: list[Packet] = []
    for rec in records:
        first = _ip_line(rec[0])
        if first is None:
            continue
        src, dst, what = first
        vni = _VNI.search(what)
        if vni and len(rec) > 1:
            inner = _ip_line(rec[1])
            if inner is None:
                continue  # e.g. ARP inside VXLAN
            out.append(
                Packet(src=inner[0], dst=inner[1], what=inner[2], outer_src=src, outer_dst=dst, vni=int(vni.group(1)), text="\n".join(rec))
            )
        elif not vni:
            out.append(Packet(src=src, dst=dst, what=what, text=rec[0]))
    return out


class Capture:
    """``with Capture(ns, "eth0", "icmp", workdir=...) as cap: ...`` then
    ``cap.packets``."""

    def __init__(
        self, ns: str, iface: str, bpf: str, *, workdir: Path, max_packets: int = 100000, timeout: float = 120, vxlan: bool = False
    ) -> None:
        self.ns, self.iface, self.bpf = ns, iface, bpf
        self.vxlan = vxlan  # decode UDP as VXLAN whatever its ports (tcpdump guesses by port otherwise)
        self.workdir = workdir
        self.max_packets, self.timeout = max_packets, timeout
        self.packets: list[Packet] = []
        self.text = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._file = workdir / f"cap-{ns}-{iface}-{os.getpid()}-{id(self)}.pcap"
        self._err = self._file.with_suffix(".err")

    def start(self) -> Capture:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = netns.in_ns(
            self.ns,
            ["timeout", str(int(self.timeout)), "tcpdump", "--immediate-mode", "-B", "8192", "-i", self.iface, "-n", "-U", "-c", str(self.max_packets),
             "-w", str(self._file), *self.bpf.split()],
        )  # fmt: skip
        with open(self._err, "wb") as err:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 10
        while "listening on" not in self._err.read_text(errors="replace"):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._kill()
                raise DataplaneError(f"tcpdump in {self.ns} did not start: {self._err.read_text(errors='replace').strip()}")
            time.sleep(0.02)
        return self

    def _kill(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def stop(self) -> list[Packet]:
        time.sleep(0.1)  # let the last packets reach the capture buffer
        self._kill()
        if self._file.exists():
            decode = ["-T", "vxlan"] if self.vxlan else []
            proc = netns.run(["tcpdump", "-n", *decode, "-r", str(self._file)], check=False)
            self.text = proc.stdout
            self.packets = parse_tcpdump(self.text)
        for f in (self._file, self._err):
            f.unlink(missing_ok=True)
        return self.packets

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
