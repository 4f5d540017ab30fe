"""Source validation and the pods' guards without a kernel: the table models, the
raw-range codec, the native-text form, the engine on the fake, the metric."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from overlaycni.agent.metrics import AgentMetrics
from overlaycni.dataplane import FakeDataplane, host_veth_name, nftables, nftmodel, nftmodel6, nfttext, podguard
from overlaycni.dataplane.fake import FakeKernel
from overlaycni.dataplane.model import VXLAN_IFNAME, NodeState, Peer, vtep_mac
from overlaycni.errors import DataplaneError
from overlaycni.families import PodAddress

ME = IPv4Address("10.224.0.1")
BLOCK = IPv4Network("10.244.1.0/24")
POD_CIDR = IPv4Network("10.244.0.0/16")



def pod_address(ip: str) -> tuple[PodAddress, ...]:
    return (PodAddress(IPv4Interface(ip), IPv4Address("10.244.1.1")),)

def peer(i: int, mac: str | None = None) -> Peer:
    ip = IPv4Address(f"10.224.0.{i}")
    return Peer(f"n{i}", ip, IPv4Network(f"10.244.{i}.0/24"), mac or vtep_mac(ip))


def state(*peers: Peer, backend: str = "vxlan") -> NodeState:
    return NodeState(node_ip=ME, block=BLOCK, pod_cidr=POD_CIDR, backend=backend, peers=peers)


def chain(layout: nftables.TableLayout, name: str) -> list[list[dict]]:
    return next(list(rules) for c, rules in layout.chains if c["name"] == name)


# --- codec --------------------------------------------------------------------------------------


def test_raw_range_encodes_a_block_as_integers_and_decodes_back():
    r = nftables.RawRange.of(IPv4Network("10.244.2.0/24"))
    assert (r.lo, r.hi) == (int(IPv4Address("10.244.2.0")), int(IPv4Address("10.244.2.255")))
    elem = (IPv4Address("10.224.0.2"), r)
    encoded = nftables.encode(elem)
    assert encoded == {"concat": ["10.224.0.2", {"range": [r.lo, r.hi]}]}
    decl = nftmodel.SET_DECLS[nftmodel.SET_PEER_BLOCKS]
    assert nftables.decode(decl, encoded) == [elem]
    assert nftables.decode(decl, {"concat": ["10.224.0.2", 7]}) == [(IPv4Address("10.224.0.2"), nftables.RawRange(7, 7))]
    assert sorted([elem, (IPv4Address("10.224.0.2"), nftables.RawRange(1, 2))], key=nftables.sort_key)[0][1].lo == 1


def test_listing_of_peer_sets_round_trips_through_the_diff():
    t = nftmodel.table_for(state(peer(2), peer(3), backend="direct"), pod_endpoints=[])
    listing = {"nftables": [
        {"chain": {"name": "fp_" + nftmodel.fingerprint(t)}},
        *({"set": {"name": name, "elem": [nftables.encode(e) for e in elems]}} for name, elems in t.sets().items()),
    ]}
    current = nftmodel.parse_listing(listing)
    assert current.sets == t.sets()
    assert nftmodel.diff_sets(current, t) == []


# --- the ip table -------------------------------------------------------------------------------


def test_vxlan_table_binds_the_inner_source_to_the_outer_node():
    t = nftmodel.table_for(state(peer(2), peer(3)), pod_endpoints=[])
    assert t.sets()[nftmodel.SET_PEER_BLOCKS] == {
        (p.node_ip, nftables.RawRange.of(p.block)) for p in (peer(2), peer(3))
    }
    assert t.sets()[nftmodel.SET_PEER_MACS] == frozenset()
    layout = t.layout()
    vx = chain(layout, "vxlan_in")
    assert [r[-2] for r in vx[:2]] == [{"counter": "vxlan_from_pod"}, {"counter": "vxlan_unknown_node"}]
    accept = json.dumps(vx[2])
    assert '"offset": 336' in accept and '"offset": 224' in accept and "2048" in accept and "@peer_blocks" in accept
    assert vx[2][-1] == {"return": None} and vx[3] == [{"counter": "vxlan_inner_source"}, {"drop": None}]
    assert chain(layout, "underlay_in") == [[{"counter": "underlay_pod_source"}, {"drop": None}]]
    assert chain(layout, "input") == [[nftables.match(nftables.payload("udp", "dport"), 4789), nftables.jump("vxlan_in")]]


def test_direct_table_accepts_a_peers_block_from_its_mac_only():
    mac = "AA:BB:CC:00:00:02"
    t = nftmodel.table_for(state(peer(2, mac), backend="direct"), pod_endpoints=[])
    assert t.sets()[nftmodel.SET_PEER_MACS] == {("aa:bb:cc:00:00:02", IPv4Network("10.244.2.0/24"))}
    first, last = chain(t.layout(), "underlay_in")
    assert "@peer_macs" in json.dumps(first) and '"ether"' in json.dumps(first) and first[-1] == {"return": None}
    assert last == [{"counter": "underlay_pod_source"}, {"drop": None}]
    assert nftmodel.fingerprint(t) != nftmodel.fingerprint(nftmodel.table_for(state(peer(2)), pod_endpoints=[]))
    assert nftmodel.peer_elements(peer(2, mac), backend="direct")[nftmodel.SET_PEER_MACS] == [
        ("aa:bb:cc:00:00:02", IPv4Network("10.244.2.0/24"))]
    assert nftmodel.SET_PEER_MACS not in nftmodel.peer_elements(peer(2), backend="vxlan")


def test_every_drop_rule_has_its_own_named_counter():
    for table in (nftmodel.table_for(state(peer(2), backend="direct"), pod_endpoints=[]),
                  podguard.arp_table_for(BLOCK, pod_endpoints=[]), nftmodel6.Ip6Table()):
        layout = table.layout()
        drops = [r for _, rules in layout.chains for r in rules if r[-1] == {"drop": None}]
        names = [r[-2]["counter"] for r in drops]
        assert sorted(names) == sorted(layout.counters) and len(set(names)) == len(names)


# --- the pods' guards ---------------------------------------------------------------------------


def test_arp_guard_checks_sender_and_target():
    t = podguard.arp_table_for(BLOCK, pod_endpoints=[("oc0123456789abc", IPv4Address("10.244.1.5"))])
    assert t.gateway == IPv4Address("10.244.1.1")
    layout = t.layout()
    sender, target = chain(layout, "from_pod")
    assert "saddr ip" in json.dumps(sender) and sender[-2:] == [{"counter": "pod_arp_sender"}, {"drop": None}]
    assert '"request"' in json.dumps(target) and '"10.244.1.1"' in json.dumps(target) and "daddr ip" in json.dumps(target)
    (entry,) = chain(layout, "input")
    assert entry[0] == nftables.match(nftables.meta("iifname"), "oc*") and entry[1]["match"]["right"] == VXLAN_IFNAME
    assert t.sets() == {"pod_endpoints": frozenset({("oc0123456789abc", IPv4Address("10.244.1.5"))})}
    other = podguard.arp_table_for(IPv4Network("10.244.7.0/24"), pod_endpoints=[])
    assert other.layout().fingerprint() != layout.fingerprint()


def test_ipv6_guard_drops_everything_from_pods_in_two_counts():
    layout = nftmodel6.Ip6Table().layout()
    multicast, rest = chain(layout, "from_pod")
    assert multicast[0] == nftables.match(nftables.payload("ip6", "daddr"), {"prefix": {"addr": "ff02::", "len": 16}})
    assert multicast[-2:] == [{"counter": "pod_ipv6_multicast"}, {"drop": None}]
    assert rest == [{"counter": "pod_ipv6"}, {"drop": None}]
    (entry,) = chain(layout, "prerouting")
    assert entry[-1] == nftables.jump("from_pod")


# --- native text --------------------------------------------------------------------------------


def test_the_ip_table_goes_in_as_native_text_and_others_as_json():
    ip = nftmodel.render_table(nftmodel.table_for(state(peer(2), backend="direct"), pod_endpoints=[("ocx", IPv4Address("10.244.1.5"))]))
    assert nfttext.needs_text(ip)
    text = nfttext.script(ip)
    assert "add set ip overlaycni peer_blocks { typeof ip saddr . @th,336,32; flags interval; }" in text
    assert 'add rule ip overlaycni vxlan_in @th,224,16 == 2048 ip saddr . @th,336,32 == @peer_blocks return' in text
    assert 'add element ip overlaycni peer_blocks { "10.224.0.2" . 183763456-183763711 }' in text
    assert 'add element ip overlaycni pod_endpoints { "ocx" . "10.244.1.5" }' in text
    assert 'meta iifname == "oc*" meta iifname != "ocni.vxlan" meta iifname . ip saddr != @pod_endpoints' in text
    assert "add rule ip overlaycni postrouting counter masquerade fully-random" in text
    assert text.index("add chain ip overlaycni underlay_in") < text.index("jump underlay_in")
    arp = podguard.arp_table_for(BLOCK, pod_endpoints=[]).layout().render({})
    assert not nfttext.needs_text(arp)
    assert "arp daddr ip != " in nfttext.script(arp)


@pytest.mark.parametrize("bad", [
    {"add": {"rule": {"family": "ip", "table": "t", "chain": "c", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 'a"b'}}]}}},
    {"add": {"rule": {"family": "ip", "table": "t", "chain": "c; flush ruleset", "expr": [{"drop": None}]}}},
    {"add": {"rule": {"family": "ip", "table": "t", "chain": "c", "expr": [{"log": {"prefix": "x"}}]}}},
    {"replace": {"rule": {"family": "ip", "table": "t", "chain": "c", "expr": []}}},
])
def test_native_text_refuses_what_it_cannot_say_exactly(bad):
    with pytest.raises(ValueError):
        nfttext.script([bad])


# --- the engine on the fake ---------------------------------------------------------------------


def test_direct_node_publishes_its_underlay_mac_and_vxlan_its_vtep():
    k = FakeKernel()
    dp = FakeDataplane(k)
    eth0 = k.add_link("eth0", mac="52:54:00:12:34:56")
    k.addresses["eth0"][IPv4Interface(f"{ME}/16")] = None
    assert dp.node_info(ME, backend="direct", mtu=None).vtep_mac == eth0.mac
    assert dp.node_info(ME, backend="vxlan", mtu=None).vtep_mac == vtep_mac(ME)


def test_reconcile_builds_three_tables_and_sets_no_global_rp_filter():
    dp = FakeDataplane()
    assert dp.reconcile(state(peer(2))).errors == []
    k = dp.kernel
    for family in ("ip", "arp", "ip6"):
        assert k.nft_table(family, "overlaycni") is not None, family
    assert not [key for key in k.sysctls if key.startswith(("net/ipv4/conf/all/", "net/ipv4/conf/default/"))]
    assert k.sysctls[f"net/ipv4/conf/{VXLAN_IFNAME}/rp_filter"] == "1"
    pod = dp.attach_pod(container_id="c1", ifname="eth0", netns_path="/p1", addresses=pod_address("10.244.1.5/24"), mtu=1450)
    assert k.sysctls[f"net/ipv4/conf/{pod.host_veth}/rp_filter"] == "1"
    assert dp.reconcile(state(peer(2))).changes == []


def test_pod_elements_go_to_the_ip_and_arp_tables_and_leave_with_the_pod():
    dp = FakeDataplane()
    dp.reconcile(state())
    k = dp.kernel
    dp.attach_pod(container_id="c1", ifname="eth0", netns_path="/p1", addresses=pod_address("10.244.1.5/24"), mtu=1450)
    elem = (host_veth_name("c1", "eth0"), IPv4Address("10.244.1.5"))
    assert elem in k.nft.sets["pod_endpoints"] and elem in k.nft_table("arp", "overlaycni").sets["pod_endpoints"]
    k.nft_table("arp", "overlaycni").sets["pod_endpoints"] = frozenset()  # drift
    problems = dp.check_pod(container_id="c1", ifname="eth0", netns_path="/p1", addresses=pod_address("10.244.1.5/24"))
    assert problems == [f"anti-spoofing element {elem[0]} . {elem[1]} is missing from arp pod_endpoints"]
    dp.detach_pod(container_id="c1", ifname="eth0", netns_path="/p1")
    assert elem not in k.nft.sets["pod_endpoints"]


def test_attach_before_the_first_reconcile_and_with_one_table_missing():
    dp = FakeDataplane()
    dp.attach_pod(container_id="c0", ifname="eth0", netns_path="/p0", addresses=pod_address("10.244.1.4/24"), mtu=1450)  # no table yet: nothing to add to
    dp.reconcile(state())
    dp.kernel.nft_tables.pop(("arp", "overlaycni"))
    dp.attach_pod(container_id="c1", ifname="eth0", netns_path="/p1", addresses=pod_address("10.244.1.5/24"), mtu=1450)
    assert (host_veth_name("c1", "eth0"), IPv4Address("10.244.1.5")) in dp.kernel.nft.sets["pod_endpoints"]
    report = dp.reconcile(state())
    assert report.errors == [] and "nftables table arp overlaycni replaced" in report.changes
    dp.kernel.fail_next["nft"] = DataplaneError("nftables: boom")  # every table there: a real failure
    with pytest.raises(DataplaneError):
        dp.attach_pod(container_id="c2", ifname="eth0", netns_path="/p2", addresses=pod_address("10.244.1.6/24"), mtu=1450)


def test_peer_events_keep_the_peer_sets():
    dp = FakeDataplane()
    s = state(peer(2), backend="direct")
    dp.reconcile(s)
    sets = dp.kernel.nft.sets
    p3 = peer(3, "02:00:00:00:00:03")
    s3 = NodeState(**{**s.__dict__, "peers": (peer(2), p3)})
    dp.ensure_peer(s3, p3)
    assert (p3.node_ip, nftables.RawRange.of(p3.block)) in dp.kernel.nft.sets["peer_blocks"]
    assert ("02:00:00:00:00:03", p3.block) in dp.kernel.nft.sets["peer_macs"]
    dp.delete_peer(s3, p3)
    dp.delete_peer(s3, p3)  # gone already: success
    assert dp.kernel.nft.sets["peer_macs"] == {(peer(2).vtep_mac, peer(2).block)}
    assert p3.node_ip not in dp.kernel.nft.sets["node_ips"]
    assert dp.reconcile(s).changes == [] and sets is not None


def test_drop_counters_name_every_rule():
    dp = FakeDataplane()
    assert dp.drop_counters() == {}
    dp.reconcile(state())
    counts = dp.drop_counters()
    assert set(counts) == {*nftmodel.DROP_RULES, *podguard.ARP_DROP_RULES, *nftmodel6.SINGLE_STACK_DROP_RULES}
    assert set(counts.values()) == {0}


# --- the metric ---------------------------------------------------------------------------------


def test_dropped_packets_metric_reads_the_counters_at_each_scrape():
    m = AgentMetrics()
    counts = {"underlay_pod_source": 3}
    m.watch_drops(lambda: counts)
    m.watch_drops(lambda: counts)  # a second start replaces, not duplicates
    text = m.exposition().decode()
    assert 'overlaycni_dropped_packets_total{rule="underlay_pod_source"} 3.0' in text
    counts["vxlan_inner_source"] = 5
    assert 'overlaycni_dropped_packets_total{rule="vxlan_inner_source"} 5.0' in m.exposition().decode()

    def broken() -> dict[str, int]:
        raise DataplaneError("nftables: gone")

    m.watch_drops(broken)
    text = m.exposition().decode()
    assert "overlaycni_dropped_packets_total{" not in text and "overlaycni_cni_requests" in text
