"""NetworkPolicy cost: compile + render, rule and set-element counts, apply
time, and the incremental update for one pod label change.

Two synthetic clusters in the same run: the baseline (1,000 pods, 250
policies) and the target (2,000 pods, 500 policies); every number of the
target is printed with its ratio to the baseline (2.0 = linear growth).
The incremental label change is also shown as a ratio of the full apply.

Runs as root: apply times are measured inside a scratch network namespace
(``oct-bench-<hex>``) created here and deleted at the end; nothing touches
the host's namespace. Without root only the pure part runs. With iperf3, the
pod-to-pod throughput with the 500 policies applied is shown as a ratio of
the throughput with no policies (two pod namespaces on one node
namespace, veth; rounds alternate, medians compared).

    .venv/bin/python bench/policy.py [--nodes 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import replace
from ipaddress import IPv4Address

from overlaycni.dataplane.linux import LinuxDataplane
from overlaycni.policy import allowed, parse_policies
from overlaycni.policy.model import NamedPort, NamespaceInfo, PodInfo
from overlaycni.policy.render import counts, diff_render, render_node

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
        ip = IPv4Address(f"10.244.{node}.{2 + i // nodes}")
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


def best(fn, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def apply_document(doc: dict, *, netns: str) -> None:
    """One atomic nft transaction in ``netns``, the way the agent applies it
    (the data plane's policy table port: libnftables on the namespace worker)."""
    dp = _dataplanes.get(netns)
    if dp is None:
        dp = _dataplanes[netns] = LinuxDataplane(netns)
    dp.run(lambda: dp.ports.policy_nft.apply(doc["nftables"]))


_dataplanes: dict[str, LinuxDataplane] = {}


def measure(pods: int, policies: int, *, nodes: int, repeat: int, netns: str | None) -> dict:
    namespaces, pod_list, text = cluster(pods, policies, nodes)
    t_parse, pols = best(lambda: parse_policies(text), repeat)
    t_render, doc = best(lambda: render_node("node-0", pods=pod_list, namespaces=namespaces, policies=pols), repeat)
    rules, elements = counts(doc)
    r = {"pods": pods, "policies": policies, "parse_s": t_parse, "render_s": t_render, "rules": rules, "elements": elements}
    # a label change of one pod on this node: app0 -> app1 (moves between selector sets)
    idx = next(i for i, p in enumerate(pod_list) if p.node == "node-0" and p.labels["app"] == "app0")
    changed = list(pod_list)
    changed[idx] = replace(pod_list[idx], labels={**pod_list[idx].labels, "app": "app1"})

    def incremental():
        new = render_node("node-0", pods=changed, namespaces=namespaces, policies=pols)
        return diff_render(doc, new)

    t_diff, diff = best(incremental, repeat)
    assert diff is not None, "a label change must not need a full apply"
    r["diff_s"] = t_diff
    r["diff_elements"] = counts(diff)[1]
    if netns:
        t_apply, _ = best(lambda: apply_document(doc, netns=netns), repeat)
        r["apply_s"] = t_apply

        def label_change_in_kernel():
            apply_document(doc, netns=netns)
            t0 = time.perf_counter()
            update = incremental()  # what an agent does on the event: render, diff, apply
            t1 = time.perf_counter()
            apply_document(update, netns=netns)
            t2 = time.perf_counter()
            return t2 - t1, t2 - t0

        results = [label_change_in_kernel() for _ in range(repeat)]
        r["label_change_nft_s"] = min(a for a, _ in results)
        r["label_change_s"] = min(b for _, b in results)
        listed = subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "list", "table", "inet", "overlaycni"],
            capture_output=True, text=True, check=True,
        ).stdout
        assert str(changed[idx].ip) in listed
    return r


def _sh(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True).stdout


def throughput(prefix: str, *, nodes: int, seconds: int, rounds: int) -> dict:
    """iperf3 between two pods of the 2,000-pod cluster on one node, with the
    table holding no policies and with all 500 policies applied (both pods isolated in
    both directions, the connection allowed by policy). Rounds alternate."""
    namespaces, pods, text = cluster(2000, 500, nodes)
    pols = parse_policies(text)
    server = replace(pods[0], node="node-0")  # team0, app0: pol0 admits app1 on the named port http (8080)
    client = replace(pods[1], node="node-0")  # team0, app1: egress to every pod of team0
    pods = [server, client, *pods[2:]]
    v = allowed(client, server, 8080, "TCP", pods=pods, namespaces=namespaces, policies=pols)
    assert v.allowed and v.ingress.isolated and v.egress.isolated, v
    doc = render_node("node-0", pods=pods, namespaces=namespaces, policies=pols)
    node, ns_c, ns_s = f"{prefix}-node", f"{prefix}-cli", f"{prefix}-srv"
    made = []
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
        srv = subprocess.Popen(["ip", "netns", "exec", ns_s, "iperf3", "-s", "-p", "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            empty = render_node("node-0", pods=pods, namespaces=namespaces, policies=[])
            results: dict[str, list[float]] = {"without policies": [], "with 500 policies": []}
            for _ in range(rounds):
                for label, table in (("without policies", empty), ("with 500 policies", doc)):
                    apply_document(table, netns=node)
                    out = _sh("ip", "netns", "exec", ns_c, "iperf3", "-c", str(server.ip), "-p", "8080", "-t", str(seconds), "-J")
                    results[label].append(json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9)
        finally:
            srv.kill()
            srv.wait()
    finally:
        dp = _dataplanes.pop(node, None)
        if dp is not None:
            dp.close()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    return {k: sorted(v)[len(v) // 2] for k, v in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3, help="iperf3 run length")
    ap.add_argument("--rounds", type=int, default=3, help="alternating iperf3 rounds (median reported)")
    args = ap.parse_args()
    netns = None
    if os.geteuid() == 0:
        netns = "oct-bench-" + secrets.token_hex(3)
        subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        base = measure(1000, 250, nodes=args.nodes, repeat=args.repeat, netns=netns)
        big = measure(2000, 500, nodes=args.nodes, repeat=args.repeat, netns=netns)
        tput = None
        if netns and shutil.which("iperf3"):
            tput = throughput(netns, nodes=args.nodes, seconds=args.seconds, rounds=args.rounds)
    finally:
        for dp in _dataplanes.values():
            dp.close()
        if netns:
            subprocess.run(["ip", "netns", "del", netns], check=False)
    print(f"NetworkPolicy bench: render for one of {args.nodes} nodes; best of {args.repeat}")
    print(f"{'metric':28} {'1000 pods/250 pol':>18} {'2000 pods/500 pol':>18} {'ratio':>7}")
    rows = [
        ("parse policies (s)", "parse_s"),
        ("compile + render (s)", "render_s"),
        ("rules", "rules"),
        ("set + map elements", "elements"),
        ("apply full table (s)", "apply_s"),
        ("label change: render+diff (s)", "diff_s"),
        ("label change: elements", "diff_elements"),
        ("label change: nft apply (s)", "label_change_nft_s"),
        ("label change: end to end (s)", "label_change_s"),
    ]
    for label, key in rows:
        if key not in base:
            continue
        a, b = base[key], big[key]
        fmt = (lambda v: f"{v:18.4f}") if isinstance(a, float) else (lambda v: f"{v:18d}")
        print(f"{label:28} {fmt(a)} {fmt(b)} {b / a if a else float('nan'):7.2f}")
    if "apply_s" in big:
        print(
            f"label change, nft part: {big['label_change_nft_s'] / big['apply_s']:.3f} x the full table apply "
            f"({big['diff_elements']} elements vs {big['elements']})"
        )
    print("(ratio 2.00 = linear in pods + policies; pods x policies would give 4.00)")
    if tput:
        a, b = tput["without policies"], tput["with 500 policies"]
        print(
            f"pod-to-pod TCP (iperf3, two pods on one node over veth, median of {args.rounds}): "
            f"{a:.2f} Gbit/s with no policies (table present, conntrack on), {b:.2f} Gbit/s with 2000 pods / 500 policies: ratio {b / a:.3f}"
        )


if __name__ == "__main__":
    main()
