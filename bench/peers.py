"""Bench: program N VXLAN peers into a namespace and remove them.

Measured in one run, in one namespace made for the purpose (removed at the
end; nothing in the root namespace):

* overlaycni full reconcile to N peers (diff against the kernel, neighbour +
  FDB + route per peer, node_ips nft set) and back to 0 peers;
* the same objects through the ports only (no diff, no nft);
* the baseline: ``ip -batch`` (neighbours, routes) + ``bridge -batch`` (FDB)
  applying the same entries, and deleting them;
* one incremental ``ensure_peer`` / ``delete_peer`` with N peers present,
  against the same three objects added/removed by forked ``ip``/``bridge``;
* pod attach/detach latency (``--pods``): the data plane's ``attach_pod`` /
  ``detach_pod`` (nft set element through libnftables, and through the
  ``nft`` binary), against Debian's Go ``bridge`` + ``host-local`` CNI
  plugins doing ADD/DEL into the same kind of pod namespace (their figure
  includes process start; ours is the agent-side cost only).

Control plane (issue 14), in labs (real agents in their node namespaces):

* ``--learn-sizes 5,10,20``: in a lab of N nodes, the time from a new node
  record entering the datastore (``ipam.register_node``, the first thing a
  joining agent does) until *every* agent has programmed the route to its
  block, read from ``ip -ts monitor route`` started in each node namespace
  beforehand (so no polling skews it); then the same for its removal. The
  aim is flat in N: each agent follows the node records with its own watch
  (``datastore/watch.py``), so a join costs every agent the same. Medians of
  ``--learn-repeats`` joins with the spread, per N, and t(N)/t(first N).
* ``--memory-rounds 3``: one agent (a one-node lab) with ``--memory-pods``
  pods added through the real plugin and ``--memory-peers`` synthetic node
  records written into its datastore in transactions of 500 nodes (seconds,
  not the 20+ minutes of one ``register_node`` each, and the same
  interleaving of writes and reconciles every run); once it has programmed
  every peer, run a full resync and its VmRSS has settled (moved < 1% over a
  resync interval), its RSS from ``/proc/<pid>/status`` sampled every 0.2 s
  over two resync intervals: the floor (what stays resident between full
  resyncs, which lift it while they run), the time median, and VmHWM.
  Aim: VmRSS <= 100 MiB at 5,000 peers and 250 pods. With
  ``--memory-baseline SRC`` every round also runs the agent from another
  source tree (alternating which goes first) and prints the ratio.

Prints ratios against the baseline. Usage (root)::

    .venv/bin/python bench/peers.py [--peers 5000] [--repeat 3] [--incremental 50]
    .venv/bin/python bench/peers.py --only-control-plane [--learn-sizes 5,10,20] [--memory-rounds 3]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address, IPv4Network

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from overlaycni.dataplane.linux import LinuxDataplane  # noqa: E402
from overlaycni.dataplane.model import VXLAN_IFNAME, NodeState, Peer, peer_objects, vtep_mac  # noqa: E402
from overlaycni.families import PodAddress

POD_CIDR = IPv4Network("10.64.0.0/10")  # room for 16k /24 blocks
NODE_IP = IPv4Address("10.224.0.1")


def sh(*cmd: str, stdin: str | None = None) -> str:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout


def peers(n: int, *, offset: int = 0) -> tuple[Peer, ...]:
    out = []
    for i in range(offset + 1, offset + n + 1):
        ip = IPv4Address(int(IPv4Address("10.224.0.10")) + i)
        block = IPv4Network((int(POD_CIDR.network_address) + 256 * i, 24))
        out.append(Peer(f"n{i}", ip, block, vtep_mac(ip)))
    return tuple(out)


def count(ns: str) -> tuple[int, int, int]:
    routes = sh("ip", "-n", ns, "route", "show", "proto", "119").count("\n")
    neigh = sh("ip", "-n", ns, "neigh", "show", "dev", VXLAN_IFNAME, "nud", "permanent").count("\n")
    fdb = sh("bridge", "-n", ns, "fdb", "show", "dev", VXLAN_IFNAME).count(" dst ")
    return routes, neigh, fdb


def batches(ps: tuple[Peer, ...], verb: str) -> tuple[str, str, str]:
    neigh, fdb, route = [], [], []
    for p in ps:
        o = peer_objects(p, backend="vxlan")
        (n,), f, (r,) = o.neighbours, o.fdb, o.routes
        assert f
        if verb == "replace":
            neigh.append(f"neigh replace {n.ip} lladdr {n.mac} dev {VXLAN_IFNAME} nud permanent")
            fdb.append(f"fdb replace {f.mac} dev {VXLAN_IFNAME} dst {f.dst} self permanent")
            route.append(f"route replace {r.dst} via {r.gateway} dev {VXLAN_IFNAME} onlink proto 119")
        else:
            neigh.append(f"neigh del {n.ip} dev {VXLAN_IFNAME}")
            fdb.append(f"fdb del {f.mac} dev {VXLAN_IFNAME} self")
            route.append(f"route del {r.dst} proto 119")
    return "\n".join(neigh) + "\n", "\n".join(fdb) + "\n", "\n".join(route) + "\n"


def baseline(ns: str, ps: tuple[Peer, ...], tmp: str) -> tuple[float, float]:
    files = {}
    for verb in ("replace", "del"):
        for kind, text in zip(("neigh", "fdb", "route"), batches(ps, verb), strict=True):
            path = os.path.join(tmp, f"{verb}-{kind}.batch")
            with open(path, "w") as f:
                f.write(text)
            files[verb, kind] = path
    t0 = time.perf_counter()
    sh("ip", "-n", ns, "-batch", files["replace", "neigh"])
    sh("bridge", "-n", ns, "-batch", files["replace", "fdb"])
    sh("ip", "-n", ns, "-batch", files["replace", "route"])
    add = time.perf_counter() - t0
    assert count(ns) == (len(ps) + 1, len(ps), len(ps)), count(ns)  # + the own block's unreachable route
    t0 = time.perf_counter()
    sh("ip", "-n", ns, "-batch", files["del", "route"])
    sh("bridge", "-n", ns, "-batch", files["del", "fdb"])
    sh("ip", "-n", ns, "-batch", files["del", "neigh"])
    delete = time.perf_counter() - t0
    assert count(ns) == (1, 0, 0), count(ns)
    return add, delete


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--incremental", type=int, default=50)
    ap.add_argument("--pods", type=int, default=30, help="pod attach/detach rounds (0: skip)")
    ap.add_argument("--only-control-plane", action="store_true", help="only the lab measurements (learn time, memory)")
    ap.add_argument("--learn-sizes", default="5,10,20", help="lab sizes for the join time ('' skips)")
    ap.add_argument("--learn-repeats", type=int, default=3)
    ap.add_argument("--memory-rounds", type=int, default=3, help="agent memory runs (0 skips)")
    ap.add_argument("--memory-peers", type=int, default=5000)
    ap.add_argument("--memory-pods", type=int, default=250)
    ap.add_argument("--memory-baseline", metavar="SRC", default=None,
                    help="also run the agent from this source tree (e.g. `git archive main src | tar -x -C /tmp/base`, "
                         "then /tmp/base/src) in every memory round, alternating, and print the ratio")
    ap.add_argument("--memory-env", metavar="KEY=VALUE", action="append", default=[],
                    help="more environment for this tree's agent only (an experiment against --memory-baseline)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates a network namespace)")
    if not args.only_control_plane:
        kernel_side(args)
    import controlplane  # bench/controlplane.py, beside this file

    if args.learn_sizes:
        controlplane.learn_time([int(x) for x in args.learn_sizes.split(",")], repeats=args.learn_repeats)
    if args.memory_rounds:
        controlplane.agent_memory(peers=args.memory_peers, pods=args.memory_pods, rounds=args.memory_rounds,
                                  baseline_src=args.memory_baseline,
                                  env=dict(kv.split("=", 1) for kv in args.memory_env))


def kernel_side(args: argparse.Namespace) -> None:
    ns = "oct-bench-" + secrets.token_hex(3)
    sh("ip", "netns", "add", ns)
    dp = None
    try:
        sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        sh("ip", "-n", ns, "addr", "add", f"{NODE_IP}/16", "dev", "eth0")
        for dev in ("lo", "eth0", "eth0p"):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        dp = LinuxDataplane(ns)
        block = IPv4Network((int(POD_CIDR.network_address), 24))
        empty = NodeState(node_ip=NODE_IP, block=block, pod_cidr=POD_CIDR)
        full = NodeState(node_ip=NODE_IP, block=block, pod_cidr=POD_CIDR, peers=peers(args.peers))
        assert dp.reconcile(empty).errors == []
        ports = dp.ports
        objs = [peer_objects(p, backend="vxlan") for p in full.peers]
        rows: dict[str, list[float]] = {k: [] for k in ("base_add", "base_del", "rec_add", "rec_del", "port_add", "port_del")}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeat):
                a, d = baseline(ns, full.peers, tmp)
                rows["base_add"].append(a)
                rows["base_del"].append(d)

                t0 = time.perf_counter()
                rep = dp.reconcile(full)
                rows["rec_add"].append(time.perf_counter() - t0)
                assert rep.errors == [] and count(ns) == (args.peers + 1, args.peers, args.peers), (rep.errors, count(ns))
                t0 = time.perf_counter()
                rep = dp.reconcile(empty)
                rows["rec_del"].append(time.perf_counter() - t0)
                assert rep.errors == [] and count(ns) == (1, 0, 0), count(ns)

                def port_apply(delete: bool) -> None:
                    if delete:
                        ports.routes.apply_routes(delete=[r for o in objs for r in o.routes])
                        ports.fdb.apply_fdb(delete=[o.fdb for o in objs])  # type: ignore[misc]
                        ports.neighbours.apply_neighbours(delete=[n for o in objs for n in o.neighbours])
                    else:
                        ports.neighbours.apply_neighbours(replace=[n for o in objs for n in o.neighbours])
                        ports.fdb.apply_fdb(replace=[o.fdb for o in objs])  # type: ignore[misc]
                        ports.routes.apply_routes(replace=[r for o in objs for r in o.routes])

                for key, delete in (("port_add", False), ("port_del", True)):
                    t0 = time.perf_counter()
                    dp.run(lambda delete=delete: port_apply(delete))
                    rows[key].append(time.perf_counter() - t0)
                assert count(ns) == (1, 0, 0), count(ns)

        # Incremental: one peer added and removed with N present.
        assert dp.reconcile(full).errors == []
        extra = peers(args.incremental, offset=args.peers + 10)
        inc_add, inc_del, fork_add, fork_del = [], [], [], []
        for p in extra:
            t0 = time.perf_counter()
            dp.ensure_peer(full, p)
            inc_add.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dp.delete_peer(full, p)
            inc_del.append(time.perf_counter() - t0)
        for p in extra[:10]:
            o = peer_objects(p, backend="vxlan")
            (n,), (r,) = o.neighbours, o.routes
            t0 = time.perf_counter()
            sh("ip", "-n", ns, "neigh", "replace", str(n.ip), "lladdr", n.mac, "dev", VXLAN_IFNAME, "nud", "permanent")
            sh("bridge", "-n", ns, "fdb", "replace", o.fdb.mac, "dev", VXLAN_IFNAME, "dst", str(o.fdb.dst),  # type: ignore[union-attr]
               "self", "permanent")
            sh("ip", "-n", ns, "route", "replace", str(r.dst), "via", str(r.gateway), "dev", VXLAN_IFNAME,
               "onlink", "proto", "119")
            fork_add.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sh("ip", "-n", ns, "route", "del", str(o.route.dst), "proto", "119")
            sh("bridge", "-n", ns, "fdb", "del", o.fdb.mac, "dev", VXLAN_IFNAME, "self")  # type: ignore[union-attr]
            sh("ip", "-n", ns, "neigh", "del", str(o.neighbour.ip), "dev", VXLAN_IFNAME)  # type: ignore[union-attr]
            fork_del.append(time.perf_counter() - t0)
        assert count(ns) == (args.peers + 1, args.peers, args.peers), count(ns)
    finally:
        if dp is not None:
            dp.close()
        sh("ip", "netns", "del", ns)

    pods = bench_pods(ns_prefix=ns, rounds=args.pods) if args.pods else None
    med = {k: statistics.median(v) for k, v in rows.items()}
    n = args.peers
    print(f"{n} VXLAN peers (neighbour + FDB + route each), median of {args.repeat} runs, namespace {ns}")
    print(f"  baseline ip -batch + bridge -batch: add {med['base_add']*1e3:8.1f} ms   remove {med['base_del']*1e3:8.1f} ms")
    print(f"  overlaycni reconcile (diff + nft):  add {med['rec_add']*1e3:8.1f} ms   remove {med['rec_del']*1e3:8.1f} ms"
          f"   ratio {med['rec_add']/med['base_add']:.2f}x / {med['rec_del']/med['base_del']:.2f}x")
    print(f"  overlaycni ports only:              add {med['port_add']*1e3:8.1f} ms   remove {med['port_del']*1e3:8.1f} ms"
          f"   ratio {med['port_add']/med['base_add']:.2f}x / {med['port_del']/med['base_del']:.2f}x")
    print(f"incremental, {n} peers present (median of {len(inc_add)}; p90):")
    p90 = lambda v: sorted(v)[int(len(v) * 0.9) - 1]  # noqa: E731
    print(f"  ensure_peer {statistics.median(inc_add)*1e3:6.2f} ms (p90 {p90(inc_add)*1e3:.2f})   "
          f"delete_peer {statistics.median(inc_del)*1e3:6.2f} ms (p90 {p90(inc_del)*1e3:.2f})")
    print(f"  baseline forked ip/bridge x3: add {statistics.median(fork_add)*1e3:6.2f} ms   "
          f"remove {statistics.median(fork_del)*1e3:6.2f} ms   ratio "
          f"{statistics.median(inc_add)/statistics.median(fork_add):.2f}x / "
          f"{statistics.median(inc_del)/statistics.median(fork_del):.2f}x")
    if pods:
        print(f"pod attach/detach, median of {args.pods} rounds:")
        for label, (add, delete) in pods.items():
            print(f"  {label:38s} ADD {add*1e3:6.2f} ms   DEL {delete*1e3:6.2f} ms")
        base = pods["go bridge+host-local (exec)"]
        ours = pods["overlaycni attach (libnftables)"]
        print(f"  ratio overlaycni/go: ADD {ours[0]/base[0]:.2f}x   DEL {ours[1]/base[1]:.2f}x")


def bench_pods(*, ns_prefix: str, rounds: int) -> dict[str, tuple[float, float]]:
    import json
    from ipaddress import IPv4Interface

    node, pod = ns_prefix + "-n", ns_prefix + "-p"
    out: dict[str, tuple[float, float]] = {}
    for ns in (node, pod):
        sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", node, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        sh("ip", "-n", node, "addr", "add", f"{NODE_IP}/16", "dev", "eth0")
        for dev in ("lo", "eth0", "eth0p"):
            sh("ip", "-n", node, "link", "set", dev, "up")
        block = IPv4Network("10.244.1.0/24")
        state = NodeState(node_ip=NODE_IP, block=block, pod_cidr=IPv4Network("10.244.0.0/16"))
        for label, lib in (("overlaycni attach (libnftables)", True), ("overlaycni attach (nft binary)", False)):
            dp = LinuxDataplane(node, use_nft_library=lib)
            try:
                assert dp.reconcile(state).errors == []
                adds, dels = [], []
                for i in range(rounds):
                    t0 = time.perf_counter()
                    dp.attach_pod(container_id=f"c{i}", ifname="eth0", netns_path=f"/var/run/netns/{pod}",
                                  addresses=(PodAddress(IPv4Interface("10.244.1.5/24"), IPv4Address("10.244.1.1")),), mtu=1450)
                    adds.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    dp.detach_pod(container_id=f"c{i}", ifname="eth0", netns_path=f"/var/run/netns/{pod}")
                    dels.append(time.perf_counter() - t0)
                out[label] = (statistics.median(adds), statistics.median(dels))
            finally:
                dp.close()
        with tempfile.TemporaryDirectory() as tmp:
            conf = json.dumps({"cniVersion": "1.0.0", "name": "bench", "type": "bridge", "bridge": "cnibr0",
                               "isGateway": True, "mtu": 1450,
                               "ipam": {"type": "host-local", "subnet": "10.99.0.0/24", "dataDir": tmp}})
            adds, dels = [], []
            for i in range(rounds):
                for cmd, acc in (("ADD", adds), ("DEL", dels)):
                    env = {"CNI_COMMAND": cmd, "CNI_CONTAINERID": f"c{i}", "CNI_NETNS": f"/var/run/netns/{pod}",
                           "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni", "PATH": os.environ.get("PATH", "")}
                    t0 = time.perf_counter()
                    proc = subprocess.run(["ip", "netns", "exec", node, "/usr/lib/cni/bridge"], input=conf, env=env,
                                          capture_output=True, text=True)
                    acc.append(time.perf_counter() - t0)
                    if proc.returncode != 0:
                        raise SystemExit(f"bridge plugin {cmd}: {proc.stdout} {proc.stderr}")
            out["go bridge+host-local (exec)"] = (statistics.median(adds), statistics.median(dels))
    finally:
        for ns in (node, pod):
            sh("ip", "netns", "del", ns)
    return out


if __name__ == "__main__":
    main()
