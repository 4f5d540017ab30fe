"""Clusters and node blocks over a real (sqlite) store."""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlaycni import ipam
from overlaycni.config import parse_network
from overlaycni.datastore import open_datastore
from overlaycni.errors import AlreadyExists, ConfigError, NotFound, PoolExhausted

IP = IPv4Address


def net(**extra):
    return parse_network({"network-plugin": "azure", "network-plugin-mode": "overlay", **extra})


@pytest.fixture
def store(tmp_path):
    s = open_datastore(f"sqlite://{tmp_path}/state.db")
    yield s
    s.close()


def test_create_is_idempotent_and_rejects_other_settings(store):
    n = net()
    assert ipam.create_cluster(store, "dev", n) == n
    assert ipam.create_cluster(store, "dev", net()) == n
    with pytest.raises(AlreadyExists) as info:
        ipam.create_cluster(store, "dev", net(**{"pod-cidr": "10.245.0.0/16", "max-pods": 110}))
    assert "--pod-cidr 10.244.0.0/16" in str(info.value) and "--max-pods 250" in str(info.value)
    assert ipam.get_cluster(store, "dev") == n
    assert [name for name, _ in ipam.list_clusters(store)] == ["dev"]


def test_unknown_cluster_and_bad_names(store):
    with pytest.raises(NotFound, match="cluster 'nope' not found"):
        ipam.get_cluster(store, "nope")
    with pytest.raises(NotFound, match="cluster 'nope' not found"):
        ipam.register_node(store, "nope", "n1", IP("10.224.0.4"))
    with pytest.raises(ConfigError, match="--name: 'bad/name'"):
        ipam.create_cluster(store, "bad/name", net())
    assert store.list("/") == []


def test_delete_cluster_removes_everything(store):
    ipam.create_cluster(store, "a", net())
    ipam.create_cluster(store, "b", net())
    ipam.register_node(store, "a", "n1", IP("10.224.0.4"))
    ipam.allocate(store, "a", "n1", "c1", "eth0")
    ipam.delete_cluster(store, "a")
    ipam.delete_cluster(store, "a")  # not-found is success
    assert [n for n, _ in ipam.list_clusters(store)] == ["b"]
    assert store.list("/overlaycni/clusters/a/") == []


def test_register_same_name_same_block_distinct_names_distinct_blocks(store):
    ipam.create_cluster(store, "dev", net())
    a = ipam.register_node(store, "dev", "n1", IP("10.224.0.4"))
    b = ipam.register_node(store, "dev", "n2", IP("10.224.0.5"))
    again = ipam.register_node(store, "dev", "n1", IP("10.224.0.9"), vtep_mac="02:AA:bb:cc:dd:ee")
    assert a.block != b.block
    assert again.block == a.block and again.node_ip == IP("10.224.0.9") and again.vtep_mac == "02:aa:bb:cc:dd:ee"
    assert ipam.get_node(store, "dev", "n1") == again
    assert [n.name for n in ipam.list_nodes(store, "dev")] == ["n1", "n2"]
    assert all(n.block.subnet_of(IPv4Network("10.244.0.0/16")) and n.block.prefixlen == 24 for n in (a, b))


def test_bad_node_input_names_the_field_and_writes_nothing(store):
    ipam.create_cluster(store, "dev", net())
    before = store.revision()
    with pytest.raises(ConfigError, match="--node-ip: 10.244.0.9 lies inside the pod CIDR"):
        ipam.register_node(store, "dev", "n1", IP("10.244.0.9"))
    with pytest.raises(ConfigError, match="--node-ip: 'x' is not a valid IPv4"):
        ipam.register_node(store, "dev", "n1", "x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--vtep-mac"):
        ipam.register_node(store, "dev", "n1", IP("10.224.0.4"), vtep_mac="nope")
    assert store.revision() == before


def test_deleted_node_frees_its_block_and_addresses(store):
    ipam.create_cluster(store, "dev", net(**{"pod-cidr": "10.244.0.0/23"}))  # two blocks
    a = ipam.register_node(store, "dev", "n1", IP("10.224.0.4"))
    ipam.register_node(store, "dev", "n2", IP("10.224.0.5"))
    for i in range(70):  # more than one delete chunk
        ipam.allocate(store, "dev", "n1", f"c{i}", "eth0")
    with pytest.raises(PoolExhausted) as info:
        ipam.register_node(store, "dev", "n3", IP("10.224.0.6"))
    assert "no free /24 block" in str(info.value) and "10.244.0.0/23" in str(info.value)
    ipam.delete_node(store, "dev", "n1")
    ipam.delete_node(store, "dev", "n1")  # not-found is success
    assert ipam.list_allocations(store, "dev") == []
    assert store.list("/overlaycni/clusters/dev/handles/") == []
    c = ipam.register_node(store, "dev", "n3", IP("10.224.0.6"))
    assert c.block == a.block
    assert ipam.check(store, "dev").ok


def test_fragmented_pool_still_finds_the_free_block(store):
    ipam.create_cluster(store, "dev", net(**{"pod-cidr": "10.244.0.0/19"}))  # 32 blocks
    for i in range(32):
        ipam.register_node(store, "dev", f"n{i}", IP(f"10.224.0.{10 + i}"))
    ipam.delete_node(store, "dev", "n5")
    new = ipam.register_node(store, "dev", "late", IP("10.224.1.1"))
    assert new.block == IPv4Network("10.244.5.0/24")


def test_expand_pod_cidr_keeps_blocks_and_adds_room(store):
    ipam.create_cluster(store, "dev", net(**{"pod-cidr": "10.244.0.0/24"}))
    a = ipam.register_node(store, "dev", "n1", IP("10.224.0.4"))
    with pytest.raises(PoolExhausted):
        ipam.register_node(store, "dev", "n2", IP("10.224.0.5"))
    with pytest.raises(ConfigError, match="not a superset"):
        ipam.expand_pod_cidr(store, "dev", "10.245.0.0/16")
    new = ipam.expand_pod_cidr(store, "dev", "10.244.0.0/22")
    assert new.pod_cidr == IPv4Network("10.244.0.0/22")
    assert ipam.register_node(store, "dev", "n1", IP("10.224.0.4")).block == a.block
    b = ipam.register_node(store, "dev", "n2", IP("10.224.0.5"))
    assert b.block != a.block and b.block.subnet_of(new.pod_cidr)
    assert ipam.check(store, "dev").ok


def test_liveness_vanishes_with_its_lease_but_the_record_and_block_stay(store):
    ipam.create_cluster(store, "dev", net())
    lease = store.grant_lease(1)
    rec = ipam.register_node(store, "dev", "n1", IP("10.224.0.4"), lease=lease, mtu=1500)
    kv = store.get(ipam.nodes_prefix("dev") + "n1")
    assert ipam.node_from_kv(kv) == rec and rec.mtu == 1500 and kv.lease is None
    assert set(ipam.cluster_nodes(store, "dev").live) == {"n1"}
    deadline = time.monotonic() + 10
    while ipam.cluster_nodes(store, "dev").live and time.monotonic() < deadline:
        time.sleep(0.2)
    view = ipam.cluster_nodes(store, "dev")
    assert view.live == {} and view.records == (rec,) and view.claims == {rec.block: "n1"}
    assert ipam.get_node(store, "dev", "n1") == rec
    assert ipam.list_blocks(store, "dev") == {"n1": rec.block}
    assert ipam.register_node(store, "dev", "n1", IP("10.224.0.4")).block == rec.block
