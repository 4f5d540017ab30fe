"""``lab check``: every ordered pod pair pings, every pod reaches the external
host as its node IP, and cross-node traffic is what the backend promises.

While the pings run, tcpdump listens on every node's underlay ``eth0`` and on
the external host. Afterwards, for a cross-node pair (a on A, b on B):

* vxlan: A's underlay carried UDP from A's node IP to B's node IP with the
  cluster VNI, wrapping ``a -> b`` echo request (inner addresses untouched);
* direct: A's underlay carried the plain ``a -> b`` echo request;
* wireguard: ``a -> b`` entered A's ``ocni.wg`` (a capture on the tunnel
  device), A's underlay carried UDP from A's node IP to B's node IP and
  WireGuard port, and neither node's underlay carried a packet from or to
  ``a`` or ``b`` in clear (the underlay capture also listens for the pod
  CIDR, so a leak would be seen);

and for each pod, the external host saw its echo request (recognised by a
per-pod payload size) coming from the pod's node IP, never from a pod IP.
Pings run in parallel (thread pool): one bulk pinger process per source pod
(pinger.py, raw ICMP), then iputils ``ping`` for any pair it missed, so a
lost packet does not fail the matrix and a 200-pod lab checks in seconds.
"""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path
from typing import Any

from . import netns
from .capture import Capture, Packet
from .state import LabPod, LabState

WORKERS = 8  # mostly waiting on replies, not CPU
ROUNDS = 3
CAPTURE_LIMIT = 900  # seconds; captures are stopped explicitly, this only bounds a stray one
PINGER = str(Path(__file__).with_name("pinger.py"))
EXT_BASE_SIZE = 100  # payload size of pod i's ping to the external host: 100 + i
ICMP_HEADER = 8


@dataclass(frozen=True)
class PairResult:
    src: str
    dst: str
    same_node: bool
    ping: bool
    path_ok: bool | None  # None: same node, nothing crosses the underlay
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.ping and self.path_ok is not False


@dataclass(frozen=True)
class ExternalResult:
    pod: str
    ping: bool
    expected_source: IPv4Address
    seen_source: IPv4Address | None

    @property
    def ok(self) -> bool:
        return self.ping and self.seen_source == self.expected_source


@dataclass(frozen=True)
class ConnectivityReport:
    """What ``lab check`` found; pods are named as the lab names them (``LabState.ref``)."""

    lab: str
    backend: str
    pods: tuple[str, ...]
    pairs: tuple[PairResult, ...]
    external: tuple[ExternalResult, ...]
    leaked_pod_sources: tuple[IPv4Address, ...] = ()

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.pairs) and all(e.ok for e in self.external) and not self.leaked_pod_sources

    def failures(self) -> list[str]:
        out = [f"{p.src} -> {p.dst}: {p.detail or 'no reply'}" for p in self.pairs if not p.ok]
        for e in self.external:
            if not e.ping:
                out.append(f"{e.pod} -> external: no reply")
            elif e.seen_source != e.expected_source:
                out.append(f"{e.pod} -> external: source seen {e.seen_source}, expected node IP {e.expected_source}")
        out += [f"external host saw a pod IP as source: {ip}" for ip in self.leaked_pod_sources]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.lab,
            "backend": self.backend,
            "ok": self.ok,
            "pods": list(self.pods),
            "pairs": [
                {"src": p.src, "dst": p.dst, "same_node": p.same_node, "ping": p.ping, "path_ok": p.path_ok, "ok": p.ok, "detail": p.detail}
                for p in self.pairs
            ],
            "external": [
                {"pod": e.pod, "ping": e.ping, "expected_source": str(e.expected_source),
                 "seen_source": str(e.seen_source) if e.seen_source else None, "ok": e.ok}
                for e in self.external
            ],  # fmt: skip
            "failures": self.failures(),
        }


def ping(ns: str, dst: IPv4Address, *, size: int = 56) -> bool:
    """One echo from inside ``ns``; one slower retry."""
    for args in (["-c", "1", "-W", "2"], ["-c", "3", "-i", "0.3", "-W", "2"]):
        proc = netns.ns_run(ns, ["ping", "-n", "-q", *args, "-s", str(size), str(dst)], check=False, timeout=30)
        if proc.returncode == 0:
            return True
    return False


def ping_many(ns: str, dsts: list[IPv4Address]) -> set[IPv4Address]:
    """Ping every destination from ``ns`` with one process (see pinger.py);
    returns those that answered."""
    if not dsts:
        return set()
    argv = [sys.executable, "-I", "-S", PINGER, *[str(d) for d in dsts]]
    proc = netns.ns_run(ns, argv, check=False, timeout=120)
    try:
        return {ip_address(x) for x in json.loads(proc.stdout)} if proc.returncode == 0 else set()  # type: ignore[misc]
    except ValueError:
        return set()


def underlay_filter(state: LabState) -> str:
    if state.backend == "vxlan":
        port = state.network.get("vxlan-port", 4789)
        return f"udp port {port}"
    if state.backend == "wireguard":
        return f"udp port {wireguard_port(state)} or net {state.network['pod-cidr']}"
    return f"icmp and net {state.network['pod-cidr']}"


def wireguard_port(state: LabState) -> int:
    return int(state.network.get("wireguard-port", 51820))


_PORTS = re.compile(r"^IP \S+?\.(\d+) > \S+?\.(\d+): UDP")


def udp_ports(p: Packet) -> tuple[int, int] | None:
    """(source port, destination port) of a captured UDP packet."""
    m = _PORTS.match(p.text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def index_wireguard(packets: list[Packet], pod_cidr: IPv4Network) -> dict[str, dict[tuple[IPv4Address, IPv4Address], list[Packet]]]:
    """An underlay capture, for the wireguard checks: UDP packets by (source,
    destination) node IP, and every packet with a pod address (in clear)."""
    udp: dict[tuple[IPv4Address, IPv4Address], list[Packet]] = {}
    clear: dict[tuple[IPv4Address, IPv4Address], list[Packet]] = {}
    for p in packets:
        if p.src in pod_cidr or p.dst in pod_cidr:
            clear.setdefault((p.src, p.dst), []).append(p)
        elif udp_ports(p) is not None:
            udp.setdefault((p.src, p.dst), []).append(p)
    return {"udp": udp, "clear": clear}


def verify_wireguard(
    state: LabState, a: LabPod, b: LabPod, captured: dict[str, dict[tuple[IPv4Address, IPv4Address], list[Packet]]]
) -> tuple[bool, str]:
    na, nb = state.node(a.node), state.node(b.node)
    assert a.ip and b.ip
    ai, bi, port = a.ip.ip, b.ip.ip, wireguard_port(state)
    for n in (na, nb):
        clear = captured.get(f"{n.name}|clear", {})
        leaked = clear.get((ai, bi), []) + clear.get((bi, ai), [])
        if leaked:
            return False, f"pod packet seen in clear on {n.name}'s underlay: {leaked[0].text}"
    if not captured.get(f"{na.name}|tunnel", {}).get((ai, bi)):
        return False, f"no {ai} -> {bi} echo request entered {na.name}'s ocni.wg"
    wire = [p for p in captured.get(f"{na.name}|udp", {}).get((na.ip.ip, nb.ip.ip), []) if (udp_ports(p) or (0, 0))[1] == port]
    if not wire:
        return False, f"no UDP {na.ip.ip} -> {nb.ip.ip}:{port} on {na.name}'s underlay"
    return True, f"wireguard {na.ip.ip} -> {nb.ip.ip}:{port}, nothing in clear"


def index_requests(packets: list[Packet]) -> dict[tuple[IPv4Address, IPv4Address], list[Packet]]:
    """Echo requests by (inner source, inner destination)."""
    out: dict[tuple[IPv4Address, IPv4Address], list[Packet]] = {}
    for p in packets:
        if p.icmp_request:
            out.setdefault((p.src, p.dst), []).append(p)
    return out


def verify_path(
    state: LabState, a: LabPod, b: LabPod, captured: dict[str, dict[tuple[IPv4Address, IPv4Address], list[Packet]]]
) -> tuple[bool, str]:
    """Did a's node underlay carry a -> b the way the backend promises?"""
    if state.backend == "wireguard":
        return verify_wireguard(state, a, b, captured)
    na, nb = state.node(a.node), state.node(b.node)
    assert a.ip and b.ip
    requests = captured.get(na.name, {}).get((a.ip.ip, b.ip.ip), [])
    if not requests:
        return False, f"no {a.ip.ip} -> {b.ip.ip} echo request on {na.name}'s underlay"
    if state.backend == "vxlan":
        vni = int(state.network.get("vni", 4096))
        good = [p for p in requests if p.outer_src == na.ip.ip and p.outer_dst == nb.ip.ip and p.vni == vni]
        if not good:
            seen = requests[0]
            return False, f"not VXLAN {na.ip.ip} -> {nb.ip.ip} vni {vni} (saw outer {seen.outer_src} -> {seen.outer_dst} vni {seen.vni})"
        return True, f"vxlan {na.ip.ip} -> {nb.ip.ip} vni {vni}"
    plain = [p for p in requests if p.vni is None]
    if not plain:
        return False, "expected the plain pod packet on the underlay, saw it encapsulated"
    return True, f"direct {a.ip.ip} -> {b.ip.ip}"


def _pair_round(
    state: LabState, todo: list[tuple[LabPod, LabPod]], *, workers: int, workdir: Path
) -> tuple[set[tuple[str, str]], dict[str, dict[tuple[IPv4Address, IPv4Address], list[Packet]]]]:
    """Ping ``todo`` (one bulk pinger per source) while every involved node's
    underlay is captured; returns (pod key pairs that answered, captured requests)."""
    by_src: dict[str, list[LabPod]] = {}
    srcs: dict[str, LabPod] = {}
    for a, b in todo:
        by_src.setdefault(a.key, []).append(b)
        srcs[a.key] = a
    # interleave the sources across nodes: pingers that run at the same time
    # then sit on different nodes instead of all ARPing through one node's proxy
    position = {p.key: i for n in state.nodes for i, p in enumerate(state.pods_on(n.name))}
    order = sorted(by_src, key=lambda s: (position.get(s, 0), state.node(srcs[s].node).index))
    by_src = {n: by_src[n] for n in order}
    nodes = {state.node(a.node) for a in srcs.values()}
    bpf = underlay_filter(state)
    vx = state.backend == "vxlan"
    caps = {n.name: Capture(n.netns, "eth0", bpf, workdir=workdir, timeout=CAPTURE_LIMIT, vxlan=vx) for n in nodes}
    if state.backend == "wireguard":  # what enters the tunnel, per pair
        caps |= {f"{n.name}|tunnel": Capture(n.netns, "ocni.wg", "icmp", workdir=workdir, timeout=CAPTURE_LIMIT) for n in nodes}
    started: list[Capture] = []
    try:
        for cap in caps.values():
            started.append(cap.start())
        with ThreadPoolExecutor(max_workers=workers) as pool:
            answered = dict(
                zip(by_src, pool.map(lambda s: ping_many(srcs[s].netns, [b.ip.ip for b in by_src[s]]), by_src), strict=True)  # type: ignore[union-attr]
            )
    finally:
        for cap in started:
            cap.stop()
    got = {(a.key, b.key) for a, b in todo if b.ip and b.ip.ip in answered[a.key]}
    captured = {name: index_requests(cap.packets) for name, cap in caps.items()}
    if state.backend == "wireguard":
        pod_cidr = IPv4Network(state.network["pod-cidr"])
        for n in nodes:
            for kind, index in index_wireguard(caps[n.name].packets, pod_cidr).items():
                captured[f"{n.name}|{kind}"] = index
    return got, captured


def run_check(state: LabState, *, workers: int = WORKERS, external: bool = True, rounds: int = ROUNDS) -> ConnectivityReport:
    """The matrix. A pair that got no reply, or whose packet a capture missed
    (tcpdump can drop under load), is tried again in a later round with
    fresh captures; only what fails every round is reported."""
    pods = [p for p in state.pods if p.ip is not None]
    workdir = Path(state.lab_dir) / "captures"
    pairs = [(a, b) for a in pods for b in pods if a.key != b.key]
    replied: set[tuple[str, str]] = set()
    verdict: dict[tuple[str, str], tuple[bool | None, str]] = {}
    todo = pairs
    for _ in range(rounds):
        if not todo:
            break
        got, captured = _pair_round(state, todo, workers=workers, workdir=workdir)
        replied |= got
        for a, b in todo:
            key = (a.key, b.key)
            verdict[key] = (None, "same node") if a.node == b.node else verify_path(state, a, b, captured)
        todo = [(a, b) for a, b in todo if (a.key, b.key) not in replied or verdict[(a.key, b.key)][0] is False]
    ref = state.refs()
    results = []
    for a, b in pairs:
        key = (a.key, b.key)
        path_ok, detail = verdict[key]
        ok = key in replied
        results.append(PairResult(ref[a.key], ref[b.key], a.node == b.node, ok, path_ok, detail if ok else f"no reply; {detail}"))
    ext_results: list[ExternalResult] = []
    leaked: set[IPv4Address] = set()
    if external:
        ext_results, leaked = _external(state, pods, workers=workers, workdir=workdir, rounds=rounds)
    return ConnectivityReport(
        lab=state.name,
        backend=state.backend,
        pods=tuple(ref[p.key] for p in pods),
        pairs=tuple(results),
        external=tuple(ext_results),
        leaked_pod_sources=tuple(sorted(leaked)),
    )


def _external(
    state: LabState, pods: list[LabPod], *, workers: int, workdir: Path, rounds: int
) -> tuple[list[ExternalResult], set[IPv4Address]]:
    """Each pod pings the external host with its own payload size; the
    external host's capture tells which source address it saw."""
    sizes = {p.key: EXT_BASE_SIZE + i % 1300 for i, p in enumerate(pods)}
    pod_cidr = IPv4Network(state.network["pod-cidr"])
    ref = state.refs()
    results: dict[str, ExternalResult] = {}
    leaked: set[IPv4Address] = set()
    todo = pods
    for _ in range(rounds):
        if not todo:
            break
        cap = Capture(state.external_netns, "eth0", "icmp", workdir=workdir, timeout=CAPTURE_LIMIT).start()
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                pinged = list(pool.map(lambda p: ping(p.netns, state.external_ip.ip, size=sizes[p.key]), todo))
        finally:
            cap.stop()
        requests = [q for q in cap.packets if q.icmp_request and q.dst == state.external_ip.ip]
        leaked |= {q.src for q in cap.packets if q.src in pod_cidr}
        for p, ok in zip(todo, pinged, strict=True):
            want = sizes[p.key] + ICMP_HEADER
            seen = next((q.src for q in requests if q.length == want), None)
            results[p.key] = ExternalResult(ref[p.key], ok, state.node(p.node).ip.ip, seen)
        todo = [p for p in todo if not results[p.key].ok]
    return [results[p.key] for p in pods], leaked
