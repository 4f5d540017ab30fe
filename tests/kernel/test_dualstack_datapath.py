"""The dual-stack data path between two real nodes (``tests.kernel.datapath``
with ``dual=True``), on the vxlan and direct backends.

IPv6 pod-to-pod traffic across nodes, what the wire carries (VXLAN over the
IPv4 underlay between the node IPs, or plain IPv6 on direct), IPv6 egress
masqueraded to the node's IPv6 address, and the IPv6 filters attacked for
real: a pod spoofing another IPv6 source, plain IPv6 pod sources from the
underlay, a forged VXLAN whose inner IPv6 source lies in a third node's
block. Each attack has its control (the same packet with a legitimate
source arrives; without the filter the forged one arrives too). Checks go
through independent tools (ping, tcpdump, ``ip -j``, ``nft``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from overlaycni.dataplane import nftmodel, nftmodel6
from overlaycni.dataplane.model import Peer
from tests.kernel.datapath import (
    INTERNET6,
    N1,
    N1_6,
    N2,
    POD_A6,
    POD_B,
    POD_B6,
    Cluster,
    capture,
    drop_count,
    normal_rule,
    two_node_cluster,
)
from tests.kernel.topology import ip_json, run

pytestmark = pytest.mark.kernel

FORGE = str(Path(__file__).parents[1] / "lab" / "forge.py")
THIRD = Peer("n3", IPv4Address("10.224.0.3"), IPv4Network("10.244.3.0/24"), "02:00:00:00:03:03",
             block_v6=IPv6Network("fd12:3456:789a:0:3::/80"), node_ip_v6=IPv6Address("fd00:10:224::3"))


@pytest.fixture(scope="module", params=["vxlan", "direct"])
def cluster(request):
    with two_node_cluster(request.param, dual=True) as c:
        yield c


def forge(ns: str, *args: object) -> None:
    run("ip", "netns", "exec", ns, sys.executable, "-I", "-S", FORGE, *map(str, args))


def ping6(c: Cluster, ns: str, dst: object) -> bool:
    return c.topo.ping(ns, str(dst))


def link_mac(ns: str, dev: str) -> str:
    return ip_json(ns, "link", "show", dev)[0]["address"]


def test_node_objects_of_both_families(cluster: Cluster):
    """What the kernel holds for the peer, read with ``ip -j``."""
    routes = {r["dst"]: r for r in ip_json(cluster.n1, "-6", "route", "show", "proto", "119")}
    peer_route = routes["fd12:3456:789a:0:2::/80"]
    assert routes["fd12:3456:789a::/64"]["type"] == "unreachable" and routes["fd12:3456:789a:0:1::/80"]["type"] == "unreachable"
    assert routes[f"{POD_A6.ip}"]["dev"] == cluster.s1.pods[0].host_veth
    if cluster.backend == "vxlan":
        assert (peer_route["gateway"], peer_route["dev"], peer_route["flags"]) == ("fd12:3456:789a:0:2::", "ocni.vxlan", ["onlink"])
        neigh = ip_json(cluster.n1, "-6", "neigh", "show", "dev", "ocni.vxlan")
        assert [(n["dst"], n["lladdr"], n["state"]) for n in neigh] == [("fd12:3456:789a:0:2::", link_mac(cluster.n2, "ocni.vxlan"), ["PERMANENT"])]
        fdb = [f for f in json.loads(run("bridge", "-n", cluster.n1, "-j", "fdb", "show", "dev", "ocni.vxlan").stdout) if f.get("dst")]
        assert [f["dst"] for f in fdb] == [str(N2)]  # one entry, over the IPv4 underlay, for both families
        addrs = {a["local"] for link in ip_json(cluster.n1, "-6", "addr", "show", "dev", "ocni.vxlan") for a in link["addr_info"]}
        assert "fd12:3456:789a:0:1::" in addrs
    else:
        assert peer_route["gateway"] == "fd00:10:224::2" and "dev" in peer_route
    assert run("ip", "netns", "exec", cluster.n1, "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"


def test_ipv6_pod_to_pod_across_nodes(cluster: Cluster):
    assert ping6(cluster, cluster.pa, POD_B6.ip) and ping6(cluster, cluster.pb, POD_A6.ip)
    assert cluster.topo.ping(cluster.pa, str(POD_B.ip))  # and IPv4 next to it


def test_ipv6_between_nodes_on_the_wire(cluster: Cluster):
    """vxlan: IPv6 inside VXLAN between the two node IPs (IPv4 outer); direct: plain IPv6 pod packets."""
    if cluster.backend == "vxlan":
        out = capture(cluster.topo, cluster.n1, iface="eth0", bpf=f"udp port 4789 and src host {N1}",
                      action=lambda: ping6(cluster, cluster.pa, POD_B6.ip))
        assert f"IP {N1}." in out and f"> {N2}.4789: VXLAN, flags [I] (0x08), vni 4096" in out, out
        assert f"IP6 {POD_A6.ip} > {POD_B6.ip}: ICMP6, echo request" in out, out
    else:
        out = capture(cluster.topo, cluster.n1, iface="eth0", bpf=f"icmp6 and src host {POD_A6.ip}",
                      action=lambda: ping6(cluster, cluster.pa, POD_B6.ip))
        assert f"IP6 {POD_A6.ip} > {POD_B6.ip}: ICMP6, echo request" in out, out
    # pod to pod keeps its source: never translated
    out = capture(cluster.topo, cluster.pb, iface="eth0", bpf="icmp6 and ip6[40] == 128",
                  action=lambda: ping6(cluster, cluster.pa, POD_B6.ip))
    assert f"IP6 {POD_A6.ip} > {POD_B6.ip}: ICMP6, echo request" in out, out


def test_ipv6_egress_arrives_from_the_nodes_ipv6_address(cluster: Cluster):
    out = capture(cluster.topo, cluster.host, iface="eth0", bpf=f"icmp6 and ip6[40] == 128 and dst host {INTERNET6}",
                  action=lambda: ping6(cluster, cluster.pa, INTERNET6))
    assert f"IP6 {N1_6} > {INTERNET6}: ICMP6, echo request" in out, out
    assert str(POD_A6.ip) not in out
    assert ping6(cluster, cluster.pa, INTERNET6)  # and the answer finds its way back


def test_ipv6_spoofed_source_from_a_pod_is_dropped(cluster: Cluster):
    """Pod A sends to pod B from another address of its node's block; the other node's
    inner-source check would let it through (the block is right): only the pod guard stops it."""
    spoofed = "fd12:3456:789a:0:1::77"
    bpf = "icmp6 and ip6[40] == 128"
    before = drop_count(cluster.n1, nftmodel6.POD_IPV6, family="ip6")
    out = capture(cluster.topo, cluster.pb, iface="eth0", bpf=f"{bpf} and src host {spoofed}",
                  action=lambda: forge(cluster.pa, "plain", spoofed, POD_B6.ip, 401), expect=None)
    assert spoofed not in out, out
    assert drop_count(cluster.n1, nftmodel6.POD_IPV6, family="ip6") >= before + 3
    assert cluster.d1.drop_counters()[nftmodel6.POD_IPV6] >= before + 3
    # Control: the same packet from the pod's own address arrives.
    out = capture(cluster.topo, cluster.pb, iface="eth0", bpf=f"{bpf} and src host {POD_A6.ip}",
                  action=lambda: forge(cluster.pa, "plain", POD_A6.ip, POD_B6.ip, 402))
    assert f"IP6 {POD_A6.ip} > {POD_B6.ip}: ICMP6, echo request, id 402" in out, out
    # Control: without the filter the spoofed packet arrives; the reconcile puts the filter back.
    try:
        run("ip", "netns", "exec", cluster.n1, "nft", "delete", "table", "ip6", "overlaycni")
        out = capture(cluster.topo, cluster.pb, iface="eth0", bpf=f"{bpf} and src host {spoofed}",
                      action=lambda: forge(cluster.pa, "plain", spoofed, POD_B6.ip, 403))
        assert f"IP6 {spoofed} > {POD_B6.ip}: ICMP6, echo request, id 403" in out, out
    finally:
        assert cluster.d1.reconcile(cluster.s1).errors == []
    out = capture(cluster.topo, cluster.pb, iface="eth0", bpf=f"{bpf} and src host {spoofed}",
                  action=lambda: forge(cluster.pa, "plain", spoofed, POD_B6.ip, 404), expect=None)
    assert spoofed not in out, out


def test_plain_ipv6_pod_source_from_the_underlay_is_dropped(cluster: Cluster):
    """A VNet host routes pod A's IPv6 block via node 1 and sends from node 2's IPv6 block."""
    h = cluster.host
    forged = "fd12:3456:789a:0:2::77"
    run("ip", "-n", h, "-6", "route", "add", "fd12:3456:789a:0:1::/80", "via", str(N1_6))
    try:
        before = drop_count(cluster.n1, nftmodel6.UNDERLAY_POD_SOURCE_V6, family="ip6")
        out = capture(cluster.topo, cluster.pa, iface="eth0", bpf=f"icmp6 and src host {forged}",
                      action=lambda: forge(h, "plain", forged, POD_A6.ip, 501), expect=None)
        assert forged not in out, out
        assert drop_count(cluster.n1, nftmodel6.UNDERLAY_POD_SOURCE_V6, family="ip6") >= before + 3
        # Control: the very same packet from an address outside the pod CIDR is delivered.
        out = capture(cluster.topo, cluster.pa, iface="eth0", bpf=f"icmp6 and src host {INTERNET6}",
                      action=lambda: forge(h, "plain", INTERNET6, POD_A6.ip, 502))
        assert f"IP6 {INTERNET6} > {POD_A6.ip}: ICMP6, echo request, id 502" in out, out
    finally:
        run("ip", "-n", h, "-6", "route", "del", "fd12:3456:789a:0:1::/80", "via", str(N1_6))


def test_direct_peer_speaks_for_its_own_ipv6_block_only(cluster: Cluster):
    if cluster.backend != "direct":
        pytest.skip("plain pod packets between nodes exist on the direct backend only")
    try:
        assert cluster.d1.reconcile(replace(cluster.s1, peers=(*cluster.s1.peers, THIRD))).errors == []
        before = drop_count(cluster.n1, nftmodel6.UNDERLAY_POD_SOURCE_V6, family="ip6")
        out = capture(cluster.topo, cluster.pa, iface="eth0", bpf="icmp6 and src host fd12:3456:789a:0:3::7",
                      action=lambda: forge(cluster.n2, "plain", "fd12:3456:789a:0:3::7", POD_A6.ip, 601), expect=None)
        assert "fd12:3456:789a:0:3::7" not in out, out
        assert drop_count(cluster.n1, nftmodel6.UNDERLAY_POD_SOURCE_V6, family="ip6") >= before + 3
        out = capture(cluster.topo, cluster.pa, iface="eth0", bpf="icmp6 and src host fd12:3456:789a:0:2::7",
                      action=lambda: forge(cluster.n2, "plain", "fd12:3456:789a:0:2::7", POD_A6.ip, 602))
        assert f"IP6 fd12:3456:789a:0:2::7 > {POD_A6.ip}: ICMP6, echo request, id 602" in out, out
    finally:
        assert cluster.d1.reconcile(cluster.s1).errors == []


def test_forged_vxlan_with_an_ipv6_inner_source_speaks_for_its_block_only(cluster: Cluster):
    """The outside host forges node 2's outer source; an inner IPv6 source in a third
    node's IPv6 block is dropped, one in node 2's own IPv6 block passes."""
    if cluster.backend != "vxlan":
        pytest.skip("VXLAN is decapsulated on the vxlan backend only")
    vtep = link_mac(cluster.n1, "ocni.vxlan")
    third_src, own_src = "fd12:3456:789a:0:3::7", "fd12:3456:789a:0:2::7"
    try:
        assert cluster.d1.reconcile(replace(cluster.s1, peers=(*cluster.s1.peers, THIRD))).errors == []
        before = drop_count(cluster.n1, nftmodel.VXLAN_INNER_SOURCE)
        out = capture(cluster.topo, cluster.pa, iface="eth0", bpf=f"icmp6 and src host {third_src}",
                      action=lambda: forge(cluster.host, "vxlan", N1, third_src, POD_A6.ip, 701, N2, vtep), expect=None)
        assert third_src not in out, out
        assert drop_count(cluster.n1, nftmodel.VXLAN_INNER_SOURCE) >= before + 3
        out = capture(cluster.topo, cluster.pa, iface="eth0", bpf=f"icmp6 and src host {own_src}",
                      action=lambda: forge(cluster.host, "vxlan", N1, own_src, POD_A6.ip, 702, N2, vtep))
        assert f"IP6 {own_src} > {POD_A6.ip}: ICMP6, echo request, id 702" in out, out
        listed = run("ip", "netns", "exec", cluster.n1, "nft", "list", "set", "ip", "overlaycni", "peer_blocks6").stdout
        assert f"{N2} . 0xfd123456789a00000002000000000000-0xfd123456789a00000002ffffffffffff" in listed, listed
    finally:
        assert cluster.d1.reconcile(cluster.s1).errors == []


def test_neighbour_discovery_only_from_the_pods_link_local(cluster: Cluster):
    """The pod resolves its gateway (fe80::1) from its link-local address; an echo request
    from that link-local address is not neighbour discovery and is dropped."""
    run("ip", "-n", cluster.pa, "-6", "neigh", "flush", "dev", "eth0")
    assert ping6(cluster, cluster.pa, POD_B6.ip)  # needed the gateway's neighbour solicitation
    gw = [n for n in ip_json(cluster.pa, "-6", "neigh", "show", "dev", "eth0") if n["dst"] == "fe80::1"]
    assert gw and gw[0]["lladdr"] == link_mac(cluster.n1, cluster.s1.pods[0].host_veth)
    link_local_ping = lambda: cluster.topo.exec(cluster.pa, "ping", "-6", "-n", "-c", "2", "-i", "0.2", "-W", "1",  # noqa: E731
                                                "fe80::1%eth0", check=False).returncode == 0
    before = drop_count(cluster.n1, nftmodel6.POD_IPV6, family="ip6")
    assert not link_local_ping()
    assert drop_count(cluster.n1, nftmodel6.POD_IPV6, family="ip6") >= before + 2
    try:  # control: without the filter the node answers
        run("ip", "netns", "exec", cluster.n1, "nft", "delete", "table", "ip6", "overlaycni")
        assert link_local_ping()
    finally:
        assert cluster.d1.reconcile(cluster.s1).errors == []


def test_dual_stack_tables_list_back_as_rendered(cluster: Cluster):
    """The kernel holds exactly the rules rendered (the ip table as native text, the
    ip6 table as JSON); the sets, 128-bit ranges included, read back through the ports."""
    s = cluster.s1
    pod = s.pods[0]
    tables = [nftmodel.table_for(s, pod_endpoints=[(pod.host_veth, pod.ip)]),
              nftmodel6.table_for(s, pod_endpoints=[(pod.host_veth, pod.ip_v6)])]  # type: ignore[list-item]
    for table in tables:
        layout = table.layout()
        doc = json.loads(run("ip", "netns", "exec", cluster.n1, "nft", "-j", "list", "table", layout.family, "overlaycni").stdout)
        listed = [(i["rule"]["chain"], normal_rule(i["rule"]["expr"])) for i in doc["nftables"] if "rule" in i]
        assert listed == [(c["name"], normal_rule(r)) for c, rules in layout.chains for r in rules], layout.family
        port = {"ip": cluster.d1.ports.nft, "ip6": cluster.d1.ports.ip6_nft}[layout.family]
        have = cluster.d1.run(port.get_table)
        assert have is not None and have.fingerprint == layout.fingerprint() and have.sets == table.sets(), layout.family
    assert cluster.d1.reconcile(s).changes == []
