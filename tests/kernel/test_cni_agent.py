"""The CNI plugin and the node agent on the real kernel.

Agents run as processes inside node namespaces; the installed plugin is run
the way a runtime runs it; results are checked against ``ip -j`` inside the
pod, never through the project's own code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.kernel.cni_harness import OVERLAYCNI, REF_PLUGINS, Cluster
from tests.kernel.topology import Topology, ip_json, run

pytestmark = pytest.mark.kernel


@pytest.fixture()
def cluster(tmp_path):
    topo = Topology()
    c = Cluster(topo=topo, workdir=tmp_path)
    try:
        topo.add_underlay()
        yield c
    finally:
        topo.cleanup()


def started(c: Cluster, *nodes: tuple[str, str], etcd: bool = False) -> Cluster:
    if etcd:
        c.start_etcd()
    c.create()
    c.install()
    for name, ip in nodes:
        c.add_node(name, ip)
    return c


def pod_view(ns: str) -> tuple[list[dict], list[dict]]:
    return ip_json(ns, "addr", "show", "dev", "eth0"), ip_json(ns, "route", "show")


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_check_del_match_the_kernel(cluster, version):
    c = started(cluster, ("n1", "10.224.0.4"))
    ns, res = c.pod("n1", "p1", version)
    assert res["cniVersion"] == version
    ip = res["ips"][0]
    addr, prefix = ip["address"].split("/")
    assert prefix == "24"
    (link,) = [a for a in pod_view(ns)[0]]
    inet = [a for a in link["addr_info"] if a["family"] == "inet"]
    assert [(a["local"], a["prefixlen"]) for a in inet] == [(addr, 24)]
    assert link["ifname"] == "eth0" and link["mtu"] == 1450  # underlay 1500 - VXLAN 50
    pod_if = res["interfaces"][ip["interface"]]
    assert pod_if["mac"] == link["address"] and pod_if["sandbox"] == f"/var/run/netns/{ns}"
    routes = pod_view(ns)[1]
    default = [r for r in routes if r["dst"] == "default"]
    assert default and default[0]["gateway"] == ip["gateway"] == res["routes"][0]["gw"]
    # the node has a /32 to the pod via the host veth named in the result
    host_if = res["interfaces"][0]["name"]
    node_routes = ip_json(c.agents["n1"].node.ns, "route", "show", f"{addr}/32")
    assert node_routes and node_routes[0]["dev"] == host_if

    code, out, _ = c.plugin("n1", "CHECK", ns, c.conf("n1", version, prevResult=res))
    assert (code, out) == (0, None)
    # CHECK notices a changed pod: remove the address behind the plugin's back
    run("ip", "-n", ns, "addr", "del", ip["address"], "dev", "eth0")
    code, out, _ = c.plugin("n1", "CHECK", ns, c.conf("n1", version, prevResult=res))
    assert code != 0 and out["code"] >= 100, out

    for _ in range(2):  # DEL is repeatable
        code, out, _ = c.plugin("n1", "DEL", ns, c.conf("n1", version))
        assert (code, out) == (0, None)
    assert not any(link["ifname"] == host_if for link in ip_json(c.agents["n1"].node.ns, "link", "show"))


def test_add_on_existing_interface_is_an_error_and_del_after_netns_is_gone(cluster):
    c = started(cluster, ("n1", "10.224.0.4"))
    ns, res = c.pod("n1", "p1")
    code, out, _ = c.plugin("n1", "ADD", ns, c.conf("n1"), cid="other")
    assert code != 0 and out["code"] in (7, 102), out
    run("ip", "netns", "del", ns)
    c.topo.namespaces.remove(ns)
    code, out, _ = c.plugin("n1", "DEL", ns, c.conf("n1"))
    assert (code, out) == (0, None)
    c.drained("n1")
    state = json.loads(c.cli("ipam", "show", "--cluster", "t", "--output", "json").stdout)
    assert [n["used"] for n in state["nodes"]] == [0], state


def test_status_version_and_gc(cluster):
    c = started(cluster, ("n1", "10.224.0.4"))
    code, out, _ = c.plugin("n1", "STATUS", "x", c.conf("n1", "1.1.0"))
    assert (code, out) == (0, None)
    code, out, _ = c.plugin("n1", "VERSION", "x", {"cniVersion": "1.1.0"})
    assert code == 0 and "1.1.0" in out["supportedVersions"]
    keep, _ = c.pod("n1", "keep")
    gone, _ = c.pod("n1", "gone")
    conf = c.conf("n1", "1.1.0", **{"cni.dev/valid-attachments": [{"containerID": keep, "ifname": "eth0"}]})
    code, out, _ = c.plugin("n1", "GC", "x", conf)
    assert (code, out) == (0, None), out
    assert ip_json(keep, "link", "show", "eth0")
    assert not ip_json(gone, "link", "show") or all(link["ifname"] != "eth0" for link in ip_json(gone, "link", "show"))
    check = c.cli("ipam", "check", "--cluster", "t", check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_add_del_add_100_pods_leaves_nothing_behind(cluster):
    c = started(cluster, ("n1", "10.224.0.4"))
    node = c.agents["n1"].node.ns
    c.drained("n1")  # an earlier test's DELs: their parked veths gone first
    before_links = {link["ifname"] for link in ip_json(node, "link", "show")}
    before_routes = ip_json(node, "route", "show")
    pods = [c.topo.add_netns(f"q{i}").rsplit("/", 1)[1] for i in range(100)]
    seen: set[str] = set()
    for _round in range(2):
        for ns in pods:
            code, res, _ = c.plugin("n1", "ADD", ns, c.conf("n1"))
            assert code == 0, res
            seen.add(res["ips"][0]["address"])
        assert len({link["ifname"] for link in ip_json(node, "link", "show")} - before_links) == 100
        for ns in pods:
            code, out, _ = c.plugin("n1", "DEL", ns, c.conf("n1"))
            assert code == 0, out
        c.drained("n1")  # the DELs' parked veths go with the quarantine's drain (``agent.quarantine``)
    assert {link["ifname"] for link in ip_json(node, "link", "show")} == before_links
    assert ip_json(node, "route", "show") == before_routes
    shown = json.loads(c.cli("ipam", "show", "--cluster", "t", "--output", "json").stdout)
    assert [n["used"] for n in shown["nodes"]] == [0], shown
    assert c.cli("ipam", "check", "--cluster", "t", check=False).returncode == 0


def converged(c: Cluster, src: str, dst: str, timeout: float = 20) -> bool:
    """Peers are programmed asynchronously (watch events): wait for the path."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.topo.ping(src, dst, count=1, wait=1):
            return True
    return False


def continuous_ping(c: Cluster, src: str, dst: str, seconds: float) -> subprocess.Popen:
    count = int(seconds / 0.05)
    return subprocess.Popen(["ip", "netns", "exec", src, "ping", "-n", "-i", "0.05", "-c", str(count), "-W", "1", dst],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def ping_loss(proc: subprocess.Popen) -> tuple[int, int, str]:
    out, _ = proc.communicate(timeout=120)
    for line in out.splitlines():
        if "packets transmitted" in line:
            sent = int(line.split()[0])
            recv = int(line.split(",")[1].split()[0])
            return sent, recv, out
    return 0, 0, out


def test_agent_sigkill_and_restart_loses_no_packet(cluster):
    c = started(cluster, ("n1", "10.224.0.4"), ("n2", "10.224.0.5"))
    a, _ = c.pod("n1", "a")
    b, res_b = c.pod("n2", "b")
    dst = res_b["ips"][0]["address"].split("/")[0]
    assert converged(c, a, dst)
    pinger = continuous_ping(c, a, dst, 6)
    time.sleep(1)
    for name in ("n1", "n2"):
        node = c.agents[name].node
        c.kill_agent(name)
        c.start_agent(name, node)
    sent, recv, out = ping_loss(pinger)
    assert sent > 50 and recv == sent, out


def test_etcd_down_add_says_try_again_and_pods_keep_working(cluster):
    c = started(cluster, ("n1", "10.224.0.4"), ("n2", "10.224.0.5"), etcd=True)
    a, _ = c.pod("n1", "a")
    b, res_b = c.pod("n2", "b")
    dst = res_b["ips"][0]["address"].split("/")[0]
    assert converged(c, a, dst)
    c.stop_etcd()
    pinger = continuous_ping(c, a, dst, 4)
    late = c.topo.add_netns("late").rsplit("/", 1)[1]
    code, out, took = c.plugin("n1", "ADD", late, c.conf("n1"))
    assert code != 0 and out["code"] == 11, out
    assert took < 5.5
    assert all(link["ifname"] != "eth0" for link in ip_json(late, "link", "show"))
    sent, recv, txt = ping_loss(pinger)
    assert sent > 20 and recv == sent, txt
    c.restart_etcd()
    deadline = time.monotonic() + 20
    while True:
        code, out, _ = c.plugin("n1", "ADD", late, c.conf("n1"))
        if code == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert code == 0, out
    assert c.topo.ping(late, dst, count=2, wait=3)


def test_chaining_with_reference_plugins(cluster):
    """Our plugin first, then portmap, tuning and bandwidth at 1.0.0, the way
    libcni runs a conflist: prevResult passed along, DEL in reverse."""
    c = started(cluster, ("n1", "10.224.0.4"))
    chain = [
        {"type": "overlaycni", "socket": c.agents["n1"].socket},
        {"type": "portmap", "capabilities": {"portMappings": True},
         "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}},
        {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.accept_local": "1"}},
        {"type": "bandwidth", "ingressRate": 100_000_000, "ingressBurst": 1_000_000,
         "egressRate": 100_000_000, "egressBurst": 1_000_000},
    ]
    ns = c.topo.add_netns("chained").rsplit("/", 1)[1]
    prev = None
    for plugin in chain:
        conf = {"cniVersion": "1.0.0", "name": "overlaycni", **plugin}
        if prev is not None:
            conf["prevResult"] = prev
        binary = None if plugin["type"] == "overlaycni" else f"{REF_PLUGINS}/{plugin['type']}"
        code, out, _ = c.plugin("n1", "ADD", ns, conf, plugin=binary)
        assert code == 0, (plugin["type"], out)
        prev = out
    assert prev["ips"][0]["address"].endswith("/24")
    sysctl = run("ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.conf.eth0.accept_local").stdout.strip()
    assert sysctl == "1"
    host_if = prev["interfaces"][0]["name"]
    qdisc = run("tc", "-n", c.agents["n1"].node.ns, "qdisc", "show", "dev", host_if).stdout
    assert "tbf" in qdisc
    for plugin in reversed(chain):
        conf = {"cniVersion": "1.0.0", "name": "overlaycni", **plugin, "prevResult": prev}
        binary = None if plugin["type"] == "overlaycni" else f"{REF_PLUGINS}/{plugin['type']}"
        code, out, _ = c.plugin("n1", "DEL", ns, conf, plugin=binary)
        assert code == 0, (plugin["type"], out)
    assert all(link["ifname"] != host_if for link in ip_json(c.agents["n1"].node.ns, "link", "show"))


def test_metrics_healthz_and_agent_status(cluster):
    c = started(cluster, ("n1", "10.224.0.4"))
    c.pod("n1", "m1")
    agent = c.agents["n1"]
    url = agent.ready["metrics"]
    fetch = (
        "import sys, urllib.request\n"
        "for path in ('/healthz', '/metrics'):\n"
        "    r = urllib.request.urlopen(sys.argv[1] + path, timeout=5)\n"
        "    print(r.status)\n"
        "    print(r.read().decode())\n"
    )
    # the metrics listener is on the node namespace's own loopback
    out = run("ip", "netns", "exec", agent.node.ns, sys.executable, "-c", fetch, url).stdout
    assert out.startswith("200\n")
    assert '"ready": true' in out
    assert 'overlaycni_cni_requests_total{command="ADD",result="ok"} 1.0' in out
    assert "overlaycni_cni_request_seconds_bucket" in out
    assert "overlaycni_peers 0.0" in out
    status = run(OVERLAYCNI, "agent", "status", "--socket", agent.socket, "--output", "json").stdout
    health = json.loads(status)
    assert health["ready"] is True and health["node"] == "n1" and health["block"] == "10.244.0.0/24"
