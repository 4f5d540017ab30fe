"""Many processes at once, on both stores: distinct blocks, distinct
addresses, a clean check, and an empty block after releasing everything."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from overlaycni import ipam
from overlaycni.config import parse_network
from overlaycni.datastore import open_datastore

from ._worker import allocate_many, allocate_pairs, register_one, run_processes


def _net(**extra):
    return parse_network({"network-plugin": "azure", "network-plugin-mode": "overlay", **extra})


def test_16_processes_register_distinct_nodes(store_url):
    store = open_datastore(store_url)
    ipam.create_cluster(store, "c", _net())
    blocks = run_processes(register_one, [(store_url, "c", f"node-{i}", f"10.224.0.{10 + i}") for i in range(16)])
    assert len(set(blocks)) == 16
    nets = [IPv4Network(b) for b in blocks]
    assert all(n.subnet_of(IPv4Network("10.244.0.0/16")) and n.prefixlen == 24 for n in nets)
    recorded = {n.name: str(n.block) for n in ipam.list_nodes(store, "c")}
    assert recorded == {f"node-{i}": blocks[i] for i in range(16)}
    assert ipam.check(store, "c").ok
    store.close()


def test_8_processes_x_50_allocations_on_one_node(store_url):
    store = open_datastore(store_url)
    ipam.create_cluster(store, "c", _net(**{"node-cidr-size": 23}))  # 509 addresses per node
    node = ipam.register_node(store, "c", "n1", IPv4Address("10.224.0.4"))
    results = run_processes(allocate_many, [(store_url, "c", "n1", f"w{w}", 50) for w in range(8)])
    pairs = [p for r in results for p in r]
    ips = [IPv4Address(ip) for _, ip in pairs]
    assert len(pairs) == 400 and len(set(ips)) == 400
    reserved = {node.block.network_address, node.block.network_address + 1, node.block.broadcast_address}
    assert all(ip in node.block and ip not in reserved for ip in ips)
    report = ipam.check(store, "c", valid=[(cid, "eth0") for cid, _ in pairs])
    assert report.ok, report.problems
    assert report.allocations == 400
    for cid, _ in pairs:
        assert ipam.release(store, "c", cid, "eth0") is not None
    assert ipam.list_allocations(store, "c", node="n1") == []
    assert store.list("/overlaycni/clusters/c/handles/") == []
    assert ipam.check(store, "c").ok
    store.close()


def test_4_processes_x_25_dual_stack_allocations(store_url):
    """Racing allocators in a dual-stack cluster: each attachment gets one
    address of each family, none twice, and releasing frees both."""
    from ipaddress import IPv6Address

    store = open_datastore(store_url)
    ipam.create_cluster(store, "c", _net(**{"ip-families": "ipv4,ipv6"}))
    node = ipam.register_node(store, "c", "n1", IPv4Address("10.224.0.4"))
    results = run_processes(allocate_pairs, [(store_url, "c", "n1", f"w{w}", 25) for w in range(4)])
    triples = [t for r in results for t in r]
    v4 = [IPv4Address(ip) for _, ip, _ in triples]
    v6 = [IPv6Address(ip) for _, _, ip in triples]
    assert len(triples) == 100 and len(set(v4)) == 100 and len(set(v6)) == 100
    assert all(ip in node.block_v6 and ip not in (node.block_v6.network_address, node.block_v6.network_address + 1)
               for ip in v6)  # fmt: skip
    report = ipam.check(store, "c", valid=[(cid, "eth0") for cid, _, _ in triples])
    assert report.ok, report.problems
    assert report.allocations == 100
    for cid, _, _ in triples:
        assert ipam.release(store, "c", cid, "eth0") is not None
    assert store.list("/overlaycni/clusters/c/ips/") == [] and store.list("/overlaycni/clusters/c/handles/") == []
    store.close()
