"""Unit tests of the cluster network model: one test per AKS rule (the AKS
docs and azure-cli validators cited in overlaycni/config.py), error collection,
round trips, pod CIDR expansion, config files, and property tests of the
CIDR arithmetic against brute force."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlaycni.config import (
    DEFAULT_MAX_PODS,
    FIELDS,
    PRIVATE_RANGES,
    ClusterNetwork,
    check_network,
    contains,
    count_blocks,
    is_private,
    load_file,
    merge_settings,
    overlaps,
    parse_network,
    usable_subnet_ips,
    validate_expansion,
)
from overlaycni.errors import ConfigError, FieldError

OVERLAY = {"network-plugin": "azure", "network-plugin-mode": "overlay"}


def problems(**settings_: object) -> list[FieldError]:
    """Errors for the overlay base plus ``settings_`` (underscores allowed)."""
    net, errors, _ = check_network({**OVERLAY, **settings_})
    assert (net is None) == bool(errors)
    return errors


def assert_error(errors: list[FieldError], field: str, fragment: str) -> None:
    hits = [e for e in errors if e.field == field and fragment in e.message]
    assert hits, f"no error on {field!r} containing {fragment!r}; got {errors}"
    assert hits[0].message.startswith(f"--{field}"), "every message names its flag first"


def svc(cidr: str, dns: str) -> dict[str, str]:
    return {"service_cidr": cidr, "dns_service_ip": dns}


# ----- defaults and the seed's example -----------------------------------------------


def test_defaults_follow_aks():
    net = parse_network({})
    assert net.network_plugin == "azure" and net.network_plugin_mode == "overlay" and net.is_overlay
    assert net.pod_cidr == IPv4Network("10.244.0.0/16")
    assert net.service_cidr == IPv4Network("10.0.0.0/16")
    assert net.dns_service_ip == IPv4Address("10.0.0.10")
    assert net.vnet_cidr == IPv4Network("10.224.0.0/12")
    assert net.node_subnet_cidr == IPv4Network("10.224.0.0/16")
    assert (net.max_pods, net.node_cidr_size, net.backend, net.vni, net.vxlan_port, net.mtu) == (
        250, 24, "vxlan", 4096, 4789, None
    )
    assert net.warnings == ()


def test_seed_example_is_valid_with_256_nodes():
    net = parse_network(
        {**OVERLAY, "pod-cidr": "10.244.0.0/16", "service-cidr": "10.0.0.0/24", "dns-service-ip": "10.0.0.10"}
    )
    assert net.block_count == 256
    assert net.max_nodes == 256


def test_keys_accept_dashes_underscores_and_flag_spelling():
    net = parse_network({"--network-plugin": "azure", "network_plugin_mode": "OVERLAY", "Pod-CIDR": "10.240.0.0/16"})
    assert net.pod_cidr == IPv4Network("10.240.0.0/16")


def test_kwargs_are_settings_too():
    assert parse_network(network_plugin="kubenet", max_pods=110).max_pods == 110


def test_frozen():
    net = parse_network({})
    with pytest.raises(AttributeError):
        net.max_pods = 10  # type: ignore[misc]


# ----- reserved ranges ------------------------------------------------------------------


@pytest.mark.parametrize("reserved", ["169.254.0.0/16", "172.30.0.0/16", "172.31.0.0/16", "192.0.2.0/24"])
def test_pod_cidr_may_not_be_a_reserved_range(reserved):
    assert_error(problems(pod_cidr=reserved), "pod-cidr", f"is the reserved range {reserved}")


@pytest.mark.parametrize(
    "field,settings_,fragment",
    [
        ("pod-cidr", {"pod_cidr": "172.16.0.0/12"}, "contains the reserved range 172.30.0.0/16"),
        ("pod-cidr", {"pod_cidr": "169.254.8.0/24"}, "lies inside the reserved range 169.254.0.0/16"),
        ("service-cidr", svc("172.31.0.0/16", "172.31.0.10"), "is the reserved range 172.31.0.0/16"),
        ("service-cidr", svc("192.0.0.0/16", "192.0.0.10"), "contains the reserved range 192.0.2.0/24"),
        (
            "vnet-cidr",
            {"vnet_cidr": "172.16.0.0/12", "node_subnet_cidr": "172.16.0.0/16"},
            "contains the reserved range 172.30.0.0/16",
        ),
        (
            "node-subnet-cidr",
            {"vnet_cidr": "172.16.0.0/12", "node_subnet_cidr": "172.30.0.0/16"},
            "is the reserved range 172.30.0.0/16",
        ),
    ],
)
def test_reserved_ranges_rejected_for_every_range(field, settings_, fragment):
    assert_error(problems(**settings_), field, fragment)


def test_range_containing_two_reserved_ranges_reports_both():
    errors = problems(pod_cidr="172.16.0.0/12")
    reserved = {e.message.split("reserved range ")[1].split(",")[0] for e in errors if "reserved" in e.message}
    assert reserved == {"172.30.0.0/16", "172.31.0.0/16"}


def test_range_next_to_a_reserved_range_is_fine():
    assert problems(pod_cidr="172.29.0.0/16") == []


# ----- overlaps ----------------------------------------------------------------------------


def test_pod_cidr_overlapping_vnet_names_both_ranges():
    # the example: the node subnet is elsewhere, the VNet still counts
    assert_error(
        problems(pod_cidr="10.224.128.0/17"),
        "pod-cidr",
        "--pod-cidr 10.224.128.0/17 overlaps --vnet-cidr 10.224.0.0/12",
    )


def test_pod_cidr_containing_vnet_overlaps_it():
    assert_error(problems(pod_cidr="10.192.0.0/10"), "pod-cidr", "overlaps --vnet-cidr 10.224.0.0/12")


def test_pod_cidr_overlapping_service_cidr():
    assert_error(problems(pod_cidr="10.0.0.0/14"), "pod-cidr", "--pod-cidr 10.0.0.0/14 overlaps --service-cidr 10.0.0.0/16")


def test_service_cidr_overlapping_vnet():
    assert_error(
        problems(**svc("10.230.0.0/16", "10.230.0.10")),
        "service-cidr",
        "--service-cidr 10.230.0.0/16 overlaps --vnet-cidr 10.224.0.0/12",
    )


@pytest.mark.parametrize(
    "vnet,subnet",
    [("10.224.0.0/12", "10.10.0.0/16"), ("10.224.0.0/16", "10.224.0.0/12"), ("10.224.0.0/16", "10.225.0.0/24")],
)
def test_node_subnet_must_lie_inside_vnet(vnet, subnet):
    assert_error(
        problems(vnet_cidr=vnet, node_subnet_cidr=subnet),
        "node-subnet-cidr",
        f"--node-subnet-cidr {subnet} is not inside --vnet-cidr {vnet}",
    )


@pytest.mark.parametrize(
    "field,settings_",
    [
        ("pod-cidr", {"pod_cidr": "10.10.0.0/16"}),
        ("service-cidr", svc("10.10.0.0/24", "10.10.0.10")),
    ],
)
def test_ranges_overlapping_a_node_subnet_outside_the_vnet(field, settings_):
    errors = problems(node_subnet_cidr="10.10.0.0/16", **settings_)
    assert_error(errors, "node-subnet-cidr", "is not inside --vnet-cidr")
    assert_error(errors, field, "overlaps --node-subnet-cidr 10.10.0.0/16")


def test_node_subnet_equal_to_vnet_is_fine():
    assert problems(vnet_cidr="10.224.0.0/16", node_subnet_cidr="10.224.0.0/16") == []


# ----- service CIDR and DNS service IP ---------------------------------------------------


def test_service_cidr_larger_than_slash_12_rejected():
    assert_error(problems(**svc("10.0.0.0/11", "10.0.0.10")), "service-cidr", "larger than /12")


def test_service_cidr_of_exactly_slash_12_accepted():
    assert problems(**svc("10.0.0.0/12", "10.0.0.10")) == []


def test_service_cidr_too_small_for_dns_rejected():
    assert_error(problems(**svc("10.0.0.0/31", "10.0.0.1")), "service-cidr", "too small")


@pytest.mark.parametrize(
    "dns,fragment",
    [
        ("10.1.0.10", "--dns-service-ip 10.1.0.10 is not inside --service-cidr 10.0.0.0/16"),
        ("10.0.0.0", "is the network address of 10.0.0.0/16"),
        ("10.0.0.1", "is the first usable address of 10.0.0.0/16, reserved for kubernetes.default"),
        ("10.0.255.255", "is the broadcast address of 10.0.0.0/16"),
    ],
)
def test_dns_service_ip_rules(dns, fragment):
    assert_error(problems(**svc("10.0.0.0/16", dns)), "dns-service-ip", fragment)


@pytest.mark.parametrize("dns", ["10.0.0.2", "10.0.255.254"])
def test_dns_service_ip_just_inside_the_limits_is_fine(dns):
    assert problems(**svc("10.0.0.0/16", dns)) == []


@pytest.mark.parametrize(
    "given,missing", [({"service_cidr": "10.0.0.0/24"}, "dns-service-ip"), ({"dns_service_ip": "10.0.0.10"}, "service-cidr")]
)
def test_service_cidr_and_dns_ip_go_together(given, missing):
    assert_error(problems(**given), missing, "--service-cidr and --dns-service-ip go together")


# ----- max pods and node blocks -------------------------------------------------------------


@pytest.mark.parametrize("value", [9, 251, 0, -1, "1000"])
def test_max_pods_out_of_range(value):
    assert_error(problems(max_pods=value), "max-pods", "out of range (allowed 10..250)")


@pytest.mark.parametrize("value", [10, 250, "110"])
def test_max_pods_in_range(value):
    assert problems(max_pods=value) == []
    assert parse_network({**OVERLAY, "max-pods": value}).max_pods == int(value)


@pytest.mark.parametrize("value", ["abc", "12.5", True, ""])
def test_max_pods_not_a_number(value):
    assert_error(problems(max_pods=value), "max-pods", "is not a whole number")


def test_node_block_too_small_for_max_pods():
    errors = problems(node_cidr_size=25)  # 128 - 3 = 125 < 250
    assert_error(errors, "node-cidr-size", "a /25 node block holds 125 pods")
    assert_error(errors, "node-cidr-size", "use --node-cidr-size 24 or --max-pods 125")


@pytest.mark.parametrize("max_pods,ok", [(125, True), (126, False)])
def test_node_block_capacity_boundary_counts_reserved_addresses(max_pods, ok):
    errors = problems(node_cidr_size=25, max_pods=max_pods)
    assert (errors == []) is ok


@pytest.mark.parametrize("value", [7, 29, "x"])
def test_node_cidr_size_out_of_range(value):
    errors = problems(node_cidr_size=value)
    assert any(e.field == "node-cidr-size" for e in errors)


def test_pod_cidr_smaller_than_one_block():
    assert_error(problems(pod_cidr="10.244.0.0/25"), "pod-cidr", "smaller than one node block (/24)")


def test_pod_cidr_of_exactly_one_block():
    assert parse_network({**OVERLAY, "pod-cidr": "10.244.0.0/24"}).block_count == 1


def test_smaller_blocks_give_more_nodes():
    net = parse_network({**OVERLAY, "node-cidr-size": 26, "max-pods": 60})
    assert net.block_count == 1024


# ----- flag combinations ----------------------------------------------------------------------


def test_pod_cidr_with_azure_requires_overlay_mode():
    net, errors, _ = check_network({"network-plugin": "azure", "pod-cidr": "10.244.0.0/16"})
    assert_error(errors, "network-plugin-mode", "requires --network-plugin-mode overlay")


@pytest.mark.parametrize(
    "given,flags",
    [
        ({"pod-cidr": "10.244.0.0/16"}, "--pod-cidr"),
        ({"service-cidr": "10.0.0.0/16", "dns-service-ip": "10.0.0.10"}, "--service-cidr, --dns-service-ip"),
    ],
)
def test_ranges_without_network_plugin(given, flags):
    _, errors, _ = check_network(given)
    assert_error(errors, "network-plugin", f"specify the network plugin type when setting {flags}")


def test_mode_without_network_plugin():
    _, errors, _ = check_network({"network-plugin-mode": "overlay"})
    assert_error(errors, "network-plugin", "--network-plugin-mode needs --network-plugin azure")


def test_mode_with_kubenet():
    _, errors, _ = check_network({"network-plugin": "kubenet", "network-plugin-mode": "overlay"})
    assert_error(errors, "network-plugin-mode", "applies to --network-plugin azure only")


def test_kubenet_with_pod_cidr_is_fine():
    net = parse_network({"network-plugin": "kubenet", "pod-cidr": "10.244.0.0/16"})
    assert net.is_overlay and net.network_plugin_mode is None


def test_flat_azure_without_pod_cidr_is_valid_but_not_overlay():
    assert not parse_network({"network-plugin": "azure"}).is_overlay


@pytest.mark.parametrize(
    "field,value", [("network-plugin", "cilium"), ("network-plugin-mode", "underlay"), ("backend", "geneve")]
)
def test_choices(field, value):
    assert_error(problems(**{field: value}), field, f"{value!r} is not one of")


# ----- malformed values and host bits -----------------------------------------------------------


@pytest.mark.parametrize("field", ["pod-cidr", "vnet-cidr", "node-subnet-cidr"])
def test_host_bits_set_suggests_the_network(field):
    value = {"pod-cidr": "10.244.1.0/16", "vnet-cidr": "10.224.0.1/12", "node-subnet-cidr": "10.224.7.0/16"}[field]
    meant = {"pod-cidr": "10.244.0.0/16", "vnet-cidr": "10.224.0.0/12", "node-subnet-cidr": "10.224.0.0/16"}[field]
    assert_error(problems(**{field: value}), field, f"{value} has host bits set; did you mean {meant}?")


@pytest.mark.parametrize(
    "value,fragment",
    [
        ("10.244.0.0/33", "has prefix length /33; IPv4 allows /0 to /32"),
        ("abc", "'abc' is not a valid CIDR"),
        ("", "is not a valid CIDR"),
        ("10.244.0.0/x", "is not a valid CIDR"),
        ("300.1.0.0/16", "is not a valid CIDR"),
        ("fd00::/64", "is IPv6; an IPv4 CIDR is expected"),
        ("10.244.0.0", "has no prefix length"),
    ],
)
def test_malformed_pod_cidr(value, fragment):
    assert_error(problems(pod_cidr=value), "pod-cidr", fragment)


@pytest.mark.parametrize(
    "value,fragment",
    [
        ("abc", "is not a valid IP address"),
        ("10.0.0.300", "is not a valid IP address"),
        ("10.0.0.10/32", "is not a valid IP address"),
        ("fd00::a", "is IPv6; an IPv4 address is expected"),
    ],
)
def test_malformed_dns_service_ip(value, fragment):
    assert_error(problems(**svc("10.0.0.0/16", value)), "dns-service-ip", fragment)


def test_netmask_notation_is_accepted():
    assert parse_network({**OVERLAY, "pod-cidr": "10.244.0.0/255.255.0.0"}).pod_cidr == IPv4Network("10.244.0.0/16")


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("vni", 0, "out of range"),
        ("vni", 2**24, "out of range"),
        ("vxlan-port", 70000, "out of range"),
        ("mtu", 100, "out of range"),
        ("mtu", "big", "not a whole number"),
        ("non-masquerade-cidrs", 5, "is not a list of CIDRs"),
        ("non-masquerade-cidrs", "10.0.0.0/8,bad", "'bad' is not a valid CIDR"),
    ],
)
def test_other_settings(field, value, fragment):
    assert_error(problems(**{field: value}), field, fragment)


def test_mtu_and_non_masquerade_values():
    net = parse_network({**OVERLAY, "mtu": "1400", "non-masquerade-cidrs": "10.0.0.0/8, 192.168.0.0/16"})
    assert net.mtu == 1400 and net.pod_mtu(1500) == 1400
    assert net.non_masquerade_cidrs == (IPv4Network("10.0.0.0/8"), IPv4Network("192.168.0.0/16"))
    auto = parse_network({**OVERLAY, "mtu": "auto"})
    assert auto.pod_mtu(1500) == 1450
    assert parse_network({**OVERLAY, "backend": "direct"}).pod_mtu(1500) == 1500


def test_unknown_setting():
    assert_error(problems(pod_cdir="10.244.0.0/16"), "pod-cdir", "is not a known setting")


def test_non_string_key_is_an_error_not_a_crash():
    _, errors, _ = check_network({**OVERLAY, 1: "x"})  # type: ignore[dict-item]
    assert_error(errors, "1", "is not a known setting")


def test_same_setting_spelled_twice():
    assert_error(problems(pod_cidr="10.244.0.0/16", **{"pod-cidr": "10.245.0.0/16"}), "pod-cidr", "given twice")


def test_none_counts_as_not_given():
    assert parse_network({**OVERLAY, "pod-cidr": None}).pod_cidr == IPv4Network("10.244.0.0/16")


# ----- warnings and collection ----------------------------------------------------------------------


@pytest.mark.parametrize("pod", ["20.0.0.0/16", "8.8.0.0/16", "100.128.0.0/16"])
def test_public_pod_cidr_is_a_warning_not_an_error(pod):
    net = parse_network({**OVERLAY, "pod-cidr": pod})
    assert len(net.warnings) == 1 and f"--pod-cidr {pod} is not an RFC 1918 or RFC 6598 range" in net.warnings[0]


@pytest.mark.parametrize("pod", ["10.244.0.0/16", "172.16.0.0/16", "192.168.0.0/16", "100.64.0.0/10"])
def test_private_pod_cidr_has_no_warning(pod):
    assert parse_network({**OVERLAY, "pod-cidr": pod}).warnings == ()


def test_warning_rides_along_with_errors():
    _, errors, warnings = check_network({**OVERLAY, "pod-cidr": "20.0.0.0/16", "max-pods": 5})
    assert errors and len(warnings) == 1


def test_all_errors_are_collected():
    raw = {
        "network-plugin": "azure",  # and no overlay mode, with --pod-cidr
        "pod-cidr": "10.224.128.0/17",  # overlaps the VNet
        "service-cidr": "10.0.0.0/16",
        "dns-service-ip": "10.0.0.1",  # kubernetes.default
        "max-pods": 500,
        "vni": "x",
        "vxlan-port": 0,
        "backend": "geneve",
    }
    with pytest.raises(ConfigError) as info:
        parse_network(raw)
    fields = [e.field for e in info.value.errors]
    assert set(fields) == {
        "network-plugin-mode", "pod-cidr", "dns-service-ip", "max-pods", "vni", "vxlan-port", "backend"
    }
    assert "--pod-cidr 10.224.128.0/17 overlaps --vnet-cidr 10.224.0.0/12" in str(info.value)


def test_malformed_and_rule_errors_are_collected_together():
    errors = problems(pod_cidr="abc", vnet_cidr="10.224.0.1/12", **svc("10.0.0.0/16", "10.0.0.0"))
    assert {e.field for e in errors} == {"pod-cidr", "vnet-cidr", "dns-service-ip"}


ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.from_regex(r"\A[0-9]{1,3}(\.[0-9]{1,3}){3}(/[0-9]{1,2})?\Z"),
    st.lists(st.text(max_size=20), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE, max_size=len(FIELDS)))
def test_any_input_gives_errors_naming_known_fields_never_an_exception(raw):
    net, errors, warnings = check_network(raw)
    assert (net is None) == bool(errors)
    for e in errors:
        assert e.field in FIELDS and e.message.startswith(f"--{e.field}"), e


def test_check_network_matches_parse_network():
    net, errors, warnings = check_network({**OVERLAY, "pod-cidr": "20.0.0.0/16"})
    assert net == parse_network({**OVERLAY, "pod-cidr": "20.0.0.0/16"}) and errors == [] and len(warnings) == 1


def test_field_errors_use_known_field_names():
    errors = problems(pod_cidr="abc", max_pods=1, node_cidr_size=40, vni=-1, mtu=1, backend="x", vxlan_port="y")
    assert {e.field for e in errors} <= set(FIELDS)
    assert all(e.to_dict().keys() == {"field", "message"} for e in errors)


# ----- round trips -------------------------------------------------------------------------------------


ROUND_TRIP = [
    {},
    {**OVERLAY, "pod-cidr": "100.64.0.0/12", "node-cidr-size": 26, "max-pods": 30, "mtu": 1400},
    {"network-plugin": "kubenet", "pod-cidr": "10.244.0.0/16", "backend": "direct", "vni": 7, "vxlan-port": 8472},
    {"network-plugin": "azure"},  # flat: no pod CIDR
    {**OVERLAY, "non-masquerade-cidrs": "10.0.0.0/8,172.16.0.0/12", "vnet-cidr": "192.168.0.0/16",
     "node-subnet-cidr": "192.168.1.0/24", "service-cidr": "10.96.0.0/12", "dns-service-ip": "10.96.0.10"},
]


@pytest.mark.parametrize("raw", ROUND_TRIP)
def test_to_dict_round_trips(raw):
    net = parse_network(raw)
    assert parse_network(net.to_dict()) == net
    assert parse_network(json.loads(net.to_json())) == net
    assert set(net.to_dict()) <= set(FIELDS)


def test_to_dict_uses_flag_names_and_strings():
    d = parse_network({}).to_dict()
    assert d["pod-cidr"] == "10.244.0.0/16" and d["dns-service-ip"] == "10.0.0.10" and d["max-pods"] == DEFAULT_MAX_PODS


# ----- pod CIDR expansion -------------------------------------------------------------------------------


def test_expansion_to_a_superset():
    old = parse_network({})
    new = validate_expansion(old, "10.244.0.0/15")
    assert new.pod_cidr == IPv4Network("10.244.0.0/15") and new.block_count == 512
    assert new.with_pod_cidr(old.pod_cidr) == old


@pytest.mark.parametrize("cidr", ["10.245.0.0/16", "10.244.0.0/17", "10.250.0.0/15"])
def test_expansion_to_a_non_superset_rejected(cidr):
    with pytest.raises(ConfigError) as info:
        validate_expansion(parse_network({}), cidr)
    assert_error(info.value.errors, "pod-cidr", "is not a superset of the current 10.244.0.0/16")


def test_expansion_to_the_same_range_rejected():
    with pytest.raises(ConfigError) as info:
        validate_expansion(parse_network({}), "10.244.0.0/16")
    assert_error(info.value.errors, "pod-cidr", "is the current pod CIDR")


def test_expansion_with_host_bits_suggests_the_network():
    with pytest.raises(ConfigError) as info:
        validate_expansion(parse_network({}), "10.245.0.0/15")
    assert_error(info.value.errors, "pod-cidr", "did you mean 10.244.0.0/15?")


def test_expansion_into_the_vnet_rejected():
    old = parse_network({**OVERLAY, "pod-cidr": "10.240.0.0/16"})
    with pytest.raises(ConfigError) as info:
        validate_expansion(old, "10.224.0.0/11")
    assert_error(info.value.errors, "pod-cidr", "overlaps --vnet-cidr 10.224.0.0/12")


def test_expansion_of_flat_network_rejected():
    with pytest.raises(ConfigError) as info:
        validate_expansion(parse_network({"network-plugin": "azure"}), "10.244.0.0/15")
    assert_error(info.value.errors, "pod-cidr", "flat Azure CNI")


# ----- files and merging ------------------------------------------------------------------------------------


def test_load_yaml_file(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text("network:\n  network-plugin: azure\n  network_plugin_mode: overlay\n  pod-cidr: 10.240.0.0/16\n")
    assert parse_network(load_file(path)).pod_cidr == IPv4Network("10.240.0.0/16")


def test_load_json_file(tmp_path):
    path = tmp_path / "net.json"
    path.write_text(json.dumps(parse_network({"network-plugin": "kubenet"}).to_dict()))
    assert parse_network(load_file(path)).network_plugin == "kubenet"


@pytest.mark.parametrize(
    "content,fragment", [("a: [1\n", "is not valid YAML/JSON at line"), ("- 1\n- 2\n", "must hold a mapping")]
)
def test_bad_files(tmp_path, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert_error(info.value.errors, "file", fragment)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_file(tmp_path / "nope.yaml")
    assert_error(info.value.errors, "file", "cannot read it")


def test_binary_file(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_bytes(b"\xff\xfe\x00pod-cidr")
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert_error(info.value.errors, "file", "is not UTF-8 text")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_any_file_content_loads_or_is_a_file_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("f") / "net.yaml"
    path.write_bytes(content)
    try:
        data = load_file(path)
    except ConfigError as exc:
        assert [e.field for e in exc.errors] == ["file"]
    else:
        check_network(data)  # whatever it holds: errors, never an exception


def test_merge_settings_later_layers_win():
    merged = merge_settings({"pod_cidr": "10.1.0.0/16", "max-pods": 30}, {"--pod-cidr": "10.2.0.0/16", "max_pods": None})
    assert merged == {"pod-cidr": "10.2.0.0/16", "max-pods": 30}


# ----- CIDR arithmetic: properties against brute force -------------------------------------------------------

# Small networks inside 10.0.0.0/20 so that random pairs often overlap and
# every address set stays small enough to enumerate.
BASE = int(IPv4Address("10.0.0.0"))


@st.composite
def small_networks(draw, min_prefix: int = 22) -> IPv4Network:
    prefix = draw(st.integers(min_value=min_prefix, max_value=32))
    offset = draw(st.integers(min_value=0, max_value=(1 << 12) - 1))
    size = 1 << (32 - prefix)
    return IPv4Network((BASE + offset // size * size, prefix))


def addresses(net: IPv4Network) -> set[int]:
    first = int(net.network_address)
    return set(range(first, first + net.num_addresses))


@settings(max_examples=200, deadline=None)
@given(small_networks(min_prefix=20), st.integers(min_value=16, max_value=32))
def test_count_blocks_matches_enumeration(net, block):
    expected = len(list(net.subnets(new_prefix=block))) if block >= net.prefixlen else 0
    assert count_blocks(net, block) == expected


@settings(max_examples=200, deadline=None)
@given(small_networks(), st.integers(min_value=22, max_value=32))
def test_count_blocks_times_block_size_covers_the_network(net, block):
    n = count_blocks(net, block)
    assert n == 0 or n * (1 << (32 - block)) == net.num_addresses


@settings(max_examples=300, deadline=None)
@given(small_networks(), small_networks())
def test_overlaps_matches_address_sets(a, b):
    assert overlaps(a, b) == bool(addresses(a) & addresses(b))
    assert overlaps(a, b) == overlaps(b, a)


@settings(max_examples=300, deadline=None)
@given(small_networks(), small_networks())
def test_contains_matches_address_sets(a, b):
    assert contains(a, b) == (addresses(b) <= addresses(a))
    if contains(a, b):
        assert overlaps(a, b)
    assert contains(a, a)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=0, max_value=32))
def test_is_private_means_inside_one_private_range(addr, prefix):
    net = IPv4Network((addr, prefix), strict=False)
    first, last = net.network_address, net.broadcast_address
    expected = any(first in p and last in p for p in PRIVATE_RANGES)
    assert is_private(net) == expected


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=32))
def test_usable_subnet_ips_reserves_five(prefix):
    net = IPv4Network((0, prefix))
    assert usable_subnet_ips(net) == max(0, net.num_addresses - 5)


@settings(max_examples=150, deadline=None)
@given(small_networks(min_prefix=8), st.sampled_from(["host", "ok"]))
def test_parsed_cidr_round_trips_or_suggests_its_network(net, kind):
    """Any network parses to itself; with a host bit set the error names
    the network it belongs to."""
    if net.prefixlen == 32 and kind == "host":
        return
    text = str(net) if kind == "ok" else f"{net.network_address + 1}/{net.prefixlen}"
    _, errors, _ = check_network({"network-plugin": "kubenet", "vnet-cidr": "192.168.0.0/16",
                                  "node-subnet-cidr": "192.168.0.0/24", "non-masquerade-cidrs": [text]})
    if kind == "ok":
        assert errors == []
    else:
        assert_error(errors, "non-masquerade-cidrs", f"did you mean {net}?")


def test_cluster_network_is_hashable_and_comparable():
    assert {parse_network({}), parse_network({})} == {ClusterNetwork()}


def test_wireguard_backend_port_and_mtu():
    net = parse_network({"backend": "wireguard"})
    assert net.wireguard_port == 51820 and net.overhead == 60 and net.pod_mtu(1500) == 1440
    assert parse_network({"backend": "wireguard", "wireguard-port": "51999"}).to_dict()["wireguard-port"] == 51999
    with pytest.raises(ConfigError) as exc:
        parse_network({"backend": "wireguard", "wireguard-port": "0"})
    assert [e.field for e in exc.value.errors] == ["wireguard-port"]
    with pytest.raises(ConfigError) as exc:
        parse_network({"backend": "ipsec"})
    assert "wireguard" in str(exc.value.errors[0])
