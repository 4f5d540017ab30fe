"""The agent's cached inventory read (``policy.stored.InventoryCache``): the
same pods, namespaces and policies as ``inventory_from_store``, bad records
skipped and reported on every read, and an unchanged record keeps its
decoded object (what lets the incremental table skip it by identity)."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from overlaycni import ipam
from overlaycni.config import parse_network
from overlaycni.datastore import open_datastore
from overlaycni.datastore.keys import ips_prefix, namespace_key, pod_key, policy_key
from overlaycni.errors import NotFound
from overlaycni.policy import parse_policies, records
from overlaycni.policy.stored import InventoryCache, inventory_from_store


@pytest.fixture()
def store(tmp_path):
    s = open_datastore(f"sqlite://{tmp_path}/state.db")
    net = {"pod-cidr": "10.244.0.0/16", "network-plugin": "azure", "network-plugin-mode": "overlay"}
    ipam.create_cluster(s, "c1", parse_network(net))
    for i, node in enumerate(("n1", "n2")):
        ipam.register_node(s, "c1", node, IPv4Address(f"10.224.0.{4 + i}"))
    for i, (ns, name) in enumerate((("x", "a"), ("x", "b"), ("y", "a"))):
        a = ipam.allocate(s, "c1", ("n1", "n2")[i % 2], f"cid{i}", "eth0", pod=(ns, name))
        put_pod(s, ns, name, {"pod": name}, ip=a.ip.ip, node=a.node)
    ipam.allocate(s, "c1", "n1", "cid-plain", "eth0")  # no pod: no policy applies
    s.put(namespace_key("c1", namespace="x"), records.encode({"name": "x", "labels": {"team": "x"}}))
    records.save_policies(s, "c1", policies=parse_policies(POLICY))
    yield s
    s.close()


POLICY = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {}}\n"


def put_pod(s, ns, name, labels, *, ip="10.244.0.9", node="n1"):
    value = {"namespace": ns, "name": name, "ip": str(ip), "node": node, "labels": labels, "ports": []}
    s.put(pod_key("c1", namespace=ns, name=name), records.encode(value))


def reference(s, bad=None):
    inv = inventory_from_store(s, "c1", on_bad=bad)
    return list(inv.pods), list(inv.namespaces), list(inv.policies)


def test_same_inventory_and_objects_kept_while_unchanged(store):
    cache = InventoryCache()
    first = cache.load(store, "c1")
    assert first == reference(store)
    again = cache.load(store, "c1")
    assert again == first
    assert all(a is b for a, b in zip(again[0], first[0], strict=True))  # pods
    assert all(a is b for a, b in zip(again[2], first[2], strict=True))  # policies
    # one pod record changes: that pod is a new object, the others are the same ones
    put_pod(store, "x", "b", {"pod": "b", "tier": "db"})
    third = cache.load(store, "c1")
    assert third == reference(store)
    changed = [p for p in third[0] if p.key == "x/b"]
    assert changed[0].labels["tier"] == "db" and all(p is q for p, q in zip(third[0], first[0], strict=True) if p.key != "x/b")
    # a deleted record and a deleted allocation are gone; a namespace record is gone but its pods keep it
    store.delete(pod_key("c1", namespace="y", name="a"))
    store.delete(namespace_key("c1", namespace="x"))
    ipam.release(store, "c1", "cid1", "eth0")
    assert cache.load(store, "c1") == reference(store)


def test_bad_records_reported_on_every_read(store):
    store.put(policy_key("c1", namespace="x", name="bad"), "{not json")
    store.put(pod_key("c1", namespace="x", name="c"), '{"namespace": "x", "name": "c", "labels": {"": "v"}}')
    cache, seen, ref = InventoryCache(), [], []
    for _ in range(2):
        assert cache.load(store, "c1", on_bad=seen.append) == reference(store, ref.append)
    assert sorted(e.key for e in seen) == sorted(e.key for e in ref) and len(seen) == 4


def test_unknown_cluster(store):
    with pytest.raises(NotFound):
        InventoryCache().load(store, "nope")


def test_a_dual_stack_cluster_gives_each_pod_both_addresses(tmp_path):
    """Dual-stack: an attachment's IPv4 and IPv6 address records are one pod
    with ``ip`` and ``ip_v6`` (as ``inventory_from_store`` pairs them), kept
    as the same object while unchanged; a lone IPv6 record (half an
    allocation) is reported and left out. Control: the pods carry IPv6."""
    s = open_datastore(f"sqlite://{tmp_path}/state.db")
    net = {"network-plugin": "azure", "network-plugin-mode": "overlay", "ip-families": "ipv4,ipv6"}
    ipam.create_cluster(s, "c1", parse_network(net))
    ipam.register_node(s, "c1", "n1", IPv4Address("10.224.0.4"))
    allocs = [ipam.allocate(s, "c1", "n1", f"cid{i}", "eth0", pod=("x", name)) for i, name in enumerate("ab")]
    cache, seen = InventoryCache(), []
    first = cache.load(s, "c1", on_bad=seen.append)
    assert first == reference(s) and not seen
    assert sorted((p.name, p.ip, p.ip_v6) for p in first[0]) == [
        (name, a.ip.ip, a.ip_v6.ip) for name, a in zip("ab", allocs, strict=True) if a.ip_v6 is not None
    ]
    assert all(p.ip_v6 is not None for p in first[0])
    again = cache.load(s, "c1", on_bad=seen.append)
    assert all(a is b for a, b in zip(again[0], first[0], strict=True)) and not seen
    ipv4_key = next(kv.key for kv in s.read([], [ips_prefix("c1", "n1")]).kvs if ":" not in kv.key.rpartition("/")[2])
    s.delete(ipv4_key)  # half of one attachment's pair is gone
    third = cache.load(s, "c1", on_bad=seen.append)
    assert len(third[0]) == 1 and [e.kind for e in seen] == ["allocation"]
    s.close()
