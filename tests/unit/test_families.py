"""The per-family model that IPAM, the data plane and policy build on:
``IPFamily``, ``FamilyNetwork`` and the family views of ``ClusterNetwork``
(AKS's per-node carving, block arithmetic against ``ipaddress``, MTU
overheads, serialisation)."""

from __future__ import annotations

import json
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlaycni.config import (
    ClusterNetwork,
    FamilyNetwork,
    IPFamily,
    parse_network,
    validate_expansion,
)
from overlaycni.errors import ConfigError

DUAL = {"network-plugin": "azure", "network-plugin-mode": "overlay", "ip-families": "ipv4,ipv6"}

# The keys a single-stack network serialised to before dual-stack existed:
# records, lab state and `cluster show -o json` keep exactly these.
SINGLE_STACK_KEYS = [
    "network-plugin", "network-plugin-mode", "vnet-cidr", "node-subnet-cidr", "pod-cidr", "service-cidr",
    "dns-service-ip", "max-pods", "node-cidr-size", "backend", "vni", "vxlan-port", "mtu", "non-masquerade-cidrs",
]


# ----- IPFamily -------------------------------------------------------------------------------------


def test_ip_family_facts():
    v4, v6 = IPFamily.ipv4, IPFamily.ipv6
    assert (v4.version, v6.version, v4.bits, v6.bits) == (4, 6, 32, 128)
    assert (v4.label, v6.label, str(v4), str(v6)) == ("IPv4", "IPv6", "ipv4", "ipv6")
    assert (v4.ip_header_bytes, v6.ip_header_bytes) == (20, 40)
    assert (str(v4.default_route), str(v6.default_route)) == ("0.0.0.0/0", "::/0")
    assert (v4.reserved_per_block, v6.reserved_per_block) == (3, 2)


@pytest.mark.parametrize(
    "value,family",
    [(IPv4Address("10.0.0.1"), "ipv4"), (IPv6Address("fd00::1"), "ipv6"), (IPv4Network("10.0.0.0/8"), "ipv4"),
     (IPv6Network("fd00::/8"), "ipv6"), (IPv4Interface("10.0.0.1/24"), "ipv4"), (IPv6Interface("fd00::1/64"), "ipv6")],
)
def test_ip_family_of(value, family):
    assert IPFamily.of(value) is IPFamily(family)


# ----- AKS's carving: node i owns block i of every family ------------------------------------------------------


def test_node_blocks_follow_aks_dual_stack_carving():
    """kubectl get nodes on an AKS dual-stack cluster: 10.244.1.0/24,fd12:3456:789a:0:1::/80 for
    the second node, and its first pod gets 10.244.1.2,fd12:3456:789a:0:1::2."""
    net = parse_network(DUAL)
    assert [str(b) for b in net.blocks_at(0)] == ["10.244.0.0/24", "fd12:3456:789a::/80"]
    assert [str(b) for b in net.blocks_at(1)] == ["10.244.1.0/24", "fd12:3456:789a:0:1::/80"]
    assert [str(b) for b in net.blocks_at(2)] == ["10.244.2.0/24", "fd12:3456:789a:0:2::/80"]
    v4, v6 = net.families
    assert [str(f.pod_range(b)[0]) for f, b in zip(net.families, net.blocks_at(1), strict=True)] == [
        "10.244.1.2", "fd12:3456:789a:0:1::2"]
    assert v6.block_count == 65536 > 5000 and v6.block_addresses == 2**48
    assert v4.block_count == 256 and v4.pods_per_block == 253 and v6.pods_per_block == 2**48 - 2


def test_block_index_and_block_of_invert_block_at():
    v6 = parse_network(DUAL).families[1]
    block = v6.block_at(513)
    assert v6.block_index(block) == 513
    assert v6.block_of(IPv6Address("fd12:3456:789a:0:201::abcd")) == block
    assert v6.block_index(IPv6Network("fd12:3456:789a::/96")) is None  # other size
    assert v6.block_index(IPv4Network("10.244.0.0/24")) is None  # other family
    assert v6.block_index(IPv6Network("fd12:3456:789b::/80")) is None  # outside
    assert v6.block_of(IPv6Address("fd99::1")) is None and v6.block_of(IPv4Address("10.244.0.1")) is None
    with pytest.raises(IndexError):
        v6.block_at(65536)
    with pytest.raises(IndexError):
        v6.block_at(-1)


def test_reserved_addresses_and_gateway_per_family():
    v4, v6 = parse_network(DUAL).families
    b4, b6 = v4.block_at(1), v6.block_at(1)
    assert str(v4.gateway(b4)) == "10.244.1.1" and str(v6.gateway(b6)) == "fe80::1"
    assert [v4.is_reserved(IPv4Address(a), b4) for a in ("10.244.1.0", "10.244.1.1", "10.244.1.2", "10.244.1.255")] == [
        True, True, False, True]
    last6 = b6.broadcast_address
    assert [v6.is_reserved(a, b6) for a in (b6.network_address, b6.network_address + 1, b6.network_address + 2, last6)] == [
        True, True, False, False]  # no broadcast in IPv6
    assert v4.pod_range(b4) == (IPv4Address("10.244.1.2"), IPv4Address("10.244.1.254"))
    assert v6.pod_range(b6) == (b6.network_address + 2, last6)


FAMILY_CASES = [
    ("10.0.0.0/20", 24, IPFamily.ipv4),
    ("10.0.0.0/26", 28, IPFamily.ipv4),
    ("fd12:3456:789a::/112", 120, IPFamily.ipv6),
    ("fd12:3456:789a::/116", 124, IPFamily.ipv6),
]


def side(pod: str, size: int, family: IPFamily) -> FamilyNetwork:
    net = ip_network(pod)
    return FamilyNetwork(family, vnet_cidr=net, node_subnet_cidr=net, pod_cidr=net, service_cidr=net, node_cidr_size=size)


@pytest.mark.parametrize("pod,size,family", FAMILY_CASES)
def test_blocks_match_ipaddress_subnets(pod, size, family):
    s = side(pod, size, family)
    subnets = list(ip_network(pod).subnets(new_prefix=size))
    assert s.block_count == len(subnets)
    assert [s.block_at(i) for i in range(s.block_count)] == subnets
    assert all(s.block_index(b) == i for i, b in enumerate(subnets))
    assert s.pods_per_block == subnets[0].num_addresses - family.reserved_per_block
    for b in subnets:
        first, last = s.pod_range(b)
        usable = [a for a in b if not s.is_reserved(a, b)]
        assert (usable[0], usable[-1], len(usable)) == (first, last, s.pods_per_block)


def test_ipv6_blocks_at_small_integers_stay_ipv6():
    s = side("::/20", 24, IPFamily.ipv6)  # block 0 starts at integer 0, and /24 would fit IPv4 too
    assert s.block_at(0) == IPv6Network("::/24") and s.block_of(IPv6Address("::1")) == IPv6Network("::/24")
    assert s.block_at(3) == IPv6Network("0:300::/24")


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=64, max_value=124))
def test_block_of_any_ipv6_pod_address_holds_it(low_bits, size):
    s = side("fd12:3456:789a::/64", size, IPFamily.ipv6)
    ip = IPv6Address(int(IPv6Network("fd12:3456:789a::/64").network_address) + low_bits)
    block = s.block_of(ip)
    assert block is not None and ip in block and block.prefixlen == size
    index = s.block_index(block)
    assert index is not None and s.block_at(index) == block


# ----- the network's family views -------------------------------------------------------------------------------


def test_family_lookup():
    dual, single = parse_network(DUAL), parse_network({})
    assert dual.family(IPFamily.ipv6) is not None and dual.family(6) == dual.families[1]
    assert dual.family_of(IPv6Address("fd12:3456:789a::5")).family is IPFamily.ipv6
    assert dual.family_of(IPv4Interface("10.244.0.5/24")).family is IPFamily.ipv4
    assert single.family(IPFamily.ipv6) is None and single.family(4) == single.families[0]
    with pytest.raises(ValueError, match="single-stack"):
        single.family_of(IPv6Address("fd00::1"))


def test_single_stack_family_view_is_the_ipv4_fields():
    net = parse_network({"pod-cidr": "10.240.0.0/16", "network-plugin": "azure", "network-plugin-mode": "overlay",
                         "non-masquerade-cidrs": "192.168.0.0/16"})
    (v4,) = net.families
    assert (v4.pod_cidr, v4.service_cidr, v4.vnet_cidr, v4.node_subnet_cidr, v4.node_cidr_size) == (
        net.pod_cidr, net.service_cidr, net.vnet_cidr, net.node_subnet_cidr, net.node_cidr_size)
    assert v4.non_masquerade_cidrs == net.non_masquerade_cidrs
    assert net.blocks_at(3) == (IPv4Network("10.240.3.0/24"),) and net.block_count == v4.block_count


def test_pods_per_node_is_limited_by_either_family():
    # validation keeps max pods within both blocks, so a valid network runs max pods per node
    net = parse_network({**DUAL, "max-pods": 30, "node-cidr-size": 26, "node-cidr-size-v6": 123})
    assert [f.pods_per_block for f in net.families] == [61, 30] and net.pods_per_node == 30
    # the arithmetic itself takes the smaller of max pods and every family's block
    assert replace(net, node_cidr_size_v6=124).pods_per_node == 14
    assert replace(net, node_cidr_size=28).pods_per_node == 13


def test_encapsulation_overhead_per_underlay_family():
    net = parse_network(DUAL)
    assert net.encap_overhead() == net.encap_overhead(IPFamily.ipv4) == 50  # RFC 7348 over IPv4
    assert net.encap_overhead(IPFamily.ipv6) == 70  # the outer IPv6 header is 20 bytes longer
    direct = parse_network({**DUAL, "backend": "direct"})
    assert direct.encap_overhead(IPFamily.ipv4) == direct.encap_overhead(IPFamily.ipv6) == 0
    assert net.pod_mtu(1500) == 1500 - net.encap_overhead()


# ----- serialisation ----------------------------------------------------------------------------------------------


def test_single_stack_serialises_exactly_as_before():
    assert list(parse_network({}).to_dict()) == SINGLE_STACK_KEYS
    assert list(parse_network({"network-plugin": "kubenet"}).to_dict()) == SINGLE_STACK_KEYS


def test_dual_stack_serialisation_adds_the_lists_next_to_the_ipv4_keys():
    d = parse_network({**DUAL, "non-masquerade-cidrs": "10.0.0.0/8,fd00::/8"}).to_dict()
    assert list(d) == [
        "network-plugin", "network-plugin-mode", "ip-families", "vnet-cidr", "vnet-cidrs", "node-subnet-cidr",
        "node-subnet-cidrs", "pod-cidr", "pod-cidrs", "service-cidr", "service-cidrs", "dns-service-ip", "max-pods",
        "node-cidr-size", "node-cidr-size-v6", "backend", "vni", "vxlan-port", "mtu", "non-masquerade-cidrs",
    ]
    assert d["ip-families"] == ["ipv4", "ipv6"] and d["node-cidr-size-v6"] == 80
    assert d["pod-cidrs"] == ["10.244.0.0/16", "fd12:3456:789a::/64"] and d["pod-cidr"] == "10.244.0.0/16"
    assert d["service-cidrs"] == ["10.0.0.0/16", "fd12:3456:789a:1::/108"]
    assert d["non-masquerade-cidrs"] == ["10.0.0.0/8", "fd00::/8"]


@pytest.mark.parametrize(
    "raw",
    [
        DUAL,
        {**DUAL, "pod-cidrs": "100.64.0.0/12,fd00:abcd::/56", "node-cidr-size-v6": 72, "max-pods": 30,
         "node-cidr-size": 26, "mtu": 1400, "backend": "direct"},
        {"network-plugin": "kubenet", "ip-families": ["ipv4", "ipv6"],
         "service-cidrs": ["10.96.0.0/12", "fd00:96::/112"], "dns-service-ip": "10.96.0.10",
         "vnet-cidrs": "192.168.0.0/16,2001:db8:1::/48", "node-subnet-cidrs": "192.168.1.0/24,2001:db8:1:2::/64"},
    ],
)
def test_dual_stack_round_trips(raw):
    net = parse_network(raw)
    assert parse_network(net.to_dict()) == net
    assert parse_network(json.loads(net.to_json())) == net
    assert net.is_dual_stack


def test_dual_stack_and_single_stack_networks_differ():
    assert parse_network(DUAL) != parse_network({k: v for k, v in DUAL.items() if k != "ip-families"})
    assert {parse_network(DUAL), parse_network(DUAL)} == {parse_network(DUAL)}
    assert ClusterNetwork() == parse_network({})


# ----- pod CIDR expansion: the IPv4 side only (AKS) ---------------------------------------------------------------


def test_expansion_of_a_dual_stack_network_grows_the_ipv4_side():
    new = validate_expansion(parse_network(DUAL), "10.244.0.0/15")
    assert [str(f.pod_cidr) for f in new.families] == ["10.244.0.0/15", "fd12:3456:789a::/64"]
    assert new.to_dict()["pod-cidrs"][0] == "10.244.0.0/15"


def test_ipv6_pod_cidr_expansion_is_refused():
    with pytest.raises(ConfigError) as info:
        validate_expansion(parse_network(DUAL), "fd12:3456:7890::/48")
    assert info.value.errors[0].field == "pod-cidr" and "only the IPv4 pod CIDR" in info.value.errors[0].message
