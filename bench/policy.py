"""NetworkPolicy cost at scale: a change re-rendered whole (the baseline)
against the same change applied incrementally (``policy.incremental``).

Synthetic clusters of 40 pods and 10 policies per namespace, from 1,000
pods / 250 policies to 10,000 / 2,500, spread over ``--nodes`` nodes; the
table is node-0's. For each size, in the same run:

* full render: ``render_node`` of the whole inventory (compile + render),
  the same render with the cyclic garbage collector running throughout (as
  it was before ``policy.gcpause``: the baseline of the full render), and
  building the incremental state (``NodePolicy``) from the same inventory;
  the growth of each per size step over the growth of the size (1.00:
  linear);
* a pod label change (app0 -> app1, the pod moves between selector sets),
  a namespace label change (tier, which namespaceSelectors pick) and a
  policy change (one port more in one policy's ingress rule), each
  end to end: baseline = render the whole table again, diff it against the
  applied render, apply (a policy change is a whole-table apply: the chains
  differ); incremental = tell the state what changed, take its commands,
  apply them;

every figure a median of ``--runs`` runs (min-max over the runs; an
incremental figure of one run is itself the median of 5 changes and 5
undos), ratios against the baseline of the same size in the same run. Each
change is made and undone alternately, so every run starts from the same
table.

Runs as root: the tables are applied inside a scratch network namespace
(``oct-bench-<hex>``) created here and deleted at the end; nothing touches
the host's namespace. Without root only the pure part runs. With iperf3,
two pod namespaces on one node namespace (veth) measure throughput
(iperf3) and new TCP connections per second (a Python client, RST close)
under four tables: no policies, the 500 policies, and the same with flow
logs (``policy.flowlog``) at the agent's default limits and with every new
flow logged, while the agent's flow log collector reads the NFLOG group.
Rounds alternate the tables; medians, per-round ratio spreads, and the
on/off ratios (aims: throughput >= 0.95, connections >= 0.9) are printed.

``--render-only``: the whole renders (CPU time too, which a loaded machine
skews least) and incremental builds only, nothing applied.

    .venv/bin/python bench/policy.py [--nodes 10] [--runs 3] [--sizes 1000,2000,5000,10000] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address

from overlaycni.agent.flowlog import FlowCollector, FlowLogOptions
from overlaycni.agent.flows import FlowBuffer
from overlaycni.agent.metrics import AgentMetrics
from overlaycni.dataplane.linux import LinuxDataplane
from overlaycni.policy import allowed, parse_policies
from overlaycni.policy.flowlog import FlowLogSpec
from overlaycni.policy.incremental import NodePolicy
from overlaycni.policy.model import NamedPort, NamespaceInfo, NetworkPolicy, PodInfo, PolicyPort
from overlaycni.policy.render import _render_node, counts, diff_render, render_node

PODS_PER_NS = 40
POLICIES_PER_NS = 10
APPS = 8


def cluster(pods: int, policies: int, nodes: int):
    """``pods`` pods in namespaces of 40, 10 policies per namespace, spread
    over ``nodes`` nodes (10.244.<node>.x)."""
    n_ns = pods // PODS_PER_NS
    assert policies == n_ns * POLICIES_PER_NS, "keep 40 pods and 10 policies per namespace"
    namespaces = [NamespaceInfo(f"team{n}", {"team": f"team{n}", "tier": ("web", "db", "batch")[n % 3]}) for n in range(n_ns)]
    out_pods = []
    for i in range(pods):
        ns = namespaces[i // PODS_PER_NS].name
        node = i % nodes
        ip = IPv4Address(int(IPv4Address("10.244.0.0")) + node * 4096 + 2 + i // nodes)  # a /20 per node
        labels = {"app": f"app{i % APPS}", "version": f"v{i % 3}"}
        ports = (NamedPort("http", 8080), NamedPort("metrics", 9090), NamedPort("dns", 53, "UDP"))
        out_pods.append(PodInfo(ns, f"pod{i}", ip, f"node-{node}", labels, ports))
    docs = []
    for n, ns in enumerate(namespaces):
        for k in range(POLICIES_PER_NS):
            app, peer, other = f"app{k % APPS}", f"app{(k + 1) % APPS}", f"team{(n + 1) % n_ns}"
            docs.append(
                f"""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: pol{k}, namespace: {ns.name}}}
spec:
  podSelector: {{matchLabels: {{app: {app}}}}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {{matchLabels: {{app: {peer}}}}}
    - namespaceSelector: {{matchLabels: {{team: {other}}}}}
      podSelector: {{matchExpressions: [{{key: version, operator: In, values: [v{k % 3}]}}]}}
    ports: [{{port: http}}, {{port: {9000 + k}, endPort: {9010 + k}}}]
  - from:
    - ipBlock: {{cidr: 10.224.0.0/16, except: [10.224.{k}.0/24]}}
    ports: [{{port: metrics}}]
  egress:
  - to:
    - namespaceSelector: {{matchLabels: {{tier: {('web', 'db', 'batch')[k % 3]}}}}}
    ports: [{{port: dns, protocol: UDP}}, {{port: 443}}]
  - to:
    - podSelector: {{}}
"""
            )
    return namespaces, out_pods, "---\n".join(docs)


def apply_document(doc: dict, *, netns: str) -> None:
    """One atomic nft transaction in ``netns``, the way the agent applies it
    (the data plane's policy table port: libnftables on the namespace worker)."""
    dp = _dataplanes.get(netns)
    if dp is None:
        dp = _dataplanes[netns] = LinuxDataplane(netns)
    dp.run(lambda: dp.ports.policy_nft.apply(doc["nftables"]))


_dataplanes: dict[str, LinuxDataplane] = {}


def _spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed_cpu(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn``: CPU time is what a loaded machine skews least."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def measure(
    pods: int, policies: int, *, nodes: int, runs: int, netns: str | None, flow_log: FlowLogSpec | None = None,
    render_only: bool = False,
) -> dict:
    """Every figure of one size: {name: [seconds of each run]} plus counts."""
    namespaces, pod_list, text = cluster(pods, policies, nodes)
    pols = parse_policies(text)
    node = "node-0"
    kernel = (lambda doc: apply_document(doc, netns=netns)) if netns else (lambda doc: None)
    out: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        out.setdefault(name, []).append(seconds)

    doc = render_node(node, pods=pod_list, namespaces=namespaces, policies=pols, flow_log=flow_log)
    rules, elements = counts(doc)
    # the three changes, each with its undo
    idx = next(i for i, p in enumerate(pod_list) if p.node == node and p.labels["app"] == "app0")
    pod, moved = pod_list[idx], replace(pod_list[idx], labels={**pod_list[idx].labels, "app": "app1"})
    ns_i = 0
    ns_old = namespaces[ns_i]
    ns_new = NamespaceInfo(ns_old.name, {**ns_old.labels, "tier": "db" if ns_old.labels["tier"] != "db" else "web"})
    pol_i = next(i for i, p in enumerate(pols) if p.namespace == pod.namespace)
    pol_old = pols[pol_i]
    rule0 = pol_old.ingress[0]
    pol_new = replace(pol_old, ingress=(replace(rule0, ports=(*rule0.ports, PolicyPort("TCP", 7070))), *pol_old.ingress[1:]))

    def inventory(p: PodInfo, ns: NamespaceInfo, pol: NetworkPolicy):
        ps = list(pod_list)
        ps[idx] = p
        nss = list(namespaces)
        nss[ns_i] = ns
        qs = list(pols)
        qs[pol_i] = pol
        return ps, nss, qs

    changes = {
        "pod label": ((pod, ns_old, pol_old), (moved, ns_old, pol_old), lambda st, inv: st.set_pod(inv[0][idx])),
        "namespace label": ((pod, ns_old, pol_old), (pod, ns_new, pol_old), lambda st, inv: st.set_namespace(inv[1][ns_i])),
        "policy": ((pod, ns_old, pol_old), (pod, ns_old, pol_new), lambda st, inv: st.set_policy(inv[2][pol_i])),
    }
    for r in range(runs):
        # the render as it is, and with the cyclic collector running throughout (before ``gcpause``), alternating
        held = ("full render", lambda: render_node(node, pods=pod_list, namespaces=namespaces, policies=pols, flow_log=flow_log))
        running = ("full render, collector on", lambda: _render_node(node, pods=pod_list, namespaces=namespaces, policies=pols,
                                                                     flow_log=flow_log, families=None))  # fmt: skip
        for name, fn in (held, running) if r % 2 == 0 else (running, held):
            wall, cpu = _timed_cpu(fn)
            add(name, wall)
            add(name + " (CPU)", cpu)
        t0 = time.perf_counter()
        state = NodePolicy(node, pods=pod_list, namespaces=namespaces, policies=pols, flow_log=flow_log)
        add("incremental build", time.perf_counter() - t0)
        if render_only:
            continue
        if netns:
            add("full apply", _timed(lambda: kernel(doc)))
        for name, (before, after, tell) in changes.items():
            # baseline: render whole, diff against the applied render, apply (whole when the chains differ)
            kernel(doc)
            applied = doc
            for target in (after, before):
                ps, nss, qs = inventory(*target)

                def whole(ps=ps, nss=nss, qs=qs, applied=applied) -> dict:
                    new = render_node(node, pods=ps, namespaces=nss, policies=qs, flow_log=flow_log)
                    update = diff_render(applied, new)
                    kernel(new if update is None else update)
                    return new

                t0 = time.perf_counter()
                applied = whole()
                add(f"{name}: re-render", time.perf_counter() - t0)
            # incremental: tell the state, take its commands, apply them (cheap: the median of 10 per run)
            samples = []
            for target in (after, before) * 5:
                inv = inventory(*target)
                t0 = time.perf_counter()
                tell(state, inv)
                cmds = state.take_changes()
                if cmds:
                    kernel({"nftables": cmds})
                samples.append(time.perf_counter() - t0)
            add(f"{name}: incremental", statistics.median(samples))
            add(f"{name}: commands", float(len(cmds)))
    if netns and not render_only:
        listed = subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "list", "table", "inet", "overlaycni"], capture_output=True, text=True, check=True
        ).stdout
        assert str(pod.ip) in listed
    return {"pods": pods, "policies": policies, "rules": rules, "elements": elements, "times": out}


def _sh(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True).stdout


CONN_SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000)); s.listen(4096)
while True:
    c, _ = s.accept(); c.close()
"""
CONN_CLIENT = """
import json, resource, socket, struct, sys, time
ip, secs = sys.argv[1], float(sys.argv[2])
linger = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT, the client never runs out of ports
n, end = 0, time.monotonic() + secs
while time.monotonic() < end:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    s.connect((ip, 9000)); s.close(); n += 1
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"n": n, "rate": n / secs, "cpu": ru.ru_utime + ru.ru_stime}))
"""
FLOW_GROUP = 161


def _pod_pair(prefix: str, client, server) -> tuple[str, str, str, list[str]]:
    """A node namespace with two pod namespaces on veths (the agent's layout)."""
    node, ns_c, ns_s = f"{prefix}-node", f"{prefix}-cli", f"{prefix}-srv"
    made: list[str] = []
    try:
        for ns in (node, ns_c, ns_s):
            _sh("ip", "netns", "add", ns)
            made.append(ns)
        _sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for ns, pod, host in ((ns_c, client, "hcli"), (ns_s, server, "hsrv")):
            _sh("ip", "-n", node, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "-n", node, "addr", "add", "169.254.1.1/32", "dev", host)
            _sh("ip", "-n", node, "link", "set", host, "up")
            _sh("ip", "-n", node, "route", "add", f"{pod.ip}/32", "dev", host)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{pod.ip}/32", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
            _sh("ip", "-n", ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    except BaseException:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        raise
    return node, ns_c, ns_s, made


def datapath(prefix: str, *, nodes: int, seconds: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """iperf3 throughput and new TCP connections per second between two pods
    of the 2,000-pod cluster on one node, under four tables: no policies,
    the 500 policies (both pods isolated both ways, the connection allowed
    by policy), the same with flow logs at the agent's default limits, and
    with limits so high that every new flow is logged. A flow log collector
    (the agent's, with its ring) reads the NFLOG group throughout. Each
    round runs every table once, in a shuffled order; every round's numbers
    are kept."""
    namespaces, pods, text = cluster(2000, 500, nodes)
    pols = parse_policies(text)
    server = replace(pods[0], node="node-0")  # team0, app0: pol0 admits app1 on the named port http (8080) and 9000-9010
    client = replace(pods[1], node="node-0")  # team0, app1: egress to every pod of team0
    pods = [server, client, *pods[2:]]
    for port in (8080, 9000):
        v = allowed(client, server, port, "TCP", pods=pods, namespaces=namespaces, policies=pols)
        assert v.allowed and v.ingress.isolated and v.egress.isolated, v
    every = FlowLogSpec(group=FLOW_GROUP, rate=10**6, burst=10**6, cap=10**6)
    tables = {
        "no policies": render_node("node-0", pods=pods, namespaces=namespaces, policies=[]),
        "500 policies": render_node("node-0", pods=pods, namespaces=namespaces, policies=pols),
        "+ flow logs": render_node("node-0", pods=pods, namespaces=namespaces, policies=pols,
                                   flow_log=FlowLogSpec(group=FLOW_GROUP)),
        "+ flow logs, every flow": render_node("node-0", pods=pods, namespaces=namespaces, policies=pols, flow_log=every),
    }  # fmt: skip
    node, ns_c, ns_s, made = _pod_pair(prefix, client, server)
    servers: list[subprocess.Popen] = []
    stop = threading.Event()
    collector = None
    try:
        for argv in (["iperf3", "-s", "-p", "8080"], [sys.executable, "-c", CONN_SERVER]):
            servers.append(subprocess.Popen(["ip", "netns", "exec", ns_s, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        apply_document(tables["no policies"], netns=node)
        source = _dataplanes[node].open_verdict_log(group=FLOW_GROUP)
        collector = FlowCollector(source, node="node-0", buffer=FlowBuffer(10_000), metrics=AgentMetrics(), stop=stop,
                                  options=FlowLogOptions())  # fmt: skip
        collector.update(pods, namespaces, pols)
        threading.Thread(target=collector.run, daemon=True).start()
        time.sleep(0.5)
        results: dict[str, dict[str, list[float]]] = {label: {"gbps": [], "conns": [], "per_cpu": []} for label in tables}
        order = list(tables)
        for metric in ("gbps", "conns"):  # one phase each: a round's runs are close in time
            for r in range(rounds):
                random.Random(r).shuffle(order)  # no table always runs after the same one
                for label in order:
                    apply_document(tables[label], netns=node)
                    _sh("ip", "netns", "exec", node, "conntrack", "-F")
                    _quiet(collector)  # the previous run's records are read: each run pays only for its own
                    if metric == "gbps":
                        out = _sh("ip", "netns", "exec", ns_c, "iperf3", "-c", str(server.ip), "-p", "8080", "-t", str(seconds), "-J")
                        value = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
                    else:
                        cpu0, srv0 = time.process_time(), _cpu(servers[1].pid)
                        run = json.loads(_sh("ip", "netns", "exec", ns_c, sys.executable, "-c", CONN_CLIENT, str(server.ip), str(seconds)))
                        _quiet(collector)  # the collector's work for this run counts for this run
                        cpu = run["cpu"] + (_cpu(servers[1].pid) - srv0) + (time.process_time() - cpu0)
                        results[label]["per_cpu"].append(run["n"] / cpu)
                        value = run["rate"]
                    results[label][metric].append(value)
        collector.poll_stats()
        results["collector"] = {"recorded": [collector.recorded], **{k: [v] for k, v in collector.dropped.items()}}
    finally:
        stop.set()
        for srv in servers:
            srv.kill()
            srv.wait()
        dp = _dataplanes.pop(node, None)
        if dp is not None:
            dp.close()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    return results


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _quiet(collector: FlowCollector, *, idle: float = 0.5, limit: float = 30.0) -> None:
    """Until the collector has read nothing new for ``idle`` seconds."""
    end = time.monotonic() + limit
    seen = -1
    while time.monotonic() < end and seen != collector.recorded + sum(collector.dropped.values()):
        seen = collector.recorded + sum(collector.dropped.values())
        time.sleep(idle)


def _median(v: list[float]) -> float:
    return statistics.median(v)


def _ratio(on: list[float], off: list[float]) -> str:
    """The median of the per-round ratios (round i of each ran close in
    time) and their spread; then the ratio of the medians."""
    per_round = sorted(a / b for a, b in zip(on, off, strict=True) if b)
    return (f"{_median(per_round):.3f} (rounds {per_round[0]:.3f}-{per_round[-1]:.3f}; "
            f"ratio of medians {_median(on) / _median(off):.3f})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3, help="runs of every scale figure (median and min-max reported)")
    ap.add_argument("--sizes", default="1000,2000,5000,10000", help="pod counts of the scale part (a quarter as many policies)")
    ap.add_argument("--seconds", type=int, default=2, help="length of one iperf3 or connection run")
    ap.add_argument("--rounds", type=int, default=5, help="datapath rounds, each table once per round (median reported)")
    ap.add_argument("--datapath-only", action="store_true", help="only the pod-to-pod throughput and connection rate")
    ap.add_argument("--scale-only", action="store_true", help="only the render and change costs at scale")
    ap.add_argument("--flow-logs", action="store_true", help="the scale part's tables with flow log rules (the agents' default)")
    ap.add_argument("--render-only", action="store_true",
                    help="the scale part's whole renders and incremental builds only (no changes, nothing applied)")
    args = ap.parse_args()
    netns = None
    if os.geteuid() == 0:
        netns = "oct-bench-" + secrets.token_hex(3)
        subprocess.run(["ip", "netns", "add", netns], check=True)
    results: list[dict] = []
    try:
        if not args.datapath_only:
            sizes = [int(n) for n in args.sizes.split(",")]
            spec = FlowLogSpec() if args.flow_logs else None
            results = [measure(n, n // 4, nodes=args.nodes, runs=args.runs, netns=netns, flow_log=spec,
                               render_only=args.render_only) for n in sizes]  # fmt: skip
        paths = None
        if netns and shutil.which("iperf3") and not args.scale_only:
            paths = datapath(netns, nodes=args.nodes, seconds=args.seconds, rounds=args.rounds)
    finally:
        for dp in _dataplanes.values():
            dp.close()
        if netns:
            subprocess.run(["ip", "netns", "del", netns], check=False)
    if results:
        print_scale(results, args, kernel=netns is not None)
    if paths:
        print_datapath(paths, args)


def print_scale(results: list[dict], args: argparse.Namespace, *, kernel: bool) -> None:
    where = "end to end into a scratch namespace's kernel" if kernel else "pure part only (not root: nothing applied)"
    where += ", flow log rules on" if args.flow_logs else ""
    print(f"NetworkPolicy at scale: node-0's table of {args.nodes} nodes; {where}; median of {args.runs} runs (min-max), ms")
    head = "".join(f"{r['pods']:>7d}/{r['policies']:<5d}{'':12}" for r in results)
    print(f"{'':30}{head}")
    print(f"{'rules / set+map elements':30}" + "".join(f"{r['rules']:>12d} {r['elements']:<11d}" for r in results))

    def row(label: str, key: str, *, ratio_to: str | None = None, scale: float = 1000.0, digits: int = 1) -> None:
        cells = []
        for r in results:
            t = r["times"].get(key)
            if not t:
                return
            med, lo, hi = _spread(t)
            cell = f" {med * scale:.{digits}f} ({lo * scale:.{digits}f}-{hi * scale:.{digits}f})"
            if ratio_to:
                cell += f" {med / statistics.median(r['times'][ratio_to]):.3f}x"
            cells.append(f"{cell:>24}")
        print(f"{label:30}" + "".join(cells))

    row("full render (compile+render)", "full render")
    row("  collector on (before)", "full render, collector on", ratio_to="full render")
    row("full render, CPU", "full render (CPU)")
    row("  collector on (before), CPU", "full render, collector on (CPU)", ratio_to="full render (CPU)")
    row("incremental build", "incremental build", ratio_to="full render")
    row("full table apply", "full apply")
    for change in ("pod label", "namespace label", "policy"):
        row(f"{change}: re-render (baseline)", f"{change}: re-render")
        row(f"{change}: incremental", f"{change}: incremental", ratio_to=f"{change}: re-render")
        row(f"{change}: commands", f"{change}: commands", scale=1.0, digits=0)
    first, last = results[0], results[-1]
    grow = last["pods"] / first["pods"]
    print(f"growth from {first['pods']} to {last['pods']} pods ({grow:.0f}x; linear = {grow:.2f}):")
    for key in ("full render", "full render (CPU)", "full render, collector on (CPU)", "incremental build",
                "pod label: re-render", "pod label: incremental", "namespace label: incremental", "policy: re-render",
                "policy: incremental"):  # fmt: skip
        if key not in first["times"]:
            continue
        a, b = statistics.median(first["times"][key]), statistics.median(last["times"][key])
        print(f"  {key:32} {b / a:6.2f}")
    for key in ("full render", "full render, collector on", "full render (CPU)", "full render, collector on (CPU)",
                "incremental build"):  # fmt: skip
        steps = []
        for a, b in zip(results, results[1:], strict=False):
            growth = statistics.median(b["times"][key]) / statistics.median(a["times"][key])
            steps.append(f"{a['pods']}->{b['pods']}: {growth / (b['pods'] / a['pods']):.2f}")
        print(f"  {key:32} per step, time growth / size growth (1.00 = linear): {'; '.join(steps)}")
    print("(x: the median as a ratio of the same change's baseline median at the same size, same run)")


def print_datapath(paths: dict, args: argparse.Namespace) -> None:
    print(f"\npod to pod, two pods on one node over veth; {args.rounds} rounds of {args.seconds} s runs, "
          "tables shuffled in each round; median (min-max)")  # fmt: skip
    print(f"{'table':26} {'iperf3 Gbit/s':>22} {'new TCP conns/s':>22} {'conns per CPU second':>22}")
    for label in ("no policies", "500 policies", "+ flow logs", "+ flow logs, every flow"):
        g, c, u = paths[label]["gbps"], paths[label]["conns"], paths[label]["per_cpu"]
        print(f"{label:26} {_median(g):8.2f} ({min(g):5.2f}-{max(g):5.2f}) {_median(c):8.0f} ({min(c):5.0f}-{max(c):5.0f})"
              f" {_median(u):8.0f} ({min(u):5.0f}-{max(u):5.0f})")  # fmt: skip
    off, on, every = paths["500 policies"], paths["+ flow logs"], paths["+ flow logs, every flow"]
    print("ratios: median of the per-round ratios (min-max over rounds)")
    print(f"500 policies vs none, throughput:       {_ratio(off['gbps'], paths['no policies']['gbps'])}")
    print(f"flow logs on vs off, throughput:        {_ratio(on['gbps'], off['gbps'])}   (aim >= 0.95)")
    print(f"flow logs on vs off, new conns/s:       {_ratio(on['conns'], off['conns'])}   (aim >= 0.9)")
    print(f"flow logs on vs off, conns per CPU s:   {_ratio(on['per_cpu'], off['per_cpu'])}")
    print(f"every flow logged vs off, new conns/s:  {_ratio(every['conns'], off['conns'])}")
    print(f"every flow logged vs off, per CPU s:    {_ratio(every['per_cpu'], off['per_cpu'])}")
    col = {k: int(v[0]) for k, v in paths["collector"].items()}
    print(f"flow log collector: {col.pop('recorded')} records, not recorded: {col}")
    print("(conns per CPU second: connections over the CPU time of client, server and flow log collector)")

if __name__ == "__main__":
    main()
