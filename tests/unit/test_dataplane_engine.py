"""The data plane logic on the in-memory fake: reconcile, peers, pods, errors."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from overlaycni.dataplane import FakeDataplane, host_veth_name
from overlaycni.dataplane.fake import FakeKernel
from overlaycni.dataplane.model import VXLAN_IFNAME, NodeState, Peer, PodEndpoint, Route, vtep_mac
from overlaycni.errors import ConfigError, DataplaneError, InterfaceExists, NetnsNotFound, PeerNotAdjacent, UnderlayNotFound
from overlaycni.families import PodAddress

ME = IPv4Address("10.224.0.1")
GW = IPv4Address("10.244.1.1")


def peer(i: int, *, ip: str | None = None) -> Peer:
    node_ip = IPv4Address(ip or f"10.224.0.{i}")
    return Peer(f"n{i}", node_ip, IPv4Network(f"10.244.{i}.0/24"), vtep_mac(node_ip))


def state(*peers: Peer, **kw) -> NodeState:
    return NodeState(node_ip=ME, block=IPv4Network("10.244.1.0/24"), pod_cidr=IPv4Network("10.244.0.0/16"),
                     peers=peers, **kw)


@pytest.fixture
def dp() -> FakeDataplane:
    return FakeDataplane()


def test_reconcile_programs_everything_then_is_idempotent(dp):
    report = dp.reconcile(state(peer(2), peer(3)))
    assert report.errors == [] and report.changes
    k = dp.kernel
    assert k.vxlan[VXLAN_IFNAME].vni == 4096 and k.vxlan[VXLAN_IFNAME].mac == vtep_mac(ME)
    assert k.links[VXLAN_IFNAME].mtu == 1450
    assert {n.ip for n in k.neighbours.values()} == {IPv4Address("10.244.2.0"), IPv4Address("10.244.3.0")}
    assert {f.dst for f in k.fdb.values()} == {IPv4Address("10.224.0.2"), IPv4Address("10.224.0.3")}
    assert IPv4Network("10.244.2.0/24") in k.routes and k.routes[IPv4Network("10.244.1.0/24")].unreachable
    assert k.sysctls["net/ipv4/ip_forward"] == "1"
    assert k.nft is not None and k.nft.sets["node_ips"] == {ME, IPv4Address("10.224.0.2"), IPv4Address("10.224.0.3")}
    assert dp.reconcile(state(peer(2), peer(3))).changes == []


def test_stale_peer_is_removed_and_changed_peer_updated_in_place(dp):
    dp.reconcile(state(peer(2), peer(3)))
    moved = peer(2, ip="10.224.0.22")
    report = dp.reconcile(state(moved))
    assert report.errors == []
    k = dp.kernel
    assert IPv4Network("10.244.3.0/24") not in k.routes
    assert {f.dst for f in k.fdb.values()} == {IPv4Address("10.224.0.22")}
    assert k.neighbours[(VXLAN_IFNAME, IPv4Address("10.244.2.0"))].mac == moved.vtep_mac
    assert k.nft.sets["node_ips"] == {ME, moved.node_ip}
    assert dp.reconcile(state(moved)).changes == []


def test_incremental_peer_add_update_remove(dp):
    s = state(peer(2))
    dp.reconcile(s)
    p3 = peer(3)
    dp.ensure_peer(s, p3)
    assert IPv4Network("10.244.3.0/24") in dp.kernel.routes
    assert IPv4Address("10.224.0.3") in dp.kernel.nft.sets["node_ips"]
    moved = peer(3, ip="10.224.0.33")
    dp.ensure_peer(s, moved)
    assert {f.mac for f in dp.kernel.fdb.values()} == {peer(2).vtep_mac, moved.vtep_mac}
    dp.delete_peer(s, moved)
    dp.delete_peer(s, moved)  # not found is success
    assert IPv4Network("10.244.3.0/24") not in dp.kernel.routes
    assert IPv4Address("10.224.0.33") not in dp.kernel.nft.sets["node_ips"]


def test_direct_backend_routes_via_node_and_rejects_non_adjacent_peer():
    k = FakeKernel(auto_underlay=False, default_gateway=IPv4Address("10.224.255.254"))
    dp = FakeDataplane(k)
    k.add_link("eth0")
    k.addresses["eth0"][IPv4Interface("10.224.0.1/16")] = None
    far = peer(5, ip="10.225.0.5")
    report = dp.reconcile(state(peer(2), far, backend="direct"))
    assert VXLAN_IFNAME not in k.links
    assert k.routes[IPv4Network("10.244.2.0/24")] == Route(dst=IPv4Network("10.244.2.0/24"), gateway=IPv4Address("10.224.0.2"))
    assert IPv4Network("10.244.5.0/24") not in k.routes
    assert len(report.errors) == 1 and "10.225.0.5" in report.errors[0] and "L2" in report.errors[0]
    with pytest.raises(PeerNotAdjacent):
        dp.ensure_peer(state(backend="direct"), far)
    assert dp.node_info(ME, backend="direct", mtu=None).pod_mtu == 1500


def test_switching_backend_removes_the_vxlan_device(dp):
    dp.reconcile(state(peer(2)))
    dp.reconcile(state(peer(2), backend="direct"))
    assert VXLAN_IFNAME not in dp.kernel.links and not dp.kernel.fdb and not dp.kernel.neighbours


def test_node_info_errors():
    dp = FakeDataplane(FakeKernel(auto_underlay=False))
    with pytest.raises(UnderlayNotFound, match="10.224.0.1"):
        dp.node_info(ME, backend="vxlan", mtu=None)
    with pytest.raises(ConfigError, match="mtu"):
        FakeDataplane().node_info(ME, backend="vxlan", mtu=1460)


def attach(dp, cid="c1", ifname="eth0", path="/var/run/netns/p1", ip="10.244.1.5/24", **kw):
    return dp.attach_pod(container_id=cid, ifname=ifname, netns_path=path, addresses=(PodAddress(IPv4Interface(ip), GW),),
                         mtu=kw.get("mtu", 1450))


def test_attach_check_detach(dp):
    dp.reconcile(state())
    pod = attach(dp)
    host = host_veth_name("c1", "eth0")
    assert pod.host_veth == host and pod.ifname == "eth0" and pod.mtu == 1450
    assert dp.kernel.routes[IPv4Network("10.244.1.5/32")].dev == host
    assert dp.kernel.sysctls[f"net/ipv4/conf/{host}/proxy_arp"] == "1"
    assert (host, IPv4Address("10.244.1.5")) in dp.kernel.nft.sets["pod_endpoints"]
    assert dp.check_pod(container_id="c1", ifname="eth0", netns_path="/var/run/netns/p1",
                        addresses=(PodAddress(IPv4Interface("10.244.1.5/24"), GW),)) == []
    assert dp.list_pod_veths() == [host]
    dp.kernel.nft.sets["pod_endpoints"] = frozenset()
    problems = dp.check_pod(container_id="c1", ifname="eth0", netns_path="/var/run/netns/p1",
                            addresses=(PodAddress(IPv4Interface("10.244.1.5/24"), GW),))
    assert len(problems) == 1 and "anti-spoofing" in problems[0]
    dp.detach_pod(container_id="c1", ifname="eth0", netns_path="/var/run/netns/p1")
    dp.detach_pod(container_id="c1", ifname="eth0", netns_path=None)
    assert dp.list_pod_veths() == [] and IPv4Network("10.244.1.5/32") not in dp.kernel.routes
    assert dp.kernel.nft.sets["pod_endpoints"] == frozenset()
    problems = dp.check_pod(container_id="c1", ifname="eth0", netns_path="/var/run/netns/p1",
                            addresses=(PodAddress(IPv4Interface("10.244.1.5/24"), GW),))
    assert any("missing" in p for p in problems)


def test_attach_twice_is_interface_exists(dp):
    attach(dp)
    with pytest.raises(InterfaceExists, match="eth0"):
        attach(dp, cid="c2")


def test_attach_missing_netns(dp):
    dp.remove_netns("/gone")
    with pytest.raises(NetnsNotFound, match="/gone"):
        attach(dp, path="/gone")
    assert dp.list_pod_veths() == []


@pytest.mark.parametrize(
    ("kw", "field"),
    [({"cid": ""}, "container_id"), ({"ifname": "a" * 16}, "ifname"), ({"ifname": "a/b"}, "ifname"),
     ({"ip": "10.244.2.5/24"}, "gateway"), ({"mtu": 100}, "mtu")],
)
def test_attach_bad_input_names_field_and_leaves_nothing(dp, kw, field):
    with pytest.raises(ConfigError) as exc:
        attach(dp, **kw)
    assert exc.value.errors[0].field == field
    assert dp.list_pod_veths() == [] and not dp.kernel.routes


def test_attach_rolls_back_on_late_failure(dp):
    dp.reconcile(state())
    dp.kernel.fail_next["nft"] = DataplaneError("nft exploded")
    with pytest.raises(DataplaneError, match="exploded"):
        attach(dp)
    assert dp.list_pod_veths() == []
    assert IPv4Network("10.244.1.5/32") not in dp.kernel.routes
    assert dp.kernel.netns["/var/run/netns/p1"].links == {}
    assert dp.kernel.nft.sets["pod_endpoints"] == frozenset()


def test_reconcile_keeps_racing_pods_and_adds_known_ones(dp):
    dp.reconcile(state())
    pod = attach(dp)  # not yet in the state the agent computed
    report = dp.reconcile(state())
    assert report.changes == []
    assert IPv4Network("10.244.1.5/32") in dp.kernel.routes
    # The agent now knows the pod; a lost set element is restored.
    dp.kernel.nft.sets["pod_endpoints"] = frozenset()
    s = state(pods=(PodEndpoint(IPv4Address("10.244.1.5"), pod.host_veth),))
    assert dp.reconcile(s).changes and (pod.host_veth, IPv4Address("10.244.1.5")) in dp.kernel.nft.sets["pod_endpoints"]
    assert dp.reconcile(s).changes == []


def test_reconcile_rejects_bad_state_without_touching_anything(dp):
    with pytest.raises(ConfigError, match="backend"):
        dp.reconcile(replace(state(), backend="ipip"))
    assert dp.kernel.links.keys() <= {"lo"} and not dp.kernel.routes and dp.kernel.nft is None


def test_delete_pod_veth_for_gc(dp):
    dp.reconcile(state())
    pod = attach(dp)
    with pytest.raises(ConfigError, match="host_veth"):
        dp.delete_pod_veth("eth0")
    dp.delete_pod_veth(pod.host_veth)
    dp.delete_pod_veth(pod.host_veth)
    assert dp.list_pod_veths() == [] and dp.kernel.nft.sets["pod_endpoints"] == frozenset()


def test_fake_with_an_underlay_address():
    dp = FakeDataplane(underlay_ip=IPv4Address("10.224.0.7"), underlay_mtu=9000)
    info = dp.node_info(IPv4Address("10.224.0.7"), backend="vxlan", mtu=None)
    assert (info.underlay_ifname, info.underlay_mtu, info.pod_mtu) == ("eth0", 9000, 8950)
