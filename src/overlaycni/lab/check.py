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

A dual-stack lab (``--ip-families ipv4,ipv6``) runs the whole matrix over
both families: every ordered pod pair pings IPv4 and IPv6 (ICMPv6 echo), the
underlay checks hold for the IPv6 packets alike (vxlan: the same VXLAN
device, IPv6 inside IPv4 UDP between the node IPs; direct: the plain IPv6
packet; wireguard: the same tunnel, no IPv6 pod address in clear), and each
pod's IPv6 echo reaches the external host's IPv6 address from its node's
IPv6 address (SNAT66), never from an IPv6 pod address.
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
from ipaddress import IPv4Network, IPv6Network, ip_address
from pathlib import Path
from typing import Any

from . import netns
from .capture import Capture, IPAddress, Packet
from .state import LabPod, LabState

WORKERS = 8  # mostly waiting on replies, not CPU
ROUNDS = 3
CAPTURE_LIMIT = 900  # seconds; captures are stopped explicitly, this only bounds a stray one
PINGER = str(Path(__file__).with_name("pinger.py"))
EXT_BASE_SIZE = 100  # payload size of pod i's ping to the external host: 100 + i
ICMP_HEADER = 8


FAMILY = {4: "ipv4", 6: "ipv6"}


@dataclass(frozen=True)
class PairResult:
    src: str
    dst: str
    same_node: bool
    ping: bool
    path_ok: bool | None  # None: same node, nothing crosses the underlay
    detail: str = ""
    version: int = 4  # the IP version pinged

    @property
    def ok(self) -> bool:
        return self.ping and self.path_ok is not False


@dataclass(frozen=True)
class ExternalResult:
    pod: str
    ping: bool
    expected_source: IPAddress | None  # None: the node has no address of this family
    seen_source: IPAddress | None
    version: int = 4

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
    leaked_pod_sources: tuple[IPAddress, ...] = ()

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.pairs) and all(e.ok for e in self.external) and not self.leaked_pod_sources

    def failures(self) -> list[str]:
        v6 = any(p.version == 6 for p in self.pairs) or any(e.version == 6 for e in self.external)

        def tag(version: int) -> str:  # a dual-stack report names the family of each failure
            return f" ({FAMILY[version]})" if v6 else ""

        out = [f"{p.src} -> {p.dst}{tag(p.version)}: {p.detail or 'no reply'}" for p in self.pairs if not p.ok]
        for e in self.external:
            if not e.ping:
                out.append(f"{e.pod} -> external{tag(e.version)}: no reply")
            elif e.seen_source != e.expected_source:
                out.append(f"{e.pod} -> external{tag(e.version)}: source seen {e.seen_source}, expected node IP {e.expected_source}")
        out += [f"external host saw a pod IP as source: {ip}" for ip in self.leaked_pod_sources]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.lab,
            "backend": self.backend,
            "ok": self.ok,
            "pods": list(self.pods),
            "pairs": [
                {"src": p.src, "dst": p.dst, "family": FAMILY[p.version], "same_node": p.same_node, "ping": p.ping,
                 "path_ok": p.path_ok, "ok": p.ok, "detail": p.detail}
                for p in self.pairs
            ],
            "external": [
                {"pod": e.pod, "family": FAMILY[e.version], "ping": e.ping,
                 "expected_source": str(e.expected_source) if e.expected_source else None,
                 "seen_source": str(e.seen_source) if e.seen_source else None, "ok": e.ok}
                for e in self.external
            ],  # fmt: skip
            "failures": self.failures(),
        }


def ping(ns: str, dst: IPAddress, *, size: int = 56) -> bool:
    """One echo from inside ``ns``; one slower retry."""
    for args in (["-c", "1", "-W", "2"], ["-c", "3", "-i", "0.3", "-W", "2"]):
        proc = netns.ns_run(ns, ["ping", "-n", "-q", *args, "-s", str(size), str(dst)], check=False, timeout=30)
        if proc.returncode == 0:
            return True
    return False


def ping_many(ns: str, dsts: list[IPAddress]) -> set[IPAddress]:
    """Ping every destination from ``ns`` with one process (see pinger.py);
    returns those that answered."""
    if not dsts:
        return set()
    argv = [sys.executable, "-I", "-S", PINGER, *[str(d) for d in dsts]]
    proc = netns.ns_run(ns, argv, check=False, timeout=120)
    try:
        return {ip_address(x) for x in json.loads(proc.stdout)} if proc.returncode == 0 else set()
    except ValueError:
        return set()


def pod_cidrs(state: LabState) -> list[IPv4Network | IPv6Network]:
    """The lab's pod CIDRs, IPv4 first."""
    return [c for v in state.versions if (c := state.pod_cidr(v)) is not None]


def underlay_filter(state: LabState) -> str:
    """What an underlay capture listens for (a single-stack lab: as before)."""
    if state.backend == "vxlan":
        port = state.network.get("vxlan-port", 4789)
        return f"udp port {port}"
    if state.backend == "wireguard":
        return f"udp port {wireguard_port(state)} or " + " or ".join(f"net {c}" for c in pod_cidrs(state))
    v4 = f"icmp and net {state.network['pod-cidr']}"
    v6 = state.pod_cidr(6)
    return v4 if v6 is None else f"( {v4} ) or ( icmp6 and net {v6} )"


def wireguard_port(state: LabState) -> int:
    return int(state.network.get("wireguard-port", 51820))


_PORTS = re.compile(r"^IP \S+?\.(\d+) > \S+?\.(\d+): UDP")


def udp_ports(p: Packet) -> tuple[int, int] | None:
    """(source port, destination port) of a captured UDP packet."""
    m = _PORTS.match(p.text)
    return (int(m.group(1)), int(m.group(2))) if m else None


Index = dict[tuple[IPAddress, IPAddress], list[Packet]]


def index_wireguard(packets: list[Packet], *cidrs: IPv4Network | IPv6Network) -> dict[str, Index]:
    """An underlay capture, for the wireguard checks: UDP packets by (source,
    destination) node IP, and every packet with a pod address (of any of the
    pod CIDRs ``cidrs``: in clear)."""
    udp: Index = {}
    clear: Index = {}
    for p in packets:
        if any(p.src in c or p.dst in c for c in cidrs):
            clear.setdefault((p.src, p.dst), []).append(p)
        elif udp_ports(p) is not None:
            udp.setdefault((p.src, p.dst), []).append(p)
    return {"udp": udp, "clear": clear}


def verify_wireguard(state: LabState, a: LabPod, b: LabPod, captured: dict[str, Index], version: int = 4) -> tuple[bool, str]:
    na, nb = state.node(a.node), state.node(b.node)
    ai, bi, port = a.address(version), b.address(version), wireguard_port(state)
    assert ai is not None and bi is not None
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


def index_requests(packets: list[Packet]) -> Index:
    """Echo requests by (inner source, inner destination)."""
    out: Index = {}
    for p in packets:
        if p.icmp_request:
            out.setdefault((p.src, p.dst), []).append(p)
    return out


def verify_path(state: LabState, a: LabPod, b: LabPod, captured: dict[str, Index], version: int = 4) -> tuple[bool, str]:
    """Did a's node underlay carry a -> b (over IP ``version``) the way the
    backend promises? The outer header is IPv4 for both families."""
    if state.backend == "wireguard":
        return verify_wireguard(state, a, b, captured, version)
    na, nb = state.node(a.node), state.node(b.node)
    ai, bi = a.address(version), b.address(version)
    assert ai is not None and bi is not None
    requests = captured.get(na.name, {}).get((ai, bi), [])
    if not requests:
        return False, f"no {ai} -> {bi} echo request on {na.name}'s underlay"
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
    return True, f"direct {ai} -> {bi}"


Pair = tuple[LabPod, LabPod, int]  # (source, destination, IP version)


def _pair_round(state: LabState, todo: list[Pair], *, workers: int, workdir: Path) -> tuple[set[tuple[str, str, int]], dict[str, Index]]:
    """Ping ``todo`` (one bulk pinger per source, both families at once)
    while every involved node's underlay is captured; returns (pod key pairs
    and versions that answered, captured requests)."""
    by_src: dict[str, list[IPAddress]] = {}
    srcs: dict[str, LabPod] = {}
    for a, b, version in todo:
        dst = b.address(version)
        assert dst is not None
        by_src.setdefault(a.key, []).append(dst)
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
        icmp = "icmp or icmp6" if state.dual_stack else "icmp"
        caps |= {f"{n.name}|tunnel": Capture(n.netns, "ocni.wg", icmp, workdir=workdir, timeout=CAPTURE_LIMIT) for n in nodes}
    started: list[Capture] = []
    try:
        for cap in caps.values():
            started.append(cap.start())
        with ThreadPoolExecutor(max_workers=workers) as pool:
            answered = dict(zip(by_src, pool.map(lambda s: ping_many(srcs[s].netns, by_src[s]), by_src), strict=True))
    finally:
        for cap in started:
            cap.stop()
    got = {(a.key, b.key, v) for a, b, v in todo if b.address(v) in answered[a.key]}
    captured = {name: index_requests(cap.packets) for name, cap in caps.items()}
    if state.backend == "wireguard":
        for n in nodes:
            for kind, index in index_wireguard(caps[n.name].packets, *pod_cidrs(state)).items():
                captured[f"{n.name}|{kind}"] = index
    return got, captured


def run_check(state: LabState, *, workers: int = WORKERS, external: bool = True, rounds: int = ROUNDS) -> ConnectivityReport:
    """The matrix, over every family of the lab. A pair that got no reply,
    or whose packet a capture missed (tcpdump can drop under load), is tried
    again in a later round with fresh captures; only what fails every round
    is reported."""
    pods = [p for p in state.pods if p.ip is not None]
    workdir = Path(state.lab_dir) / "captures"
    pairs = [(a, b, v) for v in state.versions for a in pods for b in pods if a.key != b.key and b.address(v) is not None]
    replied: set[tuple[str, str, int]] = set()
    verdict: dict[tuple[str, str, int], tuple[bool | None, str]] = {}
    todo = pairs
    for _ in range(rounds):
        if not todo:
            break
        got, captured = _pair_round(state, todo, workers=workers, workdir=workdir)
        replied |= got
        for a, b, v in todo:
            key = (a.key, b.key, v)
            verdict[key] = (None, "same node") if a.node == b.node else verify_path(state, a, b, captured, v)
        todo = [(a, b, v) for a, b, v in todo if (a.key, b.key, v) not in replied or verdict[(a.key, b.key, v)][0] is False]
    ref = state.refs()
    results = []
    for a, b, v in pairs:
        key = (a.key, b.key, v)
        path_ok, detail = verdict[key]
        ok = key in replied
        results.append(PairResult(ref[a.key], ref[b.key], a.node == b.node, ok, path_ok, detail if ok else f"no reply; {detail}", v))
    ext_results: list[ExternalResult] = []
    leaked: set[IPAddress] = set()
    if external:
        ext_results, leaked = _external(state, pods, workers=workers, workdir=workdir, rounds=rounds)
    return ConnectivityReport(
        lab=state.name,
        backend=state.backend,
        pods=tuple(ref[p.key] for p in pods),
        pairs=tuple(results),
        external=tuple(ext_results),
        leaked_pod_sources=tuple(sorted(leaked, key=lambda a: (a.version, a))),
    )


def node_address(state: LabState, pod: LabPod, version: int) -> IPAddress | None:
    """The address of ``pod``'s node that its traffic of IP ``version`` leaving
    the pod CIDR is masqueraded to (SNAT, SNAT66)."""
    n = state.node(pod.node)
    iface = n.ip if version == 4 else n.ip_v6
    return iface.ip if iface is not None else None


def _external(
    state: LabState, pods: list[LabPod], *, workers: int, workdir: Path, rounds: int
) -> tuple[list[ExternalResult], set[IPAddress]]:
    """Each pod pings the external host (each of its addresses) with its own
    payload size; the external host's capture tells which source address
    it saw."""
    sizes = {p.key: EXT_BASE_SIZE + i % 1300 for i, p in enumerate(pods)}
    cidrs = pod_cidrs(state)
    ref = state.refs()
    results: dict[tuple[str, int], ExternalResult] = {}
    leaked: set[IPAddress] = set()
    wanted = [(p, v) for v in state.versions for p in pods if p.address(v) is not None]
    todo = wanted
    bpf = "icmp or icmp6" if state.dual_stack else "icmp"
    for _ in range(rounds):
        if not todo:
            break
        cap = Capture(state.external_netns, "eth0", bpf, workdir=workdir, timeout=CAPTURE_LIMIT).start()
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                pinged = list(pool.map(lambda pv: ping(pv[0].netns, state.external_address(pv[1]), size=sizes[pv[0].key]), todo))  # type: ignore[arg-type]
        finally:
            cap.stop()
        leaked |= {q.src for q in cap.packets if any(q.src in c for c in cidrs)}
        for (p, v), ok in zip(todo, pinged, strict=True):
            want = sizes[p.key] + ICMP_HEADER
            dst = state.external_address(v)
            seen = next((q.src for q in cap.packets if q.icmp_request and q.dst == dst and q.length == want), None)
            results[(p.key, v)] = ExternalResult(ref[p.key], ok, node_address(state, p, v), seen, v)
        todo = [(p, v) for p, v in todo if not results[(p.key, v)].ok]
    return [results[(p.key, v)] for p, v in wanted], leaked
