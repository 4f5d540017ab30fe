#!/usr/bin/env python3
"""Bench: a burst of node joins against an agent that already has N peers.

One agent runs in this process with the in-memory data plane
(``FakeDataplane``: no root, no namespace, only the agent's own work) and a
SQLite store in a temporary directory. Once it has programmed ``--peers``
synthetic node records, ``--burst`` more are written back to back
(``ipam.register_node``, as joining agents do) and the time until the agent
has programmed all of them is measured (from the first write; polled every
millisecond), with how many peer selections that took when the agent counts
them (``RunningNode.peer_selection``). Each node event used to cost one
O(N) selection (~0.08 s at 5,000 records); coalesced, a burst costs about
one. Medians of ``--rounds`` runs (each its own store and agent) with the
spread. The figures compare two trees of the repository when the script is
run by each tree's interpreter (the import is the interpreter's, the script
the same)::

    .venv/bin/python bench/peer_burst.py [--peers 5000] [--burst 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from ipaddress import IPv4Address

import overlaycni
from overlaycni import ipam
from overlaycni.agent.daemon import Agent, AgentOptions
from overlaycni.config import parse_network
from overlaycni.dataplane import vtep_mac
from overlaycni.dataplane.fake import FakeDataplane
from overlaycni.datastore import open_datastore

BASE = IPv4Address("10.224.64.1")  # synthetic node IPs (no packet is sent: the data plane is in memory)
NETWORK = {"pod-cidr": "10.64.0.0/10", "network-plugin": "azure", "network-plugin-mode": "overlay"}


def wait(pred, timeout: float) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out after {timeout:.0f} s")
        time.sleep(0.001)
    return time.monotonic() - start


def one_run(tmp: str, *, peers: int, burst: int) -> tuple[float, int | None]:
    url = f"sqlite://{tmp}/state.db"
    store = open_datastore(url)
    ipam.create_cluster(store, "c1", parse_network(NETWORK))
    for i in range(peers):
        ip = IPv4Address(int(BASE) + i)
        ipam.register_node(store, "c1", f"zz-{i}", ip, vtep_mac=vtep_mac(ip))
    me = IPv4Address("10.224.0.4")
    opts = AgentOptions(cluster="c1", node="n1", node_ip=me, datastore=url, socket=f"{tmp}/a.sock", metrics_addr=None,
                        lease_ttl=60, resync_interval=3600, flow_log=None)
    agent = Agent(opts, store=open_datastore(url), dataplane=FakeDataplane(underlay_ip=me))
    agent.start()
    try:
        wait(lambda: len(agent.state.peers) >= peers, 600)
        sel = getattr(agent.node, "peer_selection", None)
        runs = sel.runs if sel is not None else None
        t0 = time.monotonic()
        for i in range(peers, peers + burst):
            ip = IPv4Address(int(BASE) + i)
            ipam.register_node(store, "c1", f"zz-{i}", ip, vtep_mac=vtep_mac(ip))
        wait(lambda: len(agent.state.peers) >= peers + burst, 600)
        took = time.monotonic() - t0
        if sel is not None:
            sel.idle(60)
        return took, (sel.runs - runs if sel is not None and runs is not None else None)
    finally:
        agent.shutdown()
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=5000)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    took, runs = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="ocb-burst-") as tmp:
            t, n = one_run(tmp, peers=args.peers, burst=args.burst)
        took.append(t)
        if n is not None:
            runs.append(n)
        print(f"  {t:.2f} s" + (f", {n} selections" if n is not None else ""), f"(load {os.getloadavg()[0]:.2f})")
    print(f"{os.path.dirname(os.path.dirname(overlaycni.__file__))}: {args.burst} joins with {args.peers} peers programmed in "
          f"median {statistics.median(took):.2f} s (min {min(took):.2f}, max {max(took):.2f})"
          + (f", selections median {statistics.median(runs):.0f} (min {min(runs)}, max {max(runs)})" if runs else ""))


if __name__ == "__main__":
    main()
