"""A full resync keeps the held objects where nothing changed (``agent.node.keep_view`` / ``keep_peers``)."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

from overlaycni.agent.desired import peer_of
from overlaycni.agent.node import keep_peers, keep_view
from overlaycni.dataplane import NodeState, vtep_mac
from overlaycni.ipam import ClusterNodes, Liveness, NodeRecord


def record(i: int, *, mtu: int | None = None) -> NodeRecord:
    ip = IPv4Address(int(IPv4Address("10.224.0.10")) + i)
    return NodeRecord(f"n{i}", ip, IPv4Network(f"10.244.{i}.0/24"), vtep_mac(ip), mtu=mtu)


def view(records: list[NodeRecord]) -> ClusterNodes:
    return ClusterNodes(
        records=tuple(records),
        live={r.name: Liveness(r.name, r.node_ip, 7) for r in records},
        claims={r.block: r.name for r in records},
        revision=1,
    )


def test_an_unchanged_listing_is_the_held_objects():
    old = view([record(i) for i in range(5)])
    new = view([record(i) for i in range(5)])  # equal, fresh objects (a resync decodes again)
    kept = keep_view(old, new)
    assert kept == new
    assert kept.records is old.records and kept.live is old.live and kept.claims is old.claims


def test_a_changed_record_is_the_new_one_and_the_others_are_kept():
    old = view([record(i) for i in range(5)])
    changed = record(2, mtu=1400)
    new = view([record(0), record(1), changed, record(3), record(5)])  # n2 changed, n4 gone, n5 new
    kept = keep_view(old, new)
    assert kept == new  # control: the content is the listing's, never the held one's
    assert kept.records[2] is changed and kept.records[2] != old.records[2]
    assert kept.records[0] is old.records[0] and kept.records[3] is old.records[3]
    assert kept.records[4] is new.records[4]
    assert kept.live is new.live and kept.claims is new.claims  # they differ: the new maps
    assert kept.revision == new.revision


def test_peers_kept_where_equal():
    base = NodeState(node_ip=IPv4Address("10.224.0.1"), block=IPv4Network("10.244.100.0/24"),
                     pod_cidr=IPv4Network("10.244.0.0/16"))  # fmt: skip
    old = replace(base, peers=tuple(peer_of(record(i)) for i in range(4)))
    same = replace(base, peers=tuple(peer_of(record(i)) for i in range(4)), mtu=1400)
    kept = keep_peers(old, same)
    assert kept.peers is old.peers and kept.mtu == 1400  # only the peers come from the held state
    moved = replace(base, peers=(peer_of(record(0)), peer_of(replace(record(1), node_ip=IPv4Address("10.224.9.9")))))
    kept = keep_peers(old, moved)
    assert kept == moved
    assert kept.peers[0] is old.peers[0] and kept.peers[1] is moved.peers[1]
