"""The dual-stack data plane without a kernel: per-peer objects of both
families, the engine on the fake (VXLAN, direct, WireGuard), the ``ip`` and
``ip6`` tables (golden renders; single-stack renders pinned as they were)
and the nodes' set elements.

Regenerate the golden files with ``UPDATE_GOLDEN=1`` and review the diff."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from pathlib import Path

import pytest

from overlaycni.dataplane import FakeDataplane, nftables, nftmodel, nftmodel6, nfttext, podguard
from overlaycni.dataplane.model import (
    VXLAN_IFNAME,
    FdbEntry,
    Neighbour,
    NodeState,
    Peer,
    PodEndpoint,
    Route,
    admit_peers,
    peer_objects,
    validate_state,
    vtep_mac,
)
from overlaycni.dataplane.wgmodel import WG_IFNAME, PrivateKey
from overlaycni.errors import ConfigError
from overlaycni.families import PodAddress

GOLDEN = Path(__file__).parent / "golden" / "nft"
ME = IPv4Address("10.224.0.1")
ME6 = IPv6Address("fd00:10:224::1")
BLOCK = IPv4Network("10.244.1.0/24")
BLOCK6 = IPv6Network("fd12:3456:789a:0:1::/80")
POD_CIDR = IPv4Network("10.244.0.0/16")
POD_CIDR6 = IPv6Network("fd12:3456:789a::/64")
VETH = "oc0123456789abc"


def peer(i: int, *, v6: bool = True, node_ip_v6: bool = True, mac: str | None = None) -> Peer:
    ip = IPv4Address(f"10.224.0.{i}")
    return Peer(f"n{i}", ip, IPv4Network(f"10.244.{i}.0/24"), mac or vtep_mac(ip),
                block_v6=IPv6Network(f"fd12:3456:789a:0:{i}::/80") if v6 else None,
                node_ip_v6=IPv6Address(f"fd00:10:224::{i}") if v6 and node_ip_v6 else None)


def dual(*peers: Peer, backend: str = "vxlan", **kw) -> NodeState:
    s = NodeState(node_ip=ME, block=BLOCK, pod_cidr=POD_CIDR, backend=backend, block_v6=BLOCK6, pod_cidr_v6=POD_CIDR6,
                  node_ip_v6=ME6, peers=peers)
    return replace(s, **kw)


def single(*peers: Peer, backend: str = "vxlan") -> NodeState:
    return NodeState(node_ip=ME, block=BLOCK, pod_cidr=POD_CIDR, backend=backend, peers=peers)


def golden(name: str, render: list[dict]) -> None:
    text = json.dumps({"nftables": render}, indent=1, sort_keys=True) + "\n"
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert json.loads(path.read_text()) == json.loads(text), f"{name} differs from its golden file (UPDATE_GOLDEN=1)"


def chain(layout: nftables.TableLayout, name: str) -> list[list[dict]]:
    return next(list(rules) for c, rules in layout.chains if c["name"] == name)


def addresses(v4: str, v6: str | None) -> tuple[PodAddress, ...]:
    a = (PodAddress(IPv4Interface(v4), IPv4Address("10.244.1.1")),)
    return a + ((PodAddress(IPv6Interface(v6), IPv6Address("fe80::1")),) if v6 else ())


# --- the model ------------------------------------------------------------------------------------


def test_node_state_has_one_side_per_family():
    (v4,) = single().families
    assert (v4.family.version, v4.block, v4.tunnel_address) == (4, BLOCK, IPv4Interface("10.244.1.0/32"))
    v4, v6 = dual().families
    assert (v6.family.version, v6.block, v6.pod_cidr, v6.node_ip) == (6, BLOCK6, POD_CIDR6, ME6)
    assert v6.tunnel_address == IPv6Interface("fd12:3456:789a:0:1::/128")
    assert dual().family(6) == v6 and single().family(6) is None


def test_vxlan_peer_objects_one_neighbour_and_route_per_block_one_fdb_entry():
    p = peer(2)
    objs = peer_objects(p, backend="vxlan")
    gw4, gw6 = IPv4Address("10.244.2.0"), IPv6Address("fd12:3456:789a:0:2::")
    assert objs.neighbours == (Neighbour(VXLAN_IFNAME, gw4, p.vtep_mac), Neighbour(VXLAN_IFNAME, gw6, p.vtep_mac))
    assert objs.fdb == FdbEntry(VXLAN_IFNAME, p.vtep_mac, p.node_ip)  # IPv6 rides the IPv4 underlay
    assert objs.routes == (Route(p.block, VXLAN_IFNAME, gw4, onlink=True), Route(p.block_v6, VXLAN_IFNAME, gw6, onlink=True))  # type: ignore[arg-type]
    assert str(objs.routes[1]) == "fd12:3456:789a:0:2::/80 via fd12:3456:789a:0:2:: dev ocni.vxlan onlink"


def test_direct_routes_each_block_via_the_node_address_of_its_family():
    objs = peer_objects(peer(2), backend="direct")
    assert objs.routes == (Route(IPv4Network("10.244.2.0/24"), gateway=IPv4Address("10.224.0.2")),
                           Route(IPv6Network("fd12:3456:789a:0:2::/80"), gateway=IPv6Address("fd00:10:224::2")))
    assert peer_objects(peer(2, node_ip_v6=False), backend="direct").routes == objs.routes[:1]
    wg = peer_objects(peer(2), backend="wireguard")
    assert [(r.dst, r.dev, r.scope_link) for r in wg.routes] == [(peer(2).block, WG_IFNAME, True), (peer(2).block_v6, WG_IFNAME, True)]


@pytest.mark.parametrize("kw, field, words", [
    ({"pod_cidr_v6": None}, "block_v6", "go together"),
    ({"block_v6": IPv6Network("fd99::/80")}, "block_v6", "not inside the IPv6 pod CIDR"),
    ({"pods": (PodEndpoint(IPv4Address("10.244.1.5"), VETH, ip_v6=IPv6Address("fd12:3456:789a:0:9::5")),)}, "pods", "outside"),
])
def test_bad_ipv6_state_names_the_field(kw, field, words):
    with pytest.raises(ConfigError) as err:
        validate_state(dual(**kw))
    assert any(e.field == field and words in e.message for e in err.value.errors), err.value.errors


@pytest.mark.parametrize("bad, words", [
    (replace(peer(2), block_v6=BLOCK6), "overlaps this node's IPv6 block"),
    (replace(peer(2), block_v6=IPv6Network("fd99::/80")), "is outside the IPv6 pod CIDR fd12:3456:789a::/64"),
    (replace(peer(2), node_ip_v6=peer(3).node_ip_v6), "node IPv6 address"),
])
def test_a_bad_ipv6_peer_is_left_out_alone(bad, words):
    """Peers are admitted one by one (``admit_peers``): a peer whose IPv6 side
    collides or lies outside is left out with a problem; the others stay."""
    admitted, problems = admit_peers(dual(peer(3), bad))
    assert [p.name for p in admitted] == [peer(3).name]
    assert len(problems) == 1 and problems[0].peer == bad.name and words in problems[0].message, problems


def test_single_stack_node_leaves_out_ipv6_peers_and_a_peer_without_ipv6_block_is_fine():
    admitted, problems = admit_peers(single(peer(2)))
    assert admitted == () and "single-stack" in problems[0].message
    validate_state(dual(peer(2, v6=False)))  # registered by an older agent: reached over IPv4 until it registers again
    assert admit_peers(dual(peer(2, v6=False)))[0] == (peer(2, v6=False),)


# --- the engine on the fake -----------------------------------------------------------------------


def test_vxlan_reconcile_programs_both_families_on_one_device_then_is_idempotent():
    dp = FakeDataplane()
    report = dp.reconcile(dual(peer(2), peer(3)))
    assert report.errors == []
    k = dp.kernel
    assert list(k.vxlan) == [VXLAN_IFNAME] and k.links[VXLAN_IFNAME].mtu == 1450  # one device, one pod MTU
    assert set(k.addresses[VXLAN_IFNAME]) == {IPv4Interface("10.244.1.0/32"), IPv6Interface("fd12:3456:789a:0:1::/128")}
    assert {n.ip for n in k.neighbours.values()} == {IPv4Address("10.244.2.0"), IPv4Address("10.244.3.0"),
                                                     IPv6Address("fd12:3456:789a:0:2::"), IPv6Address("fd12:3456:789a:0:3::")}
    assert len(k.fdb) == 2
    assert k.routes[IPv6Network("fd12:3456:789a:0:2::/80")].gateway == IPv6Address("fd12:3456:789a:0:2::")
    assert k.routes[BLOCK6].unreachable and k.routes[POD_CIDR6].unreachable  # own block; the IPv6 catch-all
    assert k.routes[POD_CIDR].unreachable  # each family's catch-all
    assert k.sysctls["net/ipv6/conf/all/forwarding"] == "1"
    assert dp.reconcile(dual(peer(2), peer(3))).changes == []


def test_peer_leaving_and_changing_ipv6_block_takes_its_objects_along():
    dp = FakeDataplane()
    dp.reconcile(dual(peer(2), peer(3)))
    moved = replace(peer(2), block_v6=IPv6Network("fd12:3456:789a:0:22::/80"))
    assert dp.reconcile(dual(moved)).errors == []
    k = dp.kernel
    assert IPv6Network("fd12:3456:789a:0:2::/80") not in k.routes and IPv6Network("fd12:3456:789a:0:3::/80") not in k.routes
    assert {n.ip for n in k.neighbours.values()} == {IPv4Address("10.244.2.0"), IPv6Address("fd12:3456:789a:0:22::")}
    assert k.nft_table("ip", "overlaycni").sets["peer_blocks6"] == {(moved.node_ip, nftables.RawRange.of(moved.block_v6))}  # type: ignore[arg-type]


def test_incremental_peer_both_families_and_back():
    dp = FakeDataplane()
    s = dual(peer(2))
    dp.reconcile(s)
    p3 = peer(3)
    s3 = replace(s, peers=(peer(2), p3))
    dp.ensure_peer(s3, p3)
    k = dp.kernel
    assert (VXLAN_IFNAME, IPv6Address("fd12:3456:789a:0:3::")) in k.neighbours
    assert IPv6Network("fd12:3456:789a:0:3::/80") in k.routes
    assert (p3.node_ip, nftables.RawRange.of(p3.block_v6)) in k.nft_table("ip", "overlaycni").sets["peer_blocks6"]  # type: ignore[arg-type]
    assert dp.reconcile(s3).changes == []
    dp.delete_peer(s3, p3)
    assert (VXLAN_IFNAME, IPv6Address("fd12:3456:789a:0:3::")) not in k.neighbours
    assert IPv6Network("fd12:3456:789a:0:3::/80") not in k.routes
    assert dp.reconcile(s).changes == []


def test_direct_routes_ipv6_via_the_peers_ipv6_address_and_reports_a_peer_without_one():
    dp = FakeDataplane()
    report = dp.reconcile(dual(peer(2), peer(3, node_ip_v6=False), backend="direct"))
    k = dp.kernel
    assert k.routes[IPv6Network("fd12:3456:789a:0:2::/80")].gateway == IPv6Address("fd00:10:224::2")
    assert IPv4Network("10.244.3.0/24") in k.routes and IPv6Network("fd12:3456:789a:0:3::/80") not in k.routes
    assert report.errors == ["peer n3: no IPv6 node address in its node record, so its IPv6 block fd12:3456:789a:0:3::/80 "
                             "is not routed (the direct backend routes it via that address)"]
    ip6 = k.nft_table("ip6", "overlaycni")
    assert ip6.sets["peer_macs"] == {(peer(2).vtep_mac, peer(2).block_v6), (peer(3).vtep_mac, peer(3).block_v6)}
    assert not k.neighbours and not k.fdb and VXLAN_IFNAME not in k.links


def test_wireguard_allowed_ips_and_routes_cover_both_blocks():
    dp = FakeDataplane()
    key = PrivateKey.generate()
    p2 = replace(peer(2), wg_public_key=PrivateKey.generate().public)
    report = dp.reconcile(dual(p2, backend="wireguard", wireguard_key=key))
    assert report.errors == []
    dev = dp.wireguard_device()
    assert dev is not None and dev.peers[0].peer.allowed_ips == (p2.block, p2.block_v6)
    k = dp.kernel
    assert k.routes[p2.block_v6].dev == WG_IFNAME and k.routes[POD_CIDR6].unreachable and k.routes[POD_CIDR].unreachable  # type: ignore[index]
    assert IPv6Interface("fd12:3456:789a:0:1::/128") in k.addresses[WG_IFNAME]
    assert nftmodel6.table_for(dual(p2, backend="wireguard"), pod_endpoints=[]).tunnel_ifname == WG_IFNAME


def test_a_single_stack_node_loses_an_ipv6_tunnel_address_but_keeps_link_local():
    dp = FakeDataplane()
    dp.reconcile(dual())
    dp.kernel.addresses[VXLAN_IFNAME][IPv6Interface("fe80::1234/64")] = None  # the kernel's own
    assert dp.reconcile(single()).errors == []
    assert set(dp.kernel.addresses[VXLAN_IFNAME]) == {IPv4Interface("10.244.1.0/32"), IPv6Interface("fe80::1234/64")}


def test_pod_addresses_of_each_family_go_to_their_tables_and_leave_with_the_pod():
    dp = FakeDataplane()
    dp.reconcile(dual())
    pod = dp.attach_pod(container_id="c1", ifname="eth0", netns_path="/p1",
                        addresses=addresses("10.244.1.5/24", "fd12:3456:789a:0:1::5/80"), mtu=1450)
    k = dp.kernel
    v4, v6 = (pod.host_veth, IPv4Address("10.244.1.5")), (pod.host_veth, IPv6Address("fd12:3456:789a:0:1::5"))
    assert v4 in k.nft_table("ip", "overlaycni").sets["pod_endpoints"] and v4 in k.nft_table("arp", "overlaycni").sets["pod_endpoints"]
    assert k.nft_table("ip6", "overlaycni").sets["pod_endpoints"] == {v6}
    k.nft_table("ip6", "overlaycni").sets["pod_endpoints"] = frozenset()  # drift
    problems = dp.check_pod(container_id="c1", ifname="eth0", netns_path="/p1",
                            addresses=addresses("10.244.1.5/24", "fd12:3456:789a:0:1::5/80"))
    assert problems == [f"anti-spoofing element {pod.host_veth} . {v6[1]} is missing from ip6 pod_endpoints"]
    full = dual(pods=(PodEndpoint(v4[1], pod.host_veth, ip_v6=v6[1]),))
    assert any("ip6 pod_endpoints" in c for c in dp.reconcile(full).changes)  # the reconcile repairs it
    dp.detach_pod(container_id="c1", ifname="eth0", netns_path="/p1")
    assert not k.nft_table("ip6", "overlaycni").sets["pod_endpoints"]


def test_a_racing_pod_keeps_its_ipv6_element_through_a_reconcile():
    dp = FakeDataplane()
    dp.reconcile(dual())
    pod = dp.attach_pod(container_id="c1", ifname="eth0", netns_path="/p1",
                        addresses=addresses("10.244.1.5/24", "fd12:3456:789a:0:1::5/80"), mtu=1450)
    assert dp.reconcile(dual()).changes == []  # the state does not know the pod yet: its /128 route tells
    assert (pod.host_veth, IPv6Address("fd12:3456:789a:0:1::5")) in dp.kernel.nft_table("ip6", "overlaycni").sets["pod_endpoints"]


def test_drop_counters_of_a_dual_stack_node():
    dp = FakeDataplane()
    dp.reconcile(dual())
    assert set(dp.drop_counters()) == {*nftmodel.DROP_RULES, *podguard.ARP_DROP_RULES, *nftmodel6.DROP_RULES}


def test_node_ipv6_address_is_found_on_the_underlay():
    dp = FakeDataplane(underlay_ip=ME)
    subnet = IPv6Network("fd00:10:224::/64")
    assert dp.find_node_ip_v6(ME, subnet=subnet) is None
    dp.kernel.addresses["eth0"][IPv6Interface("fe80::5/64")] = None
    dp.kernel.addresses["eth0"][IPv6Interface("fd00:99::5/64")] = None
    dp.kernel.addresses["eth0"][IPv6Interface("fd00:10:224::5/64")] = None
    assert dp.find_node_ip_v6(ME, subnet=subnet) == IPv6Address("fd00:10:224::5")


# --- the tables -------------------------------------------------------------------------------------


def test_single_stack_tables_are_what_they_were():
    ip6 = nftmodel6.table_for(single(), pod_endpoints=[])
    golden("ip6-single-stack.json", ip6.layout().render(ip6.sets()))
    arp = podguard.arp_table_for(BLOCK, pod_endpoints=[(VETH, IPv4Address("10.244.1.5"))])
    golden("arp.json", arp.layout().render(arp.sets()))
    t = nftmodel.table_for(single(replace(peer(2), block_v6=None, node_ip_v6=None)), pod_endpoints=[])
    assert nftmodel.SET_PEER_BLOCKS6 not in t.sets() and "peer_blocks6" not in json.dumps(t.layout().render(t.sets()))


def _dual_tables(backend: str) -> tuple[nftmodel.NftTable, nftmodel6.Ip6Table]:
    s = dual(peer(2), backend=backend, non_masquerade_cidrs_v6=(IPv6Network("fd00:aa::/48"),))
    pods = [(VETH, IPv4Address("10.244.1.5")), (VETH, IPv6Address("fd12:3456:789a:0:1::5"))]
    return (nftmodel.table_for(s, pod_endpoints=[e for e in pods if e[1].version == 4]),  # type: ignore[misc]
            nftmodel6.table_for(s, pod_endpoints=[e for e in pods if e[1].version == 6]))  # type: ignore[misc]


@pytest.mark.parametrize("backend", ["vxlan", "direct"])
def test_dual_stack_tables_match_their_golden_files(backend):
    ip, ip6 = _dual_tables(backend)
    golden(f"ip-dual-stack-{backend}.json", ip.layout().render(ip.sets()))
    golden(f"ip6-dual-stack-{backend}.json", ip6.layout().render(ip6.sets()))


def test_ip_table_checks_inner_ipv6_sources_against_the_outer_node_block():
    ip, _ = _dual_tables("vxlan")
    vx = chain(ip.layout(), "vxlan_in")
    v6 = json.dumps(vx[3])
    assert '"offset": 304' in v6 and '"len": 128' in v6 and str(0x86DD) in v6 and "@peer_blocks6" in v6 and vx[3][-1] == {"return": None}
    assert vx[4] == [{"counter": "vxlan_inner_source"}, {"drop": None}]
    lo = int(IPv6Network("fd12:3456:789a:0:2::/80").network_address)
    elem = ip.sets()["peer_blocks6"]
    assert elem == {(IPv4Address("10.224.0.2"), nftables.RawRange(lo, lo + (1 << 48) - 1))}
    encoded = nftables.encode(next(iter(elem)))
    assert encoded == {"concat": ["10.224.0.2", {"range": [hex(lo), hex(lo + (1 << 48) - 1)]}]}  # nft's JSON reads no 128-bit number
    assert nftables.decode(nftmodel.SET_DECLS["peer_blocks6"], encoded) == list(elem)
    text = nfttext.script(ip.layout().render(ip.sets()))
    assert "add set ip overlaycni peer_blocks6 { typeof ip saddr . @th,304,128; flags interval; }" in text
    assert f'add element ip overlaycni peer_blocks6 {{ "10.224.0.2" . "{hex(lo)}"-"{hex(lo + (1 << 48) - 1)}" }}' in text


def test_ip6_table_lets_a_pod_use_its_own_address_and_neighbour_discovery_only():
    _, ip6 = _dual_tables("vxlan")
    own, nd, multicast, rest = chain(ip6.layout(), "from_pod")
    assert own == [nftables.match({"concat": [nftables.meta("iifname"), nftables.payload("ip6", "saddr")]}, "@pod_endpoints"),
                   {"return": None}]
    text = json.dumps(nd)
    assert '"fe80::"' in text and '"!="' in text and '"fe80::1"' in text and "nd-neighbor-solicit" in text and nd[-1] == {"return": None}
    assert "echo" not in text and "mld" not in text
    assert multicast[-2:] == [{"counter": "pod_ipv6_multicast"}, {"drop": None}] and rest == [{"counter": "pod_ipv6"}, {"drop": None}]
    assert chain(ip6.layout(), "underlay_in") == [[{"counter": "underlay_pod_source_v6"}, {"drop": None}]]
    post = chain(ip6.layout(), "postrouting")
    assert post[-1] == [{"counter": None}, {"masquerade": {"flags": ["fully-random"]}}]
    assert "16384" in json.dumps(post[0]) and "@non_masq" in json.dumps(post) and '"ff00::"' in json.dumps(post)
    assert ip6.sets()["non_masq"] == {IPv6Network("fd00:aa::/48")}
    assert not nfttext.needs_text(ip6.layout().render(ip6.sets()))


def test_direct_ip6_table_accepts_a_peers_ipv6_block_from_its_mac_only():
    _, ip6 = _dual_tables("direct")
    first, last = chain(ip6.layout(), "underlay_in")
    assert '"ether"' in json.dumps(first) and "@peer_macs" in json.dumps(first) and first[-1] == {"return": None}
    assert last == [{"counter": "underlay_pod_source_v6"}, {"drop": None}]
    assert ip6.sets()["peer_macs"] == {(peer(2).vtep_mac, peer(2).block_v6)}


def test_every_ipv6_drop_rule_has_its_own_named_counter():
    for table in _dual_tables("direct"):
        layout = table.layout()
        names = [r[-2]["counter"] for _, rules in layout.chains for r in rules if r[-1] == {"drop": None}]
        assert sorted(names) == sorted(layout.counters) and len(set(names)) == len(names)

