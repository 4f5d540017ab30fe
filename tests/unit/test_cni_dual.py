"""Dual-stack on the CNI path without root: the result and request model,
the data plane engine on the in-memory kernel, and the agent driven through
the real shim (tests/kernel/test_cni_dual.py runs the same on the kernel)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, IPv6Network

import pytest

from overlaycni import ipam
from overlaycni.cni.protocol import CNIRequest, add_result, prev_result_problems
from overlaycni.config import parse_network
from overlaycni.dataplane import FakeDataplane, host_veth_name
from overlaycni.dataplane.engine import NODE_SYSCTLS_V6
from overlaycni.dataplane.model import NodeState, PodEndpoint, Route, validate_state
from overlaycni.errors import CNIError, ConfigError
from overlaycni.families import PodAddress

from .test_agent import cni, drained, start_agent

V4 = PodAddress(IPv4Interface("10.244.1.5/24"), IPv4Address("10.244.1.1"))
V6 = PodAddress(IPv6Interface("fd12:3456:789a:0:1::5/80"), IPv6Address("fe80::1"))
BLOCK6 = IPv6Network("fd12:3456:789a:0:1::/80")
NETNS = "/var/run/netns/p1"


# ----- the result and the request ----------------------------------------------------------


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_result_lists_both_families_ipv4_first(version):
    res = add_result(version, host_veth="ocx", host_mac="02:00:00:00:00:01", ifname="eth0", mac="02:00:00:00:00:02",
                     mtu=1450, sandbox=NETNS, addresses=(V4, V6))
    legacy = not version.startswith("1.")
    want = [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1},
            {"address": "fd12:3456:789a:0:1::5/80", "gateway": "fe80::1", "interface": 1}]
    if legacy:
        want = [{"version": "4", **want[0]}, {"version": "6", **want[1]}]
    assert res["ips"] == want
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0", "gw": "fe80::1"}]
    single = add_result(version, host_veth="ocx", host_mac="m", ifname="eth0", mac="m", mtu=1450, sandbox=NETNS,
                        addresses=(V4,))
    assert single["ips"] == want[:1] and single["routes"] == res["routes"][:1]


def req(ips=None, args=None) -> CNIRequest:
    config = {"runtimeConfig": {"ips": ips}} if ips is not None else {}
    return CNIRequest(command="ADD", version="1.1.0", config=config, container_id="c", ifname="eth0", netns=NETNS,
                      args=args or {})


def test_the_ips_capability_takes_one_address_per_family():
    assert req(["fd12::9/80", "10.244.1.9/24"]).requested_ips == (IPv4Address("10.244.1.9"), IPv6Address("fd12::9"))
    assert req(["fd12::9"]).requested_ip is None
    assert req(["10.244.1.9"], {"IP": "10.244.1.9"}).requested_ips == (IPv4Address("10.244.1.9"),)  # the same twice
    assert req(args={"IP": "10.244.1.9,fd12::9"}).requested_ips == (IPv4Address("10.244.1.9"), IPv6Address("fd12::9"))
    for bad, words in ((["10.244.1.9", "10.244.1.10"], "both IPv4"), (["fd12::9", "fd12::a"], "both IPv6"),
                       (["nope"], "not an IP address"), ("10.244.1.9", "not a list")):
        with pytest.raises(CNIError) as err:
            _ = req(bad).requested_ips
        assert err.value.cni_code == 7 and words in err.value.message


def test_prev_result_must_hold_each_family():
    res = add_result("1.1.0", host_veth="ocx", host_mac="m", ifname="eth0", mac="m", mtu=1450, sandbox=NETNS,
                     addresses=(V4, V6))
    assert prev_result_problems(res, (V4, V6)) == []
    assert prev_result_problems({**res, "ips": res["ips"][:1]}, (V4, V6)) == [
        "prevResult has no IPv6 address; the reservation is fd12:3456:789a:0:1::5/80"]
    other = {**res, "ips": [res["ips"][0], {**res["ips"][1], "address": "fd12:3456:789a:0:1::6/80"}]}
    assert "does not match the reservation fd12:3456:789a:0:1::5/80" in prev_result_problems(other, (V4, V6))[0]
    assert prev_result_problems(res, (V4,)) == ["prevResult address fd12:3456:789a:0:1::5/80 is not one of this attachment's"]
    gw = {**res, "ips": [res["ips"][0], {**res["ips"][1], "gateway": "fe80::2"}]}
    assert prev_result_problems(gw, (V4, V6)) == ["prevResult gateway fe80::2 of fd12:3456:789a:0:1::5/80 is not fe80::1"]


# ----- the data plane engine on the fake kernel ---------------------------------------------


ME = IPv4Address("10.224.0.4")


def node(*pods: PodEndpoint, block_v6: IPv6Network | None = BLOCK6) -> NodeState:
    return NodeState(node_ip=ME, block=V4.ip.network, pod_cidr=V4.ip.network.supernet(8), block_v6=block_v6,
                     pod_cidr_v6=block_v6.supernet(16) if block_v6 else None, pods=pods)


def ready(block_v6: IPv6Network | None = BLOCK6) -> FakeDataplane:
    """A fake node reconciled once (its nftables table exists)."""
    dp = FakeDataplane(underlay_ip=ME)
    assert not dp.reconcile(node(block_v6=block_v6)).errors
    return dp


def attach(dp: FakeDataplane, *addresses: PodAddress, cid: str = "c1"):
    return dp.attach_pod(container_id=cid, ifname="eth0", netns_path=NETNS, addresses=addresses, mtu=1450)


def test_attach_check_detach_both_families():
    dp = ready()
    pod = attach(dp, V4, V6)
    host = host_veth_name("c1", "eth0")
    assert pod.addresses == (V4, V6)
    k = dp.kernel
    assert Route(dst=IPv6Network("fd12:3456:789a:0:1::5/128"), dev=host, scope_link=True) in k.routes.values()
    assert IPv6Interface("fe80::1/64") in k.addresses[host]
    assert k.sysctls["net/ipv6/conf/all/forwarding"] == "1"
    assert k.nft.sets["pod_endpoints"] == frozenset({(host, V4.ip.ip)})  # the ip table checks IPv4 only
    view = k.netns[NETNS].links["eth0"]
    assert view.addresses == (V4.ip, V6.ip)
    assert Route(dst=IPv6Network("::/0"), dev="eth0", gateway=V6.gateway) in view.routes
    assert dp.check_pod(container_id="c1", ifname="eth0", netns_path=NETNS, addresses=(V4, V6)) == []
    del k.addresses[host][IPv6Interface("fe80::1/64")]
    assert dp.check_pod(container_id="c1", ifname="eth0", netns_path=NETNS, addresses=(V4, V6)) == [
        f"gateway fe80::1 is missing on host veth {host}"]
    dp.detach_pod(container_id="c1", ifname="eth0", netns_path=NETNS)
    assert not [r for r in k.routes.values() if r.dev == host]
    problems = dp.check_pod(container_id="c1", ifname="eth0", netns_path=NETNS, addresses=(V4, V6))
    assert f"node route fd12:3456:789a:0:1::5/128 dev {host} is missing" in problems


def test_single_stack_attach_touches_no_ipv6():
    dp = ready(block_v6=None)
    attach(dp, V4)
    assert dp.kernel.sysctls.get("net/ipv6/conf/all/forwarding") is None
    assert all(r.dst.version == 4 for r in dp.kernel.routes.values())
    assert all(a.version == 4 for a in dp.kernel.addresses[host_veth_name("c1", "eth0")])


@pytest.mark.parametrize("addresses, words", [
    ((V6,), "need one IPv4 address"),
    ((V6, V4), "need one IPv4 address"),
    ((V4, V4), "need one IPv4 address"),
    ((V4, PodAddress(V6.ip, IPv6Address("fd12::1"))), "nor a link-local address"),
    ((PodAddress(V4.ip, V4.ip.ip), V6), "not another address"),
])
def test_attach_refuses_bad_address_sets(addresses, words):
    dp = ready()
    with pytest.raises(ConfigError, match=words):
        attach(dp, *addresses)
    assert dp.list_pod_veths() == []


def test_reconcile_keeps_ipv6_pod_routes_and_forwarding():
    dp = ready()
    attach(dp, V4, V6)
    host = host_veth_name("c1", "eth0")
    state = node(PodEndpoint(V4.ip.ip, host, ip_v6=V6.ip.ip))
    dp.kernel.sysctls["net/ipv6/conf/all/forwarding"] = "0"
    del dp.kernel.routes[IPv6Network("fd12:3456:789a:0:1::5/128")]
    report = dp.reconcile(state)
    assert not report.errors, report.errors
    assert IPv6Network("fd12:3456:789a:0:1::5/128") in dp.kernel.routes
    assert dp.kernel.sysctls["net/ipv6/conf/all/forwarding"] == NODE_SYSCTLS_V6["net/ipv6/conf/all/forwarding"]
    assert dp.reconcile(state).changes == []  # converged: the IPv6 route compares equal to itself
    with pytest.raises(ConfigError, match="outside this node's blocks"):
        validate_state(node(PodEndpoint(V4.ip.ip, host, ip_v6=V6.ip.ip), block_v6=None))
    with pytest.raises(ConfigError, match="outside the IPv6 block"):
        validate_state(node(PodEndpoint(V4.ip.ip, host, ip_v6=IPv6Address("fd99::5"))))


# ----- the agent, through the shim ----------------------------------------------------------


@pytest.fixture()
def dual(tmp_path):
    from overlaycni.datastore import open_datastore

    url = f"sqlite://{tmp_path}/state.db"
    store = open_datastore(url)
    ipam.create_cluster(store, "c1", parse_network({"network-plugin": "azure", "network-plugin-mode": "overlay",
                                                     "ip-families": "ipv4,ipv6"}))
    yield url, store
    store.close()


def test_agent_add_check_del_in_a_dual_stack_cluster(dual, tmp_path):
    url, store = dual
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    try:
        code, res = cni(agent, "ADD")
        assert code == 0, res
        node = ipam.get_node(store, "c1", "n1")
        assert [e["address"] for e in res["ips"]] == [f"{node.block.network_address + 2}/24",
                                                       f"{node.block_v6.network_address + 2}/80"]
        assert cni(agent, "CHECK", prevResult=res) == (0, None)
        v4_only = {**res, "ips": res["ips"][:1]}
        code, out = cni(agent, "CHECK", prevResult=v4_only)
        assert code != 0 and "no IPv6 address" in out["msg"]
        code, out = cni(agent, "ADD", cid="x", runtimeConfig={"ips": ["10.244.0.9", "10.244.0.10"]})
        assert code != 0 and out["code"] == 7
        assert cni(agent, "DEL") == (0, None)
        assert drained(agent)
        assert ipam.list_allocations(store, "c1") == [] and dp.list_pod_veths() == []
    finally:
        agent.shutdown()


def test_agent_refuses_an_ipv6_address_in_a_single_stack_cluster(tmp_path):
    from overlaycni.datastore import open_datastore

    url = f"sqlite://{tmp_path}/state.db"
    store = open_datastore(url)
    ipam.create_cluster(store, "c1", parse_network({"network-plugin": "azure", "network-plugin-mode": "overlay"}))
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    try:
        code, out = cni(agent, "ADD", runtimeConfig={"ips": ["fd12::5"]})
        assert code != 0 and out["code"] == 7 and "single-stack" in out["msg"], out
        assert ipam.list_allocations(store, "c1") == [] and dp.list_pod_veths() == []
        code, res = cni(agent, "ADD", cid="ok")  # control
        assert code == 0 and len(res["ips"]) == 1, res
    finally:
        agent.shutdown()
        store.close()
    assert json.loads(json.dumps(res))["routes"] == [{"dst": "0.0.0.0/0", "gw": res["ips"][0]["gateway"]}]


# ----- the pods' IPv6 guard on a dual-stack node --------------------------------------------


def test_ipv6_guard_lets_a_pods_own_address_and_link_local_nd_through():
    from overlaycni.dataplane import nftables, nftmodel6

    single = nftmodel6.Ip6Table().layout()
    assert nftmodel6.Ip6Table(pod_endpoints=frozenset({("ocx", V6.ip.ip)})).layout() == single  # single-stack: as before
    t = nftmodel6.Ip6Table(pod_cidr=BLOCK6.supernet(16), pod_endpoints=frozenset({("ocx", V6.ip.ip)}))
    layout = t.layout()
    assert layout.fingerprint() != single.fingerprint() and t.sets()["pod_endpoints"] == frozenset({("ocx", V6.ip.ip)})
    own, nd, multicast, rest = next(rules for c, rules in layout.chains if c["name"] == "from_pod")
    assert own[-1] == nd[-1] == {"return": None}
    assert own[0]["match"]["right"] == "@pod_endpoints" and '"saddr"' in json.dumps(own[0])
    assert nd[0] == nftables.match(nftables.payload("ip6", "saddr"), {"prefix": {"addr": "fe80::", "len": 64}})
    assert set(nd[2]["match"]["right"]["set"]) == {"nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert"}
    assert (multicast[-1], rest[-1]) == ({"drop": None}, {"drop": None})  # the drops stay, after


def test_dual_stack_pod_elements_in_the_ip6_table():
    dp = ready()
    k = dp.kernel
    attach(dp, V4, V6)
    host = host_veth_name("c1", "eth0")
    ip6 = k.nft_table("ip6", "overlaycni")
    assert ip6 is not None and ip6.sets["pod_endpoints"] == frozenset({(host, V6.ip.ip)})
    assert (host, V6.ip.ip) not in k.nft.sets["pod_endpoints"]  # IPv6 never enters the ip table
    ip6.sets["pod_endpoints"] = frozenset()  # drift
    assert dp.check_pod(container_id="c1", ifname="eth0", netns_path=NETNS, addresses=(V4, V6)) == [
        f"anti-spoofing element {host} . {V6.ip.ip} is missing from ip6 pod_endpoints"]
    state = node(PodEndpoint(V4.ip.ip, host, ip_v6=V6.ip.ip))
    report = dp.reconcile(state)
    assert any("ip6 pod_endpoints" in c for c in report.changes), report.changes
    assert k.nft_table("ip6", "overlaycni").sets["pod_endpoints"] == frozenset({(host, V6.ip.ip)})
    dp.detach_pod(container_id="c1", ifname="eth0", netns_path=NETNS)
    assert k.nft_table("ip6", "overlaycni").sets["pod_endpoints"] == frozenset()
    single = ready(block_v6=None)
    assert "pod_endpoints" not in single.kernel.nft_table("ip6", "overlaycni").sets
