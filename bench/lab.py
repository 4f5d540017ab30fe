"""Lab benchmarks (root; every packet stays inside the lab's namespaces).

1. Bring-up time of ``lab up`` for 3, 10 and 20 nodes (2 pods per node): the
   figure is the growth, printed as seconds per node and as the ratio of
   t(N)/t(3) to N/3 (1.0 = linear).
2. Convergence: in the 10-node lab, time from ``lab node add`` until every
   peer has a route to the new node's block (polled with ``ip -j route``).
3. TCP throughput against the kernel's own VXLAN (issue 14): a vxlan lab and a
   direct lab (2 nodes, 1 pod each, one NetworkPolicy selecting every pod so
   the policy table is live; anti-spoofing and the VXLAN filters on), and in
   the vxlan lab a bare kernel VXLAN pair between the two node namespaces
   (VNI 4097, port 4790, 198.18.0.1-2; no CNI involved). Paths: node-to-node
   underlay, bare VXLAN, pods over overlaycni vxlan, the direct lab's
   underlay, pods over direct. Each round runs every path once, the order
   rotating round by round (A B C, B C A, ...), for each ``--streams``
   value; ratios are taken per round, then the median and spread (min-max)
   over ``--repeats`` rounds, with the load average. Besides Gbit/s, Gbit per
   CPU-second (iperf3's own client + server CPU accounting) is printed: on a
   shared, loaded machine it moves less than throughput. ``--ablate`` adds
   two paths that take the pod path apart: the same pods with every node
   table of their lab replaced by a stand-in that keeps conntrack on (and,
   on vxlan, the outer flow untracked) but has no rule and no NAT hook
   (``ABLATED``; the agents are paused with SIGSTOP for the whole
   measurement, so they do not repair the tables, and the tables are put
   back before each other path runs). "pods / pods without rules" is what
   every nftables rule of the pod path costs; the rest of the gap to the
   bare link is the path itself (the extra veth hop and IP forwarding on
   each node).
4. WireGuard: pod-to-pod throughput as a ratio of the same run's vxlan (a
   vxlan and a wireguard lab side by side, runs alternating); the time from
   a node joining (``lab node add`` called) to its first WireGuard packet on
   an existing node's underlay, and to the first handshake response (the
   tunnel is up); the pings lost while a node's key is rotated under a 10 ms
   ping. Medians of ``--repeats`` with the spread (min-max).
5. Dual-stack: in a dual-stack lab (``--ip-families ipv4,ipv6``) per backend
   (vxlan, direct), cross-node pod-to-pod TCP throughput over IPv6 as a
   ratio of the same pods' IPv4 throughput, runs alternating (IPv4, IPv6,
   IPv4, ...; the order flips every run); the ratio is taken per run, then
   the median and spread of ``--repeats`` runs (aim >= 0.95: IPv6 inside the
   same VXLAN device costs 20 more header bytes per packet, nothing else).

Usage: .venv/bin/python bench/lab.py [--sizes 3,10,20] [--seconds 5] [--repeats 3] [--streams 1,4]
       [--skip-throughput] [--only-throughput] [--bare-notrack] [--ablate] [--only-wireguard] [--only-dual-stack]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from overlaycni.config import parse_network
from overlaycni.lab import lifecycle, members, procs, topology


def up(name: str, root: str, *, nodes: int, pods: int, backend: str = "vxlan", dual: bool = False) -> tuple[float, object]:
    t0 = time.perf_counter()
    network = {"backend": backend, **({"ip-families": "ipv4,ipv6"} if dual else {})}
    state = lifecycle.up(lifecycle.UpRequest(name=name, nodes=nodes, pods_per_node=pods, network=network, root=root))
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


class Iperf:
    """iperf3 servers kept running in the target namespaces; one client run per call.

    Client and servers run at nice -20: the machine is shared, and a higher
    priority makes a run's CPU share (which is what a virtual link's
    throughput measures) depend less on the other load. ``measure`` returns
    (Gbit/s, Gbit per CPU-second of client + server): the second figure is
    iperf3's own CPU accounting, steadier than throughput on a loaded host
    (softirq work runs in the sending and receiving processes' context)."""

    PORT = 5201

    def __init__(self) -> None:
        self.servers: dict[str, subprocess.Popen] = {}

    def serve(self, netns: str) -> None:
        if netns in self.servers:
            return
        self.servers[netns] = subprocess.Popen(["nice", "-n", "-20", "ip", "netns", "exec", netns, "iperf3", "-s", "-p", str(self.PORT)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        for _ in range(50):  # wait for the listener
            r = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Hltn", f"sport = :{self.PORT}"], capture_output=True, text=True)
            if r.stdout.strip():
                return
            time.sleep(0.1)
        raise SystemExit(f"iperf3 server in {netns} did not start")

    def measure(self, client_ns: str, server_ip: str, *, seconds: float, streams: int = 1) -> tuple[float, float]:
        cmd = ["nice", "-n", "-20", "ip", "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-p", str(self.PORT),
               "-t", str(seconds), "-O", "1", "-P", str(streams), "-J"]  # fmt: skip
        err = ""
        for _ in range(3):  # the server takes one test at a time; a refused or failed run is retried
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
            try:
                end = json.loads(out.stdout)["end"]
                gbit = end["sum_received"]["bits_per_second"] / 1e9
                cpu = (end["cpu_utilization_percent"]["host_total"] + end["cpu_utilization_percent"]["remote_total"]) / 100
                return gbit, gbit / cpu
            except (ValueError, KeyError, ZeroDivisionError):
                err = (out.stdout or out.stderr)[-300:]
                time.sleep(0.5)
        raise SystemExit(f"iperf3 {client_ns} -> {server_ip}: {err}")

    def close(self) -> None:
        for proc in self.servers.values():
            proc.kill()
            proc.wait()
        self.servers.clear()


def iperf(server_ns: str, client_ns: str, server_ip: str, seconds: int) -> float:
    """Gbit/s of one TCP stream from client_ns to server_ip (server in server_ns)."""
    runner = Iperf()
    try:
        runner.serve(server_ns)
        return runner.measure(client_ns, server_ip, seconds=seconds)[0]
    finally:
        runner.close()


# --- throughput against the kernel's own VXLAN (issue 14 item 4) --------------------

BARE_VNI, BARE_PORT, BARE_DEV = 4097, 4790, "bvx0"  # not "oc*": the node tables leave it alone
BARE_NET = "198.18.0"  # RFC 2544's benchmarking range, outside every lab range
POLICY = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bench-allow, namespace: default}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{namespaceSelector: {}}]}]
  egress: [{to: [{namespaceSelector: {}}]}]
"""


def ns_run(netns: str, *cmd: str) -> str:
    out = subprocess.run(["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{netns}: {' '.join(cmd)}: {out.stderr.strip()}")
    return out.stdout


def bare_vxlan(state, *, notrack: bool = False) -> str:
    """A VXLAN pair between the two node namespaces, no CNI involved: the price of
    encapsulation on this kernel. Returns the far end's address."""
    n1, n2 = state.nodes
    for i, (me, peer) in enumerate(((n1, n2), (n2, n1)), 1):
        ns_run(me.netns, "ip", "link", "add", BARE_DEV, "type", "vxlan", "id", str(BARE_VNI), "dstport", str(BARE_PORT),
               "local", str(me.ip.ip), "remote", str(peer.ip.ip), "dev", "eth0")  # fmt: skip
        ns_run(me.netns, "ip", "addr", "add", f"{BARE_NET}.{i}/24", "dev", BARE_DEV)
        ns_run(me.netns, "ip", "link", "set", BARE_DEV, "up")
        if notrack:
            ns_run(me.netns, "nft", f"table ip bench {{ chain pre {{ type filter hook prerouting priority raw; udp dport {BARE_PORT} notrack; }}; "
                   f"chain out {{ type filter hook output priority raw; udp dport {BARE_PORT} notrack; }}; }}")  # fmt: skip
    ns_run(n1.netns, "ping", "-c", "3", "-i", "0.2", "-W", "1", f"{BARE_NET}.2")  # resolves the neighbour
    return f"{BARE_NET}.2"


def apply_policy(name: str, root: str, state) -> None:
    """One NetworkPolicy selecting every pod (allowing all pod traffic): the policy table is live."""
    oc = os.path.join(os.path.dirname(sys.executable), "overlaycni")
    subprocess.run([oc, "policy", "apply", "-f", "-", "--lab", name], input=POLICY, text=True, check=True, capture_output=True,
                   env={**os.environ, "OVERLAYCNI_LAB_DIR": root})  # fmt: skip
    deadline = time.monotonic() + 30
    for node in state.nodes:
        while "ingress-pods" not in subprocess.run(["ip", "netns", "exec", node.netns, "nft", "list", "table", "inet", "overlaycni"],
                                                   capture_output=True, text=True).stdout:  # fmt: skip
            if time.monotonic() > deadline:
                raise SystemExit(f"{node.name}: the policy table never appeared")
            time.sleep(0.1)


# --ablate: a node table with no rule and no NAT hook; conntrack stays on (the ``ct``
# expression registers it) and the outer VXLAN flow stays untracked, as with the real tables
ABLATED = """table ip ocbench {
  chain pre {
    type filter hook prerouting priority raw; policy accept;
    udp dport 4789 notrack
    ct state invalid counter
  }
  chain out {
    type filter hook output priority raw; policy accept;
    udp dport 4789 notrack
  }
}
"""


class Ablation:
    """The node tables of one lab swapped for ``ABLATED`` and back; the
    lab's agents are paused (SIGSTOP) from ``pause`` to ``close``."""

    def __init__(self, state) -> None:
        self.state = state
        self.saved: dict[str, str] = {}
        self.paused: list = []

    def pause(self) -> None:
        for node in self.state.nodes:
            if node.agent is not None and procs.alive(node.agent):
                os.kill(node.agent.pid, signal.SIGSTOP)
                self.paused.append(node.agent)
        self.saved = {n.netns: ns_run(n.netns, "nft", "list", "ruleset") for n in self.state.nodes}

    def _load(self, netns: str, text: str) -> None:
        ns_run(netns, "nft", "flush", "ruleset")
        out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=text, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{netns}: nft -f: {out.stderr.strip()}")

    def strip(self) -> None:
        for netns in self.saved:
            self._load(netns, ABLATED)

    def restore(self) -> None:
        for netns, text in self.saved.items():
            self._load(netns, text)

    def close(self) -> None:
        if self.saved:
            self.restore()
        for proc in self.paused:
            if procs.alive(proc):
                os.kill(proc.pid, signal.SIGCONT)
        self.paused.clear()


def pod_pair(state):
    n1, n2 = state.nodes
    return next(p for p in state.pods if p.node == n1.name), next(p for p in state.pods if p.node == n2.name)


def ratio_line(label: str, num: list[float], den: list[float], aim: float | None = None) -> str:
    r = [a / b for a, b in zip(num, den, strict=True)]
    return f"    {label:28s} {spread(r, '{:.3f}')}" + (f"  (aim >= {aim})" if aim else "")


def vs_kernel_vxlan(root: str, *, seconds: float, rounds: int, streams: tuple[int, ...], bare_notrack: bool,
                    ablate: bool = False) -> None:
    """Underlay, bare kernel VXLAN and overlaycni pods (vxlan lab); underlay and pods (direct
    lab): every path once per round, the order rotating each round; ratios per round. With
    ``ablate``, the pods of each lab once more without their node tables (``Ablation``)."""
    tag = os.getpid() % 1000
    names = {"vxlan": f"bx{tag}", "direct": f"bd{tag}"}
    runner = Iperf()
    ablations: dict[str, Ablation] = {}
    try:
        states = {}
        for backend, name in names.items():
            _, state = up(name, root, nodes=2, pods=1, backend=backend)
            apply_policy(name, root, state)
            states[backend] = state
        vx, di = states["vxlan"], states["direct"]
        bare_ip = bare_vxlan(vx, notrack=bare_notrack)
        (vp1, vp2), (dp1, dp2) = pod_pair(vx), pod_pair(di)
        paths = {  # name: (client netns, server netns, server IP)
            "underlay": (vx.nodes[0].netns, vx.nodes[1].netns, str(vx.nodes[1].ip.ip)),
            "bare vxlan": (vx.nodes[0].netns, vx.nodes[1].netns, bare_ip),
            "pods vxlan": (vp1.netns, vp2.netns, str(vp2.ip.ip)),
            "underlay (direct lab)": (di.nodes[0].netns, di.nodes[1].netns, str(di.nodes[1].ip.ip)),
            "pods direct": (dp1.netns, dp2.netns, str(dp2.ip.ip)),
        }
        stripped = {}  # path: the lab whose tables it runs without
        if ablate:
            ablations = {"vxlan": Ablation(vx), "direct": Ablation(di)}
            for backend, path in (("vxlan", "pods vxlan"), ("direct", "pods direct")):
                ablations[backend].pause()
                paths[f"{path}, no rules"] = paths[path]
                stripped[f"{path}, no rules"] = ablations[backend]
        for _, server_ns, _ in paths.values():
            runner.serve(server_ns)
        order = list(paths)
        for p in streams:
            gbit: dict[str, list[float]] = {k: [] for k in paths}
            eff: dict[str, list[float]] = {k: [] for k in paths}
            loads = []
            for r in range(rounds):
                loads.append(os.getloadavg()[0])
                for k in order[r % len(order):] + order[: r % len(order)]:
                    client, _, ip = paths[k]
                    if k in stripped:
                        stripped[k].strip()
                    try:
                        g, e = runner.measure(client, ip, seconds=seconds, streams=p)
                    finally:
                        if k in stripped:
                            stripped[k].restore()
                    gbit[k].append(g)
                    eff[k].append(e)
            print(f"  {p} stream{'s' if p > 1 else ''}, {rounds} rounds of {seconds:g} s, load average {spread(loads, '{:.1f}')}")
            for k in paths:
                print(f"    {k:28s} {spread(gbit[k])} Gbit/s   {spread(eff[k], '{:.1f}')} Gbit per CPU-s")
            for what, d in (("throughput", gbit), ("per CPU-second", eff)):
                print(f"   ratios, {what} (per round):")
                print(ratio_line("pods vxlan / bare vxlan", d["pods vxlan"], d["bare vxlan"], 0.95 if p == 1 else None))
                print(ratio_line("pods vxlan / underlay", d["pods vxlan"], d["underlay"]))
                print(ratio_line("bare vxlan / underlay", d["bare vxlan"], d["underlay"]))
                print(ratio_line("pods direct / underlay", d["pods direct"], d["underlay (direct lab)"], 0.95 if p == 1 else None))
                for path in stripped:  # "pods vxlan, no rules": what the rules cost, and the path without them
                    pods = path.split(",")[0]
                    backend = pods.split()[1]
                    base = "bare vxlan" if backend == "vxlan" else "underlay (direct lab)"
                    print(ratio_line(f"{pods} / no rules", d[pods], d[path]))
                    print(ratio_line(f"no rules {backend} / {base.split(' (')[0]}", d[path], d[base]))
    finally:
        runner.close()
        for ablation in ablations.values():
            ablation.close()
        for name in names.values():
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


def dual_stack_throughput(root: str, backend: str, seconds: int, repeats: int) -> None:
    """IPv6 / IPv4 pod-to-pod in one dual-stack lab, the same two pods, runs
    alternating (the family that goes first flips every run)."""
    name = f"bd{os.getpid() % 1000}{backend[0]}"
    try:
        _, state = up(name, root, nodes=2, pods=1, backend=backend, dual=True)
        n1, n2 = state.nodes  # type: ignore[attr-defined]
        p1 = next(p for p in state.pods if p.node == n1.name)  # type: ignore[attr-defined]
        p2 = next(p for p in state.pods if p.node == n2.name)  # type: ignore[attr-defined]
        v4: list[tuple[float, float]] = []  # (Gbit/s, Gbit per CPU-second) per run
        v6: list[tuple[float, float]] = []
        runner = Iperf()
        runner.serve(p2.netns)
        for i in range(repeats):
            runs = [(v4, p2.ip.ip), (v6, p2.ip_v6.ip)]
            for out, dst in runs if i % 2 == 0 else runs[::-1]:
                out.append(runner.measure(p1.netns, str(dst), seconds=seconds))
        runner.close()
        ratios = [b[0] / a[0] for a, b in zip(v4, v6, strict=True)]
        per_cpu = [b[1] / a[1] for a, b in zip(v4, v6, strict=True)]
        print(f"  {backend:6s}: IPv4 pods {spread([g for g, _ in v4])} Gbit/s; IPv6 pods {spread([g for g, _ in v6])} Gbit/s; "
              f"IPv6 / IPv4 (per run) {spread(ratios)}, per CPU-second {spread(per_cpu)} (aim >= 0.95; "
              f"load {os.getloadavg()[0]:.1f})")  # fmt: skip
    finally:
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
    ap.add_argument("--only-throughput", action="store_true", help="only the throughput against the kernel's VXLAN (3.)")
    ap.add_argument("--streams", default="1,4", help="iperf3 -P values for 3. (comma-separated)")
    ap.add_argument("--bare-notrack", action="store_true", help="3.: exempt the bare VXLAN's outer flow from conntrack too")
    ap.add_argument("--ablate", action="store_true", help="3.: the pods once more without their node tables (agents paused)")
    ap.add_argument("--only-dual-stack", action="store_true", help="only the dual-stack throughput (5.)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/lab.py needs root (network namespaces)", file=sys.stderr)
        return 2
    root = tempfile.mkdtemp(prefix="ocl-bench-")
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        if args.only_dual_stack:
            print(f"== dual-stack: cross-node pod-to-pod TCP throughput over IPv6 / IPv4 (iperf3, {args.seconds} s, one stream, "
                  f"{args.repeats} alternating runs)")  # fmt: skip
            for backend in ("vxlan", "direct"):
                dual_stack_throughput(root, backend, args.seconds, args.repeats)
            return 0
        if args.only_wireguard or args.only_throughput:
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
        if not args.skip_throughput and not args.only_wireguard:
            print(f"== TCP throughput against the kernel's own VXLAN (iperf3, one NetworkPolicy applied, "
                  f"bare VXLAN outer flow {'untracked' if args.bare_notrack else 'tracked'})")  # fmt: skip
            vs_kernel_vxlan(root, seconds=args.seconds, rounds=args.repeats, streams=tuple(int(x) for x in args.streams.split(",")),
                            bare_notrack=args.bare_notrack, ablate=args.ablate)  # fmt: skip
        if args.only_throughput:
            return 0
        if not args.skip_throughput:
            print("== wireguard pod-to-pod throughput against the same run's vxlan")
            wireguard_throughput(root, args.seconds, args.repeats)
            if not args.only_wireguard:
                print(f"== dual-stack: cross-node pod-to-pod TCP throughput over IPv6 / IPv4 (iperf3, {args.seconds} s, "
                      f"{args.repeats} alternating runs)")  # fmt: skip
                for backend in ("vxlan", "direct"):
                    dual_stack_throughput(root, backend, args.seconds, args.repeats)
        print("== wireguard: a node joins; its first encrypted packet on an existing node's underlay")
        join_to_first_packet(root, args.repeats)
        print("== wireguard: key rotation under load")
        rotation_loss(root, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
