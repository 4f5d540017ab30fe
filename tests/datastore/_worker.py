"""Worker processes for the concurrency and fault tests.

``python -m tests.datastore._worker alloc URL CLUSTER NODE PREFIX COUNT``
allocates COUNT addresses (container IDs PREFIX-0, PREFIX-1, ...) and prints
``CID IP`` after each one, flushed, so a test can SIGKILL it mid-run and know
exactly which allocations it completed.
"""

from __future__ import annotations

import multiprocessing as mp
import sys

from overlaycni import ipam
from overlaycni.datastore import open_datastore


def run_processes(target, args_list: list[tuple]) -> list:
    """Start one forked process per argument tuple, all released at once by a
    barrier; return their results in order (a failure in any one raises)."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(len(args_list))
    results = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(i, target, args, barrier, results)) for i, args in enumerate(args_list)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    for _ in procs:
        i, ok, value = results.get(timeout=240)
        if not ok:
            raise AssertionError(f"worker {i} failed: {value}")
        out[i] = value
    for p in procs:
        p.join(30)
    return [out[i] for i in range(len(args_list))]


def _run(i, target, args, barrier, results) -> None:
    try:
        barrier.wait(60)
        results.put((i, True, target(*args)))
    except BaseException as exc:  # reported to the parent
        results.put((i, False, f"{type(exc).__name__}: {exc}"))


def register_one(url: str, cluster: str, name: str, ip: str) -> str:
    store = open_datastore(url)
    try:
        return str(ipam.register_node(store, cluster, name, ip).block)  # type: ignore[arg-type]
    finally:
        store.close()


def allocate_many(url: str, cluster: str, node: str, prefix: str, count: int) -> list[tuple[str, str]]:
    store = open_datastore(url)
    try:
        out = []
        for i in range(count):
            cid = f"{prefix}-{i}"
            out.append((cid, str(ipam.allocate(store, cluster, node, cid, "eth0").ip.ip)))
        return out
    finally:
        store.close()


def allocate_pairs(url: str, cluster: str, node: str, prefix: str, count: int) -> list[tuple[str, str, str]]:
    """Dual-stack: (container ID, IPv4, IPv6) per allocation."""
    store = open_datastore(url)
    try:
        out = []
        for i in range(count):
            cid = f"{prefix}-{i}"
            a = ipam.allocate(store, cluster, node, cid, "eth0")
            out.append((cid, str(a.ip.ip), str(a.ip_v6.ip) if a.ip_v6 else ""))
        return out
    finally:
        store.close()


def main(argv: list[str]) -> None:
    if argv[0] == "alloc":
        url, cluster, node, prefix, count = argv[1:6]
        store = open_datastore(url)
        for i in range(int(count)):
            cid = f"{prefix}-{i}"
            alloc = ipam.allocate(store, cluster, node, cid, "eth0")
            sys.stdout.write(f"{cid} {alloc.ip.ip}\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
