"""The CNI path under attack and fault (issue 10, items 1, 2, 5, 7, 8), on the
real kernel: two agents in node namespaces made here (shared by the module),
the installed plugin run as a runtime runs it, results checked with ``ip``,
``conntrack`` and ``ipam show``, never through the project's own code.

Network safety: the only namespace handed in as "the agent's own" is the
test-made node namespace the agent runs in; the host's namespaces are
never passed to the plugin (``/proc/<this test's pid>/ns/uts`` is a uts
namespace file: read-only, and refused before anything uses it)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.kernel.cni_harness import OVERLAYCNI, Cluster
from tests.kernel.topology import Topology, ip_json, run

pytestmark = pytest.mark.kernel
REAP_FLAGS = ("--reap-interval", "1", "--reap-grace", "2")


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    topo = Topology()
    cluster = Cluster(topo=topo, workdir=tmp_path_factory.mktemp("hardening"))
    try:
        topo.add_underlay()
        cluster.create()
        cluster.install()
        cluster.add_node("n1", "10.224.0.4", *REAP_FLAGS)
        cluster.add_node("n2", "10.224.0.5", *REAP_FLAGS)
        yield cluster
    finally:
        topo.cleanup()


def used(c: Cluster) -> dict[str, int]:
    shown = json.loads(c.cli("ipam", "show", "--cluster", "t", "--output", "json").stdout)
    return {n["node"]: n["used"] for n in shown["nodes"]}


def allocated_ips(c: Cluster) -> set[str]:
    """The address keys in the SQLite file itself (``/overlaycni/clusters/t/ips/<node>/010.244.000.002``)."""
    db = sqlite3.connect(f"file:{c.workdir}/state.db?mode=ro", uri=True)
    try:
        keys = [k for (k,) in db.execute("SELECT key FROM kv WHERE key LIKE '/overlaycni/clusters/t/ips/%'")]
    finally:
        db.close()
    return {".".join(str(int(part)) for part in k.rsplit("/", 1)[1].split(".")) for k in keys}


def node_state(c: Cluster, node: str) -> tuple[set[str], list[dict]]:
    ns = c.agents[node].node.ns
    return {link["ifname"] for link in ip_json(ns, "link", "show")}, ip_json(ns, "route", "show")


def pod(c: Cluster, node: str, name: str, **kw) -> tuple[str, str]:
    """A new pod namespace ADDed on ``node``: (netns name, IP)."""
    ns = os.path.basename(c.topo.add_netns(name))
    code, res, _ = c.plugin(node, "ADD", ns, c.conf(node), **kw)
    assert code == 0, res
    return ns, res["ips"][0]["address"].split("/")[0]


def agent_status(c: Cluster, node: str) -> dict:
    return json.loads(run(OVERLAYCNI, "agent", "status", "--socket", c.agents[node].socket, "--output", "json").stdout)


# ----- item 1: CNI_NETNS that is not a pod's network namespace ------------------------------------


def test_bad_cni_netns_is_refused_at_once_and_the_node_keeps_serving(c, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    regular = tmp_path / "file"
    regular.write_text("not a namespace\n")
    node_ns = c.agents["n1"].node.path  # the agent's own namespace (made by this test)
    cases = {
        str(fifo): (4, "FIFO"),
        "/dev/null": (4, "character device"),
        str(regular): (4, "regular file"),
        str(tmp_path): (4, "directory"),
        f"/proc/{os.getpid()}/ns/uts": (4, "uts namespace"),
        node_ns: (4, "agent's own network namespace"),
        f"/var/run/netns/{c.topo.prefix}-missing": (3, "does not exist"),
    }
    before_used, before_node = used(c), node_state(c, "n1")
    for path, (code, words) in cases.items():
        rc, out, _ = c.plugin("n1", "ADD", "bad", c.conf("n1"), netns_path=path)
        # a FIFO that blocked the agent would end in the shim's timeout: code 11, not 4
        assert rc == 1 and out["code"] == code and path in out["msg"] and words in out["msg"], (path, out)
    assert used(c) == before_used and node_state(c, "n1") == before_node  # nothing made, in IPAM or the node
    assert regular.read_text() == "not a namespace\n"
    ns, ip = pod(c, "n1", "good")  # control: the same agent serves ADD and DEL
    assert c.topo.ping(c.agents["n1"].node.ns, ip)
    assert c.plugin("n1", "DEL", ns, c.conf("n1"))[0] == 0
    c.drained("n1")
    assert used(c) == before_used


# ----- item 2: repeated ADD, DEL on the wrong node, racing -----------------------------------------


def test_a_repeated_add_that_fails_keeps_the_live_pod(c):
    ns, ip = pod(c, "n1", "live")
    peer, _ = pod(c, "n1", "peer")
    host_if = {link["ifname"] for link in ip_json(c.agents["n1"].node.ns, "link", "show")}
    before = used(c)
    other = os.path.basename(c.topo.add_netns("other"))
    for path, code in ((f"/var/run/netns/{c.topo.prefix}-missing", 3),  # the case: released the IP
                       (f"/var/run/netns/{other}", 4),  # another netns: tore the first pod's veth down
                       (f"/var/run/netns/{ns}", 7)):  # the same one again: the interface exists
        rc, out, _ = c.plugin("n1", "ADD", ns, c.conf("n1"), netns_path=path)
        assert rc == 1 and out["code"] == code, (path, out)
        assert used(c) == before, path
        assert {link["ifname"] for link in ip_json(c.agents["n1"].node.ns, "link", "show")} == host_if, path
        assert c.topo.ping(peer, ip), path
    assert all(link["ifname"] == "lo" for link in ip_json(other, "link", "show"))
    for p in (ns, peer):
        assert c.plugin("n1", "DEL", p, c.conf("n1"))[0] == 0


def test_del_on_another_node_releases_nothing(c):
    ns, ip = pod(c, "n2", "far")
    before = used(c)
    rc, out, _ = c.plugin("n1", "DEL", ns, c.conf("n1"))  # the runtime of the wrong node
    assert (rc, out) == (0, None)
    assert used(c) == before and ip in allocated_ips(c)
    assert c.topo.ping(c.agents["n2"].node.ns, ip)  # the pod on n2 still has its address and route
    assert c.plugin("n2", "DEL", ns, c.conf("n2"))[0] == 0  # control: its own node releases it
    c.drained("n2")
    assert used(c)["n2"] == before["n2"] - 1 and ip not in allocated_ips(c)


# ----- item 7: conntrack entries of a released address ---------------------------------------------


def conntrack_lines(c: Cluster, node: str) -> list[str]:
    out = run("ip", "netns", "exec", c.agents[node].node.ns, "conntrack", "-L", check=False).stdout
    return out.splitlines()


def names(lines: list[str], ip: str) -> list[str]:
    return [line for line in lines if f"src={ip} " in line or f"dst={ip} " in line]


def test_del_flushes_the_released_address_from_conntrack(c):
    client, _ = pod(c, "n1", "ctc")
    gone_ns, gone = pod(c, "n1", "ctgone")
    kept_ns, kept = pod(c, "n1", "ctkept")
    for ip in (gone, kept):
        assert c.topo.ping(client, ip)
    lines = conntrack_lines(c, "n1")
    assert names(lines, gone) and names(lines, kept), lines  # the flows are tracked on the node
    assert c.plugin("n1", "DEL", gone_ns, c.conf("n1"))[0] == 0
    c.drained("n1")  # flushed once the quarantine drains (before the address can be handed out again)
    lines = conntrack_lines(c, "n1")
    assert names(lines, gone) == [], lines
    assert names(lines, kept), lines  # control: another pod's flow survives
    for p in (client, kept_ns):
        assert c.plugin("n1", "DEL", p, c.conf("n1"))[0] == 0


# ----- item 8: the leak reaper ------------------------------------------------------------------


def test_the_reaper_releases_a_pod_whose_netns_vanished(c):
    live_ns, live = pod(c, "n1", "rlive")
    gone_ns, gone = pod(c, "n1", "rgone")
    run("ip", "netns", "del", gone_ns)  # behind the runtime's and the agent's back: no DEL
    c.topo.namespaces.remove(gone_ns)
    deadline = time.monotonic() + 30
    while gone in allocated_ips(c) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert gone not in allocated_ips(c)
    assert live in allocated_ips(c) and c.topo.ping(c.agents["n1"].node.ns, live)  # control: a live pod stays
    reaped = agent_status(c, "n1")["reaped"]
    assert gone in [r["ip"] for r in reaped["recent"]] and live not in [r["ip"] for r in reaped["recent"]]
    assert reaped["total"] >= 1
    fetch = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1] + '/metrics', timeout=5).read().decode())"
    metrics = run("ip", "netns", "exec", c.agents["n1"].node.ns, sys.executable, "-c", fetch,
                  c.agents["n1"].ready["metrics"]).stdout
    assert f"overlaycni_reaped_total {float(reaped['total'])}" in metrics
    assert c.plugin("n1", "DEL", live_ns, c.conf("n1"))[0] == 0


# ----- item 5: NetworkPolicy is in place when ADD returns ------------------------------------------

SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(16)
print("listening", flush=True)
while True:
    conn, _ = s.accept()
    conn.close()
"""

CLIENT = """
import socket, sys
for line in sys.stdin:
    s = socket.socket()
    s.settimeout(1.5)
    try:
        s.connect((line.strip(), 8080))
        print("connected", flush=True)
    except OSError as exc:
        print("failed", exc, flush=True)
    finally:
        s.close()
"""

DENY_ALL = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: np}
spec: {podSelector: {}, policyTypes: [Ingress]}
"""


def connect_right_after_add(c: Cluster, client: subprocess.Popen, name: str, k8s_namespace: str) -> str:
    """A listener waits in a new pod's netns; the moment ADD returns, the client connects."""
    ns = os.path.basename(c.topo.add_netns(name))
    server = c.topo.spawn(ns, sys.executable, "-c", SERVER, stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    code, res, _ = c.plugin("n1", "ADD", ns, c.conf("n1"), k8s_namespace=k8s_namespace)
    assert code == 0, res
    client.stdin.write(res["ips"][0]["address"].split("/")[0] + "\n")
    client.stdin.flush()
    return client.stdout.readline().strip()


def test_add_returns_only_after_the_pods_policy_is_programmed(c, tmp_path):
    cl_ns, _ = pod(c, "n1", "npclient", k8s_namespace="clients")
    client = c.topo.spawn(cl_ns, sys.executable, "-c", CLIENT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert connect_right_after_add(c, client, "npopen", "np-open") == "connected"  # control: no policy there
    policy = tmp_path / "deny.yaml"
    policy.write_text(DENY_ALL)
    c.cli("policy", "apply", "-f", str(policy), "--cluster", "t")
    deadline = time.monotonic() + 20
    while "in-ns-np" not in run("ip", "netns", "exec", c.agents["n1"].node.ns, "nft", "list", "table", "inet",
                                "overlaycni", check=False).stdout:
        assert time.monotonic() < deadline, "the policy never reached node n1"
        time.sleep(0.2)
    assert connect_right_after_add(c, client, "npdenied", "np").startswith("failed")
    assert connect_right_after_add(c, client, "npopen2", "np-open") == "connected"  # control, with a policy in the cluster
    c.cli("policy", "delete", "np/deny-all", "--cluster", "t")


# ----- the conntrack port on its own: both dump strategies ----------------------------------------

NFT_CT = """table ip cttest {
  chain in {
    type filter hook input priority 0;
    ct state new counter
  }
  chain out {
    type filter hook output priority 0;
    ct state new counter
  }
}
"""  # a ct expression turns connection tracking on in the namespace


@pytest.mark.parametrize("small_table", [1000, 0], ids=["one-unfiltered-walk", "two-filtered-walks"])
def test_conntrack_flush_address_both_ways(monkeypatch, small_table):
    from ipaddress import IPv4Address

    from overlaycni.dataplane.linux import conntrack
    from overlaycni.dataplane.linux.netns import NetnsWorker

    monkeypatch.setattr(conntrack, "SMALL_TABLE", small_table)
    with Topology() as topo:
        r = os.path.basename(topo.add_netns("ctr"))
        h = os.path.basename(topo.add_netns("cth"))
        run("ip", "-n", r, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", h)
        run("ip", "-n", r, "addr", "add", "10.9.0.1/24", "dev", "v0")
        run("ip", "-n", r, "link", "set", "v0", "up")
        for addr in ("10.9.0.2/24", "10.9.0.3/24"):
            run("ip", "-n", h, "addr", "add", addr, "dev", "v1")
        run("ip", "-n", h, "link", "set", "v1", "up")
        subprocess.run(["ip", "netns", "exec", r, "nft", "-f", "-"], input=NFT_CT, text=True, check=True)
        assert topo.ping(h, "10.9.0.1")  # 10.9.0.2 -> r: r's table names 10.9.0.2 as source
        assert topo.ping(r, "10.9.0.2")  # r -> 10.9.0.2: as destination
        assert topo.exec(h, "ping", "-c1", "-W2", "-I", "10.9.0.3", "10.9.0.1", check=False).returncode == 0
        worker = NetnsWorker(r)
        try:
            ct = worker.call(conntrack.LinuxConntrack)
            listed = run("ip", "netns", "exec", r, "conntrack", "-L").stdout
            assert len(names(listed.splitlines(), "10.9.0.2")) == 2 and names(listed.splitlines(), "10.9.0.3")
            assert ct.flush_address(IPv4Address("10.9.0.2")) == 2
            listed = run("ip", "netns", "exec", r, "conntrack", "-L").stdout.splitlines()
            assert names(listed, "10.9.0.2") == [] and names(listed, "10.9.0.3")  # control: the other one stays
            assert ct.flush_address(IPv4Address("10.9.0.2")) == 0
            worker.call(ct.close)
        finally:
            worker.close()
