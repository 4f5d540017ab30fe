"""Control-plane scale in labs (issue 14 item 6), run from ``bench/peers.py``.

* ``learn_time``: how long until every agent of an N-node lab has programmed
  a node that joins, and forgotten one that leaves;
* ``agent_memory``: one agent's RSS with thousands of peers and hundreds of pods.

Every packet and kernel object stays in the labs' own namespaces; each lab is
torn down before the next one comes up (one lab at a time: they are heavy).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network

from overlaycni import ipam
from overlaycni.dataplane.model import vtep_mac
from overlaycni.datastore import Store
from overlaycni.datastore.keys import block_key, blockcursor_key, blocks_prefix, config_key, node_key, nodeblock_key
from overlaycni.ipam import addresses
from overlaycni.ipam.records import decode_cursor, nodeblock_value
from overlaycni.lab import control, lifecycle
from overlaycni.lab.state import LabState

SYNTHETIC_BASE = IPv4Address("10.224.64.1")  # synthetic node IPs: inside the node subnet, far from the lab's own
MEMORY_NETWORK = {"network_plugin": "azure", "network_plugin_mode": "overlay", "pod_cidr": "10.64.0.0/10"}  # 16,384 /24 blocks


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return f"median {fmt.format(statistics.median(values))} (min {fmt.format(min(values))}, max {fmt.format(max(values))})"


def wait(check: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class RouteMonitor:
    """``ip -ts monitor route`` in one namespace, written to a file: when did a route come or go."""

    def __init__(self, netns: str, path: str) -> None:
        self.path = path
        self.out = open(path, "w")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen(["ip", "-n", netns, "-ts", "monitor", "route"], stdout=self.out, stderr=subprocess.DEVNULL)

    def first(self, dst: str, *, deleted: bool, after: float) -> float | None:
        """Wall-clock time of the first route add (or delete) of ``dst`` after ``after``."""
        self.out.flush()
        with open(self.path) as fh:
            for line in fh:
                if not line.startswith("[") or "]" not in line:
                    continue
                stamp, text = line[1:].split("]", 1)
                words = text.split()
                if not words or (words[0] == "Deleted") != deleted or dst not in words[:2]:
                    continue
                t = datetime.fromisoformat(stamp).timestamp()  # local time, like time.time()
                if t >= after:
                    return t
        return None

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        self.out.close()


def _register(state: LabState, name: str, ip: IPv4Address) -> IPv4Network:
    return control.with_store(state, lambda store: ipam.register_node(store, state.name, name, ip, vtep_mac=vtep_mac(ip)).block)


def _deregister(state: LabState, name: str) -> None:
    control.with_store(state, lambda store: ipam.delete_node(store, state.name, name))


def one_join(state: LabState, monitors: list[RouteMonitor], r: int) -> tuple[float, float, float]:
    """(last agent's join time, median agent's, last agent's leave time) for one synthetic node."""
    ip = IPv4Address(int(SYNTHETIC_BASE) + r)
    name = f"zz-join-{r}"
    t0 = time.time()
    block = str(_register(state, name, ip))
    seen: list[float | None] = []

    def all_seen(deleted: bool, after: float) -> bool:
        seen[:] = [m.first(block, deleted=deleted, after=after) for m in monitors]
        return all(t is not None for t in seen)

    wait(lambda: all_seen(False, t0), timeout=60, what=f"every agent to route {block}")
    times = [t - t0 for t in seen if t is not None]
    t1 = time.time()
    _deregister(state, name)
    wait(lambda: all_seen(True, t1), timeout=60, what=f"every agent to drop {block}")
    return max(times), statistics.median(times), max(t - t1 for t in seen if t is not None)


def learn_time(sizes: list[int], *, repeats: int, store: str = "sqlite") -> None:
    print(f"== a node joins and leaves an N-node lab ({store}): time until every agent has programmed "
          f"(removed) the route to its block; {repeats} joins per N")  # fmt: skip
    root = tempfile.mkdtemp(prefix="ocl-bench-")
    base: float | None = None
    try:
        for n in sizes:
            name = f"bl{os.getpid() % 1000}n{n}"
            monitors: list[RouteMonitor] = []
            try:
                state = lifecycle.up(lifecycle.UpRequest(name=name, nodes=n, pods_per_node=0, store=store, root=root,
                                                         lease_ttl=30))  # fmt: skip
                monitors = [RouteMonitor(node.netns, os.path.join(root, f"{name}-{node.name}.mon")) for node in state.nodes]
                time.sleep(0.5)  # the monitors are listening
                joins, means, leaves = [], [], []
                for r in range(repeats):
                    last, median, gone = one_join(state, monitors, r)
                    joins.append(last)
                    means.append(median)
                    leaves.append(gone)
                base = base or statistics.median(joins)
                print(f"  {n:3d} nodes: join, last agent {spread(joins)} s (median agent {spread(means)} s); "
                      f"leave, last agent {spread(leaves)} s; t/t({sizes[0]}) {statistics.median(joins) / base:.2f}")  # fmt: skip
            finally:
                for m in monitors:
                    m.close()
                lifecycle.down(name, root=root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of ``pid`` in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[key] = int(value.split()[0])
    return out


def _anon_regions(pid: int) -> dict[str, float]:
    """Resident anonymous memory of ``pid`` in MiB by kind of mapping
    (``/proc/<pid>/smaps``): the main heap (brk: glibc's main arena),
    mappings of 64 MiB and less that are not stacks (glibc's thread arenas,
    CPython's 1 MiB object arenas, large blocks), and the rest."""
    out = {"brk heap": 0.0, "other anon": 0.0}
    name, anon = "", 0
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                parts = line.split()
                name = parts[5] if len(parts) > 5 else ""
            elif first == "Anonymous:":
                anon = int(line.split()[1])
                key = "brk heap" if name == "[heap]" else "other anon" if not name else None
                if key:
                    out[key] += anon / 1024
    return out


def _routes(netns: str) -> int:
    out = subprocess.run(["ip", "-n", netns, "route", "show", "proto", "119"], capture_output=True, text=True).stdout
    return out.count("\n")


def _register_many(store: Store, cluster: str, count: int, *, chunk: int = 500) -> None:
    """Register ``count`` synthetic nodes in transactions of ``chunk`` nodes.

    Each transaction writes what ``ipam.register_node`` writes for a new node
    (the block claim, the node's reverse claim, its record, and the block
    cursor once), with the same guard: every claim key absent. One claim per
    call of ``register_node`` reads every node record to check the IP, so
    5,000 of them took 20-27 minutes on a loaded machine, and the agent's
    memory depended on how its reconciles interleaved with the writes; a
    few large transactions make the run short and repeatable."""
    cfg = store.get(config_key(cluster))
    assert cfg is not None, f"cluster {cluster!r} has no config"
    net = ipam.decode_cluster(cfg)
    taken = {kv.key for kv in store.list(blocks_prefix(cluster))}
    cursor = decode_cursor(store.get(blockcursor_key(cluster)))
    block = cursor if isinstance(cursor, IPv4Network) else None
    i = 0
    while i < count:
        put: list[tuple[str, str, int | None]] = []
        compare: list[tuple[str, int]] = []
        while i < count and len(put) < 3 * chunk:
            block = addresses.next_block(net.pod_cidr, net.node_cidr_size, block)
            b_k = block_key(cluster, block)
            if b_k in taken:
                continue
            ip = IPv4Address(int(SYNTHETIC_BASE) + i)
            name = f"zz-peer-{i}"
            record = ipam.NodeRecord(name, ip, block, vtep_mac(ip))
            compare += [(b_k, 0), (nodeblock_key(cluster, name), 0)]
            put += [(b_k, name, None), (nodeblock_key(cluster, name), nodeblock_value(block), None),
                    (node_key(cluster, name), record.to_json(), None)]  # fmt: skip
            taken.add(b_k)
            i += 1
        put.append((blockcursor_key(cluster), str(block), None))
        if not store.transact(compare=compare, put=put).succeeded:
            raise SystemExit("synthetic node records: a block or name was claimed meanwhile (is another bench running?)")


def _settle(pid: int, *, period: float, tolerance: float = 0.01, limit: float = 120.0) -> dict[str, int]:
    """``/proc/<pid>/status`` once VmRSS has moved less than ``tolerance``
    (relative) over ``period`` seconds (at least one full resync), or after
    ``limit`` seconds."""
    deadline = time.monotonic() + limit
    before = _status(pid)
    while True:
        time.sleep(period)
        now = _status(pid)
        if abs(now["VmRSS"] - before["VmRSS"]) <= tolerance * before["VmRSS"] or time.monotonic() > deadline:
            return now
        before = now


def one_memory_run(
    name: str, root: str, *, peers: int, pods: int, src: str | None = None, env: dict[str, str] | None = None
) -> dict[str, float]:
    """One agent's memory; ``src``: run the agent from that source tree (a baseline) instead of this one;
    ``env``: more environment for the agent (an experiment: ``MALLOC_ARENA_MAX=2``)."""
    extra = {**(env or {}), **({"PYTHONPATH": src} if src is not None else {})}
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)  # the agent inherits the environment: that tree's package comes first on its path
    try:
        state = lifecycle.up(lifecycle.UpRequest(name=name, nodes=1, pods_per_node=0, root=root, lease_ttl=30,
                                                 network=MEMORY_NETWORK))  # fmt: skip
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    node = state.nodes[0]
    assert node.agent is not None
    pid = node.agent.pid
    out: dict[str, float] = {}
    time.sleep(2)
    out["idle"] = _status(pid)["VmRSS"] / 1024
    state = lifecycle.add_pods(state, [lifecycle.new_pod(state, f"m{i}", namespace="default", node=node.name) for i in range(pods)])
    assert len(state.pods) == pods
    out["pods"] = _settle(pid, period=control.RESYNC_INTERVAL + 1)["VmRSS"] / 1024
    t0 = time.monotonic()
    control.with_store(state, lambda store: _register_many(store, state.name, peers))
    out["write"] = time.monotonic() - t0
    want = peers + 1 + pods  # peers' blocks, the own block's unreachable route, one /32 per pod
    wait(lambda: _routes(node.netns) >= want, timeout=600, what=f"{peers} peer routes", interval=1.0)
    out["program"] = time.monotonic() - t0
    out["programmed"] = _status(pid)["VmRSS"] / 1024  # after the watch's burst, before a full resync with them all
    time.sleep(control.RESYNC_INTERVAL + 1)  # at least one full resync with every peer
    _settle(pid, period=control.RESYNC_INTERVAL + 1)
    # A full resync every RESYNC_INTERVAL s lifts VmRSS for its duration: one reading lands inside one or
    # not (the spread of earlier runs). Sampled over two intervals: the floor (what stays resident between
    # resyncs), the time median, and the peak (VmHWM).
    samples: list[int] = []
    floor: dict[str, int] = {}
    end = time.monotonic() + 2 * control.RESYNC_INTERVAL + 1
    while time.monotonic() < end:
        now = _status(pid)
        samples.append(now["VmRSS"])
        if not floor or now["VmRSS"] < floor["VmRSS"]:
            floor, regions = now, _anon_regions(pid)
        time.sleep(0.2)
    st = _status(pid)
    out.update(peers=floor["VmRSS"] / 1024, median=statistics.median(samples) / 1024, hwm=st["VmHWM"] / 1024,
               anon=floor["RssAnon"] / 1024)  # fmt: skip
    print(f"  {name}{' (baseline)' if src else ''}: VmRSS floor {out['peers']:.1f} MiB, median {out['median']:.1f} "
          f"(VmHWM {st['VmHWM'] / 1024:.1f}; at the floor RssAnon {floor['RssAnon'] / 1024:.1f} = brk heap "
          f"{regions['brk heap']:.1f} + other {regions['other anon']:.1f}, RssFile {floor['RssFile'] / 1024:.1f}, "
          f"{st['Threads']} threads); "
          f"records written in {out['write']:.1f} s, programmed in {out['program']:.1f} s; load {_load()}")  # fmt: skip
    return out


def _load() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def agent_memory(
    *, peers: int, pods: int, rounds: int, baseline_src: str | None = None, env: dict[str, str] | None = None
) -> None:
    """``rounds`` runs; with ``baseline_src`` (a source tree, e.g. ``git archive main src``) each round
    also runs that tree's agent, alternating which goes first, and prints the ratio; ``env``: more
    environment for this tree's agent only."""
    print(f"== one agent's memory with {peers} peers and {pods} pods (sqlite; {rounds} runs; load {_load()})")
    root = tempfile.mkdtemp(prefix="ocl-bench-")
    keys = ("idle", "pods", "programmed", "peers", "median", "hwm", "anon", "write", "program")
    rows: dict[str | None, dict[str, list[float]]] = {None: {k: [] for k in keys}}
    if baseline_src is not None:
        rows[baseline_src] = {k: [] for k in keys}
    try:
        for r in range(rounds):
            order = list(rows) if r % 2 == 0 else list(reversed(rows))
            for src in order:
                name = f"bm{os.getpid() % 1000}r{r}{'b' if src else ''}"
                try:
                    for key, value in one_memory_run(name, root, peers=peers, pods=pods, src=src, env=None if src else env).items():
                        rows[src][key].append(value)
                finally:
                    lifecycle.down(name, root=root)
        for src, row in rows.items():
            print(f" {'baseline ' + src if src else 'this tree'}{' ' + str(env) if env and not src else ''}:")
            print(f"  idle agent (1 node, 0 pods):         VmRSS {spread(row['idle'], '{:.1f}')} MiB")
            print(f"  + {pods} pods (settled):              VmRSS {spread(row['pods'], '{:.1f}')} MiB")
            print(f"  + {peers} peers, just programmed:     VmRSS {spread(row['programmed'], '{:.1f}')} MiB")
            print(f"  + {peers} peers, between resyncs:   VmRSS {spread(row['peers'], '{:.1f}')} MiB (aim <= 100; "
                  f"RssAnon {spread(row['anon'], '{:.1f}')})")  # fmt: skip
            print(f"  + {peers} peers, over two resyncs:  VmRSS {spread(row['median'], '{:.1f}')} MiB (time median); "
                  f"VmHWM {spread(row['hwm'], '{:.1f}')}")  # fmt: skip
            print(f"  {peers} node records written in {spread(row['write'], '{:.1f}')} s, "
                  f"programmed in {spread(row['program'], '{:.1f}')} s")  # fmt: skip
        if baseline_src is not None:
            ours, base = rows[None], rows[baseline_src]
            def ratio(key: str) -> str:
                return spread([a / b for a, b in zip(ours[key], base[key], strict=True)])

            print(f"  this tree / baseline, per round: VmRSS floor {ratio('peers')}; time median {ratio('median')}; "
                  f"VmHWM {ratio('hwm')}")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
