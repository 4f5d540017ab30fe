"""Faults: an etcd member dies mid-run; an allocator is SIGKILLed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from overlaycni import ipam
from overlaycni.config import parse_network
from overlaycni.datastore import open_datastore
from overlaycni.errors import DatastoreUnavailable

REPO = Path(__file__).resolve().parents[2]


def _net():
    return parse_network({"network-plugin": "azure", "network-plugin-mode": "overlay", "node-cidr-size": 23})


def _leader_index(cluster) -> int:
    ids = []
    for port in cluster.client_ports:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v3/maintenance/status", data=b"{}", method="POST")
        status = json.loads(urllib.request.urlopen(req, timeout=5).read())
        ids.append((status["header"]["member_id"], status["leader"]))
    leader = ids[0][1]
    return [member for member, _ in ids].index(leader)


@pytest.mark.etcd
def test_three_member_etcd_keeps_allocating_while_the_leader_dies(etcd_cluster3):
    leader = _leader_index(etcd_cluster3)
    order = [leader] + [i for i in range(3) if i != leader]
    url = "etcd://" + ",".join(f"127.0.0.1:{etcd_cluster3.client_ports[i]}" for i in order)
    store = open_datastore(url)  # talks to the leader first
    ipam.create_cluster(store, "c", _net())
    ipam.register_node(store, "c", "n1", IPv4Address("10.224.0.4"))

    stop = threading.Event()
    seen: set[str] = set()
    watch_errors: list[BaseException] = []
    start = store.revision() + 1

    def watch() -> None:
        try:
            for ev in store.watch("/overlaycni/clusters/c/ips/", start_revision=start, stop=stop):
                if ev.kind == "put":
                    seen.add(ev.key)
                if len(seen) == 100:
                    return
        except BaseException as exc:
            watch_errors.append(exc)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    allocated = []
    for i in range(100):
        if i == 30:
            etcd_cluster3.kill(leader)
        allocated.append(ipam.allocate(store, "c", "n1", f"pod-{i}", "eth0"))
    assert store.active_endpoint != ("127.0.0.1", etcd_cluster3.client_ports[leader])  # it failed over
    ips = {a.ip for a in allocated}
    assert len(ips) == 100
    report = ipam.check(store, "c", valid=[(f"pod-{i}", "eth0") for i in range(100)])
    assert report.ok, report.problems
    watcher.join(30)
    stop.set()
    assert not watch_errors, watch_errors
    assert len(seen) == 100  # the watch reconnected to a surviving member and missed nothing
    store.close()


@pytest.mark.etcd
def test_unreachable_etcd_is_a_clear_error():
    with socket_port() as port, pytest.raises(DatastoreUnavailable) as info:
        open_datastore(f"etcd://127.0.0.1:{port}")
    assert f"127.0.0.1:{port}" in str(info.value)


@pytest.mark.etcd
def test_dead_first_endpoint_is_skipped(etcd_url):
    with socket_port() as port:
        live = etcd_url.removeprefix("etcd://")
        store = open_datastore(f"etcd://127.0.0.1:{port},{live}")
    store.put("/t/x", "1")
    assert store.get("/t/x").value == "1"
    store.close()


class socket_port:
    """A loopback port with nothing listening on it (bound, not listening)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


def test_sigkilled_allocator_leaves_no_duplicate_and_gc_clears_leaks(store_url):
    store = open_datastore(store_url)
    ipam.create_cluster(store, "c", _net())
    ipam.register_node(store, "c", "n1", IPv4Address("10.224.0.4"))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.datastore._worker", "alloc", store_url, "c", "n1", "k", "400"],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env=env,
        text=True,
    )
    done: dict[str, str] = {}
    for line in proc.stdout:
        cid, ip = line.split()
        done[cid] = ip
        if len(done) == 40:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(30)
    for line in proc.stdout:  # whatever it printed before dying
        cid, ip = line.split()
        done[cid] = ip
    assert proc.returncode == -signal.SIGKILL

    allocs = ipam.list_allocations(store, "c", node="n1")
    by_cid = {a.container_id: str(a.ip.ip) for a in allocs}
    assert len({a.ip for a in allocs}) == len(allocs)  # no duplicate address
    assert all(by_cid.get(cid) == ip for cid, ip in done.items())  # every reported allocation is stored
    assert ipam.check(store, "c").ok  # nothing half-written

    valid = [(cid, "eth0") for cid in done]
    released = ipam.gc(store, "c", valid)
    assert {a.container_id for a in released} == set(by_cid) - set(done)
    assert ipam.check(store, "c", valid=valid).ok
    assert {a.container_id for a in ipam.list_allocations(store, "c")} == set(done)
    store.close()


@pytest.mark.etcd
def test_watch_raises_unavailable_when_etcd_is_gone(tmp_path):
    from tests.fixtures_etcd import start_etcd

    cluster = start_etcd(tmp_path / "solo")
    try:
        store = open_datastore(cluster.url)
        start = store.put("/w/a", "1")
        errors: list[BaseException] = []
        seen = []
        stop = threading.Event()

        def run() -> None:
            try:
                for ev in store.watch("/w/", start_revision=start, stop=stop):
                    seen.append(ev)
                    if len(seen) == 1:
                        cluster.kill(0)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(60)
        stop.set()
        assert [e.key for e in seen] == ["/w/a"]
        assert len(errors) == 1 and isinstance(errors[0], DatastoreUnavailable), errors
        with pytest.raises(DatastoreUnavailable):
            store.get("/w/a")
        store.close()
    finally:
        cluster.stop()
