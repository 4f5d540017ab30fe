"""A malformed record never stops a node (issue 10, item 3): the agent with
the in-memory data plane and a real SQLite store meets a bad node record (node
watch, resync, start), a bad allocation (resync, policy controller) and a bad
policy record (policy controller). Each bad record is skipped with one log
line naming its key and counted once in ``overlaycni_bad_records_total{kind}``;
every good record is still programmed. Each kind runs three ways: the good
record alone (programmed), the bad one alone (counted), both together."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlaycni import ipam
from overlaycni.dataplane import vtep_mac
from overlaycni.datastore.keys import ip_key, node_key, policy_key
from tests.unit.test_agent import (  # noqa: F401 (cluster is a fixture)
    add_web_pod,
    cluster,
    cni,
    deny_web,
    isolated,
    start_agent,
    wait_for,
)

WAYS = ["good-alone", "bad-alone", "both"]


def bad_count(agent, kind: str) -> float:
    return agent.metrics.registry.get_sample_value("overlaycni_bad_records_total", {"kind": kind}) or 0.0


def logged(caplog, key: str) -> int:
    return sum(1 for r in caplog.records if r.levelno >= logging.WARNING and key in r.getMessage())


@pytest.mark.parametrize("way", WAYS)
def test_bad_node_record(cluster, tmp_path, caplog, way):  # noqa: F811
    url, store = cluster
    bad_key, bad_value = node_key("c1", "n3"), '{"name": "n3", "node_ip": "10.224.0.400", "block": "10.244.9.0/24"}'
    a1, dp1 = start_agent(url, tmp_path, "n1", "10.224.0.4")
    a2 = dp2 = None
    try:
        if way != "good-alone":
            store.put(bad_key, bad_value)  # arrives through the node watch
        if way != "bad-alone":
            good = ipam.register_node(store, "c1", "n2", IPv4Address("10.224.0.5"), vtep_mac=vtep_mac(IPv4Address("10.224.0.5")))
            assert wait_for(lambda: any(p.name == "n2" for p in a1.state.peers))
            assert good.block in dp1.kernel.routes  # the good peer's route reached the (fake) kernel
        if way != "good-alone":
            assert wait_for(lambda: bad_count(a1, "node") == 1)
        a1.node.resync()  # the resync meets it too: skipped, not counted again, not fatal
        a1.node.resync()
        assert bad_count(a1, "node") == (0 if way == "good-alone" else 1)
        assert logged(caplog, bad_key) == (0 if way == "good-alone" else 1)
        assert {p.name for p in a1.state.peers} == ({"n2"} if way != "bad-alone" else set())
        # a new agent starts with the bad record in the store (its first resync must not fail)
        a2, dp2 = start_agent(url, tmp_path, "n4", "10.224.0.6")
        assert {p.name for p in a2.state.peers} == ({"n1", "n2"} if way != "bad-alone" else {"n1"})
        assert bad_count(a2, "node") == (0 if way == "good-alone" else 1)
        assert a1.health()["ready"] and a2.health()["ready"]
        if way != "good-alone":
            text = a1.metrics.exposition().decode()
            assert 'overlaycni_bad_records_total{kind="node"} 1.0' in text
            assert a1.health()["bad_records"] == {"node": 1}
    finally:
        if a2 is not None:
            a2.shutdown()
        a1.shutdown()


@pytest.mark.parametrize("way", WAYS)
def test_bad_allocation_record(cluster, tmp_path, caplog, way):  # noqa: F811
    url, store = cluster
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    try:
        block = ipam.get_node(store, "c1", "n1").block
        bad_key = ip_key("c1", "n1", block.network_address + 200)
        if way != "bad-alone":
            code, res = cni(agent, "ADD", cid="good")
            assert code == 0, res
            route = IPv4Network(res["ips"][0]["address"].split("/")[0] + "/32")
            dp.kernel.routes.pop(route)  # lost behind the agent's back: only a resync brings it back
        if way != "good-alone":
            store.put(bad_key, "not json")
        agent.node.resync()
        agent.node.resync()
        if way != "bad-alone":
            assert route in dp.kernel.routes
            assert [str(p.ip) for p in agent.state.pods] == [str(route.network_address)]
        assert bad_count(agent, "allocation") == (0 if way == "good-alone" else 1)
        assert logged(caplog, bad_key) == (0 if way == "good-alone" else 1)
        assert agent.node.last_error is None and agent.health()["ready"]
        assert agent.node.policy.last_error is None  # the policy controller skips it too
    finally:
        agent.shutdown()


@pytest.mark.parametrize("way", WAYS)
def test_bad_policy_record(cluster, tmp_path, caplog, way):  # noqa: F811
    url, store = cluster
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    bad_key = policy_key("c1", namespace="default", name="broken")
    try:
        ip = add_web_pod(agent, store)
        if way != "good-alone":
            store.put(bad_key, '{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "spec": 7}')
        if way != "bad-alone":
            deny_web(store)
            assert wait_for(lambda: isolated(dp, ip))  # the good policy is programmed
        if way != "good-alone":
            assert wait_for(lambda: bad_count(agent, "policy") == 1)
            assert wait_for(lambda: agent.node.policy.passes["full"] >= 1)
            if way == "bad-alone":
                assert not isolated(dp, ip)
        agent.node.policy.sync(full=True)  # another pass: skipped again, not counted again
        assert bad_count(agent, "policy") == (0 if way == "good-alone" else 1)
        assert logged(caplog, bad_key) == (0 if way == "good-alone" else 1)
        assert agent.node.policy.last_error is None
    finally:
        agent.shutdown()
