"""A dual-stack node's IPv6 underlay address: in its node record (written
only when it has one), checked at registration, found on the underlay by
the agent (or given with ``--node-ip-v6``), and in every peer's desired
state, from which the data plane routes (direct) and filters."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, IPv6Network

import pytest

from overlaycni import ipam
from overlaycni.agent.daemon import Agent
from overlaycni.agent.desired import node_state, peer_of
from overlaycni.agent.node import AgentOptions
from overlaycni.config import parse_network
from overlaycni.dataplane import FakeDataplane
from overlaycni.dataplane.model import VXLAN_IFNAME
from overlaycni.datastore import KV, open_datastore
from overlaycni.datastore.keys import node_key
from overlaycni.errors import BadRecord, ConfigError

from .test_agent import wait_for

DUAL = {"network-plugin": "azure", "network-plugin-mode": "overlay", "ip-families": "ipv4,ipv6"}
SINGLE = {"network-plugin": "azure", "network-plugin-mode": "overlay"}
N1, N2 = IPv4Address("10.224.0.4"), IPv4Address("10.224.0.5")
N1_6, N2_6 = IPv6Address("fd00:10:224::4"), IPv6Address("fd00:10:224::5")


@pytest.fixture
def store(tmp_path):
    s = open_datastore(f"sqlite://{tmp_path}/state.db")
    ipam.create_cluster(s, "dual", parse_network(DUAL))
    ipam.create_cluster(s, "single", parse_network(SINGLE))
    yield s
    s.close()


def test_the_record_carries_the_ipv6_node_address_when_there_is_one(store):
    rec = ipam.register_node(store, "dual", "n1", N1, node_ip_v6=N1_6)
    assert rec.node_ip_v6 == N1_6
    assert json.loads(store.get(node_key("dual", "n1")).value)["node_ip_v6"] == str(N1_6)
    assert ipam.get_node(store, "dual", "n1") == rec and rec.to_dict()["node_ip_v6"] == str(N1_6)
    bare = ipam.register_node(store, "dual", "n2", N2)  # no IPv6 on its underlay: the key is left out
    assert bare.node_ip_v6 is None and "node_ip_v6" not in json.loads(store.get(node_key("dual", "n2")).value)
    ipam.register_node(store, "single", "n1", N1)
    assert set(json.loads(store.get(node_key("single", "n1")).value)) == {"name", "node_ip", "block", "vtep_mac", "mtu"}


@pytest.mark.parametrize("cluster, addr, words", [
    ("single", "fd00:10:224::4", "IPv4 single-stack"),
    ("dual", "fe80::4", "not a routable unicast address"),
    ("dual", "ff02::1", "not a routable unicast address"),
    ("dual", "fd12:3456:789a::4", "inside the IPv6 pod CIDR"),
    ("dual", "fd12:3456:789a:1::4", "inside the IPv6 service CIDR"),
])
def test_a_bad_ipv6_node_address_is_refused_naming_the_flag_and_writes_nothing(store, cluster, addr, words):
    with pytest.raises(ConfigError) as err:
        ipam.register_node(store, cluster, "n1", N1, node_ip_v6=IPv6Address(addr))
    assert err.value.errors[0].field == "node-ip-v6" and words in err.value.message
    assert store.get(node_key(cluster, "n1")) is None


def test_a_record_with_a_bad_ipv6_node_address_is_a_bad_record(store):
    rec = ipam.register_node(store, "dual", "n1", N1, node_ip_v6=N1_6)
    data = {**json.loads(rec.to_json()), "node_ip_v6": "not-an-address"}
    with pytest.raises(BadRecord, match="node_ip_v6"):
        ipam.decode_node(KV(node_key("dual", "n1"), json.dumps(data), 7))


def test_desired_state_has_the_ipv6_side_in_a_dual_stack_cluster_only(store):
    net = ipam.get_cluster(store, "dual")
    me = ipam.register_node(store, "dual", "n1", N1, node_ip_v6=N1_6)
    other = ipam.register_node(store, "dual", "n2", N2, node_ip_v6=N2_6)
    state = node_state(net, me, [me, other], [])
    assert (state.block_v6, state.pod_cidr_v6, state.node_ip_v6) == (me.block_v6, net.pod_cidr_v6, N1_6)
    (peer,) = state.peers
    assert (peer.block_v6, peer.node_ip_v6) == (other.block_v6, N2_6) and peer == peer_of(other)
    assert [f.family.version for f in state.families] == [4, 6]
    s_me = ipam.register_node(store, "single", "n1", N1)
    single = node_state(ipam.get_cluster(store, "single"), s_me, [s_me], [])
    assert (single.block_v6, single.pod_cidr_v6, single.node_ip_v6) == (None, None, None) and len(single.families) == 1


def _agent(url: str, tmp_path, name: str, ip: IPv4Address, *, ip6: IPv6Address | None = None,
           on_underlay: IPv6Address | None = None) -> tuple[Agent, FakeDataplane]:
    dp = FakeDataplane(underlay_ip=ip)
    if on_underlay is not None:
        dp.kernel.addresses["eth0"][IPv6Interface(f"{on_underlay}/64")] = None
        dp.kernel.addresses["eth0"][IPv6Interface("fe80::99/64")] = None
    opts = AgentOptions(cluster="dual", node=name, node_ip=ip, node_ip_v6=ip6, datastore=url,
                        socket=str(tmp_path / f"{name}.sock"), metrics_addr=None, lease_ttl=5, resync_interval=60)
    agent = Agent(opts, store=open_datastore(url), dataplane=dp)
    agent.start()
    return agent, dp


def test_agents_publish_their_ipv6_node_address_and_program_each_other(tmp_path):
    url = f"sqlite://{tmp_path}/state.db"
    store = open_datastore(url)
    ipam.create_cluster(store, "dual", parse_network({**DUAL, "backend": "direct"}))
    a1, dp1 = _agent(url, tmp_path, "n1", N1, on_underlay=N1_6)  # found on the underlay
    a2, dp2 = _agent(url, tmp_path, "n2", N2, ip6=N2_6)  # given (--node-ip-v6)
    try:
        assert ipam.get_node(store, "dual", "n1").node_ip_v6 == N1_6
        assert ipam.get_node(store, "dual", "n2").node_ip_v6 == N2_6
        n2 = ipam.get_node(store, "dual", "n2")
        # n1's agent learns n2's record from the watch and routes n2's IPv6 block via n2's IPv6 address
        assert wait_for(lambda: a1.state is not None and [p.node_ip_v6 for p in a1.state.peers] == [N2_6])
        assert wait_for(lambda: n2.block_v6 in dp1.kernel.routes)
        assert dp1.kernel.routes[n2.block_v6].gateway == N2_6  # type: ignore[index]
        assert VXLAN_IFNAME not in dp1.kernel.links
    finally:
        a1.shutdown()
        a2.shutdown()
        store.close()


def test_a_dual_stack_agent_without_an_ipv6_address_still_starts(tmp_path):
    url = f"sqlite://{tmp_path}/state.db"
    store = open_datastore(url)
    ipam.create_cluster(store, "dual", parse_network(DUAL))
    agent, dp = _agent(url, tmp_path, "n1", N1)
    try:
        rec = ipam.get_node(store, "dual", "n1")
        assert rec.node_ip_v6 is None and rec.block_v6 is not None
        addrs = dp.kernel.addresses[VXLAN_IFNAME]
        assert IPv6Interface((rec.block_v6.network_address, 128)) in addrs and IPv4Interface((rec.block.network_address, 32)) in addrs
        assert dp.kernel.routes[IPv6Network(ipam.get_cluster(store, "dual").pod_cidr_v6)].unreachable  # type: ignore[arg-type]
    finally:
        agent.shutdown()
        store.close()


def test_node_register_takes_the_ipv6_node_address(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from overlaycni.cli.main import app

    monkeypatch.delenv("OVERLAYCNI_DATASTORE", raising=False)
    base = ["--datastore", f"sqlite://{tmp_path}/state.db"]
    runner = CliRunner()
    net = ["--network-plugin", "azure", "--network-plugin-mode", "overlay", "--ip-families", "ipv4,ipv6"]
    assert runner.invoke(app, [*base, "cluster", "create", "--name", "ds", *net]).exit_code == 0
    res = runner.invoke(app, [*base, "node", "register", "--cluster", "ds", "--name", "n1", "--node-ip", str(N1),
                              "--node-ip-v6", str(N1_6), "-o", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["node_ip_v6"] == str(N1_6), res.output
    listed = json.loads(runner.invoke(app, [*base, "node", "list", "--cluster", "ds", "-o", "json"]).stdout)
    assert [n["node_ip_v6"] for n in listed] == [str(N1_6)]
    bad = runner.invoke(app, [*base, "node", "register", "--cluster", "ds", "--name", "n2", "--node-ip", str(N2),
                              "--node-ip-v6", "fe80::5"])
    assert bad.exit_code == 2 and "--node-ip-v6" in bad.output and "routable" in " ".join(bad.output.split())
    assert [n["name"] for n in json.loads(runner.invoke(app, [*base, "node", "list", "--cluster", "ds", "-o", "json"]).stdout)] == ["n1"]


def test_a_peer_whose_ipv6_block_another_node_claims_is_left_out_alone(store):
    """Peers are chosen one by one over both families: n2's record names n3's
    IPv6 block (claimed by n3), so n2 is left out with a problem naming n3;
    n3 stays. Control: with the claims as stored, both are peers."""
    from dataclasses import replace

    from overlaycni.agent.desired import select_peers

    ipam.create_cluster(store, "dual", parse_network(DUAL))
    me, n2, n3 = (ipam.register_node(store, "dual", n, ip) for n, ip in
                  (("n1", N1), ("n2", N2), ("n3", IPv4Address("10.224.0.6"))))  # fmt: skip
    net = ipam.get_cluster(store, "dual")
    claims = ipam.cluster_nodes(store, "dual").claims
    assert n2.block_v6 in claims and [r.name for r in select_peers(net, me, [n2, n3], claims=claims).records] == ["n2", "n3"]
    forged = replace(n2, block_v6=n3.block_v6)
    sel = select_peers(net, me, [forged, n3], claims=claims)
    assert [r.name for r in sel.records] == ["n3"]
    assert len(sel.problems) == 1 and sel.problems[0].other == "n3"
    assert f"IPv6 block {n3.block_v6} is claimed by node n3" in sel.problems[0].message
