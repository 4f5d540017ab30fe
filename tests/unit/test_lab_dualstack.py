"""The dual-stack lab's pure parts (no root): addresses, the state file and
``lab status`` JSON, the CNI result, ``lab trace``'s destinations, ``lab
check``'s filters, verdicts and report, the pinger's ICMPv6 request."""

from __future__ import annotations

import json
import struct
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Interface, IPv6Network, ip_address

import pytest

from overlaycni.config import parse_network
from overlaycni.errors import UsageError
from overlaycni.lab import state as st
from overlaycni.lab import topology
from overlaycni.lab.capture import parse_tcpdump
from overlaycni.lab.check import ConnectivityReport, ExternalResult, PairResult, index_requests, underlay_filter, verify_path
from overlaycni.lab.pinger import _canonical, echo_request
from overlaycni.lab.runtime import parse_result
from overlaycni.lab.trace import parse_family, resolve_dst

DUAL = {"ip-families": "ipv4,ipv6"}


def lab(*, dual: bool = True, backend: str = "vxlan") -> st.LabState:
    net = parse_network({**(DUAL if dual else {}), "backend": backend})
    addr = topology.addressing(net)
    nodes = tuple(
        st.LabNode(f"node{i}", i, f"ocl-t.node{i}", addr.node_ip(i), block=net.families[0].block_at(i - 1),
                   ip_v6=addr.v6_of(addr.node_ip(i)), block_v6=net.families[1].block_at(i - 1) if dual else None)
        for i in (1, 2)
    )  # fmt: skip
    pods = tuple(
        st.LabPod(name, "default", f"node{i}", f"ocl-t.pod.default.{name}", f"c{i}", IPv4Interface(f"10.244.{i - 1}.2/24"),
                  ip_v6=IPv6Interface(f"fd12:3456:789a:0:{i - 1}::2/80") if dual else None)
        for i, name in ((1, "a"), (2, "b"))
    )  # fmt: skip
    return st.LabState(
        name="t", lab_dir="/tmp/t", backend=backend, store="sqlite", datastore="sqlite:///tmp/t/state.db",
        network=net.to_dict(), vnet_netns="ocl-t.vnet", external_netns="ocl-t.ext", external_ip=addr.external_ip,
        external_ip_v6=addr.v6_of(addr.external_ip), nodes=nodes, pods=pods,
    )  # fmt: skip


# --- addresses ---------------------------------------------------------------------------------


def test_each_vm_gets_the_ipv6_address_with_its_ipv4_host_number():
    addr = topology.addressing(parse_network(DUAL))
    assert addr.v6_of(addr.node_ip(1)) == IPv6Interface("fd00:10:224::4/64")
    assert addr.v6_of(addr.node_ip(3)) == IPv6Interface("fd00:10:224::6/64")
    assert addr.v6_of(addr.external_ip) == IPv6Interface("fd00:10:224::fffe/64")
    assert addr.v6_of(addr.control_ip) == IPv6Interface("fd00:10:224::fffd/64")
    custom = topology.addressing(parse_network({**DUAL, "node-subnet-cidrs": "10.224.0.0/16,fd00:aa::/64",
                                                "vnet-cidrs": "10.224.0.0/12,fd00:aa::/48"}))  # fmt: skip
    assert custom.v6_of(custom.node_ip(1)) == IPv6Interface("fd00:aa::4/64")


def test_single_stack_addressing_has_no_ipv6():
    addr = topology.addressing(parse_network({}))
    assert addr.subnet_v6 is None and addr.v6_of(addr.node_ip(1)) is None


# --- state file and status JSON -----------------------------------------------------------------


def test_dual_stack_state_round_trips_and_status_json_adds_ipv6():
    s = lab()
    assert st.from_json(st.to_json(s)) == s
    assert s.dual_stack and s.versions == (4, 6) and s.pod_cidr(6) == IPv6Network("fd12:3456:789a::/64")
    j = s.status_json()
    n1 = j["nodes"][0]
    assert (n1["ip"], n1["ipv6"], n1["block"], n1["block_v6"]) == ("10.224.0.4", "fd00:10:224::4", "10.244.0.0/24", "fd12:3456:789a::/80")
    assert [p["ipv6"] for p in j["pods"]] == ["fd12:3456:789a::2", "fd12:3456:789a:0:1::2"]
    assert j["external"] == {"netns": "ocl-t.ext", "ip": "10.224.255.254", "ipv6": "fd00:10:224::fffe"}


def test_a_state_file_without_ipv6_keys_is_a_single_stack_lab():
    d = json.loads(st.to_json(lab(dual=False)))
    for n in d["nodes"]:
        del n["ip_v6"], n["block_v6"]
    for p in d["pods"]:
        del p["ip_v6"]
    del d["external_ip_v6"]
    s = st.from_json(json.dumps(d))
    assert not s.dual_stack and s.versions == (4,) and s.pod_cidr(6) is None
    assert s.status_json()["external"]["ipv6"] is None and s.pods[0].address(6) is None


def test_cni_result_gives_both_families():
    raw = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.2/24", "gateway": "10.244.1.1"},
                                          {"address": "fd12:3456:789a:0:1::2/80", "gateway": "fe80::1"}]}  # fmt: skip
    r = parse_result(raw)
    assert r.ip == IPv4Interface("10.244.1.2/24") and r.gateway == IPv4Address("10.244.1.1")
    assert r.ip_v6 == IPv6Interface("fd12:3456:789a:0:1::2/80")
    assert parse_result({"ips": [{"address": "10.244.1.2/24"}]}).ip_v6 is None


# --- trace destinations ---------------------------------------------------------------------------


def test_trace_resolves_ipv6_destinations():
    s = lab()
    b = s.pod("b")
    assert resolve_dst(s, "fd12:3456:789a:0:1::2") == (ip_address("fd12:3456:789a:0:1::2"), b, False)
    assert resolve_dst(s, "b", 6) == (ip_address("fd12:3456:789a:0:1::2"), b, False)
    assert resolve_dst(s, "b") == (ip_address("10.244.1.2"), b, False)
    assert resolve_dst(s, "external", 6) == (ip_address("fd00:10:224::fffe"), None, True)
    assert resolve_dst(s, "fd00:10:224::fffe") == (ip_address("fd00:10:224::fffe"), None, True)
    assert resolve_dst(s, "2001:db8::1") == (ip_address("2001:db8::1"), None, False)


@pytest.mark.parametrize(
    "dual, dst, family, words",
    [
        (False, "fd12::1", None, "single-stack"),
        (True, "10.244.1.2", "ipv6", "--family is ipv6"),
        (True, "fd12::1", "ipv4", "--family is ipv4"),
    ],
)
def test_trace_destination_errors_name_the_problem(dual, dst, family, words):
    s = lab(dual=dual)
    with pytest.raises(UsageError, match=words):
        resolve_dst(s, dst, parse_family(family, s))


def test_trace_family_flag():
    assert parse_family(None, lab()) is None and parse_family("ipv6", lab()) == 6
    with pytest.raises(UsageError, match="single-stack") as e:
        parse_family("ipv6", lab(dual=False))
    assert e.value.field == "family"
    with pytest.raises(UsageError, match="not one of"):
        parse_family("inet6", lab())


# --- check: filters, verdicts, report ---------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, single",
    [("vxlan", "udp port 4789"), ("direct", "icmp and net 10.244.0.0/16"), ("wireguard", "udp port 51820 or net 10.244.0.0/16")],
)
def test_underlay_filters_single_stack_unchanged_dual_stack_adds_ipv6(backend, single):
    assert underlay_filter(lab(dual=False, backend=backend)) == single
    dual = underlay_filter(lab(backend=backend))
    assert dual == single if backend == "vxlan" else "fd12:3456:789a::/64" in dual and single in dual


VXLAN_V6 = """\
10:00:00.1 IP 10.224.0.4.40000 > 10.224.0.5.4789: VXLAN, flags [I] (0x08), vni 4096
IP6 fd12:3456:789a::2 > fd12:3456:789a:0:1::2: ICMP6, echo request, id 1, seq 1, length 64
"""


def test_ipv6_inside_vxlan_between_the_node_ips_passes_and_anything_else_fails():
    s = lab()
    a, b = s.pod("a"), s.pod("b")
    ok = {"node1": index_requests(parse_tcpdump(VXLAN_V6))}
    assert verify_path(s, a, b, ok, 6) == (True, "vxlan 10.224.0.4 -> 10.224.0.5 vni 4096")
    wrong_outer = {"node1": index_requests(parse_tcpdump(VXLAN_V6.replace("10.224.0.5.4789", "10.224.0.9.4789")))}
    assert verify_path(s, a, b, wrong_outer, 6)[0] is False
    assert verify_path(s, a, b, ok, 4) == (False, "no 10.244.0.2 -> 10.244.1.2 echo request on node1's underlay")


def test_report_names_the_family_of_each_failure_when_dual_stack():
    pairs = (PairResult("a", "b", False, True, True, "vxlan", 4), PairResult("a", "b", False, False, None, "no reply", 6))
    ext = (ExternalResult("a", True, ip_address("fd00:10:224::4"), ip_address("fd12:3456:789a::2"), 6),)
    rep = ConnectivityReport("t", "vxlan", ("a", "b"), pairs, ext, (ip_address("fd12:3456:789a::2"),))
    assert not rep.ok
    assert rep.failures() == [
        "a -> b (ipv6): no reply",
        "a -> external (ipv6): source seen fd12:3456:789a::2, expected node IP fd00:10:224::4",
        "external host saw a pod IP as source: fd12:3456:789a::2",
    ]
    j = rep.to_json()
    assert [p["family"] for p in j["pairs"]] == ["ipv4", "ipv6"] and j["external"][0]["family"] == "ipv6"
    single = ConnectivityReport("t", "vxlan", ("a", "b"), (PairResult("a", "b", False, False, None, "no reply"),), ())
    assert single.failures() == ["a -> b: no reply"]  # single-stack messages as before


def test_pinger_icmpv6_request_and_address_spelling():
    req = echo_request(7, 3, b"xy", version=6)
    assert struct.unpack("!BBHHH", req[:8]) == (128, 0, 0, 7, 3) and req[8:] == b"xy"  # the kernel sets the checksum
    assert echo_request(7, 3, b"xy")[0] == 8
    assert _canonical("fd12:3456:789a:0:0:0:0:2") == ("fd12:3456:789a::2", 6)
    assert _canonical("10.244.0.2") == ("10.244.0.2", 4)


def test_lab_blocks_and_pod_cidrs_agree():
    s = lab()
    for n in s.nodes:
        assert isinstance(n.block, IPv4Network) and n.block_v6 is not None and n.block_v6.prefixlen == 80
        assert all(p.address(6) in n.block_v6 for p in s.pods_on(n.name))


@pytest.mark.parametrize("command", [("lab", "trace"), ("lab", "probe")])
def test_help_teaches_the_family_flag(command):
    from tests.unit.test_dualstack_cli import help_text

    assert "--family" in help_text(*command) and "ipv6" in help_text(*command)
