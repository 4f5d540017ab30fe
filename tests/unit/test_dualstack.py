"""Dual-stack validation, rule by rule (AKS's rules, cited in
overlaycni/dualstack.py): each test names the flag its error must name, and
property tests check the overlap rules of both families against an
independent reference (address intervals as integers, or enumerated sets)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlaycni.config import FIELDS, IPFamily, check_network, contains, merge_settings, overlaps, parse_network
from overlaycni.errors import ConfigError, FieldError

OVERLAY = {"network-plugin": "azure", "network-plugin-mode": "overlay"}
DUAL = {**OVERLAY, "ip-families": "ipv4,ipv6"}


def problems(base: dict[str, object] | None = None, **settings_: object) -> list[FieldError]:
    net, errors, _ = check_network({**(DUAL if base is None else base), **settings_})
    assert (net is None) == bool(errors)
    for e in errors:  # every error names a known flag, first
        assert e.field in FIELDS and e.message.startswith(f"--{e.field}"), e
    return errors


def assert_error(errors: list[FieldError], field: str, *fragments: str) -> FieldError:
    hits = [e for e in errors if e.field == field and all(f in e.message for f in fragments)]
    assert hits, f"no error on {field!r} containing {fragments!r}; got {errors}"
    return hits[0]


def fields(errors: list[FieldError]) -> set[str]:
    return {e.field for e in errors}


# ----- --ip-families -----------------------------------------------------------------------


def test_default_is_single_stack_ipv4():
    net = parse_network({})
    assert net.ip_families == (IPFamily.ipv4,) and not net.is_dual_stack
    assert [f.family for f in net.families] == [IPFamily.ipv4]
    assert net.pod_cidr_v6 is None and net.node_cidr_size_v6 is None and net.family(6) is None


def test_dual_stack_takes_aks_defaults():
    net = parse_network({"ip-families": "ipv4,ipv6"})
    assert net.is_dual_stack and [str(f) for f in net.ip_families] == ["ipv4", "ipv6"]
    assert [str(f.pod_cidr) for f in net.families] == ["10.244.0.0/16", "fd12:3456:789a::/64"]
    assert [str(f.service_cidr) for f in net.families] == ["10.0.0.0/16", "fd12:3456:789a:1::/108"]
    assert [f.node_cidr_size for f in net.families] == [24, 80]
    assert [str(f.vnet_cidr) for f in net.families] == ["10.224.0.0/12", "fd00:10:224::/48"]
    assert [str(f.node_subnet_cidr) for f in net.families] == ["10.224.0.0/16", "fd00:10:224::/64"]
    assert str(net.dns_service_ip) == "10.0.0.10" and net.warnings == ()


@pytest.mark.parametrize("value", ["ipv4,ipv6", "IPv4,IPv6", " ipv4 , ipv6 ", ["ipv4", "ipv6"], ("IPV4", "IPV6")])
def test_ip_families_spellings(value):
    assert parse_network({"ip-families": value}).is_dual_stack


@pytest.mark.parametrize("value", ["ipv4", "IPv4", ["ipv4"]])
def test_ip_families_ipv4_is_single_stack(value):
    assert not parse_network({"ip-families": value}).is_dual_stack


@pytest.mark.parametrize(
    "value,fragment",
    [
        ("ipv6", "IPv6-only clusters are not offered"),
        ("ipv6,ipv4", "IPv4 comes first"),
        ("ipv4,ipv4", "each family is listed once"),
        ("ipv4,ipv6,ipv6", "each family is listed once"),
        ("ipv4,ipx", "'ipx' is not an IP family"),
        ("dual", "'dual' is not an IP family"),
        ("", "it is empty"),
        (5, "is not a list of IP families"),
    ],
)
def test_ip_families_other_than_ipv4_or_ipv4_ipv6(value, fragment):
    e = assert_error(problems(OVERLAY, ip_families=value), "ip-families", fragment)
    if "not a list" not in fragment:
        assert "use ipv4 (single-stack) or ipv4,ipv6 (dual-stack)" in e.message


def test_dual_stack_needs_overlay_or_kubenet():
    assert_error(problems({"network-plugin": "azure"}, ip_families="ipv4,ipv6"), "ip-families", "flat Azure CNI")
    assert problems({"network-plugin": "kubenet"}, ip_families="ipv4,ipv6") == []
    assert problems(OVERLAY, ip_families="ipv4,ipv6") == []
    assert problems({}, ip_families="ipv4,ipv6") == []  # no --network-plugin: AKS's default, overlay


# ----- CIDR count and order -------------------------------------------------------------------------

LISTS = {
    "pod-cidrs": ("10.244.0.0/16", "fd12:3456:789a::/64"),
    "service-cidrs": ("10.0.0.0/16", "fd12:3456:789a:1::/108"),
    "vnet-cidrs": ("10.224.0.0/12", "fd00:10:224::/48"),
    "node-subnet-cidrs": ("10.224.0.0/16", "fd00:10:224::/64"),
}
WITH_DNS = {"dns-service-ip": "10.0.0.10"}


def dns_for(flag: str) -> dict[str, str]:
    """--service-cidr(s) and --dns-service-ip go together."""
    return WITH_DNS if flag.startswith("service") else {}


@pytest.mark.parametrize("flag", sorted(LISTS))
def test_list_of_the_families_is_accepted(flag):
    v4, v6 = LISTS[flag]
    assert problems(**{flag: f"{v4},{v6}", **dns_for(flag)}) == []
    assert problems(**{flag: [v4, v6], **dns_for(flag)}) == []


@pytest.mark.parametrize("flag", sorted(LISTS))
def test_list_with_too_few_cidrs(flag):
    v4, _ = LISTS[flag]
    assert_error(problems(**{flag: v4, **dns_for(flag)}), flag, "has 1 CIDR but --ip-families ipv4,ipv6 needs 2")


@pytest.mark.parametrize("flag", sorted(LISTS))
def test_list_with_two_cidrs_in_a_single_stack_network(flag):
    v4, v6 = LISTS[flag]
    e = assert_error(problems(OVERLAY, **{flag: f"{v4},{v6}", **dns_for(flag)}), flag, "has 2 CIDRs but --ip-families ipv4")
    assert "add --ip-families ipv4,ipv6" in e.message


@pytest.mark.parametrize("flag", sorted(LISTS))
def test_list_in_the_wrong_order(flag):
    v4, v6 = LISTS[flag]
    assert_error(problems(**{flag: f"{v6},{v4}", **dns_for(flag)}), flag, "lists IPv6, IPv4", "needs IPv4, IPv6")


def test_list_with_two_ipv4_cidrs():
    assert_error(problems(pod_cidrs="10.244.0.0/16,10.245.0.0/16"), "pod-cidrs", "lists IPv4, IPv4")


@pytest.mark.parametrize("flag", sorted(LISTS))
def test_single_entry_list_in_a_single_stack_network_is_the_ipv4_range(flag):
    v4, _ = LISTS[flag]
    net = parse_network({**OVERLAY, flag: v4, **dns_for(flag)})
    assert str(getattr(net, flag[:-1].replace("-", "_"))) == v4 and not net.is_dual_stack


@pytest.mark.parametrize("value,fragment", [("10.244.0.0/16,abc", "'abc' is not a valid CIDR"),
                                            ("10.244.0.0/16,fd12::1/64", "host bits set; did you mean fd12::/64?"),
                                            ("10.244.0.0/16,fd12::/129", "IPv6 allows /0 to /128"),
                                            ("10.244.0.0/16,fd12::", "has no prefix length (expected e.g. fd12::/64)"),
                                            ({"a": 1}, "is not a list of CIDRs")])
def test_malformed_list_entries_name_the_list(value, fragment):
    assert_error(problems(pod_cidrs=value), "pod-cidrs", fragment)


# ----- single-family flag next to its list -------------------------------------------------------


def test_single_flag_sets_the_ipv4_side_and_the_ipv6_side_defaults():
    net = parse_network({**DUAL, "pod-cidr": "10.240.0.0/16"})
    assert [str(f.pod_cidr) for f in net.families] == ["10.240.0.0/16", "fd12:3456:789a::/64"]


def test_single_flag_and_list_that_agree():
    net = parse_network({**DUAL, "pod-cidr": "10.240.0.0/16", "pod-cidrs": "10.240.0.0/16,fd12:3456:789b::/64"})
    assert [str(f.pod_cidr) for f in net.families] == ["10.240.0.0/16", "fd12:3456:789b::/64"]


@pytest.mark.parametrize("single,plural", [("pod-cidr", "pod-cidrs"), ("service-cidr", "service-cidrs"),
                                           ("vnet-cidr", "vnet-cidrs"), ("node-subnet-cidr", "node-subnet-cidrs")])
def test_single_flag_and_list_that_disagree_name_both(single, plural):
    v4, v6 = LISTS[plural]
    other = {"pod-cidr": "10.245.0.0/16", "service-cidr": "10.1.0.0/16", "vnet-cidr": "10.208.0.0/12",
             "node-subnet-cidr": "10.224.1.0/24"}[single]
    e = assert_error(problems(**{single: other, plural: f"{v4},{v6}", **dns_for(plural)}), plural, "disagree")
    assert f"--{single} {other}" in e.message and f"--{plural} {v4},{v6}" in e.message


# ----- IPv6 ranges: unicast scope ------------------------------------------------------------------


@pytest.mark.parametrize(
    "cidr,fragment",
    [
        ("fe80::/64", "link-local"),
        ("ff00::/64", "multicast"),
        ("::ffff:0:0/112", "IPv4-mapped"),
        ("64:ff9b::/96", "NAT64"),
        ("fec0::/64", "site-local"),
        ("::/64", "includes the unspecified address"),
        ("100::/64", "reserved space"),
        ("::/0", "includes the unspecified address"),
        ("fc00::/6", "includes"),
    ],
)
@pytest.mark.parametrize("flag", sorted(LISTS))
def test_ipv6_ranges_are_unique_local_or_global_unicast(flag, cidr, fragment):
    v4, _ = LISTS[flag]
    assert_error(problems(**{flag: f"{v4},{cidr}", **dns_for(flag)}), flag, fragment, "unique local (fc00::/7)")


@pytest.mark.parametrize("pod", ["fc00:1::/64", "fdff:ffff:ffff::/64"])
def test_unique_local_pod_cidr_is_fine(pod):
    net, errors, warnings = check_network({**DUAL, "pod-cidrs": f"10.244.0.0/16,{pod}"})
    assert errors == [] and warnings == []


@pytest.mark.parametrize("pod", ["2001:db8::/64", "2603:1030::/64", "3fff:ffff::/64"])
def test_global_unicast_pod_cidr_is_a_warning(pod):
    net, errors, warnings = check_network({**DUAL, "pod-cidrs": f"10.244.0.0/16,{pod}"})
    assert errors == [] and net is not None
    assert len(warnings) == 1 and warnings[0].startswith(f"--pod-cidrs {pod}") and "global unicast" in warnings[0]


# ----- IPv6 overlaps --------------------------------------------------------------------------------


def test_ipv6_pod_cidr_overlapping_the_vnet():
    e = assert_error(problems(pod_cidrs="10.244.0.0/16,fd00:10:224:1::/64"), "pod-cidrs", "overlaps --vnet-cidrs")
    assert e.message == "--pod-cidrs fd00:10:224:1::/64 overlaps --vnet-cidrs fd00:10:224::/48 (NetworkProfileCIDROverlapVNET)"


def test_ipv6_pod_cidr_containing_the_vnet():
    assert_error(problems(pod_cidrs="10.244.0.0/16,fd00::/16"), "pod-cidrs", "overlaps --vnet-cidrs fd00:10:224::/48")


def test_ipv6_service_cidr_overlapping_the_vnet():
    assert_error(
        problems(service_cidrs="10.0.0.0/16,fd00:10:224:5::/108", **WITH_DNS),
        "service-cidrs",
        "overlaps --vnet-cidrs fd00:10:224::/48 (ServiceCidrOverlapExistingSubnetsCidr)",
    )


def test_ipv6_pod_cidr_overlapping_the_service_cidr():
    errors = problems(pod_cidrs="10.244.0.0/16,fd12:3456:789a::/48")
    assert_error(errors, "pod-cidrs", "overlaps --service-cidrs fd12:3456:789a:1::/108")


def test_ipv6_node_subnet_outside_the_vnet():
    errors = problems(node_subnet_cidrs="10.224.0.0/16,fd12:3456:789a::/64")
    assert_error(errors, "node-subnet-cidrs", "is not inside --vnet-cidrs fd00:10:224::/48")
    # a pod CIDR on that stray node subnet is caught too
    assert_error(errors, "pod-cidrs", "overlaps --node-subnet-cidrs fd12:3456:789a::/64")


@pytest.mark.parametrize("subnet", ["fd00:10:224::/56", "fd00:10:224::/80"])
def test_ipv6_node_subnet_is_a_slash_64(subnet):
    assert_error(problems(node_subnet_cidrs=f"10.224.0.0/16,{subnet}"), "node-subnet-cidrs", "exactly /64")


def test_ranges_of_different_families_never_overlap():
    assert not overlaps(IPv4Network("0.0.0.0/0"), IPv6Network("::/0"))
    assert not contains(IPv6Network("::/0"), IPv4Network("10.0.0.0/8"))
    # an IPv4-mapped pod CIDR is refused by scope, not confused with the IPv4 VNet
    assert_error(problems(pod_cidrs="10.244.0.0/16,::ffff:a00:0/104"), "pod-cidrs", "IPv4-mapped")


# ----- IPv6 service CIDR size ---------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [64, 100, 107])
def test_ipv6_service_cidr_larger_than_slash_108(prefix):
    e = assert_error(problems(service_cidrs=f"10.0.0.0/16,fd12:3456:789a:1::/{prefix}", **WITH_DNS),
                     "service-cidrs", "larger than /108")
    assert "AKS: no larger than a /108" in e.message


@pytest.mark.parametrize("prefix", [108, 112, 126])
def test_ipv6_service_cidr_of_slash_108_or_smaller(prefix):
    assert problems(service_cidrs=f"10.0.0.0/16,fd12:3456:789a:1::/{prefix}", **WITH_DNS) == []


def test_ipv6_service_cidr_too_small():
    assert_error(problems(service_cidrs="10.0.0.0/16,fd12:3456:789a:1::/127", **WITH_DNS), "service-cidrs", "too small")


# ----- --dns-service-ip stays IPv4 ------------------------------------------------------------------


def test_dns_service_ip_may_not_be_ipv6():
    e = assert_error(problems(service_cidrs="10.0.0.0/16,fd12:3456:789a:1::/108", dns_service_ip="fd12:3456:789a:1::a"),
                     "dns-service-ip", "is IPv6")
    assert "stays IPv4, inside the IPv4 service CIDR" in e.message


def test_dns_service_ip_inside_the_ipv4_service_cidr():
    assert_error(problems(service_cidrs="10.1.0.0/16,fd12:3456:789a:1::/108", dns_service_ip="10.0.0.10"),
                 "dns-service-ip", "is not inside --service-cidr 10.1.0.0/16")
    assert problems(service_cidrs="10.1.0.0/16,fd12:3456:789a:1::/108", dns_service_ip="10.1.0.10") == []


def test_service_cidrs_and_dns_service_ip_go_together():
    e = assert_error(problems(service_cidrs="10.0.0.0/16,fd12:3456:789a:1::/108"), "dns-service-ip", "go together")
    assert "--service-cidrs and --dns-service-ip" in e.message


def test_lists_need_the_network_plugin_like_the_single_flags():
    errors = problems({"ip-families": "ipv4,ipv6"}, pod_cidrs="10.244.0.0/16,fd12:3456:789a::/64")
    assert_error(errors, "network-plugin", "--pod-cidrs")
    errors = problems({"network-plugin": "azure", "ip-families": "ipv4,ipv6"},
                      pod_cidrs="10.244.0.0/16,fd12:3456:789a::/64")
    assert_error(errors, "network-plugin-mode", "--pod-cidrs with --network-plugin azure requires")


# ----- IPv6 node blocks -----------------------------------------------------------------------------


def test_node_cidr_size_v6_changes_the_ipv6_block():
    net = parse_network({**DUAL, "node-cidr-size-v6": 96})
    assert net.families[1].node_cidr_size == 96 and net.families[1].block_count == 2**32


@pytest.mark.parametrize("value", [47, 125, "x", 80.5])
def test_node_cidr_size_v6_out_of_range(value):
    assert_error(problems(node_cidr_size_v6=value), "node-cidr-size-v6")


def test_node_cidr_size_v6_in_a_single_stack_network():
    assert_error(problems(OVERLAY, node_cidr_size_v6=80), "node-cidr-size-v6", "dual-stack networks only")


def test_ipv6_block_fits_in_the_ipv6_pod_cidr():
    e = assert_error(problems(pod_cidrs="10.244.0.0/16,fd12:3456:789a::/96"), "pod-cidrs", "smaller than one node block (/80")
    assert "--node-cidr-size-v6" in e.message
    assert problems(pod_cidrs="10.244.0.0/16,fd12:3456:789a::/80") == []  # exactly one block
    assert problems(pod_cidrs="10.244.0.0/16,fd12:3456:789a::/96", node_cidr_size_v6=112) == []


@pytest.mark.parametrize("block,max_pods,ok", [(120, 250, True), (121, 250, False), (121, 126, True),
                                                (124, 14, True), (124, 15, False)])
def test_ipv6_block_holds_max_pods_plus_two_reserved(block, max_pods, ok):
    errors = problems(node_cidr_size_v6=block, max_pods=max_pods, node_cidr_size=24)
    if ok:
        assert errors == []
    else:
        e = assert_error(errors, "node-cidr-size-v6", f"fewer than --max-pods {max_pods}")
        assert "--node-cidr-size-v6 120" in e.message or "--node-cidr-size-v6 " in e.message


def test_node_count_is_capped_by_the_smaller_familys_blocks():
    v6_small = parse_network({**DUAL, "pod-cidrs": "10.240.0.0/12,fd12:3456:789a::/72"})  # 4096 v4, 256 v6 blocks
    assert [f.block_count for f in v6_small.families] == [4096, 256] and v6_small.max_nodes == 256
    v4_small = parse_network({**DUAL, "pod-cidrs": "10.244.0.0/22,fd12:3456:789a::/64"})  # 4 v4 blocks
    assert v4_small.max_nodes == 4
    assert parse_network({**DUAL, "pod-cidr": "100.64.0.0/10"}).max_nodes == 5000  # the AKS limit


# ----- MTU, non-masquerade destinations ----------------------------------------------------------------


def test_dual_stack_mtu_is_at_least_1280():
    assert_error(problems(mtu=1279), "mtu", "minimum IPv6 link MTU")
    assert problems(mtu=1280) == [] and problems(mtu="auto") == []
    assert problems(OVERLAY, mtu=1000) == []  # IPv4 alone: 576 and up, as before


def test_non_masquerade_cidrs_of_both_families():
    net = parse_network({**DUAL, "non-masquerade-cidrs": "10.0.0.0/8,fd00::/8,192.168.0.0/16"})
    assert [str(n) for n in net.families[0].non_masquerade_cidrs] == ["10.0.0.0/8", "192.168.0.0/16"]
    assert [str(n) for n in net.families[1].non_masquerade_cidrs] == ["fd00::/8"]
    assert net.non_masquerade_cidrs == (IPv4Network("10.0.0.0/8"), IPv4Network("192.168.0.0/16"))


def test_ipv6_non_masquerade_cidr_in_a_single_stack_network():
    assert_error(problems(OVERLAY, non_masquerade_cidrs="fd00::/8"), "non-masquerade-cidrs", "is IPv6")
    assert_error(problems(non_masquerade_cidrs="10.0.0.0/8,fd00::1/8"), "non-masquerade-cidrs", "host bits set")


# ----- every problem at once ----------------------------------------------------------------------


def test_all_dual_stack_errors_are_collected():
    errors = problems(
        pod_cidrs="10.244.0.0/16,fe80::/64",
        service_cidrs="10.0.0.0/16,fd12:3456:789a:1::/100",
        node_subnet_cidrs="10.224.0.0/16,fd00:10:224::/56",
        dns_service_ip="fd12:3456:789a:1::a",
        node_cidr_size_v6=124,
        mtu=1200,
    )
    assert fields(errors) == {"pod-cidrs", "service-cidrs", "node-subnet-cidrs", "dns-service-ip",
                              "node-cidr-size-v6", "mtu"}


def test_parse_network_raises_with_every_error():
    with pytest.raises(ConfigError) as info:
        parse_network({**DUAL, "pod-cidrs": "fd12::/64,10.0.0.0/8", "service-cidrs": "10.0.0.0/16"})
    assert {e.field for e in info.value.errors} >= {"pod-cidrs", "service-cidrs"}


# ----- property tests: overlaps against a reference ------------------------------------------------------


def interval(net: IPv4Network | IPv6Network) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address)


def intersect(a: IPv4Network | IPv6Network, b: IPv4Network | IPv6Network) -> bool:
    """The reference: two address intervals of the same family share a point."""
    if a.version != b.version:
        return False
    (a0, a1), (b0, b1) = interval(a), interval(b)
    return a0 <= b1 and b0 <= a1


ULA_BASE = int(IPv6Network("fd00:10:224::/48").network_address)


@st.composite
def ula_networks(draw, min_prefix: int = 40, max_prefix: int = 72) -> IPv6Network:
    """ULA prefixes around fd00:10:224::/48, so that random pairs often overlap."""
    prefix = draw(st.integers(min_value=min_prefix, max_value=max_prefix))
    offset = draw(st.integers(min_value=-(2**3), max_value=2**3)) << (128 - 52)
    return IPv6Network((ULA_BASE + offset, prefix), strict=False)


def has_overlap(errors: list[FieldError], field: str, other: str) -> bool:
    return any(e.field == field and f"overlaps --{other} " in e.message for e in errors)


@settings(max_examples=200, deadline=None)
@given(ula_networks(), ula_networks(min_prefix=40, max_prefix=64))
def test_ipv6_pod_vnet_overlap_matches_the_reference(pod, vnet):
    subnet = IPv6Network((int(vnet.network_address), 64))
    errors = problems(pod_cidrs=f"10.244.0.0/16,{pod}", vnet_cidrs=f"10.224.0.0/12,{vnet}",
                      node_subnet_cidrs=f"10.224.0.0/16,{subnet}", node_cidr_size_v6=max(80, pod.prefixlen))
    assert has_overlap(errors, "pod-cidrs", "vnet-cidrs") == intersect(pod, vnet)


@settings(max_examples=200, deadline=None)
@given(ula_networks(min_prefix=44, max_prefix=72), ula_networks(min_prefix=108, max_prefix=120))
def test_ipv6_pod_service_overlap_matches_the_reference(pod, svc):
    base = {"vnet-cidrs": "10.224.0.0/12,fd99::/48", "node-subnet-cidrs": "10.224.0.0/16,fd99::/64", **WITH_DNS}
    errors = problems(pod_cidrs=f"10.244.0.0/16,{pod}", service_cidrs=f"10.0.0.0/16,{svc}",
                      node_cidr_size_v6=max(80, pod.prefixlen), **base)
    assert has_overlap(errors, "pod-cidrs", "service-cidrs") == intersect(pod, svc)


@settings(max_examples=200, deadline=None)
@given(ula_networks(min_prefix=108, max_prefix=126), ula_networks(min_prefix=40, max_prefix=64))
def test_ipv6_service_vnet_overlap_matches_the_reference(svc, vnet):
    subnet = IPv6Network((int(vnet.network_address), 64))
    errors = problems(service_cidrs=f"10.0.0.0/16,{svc}", vnet_cidrs=f"10.224.0.0/12,{vnet}",
                      node_subnet_cidrs=f"10.224.0.0/16,{subnet}", pod_cidrs="10.244.0.0/16,fd77::/64", **WITH_DNS)
    assert has_overlap(errors, "service-cidrs", "vnet-cidrs") == intersect(svc, vnet)


# IPv4 in a dual-stack network: small networks in 10.0.0.0/20, enumerated.
V4_BASE = int(IPv4Address("10.0.0.0"))


@st.composite
def small_v4(draw, min_prefix: int = 16, max_prefix: int = 24) -> IPv4Network:
    prefix = draw(st.integers(min_value=min_prefix, max_value=max_prefix))
    offset = draw(st.integers(min_value=0, max_value=(1 << 20) - 1))
    return IPv4Network((V4_BASE + offset, prefix), strict=False)


def addresses(net: IPv4Network) -> set[int]:
    first = int(net.network_address)
    return set(range(first, first + net.num_addresses))


@settings(max_examples=150, deadline=None)
@given(small_v4(), small_v4(min_prefix=12, max_prefix=20))
def test_ipv4_pod_vnet_overlap_in_a_dual_stack_network_matches_address_sets(pod, vnet):
    subnet = IPv4Network((int(vnet.network_address), max(vnet.prefixlen, 20)))
    errors = problems(pod_cidrs=f"{pod},fd12:3456:789a::/64", vnet_cidrs=f"{vnet},fd00:10:224::/48",
                      node_subnet_cidrs=f"{subnet},fd00:10:224::/64", service_cidrs="192.168.0.0/16,fd12:3456:789a:1::/108",
                      dns_service_ip="192.168.0.10")
    assert has_overlap(errors, "pod-cidr", "vnet-cidr") == bool(addresses(pod) & addresses(vnet))


V6_RULE_FIELDS = {"pod-cidrs", "service-cidrs", "vnet-cidrs", "node-subnet-cidrs", "node-cidr-size-v6"}


@settings(max_examples=150, deadline=None)
@given(small_v4(), small_v4(min_prefix=12, max_prefix=20), ula_networks(), ula_networks(min_prefix=108, max_prefix=120))
def test_the_ipv6_side_never_changes_the_ipv4_verdicts(pod, vnet, pod6, svc6):
    """Families are independent: the IPv4 errors of a dual-stack network are
    the errors of the same IPv4 settings in a single-stack network."""
    v4 = {"pod-cidr": str(pod), "vnet-cidr": str(vnet), "node-subnet-cidr": str(IPv4Network((int(vnet.network_address), 20))),
          "service-cidr": "192.168.0.0/16", "dns-service-ip": "192.168.0.10"}
    single = problems(OVERLAY, **v4)
    dual = problems(pod_cidrs=f"{pod},{pod6}", service_cidrs=f"192.168.0.0/16,{svc6}", node_cidr_size_v6=max(80, pod6.prefixlen),
                    **{k: v for k, v in v4.items() if k not in ("pod-cidr", "service-cidr")})
    v6_free = [e for e in dual if e.field not in V6_RULE_FIELDS]
    assert sorted(e.message for e in v6_free) == sorted(e.message for e in single)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(
    st.sampled_from(["ip-families", "pod-cidrs", "service-cidrs", "vnet-cidrs", "node-subnet-cidrs", "node-cidr-size-v6",
                     "pod-cidr", "dns-service-ip", "mtu", "non-masquerade-cidrs"]),
    st.one_of(
        st.sampled_from(["ipv4", "ipv4,ipv6", "ipv6", "80", "64", "1280", "10.0.0.10", "fd00::/8"]),
        st.builds(lambda a, b: f"{a},{b}", st.sampled_from(["10.244.0.0/16", "10.0.0.0/16", "fd12::/64"]),
                  st.sampled_from(["fd12:3456:789a::/64", "fe80::/64", "fd00:10:224::/64", "10.1.0.0/16", "x"])),
        st.text(max_size=12),
        st.lists(st.text(max_size=8), max_size=3),
    ),
    max_size=6,
))
def test_any_dual_stack_input_gives_named_errors_or_a_network(raw):
    net, errors, _ = check_network({**OVERLAY, **raw})
    assert (net is None) == bool(errors)
    for e in errors:
        assert e.field in FIELDS and e.message.startswith(f"--{e.field}"), e
    if net is not None:
        assert parse_network(net.to_dict()) == net
        assert [f.family for f in net.families] == list(net.ip_families)
        for side in net.families:
            assert side.block_count >= 1 and ip_network(side.block_at(0)).subnet_of(side.pod_cidr)  # type: ignore[arg-type]


# ----- layers: a file, then flags ----------------------------------------------------------------------


def test_a_later_single_flag_replaces_the_ipv4_entry_of_an_earlier_list():
    file = {"ip-families": ["ipv4", "ipv6"], "pod-cidrs": "10.1.0.0/16,fd12:3456:789b::/64"}
    net = parse_network(merge_settings(OVERLAY, file, {"pod-cidr": "10.2.0.0/16"}))
    assert [str(f.pod_cidr) for f in net.families] == ["10.2.0.0/16", "fd12:3456:789b::/64"]


def test_a_later_list_replaces_an_earlier_single_flag():
    merged = merge_settings(DUAL, {"pod-cidr": "10.1.0.0/16"}, {"pod-cidrs": ["10.2.0.0/16", "fd12:3456:789b::/64"]})
    assert "pod-cidr" not in merged
    assert [str(f.pod_cidr) for f in parse_network(merged).families] == ["10.2.0.0/16", "fd12:3456:789b::/64"]


def test_within_one_layer_both_spellings_must_agree():
    merged = merge_settings(DUAL, {"pod-cidr": "10.1.0.0/16", "pod-cidrs": "10.2.0.0/16,fd12:3456:789b::/64"})
    assert_error(problems({}, **merged), "pod-cidrs", "disagree")
