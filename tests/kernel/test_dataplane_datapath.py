"""End-to-end data path in namespaces: two nodes, two pods, an outside host.

Every check goes through independent tools (ping, tcpdump, ``ip -j``,
``nft -j``), never back through the data plane's own code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlaycni.dataplane.model import Peer, vtep_mac
from tests.kernel.datapath import B1, INTERNET, N1, N2, POD_A, POD_B, Cluster, capture, drop_count, two_node_cluster
from tests.kernel.topology import ip_json, run

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module", params=["vxlan", "direct"])
def cluster(request):
    with two_node_cluster(request.param) as c:
        yield c


def test_pod_to_pod_across_nodes(cluster: Cluster):
    assert cluster.topo.ping(cluster.pa, str(POD_B.ip), count=2)
    assert cluster.topo.ping(cluster.pb, str(POD_A.ip), count=2)


def test_pod_reaches_its_gateway(cluster: Cluster):
    assert cluster.topo.ping(cluster.pa, "10.244.1.1")


def test_underlay_shows_encapsulation(cluster: Cluster):
    vnet = cluster.topo.ns_name("vnet")
    if cluster.backend == "vxlan":
        out = capture(cluster.topo, vnet, iface=cluster.wire, bpf="udp port 4789", action=lambda: cluster.topo.ping(cluster.pa, str(POD_B.ip)))
        assert f"{N1}." in out and f"{N2}.4789" in out and "VXLAN" in out and "vni 4096" in out, out
        assert f"{POD_A.ip} > {POD_B.ip}: ICMP echo request" in out, out
    else:
        out = capture(cluster.topo, vnet, iface=cluster.wire, bpf="icmp", action=lambda: cluster.topo.ping(cluster.pa, str(POD_B.ip)))
        assert f"{POD_A.ip} > {POD_B.ip}: ICMP echo request" in out, out
        assert "VXLAN" not in out


def test_traffic_leaving_pod_cidr_is_snatted(cluster: Cluster):
    out = capture(cluster.topo, cluster.host, iface="eth0", bpf="icmp", action=lambda: cluster.topo.ping(cluster.pa, INTERNET))
    assert f"{N1} > {INTERNET}: ICMP echo request" in out, out
    assert "10.244." not in out, out
    assert cluster.topo.ping(cluster.pa, INTERNET)  # replies are un-NATed back to the pod


def test_non_masquerade_cidr_and_kube_proxy_mark_skip_snat(cluster: Cluster):
    ping = lambda: cluster.topo.ping(cluster.pa, INTERNET, wait=1, attempts=1)  # noqa: E731 - no reply expected
    exempt = replace(cluster.s1, non_masquerade_cidrs=(IPv4Network("203.0.113.0/24"),))
    try:
        assert cluster.d1.reconcile(exempt).errors == []
        out = capture(cluster.topo, cluster.host, iface="eth0", bpf="icmp", action=ping)
        assert f"{POD_A.ip} > {INTERNET}: ICMP echo request" in out, out
    finally:
        assert cluster.d1.reconcile(cluster.s1).errors == []
    # kube-proxy marks packets it wants masqueraded itself with 0x4000: our chain must RETURN for them.
    cluster.topo.exec(cluster.n1, "nft", "add table ip octmark; add chain ip octmark pre "
                      "{ type filter hook prerouting priority mangle; policy accept; }; "
                      "add rule ip octmark pre ip saddr 10.244.0.0/16 meta mark set 0x4000")
    try:
        out = capture(cluster.topo, cluster.host, iface="eth0", bpf="icmp", action=ping)
        assert f"{POD_A.ip} > {INTERNET}: ICMP echo request" in out, out
    finally:
        cluster.topo.exec(cluster.n1, "nft", "delete", "table", "ip", "octmark")
    out = capture(cluster.topo, cluster.host, iface="eth0", bpf="icmp", action=ping)
    assert f"{N1} > {INTERNET}: ICMP echo request" in out, out


def test_pod_to_pod_is_not_natted(cluster: Cluster):
    out = capture(cluster.topo, cluster.pb, iface="eth0", bpf="icmp", action=lambda: cluster.topo.ping(cluster.pa, str(POD_B.ip)))
    assert f"{POD_A.ip} > {POD_B.ip}: ICMP echo request" in out, out


def test_spoofed_pod_source_is_dropped(cluster: Cluster):
    spoof = "10.244.1.99"
    run("ip", "-n", cluster.pa, "addr", "add", f"{spoof}/32", "dev", "eth0")
    try:
        before = drop_count(cluster.n1, "pod_source_spoofed")
        spoofed_ping = lambda: cluster.topo.exec(  # noqa: E731
            cluster.pa, "ping", "-n", "-c", "2", "-i", "0.2", "-W", "1", "-I", spoof, str(POD_B.ip), check=False)
        out = capture(cluster.topo, cluster.pb, iface="eth0", bpf="icmp", action=spoofed_ping, expect=None)
        assert spoof not in out, out
        assert drop_count(cluster.n1, "pod_source_spoofed") >= before + 2
        assert cluster.topo.ping(cluster.pa, str(POD_B.ip))  # the real source still passes
    finally:
        run("ip", "-n", cluster.pa, "addr", "del", f"{spoof}/32", "dev", "eth0")


def test_vxlan_from_a_non_node_is_dropped(cluster: Cluster):
    """The outside host builds its own VTEP and injects an ICMP for pod A into node 1."""
    if cluster.backend != "vxlan":
        pytest.skip("VXLAN input filter matters for the vxlan backend")
    h = cluster.host
    run("ip", "-n", h, "link", "add", "evil", "type", "vxlan", "id", "4096", "dstport", "4789",
        "local", "10.224.0.200", "dev", "eth0", "nolearning")
    run("ip", "-n", h, "addr", "add", "10.244.9.1/24", "dev", "evil")
    run("ip", "-n", h, "link", "set", "evil", "up")
    run("ip", "-n", h, "route", "add", str(B1), "via", "10.244.9.254", "dev", "evil", "onlink")
    run("ip", "-n", h, "neigh", "add", "10.244.9.254", "lladdr", vtep_mac(N1), "dev", "evil")
    run("bridge", "-n", h, "fdb", "append", vtep_mac(N1), "dev", "evil", "dst", str(N1))
    n1_mac = ip_json(cluster.n1, "link", "show", "eth0")[0]["address"]  # pinned: no dependence on underlay ARP
    run("ip", "-n", h, "neigh", "replace", str(N1), "lladdr", n1_mac, "dev", "eth0", "nud", "permanent")
    inject = lambda: cluster.topo.ping(h, str(POD_A.ip), count=2, wait=1, attempts=1)  # noqa: E731
    evil_mac = ip_json(h, "link", "show", "evil")[0]["address"]
    try:
        before = drop_count(cluster.n1, "vxlan_unknown_node")
        out = capture(cluster.topo, cluster.pa, iface="eth0", bpf="icmp and host 10.244.9.1", action=inject, expect=None)
        assert "10.244.9.1" not in out, out
        assert drop_count(cluster.n1, "vxlan_unknown_node") >= before + 2
        # Control: once 10.224.0.200 is a node owning 10.244.9.0/24, the very same injection reaches the pod.
        evil = Peer("evil", IPv4Address("10.224.0.200"), IPv4Network("10.244.9.0/24"), evil_mac)
        assert cluster.d1.reconcile(replace(cluster.s1, peers=(*cluster.s1.peers, evil))).errors == []
        out = capture(cluster.topo, cluster.pa, iface="eth0", bpf="icmp and host 10.244.9.1", action=inject)
        assert f"10.244.9.1 > {POD_A.ip}: ICMP echo request" in out, out
    finally:
        assert cluster.d1.reconcile(cluster.s1).errors == []
        run("ip", "-n", h, "neigh", "del", str(N1), "dev", "eth0", check=False)
        run("ip", "-n", h, "link", "del", "evil")


def test_vxlan_sent_by_a_pod_is_dropped(cluster: Cluster):
    before = drop_count(cluster.n1, "vxlan_from_pod")
    proc = subprocess.run(["ip", "netns", "exec", cluster.pa, "socat", "-u", "-", f"UDP:{N1}:4789"],
                          input=b"x" * 60, capture_output=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert drop_count(cluster.n1, "vxlan_from_pod") >= before + 1


def test_mtu_df_ping(cluster: Cluster):
    payload = cluster.pod_mtu - 28  # IPv4 + ICMP headers
    expected = 1450 if cluster.backend == "vxlan" else 1500
    assert cluster.pod_mtu == expected
    links = ip_json(cluster.pa, "link", "show", "eth0")
    assert links[0]["mtu"] == expected
    assert cluster.topo.ping(cluster.pa, str(POD_B.ip), size=payload, df=True)
    if cluster.backend == "vxlan":  # the full-size inner packet travels as one 1500-byte outer packet
        out = capture(cluster.topo, cluster.topo.ns_name("vnet"), iface=cluster.wire, bpf="udp port 4789 and greater 1400",
                      action=lambda: cluster.topo.ping(cluster.pa, str(POD_B.ip), size=payload, df=True), verbose=True)
        assert "length 1500" in out and "offset 0" in out, out
        assert "flags [+]" not in out and "frag" not in out.lower(), out
    proc = cluster.topo.exec(cluster.pa, "ping", "-n", "-c", "1", "-W", "1", "-M", "do", "-s", str(payload + 1),
                             str(POD_B.ip), check=False)
    assert proc.returncode != 0
    assert "too long" in (proc.stdout + proc.stderr).lower() or "mtu" in (proc.stdout + proc.stderr).lower()


def test_restart_adopts_state_without_packet_loss(cluster: Cluster):
    """A fresh process rebuilds the data plane from the desired state while a ping runs."""
    doc = json.loads(run("ip", "netns", "exec", cluster.n1, "nft", "-j", "list", "table", "ip", "overlaycni").stdout)
    fp = next(i["chain"]["name"] for i in doc["nftables"] if "chain" in i and i["chain"]["name"].startswith("fp_"))
    run("ip", "netns", "exec", cluster.n1, "nft", "delete", "chain", "ip", "overlaycni", fp)  # forces a full rebuild
    pinger = cluster.topo.spawn(cluster.pa, "ping", "-n", "-q", "-c", "40", "-i", "0.05", "-W", "1", str(POD_B.ip),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    script = (
        "import json,sys\n"
        "from ipaddress import *\n"
        "from overlaycni.dataplane.linux import LinuxDataplane\n"
        "from overlaycni.dataplane.model import *\n"
        "s = eval(sys.argv[2])\n"
        "d = LinuxDataplane()  # netns=None: the process already runs in the node namespace\n"
        "reports = [d.reconcile(s) for _ in range(3)]\n"
        "d.ensure_peer(s, s.peers[0])\n"
        "print(json.dumps([r.changes + r.errors for r in reports]))\n"
    )
    proc = subprocess.run(["ip", "netns", "exec", cluster.n1, sys.executable, "-c", script, cluster.n1, repr(cluster.s1)],
                          capture_output=True, text=True, timeout=60, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr
    first, *rest = json.loads(proc.stdout)
    assert first == ["nftables table ip overlaycni replaced"]
    assert rest == [[], []]
    out, _ = pinger.communicate(timeout=30)
    assert " 0% packet loss" in out, out
