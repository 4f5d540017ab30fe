"""The wireguard backend's logic on the in-memory fake: device, peers, routes, rotation, filters."""

from __future__ import annotations

import json
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from overlaycni.dataplane import FakeDataplane, nftmodel
from overlaycni.dataplane.model import VXLAN_IFNAME, NodeState, Peer, Route, vtep_mac
from overlaycni.dataplane.wgmodel import WG_IFNAME, PrivateKey, WgPeer
from overlaycni.errors import DataplaneError

ME = IPv4Address("10.224.0.1")
BLOCK = IPv4Network("10.244.1.0/24")
POD_CIDR = IPv4Network("10.244.0.0/16")
KEY = PrivateKey.generate()
PEER_KEYS = {i: PrivateKey.generate() for i in range(2, 6)}


def peer(i: int, *, key: PrivateKey | None = None, ip: str | None = None, port: int | None = None) -> Peer:
    node_ip = IPv4Address(ip or f"10.224.0.{i}")
    k = key or PEER_KEYS[i]
    return Peer(f"n{i}", node_ip, IPv4Network(f"10.244.{i}.0/24"), vtep_mac(node_ip), k.public, port)


def state(*peers: Peer, **kw) -> NodeState:
    base = dict(node_ip=ME, block=BLOCK, pod_cidr=POD_CIDR, backend="wireguard", wireguard_key=KEY, peers=peers)
    base.update(kw)
    return NodeState(**base)


@pytest.fixture
def dp() -> FakeDataplane:
    return FakeDataplane()


def wg_peers(dp: FakeDataplane) -> dict[str, WgPeer]:
    return dp.kernel.wireguard[WG_IFNAME].peers


def test_reconcile_programs_device_peers_routes_then_is_idempotent(dp):
    report = dp.reconcile(state(peer(2), peer(3, port=51999)))
    assert report.errors == []
    k = dp.kernel
    dev = k.wireguard[WG_IFNAME]
    assert dev.spec.key == KEY and dev.spec.listen_port == 51820 and k.links[WG_IFNAME].mtu == 1500 - 60
    assert wg_peers(dp)[PEER_KEYS[2].public] == WgPeer(PEER_KEYS[2].public, (IPv4Address("10.224.0.2"), 51820),
                                                       (IPv4Network("10.244.2.0/24"),))  # fmt: skip
    assert wg_peers(dp)[PEER_KEYS[3].public].endpoint == (IPv4Address("10.224.0.3"), 51999)
    assert k.routes[IPv4Network("10.244.2.0/24")] == Route(IPv4Network("10.244.2.0/24"), dev=WG_IFNAME, scope_link=True)
    assert k.routes[POD_CIDR].unreachable and k.routes[BLOCK].unreachable  # nothing leaves in clear
    assert VXLAN_IFNAME not in k.links and not k.neighbours and not k.fdb
    assert list(k.addresses[WG_IFNAME]) == [IPv4Interface("10.244.1.0/32")]
    assert dev.handshakes == [PEER_KEYS[2].public, PEER_KEYS[3].public]  # started at once, not on first traffic
    before = dev.transactions
    assert dp.reconcile(state(peer(2), peer(3, port=51999))).changes == []
    assert dev.transactions == before and len(dev.handshakes) == 2


def test_pod_mtu_is_underlay_minus_60():
    info = FakeDataplane(underlay_ip=ME, underlay_mtu=9000).node_info(ME, backend="wireguard", mtu=None)
    assert info.pod_mtu == 8940 and info.vtep_mac is None


def test_stale_peer_removed_after_its_route(dp):
    dp.reconcile(state(peer(2), peer(3)))
    report = dp.reconcile(state(peer(2)))
    assert report.errors == []
    assert set(wg_peers(dp)) == {PEER_KEYS[2].public}
    assert IPv4Network("10.244.3.0/24") not in dp.kernel.routes
    order = [c for c in report.changes if "10.244.3.0" in c or PEER_KEYS[3].public in c]
    assert order[0].startswith("route") and "removed" in order[-1]


def test_rotated_key_replaces_the_peer_in_one_transaction_and_keeps_the_route(dp):
    s = state(peer(2), peer(3))
    dp.reconcile(s)
    dev = dp.kernel.wireguard[WG_IFNAME]
    route = dp.kernel.routes[IPv4Network("10.244.2.0/24")]
    new = PrivateKey.generate()
    before = dev.transactions
    dp.ensure_peer(s, peer(2, key=new))
    assert dev.transactions == before + 1 and dev.handshakes[-1] == new.public
    assert set(wg_peers(dp)) == {new.public, PEER_KEYS[3].public}
    assert dp.kernel.routes[IPv4Network("10.244.2.0/24")] == route
    assert dp.last_state is not None and next(p for p in dp.last_state.peers if p.name == "n2").wg_public_key == new.public
    # a full reconcile agrees: nothing left to do
    assert dp.reconcile(state(peer(2, key=new), peer(3))).changes == []


def test_own_key_rotation_sets_the_device_key_only(dp):
    dp.reconcile(state(peer(2)))
    new = PrivateKey.generate()
    report = dp.reconcile(state(peer(2), wireguard_key=new))
    assert report.errors == [] and dp.kernel.wireguard[WG_IFNAME].spec.key == new
    assert report.changes == [f"wireguard device {WG_IFNAME} private key set (public key {new.public})"]
    assert new.to_base64() not in json.dumps(report.changes)


def test_peer_without_a_key_is_skipped_and_reported(dp):
    keyless = replace(peer(3), wg_public_key=None)
    bad = replace(peer(4), wg_public_key="not-a-key")
    report = dp.reconcile(state(peer(2), keyless, bad))
    assert set(wg_peers(dp)) == {PEER_KEYS[2].public}
    assert any("n3" in e and "no WireGuard public key" in e for e in report.errors)
    assert any("n4" in e and "32 bytes" in e for e in report.errors)
    assert IPv4Network("10.244.3.0/24") not in dp.kernel.routes  # no route into a tunnel without a peer
    with pytest.raises(DataplaneError, match="n3"):
        dp.ensure_peer(state(peer(2)), keyless)


def test_incremental_add_and_delete(dp):
    s = state(peer(2))
    dp.reconcile(s)
    dp.ensure_peer(s, peer(3))
    assert PEER_KEYS[3].public in wg_peers(dp) and IPv4Network("10.244.3.0/24") in dp.kernel.routes
    assert IPv4Address("10.224.0.3") in dp.kernel.nft.sets["node_ips"]
    dp.delete_peer(state(peer(2), peer(3)), peer(3))
    dp.delete_peer(state(peer(2), peer(3)), peer(3))  # not found is success
    assert set(wg_peers(dp)) == {PEER_KEYS[2].public}
    assert IPv4Network("10.244.3.0/24") not in dp.kernel.routes
    assert [p.name for p in dp.last_state.peers] == ["n2"]


def test_no_private_key_is_an_error_not_a_crash(dp):
    report = dp.reconcile(state(peer(2), wireguard_key=None))
    assert any("private key" in e for e in report.errors)


def test_switching_backend_removes_the_device(dp):
    dp.reconcile(state(peer(2)))
    report = dp.reconcile(state(peer(2), backend="vxlan"))
    assert WG_IFNAME not in dp.kernel.links and WG_IFNAME not in dp.kernel.wireguard
    assert any("deleted" in c and WG_IFNAME in c for c in report.changes)
    assert dp.kernel.routes[POD_CIDR].unreachable and VXLAN_IFNAME in dp.kernel.links  # the catch-all is every backend's
    dp.reconcile(state(peer(2)))
    assert VXLAN_IFNAME not in dp.kernel.links and WG_IFNAME in dp.kernel.links


def test_a_dead_device_is_recreated_with_its_peers(dp):
    s = state(peer(2), peer(3))
    dp.reconcile(s)
    starts = dp.kernel.wireguard_starts
    from overlaycni.dataplane.fake import FakeLinks

    FakeLinks(dp.kernel).delete_link(WG_IFNAME)  # wireguard-go died: the TUN and its routes are gone
    assert IPv4Network("10.244.2.0/24") not in dp.kernel.routes
    report = dp.reconcile(dp.last_state)
    assert report.errors == [] and dp.kernel.wireguard_starts == starts + 1
    assert set(wg_peers(dp)) == {PEER_KEYS[2].public, PEER_KEYS[3].public}
    assert IPv4Network("10.244.2.0/24") in dp.kernel.routes


def test_nft_table_treats_ocni_wg_as_the_tunnel_and_drops_pod_sources_from_elsewhere():
    t = nftmodel.table_for(state(peer(2)), pod_endpoints=[])
    assert t.vxlan_ifname == WG_IFNAME and not t.direct
    chains = dict((c["name"], rules) for c, rules in nftmodel._chains(t))
    pre = chains["prerouting"]
    assert any(m.get("match", {}).get("right") == WG_IFNAME for m in pre[0])
    underlay = pre[1]  # a pod-CIDR source from anywhere but lo, a pod veth or the tunnel (oc*)
    assert underlay[0]["match"]["right"] == {"prefix": {"addr": "10.244.0.0", "len": 16}}
    assert underlay[-1] == {"jump": {"target": "underlay_in"}}
    assert chains["underlay_in"] == [[{"counter": "underlay_pod_source"}, {"drop": None}]]  # no peer is exempt
    vx = nftmodel.table_for(state(peer(2), backend="vxlan"), pod_endpoints=[])
    assert vx.vxlan_ifname == VXLAN_IFNAME
    assert nftmodel.fingerprint(vx) != nftmodel.fingerprint(t)
