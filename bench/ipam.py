"""IPAM benchmark: allocation latency and throughput per datastore, against
that store's raw compare-and-swap latency measured in the same run.

    .venv/bin/python bench/ipam.py [--stores sqlite,etcd] [--allocs 300] [--nodes 5000] [--ip-families ipv4,ipv6]

For each store (sqlite in a temp dir; etcd: Debian's /usr/bin/etcd started on
127.0.0.1 with random ports and a temp data dir, stopped at the end):

* baseline: one raw ``txn`` (compare one key's revision, put it), sequential;
* allocate with 1 allocator and with 8 concurrent allocator processes on one
  node: p50/p99 latency, allocations/s, store round trips per allocation;
* the ratio allocation p50 / baseline p50 (the figure to watch; the design
  aims at <= 2 round trips per allocation);
* the time to claim blocks for ``--nodes`` nodes (one process, sequential);
* with ``--ip-families ipv4,ipv6``: the same allocations in a dual-stack
  cluster (an IPv4 and an IPv6 address per attachment, one transaction),
  and their p50 as a ratio of the single-stack p50 of the same run.

Everything stays on 127.0.0.1 and a temp directory.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures_etcd
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from overlaycni import ipam  # noqa: E402
from overlaycni.config import parse_network  # noqa: E402
from overlaycni.datastore import open_datastore  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_cas(url: str, n: int) -> list[float]:
    store = open_datastore(url)
    store.put("/bench/cas", "0")
    kv = store.get("/bench/cas")
    rev = kv.revision
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        ok = store.txn(compare=[("/bench/cas", rev)], put=[("/bench/cas", str(i), None)])
        lat.append(time.perf_counter() - t0)
        assert ok
        rev = store.get("/bench/cas").revision  # not timed
    store.close()
    return lat


def _allocator(url: str, cluster: str, node: str, prefix: str, n: int, barrier, out) -> None:
    try:
        store = open_datastore(url)
        barrier.wait(60)
        lat = []
        rt0 = store.round_trips
        for i in range(n):
            t0 = time.perf_counter()
            ipam.allocate(store, cluster, node, f"{prefix}-{i}", "eth0")
            lat.append(time.perf_counter() - t0)
        out.put((lat, store.round_trips - rt0))
        store.close()
    except BaseException as exc:  # reported by the parent
        out.put((None, f"{type(exc).__name__}: {exc}"))


def bench_alloc(url: str, cluster: str, workers: int, per_worker: int) -> tuple[list[float], float, float]:
    """Returns (latencies, wall seconds, round trips per allocation)."""
    store = open_datastore(url)
    ipam.register_node(store, cluster, f"bench-{workers}", IPv4Address(f"10.224.0.{9 + workers}"))
    store.close()
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_allocator, args=(url, cluster, f"bench-{workers}", f"r{workers}w{w}", per_worker, barrier, out))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    barrier.wait(60)
    t0 = time.perf_counter()
    results = [out.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    for r, err in results:
        if r is None:
            raise SystemExit(f"allocator failed: {err}")
    lat = [x for r, _ in results for x in r]
    rts = sum(rt for _, rt in results) / len(lat)
    return lat, wall, rts


def bench_nodes(url: str, n: int) -> float:
    store = open_datastore(url)
    net = parse_network(
        {"network-plugin": "azure", "network-plugin-mode": "overlay", "pod-cidr": "10.128.0.0/10", "node-cidr-size": 24}
    )
    ipam.create_cluster(store, "nodes", net)
    t0 = time.perf_counter()
    for i in range(n):
        ipam.register_node(store, "nodes", f"node-{i}", IPv4Address(f"10.224.{i // 250}.{i % 250 + 1}"))
    wall = time.perf_counter() - t0
    assert len(ipam.list_blocks(store, "nodes")) == n
    store.close()
    return wall


def run_store(name: str, url: str, args: argparse.Namespace) -> None:
    store = open_datastore(url)
    net = parse_network({"network-plugin": "azure", "network-plugin-mode": "overlay", "node-cidr-size": 20})
    ipam.create_cluster(store, "bench", net)
    dual = args.ip_families == "ipv4,ipv6"
    if dual:
        ipam.create_cluster(store, "bench6", parse_network({**net.to_dict(), "ip-families": "ipv4,ipv6"}))
    store.close()
    cas = bench_cas(url, args.allocs)
    cas50, cas99 = pct(cas, 0.5) * 1e3, pct(cas, 0.99) * 1e3
    print(f"\n== {name} ({url})")
    print(f"  baseline raw CAS txn:     p50 {cas50:7.2f} ms  p99 {cas99:7.2f} ms")
    for workers in (1, 8):
        per = args.allocs if workers == 1 else max(1, args.allocs // 2)
        lat, wall, rts = bench_alloc(url, "bench", workers, per)
        p50, p99 = pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3
        print(
            f"  allocate x{workers} allocator{'s' if workers > 1 else ' '}: p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  "
            f"{len(lat) / wall:8.0f} allocs/s  {rts:.2f} round trips/alloc  "
            f"p50 ratio to CAS {p50 / cas50:5.2f}x"
        )
        if dual:
            lat6, wall6, rts6 = bench_alloc(url, "bench6", workers, per)
            d50, d99 = pct(lat6, 0.5) * 1e3, pct(lat6, 0.99) * 1e3
            print(
                f"    dual-stack x{workers}:         p50 {d50:7.2f} ms  p99 {d99:7.2f} ms  "
                f"{len(lat6) / wall6:8.0f} allocs/s  {rts6:.2f} round trips/alloc  "
                f"p50 ratio to single-stack {d50 / p50:5.2f}x"
            )
    if args.nodes:
        wall = bench_nodes(url, args.nodes)
        print(f"  claim blocks for {args.nodes} nodes: {wall:6.2f} s ({args.nodes / wall:.0f} nodes/s, "
              f"{wall / args.nodes * 1e3:.2f} ms each = {wall / args.nodes * 1e3 / cas50:.2f}x CAS p50)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", default="sqlite,etcd")
    parser.add_argument("--allocs", type=int, default=300, help="allocations per run (8 workers: half each)")
    parser.add_argument("--nodes", type=int, default=5000, help="nodes to register (0 to skip)")
    parser.add_argument("--ip-families", default="ipv4", choices=("ipv4", "ipv4,ipv6"),
                        help="ipv4,ipv6: also allocate in a dual-stack cluster, as a ratio of single-stack")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ocni-bench-"))
    try:
        for name in args.stores.split(","):
            if name == "sqlite":
                run_store("sqlite", f"sqlite://{tmp}/state.db", args)
            elif name == "etcd":
                from tests.fixtures_etcd import start_etcd

                cluster = start_etcd(tmp / "etcd")
                try:
                    run_store("etcd", cluster.url, args)
                finally:
                    cluster.stop()
            else:
                parser.error(f"--stores: unknown store {name!r} (sqlite, etcd)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
