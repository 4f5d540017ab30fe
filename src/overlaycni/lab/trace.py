"""``lab trace SRC DST`` and ``lab tour``: one real packet, followed.

Trace asks the kernel for the routes (``ip -j route get`` in the pod and in
its node), then sends one echo request with a payload size nobody else uses
while tcpdump listens at every hop: the source pod's ``eth0``, the source
node's underlay, the destination node's underlay and the destination pod's
``eth0`` (or the external host's). What is printed is what was captured:
inner and outer addresses, the VNI, and for a destination outside the pod
CIDR the source before (in the pod) and after SNAT (on the wire). With the
wireguard backend the packet is also caught entering ``ocni.wg``; on the
underlay it is encrypted (no size to match), so the hop shows the WireGuard
UDP packet between the two node IPs, or any pod packet seen in clear.

In a dual-stack lab DST may be an IPv6 address (a pod's, the external
host's, any other), or a pod or ``external`` with ``--family ipv6``: the
packet is then an ICMPv6 echo request, followed the same way (inside the
same VXLAN device over the IPv4 underlay, or plain on the underlay with
``direct``), and for the external host the source after SNAT66 is the
node's IPv6 address.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from ..dataplane.wgmodel import WG_IFNAME as WG_DEV
from ..errors import NotFound, UsageError
from . import netns
from .capture import Capture, IPAddress, Packet
from .check import FAMILY, ICMP_HEADER, ping, udp_ports, underlay_filter, wireguard_port
from .state import LabPod, LabState


@dataclass(frozen=True)
class Hop:
    where: str  # "pod-1-1 (eth0)", "node1 underlay", ...
    netns: str
    packet: Packet | None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        p = self.packet
        return {
            "where": self.where,
            "netns": self.netns,
            "seen": p is not None,
            "src": str(p.src) if p else None,
            "dst": str(p.dst) if p else None,
            "outer_src": str(p.outer_src) if p and p.outer_src else None,
            "outer_dst": str(p.outer_dst) if p and p.outer_dst else None,
            "vni": p.vni if p else None,
            "tcpdump": p.text if p else None,
            "note": self.note,
        }


@dataclass(frozen=True)
class Trace:
    src: str
    dst: str
    dst_ip: IPAddress
    replied: bool
    pod_route: dict[str, Any]
    node_route: dict[str, Any]
    hops: tuple[Hop, ...]
    snat: tuple[IPAddress, IPAddress] | None  # (inner source before, after)

    def to_json(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "dst_ip": str(self.dst_ip),
            "family": FAMILY[self.dst_ip.version],
            "replied": self.replied,
            "pod_route": self.pod_route,
            "node_route": self.node_route,
            "hops": [h.to_json() for h in self.hops],
            "snat": {"before": str(self.snat[0]), "after": str(self.snat[1])} if self.snat else None,
        }


def route_get(ns: str, dst: IPAddress) -> dict[str, Any]:
    proc = netns.run(["ip", "-n", ns, "-j", "route", "get", str(dst)], check=False)
    try:
        routes = json.loads(proc.stdout or "[]")
    except ValueError:
        routes = []
    return routes[0] if routes else {"error": proc.stderr.strip()}


def parse_family(family: str | None, state: LabState) -> int | None:
    """``--family``: ipv4 or ipv6 (None: not given); ipv6 needs a dual-stack lab."""
    if family is None:
        return None
    if family not in FAMILY.values():
        raise UsageError(f"{family!r} is not one of: ipv4, ipv6", field="family")
    version = 4 if family == "ipv4" else 6
    if version not in state.versions:
        raise UsageError(f"lab {state.name} is single-stack (IPv4); bring one up with --ip-families ipv4,ipv6", field="family")
    return version


def resolve_dst(state: LabState, dst: str, version: int | None = None) -> tuple[IPAddress, LabPod | None, bool]:
    """(address, pod or None, is the external host). DST is ``external``,
    a pod (``NAMESPACE/NAME`` or an unambiguous ``NAME``), each of them by
    its address of IP ``version`` (default IPv4), or an IPv4 or IPv6
    address."""
    if dst in ("external", "ext"):
        ext = state.external_address(version or 4)
        assert ext is not None  # parse_family refused IPv6 in a single-stack lab
        return ext, None, True
    found = state.find_pod(dst, field="DST")
    if found is not None and found.address(version or 4) is not None:
        return found.address(version or 4), found, False  # type: ignore[return-value]
    try:
        ip = ip_address(dst)
    except ValueError:
        raise NotFound(f"DST: {dst!r} is neither a pod of lab {state.name}, an IP address, nor 'external'") from None
    if version is not None and ip.version != version:
        raise UsageError(f"DST: {dst} is IPv{ip.version} but --family is {FAMILY[version]}")
    if ip.version not in state.versions:
        raise UsageError(f"DST: {dst} is IPv6; lab {state.name} is single-stack (IPv4): bring one up with --ip-families ipv4,ipv6")
    pod = next((p for p in state.pods if p.address(ip.version) == ip), None)
    return ip, pod, ip == state.external_address(ip.version)


def _match(packets: list[Packet], length: int) -> Packet | None:
    return next((p for p in packets if p.icmp_request and p.length == length), None)


IP_HEADER = {4: 20, 6: 40}


def run_trace(state: LabState, src: str, dst: str, *, family: str | None = None) -> Trace:
    """SRC is a pod (``NAMESPACE/NAME`` or an unambiguous ``NAME``); DST as
    ``resolve_dst``; ``family`` (ipv4/ipv6) picks a pod's or the external
    host's address."""
    a = state.pod(src, field="SRC")
    if a.ip is None:
        raise NotFound(f"SRC: pod {a.key} has no IP")
    dst_ip, b, is_ext = resolve_dst(state, dst, parse_family(family, state))
    version = dst_ip.version
    if a.address(version) is None:
        raise NotFound(f"SRC: pod {a.key} has no IPv{version} address")
    na = state.node(a.node)
    nb = state.node(b.node) if b else None
    pod_route = route_get(a.netns, dst_ip)
    node_route = route_get(na.netns, dst_ip)
    size = random.randint(300, 999)
    workdir = Path(state.lab_dir) / "captures"
    vx = state.backend == "vxlan"
    wg = state.backend == "wireguard"
    icmp = "icmp6" if version == 6 else "icmp"
    underlay = f"( {underlay_filter(state)} ) or {icmp}" if vx or wg else icmp
    ref = state.refs()
    points: list[tuple[str, str, Capture]] = [(f"{ref[a.key]} eth0", a.netns, Capture(a.netns, "eth0", icmp, workdir=workdir))]
    if wg and nb and nb.name != na.name:  # the pod packet enters the tunnel on the source node
        points.append((f"{na.name} {WG_DEV} (tunnel)", na.netns, Capture(na.netns, WG_DEV, icmp, workdir=workdir)))
    points.append((f"{na.name} underlay eth0 ({na.ip.ip})", na.netns, Capture(na.netns, "eth0", underlay, workdir=workdir, vxlan=vx)))
    if nb and nb.name != na.name:
        points.append((f"{nb.name} underlay eth0 ({nb.ip.ip})", nb.netns, Capture(nb.netns, "eth0", underlay, workdir=workdir, vxlan=vx)))
    if b:
        points.append((f"{ref[b.key]} eth0", b.netns, Capture(b.netns, "eth0", icmp, workdir=workdir)))
    elif is_ext:
        points.append((f"external host eth0 ({dst_ip})", state.external_netns,
                       Capture(state.external_netns, "eth0", icmp, workdir=workdir)))  # fmt: skip
    started = []
    try:
        for _, _, cap in points:
            started.append(cap.start())
        replied = ping(a.netns, dst_ip, size=size)
    finally:
        for cap in started:
            cap.stop()
    hops = []
    for where, ns, cap in points:
        if wg and nb is not None and nb.name != na.name and "underlay" in where:  # encrypted: no size to match
            pkt, note = _wireguard_hop(state, cap.packets, na.ip.ip, nb.ip.ip, inner=size + ICMP_HEADER + IP_HEADER[version])
            hops.append(Hop(where, ns, pkt, note))
            continue
        pkt = _match(cap.packets, size + ICMP_HEADER)
        hops.append(Hop(where, ns, pkt, _note(state, pkt)))
    snat = None
    pod_cidr = state.pod_cidr(version)
    assert pod_cidr is not None
    if dst_ip not in pod_cidr:
        before = hops[0].packet.src if hops[0].packet else a.address(version)
        after = next((h.packet.src for h in hops[1:] if h.packet and h.packet.vni is None), None)
        if after is not None and before is not None:
            snat = (before, after)
    return Trace(ref[a.key], dst, dst_ip, replied, pod_route, node_route, tuple(hops), snat)


def wireguard_length(inner: int) -> int:
    """UDP payload of a WireGuard data message carrying an ``inner``-byte IP
    packet: 16 bytes of header, the packet padded to 16, a 16-byte tag."""
    return 16 + -(-inner // 16) * 16 + 16


def _wireguard_hop(state: LabState, packets: list[Packet], src: IPAddress, dst: IPAddress, *, inner: int) -> tuple[Packet | None, str]:
    """On the underlay the pod packet is encrypted: show the WireGuard packet
    from ``src`` to ``dst`` whose length fits the traced packet (else any
    between the two nodes), or any pod packet (of either family) seen in clear."""
    cidrs = [c for v in state.versions if (c := state.pod_cidr(v)) is not None]
    port = wireguard_port(state)
    clear = [p for p in packets if any(p.src in c or p.dst in c for c in cidrs)]
    if clear:
        return clear[0], f"pod packet IN CLEAR on the underlay: {clear[0].src} -> {clear[0].dst}"
    wire = [p for p in packets if {p.src, p.dst} == {src, dst} and port in (udp_ports(p) or ())]
    if not wire:
        return None, f"no WireGuard packet between {src} and {dst}"
    fits = [q for q in wire if q.src == src and q.length == wireguard_length(inner)]
    p = fits[0] if fits else next((q for q in wire if q.src == src), wire[0])
    what = f"{inner}-byte pod packet" if fits else "a packet"
    return p, f"WireGuard: UDP {p.src} -> {p.dst} port {port} carrying {what}, encrypted; no pod address in clear"


def _note(state: LabState, p: Packet | None) -> str:
    if p is None:
        return "not seen"
    if p.vni is not None:
        return f"VXLAN: outer {p.outer_src} -> {p.outer_dst}, VNI {p.vni}, inner {p.src} -> {p.dst}"
    return f"{p.src} -> {p.dst}"


# --- the tour: real output, a few commands ---------------------------------------------------------


@dataclass(frozen=True)
class TourStep:
    title: str
    command: str
    output: str


def run_tour(state: LabState) -> list[TourStep]:
    steps: list[TourStep] = []
    pods = [p for p in state.pods if p.ip]
    if not pods:
        raise UsageError(f"lab {state.name} has no pods; add one with `overlaycni lab pod add --name {state.name} web`")
    p = pods[0]
    ref = state.refs()
    name = ref[p.key]
    for title, argv in (("the pod's interface", ["ip", "addr", "show", "eth0"]), ("the pod's routes", ["ip", "route"])):
        out = netns.ns_run(p.netns, argv).stdout
        steps.append(TourStep(f"{title} ({name} on {p.node})", f"overlaycni lab exec --name {state.name} {name} -- {' '.join(argv)}", out))
    other = next((q for q in pods if q.node != p.node), None)
    if other is not None:
        t = run_trace(state, p.key, other.key)
        wire = (
            next((h for h in t.hops if h.packet and h.packet.outer_src is not None), None)
            or next((h for h in t.hops if h.packet and h.note.startswith("WireGuard")), None)
            or next((h for h in t.hops[1:2] if h.packet), None)
        )
        label = {"vxlan": "one VXLAN packet on the underlay", "wireguard": "one encrypted WireGuard packet on the underlay"}.get(
            state.backend, "the pod packet routed over the underlay")  # fmt: skip
        steps.append(
            TourStep(
                f"{label} ({name} -> {ref[other.key]})",
                f"overlaycni lab trace --name {state.name} {name} {ref[other.key]}",
                (wire.where + ":\n" + wire.packet.text) if wire and wire.packet else "(not captured)",
            )
        )
    t = run_trace(state, p.key, "external")
    ext_hop = t.hops[-1]
    text = f"inside {name}: " + (t.hops[0].packet.text if t.hops[0].packet else "(not captured)")
    text += "\nat the external host: " + (ext_hop.packet.text if ext_hop.packet else "(not captured)")
    if t.snat:
        text += f"\nSNAT: source {t.snat[0]} -> {t.snat[1]} (the node IP of {p.node})"
    steps.append(TourStep("the SNAT seen at the external host", f"overlaycni lab trace --name {state.name} {name} external", text))
    if state.dual_stack:
        steps.append(_ipv6_step(state, p, other))
    return steps


def _ipv6_step(state: LabState, p: LabPod, other: LabPod | None) -> TourStep:
    """Dual-stack: one IPv6 packet to another node's pod (inside the same
    VXLAN device, or plain with direct) and to the external host (SNAT66)."""
    ref = state.refs()
    name = ref[p.key]
    lines = []
    if other is not None:
        t = run_trace(state, p.key, other.key, family="ipv6")
        wire = next((h for h in t.hops if "underlay" in h.where and h.packet), None)
        seen = f"{wire.where}:\n{wire.packet.text}" if wire and wire.packet else "the underlay: (not captured)"
        lines.append(f"{name} -> {ref[other.key]} ({t.dst_ip}) on {seen}")
    t = run_trace(state, p.key, "external", family="ipv6")
    if t.snat:
        lines.append(f"SNAT66: source {t.snat[0]} -> {t.snat[1]} (the IPv6 address of {p.node})")
    return TourStep("dual-stack: the same over IPv6", f"overlaycni lab trace --name {state.name} {name} external --family ipv6", "\n".join(lines))
