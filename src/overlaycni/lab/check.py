"""``lab check``: every ordered pod pair pings, every pod reaches the external
host as its node IP, and cross-node traffic is what the backend promises.

While the pings run, tcpdump listens on every node's underlay ``eth0`` and on
the external host. Afterwards, for a cross-node pair (a on A, b on B):

* vxlan: A's underlay carried UDP from A's node IP to B's node IP with the
  cluster VNI, wrapping ``a -> b`` echo request (inner addresses untouched);
* direct: A's underlay carried the plain ``a -> b`` echo request;

and for each pod, the external host saw its echo request (recognised by a
per-pod payload size) coming from the pod's node IP, never from a pod IP.
Pings run in parallel (thread pool); each one is ``ping -c 1`` with one
slower retry, so a lost first packet does not fail the matrix.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from . import netns
from .capture import Capture, Packet
from .state import LabState, PodState

WORKERS = 8
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
class CheckReport:
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


def underlay_filter(state: LabState) -> str:
    if state.backend == "vxlan":
        port = state.network.get("vxlan-port", 4789)
        return f"udp port {port}"
    return f"icmp and net {state.network['pod-cidr']}"


def verify_path(state: LabState, a: PodState, b: PodState, captured: dict[str, list[Packet]]) -> tuple[bool, str]:
    """Did a's node underlay carry a -> b the way the backend promises?"""
    na, nb = state.node(a.node), state.node(b.node)
    assert a.ip and b.ip
    requests = [p for p in captured.get(na.name, []) if p.icmp_request and p.src == a.ip.ip and p.dst == b.ip.ip]
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


def run_check(state: LabState, *, workers: int = WORKERS, external: bool = True) -> CheckReport:
    pods = [p for p in state.pods if p.ip is not None]
    workdir = Path(state.lab_dir) / "captures"
    bpf = underlay_filter(state)
    captures = {n.name: Capture(n.netns, "eth0", bpf, workdir=workdir) for n in state.nodes}
    ext_cap = Capture(state.external_netns, "eth0", "icmp", workdir=workdir)
    started: list[Capture] = []
    try:
        for cap in [*captures.values(), ext_cap]:
            started.append(cap.start())
        pairs = [(a, b) for a in pods for b in pods if a.name != b.name]
        sizes = {p.name: EXT_BASE_SIZE + i for i, p in enumerate(pods)}
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pair_pings = list(pool.map(lambda ab: ping(ab[0].netns, ab[1].ip.ip), pairs))  # type: ignore[union-attr]
            ext_pings = (
                list(pool.map(lambda p: ping(p.netns, state.external_ip.ip, size=sizes[p.name]), pods)) if external else []
            )
    finally:
        for cap in started:
            cap.stop()
    captured = {name: cap.packets for name, cap in captures.items()}
    results = []
    for (a, b), ok in zip(pairs, pair_pings):
        same = a.node == b.node
        path_ok, detail = (None, "same node") if same else verify_path(state, a, b, captured)
        if not ok:
            detail = f"no reply; {detail}"
        results.append(PairResult(a.name, b.name, same, ok, path_ok, detail))
    ext_results = []
    pod_cidr = IPv4Network(state.network["pod-cidr"])
    ext_requests = [p for p in ext_cap.packets if p.icmp_request and p.dst == state.external_ip.ip]
    for p, ok in zip(pods, ext_pings):
        want_len = sizes[p.name] + ICMP_HEADER
        seen = next((q.src for q in ext_requests if q.length == want_len), None)
        ext_results.append(ExternalResult(p.name, ok, state.node(p.node).ip.ip, seen))
    leaked = tuple(sorted({q.src for q in ext_cap.packets if q.src in pod_cidr}))
    return CheckReport(
        lab=state.name,
        backend=state.backend,
        pods=tuple(p.name for p in pods),
        pairs=tuple(results),
        external=tuple(ext_results),
        leaked_pod_sources=leaked,
    )
