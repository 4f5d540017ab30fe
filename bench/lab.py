"""Lab benchmarks (root; every packet stays inside the lab's namespaces).

1. Bring-up time of ``lab up`` for 3, 10 and 20 nodes (2 pods per node): the
   figure is the growth, printed as seconds per node and as the ratio of
   t(N)/t(3) to N/3 (1.0 = linear).
2. Convergence: in the 10-node lab, time from ``lab node add`` until every
   peer has a route to the new node's block (polled with ``ip -j route``).
3. Cross-node pod-to-pod TCP throughput (iperf3) per backend, as a ratio of
   the node-to-node underlay throughput measured in the same lab, same run
   (underlay and pod runs alternate; medians of ``--repeats``).

Usage: .venv/bin/python bench/lab.py [--sizes 3,10,20] [--seconds 5] [--skip-throughput]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from overlaycni.lab import lifecycle, members


def up(name: str, root: str, *, nodes: int, pods: int, backend: str = "vxlan") -> tuple[float, object]:
    t0 = time.perf_counter()
    state = lifecycle.up(lifecycle.UpRequest(name=name, nodes=nodes, pods_per_node=pods, network={"backend": backend}, root=root))
    return time.perf_counter() - t0, state


def routes(netns: str) -> set[str]:
    out = subprocess.run(["ip", "-n", netns, "-j", "route", "show"], capture_output=True, text=True).stdout
    return {r.get("dst", "") for r in json.loads(out or "[]")}


def convergence(name: str, root: str) -> tuple[float, float, int]:
    """(seconds until the new agent is ready, seconds until every peer routes its block, peers)."""
    state = members.open_lab(name, root)
    peers = [n.netns for n in state.nodes]
    t0 = time.perf_counter()
    node = members.add_node(name, root=root)
    t_ready = time.perf_counter() - t0
    block = str(node.block)
    pending = set(peers)
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        pending = {ns for ns in pending if block not in routes(ns)}
        if pending:
            time.sleep(0.02)
    if pending:
        raise SystemExit(f"peers never programmed {block}: {sorted(pending)}")
    return t_ready, time.perf_counter() - t0, len(peers)


def iperf(server_ns: str, client_ns: str, server_ip: str, seconds: int) -> float:
    """Gbit/s of one TCP stream from client_ns to server_ip (server in server_ns)."""
    srv = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", "5201"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(50):  # wait for the listener
            r = subprocess.run(["ip", "netns", "exec", server_ns, "ss", "-Hltn", "sport = :5201"], capture_output=True, text=True)
            if r.stdout.strip():
                break
            time.sleep(0.1)
        out = subprocess.run(
            ["ip", "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-p", "5201", "-t", str(seconds), "-J"],
            capture_output=True, text=True, timeout=seconds + 30,
        )  # fmt: skip
        data = json.loads(out.stdout)
        return data["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        srv.kill()
        srv.wait()


def throughput(root: str, backend: str, seconds: int, repeats: int) -> tuple[float, float]:
    """Median of ``repeats`` alternating runs: underlay, pods, underlay, pods..."""
    name = f"bt{os.getpid() % 1000}{backend[0]}"
    try:
        _, state = up(name, root, nodes=2, pods=1, backend=backend)
        n1, n2 = state.nodes
        p1 = next(p for p in state.pods if p.node == n1.name)
        p2 = next(p for p in state.pods if p.node == n2.name)
        underlay, pod = [], []
        for _ in range(repeats):
            underlay.append(iperf(n2.netns, n1.netns, str(n2.ip.ip), seconds))
            pod.append(iperf(p2.netns, p1.netns, str(p2.ip.ip), seconds))
        return statistics.median(underlay), statistics.median(pod)
    finally:
        lifecycle.down(name, root=root)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="3,10,20")
    ap.add_argument("--pods-per-node", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/lab.py needs root (network namespaces)", file=sys.stderr)
        return 2
    root = tempfile.mkdtemp(prefix="ocl-bench-")
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        print(f"== lab up: bring-up time ({args.pods_per_node} pods per node, vxlan, sqlite)")
        base = None
        conv_done = False
        for n in sizes:
            name = f"bu{os.getpid() % 1000}n{n}"
            try:
                t, _ = up(name, root, nodes=n, pods=args.pods_per_node)
                base = base or (sizes[0], t)
                growth = (t / base[1]) / (n / base[0])
                print(f"  {n:3d} nodes: {t:6.2f} s  ({t / n:5.2f} s/node; t/t({base[0]}) = {t / base[1]:4.2f} for {n / base[0]:4.2f}x nodes, "
                      f"growth vs linear {growth:4.2f})")  # fmt: skip
                if not conv_done and n >= 10:
                    ready, conv, peers = convergence(name, root)
                    print(f"  node add in a {n}-node lab: agent ready after {ready:5.2f} s, all {peers} peers route its block after {conv:5.2f} s")
                    conv_done = True
            finally:
                lifecycle.down(name, root=root)
        if not args.skip_throughput:
            print(f"== cross-node pod-to-pod TCP throughput (iperf3, {args.seconds} s, one stream, median of {args.repeats} "
                  "alternating runs), ratio to the node-to-node underlay in the same lab")  # fmt: skip
            for backend, aim in (("vxlan", 0.85), ("direct", 0.95)):
                underlay, pod = throughput(root, backend, args.seconds, args.repeats)
                print(f"  {backend:6s}: underlay {underlay:6.2f} Gbit/s, pod-to-pod {pod:6.2f} Gbit/s, ratio {pod / underlay:4.2f} (aim >= {aim})")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
