"""Pure model: names, MACs, desired objects, validation."""

from __future__ import annotations

import re
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlaycni.dataplane.model import (
    VXLAN_IFNAME,
    FdbEntry,
    Neighbour,
    NodeState,
    Peer,
    PodEndpoint,
    Route,
    admit_peers,
    host_veth_name,
    is_pod_veth,
    peer_objects,
    validate_state,
    vtep_mac,
)
from overlaycni.errors import ConfigError

ips = st.integers(min_value=0, max_value=2**32 - 1).map(IPv4Address)
MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


@given(ips)
def test_vtep_mac_is_deterministic_locally_administered_unicast(ip):
    mac = vtep_mac(ip)
    assert MAC.match(mac)
    first = int(mac[:2], 16)
    assert first & 0x02 and not first & 0x01
    assert vtep_mac(IPv4Address(str(ip))) == mac


def test_vtep_mac_differs_between_nodes_and_is_stable():
    macs = {vtep_mac(IPv4Address(f"10.224.{i // 256}.{i % 256}")) for i in range(4096)}
    assert len(macs) == 4096
    assert vtep_mac(IPv4Address("10.224.0.1")) == "26:24:76:e4:0c:28"  # pinned: must never change across releases


@given(st.text(min_size=1, max_size=80), st.text(min_size=1, max_size=15))
def test_host_veth_name_fits_and_is_recognised(cid, ifname):
    name = host_veth_name(cid, ifname)
    assert len(name) <= 15 and name.startswith("oc")
    assert is_pod_veth(name)
    assert host_veth_name(cid, ifname) == name


def test_host_veth_name_depends_on_both_parts():
    assert host_veth_name("abc", "eth0") != host_veth_name("abc", "eth1")
    assert host_veth_name("abc", "eth0") != host_veth_name("abd", "eth0")
    assert not is_pod_veth(VXLAN_IFNAME)
    assert not is_pod_veth("eth0")


def _state(**kw) -> NodeState:
    base = NodeState(node_ip=IPv4Address("10.224.0.1"), block=IPv4Network("10.244.1.0/24"),
                     pod_cidr=IPv4Network("10.244.0.0/16"))
    return replace(base, **kw)


def _peer(i: int, **kw) -> Peer:
    ip = IPv4Address(f"10.224.0.{i}")
    p = Peer(f"n{i}", ip, IPv4Network(f"10.244.{i}.0/24"), vtep_mac(ip))
    return replace(p, **kw)


def test_peer_objects_vxlan_in_flannel_order():
    p = _peer(2)
    objs = peer_objects(p, backend="vxlan")
    assert objs.neighbours == (Neighbour(VXLAN_IFNAME, IPv4Address("10.244.2.0"), p.vtep_mac),)
    assert objs.fdb == FdbEntry(VXLAN_IFNAME, p.vtep_mac, IPv4Address("10.224.0.2"))
    assert objs.routes == (Route(dst=p.block, dev=VXLAN_IFNAME, gateway=IPv4Address("10.244.2.0"), onlink=True),)
    assert str(objs.routes[0]) == "10.244.2.0/24 via 10.244.2.0 dev ocni.vxlan onlink"


def test_peer_objects_direct_is_one_route_via_the_node():
    objs = peer_objects(_peer(3), backend="direct")
    assert objs.neighbours == () and objs.fdb is None
    assert objs.routes == (Route(dst=IPv4Network("10.244.3.0/24"), gateway=IPv4Address("10.224.0.3")),)


def test_valid_state_passes():
    validate_state(_state(peers=(_peer(2), _peer(3)), pods=(PodEndpoint(IPv4Address("10.244.1.5"), "ocabc"),)))


@pytest.mark.parametrize(
    ("kw", "field", "words"),
    [
        ({"backend": "geneve"}, "backend", "not one of"),
        ({"block": IPv4Network("10.245.1.0/24")}, "block", "not inside"),
        ({"vni": 0}, "vni", "outside"),
        ({"vxlan_port": 70000}, "vxlan-port", "outside"),
        ({"mtu": 100}, "mtu", "outside"),
        ({"pods": (PodEndpoint(IPv4Address("10.244.2.5"), "ocabc"),)}, "pods", "outside the block"),
    ],
)
def test_invalid_state_names_the_field(kw, field, words):
    with pytest.raises(ConfigError) as exc:
        validate_state(_state(**kw))
    assert any(e.field == field and words in e.message for e in exc.value.errors), exc.value.errors


def test_peers_do_not_make_a_state_invalid():
    """A bad peer never rejects the node's state: peers are admitted one by one."""
    validate_state(_state(peers=(_peer(2), _peer(2), _peer(3, vtep_mac="zz"))))


@pytest.mark.parametrize(
    ("peers", "left_out", "words", "other"),
    [
        ((_peer(1, node_ip=IPv4Address("10.224.0.1"), block=IPv4Network("10.244.9.0/24")),), "n1", "is this node's", "this node"),
        ((_peer(2), _peer(3, block=IPv4Network("10.244.2.0/25"))), "n3", "overlaps peer n2's block 10.244.2.0/24", "peer n2"),
        ((_peer(2, block=IPv4Network("10.244.1.0/24")),), "n2", "overlaps this node's block", "this node"),
        ((_peer(2), _peer(3, node_ip=IPv4Address("10.224.0.2"))), "n3", "node IP 10.224.0.2 is peer n2's", "peer n2"),
        ((_peer(2, vtep_mac="zz"),), "n2", "not a MAC", None),
        ((_peer(2, vtep_mac="01:00:5e:00:00:01"),), "n2", "multicast", None),
        ((_peer(2), _peer(3, vtep_mac=_peer(2).vtep_mac)), "n3", "is peer n2's", "peer n2"),
        ((_peer(2, block=IPv4Network("10.245.2.0/24")),), "n2", "outside the pod CIDR", None),
    ],
)
def test_a_colliding_peer_is_left_out_alone(peers, left_out, words, other):
    good = _peer(7)
    admitted, problems = admit_peers(_state(peers=(*peers, good)))
    assert good in admitted
    assert {p.name for p in admitted} == {p.name for p in peers if p.name != left_out} | {"n7"}
    (problem,) = problems
    assert problem.peer == left_out and words in problem.message and problem.other == other, problem


@given(st.lists(st.tuples(st.integers(0, 255), st.integers(24, 26)), min_size=1, max_size=30))
def test_admitted_blocks_never_overlap_and_each_left_out_one_overlaps(blocks):
    nets = [IPv4Network((int(IPv4Address("10.244.0.0")) + (b << 8), p), strict=False) for b, p in blocks]
    peers = tuple(Peer(f"p{i}", IPv4Address(int(IPv4Address("10.224.1.0")) + i), n, vtep_mac(IPv4Address(i)))
                  for i, n in enumerate(nets))
    state = _state(block=IPv4Network("10.244.255.240/28"), peers=peers)
    admitted, problems = admit_peers(state)
    kept = [state.block, *(p.block for p in admitted)]
    assert not any(a.overlaps(b) for i, a in enumerate(kept) for b in kept[i + 1:])
    for problem in problems:  # left out only for an overlap with an earlier (kept) block
        (peer,) = [p for p in peers if p.name == problem.peer]
        assert "overlaps" in problem.message and any(peer.block.overlaps(b) for b in kept)
    assert len(admitted) + len(problems) == len(peers)


@given(st.lists(st.tuples(st.integers(0, 2**16 - 1), st.integers(16, 30)), max_size=40))
def test_block_overlap_index_agrees_with_a_pairwise_check(raw):
    """The peers' block index (used by admit_peers) admits a block exactly when
    no admitted block overlaps it, and names one that does."""
    from overlaycni.dataplane.model import _Blocks

    index, admitted = _Blocks(), []
    for n, plen in raw:
        block = IPv4Network((int(IPv4Address("10.0.0.0")) + (n << 8), plen), strict=False)
        hit = index.overlap(block)
        overlapping = [b for b in admitted if b.overlaps(block)]
        if overlapping:
            assert hit is not None and hit[0] in overlapping
            assert not any(b.supernet_of(block) for b in overlapping) or hit[0].supernet_of(block)  # a container first
        else:
            assert hit is None
            index.add(block, f"n{n}")
            admitted.append(block)
