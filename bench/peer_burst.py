#!/usr/bin/env python3
"""Bench: a burst of node joins against an agent that already has N peers.

One agent runs in a child process with the in-memory data plane
(``FakeDataplane``: no root, no namespace, only the agent's own work) and a
SQLite store in a temporary directory. Once it has programmed ``--peers``
synthetic node records, ``--burst`` more are written back to back and the
agent's CPU time until it has programmed all of them is measured: the
process's CPU time from the first write until the agent has every peer and
its peer selection is idle, minus the writing thread's own (the writes are
the joining agents' work, not this agent's), with the wall time and how
many peer selections that took (``RunningNode.peer_selection``).

The records are written as ``ipam.register_node`` leaves them (node record,
block claim and reverse claim in one transaction) but without its checks,
which read every node record per join (O(n) per write: the joining agents'
cost, and it would dominate the bench at thousands of nodes).

``--burst`` takes several sizes (``--peers 0 --burst 500,1000,2000,4000``:
a cluster bring-up); the growth per doubling is log2 of the CPU ratio
between consecutive sizes, per doubling of the size (1.0: linear; 2.0:
quadratic). ``--baseline DIR`` runs the same measurement on another tree's
``src`` (``git archive main src | tar -x -C /tmp/base``, then ``--baseline
/tmp/base/src``), interleaved with this one round by round, and prints the
ratio candidate/baseline. Medians of ``--rounds`` runs with min-max and the
load average::

    .venv/bin/python bench/peer_burst.py --peers 0 --burst 500,1000,2000,4000 --baseline /tmp/base/src
    .venv/bin/python bench/peer_burst.py --peers 5000 --burst 100 --baseline /tmp/base/src
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

BASE = IPv4Address("10.224.64.1")  # synthetic node IPs (no packet is sent: the data plane is in memory)
NETWORK = {"pod-cidr": "10.64.0.0/10", "network-plugin": "azure", "network-plugin-mode": "overlay"}
POD_CIDR = IPv4Network(NETWORK["pod-cidr"])
FIRST_BLOCK = 64  # synthetic nodes take blocks from this index on (the agent's own is claimed first)
HERE = Path(__file__).resolve()
THIS_SRC = HERE.parent.parent / "src"


def wait(pred, timeout: float) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out after {timeout:.0f} s")
        time.sleep(0.001)
    return time.monotonic() - start


def write_node(store, i: int) -> None:
    """Node ``zz-<i>``'s record and block claims, in one transaction (as ``register_node`` writes them)."""
    from overlaycni.dataplane import vtep_mac
    from overlaycni.datastore.keys import block_key, node_key, nodeblock_key
    from overlaycni.ipam import addresses
    from overlaycni.ipam.model import NodeRecord
    from overlaycni.ipam.records import nodeblock_value

    ip = IPv4Address(int(BASE) + i)
    name = f"zz-{i}"
    block = addresses.block_at(POD_CIDR, 24, FIRST_BLOCK + i)
    record = NodeRecord(name, ip, block, vtep_mac(ip))
    store.transact(compare=[], put=[
        (block_key("c1", block), name, None),
        (nodeblock_key("c1", name), nodeblock_value(block), None),
        (node_key("c1", name), record.to_json(), None),
    ])  # fmt: skip


def one_run(tmp: str, *, peers: int, burst: int) -> dict[str, object]:
    """One agent, one burst (in this process): the agent's CPU seconds, the wall time, the selections."""
    import overlaycni
    from overlaycni import ipam
    from overlaycni.agent.daemon import Agent, AgentOptions
    from overlaycni.config import parse_network
    from overlaycni.dataplane.fake import FakeDataplane
    from overlaycni.datastore import open_datastore

    url = f"sqlite://{tmp}/state.db"
    store = open_datastore(url)
    ipam.create_cluster(store, "c1", parse_network(NETWORK))
    for i in range(peers):
        write_node(store, i)
    me = IPv4Address("10.224.0.4")
    opts = AgentOptions(cluster="c1", node="n1", node_ip=me, datastore=url, socket=f"{tmp}/a.sock", metrics_addr=None,
                        lease_ttl=60, resync_interval=3600, flow_log=None)
    agent = Agent(opts, store=open_datastore(url), dataplane=FakeDataplane(underlay_ip=me))
    agent.start()
    try:
        wait(lambda: len(agent.state.peers) >= peers, 600)
        sel = getattr(agent.node, "peer_selection", None)
        if sel is not None:
            sel.idle(60)
        runs = sel.runs if sel is not None else None
        t0, cpu0, mine0 = time.monotonic(), time.process_time(), time.thread_time()
        for i in range(peers, peers + burst):
            write_node(store, i)
        wait(lambda: len(agent.state.peers) >= peers + burst, 1800)
        if sel is not None:
            sel.idle(60)
        took = time.monotonic() - t0
        cpu = (time.process_time() - cpu0) - (time.thread_time() - mine0)  # every thread's but this (the writer's)
        return {"tree": os.path.dirname(os.path.dirname(overlaycni.__file__)), "cpu": cpu, "wall": took,
                "selections": sel.runs - runs if sel is not None and runs is not None else None}
    finally:
        agent.shutdown()
        store.close()


def child(src: Path, *, peers: int, burst: int) -> dict[str, object]:
    """``one_run`` in a fresh interpreter importing ``src``'s overlaycni."""
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run([sys.executable, str(HERE), "--child", "--peers", str(peers), "--burst", str(burst)],
                         env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if Path(str(result["tree"])).resolve() != src.resolve():
        raise SystemExit(f"{src}: the child imported overlaycni from {result['tree']}")
    return result


def load() -> str:
    return Path("/proc/loadavg").read_text().strip()


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.3f} s ({min(xs):.3f}-{max(xs):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=5000, help="peers programmed before the burst")
    ap.add_argument("--burst", default="100", help="joins in the burst; several sizes separated by commas")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="another tree's src directory, measured interleaved with this one")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.burst.split(",")]
    if args.child:
        with tempfile.TemporaryDirectory(prefix="ocb-burst-") as tmp:
            print(json.dumps(one_run(tmp, peers=args.peers, burst=sizes[0])))
        return
    trees = {"candidate": THIS_SRC} | ({"baseline": args.baseline} if args.baseline else {})
    cpu: dict[tuple[str, int], list[float]] = {}
    for size in sizes:
        for r in range(args.rounds):
            for label, src in (reversed(trees.items()) if r % 2 else trees.items()):  # alternate who goes first
                res = child(src, peers=args.peers, burst=size)
                cpu.setdefault((label, size), []).append(float(res["cpu"]))  # type: ignore[arg-type]
                print(f"  {label:9} burst {size:5}: cpu {res['cpu']:.3f} s, wall {res['wall']:.3f} s, "
                      f"{res['selections']} selections (load {load().split()[0]})", flush=True)
    print(f"\n{args.peers} peers, then a burst of joins; agent CPU seconds, median of {args.rounds} (min-max):")
    for size in sizes:
        line = f"  burst {size:5}:"
        for label in trees:
            line += f"  {label} {spread(cpu[(label, size)])}"
        if args.baseline:
            line += f"  ratio {statistics.median(cpu[('candidate', size)]) / statistics.median(cpu[('baseline', size)]):.3f}"
        print(line)
    for label in trees:
        growth = [
            f"{a}->{b}: {math.log(statistics.median(cpu[(label, b)]) / statistics.median(cpu[(label, a)])) / math.log(b / a):.2f}"
            for a, b in zip(sizes, sizes[1:], strict=False)
        ]
        if growth:
            print(f"  {label} growth per doubling (1.0 linear, 2.0 quadratic): {', '.join(growth)}")
    print(f"  load average at the end: {load()}")


if __name__ == "__main__":
    main()
