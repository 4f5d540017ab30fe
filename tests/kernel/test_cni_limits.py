"""The agent's socket and deadlines under abuse and faults (issue 10, item 9;
item 2's DEL after ``cluster delete``), with a real agent in a node namespace
made here (shared by the module; the last test deletes the cluster)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess

import pytest

from tests.kernel.cni_harness import OVERLAYCNI, Cluster
from tests.kernel.topology import Topology, ip_json

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    topo = Topology()
    cluster = Cluster(topo=topo, workdir=tmp_path_factory.mktemp("limits"))
    try:
        topo.add_underlay()
        cluster.create()
        cluster.install()
        cluster.add_node("n1", "10.224.0.4")
        yield cluster
    finally:
        topo.cleanup()


def used(c: Cluster) -> int:
    shown = json.loads(c.cli("ipam", "show", "--cluster", "t", "--output", "json").stdout)
    return sum(n["used"] for n in shown["nodes"])


def raw(path: str, payload: bytes) -> dict:
    """One request straight to the agent's socket, as a hostile local client would send it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    try:
        s.sendall(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before it was all read; the answer is waiting
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return json.loads(data)


def add_del(c: Cluster, name: str) -> None:
    ns = os.path.basename(c.topo.add_netns(name))
    code, res, _ = c.plugin("n1", "ADD", ns, c.conf("n1"))
    assert code == 0, res
    assert c.topo.ping(c.agents["n1"].node.ns, res["ips"][0]["address"].split("/")[0])
    assert c.plugin("n1", "DEL", ns, c.conf("n1"))[0] == 0


def test_64_idle_connections_then_an_add(c):
    idle = []
    try:
        for _ in range(64):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(c.agents["n1"].socket)
            idle.append(s)
        add_del(c, "afteridle")
    finally:
        for s in idle:
            s.close()


def test_an_8_mib_netconf_is_a_permanent_error(c):
    conf = {**c.conf("n1"), "padding": "x" * (8 << 20)}
    code, out, _ = c.plugin("n1", "ADD", "big", conf)  # the shim refuses it before sending
    assert code == 1 and out["code"] == 7, out
    line = json.dumps({"command": "ADD", "container_id": "big", "ifname": "eth0", "netns": "/var/run/netns/x",
                       "config": conf}).encode() + b"\n"
    answer = raw(c.agents["n1"].socket, line)  # the agent refuses it too, at its limit
    assert answer["error"]["code"] == 7 and "larger than" in answer["error"]["msg"], answer
    add_del(c, "afterbig")  # control


def test_deeply_nested_json_gets_a_decode_failure(c):
    deep = "[" * 10_000 + "]" * 10_000
    code, out, _ = c.plugin("n1", "ADD", "deep", '{"cniVersion": "1.0.0", "name": "x", "a": ' + deep + "}")
    assert code == 1 and out["code"] == 6, out
    line = b'{"command": "ADD", "config": {"cniVersion": "1.0.0", "a": ' + deep.encode() + b"}}\n"
    answer = raw(c.agents["n1"].socket, line)
    assert answer["error"]["code"] == 6, answer
    add_del(c, "afterdeep")  # control


def start_second_agent(c: Cluster, socket_path: str) -> subprocess.Popen:
    n = len(c.topo.namespaces)
    node = c.topo.add_node(f"x{n}", f"10.224.1.{n}/16")
    return c.topo.spawn(node.ns, OVERLAYCNI, "--datastore", c.store, "agent", "--cluster", "t", "--node", f"x{n}",
                        "--node-ip", f"10.224.1.{n}", "--socket", socket_path, "--metrics-addr", "",
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_agent_never_replaces_what_is_not_its_stale_socket(c, tmp_path):
    precious = tmp_path / "agent.sock"
    precious.write_text("user data\n")
    agent = start_second_agent(c, str(precious))
    out, err = agent.communicate(timeout=60)
    assert agent.returncode != 0 and str(precious) in err and "not a socket" in err, err
    assert precious.read_text() == "user data\n"
    live = start_second_agent(c, c.agents["n1"].socket)  # n1's agent answers there
    out, err = live.communicate(timeout=60)
    assert live.returncode != 0 and "another agent" in err, err
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on: what a killed agent leaves
    agent = start_second_agent(c, str(stale))  # control: that one is replaced
    ready = json.loads(agent.stdout.readline())
    assert ready["event"] == "ready" and ready["socket"] == str(stale)
    agent.terminate()
    agent.wait(60)  # 0.6 s when quiet; over 10 s once under CI's load (4 workers and labs)
    c.cli("node", "delete", "--name", ready["node"], "--cluster", "t")


def test_a_stalled_datastore_answers_11_and_leaves_nothing(c):
    ns = os.path.basename(c.topo.add_netns("stall"))
    c.drained("n1")  # an earlier test's DEL, released
    before = used(c)
    db = sqlite3.connect(str(c.workdir / "state.db"), timeout=0, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")  # SQLite's write lock, held as another writer would hold it
    try:
        code, out, _ = c.plugin("n1", "ADD", ns, c.conf("n1"))
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert code == 1 and out["code"] == 11, out
    assert "did not answer" not in out["msg"], out  # the agent answered within the plugin's wait, not the shim's timeout
    assert all(link["ifname"] == "lo" for link in ip_json(ns, "link", "show"))
    assert used(c) == before
    code, res, _ = c.plugin("n1", "ADD", ns, c.conf("n1"))  # control: the lock released, ADD works
    assert code == 0, res
    assert used(c) == before + 1
    assert c.plugin("n1", "DEL", ns, c.conf("n1"))[0] == 0


def test_del_after_cluster_delete_succeeds(c):
    """Last in the module: it deletes the cluster."""
    ns = os.path.basename(c.topo.add_netns("orphan"))
    code, res, _ = c.plugin("n1", "ADD", ns, c.conf("n1"))
    assert code == 0, res
    host_if = res["interfaces"][0]["name"]
    c.cli("cluster", "delete", "--name", "t")
    for _ in range(2):
        code, out, _ = c.plugin("n1", "DEL", ns, c.conf("n1"))
        assert (code, out) == (0, None)
    assert all(link["ifname"] != host_if for link in ip_json(c.agents["n1"].node.ns, "link", "show"))
