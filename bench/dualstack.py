#!/usr/bin/env python3
"""CNI ADD/DEL latency of a dual-stack pod against a single-stack one,
measured in the same run: two agents (one per cluster, one node namespace
each), the same plugin, the same pods. The figure is the ratio dual /
single: what the second family costs on the pod path (its address, the
link-local gateway, the pod's IPv6 settings, the /128 route, the wait
until the address is usable).

Rounds alternate which cluster goes first; the table gives the median of
the rounds and their spread (min..max of the per-round ratios).

    .venv/bin/python bench/dualstack.py [--pods 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cni import OVERLAYCNI, Bench, pct, sh  # noqa: E402


class Pair(Bench):
    """Two agents: ``single`` (IPv4) and ``dual`` (IPv4 + IPv6)."""

    def __init__(self) -> None:
        super().__init__()
        self.agents: list[subprocess.Popen] = []
        self.socks: dict[str, str] = {}

    def start(self, name: str, node_ns: str, node_ip: str, *flags: str) -> None:
        store = f"sqlite://{self.tmp}/{name}.db"
        sh(OVERLAYCNI, "--datastore", store, "cluster", "create", "--name", name, "--network-plugin", "azure",
           "--network-plugin-mode", "overlay", *flags)
        sock = str(self.tmp / f"{name}.sock")
        with open(self.tmp / f"{name}.log", "w") as log:  # the agent keeps its own copy of the fd
            agent = subprocess.Popen(
                ["ip", "netns", "exec", node_ns, OVERLAYCNI, "--datastore", store, "agent", "--cluster", name,
                 "--node", "n1", "--node-ip", node_ip, "--socket", sock, "--metrics-addr", ""],
                stdout=subprocess.PIPE, stderr=log, text=True,
            )
        self.agents.append(agent)
        if not agent.stdout or not agent.stdout.readline():
            raise SystemExit(f"agent {name} did not start:\n" + (self.tmp / f"{name}.log").read_text())
        if not (self.tmp / "bin/overlaycni").exists():
            sh(OVERLAYCNI, "install-cni", "--cluster", name, "--bin-dir", str(self.tmp / "bin"),
               "--conf-dir", str(self.tmp / "net.d"), "--socket", sock)
        self.socks[name] = sock

    def cleanup(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                agent.terminate()
                try:
                    agent.wait(5)
                except subprocess.TimeoutExpired:
                    agent.kill()
        super().cleanup()


def round_trip(b: Pair, node_ns: str, name: str, pods: list[str]) -> dict[str, float]:
    conf = {"cniVersion": "1.0.0", "name": "overlaycni", "type": "overlaycni", "socket": b.socks[name]}
    plugin = str(b.tmp / "bin/overlaycni")
    add = [b.run_plugin(node_ns, plugin, "ADD", p, conf, ours=False) for p in pods]
    dele = [b.run_plugin(node_ns, plugin, "DEL", p, conf, ours=False) for p in pods]
    return {"add_p50": pct(add, .5), "add_p99": pct(add, .99), "del_p50": pct(dele, .5), "del_p99": pct(dele, .99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/dualstack.py needs root (network namespaces)", file=sys.stderr)
        return 2
    b = Pair()
    runs: list[tuple[dict[str, float], dict[str, float]]] = []
    try:
        nodes = {"single": b.node("s1", "10.224.0.4"), "dual": b.node("d1", "10.224.0.5")}
        b.start("single", nodes["single"], "10.224.0.4")
        b.start("dual", nodes["dual"], "10.224.0.5", "--ip-families", "ipv4,ipv6")
        pods = [b.ns(f"p{i}") for i in range(args.pods)]
        for r in range(args.rounds):
            order = ["single", "dual"] if r % 2 == 0 else ["dual", "single"]
            got = {name: round_trip(b, nodes[name], name, pods) for name in order}
            runs.append((got["single"], got["dual"]))
    finally:
        b.cleanup()
    print(f"CNI latency over {args.pods} pods, {args.rounds} rounds (ratio = dual-stack / single-stack; "
          "medians of the rounds, spread = min..max of the rounds' ratios)")
    print(f"{'metric':8} {'single':>9} {'dual':>9} {'ratio':>6}  spread")
    report = {}
    for k in ("add_p50", "add_p99", "del_p50", "del_p99"):
        single = statistics.median(s[k] for s, _ in runs)
        dual = statistics.median(d[k] for _, d in runs)
        ratios = [d[k] / s[k] for s, d in runs]
        report[k] = {"single": single, "dual": dual, "ratio": statistics.median(ratios)}
        print(f"{k:8} {single*1000:7.1f}ms {dual*1000:7.1f}ms {statistics.median(ratios):6.2f}  "
              f"{min(ratios):.2f}..{max(ratios):.2f}")
    print(json.dumps(report), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
