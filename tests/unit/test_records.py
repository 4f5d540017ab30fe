"""The key layout and the one decoder per record kind: every decoder accepts
what its writer writes and turns anything else into ``BadRecord`` naming the
key, the kind and the problem (never a KeyError or a JSON traceback)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlaycni import ipam
from overlaycni.config import parse_network
from overlaycni.datastore import KV, Event
from overlaycni.datastore import keys as k
from overlaycni.errors import BadRecord
from overlaycni.ipam.model import NodeRecord
from overlaycni.ipam.records import address_value, decode_allocation, decode_block, decode_cluster, decode_node, handle_value
from overlaycni.policy import parse_policies
from overlaycni.policy.model import NamespaceInfo, PodInfo
from overlaycni.policy.records import (
    decode_namespace,
    decode_pod,
    decode_policy,
    encode,
    load_policies,
    namespace_to_dict,
    pod_to_dict,
    policy_to_dict,
)

C = "c1"
NET = parse_network({"pod-cidr": "10.244.0.0/16", "network-plugin": "azure", "network-plugin-mode": "overlay"})
NODE = NodeRecord("n1", IPv4Address("10.224.0.4"), IPv4Network("10.244.3.0/24"), "02:00:00:00:00:01")
POLICY = parse_policies(
    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n"
)[0]


def kv(key: str, value: str, rev: int = 5) -> KV:
    return KV(key, value, rev)


def test_one_root_and_every_key_under_it():
    assert k.ROOT == "/overlaycni/"
    made = [
        k.config_key(C), k.node_key(C, "n1"), k.block_key(C, IPv4Network("10.244.3.0/24")), k.nodeblock_key(C, "n1"),
        k.blockcursor_key(C), k.ip_key(C, "n1", IPv4Address("10.244.3.2")), k.handle_key(C, "cid", "eth0"),
        k.cursor_key(C, "n1"), k.policy_key(C, namespace="x", name="p"), k.pod_key(C, namespace="x", name="a"),
        k.namespace_key(C, namespace="x"),
    ]
    assert all(key.startswith(k.cluster_root(C)) and key.startswith(k.ROOT) for key in made)
    assert k.index_key(C).startswith(k.ROOT)
    kinds = [k.split_key(key).kind for key in made]
    assert kinds == ["cluster", "node", "block", "block", "block", "allocation", "allocation", "allocation",
                     "policy", "pod", "namespace"]
    assert set(kinds) == set(k.KINDS)
    assert k.split_key(k.ip_key(C, "n1", IPv4Address("10.244.3.2"))) == k.KeyParts(C, "ips", ("n1", "010.244.003.002"))
    assert k.split_key("/elsewhere/x") is None


def test_address_key_parts_sort_in_address_order_and_round_trip():
    ips = [IPv4Address("10.244.3.2"), IPv4Address("10.244.3.10"), IPv4Address("10.244.3.100")]
    parts = [k.ip_part(ip) for ip in ips]
    assert parts == sorted(parts)
    assert [k.ip_from_part(p) for p in parts] == ips
    for bad in ("10.244.3", "010.244.003.256", "a.b.c.d", "0010.1.1.1"):
        with pytest.raises(ValueError):
            k.ip_from_part(bad)


def test_good_records_decode():
    assert decode_cluster(kv(k.config_key(C), NET.to_json())) == NET
    assert decode_node(kv(k.node_key(C, "n1"), NODE.to_json())) == NODE
    assert decode_node(Event("put", k.node_key(C, "n1"), NODE.to_json(), 9)) == NODE  # a watch event too
    claim = decode_block(kv(k.block_key(C, NODE.block), "n1"))
    assert claim == decode_block(kv(k.nodeblock_key(C, "n1"), str(NODE.block))) == ipam.BlockClaim(NODE.block, "n1")
    ip = IPv4Address("10.244.3.7")
    a = decode_allocation(kv(k.ip_key(C, "n1", ip), address_value("cid", "eth0", ("x", "a"))), block=NODE.block)
    h = decode_allocation(kv(k.handle_key(C, "cid", "eth0"), handle_value("n1", ip, NODE.block, ("x", "a"))))
    assert a == h and str(a.ip) == "10.244.3.7/24" and str(a.gateway) == "10.244.3.1"
    assert (a.container_id, a.ifname, a.node, a.pod_namespace, a.pod_name) == ("cid", "eth0", "n1", "x", "a")
    pod = PodInfo("x", "a", ip, "n1", {"app": "a"})
    assert decode_pod(kv(k.pod_key(C, namespace="x", name="a"), encode(pod_to_dict(pod)))) == pod
    ns = NamespaceInfo("x", {"team": "t"})
    assert decode_namespace(kv(k.namespace_key(C, namespace="x"), encode(namespace_to_dict(ns)))) == ns
    assert decode_policy(kv(k.policy_key(C, namespace="x", name="deny"), encode(policy_to_dict(POLICY)))) == POLICY


BAD = [
    # (decoder, key, value, kind, words in the problem)
    (decode_cluster, k.config_key(C), "{", "cluster", "not valid JSON"),
    (decode_cluster, k.config_key(C), json.dumps({"pod-cidr": "10.244.0.0/33"}), "cluster", "pod-cidr"),
    (decode_node, k.node_key(C, "n1"), "[]", "node", "not a JSON object"),
    (decode_node, k.node_key(C, "n1"), json.dumps({"name": "n1", "block": "10.244.3.0/24"}), "node", "node_ip: missing"),
    (decode_node, k.node_key(C, "n1"), NODE.to_json().replace("10.224.0.4", "10.224.0.400"), "node", "node_ip"),
    (decode_node, k.node_key(C, "n1"), NODE.to_json().replace("10.244.3.0/24", "10.244.3.1/24"), "node", "block"),
    (decode_node, k.node_key(C, "n1"), NODE.to_json().replace("02:00:00:00:00:01", "zz"), "node", "vtep_mac"),
    (decode_node, k.node_key(C, "n2"), NODE.to_json(), "node", "not the key's node name"),
    (decode_block, k.nodeblock_key(C, "n1"), "10.244.3.0/33", "block", "10.244.3.0/33"),
    (decode_block, k.block_key(C, NODE.block), "", "block", "not a valid name"),
    (decode_allocation, k.ip_key(C, "n1", 7), "{}", "allocation", "container_id: missing"),
    (decode_allocation, k.ip_key(C, "n1", 7), address_value("c/d", "eth0", None), "allocation", "container_id"),
    (decode_allocation, k.ips_prefix(C, "n1") + "junk", address_value("cid", "eth0", None), "allocation", "junk"),
    (decode_allocation, k.handle_key(C, "cid", "eth0"), json.dumps({"node": "n1"}), "allocation", "ip: missing"),
    (decode_allocation, k.handle_key(C, "cid", "eth0"),
     handle_value("n1", IPv4Address("10.244.9.9"), NODE.block), "allocation", "outside its block"),
    (decode_pod, k.pod_key(C, namespace="x", name="a"), json.dumps({"name": "a"}), "pod", "pod.namespace"),
    (decode_namespace, k.namespace_key(C, namespace="x"), json.dumps({"labels": {}}), "namespace", "name"),
    (decode_policy, k.policy_key(C, namespace="x", name="p"), json.dumps({"kind": "NetworkPolicy"}), "policy", "metadata"),
    (decode_policy, k.policy_key(C, namespace="x", name="p"), "null", "policy", "not a JSON object"),
]


@pytest.mark.parametrize(("decode", "key", "value", "kind", "words"), BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_records_raise_one_typed_error(decode, key, value, kind, words):
    with pytest.raises(BadRecord) as info:
        decode(kv(key, value, 42))
    bad = info.value
    assert (bad.key, bad.kind, bad.revision) == (key, kind, 42)
    assert words in bad.problem, bad.problem
    assert key in str(bad) and kind in str(bad)


def test_decode_all_skips_and_reports_or_raises():
    good = kv(k.policy_key(C, namespace="x", name="deny"), encode(policy_to_dict(POLICY)))
    bad = kv(k.policy_key(C, namespace="x", name="zz"), "{}")
    seen: list[BadRecord] = []
    assert k.decode_all([bad, good], decode_policy, on_bad=seen.append) == [POLICY]
    assert [b.key for b in seen] == [bad.key]
    with pytest.raises(BadRecord):
        k.decode_all([good, bad], decode_policy)

    class Store:  # what load_policies needs of a store
        def list(self, prefix):
            assert prefix == k.policies_prefix(C)
            return [good, bad]

    assert load_policies(Store(), C, on_bad=seen.append) == [POLICY]
    with pytest.raises(BadRecord):
        load_policies(Store(), C)
