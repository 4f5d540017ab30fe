"""The agent's stop (``Agent.shutdown``) without root: the in-memory data plane,
a real SQLite store, the real shim over the agent's unix socket. Every
thread the agent started has ended when ``shutdown`` returns, the batch in
flight is answered, the lease is given up and the socket file removed; a
loop that ignores the stop is named (the control). The kernel version is
in tests/kernel/test_node_faults.py; the time it takes, in bench/stop.py."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from ipaddress import IPv4Address

import pytest

from overlaycni.agent import stopping
from overlaycni.agent.daemon import Agent, AgentOptions
from overlaycni.agent.flowlog import FlowLogOptions
from overlaycni.dataplane.fake import FakeDataplane, FakeKernelEvents
from overlaycni.dataplane.linux.wake import WaitableSockets
from overlaycni.dataplane.nflog_fake import FakeVerdictLog
from overlaycni.datastore import open_datastore
from overlaycni.errors import NotFound
from tests.unit.test_agent import cluster, cni, wait_for  # noqa: F401 (cluster is a fixture)


def start(url, tmp_path, name="n1", ip="10.224.0.4", *, signals=False):
    opts = AgentOptions(
        cluster="c1", node=name, node_ip=IPv4Address(ip), datastore=url, socket=str(tmp_path / f"{name}.sock"),
        metrics_addr="127.0.0.1:0", lease_ttl=5, resync_interval=60, flow_log=FlowLogOptions(),
    )  # fmt: skip
    agent = Agent(opts, store=open_datastore(url), dataplane=FakeDataplane(underlay_ip=IPv4Address(ip)))
    if signals:
        agent.handle_signals()
    agent.start()
    return agent


def started_since(before: set[threading.Thread]) -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t not in before and t.is_alive())


def test_every_thread_the_agent_started_has_ended_when_shutdown_returns(cluster, tmp_path):  # noqa: F811
    url, store = cluster
    before = set(threading.enumerate())
    agent = start(url, tmp_path)
    code, res = cni(agent, "ADD")  # a served request: the request pool has threads too
    assert code == 0, res
    lease = agent.node.lease
    store.refresh_lease(lease)  # control: live until the stop
    running = started_since(before)
    assert {"lease", "watch", "resync", "policy", "policy-watch", "repair", "flows", "peers", "reaper", "cni-batch",
            "cni-socket", "metrics-http"} <= set(running), running  # fmt: skip
    agent.shutdown()
    assert started_since(before) == []
    assert agent.stragglers == []
    assert not os.path.exists(agent.opts.socket)
    with pytest.raises(NotFound):
        store.refresh_lease(lease)  # given up: peers see the node as not live at once
    assert set(agent.stop_phases) == {"socket", "wake", "batch", "threads", "lease", "close"}
    agent.shutdown()  # a second stop (a signal during the first, a test's finally) does nothing


def test_sigterm_reaches_the_agent_through_its_relay_thread(cluster, tmp_path):  # noqa: F811
    """The handler only writes to a pipe (a lock taken in a handler can deadlock
    the main thread); the relay thread sets the stop, and ends with the agent."""
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    before = set(threading.enumerate())
    try:
        agent = start(url := cluster[0], tmp_path, signals=True)
        assert "signals" in started_since(before) and not agent.stop_event.is_set()  # control: nothing yet
        os.kill(os.getpid(), signal.SIGTERM)
        assert agent.stop_event.wait(10)
        agent.shutdown()
        assert started_since(before) == [] and agent.stragglers == []
        quiet = start(url, tmp_path, name="n2", ip="10.224.0.5", signals=True)
        quiet.shutdown()  # a stop without a signal ends the relay thread too
        assert started_since(before) == [] and quiet.stragglers == []
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_a_loop_that_ignores_the_stop_is_named_and_does_not_hold_the_stop(cluster, tmp_path, monkeypatch, caplog):  # noqa: F811
    url, store = cluster
    monkeypatch.setattr(stopping, "STOP_SECONDS", 0.5)
    release = threading.Event()
    before = set(threading.enumerate())
    agent = start(url, tmp_path)
    agent._spawn("stubborn", lambda: release.wait(60))  # a loop that waits on something else than stop_event
    lease = agent.node.lease
    try:
        with caplog.at_level(logging.WARNING, logger="overlaycni.agent.daemon"):
            agent.shutdown()
        assert agent.stragglers == ["stubborn"]
        assert started_since(before) == ["stubborn"]  # what the first test's check catches
        assert any("stubborn still running" in r.getMessage() for r in caplog.records), caplog.text
        with pytest.raises(NotFound):  # the rest of the stop went on
            store.refresh_lease(lease)
        assert not os.path.exists(agent.opts.socket)
    finally:
        release.set()
    assert wait_for(lambda: started_since(before) == [])


def test_the_batch_in_flight_is_answered_and_later_requests_are_refused(cluster, tmp_path):  # noqa: F811
    url, _ = cluster
    agent = start(url, tmp_path)
    batcher = agent.node.ops.batcher
    applying, go_on = threading.Event(), threading.Event()
    apply = batcher.apply

    def slow(batch):
        applying.set()
        go_on.wait(10)
        apply(batch)

    batcher.apply = slow
    answers = {}
    adder = threading.Thread(target=lambda: answers.setdefault("add", cni(agent, "ADD", cid="inflight")))
    adder.start()
    assert applying.wait(10)
    stopper = threading.Thread(target=agent.shutdown)
    stopper.start()
    assert wait_for(lambda: not os.path.exists(agent.opts.socket))  # no new requests while the batch runs
    late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(OSError):
        late.connect(agent.opts.socket)
    late.close()
    go_on.set()
    adder.join(10)
    stopper.join(10)
    assert not stopper.is_alive() and agent.stragglers == []
    code, res = answers["add"]
    assert code == 0 and res["ips"], res  # applied and answered, not cut off by the stop


def test_closing_the_kernel_ports_wakes_their_waiters():
    """``KernelEvents.close`` and ``VerdictLog.close`` from another thread end a wait at once (the
    kernel's sockets through ``WaitableSockets``, the fakes alike); control: without it the wait goes on."""
    a, b = socket.socketpair()
    ports = [
        ("events", FakeKernelEvents(), lambda p: p.wait(60)),
        ("verdicts", FakeVerdictLog(), lambda p: p.receive(60)),
        ("sockets", WaitableSockets([a]), lambda p: _ready(p, 60)),
    ]
    for name, port, wait in ports:
        got = []
        waiter = threading.Thread(target=lambda port=port, wait=wait, got=got: got.append(wait(port)), daemon=True)
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive(), name  # control: nothing to read, so it still waits
        port.close()
        waiter.join(10)
        assert not waiter.is_alive() and got == [[]], name
        assert wait(port) == [], name  # closed: at once, and from then on
    b.close()


def _ready(w: WaitableSockets, timeout: float) -> list[socket.socket]:
    with w.ready(timeout) as ready:
        return ready


def test_waitable_sockets_are_closed_by_the_last_one_out():
    a, b = socket.socketpair()
    w = WaitableSockets([a])
    b.send(b"x")
    with w.ready(5) as ready:
        assert ready == [a]
        w.close()  # while a reader is inside: the socket stays open for its read
        assert a.recv(1) == b"x"
    assert a.fileno() == -1  # closed on the way out
    b.close()
    idle = WaitableSockets([socket.socket()])
    idle.close()  # control: nobody waiting, closed at once
    assert idle.socks[0].fileno() == -1
