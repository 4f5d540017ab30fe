"""Peers programmed in batches (``dataplane.peerops``) on the in-memory fake:
a bad peer among good ones is skipped and returned, the others programmed;
a batch leaves the kernel exactly as the same peers one call at a time."""

from __future__ import annotations

import copy
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from overlaycni.dataplane import FakeDataplane
from overlaycni.dataplane.fake import FakeKernel
from overlaycni.dataplane.model import VXLAN_IFNAME, NodeState, Peer, vtep_mac
from overlaycni.dataplane.wgmodel import PrivateKey
from overlaycni.errors import ConfigError, DataplaneError, PeerNotAdjacent

ME = IPv4Address("10.224.0.1")


def peer(i: int, *, ip: str | None = None, block: str | None = None) -> Peer:
    node_ip = IPv4Address(ip or f"10.224.0.{i}")
    return Peer(f"n{i}", node_ip, IPv4Network(block or f"10.244.{i}.0/24"), vtep_mac(node_ip))


def state(*peers: Peer, **kw) -> NodeState:
    return NodeState(node_ip=ME, block=IPv4Network("10.244.1.0/24"), pod_cidr=IPv4Network("10.244.0.0/16"),
                     peers=peers, **kw)  # fmt: skip


def programmed(dp: FakeDataplane, p: Peer) -> bool:
    """Every kernel object of ``p`` (VXLAN): route, neighbour, FDB entry, ``node_ips`` element."""
    k = dp.kernel
    route = k.routes.get(p.block)
    return (
        route is not None and route.dev == VXLAN_IFNAME
        and (VXLAN_IFNAME, p.block.network_address) in k.neighbours
        and any(f.dst == p.node_ip for f in k.fdb.values())
        and p.node_ip in k.nft.sets["node_ips"]
    )  # fmt: skip


def untouched(dp: FakeDataplane, p: Peer) -> bool:
    k = dp.kernel
    return (
        p.block not in k.routes
        and (VXLAN_IFNAME, p.block.network_address) not in k.neighbours
        and not any(f.dst == p.node_ip for f in k.fdb.values())
        and p.node_ip not in k.nft.sets["node_ips"]
    )  # fmt: skip


def kernel_objects(dp: FakeDataplane) -> tuple:
    k = dp.kernel
    return dict(k.routes), dict(k.neighbours), dict(k.fdb), copy.deepcopy(k.nft.sets)


@pytest.fixture
def dp() -> FakeDataplane:
    d = FakeDataplane()
    d.reconcile(state(peer(2)))
    return d


def test_a_bad_peer_in_a_batch_is_skipped_and_returned_the_others_programmed(dp):
    good = [peer(3), peer(4), peer(6)]
    outside = peer(5, block="10.99.5.0/24")  # its block is outside the pod CIDR
    taken = peer(7, ip="10.224.0.2")  # n2's node IP
    batch = [good[0], outside, good[1], taken, good[2]]
    s = state(peer(2), *batch)
    failed = dp.ensure_peers(s, batch)
    assert set(failed) == {"n5", "n7"}
    for name, why in (("n5", "outside the pod CIDR"), ("n7", "node IP 10.224.0.2 is peer n2's")):
        exc = failed[name]
        assert isinstance(exc, ConfigError) and exc.errors[0].field == "peers" and why in exc.errors[0].message
    assert all(programmed(dp, p) for p in good)  # fails if the batch admitted nothing
    assert untouched(dp, outside) and dp.kernel.routes.get(taken.block) is None  # fails if it admitted everything
    assert programmed(dp, peer(2))  # the holder of the IP keeps its objects
    assert [p.name for p in dp.last_state.peers] == ["n2", "n3", "n4", "n6"]  # what the repairer reconciles to


def test_the_checks_can_fail_both_ways(dp):
    """Control for the test above: its two predicates tell a programmed peer from an untouched one."""
    p = peer(3)
    assert untouched(dp, p) and not programmed(dp, p)
    assert dp.ensure_peers(state(peer(2), p), [p]) == {}
    assert programmed(dp, p) and not untouched(dp, p)


def test_the_batch_admits_in_order_a_later_peer_loses_a_collision_within_it(dp):
    """Two new peers with one node IP: the first of the batch wins, as with one call after the other."""
    first, second = peer(3), peer(4, ip="10.224.0.3")
    failed = dp.ensure_peers(state(peer(2), first, second), [first, second])
    assert list(failed) == ["n4"] and "peer n3's" in str(failed["n4"])
    assert programmed(dp, first) and second.block not in dp.kernel.routes


def test_a_batch_leaves_the_kernel_as_single_calls_do():
    base = state(peer(2), peer(3))
    moved = peer(3, ip="10.224.0.33")  # a changed MAC / node IP, updated in place
    new = [peer(4), moved, peer(5)]
    full = state(peer(2), *new)
    one, many = FakeDataplane(), FakeDataplane()
    for d in (one, many):
        d.reconcile(base)
    for p in new:
        one.ensure_peer(full, p)
    assert many.ensure_peers(full, new) == {}
    assert kernel_objects(one) == kernel_objects(many)
    assert one.last_state == many.last_state
    gone = [peer(2), peer(5)]
    for p in gone:
        one.delete_peer(full, p)
    many.delete_peers(full, gone)
    assert kernel_objects(one) == kernel_objects(many)
    assert one.last_state == many.last_state and [p.name for p in many.last_state.peers] == ["n3", "n4"]
    assert untouched(many, peer(2)) and programmed(many, moved)


def test_delete_peers_keeps_what_a_remaining_peer_needs(dp):
    s = state(peer(2), peer(3), peer(4))
    dp.ensure_peers(s, [peer(3), peer(4)])
    dp.delete_peers(s, [peer(3), peer(3)])  # named twice: once is enough
    assert untouched(dp, peer(3)) and programmed(dp, peer(2)) and programmed(dp, peer(4))
    assert ME in dp.kernel.nft.sets["node_ips"]
    dp.delete_peers(s, [peer(3)])  # gone already: success
    assert dp.ensure_peers(s, []) == {} and dp.delete_peers(s, []) is None


def test_own_settings_still_raise_for_the_whole_batch(dp):
    with pytest.raises(ConfigError):
        dp.ensure_peers(replace(state(peer(3)), vni=0), [peer(3)])
    assert untouched(dp, peer(3))


def test_direct_a_non_adjacent_peer_is_skipped():
    k = FakeKernel(auto_underlay=False, default_gateway=IPv4Address("10.224.255.254"))
    k.add_link("eth0")
    k.addresses["eth0"][IPv4Interface("10.224.0.1/16")] = None
    dp = FakeDataplane(k)
    far, near = peer(5, ip="10.225.0.5"), peer(2)
    s = state(near, far, backend="direct")
    dp.reconcile(state(backend="direct"))
    failed = dp.ensure_peers(s, [far, near])
    assert list(failed) == ["n5"] and isinstance(failed["n5"], PeerNotAdjacent)
    assert near.block in k.routes and far.block not in k.routes
    with pytest.raises(PeerNotAdjacent):  # one at a time: the same error, raised
        dp.ensure_peer(s, far)


def test_wireguard_a_keyless_peer_is_skipped_the_others_in_one_transaction():
    keys = {i: PrivateKey.generate().public for i in (2, 3, 4)}

    def wg(i: int, *, key: str | None = "") -> Peer:
        return replace(peer(i), wg_public_key=keys[i] if key == "" else key)

    dp = FakeDataplane()
    s0 = state(wg(2), backend="wireguard", wireguard_key=PrivateKey.generate())
    assert dp.reconcile(s0).errors == []
    keyless = wg(4, key=None)
    s = replace(s0, peers=(wg(2), wg(3), keyless))
    failed = dp.ensure_peers(s, [wg(3), keyless])
    assert list(failed) == ["n4"] and isinstance(failed["n4"], DataplaneError) and "public key" in str(failed["n4"])
    device = dp.wireguard_device()
    assert {p.peer.public_key for p in device.peers} == {keys[2], keys[3]}
    assert wg(3).block in dp.kernel.routes and keyless.block not in dp.kernel.routes
    rotated = wg(3, key=PrivateKey.generate().public)  # a new key for the same block replaces the old one
    assert dp.ensure_peers(replace(s, peers=(wg(2), rotated)), [rotated]) == {}
    assert {p.peer.public_key for p in dp.wireguard_device().peers} == {keys[2], rotated.wg_public_key}
    dp.delete_peers(replace(s, peers=(wg(2), rotated)), [rotated, wg(2)])
    assert dp.wireguard_device().peers == ()
