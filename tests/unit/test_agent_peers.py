"""The node view the watch folds events into (``agent.peers.NodeView``), and
the agent's peer selection with full resyncs interleaved (in-memory data
plane, real SQLite store)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from overlaycni import ipam
from overlaycni.agent.peers import NodeView
from overlaycni.dataplane import vtep_mac
from overlaycni.ipam import ClusterNodes, Liveness, NodeRecord
from tests.unit.test_agent import cluster, start_agent, wait_for  # noqa: F401 - the fixture

__all__ = ["cluster"]


def record(i: int) -> NodeRecord:
    ip = IPv4Address(int(IPv4Address("10.224.0.10")) + i)
    return NodeRecord(f"n{i}", ip, IPv4Network(f"10.244.{i}.0/24"), vtep_mac(ip))


def listing(*records: NodeRecord) -> ClusterNodes:
    return ClusterNodes(records=records, live={r.name: Liveness(r.name, r.node_ip, 7) for r in records},
                        claims={r.block: r.name for r in records}, revision=3)  # fmt: skip


def test_fold_puts_replaces_and_deletes_by_name():
    v = NodeView(listing(record(1), record(2)))
    moved = NodeRecord("n2", IPv4Address("10.224.9.9"), IPv4Network("10.244.2.0/24"), vtep_mac(IPv4Address("10.224.9.9")))
    v.fold("n2", moved, block_claims={moved.block: "n2"}, liveness=None)  # changed, and its lease lapsed
    v.fold("n3", record(3), block_claims={record(3).block: "n3"}, liveness=Liveness("n3", record(3).node_ip, 8))
    v.fold("n1", None, block_claims={}, liveness=None)  # deleted
    snap = v.snapshot()
    assert {r.name: r for r in snap.records} == {"n2": moved, "n3": record(3)}
    assert set(snap.live) == {"n3"}
    assert snap.claims == {record(1).block: "n1", moved.block: "n2", record(3).block: "n3"}  # a delete reads no claims
    assert v.record("n2") is moved and v.record("n1") is None
    v.fold("n3", record(3), block_claims={record(3).block: None}, liveness=None)  # its claim is gone
    assert record(3).block not in v.snapshot().claims


def test_a_snapshot_does_not_change_with_later_folds():
    v = NodeView(listing(record(1)))
    snap = v.snapshot()
    v.fold("n2", record(2), block_claims={record(2).block: "n2"}, liveness=Liveness("n2", record(2).node_ip, 9))
    v.fold("n1", None, block_claims={}, liveness=None)
    assert [r.name for r in snap.records] == ["n1"] and set(snap.live) == {"n1"} and len(snap.claims) == 1
    assert [r.name for r in v.snapshot().records] == ["n2"]  # control: the view itself did change


def join(store, i: int) -> None:
    ip = IPv4Address(int(IPv4Address("10.224.5.1")) + i)
    ipam.register_node(store, "c1", f"j{i}", ip, vtep_mac=vtep_mac(ip))


def test_events_around_a_full_resync_all_reach_the_kernel(cluster, tmp_path):  # noqa: F811
    """Joins fold into the view, a full resync replaces it (and bumps the
    epoch, so a selection from the older view programs nothing over it),
    more joins fold into the new view: every peer ends up programmed once,
    and a deleted one is gone."""
    url, store = cluster
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    node = agent.node
    sel = node.peer_selection
    try:
        assert sel.idle(10)
        with node.kernel_lock:  # the selections wait; the watch folds
            for i in range(10):
                join(store, i)
            assert wait_for(lambda: sum(r.name.startswith("j") for r in node.view.records) == 10)
            epoch = node.view_epoch
            node.resync()  # replaces the view with a listing (the kernel lock is reentrant)
            assert node.view_epoch == epoch + 1
            assert {p.name for p in node.state.peers} == {f"j{i}" for i in range(10)}
            for i in range(10, 15):
                join(store, i)
            gone_block = ipam.get_node(store, "c1", "j3").block
            ipam.delete_node(store, "c1", "j3", force=True)
            assert wait_for(lambda: {r.name for r in node.view.records} >= {f"j{i}" for i in range(10, 15)})
            assert wait_for(lambda: node.view.record("j3") is None)
        assert sel.idle(10)
        want = {f"j{i}" for i in range(15)} - {"j3"}
        assert {p.name for p in agent.state.peers} == want
        assert {p.name for p in dp.last_state.peers} == want  # what a repair reconciles to
        for name in want:
            assert ipam.get_node(store, "c1", name).block in dp.kernel.routes
        assert gone_block not in dp.kernel.routes
        assert IPv4Address("10.224.5.4") not in dp.kernel.nft.sets["node_ips"]  # j3's node IP: its element went too
    finally:
        agent.shutdown()
