"""IPAM flows on both stores (etcd limits transactions to 128 operations, so
bulk deletes must be chunked; a lease's expiry must hide the liveness record)."""

from __future__ import annotations

import threading
import time
from ipaddress import IPv4Address

from overlaycni import ipam
from overlaycni.config import parse_network


def _net(**extra):
    return parse_network({"network-plugin": "azure", "network-plugin-mode": "overlay", **extra})


def test_delete_node_with_hundreds_of_addresses(store):
    ipam.create_cluster(store, "c", _net(**{"node-cidr-size": 23}))
    node = ipam.register_node(store, "c", "n1", IPv4Address("10.224.0.4"))
    for i in range(300):
        ipam.allocate(store, "c", "n1", f"p{i}", "eth0", pod=("default", f"p{i}"))
    assert ipam.check(store, "c").ok
    ipam.delete_node(store, "c", "n1")
    assert ipam.list_allocations(store, "c") == []
    assert store.list("/overlaycni/clusters/c/handles/") == []
    assert store.list(f"/overlaycni/clusters/c/blocks/{node.block.network_address}-23") == []  # freed
    n2 = ipam.register_node(store, "c", "n2", IPv4Address("10.224.0.5"))
    assert ipam.list_blocks(store, "c") == {"n2": n2.block}
    assert ipam.check(store, "c").ok
    ipam.delete_cluster(store, "c")
    assert store.list("/overlaycni/") == []


def test_node_lease_expiry_and_watch(store):
    """A lapsed lease takes the liveness record with it; the node record (and
    so every peer's route to the node) and the block claim stay."""
    ipam.create_cluster(store, "c", _net())
    start = store.revision() + 1
    lease = store.grant_lease(1)
    rec = ipam.register_node(store, "c", "n1", IPv4Address("10.224.0.4"), vtep_mac="02:00:00:00:00:01", lease=lease)
    deadline = time.monotonic() + 10
    while ipam.cluster_nodes(store, "c").live and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ipam.cluster_nodes(store, "c").live == {}
    assert ipam.list_nodes(store, "c") == [rec]
    stop = threading.Event()
    events = []
    for ev in store.watch("/overlaycni/clusters/c/leases/", start_revision=start, stop=stop):
        events.append(ev)
        if len(events) == 2:
            break
    assert [e.kind for e in events] == ["put", "delete"]
    assert ipam.list_blocks(store, "c") == {"n1": rec.block}  # the claim outlives the lease


def test_dual_stack_allocations(store):
    """Both families in one transaction on every store: exploded IPv6 keys,
    the failed attempt's windows, release and node delete."""
    from ipaddress import IPv6Address

    ipam.create_cluster(store, "c", _net(**{"ip-families": "ipv4,ipv6"}))
    n1 = ipam.register_node(store, "c", "n1", IPv4Address("10.224.0.4"))
    assert str(n1.block_v6) == "fd12:3456:789a::/80"
    first = ipam.allocate(store, "c", "n1", "p0", "eth0")
    taken = first.ip_v6.ip + 1  # held by someone the cursor does not know
    store.put(f"/overlaycni/clusters/c/ips/n1/{taken.exploded}", '{"container_id": "x", "ifname": "eth0"}')
    allocs = [first] + [ipam.allocate(store, "c", "n1", f"p{i}", "eth0") for i in range(1, 5)]
    assert [a.ip_v6.ip for a in allocs] == [IPv6Address("fd12:3456:789a::2"), *(IPv6Address(f"fd12:3456:789a::{i}")
                                                                            for i in range(4, 8))]  # fmt: skip
    store.delete(f"/overlaycni/clusters/c/ips/n1/{taken.exploded}")
    assert ipam.list_allocations(store, "c") == allocs
    assert ipam.check(store, "c").ok
    assert ipam.release(store, "c", "p0", "eth0") == first
    ipam.delete_node(store, "c", "n1")
    assert store.list("/overlaycni/clusters/c/ips/") == [] and store.list("/overlaycni/clusters/c/handles/") == []
    assert store.list("/overlaycni/clusters/c/blocks/") == []
    assert ipam.check(store, "c").ok
