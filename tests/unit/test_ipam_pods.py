"""Pod addresses, release, gc and check over a real (sqlite) store."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Interface

import pytest

from overlaycni import ipam
from overlaycni.config import parse_network
from overlaycni.datastore import open_datastore
from overlaycni.datastore.keys import ip_key
from overlaycni.errors import AddressUnavailable, ConfigError, NotFound, PoolExhausted

IP = IPv4Address
ROOT = "/overlaycni/clusters/dev/"


class CountingStore:
    """Wraps a store and counts the calls that reach the backend."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if callable(attr):
            def counted(*a, **kw):
                self.calls += 1
                return attr(*a, **kw)
            return counted
        return attr


@pytest.fixture
def store(tmp_path):
    s = open_datastore(f"sqlite://{tmp_path}/state.db")
    ipam.create_cluster(s, "dev", parse_network({"network-plugin": "azure", "network-plugin-mode": "overlay"}))
    ipam.register_node(s, "dev", "n1", IP("10.224.0.4"))  # 10.244.0.0/24
    ipam.register_node(s, "dev", "n2", IP("10.224.0.5"))  # 10.244.1.0/24
    yield s
    s.close()


def test_allocation_shape_and_idempotence(store):
    a = ipam.allocate(store, "dev", "n1", "abc", "eth0", pod=("default", "web-0"))
    assert a.ip == IPv4Interface("10.244.0.2/24") and a.gateway == IP("10.244.0.1")
    assert (a.node, a.pod_namespace, a.pod_name) == ("n1", "default", "web-0")
    assert ipam.allocate(store, "dev", "n1", "abc", "eth0") == a
    assert ipam.get_allocation(store, "dev", "abc", "eth0") == a
    other_if = ipam.allocate(store, "dev", "n1", "abc", "net1")
    assert other_if.ip != a.ip


def test_allocate_costs_two_store_calls(store):
    counting = CountingStore(store)
    ipam.allocate(counting, "dev", "n1", "abc", "eth0")
    assert counting.calls == 2
    counting.calls = 0
    ipam.allocate(counting, "dev", "n1", "abc", "eth0")  # repeat: one read
    assert counting.calls == 1


def test_moves_forward_so_a_released_ip_is_not_reused_at_once(store):
    ips = [ipam.allocate(store, "dev", "n1", f"c{i}", "eth0").ip for i in range(3)]
    assert [str(i) for i in ips] == ["10.244.0.2/24", "10.244.0.3/24", "10.244.0.4/24"]
    released = ipam.release(store, "dev", "c2", "eth0")
    assert released.ip == ips[2]
    assert ipam.release(store, "dev", "c2", "eth0") is None  # idempotent
    assert ipam.allocate(store, "dev", "n1", "c3", "eth0").ip == IPv4Interface("10.244.0.5/24")


def test_keys_sort_in_address_order(store):
    ipam.allocate(store, "dev", "n1", "a", "eth0", requested_ip=IP("10.244.0.100"))
    ipam.allocate(store, "dev", "n1", "b", "eth0", requested_ip=IP("10.244.0.20"))
    ipam.allocate(store, "dev", "n1", "c", "eth0", requested_ip=IP("10.244.0.3"))
    keys = [kv.key for kv in store.list(ROOT + "ips/n1/")]
    assert keys == sorted(keys) and keys[0].endswith("010.244.000.003")


def test_dense_block_after_wrap_finds_the_holes(store):
    for i in range(253):
        ipam.allocate(store, "dev", "n1", f"c{i}", "eth0")
    for i in (7, 100, 200):
        ipam.release(store, "dev", f"c{i}", "eth0")
    # the cursor sits at the end of the block: the next ones wrap and find the holes in order
    got = [ipam.allocate(store, "dev", "n1", f"n{i}", "eth0").ip.ip for i in range(3)]
    assert got == [IP("10.244.0.9"), IP("10.244.0.102"), IP("10.244.0.202")]
    with pytest.raises(PoolExhausted):
        ipam.allocate(store, "dev", "n1", "full", "eth0")


def test_exhaustion_names_node_and_block_and_wraps(store):
    allocs = [ipam.allocate(store, "dev", "n2", f"c{i}", "eth0") for i in range(253)]
    got = {a.ip.ip for a in allocs}
    assert len(got) == 253
    assert not got & {IP("10.244.1.0"), IP("10.244.1.1"), IP("10.244.1.255")}
    with pytest.raises(PoolExhausted) as info:
        ipam.allocate(store, "dev", "n2", "one-more", "eth0")
    assert "'n2'" in str(info.value) and "10.244.1.0/24" in str(info.value)
    ipam.release(store, "dev", "c10", "eth0")
    assert ipam.allocate(store, "dev", "n2", "one-more", "eth0").ip == allocs[10].ip  # the only free one


def test_requested_ip(store):
    a = ipam.allocate(store, "dev", "n1", "abc", "eth0", requested_ip=IP("10.244.0.77"))
    assert a.ip.ip == IP("10.244.0.77")
    with pytest.raises(AddressUnavailable, match="already in use"):
        ipam.allocate(store, "dev", "n1", "def", "eth0", requested_ip=IP("10.244.0.77"))
    with pytest.raises(AddressUnavailable, match="not a usable address"):
        ipam.allocate(store, "dev", "n1", "def", "eth0", requested_ip=IP("10.244.0.1"))
    with pytest.raises(AddressUnavailable, match="not a usable address"):
        ipam.allocate(store, "dev", "n1", "def", "eth0", requested_ip=IP("10.244.1.7"))
    # a requested address does not move the cursor
    assert ipam.allocate(store, "dev", "n1", "ghi", "eth0").ip.ip == IP("10.244.0.2")


def test_bad_input_is_named_and_writes_nothing(store):
    before = store.revision()
    with pytest.raises(NotFound, match="cluster 'nope' not found"):
        ipam.allocate(store, "nope", "n1", "abc", "eth0")
    with pytest.raises(NotFound, match="node 'n9' has no block"):
        ipam.allocate(store, "dev", "n9", "abc", "eth0")
    with pytest.raises(ConfigError, match="--container-id"):
        ipam.allocate(store, "dev", "n1", "a/b", "eth0")
    with pytest.raises(ConfigError, match="--ifname"):
        ipam.allocate(store, "dev", "n1", "abc", "much-too-long-ifname")
    with pytest.raises(ConfigError, match="--pod"):
        ipam.parse_pod("no-namespace")
    with pytest.raises(AddressUnavailable, match="on node 'n1'"):
        ipam.allocate(store, "dev", "n1", "abc", "eth0")
        ipam.allocate(store, "dev", "n2", "abc", "eth0")
    assert store.revision() == before + 1  # only the one good allocation


def test_gc_releases_everything_not_valid(store):
    for i in range(5):
        ipam.allocate(store, "dev", "n1", f"c{i}", "eth0")
        ipam.allocate(store, "dev", "n2", f"d{i}", "eth0")
    released = ipam.gc(store, "dev", [("c0", "eth0"), ("d1", "eth0")], node="n1")
    assert sorted(a.container_id for a in released) == ["c1", "c2", "c3", "c4"]
    released = ipam.gc(store, "dev", [("c0", "eth0"), ("d1", "eth0")])
    assert sorted(a.container_id for a in released) == ["d0", "d2", "d3", "d4"]
    assert [a.container_id for a in ipam.list_allocations(store, "dev")] == ["c0", "d1"]
    assert ipam.check(store, "dev").ok


def test_check_finds_duplicates_leaks_and_strays(store):
    ipam.allocate(store, "dev", "n1", "ok", "eth0")
    assert ipam.check(store, "dev").ok
    # hand-written damage, as a buggy or crashed writer could leave it
    value = json.dumps({"container_id": "x", "ifname": "eth0", "pod_namespace": None, "pod_name": None})
    store.put(ip_key("dev", "n2", IP("10.244.0.2")), value)  # same address on two nodes, outside n2's block
    store.put(ip_key("dev", "n1", IP("10.244.0.255")), value.replace('"x"', '"y"'))  # broadcast, no handle
    store.put(ROOT + "handles/z/eth0", json.dumps({"node": "n1", "ip": "10.244.0.9", "block": "10.244.0.0/24"}))
    report = ipam.check(store, "dev")
    kinds = {p.kind for p in report.problems}
    assert {"duplicate", "leak", "outside-block", "reserved"} <= kinds
    assert not report.ok and report.to_dict()["ok"] is False
    assert any("10.244.0.2" in p.message for p in report.of_kind("duplicate"))
    # gc with the one valid attachment clears every leak
    ipam.gc(store, "dev", [("ok", "eth0")])
    assert ipam.check(store, "dev", valid=[("ok", "eth0")]).ok


def test_check_reports_unreferenced_when_given_valid(store):
    ipam.allocate(store, "dev", "n1", "gone", "eth0")
    report = ipam.check(store, "dev", valid=[])
    assert [p.kind for p in report.problems] == ["unreferenced"]


# ----- property: any sequence of allocate/release keeps the invariants -------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["alloc", "release"]), st.integers(0, 20)), max_size=60))
def test_random_allocate_release_sequences(tmp_path_factory, ops):
    s = open_datastore(f"sqlite://{tmp_path_factory.mktemp('prop')}/state.db")
    try:
        net = parse_network({"network-plugin": "azure", "network-plugin-mode": "overlay",
                             "node-cidr-size": 28, "max-pods": 10})
        ipam.create_cluster(s, "p", net)
        block = ipam.register_node(s, "p", "n", IP("10.224.0.4")).block
        live: dict[str, IPv4Interface] = {}
        for op, n in ops:
            cid = f"c{n}"
            if op == "alloc":
                if cid not in live and len(live) == 13:
                    with pytest.raises(PoolExhausted):
                        ipam.allocate(s, "p", "n", cid, "eth0")
                    continue
                ip = ipam.allocate(s, "p", "n", cid, "eth0").ip
                assert live.setdefault(cid, ip) == ip  # idempotent
            else:
                released = ipam.release(s, "p", cid, "eth0")
                assert (released.ip if released else None) == live.pop(cid, None)
            ips = list(live.values())
            assert len(set(ips)) == len(ips)
            assert all(i.ip in block and i.ip not in (block.network_address, block.network_address + 1,
                                                       block.broadcast_address) for i in ips)
        assert {a.container_id: a.ip for a in ipam.list_allocations(s, "p")} == live
        assert ipam.check(s, "p").ok
    finally:
        s.close()
