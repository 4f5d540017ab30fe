#!/usr/bin/env python3
"""Cross-node pod-to-pod TCP throughput over IPv6 as a ratio of IPv4, in
the same run, on the kernel test harness (two dual-stack nodes, one pod
each: ``tests/kernel/datapath.py``), per backend.

Each round runs one iperf3 stream over IPv4 and one over IPv6 between the
same two pods (the order alternates from round to round); the table gives
the median of the per-round ratios IPv6 / IPv4, their spread (min..max)
and the median throughputs. With VXLAN both families share one device and
one pod MTU (1450), so the IPv6 stream carries 20 bytes less TCP payload
per packet (40-byte IPv6 header against 20): about 0.986 of IPv4 at equal
packet rates is what the headers alone predict.

    .venv/bin/python bench/dualstack_dp.py [--seconds 3] [--rounds 3] [--backend vxlan --backend direct]

Runs as root, entirely inside namespaces the harness creates and removes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.kernel.datapath import POD_B, POD_B6, two_node_cluster  # noqa: E402


def iperf(server_ns: str, client_ns: str, server_ip: str, seconds: int) -> float:
    """Gbit/s of one TCP stream from ``client_ns`` to ``server_ip`` (the server runs in ``server_ns``)."""
    srv = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", "5201"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(50):  # wait for the listener
            r = subprocess.run(["ip", "netns", "exec", server_ns, "ss", "-Hltn", "sport = :5201"], capture_output=True, text=True)
            if r.stdout.strip():
                break
            time.sleep(0.1)
        out = subprocess.run(["ip", "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-p", "5201", "-t", str(seconds), "-J"],
                             capture_output=True, text=True, timeout=seconds + 30)  # fmt: skip
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        srv.kill()
        srv.wait()


def measure(backend: str, seconds: int, rounds: int) -> dict[str, list[float]]:
    v4, v6 = [], []
    with two_node_cluster(backend, dual=True) as c:
        for r in range(rounds):
            order = [("v4", str(POD_B.ip)), ("v6", str(POD_B6.ip))]
            for fam, dst in order if r % 2 == 0 else order[::-1]:
                (v4 if fam == "v4" else v6).append(iperf(c.pb, c.pa, dst, seconds))
    return {"v4": v4, "v6": v6, "ratio": [b / a for a, b in zip(v4, v6, strict=True)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", action="append", choices=["vxlan", "direct"])
    args = ap.parse_args()
    print(f"== pod-to-pod TCP across two nodes, IPv6 / IPv4 (iperf3, {args.seconds} s, one stream, {args.rounds} rounds)")
    print(f"{'backend':8} {'IPv4 Gbit/s':>12} {'IPv6 Gbit/s':>12} {'IPv6/IPv4':>10} {'spread':>14}")
    for backend in args.backend or ["vxlan", "direct"]:
        m = measure(backend, args.seconds, args.rounds)
        ratio = m["ratio"]
        print(f"{backend:8} {statistics.median(m['v4']):12.2f} {statistics.median(m['v6']):12.2f} "
              f"{statistics.median(ratio):10.3f} {min(ratio):6.3f}..{max(ratio):.3f}")


if __name__ == "__main__":
    main()
