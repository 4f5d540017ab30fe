"""Peer selection once per burst of node events (issue 14): the
``Coalescer`` alone, deterministically, and the agent's node watch with the
in-memory data plane and a real SQLite store."""

from __future__ import annotations

import threading
from ipaddress import IPv4Address

from overlaycni import ipam
from overlaycni.agent.coalesce import Coalescer
from overlaycni.dataplane import vtep_mac
from tests.unit.test_agent import cluster, start_agent, wait_for  # noqa: F401 - the fixture

__all__ = ["cluster"]


def test_requests_during_a_run_share_the_next_run():
    stop = threading.Event()
    entered, release = threading.Event(), threading.Event()
    seen: list[int] = []
    state = {"n": 0}

    def fn():
        seen.append(state["n"])  # what this run sees
        entered.set()
        release.wait(10)

    c = Coalescer(fn, stop=stop, name="test")
    t = threading.Thread(target=c.loop, daemon=True)
    t.start()
    try:
        state["n"] = 1
        c.request()
        assert entered.wait(10)  # the first run holds
        for n in range(2, 7):  # five changes while it runs
            state["n"] = n
            c.request()
        release.set()
        assert c.idle(10)
        assert seen == [1, 6] and (c.runs, c.requests) == (2, 6)  # one more run, and it saw the last change
        c.request()  # control: a lone request runs at once, alone
        assert c.idle(10) and seen == [1, 6, 6] and c.runs == 3
    finally:
        stop.set()
        release.set()
        t.join(5)


def test_a_failed_run_does_not_stop_the_loop():
    stop = threading.Event()
    calls: list[int] = []

    def fn():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    c = Coalescer(fn, stop=stop, name="test")
    t = threading.Thread(target=c.loop, daemon=True)
    t.start()
    try:
        c.request()
        assert c.idle(10)
        c.request()
        assert c.idle(10) and len(calls) == 2
    finally:
        stop.set()
        t.join(5)


def test_a_burst_of_node_records_is_one_selection_with_every_peer(cluster, tmp_path):  # noqa: F811
    """While the kernel lock is held (a selection waits on it), 20 nodes
    join: their events fold into the view and share the next selection,
    which programs all 20 peers."""
    url, store = cluster
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    node = agent.node
    sel = node.peer_selection
    try:
        assert sel.idle(10)
        runs, requests = sel.runs, sel.requests
        with node.kernel_lock:
            for i in range(20):
                ip = IPv4Address(f"10.224.1.{i + 1}")
                ipam.register_node(store, "c1", f"b{i}", ip, vtep_mac=vtep_mac(ip))
            assert wait_for(lambda: sum(r.name.startswith("b") for r in node.view.records) == 20)
        assert sel.idle(10)
        assert {p.name for p in agent.state.peers} == {f"b{i}" for i in range(20)}
        assert 1 <= sel.runs - runs <= 2  # the one that waited on the lock, then the rest: not 20
        assert sel.requests - requests >= 20  # every event asked for a selection
        for i in range(20):  # the kernel holds each peer's route
            assert ipam.get_node(store, "c1", f"b{i}").block in dp.kernel.routes
    finally:
        agent.shutdown()


def test_a_large_burst_gives_the_heap_back_once_a_lone_node_does_not(cluster, tmp_path, monkeypatch):  # noqa: F811
    """A selection that changed ``TRIM_AFTER_PEERS`` peers or more ends with
    ``malloc_trim`` (``heap.release_free_memory``); one that changed one
    peer does not (control)."""
    from overlaycni.agent import peers as peers_mod

    url, store = cluster
    agent, _dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    trims: list[int] = []
    monkeypatch.setattr(peers_mod, "release_free_memory", lambda: trims.append(1) or True)
    node = agent.node
    sel = node.peer_selection
    try:
        assert sel.idle(10)
        ipam.register_node(store, "c1", "lone", IPv4Address("10.224.3.1"), vtep_mac=vtep_mac(IPv4Address("10.224.3.1")))
        assert wait_for(lambda: "lone" in {p.name for p in agent.state.peers}) and sel.idle(10)
        assert trims == []
        burst = 2 * peers_mod.TRIM_AFTER_PEERS  # two selections at most (the one waiting on the lock, then the rest)
        with node.kernel_lock:  # the burst's events wait for one selection
            for i in range(burst):
                ip = IPv4Address(int(IPv4Address("10.224.4.1")) + i)
                ipam.register_node(store, "c1", f"t{i}", ip, vtep_mac=vtep_mac(ip))
            assert wait_for(lambda: sum(r.name.startswith("t") for r in node.view.records) == burst)
        assert sel.idle(10)
        assert sum(p.name.startswith("t") for p in agent.state.peers) == burst
        assert trims  # the selection that programmed the burst trimmed
    finally:
        agent.shutdown()
