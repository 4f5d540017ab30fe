"""Lab benchmarks (root; every packet stays inside the lab's namespaces).

1. Bring-up time of ``lab up`` for 3, 10 and 20 nodes (2 pods per node): the
   figure is the growth, printed as seconds per node and as the ratio of
   t(N)/t(3) to N/3 (1.0 = linear).
2. Convergence: in the 10-node lab, time from ``lab node add`` until every
   peer has a route to the new node's block (polled with ``ip -j route``).
3. Cross-node pod-to-pod TCP throughput (iperf3) per backend, as a ratio of
   the node-to-node underlay throughput measured in the same lab, same run
   (underlay and pod runs alternate; medians of ``--repeats``).
4. WireGuard: pod-to-pod throughput as a ratio of the same run's vxlan (a
   vxlan and a wireguard lab side by side, runs alternating); the time from
   a node joining (``lab node add`` called) to its first WireGuard packet on
   an existing node's underlay, and to the first handshake response (the
   tunnel is up); the pings lost while a node's key is rotated under a 10 ms
   ping. Medians of ``--repeats`` with the spread (min-max).

Usage: .venv/bin/python bench/lab.py [--sizes 3,10,20] [--seconds 5] [--skip-throughput] [--only-wireguard]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from overlaycni.config import parse_network
from overlaycni.lab import lifecycle, members, topology


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


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"median {fmt.format(statistics.median(values))} (min {fmt.format(min(values))}, max {fmt.format(max(values))})"


def wireguard_throughput(root: str, seconds: int, repeats: int) -> None:
    """vxlan and wireguard labs side by side; underlay, vxlan pods, wireguard pods, alternating."""
    names = {b: f"bw{os.getpid() % 1000}{b[0]}" for b in ("vxlan", "wireguard")}
    try:
        pairs = {}
        for backend, name in names.items():
            _, state = up(name, root, nodes=2, pods=1, backend=backend)
            n1, n2 = state.nodes
            pairs[backend] = (state, next(p for p in state.pods if p.node == n1.name), next(p for p in state.pods if p.node == n2.name))
        underlay, vx, wg = [], [], []
        for _ in range(repeats):
            state = pairs["vxlan"][0]
            underlay.append(iperf(state.nodes[1].netns, state.nodes[0].netns, str(state.nodes[1].ip.ip), seconds))
            for backend, out in (("vxlan", vx), ("wireguard", wg)):
                _, p1, p2 = pairs[backend]
                out.append(iperf(p2.netns, p1.netns, str(p2.ip.ip), seconds))
        ratios = [w / v for w, v in zip(wg, vx, strict=True)]
        print(f"  underlay {spread(underlay)} Gbit/s; vxlan pods {spread(vx)} Gbit/s; wireguard pods {spread(wg)} Gbit/s")
        print(f"  wireguard / vxlan (per run): {spread(ratios)}  (userspace wireguard-go here; the kernel module is faster)")
    finally:
        for name in names.values():
            lifecycle.down(name, root=root)


def first_packets(path: str, new_ip: str) -> tuple[float | None, float | None]:
    """(first WireGuard packet to or from ``new_ip``, first handshake response) from ``tcpdump -tt`` text."""
    first = response = None
    with open(path, errors="replace") as fh:
        lines = fh.read().splitlines()
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] != "IP" or new_ip not in line:
            continue
        t = float(parts[0])
        first = first or t
        if line.rstrip().endswith("length 92"):  # a handshake response message is 92 bytes
            response = response or t
    return first, response


def join_to_first_packet(root: str, repeats: int) -> None:
    name = f"bj{os.getpid() % 1000}"
    firsts, tunnels, readies = [], [], []
    try:
        state = lifecycle.up(lifecycle.UpRequest(name=name, nodes=3, pods_per_node=0, network={"backend": "wireguard"}, root=root))
        watcher = state.nodes[0]
        net = parse_network(state.network)
        for _ in range(repeats):
            index = topology.next_free_index({n.index for n in members.open_lab(name, root).nodes})
            new_ip = str(topology.addressing(net).node_ip(index).ip)
            cap_file = os.path.join(root, f"join-{index}.txt")
            with open(cap_file, "w") as out:
                cap = subprocess.Popen(["ip", "netns", "exec", watcher.netns, "tcpdump", "-i", "eth0", "-n", "-l", "-tt",
                                        "udp", "port", "51820", "and", "host", new_ip],
                                       stdout=out, stderr=subprocess.PIPE, text=True)  # fmt: skip
                assert cap.stderr is not None
                while "listening on" not in (line := cap.stderr.readline()):
                    if not line:
                        raise SystemExit("tcpdump did not start")
                t0 = time.time()
                node = members.add_node(name, root=root)
                readies.append(time.time() - t0)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and first_packets(cap_file, new_ip)[1] is None:
                    time.sleep(0.05)
                cap.terminate()
                cap.wait()
            first, response = first_packets(cap_file, new_ip)
            if first is None or response is None:
                raise SystemExit(f"no WireGuard handshake between {watcher.name} and {new_ip} within 30 s")
            firsts.append(first - t0)
            tunnels.append(response - t0)
            members.delete_node(name, node.name, root=root)
        print(f"  agent ready after {spread(readies)} s; first WireGuard packet after {spread(firsts)} s; "
              f"handshake done after {spread(tunnels)} s  ({repeats} joins, each counted from `lab node add`)")  # fmt: skip
    finally:
        lifecycle.down(name, root=root)


def rotation_loss(root: str, repeats: int) -> None:
    name = f"br{os.getpid() % 1000}"
    lost, worst = [], []
    try:
        state = lifecycle.up(lifecycle.UpRequest(name=name, nodes=2, pods_per_node=1, network={"backend": "wireguard"}, root=root))
        a, b = state.pods
        oc = os.path.join(os.path.dirname(sys.executable), "overlaycni")
        for _ in range(repeats):
            ping = subprocess.Popen(["ip", "netns", "exec", a.netns, "ping", "-n", "-q", "-i", "0.01", "-c", "500", "-W", "1",
                                     str(b.ip.ip)], stdout=subprocess.PIPE, text=True)  # fmt: skip
            time.sleep(1.0)
            subprocess.run([oc, "--datastore", state.datastore, "node", "rotate-key", b.node, "--cluster", name],
                           check=True, capture_output=True, timeout=60)  # fmt: skip
            out, _ = ping.communicate(timeout=60)
            counts = re.search(r"(\d+) packets transmitted, (\d+) received", out)
            rtt = re.search(r"= [\d.]+/[\d.]+/([\d.]+)/", out)
            if counts is None or rtt is None:
                raise SystemExit(f"unexpected ping output: {out}")
            lost.append(int(counts.group(1)) - int(counts.group(2)))
            worst.append(float(rtt.group(1)))
        print(f"  key rotation under a 10 ms ping: {spread([float(x) for x in lost], '{:.0f}')} packets lost of 500; "
              f"slowest reply {spread(worst, '{:.0f}')} ms")  # fmt: skip
    finally:
        lifecycle.down(name, root=root)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="3,10,20")
    ap.add_argument("--pods-per-node", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--only-wireguard", action="store_true", help="only the WireGuard measurements (4.)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/lab.py needs root (network namespaces)", file=sys.stderr)
        return 2
    root = tempfile.mkdtemp(prefix="ocl-bench-")
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        if args.only_wireguard:
            sizes = []
        else:
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
            if not args.only_wireguard:
                print(f"== cross-node pod-to-pod TCP throughput (iperf3, {args.seconds} s, one stream, median of {args.repeats} "
                      "alternating runs), ratio to the node-to-node underlay in the same lab")  # fmt: skip
            for backend, aim in (("vxlan", 0.85), ("direct", 0.95)):
                if args.only_wireguard:
                    continue
                underlay, pod = throughput(root, backend, args.seconds, args.repeats)
                print(f"  {backend:6s}: underlay {underlay:6.2f} Gbit/s, pod-to-pod {pod:6.2f} Gbit/s, ratio {pod / underlay:4.2f} (aim >= {aim})")
            print("== wireguard pod-to-pod throughput against the same run's vxlan")
            wireguard_throughput(root, args.seconds, args.repeats)
        print("== wireguard: a node joins; its first encrypted packet on an existing node's underlay")
        join_to_first_packet(root, args.repeats)
        print("== wireguard: key rotation under load")
        rotation_loss(root, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
