"""The lab's reachability matrix, measured with real packets.

Every probed pod runs ``netprobe.py serve`` (TCP and UDP echo on 80 and 81
by default) inside its namespace, started by ``procs.spawn`` and recorded in
``servers.json`` in the lab directory (pid + start time, by pod
``NAMESPACE/NAME``); ``lab down`` kills
what still runs in the lab's namespaces, ``lab pod delete`` and ``lab node
delete`` what runs in the pod's. A matrix runs one ``netprobe.py probe`` per
source pod, all at once, each probing every destination in parallel
(threads). A blocked pair costs one timeout, so a matrix takes about one
timeout however many pods there are. In a dual-stack lab ``family=6``
probes the pods' IPv6 addresses (the servers listen on both families).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataplaneError, UsageError
from . import netns, procs
from . import state as st
from .state import LabPod, LabState, Proc

SERVERS_FILE = "servers.json"
DEFAULT_PORTS = (80, 81)
NETPROBE = str(Path(__file__).with_name("netprobe.py"))
SERVER_READY_TIMEOUT = 20.0


# --- probe servers -----------------------------------------------------------------------------


def _python() -> str:
    return os.path.realpath(sys.executable)


def load_servers(state: LabState) -> dict[str, list[dict[str, Any]]]:
    """The probe servers started so far: pod key -> [{pid, start_time, ports, log}]."""
    try:
        data = json.loads((Path(state.lab_dir) / SERVERS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _server_alive(rec: Mapping[str, Any] | None) -> bool:
    if not rec:
        return False
    return procs.alive(Proc(pid=rec["pid"], start_time=rec["start_time"]))


def ensure_servers(state: LabState, *, ports: Sequence[int] = DEFAULT_PORTS, pods: Sequence[LabPod] | None = None) -> int:
    """Every pod serves TCP and UDP on ``ports``; start what is missing.
    Returns how many servers were started."""
    pods = list(state.pods if pods is None else pods)
    d = Path(state.lab_dir)
    started = 0
    with st.locked(d):
        servers = load_servers(state)
        todo = []
        for p in pods:
            recs = [r for r in servers.get(p.key, []) if _server_alive(r)]
            served = {port for r in recs for port in r["ports"]}
            missing = sorted(set(ports) - served)
            servers[p.key] = recs
            if missing:
                todo.append((p, missing))
        spawned = []
        try:
            for p, missing in todo:
                log = d / "servers" / f"{p.namespace}.{p.name}.log"
                out = d / "servers" / f"{p.namespace}.{p.name}.{missing[0]}.out"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text("")
                proc = procs.spawn(p.netns, [_python(), "-I", "-S", NETPROBE, "serve", *map(str, missing)], log=log, out=out)
                spawned.append((p, missing, proc, out))
                servers[p.key].append({"pid": proc.pid, "start_time": proc.start_time, "ports": missing, "log": str(log)})
            for _p, _missing, proc, out in spawned:
                procs.wait_for_json_event(out, "ready", proc=proc, timeout=SERVER_READY_TIMEOUT, log=Path(proc.log))
                started += 1
        finally:
            tmp = d / (SERVERS_FILE + ".tmp")
            tmp.write_text(json.dumps(servers, indent=1))
            os.replace(tmp, d / SERVERS_FILE)
    return started


# --- the matrix --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeReport:
    lab: str
    port: int
    protocol: str  # TCP or UDP
    pods: tuple[str, ...]  # how the lab names each pod (``LabState.ref``), in order
    keys: tuple[str, ...]  # NAMESPACE/POD of each
    connected: Mapping[tuple[str, str], bool]  # (src pod, dst pod), by ``pods`` names
    retried: int = 0
    family: int = 4  # the IP version probed

    def to_json(self) -> dict[str, Any]:
        return {
            "lab": self.lab,
            "port": self.port,
            "protocol": self.protocol,
            "family": "ipv6" if self.family == 6 else "ipv4",
            "pods": [{"name": p, "pod": k} for p, k in zip(self.pods, self.keys, strict=True)],
            "matrix": {s: {d: self.connected[(s, d)] for d in self.pods} for s in self.pods},
            "connected": sum(self.connected.values()),
            "blocked": sum(not v for v in self.connected.values()),
            "retried": self.retried,
        }

    def rows(self) -> list[str]:
        """``.`` connected, ``X`` blocked, one row per source (the upstream truth-table style)."""
        return ["".join("." if self.connected[(s, d)] else "X" for d in self.pods) for s in self.pods]


def _probe_round(
    state: LabState, pairs: Sequence[tuple[LabPod, LabPod]], *, port: int, protocol: str, timeout: float, family: int = 4
) -> dict[tuple[str, str], bool]:
    """(src key, dst key) -> connected, one prober process per source."""
    by_src: dict[str, list[LabPod]] = {}
    src_of: dict[str, LabPod] = {}
    for s, d in pairs:
        by_src.setdefault(s.key, []).append(d)
        src_of[s.key] = s
    argv_of = {
        key: netns.in_ns(
            src_of[key].netns,
            [_python(), "-I", "-S", NETPROBE, "probe", "--protocol", protocol.lower(), "--port", str(port),
             "--timeout", str(timeout), *[str(d.address(family)) for d in dsts if d.address(family) is not None]],
        )
        for key, dsts in by_src.items()
    }  # fmt: skip

    def run(key: str) -> tuple[str, list[bool]]:
        proc = subprocess.run(argv_of[key], capture_output=True, text=True, timeout=timeout * 4 + 60)
        if proc.returncode != 0:
            raise DataplaneError(f"probe from pod {key} failed: {proc.stderr.strip()[-500:]}")
        return key, json.loads(proc.stdout)

    out: dict[tuple[str, str], bool] = {}
    with ThreadPoolExecutor(max_workers=max(1, len(argv_of))) as pool:
        for key, results in pool.map(run, list(argv_of)):
            for d, ok in zip(by_src[key], results, strict=False):
                out[(key, d.key)] = bool(ok)
    return out


def probe_matrix(
    state: LabState,
    *,
    port: int = 80,
    protocol: str = "TCP",
    pods: Sequence[str] | None = None,
    expect: Mapping[tuple[str, str], bool] | None = None,
    retries: int = 2,
    timeout: float = 2.0,
    start_servers: bool = True,
    family: int = 4,
) -> ProbeReport:
    """Probe every ordered pair of ``pods`` (``NAMESPACE/NAME`` or an
    unambiguous ``NAME``; default: all pods with an IP) on PORT/PROTOCOL
    with real packets. A blocked pair is probed again (at most ``retries``
    times) only when ``expect`` (keyed like the report, by the lab's names
    for the pods) says it should connect (or there is no ``expect``); a pair
    that connected is never probed again, so a wrongly allowed pair is
    always reported."""
    protocol = protocol.upper()
    if protocol not in ("TCP", "UDP"):
        raise UsageError(f"{protocol!r} cannot be probed here (TCP or UDP; this kernel has no SCTP)", field="protocol")
    if not 1 <= port <= 65535:
        raise UsageError(f"{port} is out of range (1-65535)", field="port")
    if pods is not None:
        chosen = [state.pod(n, field="--pods") for n in pods]
    else:
        chosen = sorted((p for p in state.pods if p.ip is not None), key=lambda p: (p.namespace, p.name))
    ref = state.refs()
    missing_ip = [ref[p.key] for p in chosen if p.ip is None]
    if missing_ip:
        raise UsageError(f"pods without an IP cannot be probed: {', '.join(missing_ip)}")
    if family == 6:
        no_v6 = [ref[p.key] for p in chosen if p.ip_v6 is None]
        if no_v6:
            raise UsageError(f"pods without an IPv6 address cannot be probed over IPv6: {', '.join(no_v6)} "
                             "(a dual-stack lab: lab up --ip-families ipv4,ipv6)", field="family")  # fmt: skip
    if start_servers:
        ensure_servers(state, ports=sorted({*DEFAULT_PORTS, port}), pods=chosen)
    want = None  # (src key, dst key) -> expected to connect
    if expect is not None:
        want = {(s.key, d.key): expect.get((ref[s.key], ref[d.key]), False) for s in chosen for d in chosen}
    pairs = [(s, d) for s in chosen for d in chosen]
    got = _probe_round(state, pairs, port=port, protocol=protocol, timeout=timeout, family=family)
    retried = 0
    for _ in range(retries):
        again = [(s, d) for s, d in pairs if not got[(s.key, d.key)] and (want is None or want[(s.key, d.key)])]
        if not again:
            break
        retried += len(again)
        got.update(_probe_round(state, again, port=port, protocol=protocol, timeout=timeout, family=family))
    return ProbeReport(
        lab=state.name,
        port=port,
        protocol=protocol,
        pods=tuple(ref[p.key] for p in chosen),
        keys=tuple(p.key for p in chosen),
        connected={(ref[s], ref[d]): ok for (s, d), ok in got.items()},
        retried=retried,
        family=family,
    )
