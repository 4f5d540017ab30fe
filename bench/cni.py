#!/usr/bin/env python3
"""CNI ADD/DEL latency and a 50-pod burst: overlaycni vs Debian's reference
``bridge`` + ``host-local`` plugins, measured in the same run.

Everything happens in namespaces this script creates (two "node" namespaces,
one per plugin, and one namespace per pod); both plugins are launched the same
way (``nsenter --net=<node netns>``, as a runtime on that node would run
them), with the config on stdin. The figure is the ratio ours / reference.

``--policy`` measures overlaycni once more with a NetworkPolicy in the
cluster (deny-all ingress for the pods' namespace): an ADD then returns
only after the node's policy table holds the new pod, and the ratio
policy / no policy is the cost of that wait.

    .venv/bin/python bench/cni.py [--pods 100] [--burst 50] [--shim auto|native|python] [--policy]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OVERLAYCNI = str(ROOT / ".venv/bin/overlaycni")
REF_PATH = "/usr/lib/cni"


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


class Bench:
    def __init__(self) -> None:
        self.tag = "ocb" + secrets.token_hex(3)
        self.tmp = Path(tempfile.mkdtemp(prefix="overlaycni-bench-"))
        self.netns: list[str] = []
        self.agent: subprocess.Popen | None = None

    # ----- setup ------------------------------------------------------------------
    def ns(self, suffix: str) -> str:
        name = f"{self.tag}-{suffix}"
        sh("ip", "netns", "add", name)
        self.netns.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def node(self, suffix: str, ip: str) -> str:
        """A node namespace with an underlay interface (a veth pair: this
        kernel has no dummy links) carrying the node IP."""
        name = self.ns(suffix)
        sh("ip", "-n", name, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0p")
        sh("ip", "-n", name, "addr", "add", f"{ip}/16", "dev", "ul0")
        sh("ip", "-n", name, "link", "set", "ul0", "up")
        sh("ip", "-n", name, "link", "set", "ul0p", "up")
        return name

    def start_agent(self, node_ns: str, *, shim: str = "auto") -> dict:
        store = self.store = f"sqlite://{self.tmp}/state.db"
        sh(OVERLAYCNI, "--datastore", store, "cluster", "create", "--name", "bench",
           "--network-plugin", "azure", "--network-plugin-mode", "overlay", "--pod-cidr", "10.244.0.0/16",
           "--service-cidr", "10.0.0.0/16", "--dns-service-ip", "10.0.0.10")
        self.sock = str(self.tmp / "agent.sock")
        self.node_ns = node_ns
        with open(self.tmp / "agent.log", "w") as log:  # the agent keeps its own copy of the fd
            self.agent = subprocess.Popen(
                ["ip", "netns", "exec", node_ns, OVERLAYCNI, "--datastore", store, "agent", "--cluster", "bench",
                 "--node", "n1", "--node-ip", "10.224.0.4", "--socket", self.sock, "--metrics-addr", ""],
                stdout=subprocess.PIPE, stderr=log, text=True,
            )
        line = self.agent.stdout.readline()
        if not line:
            raise SystemExit(f"agent did not start; see {self.tmp}/agent.log:\n" + (self.tmp / "agent.log").read_text())
        installed = sh(OVERLAYCNI, "install-cni", "--cluster", "bench", "--bin-dir", str(self.tmp / "bin"),
                       "--conf-dir", str(self.tmp / "net.d"), "--socket", self.sock, "--shim", shim, "--output", "json")
        self.shim = json.loads(installed.stdout)["shim"]
        return json.loads(line)

    def deny_all(self) -> None:
        """A deny-all ingress NetworkPolicy for the pods' namespace ("bench"); waits until the node has it."""
        policy = self.tmp / "deny.yaml"
        policy.write_text("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                          "metadata: {name: deny-all, namespace: bench}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n")
        sh(OVERLAYCNI, "--datastore", self.store, "policy", "apply", "-f", str(policy), "--cluster", "bench")
        deadline = time.monotonic() + 30
        while "in-ns-bench" not in sh("ip", "netns", "exec", self.node_ns, "nft", "list", "table", "inet", "overlaycni",
                                      check=False).stdout:
            if time.monotonic() > deadline:
                raise SystemExit("the policy never reached the node")
            time.sleep(0.1)

    def cleanup(self) -> None:
        if self.agent and self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(5)
            except subprocess.TimeoutExpired:
                self.agent.kill()
        for name in reversed(self.netns):
            sh("ip", "netns", "del", name, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ----- plugins --------------------------------------------------------------------
    def run_plugin(self, node_ns: str, plugin: str, command: str, pod_ns: str, conf: dict) -> float:
        env = {
            "CNI_COMMAND": command, "CNI_CONTAINERID": pod_ns, "CNI_NETNS": f"/var/run/netns/{pod_ns}",
            "CNI_IFNAME": "eth0", "CNI_PATH": f"{self.tmp}/bin:{REF_PATH}", "PATH": os.environ["PATH"],
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={pod_ns}",
        }
        start = time.perf_counter()
        p = subprocess.run(["nsenter", f"--net=/var/run/netns/{node_ns}", plugin], input=json.dumps(conf),
                           env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if p.returncode != 0:
            raise SystemExit(f"{plugin} {command} failed: {p.stdout} {p.stderr}")
        return elapsed


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def measure(b: Bench, node_ns: str, plugin: str, conf: dict, pods: list[str], burst: list[str]) -> dict:
    add = [b.run_plugin(node_ns, plugin, "ADD", p, conf) for p in pods]
    dele = [b.run_plugin(node_ns, plugin, "DEL", p, conf) for p in pods]
    start = time.perf_counter()
    with ThreadPoolExecutor(len(burst)) as pool:
        list(pool.map(lambda p: b.run_plugin(node_ns, plugin, "ADD", p, conf), burst))
    wall = time.perf_counter() - start
    for p in burst:
        b.run_plugin(node_ns, plugin, "DEL", p, conf)
    return {"add_p50": pct(add, .5), "add_p99": pct(add, .99), "del_p50": pct(dele, .5),
            "del_p99": pct(dele, .99), "burst": wall, "add_mean": statistics.mean(add)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--burst", type=int, default=50)
    ap.add_argument("--shim", choices=("auto", "native", "python"), default="auto",
                    help="which build of our plugin to install (install-cni --shim)")
    ap.add_argument("--policy", action="store_true", help="also measure overlaycni with a NetworkPolicy in the cluster")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/cni.py needs root (network namespaces)", file=sys.stderr)
        return 2
    b = Bench()
    try:
        ours_node = b.node("n1", "10.224.0.4")
        ref_node = b.node("ref", "10.224.0.5")
        b.start_agent(ours_node, shim=args.shim)
        pods = [b.ns(f"p{i}") for i in range(args.pods)]
        burst = [b.ns(f"b{i}") for i in range(args.burst)]
        ours_conf = {"cniVersion": "1.0.0", "name": "overlaycni", "type": "overlaycni", "socket": b.sock}
        ref_conf = {"cniVersion": "1.0.0", "name": "ref", "type": "bridge", "bridge": "cni0", "isGateway": True,
                    "ipMasq": False, "ipam": {"type": "host-local", "subnet": "10.245.0.0/16",
                                             "dataDir": str(b.tmp / "host-local")}}
        ref = measure(b, ref_node, f"{REF_PATH}/bridge", ref_conf, pods, burst)
        ours = measure(b, ours_node, str(b.tmp / "bin/overlaycni"), ours_conf, pods, burst)
        if args.policy:
            b.deny_all()
            policy = measure(b, ours_node, str(b.tmp / "bin/overlaycni"), ours_conf, pods, burst)
    finally:
        b.cleanup()
    print(f"CNI latency over {args.pods} pods, burst of {args.burst} concurrent ADDs, {b.shim} shim"
          " (seconds; ratio = ours / reference)")
    print(f"{'metric':10} {'overlaycni':>11} {'bridge+host-local':>18} {'ratio':>7}")
    for k in ("add_p50", "add_p99", "del_p50", "del_p99", "burst"):
        print(f"{k:10} {ours[k]*1000:9.1f}ms {ref[k]*1000:16.1f}ms {ours[k]/ref[k]:7.2f}")
    if args.policy:
        print("\nwith a NetworkPolicy in the cluster (ADD waits for the pod's policy; ratio = policy / no policy)")
        print(f"{'metric':10} {'policy':>11} {'no policy':>18} {'ratio':>7}")
        for k in ("add_p50", "add_p99", "del_p50", "burst"):
            print(f"{k:10} {policy[k]*1000:9.1f}ms {ours[k]*1000:16.1f}ms {policy[k]/ours[k]:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
