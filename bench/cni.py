#!/usr/bin/env python3
"""CNI ADD/DEL latency, concurrent bursts, and where an ADD's time goes:
overlaycni vs Debian's reference ``bridge`` + ``host-local`` plugins,
measured in the same run.

Everything happens in namespaces this script creates (two "node" namespaces,
one per plugin, and one namespace per pod); both plugins are launched the same
way (``nsenter --net=<node netns>``, as a runtime on that node would run
them), with the config on stdin. The figure is the ratio ours / reference.

Each round measures both plugins, alternating which goes first (ours then
the reference, then the other way round), so that load drift on a shared
machine hits both: sequential ADDs then DELs (p50, p99), then each burst size
(``--bursts``, default 50 and 150: AKS's pod-start investigation uses 150
pods on one node) as that many concurrent ADDs, then as many concurrent
DELs (wall time from the first start to the last exit; a request answered
11, "try again later", runs again after a short back-off as a runtime would,
its time included,
and the summary says how many). Ratios are taken within a round; the summary prints the median over ``--rounds`` (at least
3) and the spread (min-max).

The breakdown: every overlaycni ADD asks for its trace (``CNI_ARGS``
``OVERLAYCNI_DEBUG=timings``, see ``overlaycni.trace``), which the agent
returns in the result's ``debug`` member with its phases and its
CLOCK_MONOTONIC stamps; this script stamps the plugin's start and exit on
the same clock, so "plugin start + connect" (spawn -> the agent accepted the
connection; ``nsenter`` included, as for the reference) and "reply + exit"
(the agent built the answer -> the plugin exited) come apart from the
agent's own phases. A ``VERSION`` call (no agent) shows the bare process
start + exit. DEL phases are read from the agent's
``overlaycni_cni_phase_seconds`` histograms (means); a DEL's conntrack
walk and its veth delete are no longer among them (the agent answers once
the veth is parked, and deletes the parked veths then flushes the
quarantined addresses together when idle, ``agent.quarantine``):
the summary says how many drains released how many addresses.

``--policy`` measures overlaycni once more with a NetworkPolicy in the
cluster (deny-all ingress for the pods' namespace): an ADD then returns
only after the node's policy table holds the new pod, and the ratio
policy / no policy is the cost of that wait.

    .venv/bin/python bench/cni.py [--pods 60] [--bursts 50,150] [--rounds 3]
                                  [--shim auto|native|python] [--policy] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OVERLAYCNI = str(ROOT / ".venv/bin/overlaycni")
PYTHON = str(ROOT / ".venv/bin/python")
REF_PATH = "/usr/lib/cni"
RETRIES = 8
AGENT_PHASES = ("read", "queue", "lock", "netns", "batch", "quarantine", "ipam", "kernel", "veth", "sysctl", "route",
                "nft", "conntrack", "policy")
SUB_KERNEL = ("veth", "sysctl", "route", "nft")


def sh(*cmd: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


class Bench:
    def __init__(self) -> None:
        self.tag = "ocb" + secrets.token_hex(3)
        self.tmp = Path(tempfile.mkdtemp(prefix="overlaycni-bench-"))
        self.netns: list[str] = []
        self.agent: subprocess.Popen | None = None
        self.metrics_url: str | None = None
        self.traces: list[dict[str, float]] = []  # one per overlaycni ADD: the agent's phases + ours
        self.retries = 0  # requests answered 11 ("try again later") and run again
        self.retried: dict[tuple[str, str], int] = {}  # (plugin, burst) -> retries over the rounds
        self.gave_up = 0  # requests still answered 11 after RETRIES tries
        self._lock = threading.Lock()

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
                 "--node", "n1", "--node-ip", "10.224.0.4", "--socket", self.sock,
                 "--metrics-addr", "127.0.0.1:0"],  # the node namespace's loopback
                stdout=subprocess.PIPE, stderr=log, text=True,
            )
        assert self.agent.stdout is not None
        line = self.agent.stdout.readline()
        if not line:
            raise SystemExit(f"agent did not start; see {self.tmp}/agent.log:\n" + (self.tmp / "agent.log").read_text())
        ready = json.loads(line)
        self.metrics_url = ready.get("metrics")
        installed = sh(OVERLAYCNI, "install-cni", "--cluster", "bench", "--bin-dir", str(self.tmp / "bin"),
                       "--conf-dir", str(self.tmp / "net.d"), "--socket", self.sock, "--shim", shim, "--output", "json")
        self.shim = json.loads(installed.stdout)["shim"]
        return ready

    def phase_sums(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(command, phase) -> (sum, count) of the agent's phase histograms."""
        if not self.metrics_url:
            return {}
        text = sh("ip", "netns", "exec", self.node_ns, PYTHON, "-c",
                  "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())",
                  self.metrics_url + "/metrics").stdout
        out: dict[tuple[str, str], list[float]] = {}
        pat = re.compile(r'^overlaycni_cni_phase_seconds_(sum|count)\{command="(\w+)",phase="(\w+)"\} (\S+)$')
        for line in text.splitlines():
            m = pat.match(line)
            if m:
                kind, command, phase, value = m.groups()
                out.setdefault((command, phase), [0.0, 0.0])[kind == "count"] = float(value)
        return {k: (v[0], v[1]) for k, v in out.items()}

    def quarantine(self) -> dict[str, Any]:
        """The agent's DEL quarantine (``agent status``): its drains and the addresses they released."""
        got = sh(OVERLAYCNI, "agent", "status", "--socket", self.sock, "--output", "json", check=False)
        return (json.loads(got.stdout) if got.stdout.strip() else {}).get("quarantine") or {}

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
    def run_plugin(self, node_ns: str, plugin: str, command: str, pod_ns: str, conf: dict, *, ours: bool) -> float:
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={pod_ns}"
        if ours and command == "ADD":
            args += ";OVERLAYCNI_DEBUG=timings"
        env = {
            "CNI_COMMAND": command, "CNI_CONTAINERID": pod_ns, "CNI_NETNS": f"/var/run/netns/{pod_ns}",
            "CNI_IFNAME": "eth0", "CNI_PATH": f"{self.tmp}/bin:{REF_PATH}", "PATH": os.environ["PATH"],
            "CNI_ARGS": args,
        }
        first = time.monotonic()
        for attempt in range(RETRIES + 1):
            spawn = time.monotonic()
            p = subprocess.run(["nsenter", f"--net=/var/run/netns/{node_ns}", plugin], input=json.dumps(conf),
                               env=env, capture_output=True, text=True)
            end = time.monotonic()
            if p.returncode == 0:
                break
            answer = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
            if answer.get("code") != 11:  # 11: try again later, as a runtime does
                raise SystemExit(f"{plugin} {command} failed: {p.stdout} {p.stderr}")
            if attempt == RETRIES:
                with self._lock:
                    self.gave_up += 1
                print(f"{command} {pod_ns}: still 'try again later' after {RETRIES} tries; giving up", file=sys.stderr)
                return end - first
            with self._lock:
                self.retries += 1
            time.sleep(min(2.0, 0.2 * 2**attempt))  # back off, as a runtime does
        if ours and command == "ADD" and p.returncode == 0:
            self._note(json.loads(p.stdout).get("debug"), spawn, end)
        return end - first

    def _note(self, debug: dict | None, spawn: float, end: float) -> None:
        if not debug:
            return
        row = dict(debug["timings"])
        row["start+connect"] = debug["accepted"] - spawn
        row["reply+exit"] = end - debug["answered"]
        row["total"] = end - spawn
        row["batch_size"] = debug.get("batch", 0)
        with self._lock:
            self.traces.append(row)

    def version_run(self, node_ns: str, plugin: str) -> float:
        """The plugin's process start + exit alone (VERSION: answered without the agent)."""
        env = {"CNI_COMMAND": "VERSION", "PATH": os.environ["PATH"]}
        start = time.perf_counter()
        sh("nsenter", f"--net=/var/run/netns/{node_ns}", plugin, input=json.dumps({"cniVersion": "1.0.0"}), env=env)
        return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class Plugin:
    def __init__(self, b: Bench, name: str, node_ns: str, path: str, conf: dict, *, ours: bool) -> None:
        self.b, self.name, self.node_ns, self.path, self.conf, self.ours = b, name, node_ns, path, conf, ours

    def run(self, command: str, pod: str) -> float:
        return self.b.run_plugin(self.node_ns, self.path, command, pod, self.conf, ours=self.ours)

    def sequential(self, pods: list[str]) -> dict[str, float]:
        add = [self.run("ADD", p) for p in pods]
        dele = [self.run("DEL", p) for p in pods]
        return {"add_p50": pct(add, .5), "add_p99": pct(add, .99), "del_p50": pct(dele, .5), "del_p99": pct(dele, .99)}

    def burst(self, pods: list[str]) -> dict[str, float]:
        out = {}
        with ThreadPoolExecutor(len(pods)) as pool:
            for command in ("ADD", "DEL"):
                key = f"burst{len(pods)}" + ("" if command == "ADD" else "_del")
                before = self.b.retries
                start = time.perf_counter()
                list(pool.map(lambda p, c=command: self.run(c, p), pods))
                out[key] = time.perf_counter() - start
                self.b.retried[(self.name, key)] = self.b.retried.get((self.name, key), 0) + self.b.retries - before
        return out


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} ({min(values):.2f}-{max(values):.2f})"


def breakdown(rows: list[dict[str, float]], title: str) -> list[str]:
    if not rows:
        return []
    keys = ["start+connect", *AGENT_PHASES, "reply+exit", "total"]
    lines = [title, f"{'phase':16} {'p50 ms':>8} {'mean ms':>8}"]
    for k in keys:
        vals = [r.get(k, 0.0) for r in rows]
        if not any(vals):
            continue
        label = ("  " + k) if k in SUB_KERNEL else k
        lines.append(f"{label:16} {statistics.median(vals)*1000:8.2f} {statistics.mean(vals)*1000:8.2f}")
    sizes = [r.get("batch_size", 0) for r in rows]
    if any(sizes):
        lines.append(f"{'batch size':16} {statistics.median(sizes):8.0f} {statistics.mean(sizes):8.1f}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=60, help="sequential ADDs then DELs per round")
    ap.add_argument("--bursts", default="50,150", help="concurrent burst sizes, comma separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shim", choices=("auto", "native", "python"), default="auto",
                    help="which build of our plugin to install (install-cni --shim)")
    ap.add_argument("--policy", action="store_true", help="also measure overlaycni with a NetworkPolicy in the cluster")
    ap.add_argument("--json", action="store_true", help="print every round's figures as JSON too")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/cni.py needs root (network namespaces)", file=sys.stderr)
        return 2
    bursts = [int(x) for x in args.bursts.split(",") if x]
    b = Bench()
    rounds: list[dict[str, dict[str, float]]] = []
    policy_rounds: list[dict[str, float]] = []
    seq_traces: list[dict[str, float]] = []
    burst_traces: dict[int, list[dict[str, float]]] = {n: [] for n in bursts}
    del_sums: dict[str, dict[str, list[float]]] = {}  # "sequential" / "burst N" -> phase -> [seconds, count]

    def note_dels(what: str, before: dict, after: dict) -> None:
        into = del_sums.setdefault(what, {})
        n = after.get(("DEL", "read"), (0, 0))[1] - before.get(("DEL", "read"), (0, 0))[1]
        for (command, phase), (total, _count) in after.items():
            if command == "DEL" and n:
                acc = into.setdefault(phase, [0.0, 0.0])
                acc[0] += total - before.get((command, phase), (0.0, 0.0))[0]
                acc[1] += n

    try:
        ours_node = b.node("n1", "10.224.0.4")
        ref_node = b.node("ref", "10.224.0.5")
        b.start_agent(ours_node, shim=args.shim)
        pods = [b.ns(f"p{i}") for i in range(max([args.pods, *bursts]))]
        ours = Plugin(b, "ours", ours_node, str(b.tmp / "bin/overlaycni"),
                      {"cniVersion": "1.0.0", "name": "overlaycni", "type": "overlaycni", "socket": b.sock}, ours=True)
        ref = Plugin(b, "ref", ref_node, f"{REF_PATH}/bridge",
                     {"cniVersion": "1.0.0", "name": "ref", "type": "bridge", "bridge": "cni0", "isGateway": True,
                      "ipMasq": False, "ipam": {"type": "host-local", "subnet": "10.245.0.0/16",
                                                "dataDir": str(b.tmp / "host-local")}}, ours=False)
        version = {"ours": [b.version_run(ours_node, ours.path) for _ in range(10)],
                   "ref": [b.version_run(ref_node, ref.path) for _ in range(10)]}
        for r in range(args.rounds):
            order = [ours, ref] if r % 2 == 0 else [ref, ours]
            res: dict[str, dict[str, float]] = {"ours": {}, "ref": {}}
            for p in order:
                b.traces = []
                sums = b.phase_sums() if p.ours else {}
                res[p.name].update(p.sequential(pods[: args.pods]))
                if p.ours:
                    seq_traces += b.traces
                    note_dels("sequential", sums, b.phase_sums())
            for n in bursts:
                for p in order:
                    b.traces = []
                    sums = b.phase_sums() if p.ours else {}
                    res[p.name].update(p.burst(pods[:n]))
                    if p.ours:
                        burst_traces[n] += b.traces
                        note_dels(f"{n}-pod burst", sums, b.phase_sums())
            rounds.append(res)
            print(f"round {r + 1}: " + ", ".join(f"{k} {res['ours'][k] / res['ref'][k]:.2f}" for k in res["ours"]),
                  file=sys.stderr)
        if args.policy:
            b.deny_all()
            for _ in range(args.rounds):
                res_p = ours.sequential(pods[: args.pods])
                for n in bursts:
                    res_p.update(ours.burst(pods[:n]))
                policy_rounds.append(res_p)
        quarantine = b.quarantine()
    finally:
        b.cleanup()
    keys = list(rounds[0]["ours"])
    print(f"CNI latency: {args.pods} sequential pods, bursts of {', '.join(map(str, bursts))} concurrent ADDs (then"
          f" DELs), {args.rounds} rounds alternating the order, {b.shim} shim")
    print("seconds are medians over the rounds; ratio = ours / reference per round: median (min-max)")
    print(f"{'metric':12} {'overlaycni':>11} {'bridge+host-local':>18} {'ratio':>20}")
    for k in keys:
        o = [r["ours"][k] for r in rounds]
        f = [r["ref"][k] for r in rounds]
        ratios = [r["ours"][k] / r["ref"][k] for r in rounds]
        print(f"{k:12} {statistics.median(o)*1000:9.1f}ms {statistics.median(f)*1000:16.1f}ms {spread(ratios):>20}")
    for (name, key), n in sorted(b.retried.items()):
        if n:
            print(f"{key:12} {name}: {n} request(s) answered 11 (try again later) over the rounds, run again (time included)")
    if b.gave_up:
        print(f"WARNING: {b.gave_up} request(s) still failed (code 11) after {RETRIES} tries; their bursts are not comparable")
    print(f"{'VERSION run':12} {statistics.median(version['ours'])*1000:9.1f}ms "
          f"{statistics.median(version['ref'])*1000:16.1f}ms   (process start + exit, no agent)")
    print()
    print("\n".join(breakdown(seq_traces, "where a sequential overlaycni ADD goes (agent phases: overlaycni.trace)")))
    for n, rows in burst_traces.items():
        print()
        print("\n".join(breakdown(rows, f"where an ADD of a {n}-pod burst goes")))
    if quarantine:
        print(f"\nDEL quarantine: {quarantine.get('released')} addresses released by {quarantine.get('drains')} drains"
              " (one conntrack walk and one release transaction each, after the DELs were answered)")
    del_phases = {what: {k: v[0] / v[1] for k, v in sums.items() if v[1]} for what, sums in del_sums.items()}
    for what, phases in del_phases.items():
        print()
        print(f"where a DEL of the {what} goes (agent phases, means from overlaycni_cni_phase_seconds)")
        for phase in (*AGENT_PHASES, "reply"):
            if phases.get(phase):
                label = ("  " + phase) if phase in SUB_KERNEL else phase
                print(f"{label:16} {phases[phase]*1000:8.2f} ms")
    if policy_rounds:
        print("\nwith a NetworkPolicy in the cluster (ADD waits for the pod's policy; ratio = policy / no policy)")
        print(f"{'metric':12} {'policy':>11} {'no policy':>18} {'ratio':>20}")
        for k in keys:
            pv = [r[k] for r in policy_rounds]
            o = [r["ours"][k] for r in rounds]
            print(f"{k:12} {statistics.median(pv)*1000:9.1f}ms {statistics.median(o)*1000:16.1f}ms "
                  f"{statistics.median(pv) / statistics.median(o):20.2f}")
    if args.json:
        print(json.dumps({"rounds": rounds, "policy_rounds": policy_rounds, "version": version,
                          "del_phases": del_phases}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
