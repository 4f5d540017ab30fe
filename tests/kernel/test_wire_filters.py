"""Source validation on the wire and the pods' ARP/IPv6 guards, attacked for real.

The two-node harness (``tests.kernel.datapath``, both backends): its outside
host on the underlay is the attacker, sending forged packets with
``tests/lab/forge.py`` (raw sockets, inside the harness's own namespaces);
pod A inside node 1 is the target, and a capture inside pod A tells what got
through. Each attack has its control: the same packet with a legitimate
source arrives, or the same packet arrives once the filter is removed, so
that every test can both pass and fail. Counters are read with ``nft``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from overlaycni.dataplane import nftmodel, nftmodel6, podguard
from overlaycni.dataplane.linux import LinuxDataplane
from overlaycni.dataplane.model import NodeState, Peer
from tests.kernel.datapath import B2, N1, N2, POD_A, POD_B, Cluster, capture, drop_count, normal_rule, two_node_cluster
from tests.kernel.topology import ip_json, run

pytestmark = pytest.mark.kernel

FORGE = str(Path(__file__).parents[1] / "lab" / "forge.py")
GATEWAY = "10.244.1.1"


@pytest.fixture(scope="module", params=["vxlan", "direct"])
def cluster(request):
    with two_node_cluster(request.param) as c:
        yield c


def forge(ns: str, *args: object) -> None:
    run("ip", "netns", "exec", ns, sys.executable, "-I", "-S", FORGE, *map(str, args))


def host_veth(c: Cluster) -> str:
    return c.s1.pods[0].host_veth


def link_mac(ns: str, dev: str) -> str:
    return ip_json(ns, "link", "show", dev)[0]["address"]


# --- IPv4 from the underlay -------------------------------------------------------------------


def test_plain_pod_source_from_the_external_host_is_dropped(cluster: Cluster):
    """A VNet host routes pod A's block via node 1 and sends from an address of node 2's block."""
    h, pa = cluster.host, cluster.pa
    run("ip", "-n", h, "route", "add", "10.244.1.0/24", "via", str(N1))
    try:
        before = drop_count(cluster.n1, nftmodel.UNDERLAY_POD_SOURCE)
        out = capture(cluster.topo, pa, iface="eth0", bpf="icmp and src host 10.244.2.77",
                      action=lambda: forge(h, "plain", "10.244.2.77", POD_A.ip, 101), expect=None)
        assert "10.244.2.77" not in out, out
        assert drop_count(cluster.n1, nftmodel.UNDERLAY_POD_SOURCE) >= before + 3
        assert cluster.d1.drop_counters()[nftmodel.UNDERLAY_POD_SOURCE] >= before + 3
        # Control: the very same packet from a source outside the pod CIDR is delivered.
        out = capture(cluster.topo, pa, iface="eth0", bpf="icmp and src host 203.0.113.10",
                      action=lambda: forge(h, "plain", "203.0.113.10", POD_A.ip, 102))
        assert f"203.0.113.10 > {POD_A.ip}: ICMP echo request, id 102" in out, out
    finally:
        run("ip", "-n", h, "route", "del", "10.244.1.0/24", "via", str(N1))


def test_pod_traffic_from_the_owning_node_is_not_counted(cluster: Cluster):
    """Control for the rule above: real pod traffic between the nodes passes and counts nothing
    (on direct it is plain from node 2's MAC, with vxlan it arrives on the tunnel)."""
    before = drop_count(cluster.n1, nftmodel.UNDERLAY_POD_SOURCE)
    out = capture(cluster.topo, cluster.pa, iface="eth0", bpf=f"icmp and src host {POD_B.ip}",
                  action=lambda: cluster.topo.ping(cluster.pb, str(POD_A.ip)))
    assert f"{POD_B.ip} > {POD_A.ip}: ICMP echo request" in out, out
    assert drop_count(cluster.n1, nftmodel.UNDERLAY_POD_SOURCE) == before


def test_direct_peer_speaks_for_its_own_block_only(cluster: Cluster):
    """Node 2 itself sends plain packets to pod A: from its block they arrive, from a third
    node's block (a peer of node 1 at another MAC) they are dropped."""
    if cluster.backend != "direct":
        pytest.skip("plain pod packets between nodes exist on the direct backend only")
    third = Peer("n3", IPv4Address("10.224.0.3"), IPv4Network("10.244.3.0/24"), "02:00:00:00:03:03")
    try:
        assert cluster.d1.reconcile(replace(cluster.s1, peers=(*cluster.s1.peers, third))).errors == []
        before = drop_count(cluster.n1, nftmodel.UNDERLAY_POD_SOURCE)
        out = capture(cluster.topo, cluster.pa, iface="eth0", bpf="icmp and src host 10.244.3.7",
                      action=lambda: forge(cluster.n2, "plain", "10.244.3.7", POD_A.ip, 201), expect=None)
        assert "10.244.3.7" not in out, out
        assert drop_count(cluster.n1, nftmodel.UNDERLAY_POD_SOURCE) >= before + 3
        out = capture(cluster.topo, cluster.pa, iface="eth0", bpf="icmp and src host 10.244.2.7",
                      action=lambda: forge(cluster.n2, "plain", "10.244.2.7", POD_A.ip, 202))
        assert f"10.244.2.7 > {POD_A.ip}: ICMP echo request, id 202" in out, out
    finally:
        assert cluster.d1.reconcile(cluster.s1).errors == []


def test_forged_vxlan_from_a_node_speaks_for_its_block_only(cluster: Cluster):
    """The outside host forges node 2's outer source; the inner source decides."""
    if cluster.backend != "vxlan":
        pytest.skip("VXLAN is decapsulated on the vxlan backend only")
    third = Peer("n3", IPv4Address("10.224.0.3"), IPv4Network("10.244.3.0/24"), "02:00:00:00:03:03")
    vtep = link_mac(cluster.n1, "ocni.vxlan")
    try:
        assert cluster.d1.reconcile(replace(cluster.s1, peers=(*cluster.s1.peers, third))).errors == []
        before = drop_count(cluster.n1, nftmodel.VXLAN_INNER_SOURCE)
        out = capture(cluster.topo, cluster.pa, iface="eth0", bpf="icmp and src host 10.244.3.7",
                      action=lambda: forge(cluster.host, "vxlan", N1, "10.244.3.7", POD_A.ip, 301, N2, vtep), expect=None)
        assert "10.244.3.7" not in out, out
        assert drop_count(cluster.n1, nftmodel.VXLAN_INNER_SOURCE) >= before + 3
        # Control: the same forgery with an inner source in node 2's block is decapsulated and delivered.
        out = capture(cluster.topo, cluster.pa, iface="eth0", bpf="icmp and src host 10.244.2.7",
                      action=lambda: forge(cluster.host, "vxlan", N1, "10.244.2.7", POD_A.ip, 302, N2, vtep))
        assert f"10.244.2.7 > {POD_A.ip}: ICMP echo request, id 302" in out, out
    finally:
        assert cluster.d1.reconcile(cluster.s1).errors == []


def tracked(ns: str, *args: str) -> list[str]:
    """conntrack's entries in ``ns`` that match ``args`` (conntrack -L filters), one line each."""
    out = run("ip", "netns", "exec", ns, "conntrack", "-L", *args, check=False).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_outer_vxlan_between_nodes_is_untracked_and_pod_flows_stay_tracked(cluster: Cluster):
    """Pod-to-pod traffic between the nodes leaves no conntrack entry for the outer VXLAN flow on
    either node (the raw chains' notrack), while the inner pod flow stays tracked (the policy
    table's ``ct state`` and the masquerade need it). Control: without the node table, the
    same traffic creates the outer entries."""
    if cluster.backend != "vxlan":
        pytest.skip("the outer flow exists on the vxlan backend only")
    outer = ("-p", "udp", "--dport", "4789")
    for ns in (cluster.n1, cluster.n2):
        run("ip", "netns", "exec", ns, "conntrack", "-D", *outer, check=False)
    assert cluster.topo.ping(cluster.pb, str(POD_A.ip), count=3)
    for ns in (cluster.n1, cluster.n2):
        assert tracked(ns, *outer) == [], ns
    inner = tracked(cluster.n1, "-p", "icmp", "-s", str(POD_B.ip), "-d", str(POD_A.ip))
    assert inner, "the inner pod flow is tracked"
    try:  # control: the same traffic with the two notrack rules deleted (the rest of the table stays)
        nft = ("ip", "netns", "exec", cluster.n1, "nft")
        run(*nft, "flush", "chain", "ip", "overlaycni", "output")
        listing = run(*nft, "-a", "list", "chain", "ip", "overlaycni", "prerouting").stdout
        handle = next(line.rsplit("# handle ", 1)[1] for line in listing.splitlines() if "notrack" in line)
        run(*nft, "delete", "rule", "ip", "overlaycni", "prerouting", "handle", handle.strip())
        assert cluster.topo.ping(cluster.pb, str(POD_A.ip), count=3)
        entries = tracked(cluster.n1, *outer)
        assert any(f"src={N2} dst={N1}" in e for e in entries) and any(f"src={N1} dst={N2}" in e for e in entries), entries
    finally:  # the fingerprint still matches: only a missing table is replaced whole
        run("ip", "netns", "exec", cluster.n1, "nft", "delete", "table", "ip", "overlaycni", check=False)
        assert cluster.d1.reconcile(cluster.s1).errors == []
        run("ip", "netns", "exec", cluster.n1, "conntrack", "-D", *outer, check=False)
    assert cluster.topo.ping(cluster.pb, str(POD_A.ip), count=3)
    assert tracked(cluster.n1, *outer) == []


# --- IPv6 and ARP from a pod ------------------------------------------------------------------


def test_pod_ipv6_to_the_node_link_local_gets_no_answer(cluster: Cluster):
    veth = host_veth(cluster)
    node_ll = next(a["local"] for link in ip_json(cluster.n1, "-6", "addr", "show", "dev", veth)
                   for a in link["addr_info"] if a["local"].startswith("fe80:"))
    # pinned, so that the echo request itself leaves the pod (no neighbour solicitation first)
    run("ip", "-n", cluster.pa, "-6", "neigh", "replace", node_ll, "lladdr", link_mac(cluster.n1, veth), "dev", "eth0",
        "nud", "permanent")
    ping6 = lambda: cluster.topo.exec(cluster.pa, "ping", "-6", "-n", "-c", "2", "-i", "0.2", "-W", "1",  # noqa: E731
                                      f"{node_ll}%eth0", check=False).returncode == 0
    try:
        before = drop_count(cluster.n1, nftmodel6.POD_IPV6, family="ip6")
        assert not ping6()
        assert drop_count(cluster.n1, nftmodel6.POD_IPV6, family="ip6") >= before + 2
        # Control: without the filter the node answers; the reconcile puts the filter back.
        run("ip", "netns", "exec", cluster.n1, "nft", "delete", "table", "ip6", "overlaycni")
        assert ping6()
        assert cluster.d1.reconcile(cluster.s1).errors == []
        assert not ping6()
    finally:
        run("ip", "-n", cluster.pa, "-6", "neigh", "del", node_ll, "dev", "eth0", check=False)
        assert cluster.d1.reconcile(cluster.s1).errors == []


def arp_replies(c: Cluster, target: str, *, expect: int | None) -> str:
    mac = link_mac(c.pa, "eth0")
    return capture(c.topo, c.pa, iface="eth0", bpf="arp and arp[6:2] == 2",
                   action=lambda: forge(c.pa, "arp", "eth0", "request", mac, POD_A.ip, target), expect=expect)


def test_pod_arp_is_answered_for_its_gateway_only(cluster: Cluster):
    other = str(POD_B.ip)  # routed elsewhere: the veth's proxy ARP would answer for it
    before = drop_count(cluster.n1, podguard.POD_ARP_TARGET, family="arp")
    out = arp_replies(cluster, other, expect=None)
    assert f"Reply {other} is-at" not in out, out
    assert drop_count(cluster.n1, podguard.POD_ARP_TARGET, family="arp") >= before + 3
    out = arp_replies(cluster, GATEWAY, expect=1)
    assert f"Reply {GATEWAY} is-at {link_mac(cluster.n1, host_veth(cluster))}" in out, out
    try:  # control: without the filter, proxy ARP answers for the other address
        run("ip", "netns", "exec", cluster.n1, "nft", "delete", "table", "arp", "overlaycni")
        out = arp_replies(cluster, other, expect=1)
        assert f"Reply {other} is-at" in out, out
    finally:
        assert cluster.d1.reconcile(cluster.s1).errors == []


def neighbours(c: Cluster, ip: str) -> list[dict]:
    return [n for n in ip_json(c.n1, "neigh", "show", "to", ip) if n.get("state") != ["FAILED"]]


def test_pod_arp_for_another_address_changes_no_neighbour(cluster: Cluster):
    veth, pod_mac, victim = host_veth(cluster), link_mac(cluster.pa, "eth0"), str(POD_B.ip)
    assert neighbours(cluster, victim) == []
    before = drop_count(cluster.n1, podguard.POD_ARP_SENDER, family="arp")
    forge(cluster.pa, "arp", "eth0", "request", pod_mac, victim, GATEWAY)  # "I am pod B", asked of the node
    forge(cluster.pa, "arp", "eth0", "request", pod_mac, victim, victim)  # gratuitous: "pod B is at my MAC"
    forge(cluster.pa, "arp", "eth0", "reply", pod_mac, victim, GATEWAY)
    assert neighbours(cluster, victim) == []
    assert drop_count(cluster.n1, podguard.POD_ARP_SENDER, family="arp") >= before + 9
    # Control: the pod's own address is accepted (the node learns it afresh).
    run("ip", "-n", cluster.n1, "neigh", "flush", "dev", veth)
    forge(cluster.pa, "arp", "eth0", "request", pod_mac, POD_A.ip, GATEWAY)
    assert [(n["dst"], n["lladdr"]) for n in ip_json(cluster.n1, "neigh", "show", "dev", veth)] == [(str(POD_A.ip), pod_mac)]
    # Control: without the filter (and the veth's strict reverse-path check, which stops it too) the node takes it.
    try:
        run("ip", "netns", "exec", cluster.n1, "nft", "delete", "table", "arp", "overlaycni")
        run("ip", "netns", "exec", cluster.n1, "sysctl", "-qw", f"net.ipv4.conf.{veth}.rp_filter=0")
        forge(cluster.pa, "arp", "eth0", "request", pod_mac, victim, GATEWAY)
        assert [(n["dev"], n["lladdr"]) for n in neighbours(cluster, victim)] == [(veth, pod_mac)]
    finally:
        run("ip", "-n", cluster.n1, "neigh", "del", victim, "dev", veth, check=False)
        assert cluster.d1.reconcile(cluster.s1).errors == []
    assert run("ip", "netns", "exec", cluster.n1, "sysctl", "-n", f"net.ipv4.conf.{veth}.rp_filter").stdout.strip() == "1"


# --- the tables themselves --------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["vxlan", "direct"])
def test_node_tables_list_back_as_rendered(node_ns, backend: str):
    """The kernel holds exactly the rules rendered, including the ``ip`` table that goes in as
    native nft text; set elements and named counters read back through the port."""
    topo, node = node_ns
    state = NodeState(node_ip=N1, block=IPv4Network("10.244.1.0/24"), pod_cidr=IPv4Network("10.244.0.0/16"),
                      backend=backend, peers=(Peer("n2", N2, B2, "02:00:00:00:00:02"),))
    with LinuxDataplane(node.ns) as dp:
        assert dp.reconcile(state).errors == []
        tables = [nftmodel.table_for(state, pod_endpoints=[]), podguard.arp_table_for(state.block, pod_endpoints=[]),
                  nftmodel6.Ip6Table()]
        for table in tables:
            layout = table.layout()
            doc = json.loads(run("ip", "netns", "exec", node.ns, "nft", "-j", "list", "table", layout.family, "overlaycni").stdout)
            listed = [(i["rule"]["chain"], normal_rule(i["rule"]["expr"])) for i in doc["nftables"] if "rule" in i]
            rendered = [(c["name"], normal_rule(r)) for c, rules in layout.chains for r in rules]
            assert listed == rendered, layout.family
            port = {"ip": dp.ports.nft, "arp": dp.ports.arp_nft, "ip6": dp.ports.ip6_nft}[layout.family]
            have = dp.run(port.get_table)
            assert have is not None and have.fingerprint == layout.fingerprint() and have.sets == table.sets()
        counts = dp.drop_counters()
        assert set(counts) == {*nftmodel.DROP_RULES, *podguard.ARP_DROP_RULES, *nftmodel6.SINGLE_STACK_DROP_RULES}
        # a peer that moves to another block: one transaction deletes the old range and adds the new
        moved = Peer("n2", N2, IPv4Network("10.244.9.0/24"), "02:00:00:00:00:02")
        dp.delete_peer(state, state.peers[0])
        dp.ensure_peer(replace(state, peers=(moved,)), moved)
        listed = subprocess.run(["ip", "netns", "exec", node.ns, "nft", "list", "set", "ip", "overlaycni", "peer_blocks"],
                                capture_output=True, text=True, check=True).stdout
        assert "10.224.0.2 . 0xaf40900-0xaf409ff" in listed and "0xaf40200" not in listed, listed
        assert dp.reconcile(replace(state, peers=(moved,))).changes == []
    assert topo.namespaces
