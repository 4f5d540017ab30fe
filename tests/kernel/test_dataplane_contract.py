"""One contract for every data plane port, run against the fake and against
the Linux adapters inside a fresh namespace."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from typing import Any

import pytest

from overlaycni.dataplane import nftables, nftmodel, nftmodel6, podguard
from overlaycni.dataplane.engine import Ports
from overlaycni.dataplane.fake import FakeKernel, FakePodNetns, fake_ports
from overlaycni.dataplane.linux import LinuxDataplane
from overlaycni.dataplane.model import (
    GATEWAY_LABEL,
    VXLAN_IFNAME,
    FdbEntry,
    Neighbour,
    Route,
    VxlanSpec,
    vtep_mac,
)
from overlaycni.dataplane.policytable import PolicyTableSync
from overlaycni.errors import DataplaneError, InterfaceExists, NetnsNotFound
from overlaycni.families import PodAddress
from overlaycni.policy import parse_policies
from overlaycni.policy.render import render_node
from tests.policy_cases import build_model, case

pytestmark = pytest.mark.kernel

ME = IPv4Address("10.224.0.1")
SPEC = VxlanSpec(name=VXLAN_IFNAME, vni=4096, port=4789, local=ME, underlay="eth0", mac=vtep_mac(ME), mtu=1450)
PEER_ROUTE = Route(dst=IPv4Network("10.244.2.0/24"), dev=VXLAN_IFNAME, gateway=IPv4Address("10.244.2.0"), onlink=True)
BLOCK_ROUTE = Route(dst=IPv4Network("10.244.1.0/24"), unreachable=True)
MISSING_NETNS = "/var/run/netns/oct-does-not-exist-7f3a"


class OnWorker:
    """Calls a Linux port on the data plane's worker thread (inside the node namespace)."""

    def __init__(self, dp: LinuxDataplane, target: Any) -> None:
        self._dp, self._target = dp, target

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._target, name)
        return lambda *a, **kw: self._dp.run(lambda: fn(*a, **kw))


@pytest.fixture(params=["fake", "linux"])
def env(request, topo):
    """(ports, pod netns path) for one implementation."""
    if request.param == "fake":
        k = FakeKernel(auto_underlay=False, auto_netns=False)
        k.add_link("eth0")
        k.addresses["eth0"][IPv4Interface("10.224.0.1/16")] = None
        k.netns["/fake/pod"] = FakePodNetns()
        yield fake_ports(k), "/fake/pod"
        return
    topo.add_underlay()
    node = topo.add_node("n1", "10.224.0.1/16")
    pod = topo.add_netns("pod")
    dp = LinuxDataplane(node.ns)
    try:
        p = dp.ports
        yield Ports(**{name: OnWorker(dp, getattr(p, name)) for name in p.__dataclass_fields__}), pod
    finally:
        dp.close()


def test_links(env):
    ports, _ = env
    under = ports.links.link_with_address(ME)
    assert under is not None and under.name == "eth0" and under.mtu == 1500
    assert ports.links.link_with_address(IPv4Address("10.224.9.9")) is None
    assert ports.links.ensure_vxlan(SPEC)
    assert ports.links.ensure_vxlan(SPEC) == []
    link = ports.links.get_link(VXLAN_IFNAME)
    assert (link.kind, link.mac, link.mtu, link.up) == ("vxlan", SPEC.mac, 1450, True)
    changed = ports.links.ensure_vxlan(VxlanSpec(**{**SPEC.__dict__, "vni": 4097}))
    assert changed and ports.links.ensure_vxlan(VxlanSpec(**{**SPEC.__dict__, "vni": 4097})) == []
    assert VXLAN_IFNAME in {link.name for link in ports.links.list_links()}
    assert ports.links.delete_link(VXLAN_IFNAME) is True
    assert ports.links.delete_link(VXLAN_IFNAME) is False
    assert ports.links.get_link(VXLAN_IFNAME) is None


def test_addresses(env):
    ports, _ = env
    gw = IPv4Interface("10.244.1.1/32")
    assert ports.addresses.ensure_address("lo", gw, label=GATEWAY_LABEL) is True
    assert ports.addresses.ensure_address("lo", gw, label=GATEWAY_LABEL) is False
    assert ports.addresses.list_addresses("lo", label=GATEWAY_LABEL) == [gw]
    assert gw in ports.addresses.list_addresses("lo")
    assert ports.addresses.delete_address("lo", gw) is True
    assert ports.addresses.delete_address("lo", gw) is False
    assert ports.addresses.list_addresses("lo", label=GATEWAY_LABEL) == []
    with pytest.raises(DataplaneError, match="nope0"):
        ports.addresses.ensure_address("nope0", gw)


def test_routes(env):
    ports, _ = env
    ports.links.ensure_vxlan(SPEC)
    ports.routes.apply_routes(replace=[PEER_ROUTE, BLOCK_ROUTE])
    ports.routes.apply_routes(replace=[PEER_ROUTE, BLOCK_ROUTE])
    assert sorted(ports.routes.list_routes(), key=str) == sorted([PEER_ROUTE, BLOCK_ROUTE], key=str)
    moved = Route(dst=PEER_ROUTE.dst, dev=VXLAN_IFNAME, gateway=IPv4Address("10.244.2.9"), onlink=True)
    ports.routes.apply_routes(replace=[moved])  # replaced in place
    assert sorted(ports.routes.list_routes(), key=str) == sorted([moved, BLOCK_ROUTE], key=str)
    ports.routes.apply_routes(delete=[PEER_ROUTE, BLOCK_ROUTE])
    ports.routes.apply_routes(delete=[PEER_ROUTE, BLOCK_ROUTE])  # not found is success
    assert ports.routes.list_routes() == []
    with pytest.raises(DataplaneError, match="nope0"):
        ports.routes.apply_routes(replace=[Route(dst=IPv4Network("10.244.3.0/24"), dev="nope0", scope_link=True)])
    assert ports.routes.lookup_gateway(IPv4Address("10.224.0.2")) == (None, "eth0")
    assert ports.routes.lookup_gateway(IPv4Address("198.18.0.1")) == (None, None)


def test_neighbours_and_fdb(env):
    ports, _ = env
    ports.links.ensure_vxlan(SPEC)
    mac2, mac2b = vtep_mac(IPv4Address("10.224.0.2")), vtep_mac(IPv4Address("10.224.0.99"))
    n = Neighbour(VXLAN_IFNAME, IPv4Address("10.244.2.0"), mac2)
    f = FdbEntry(VXLAN_IFNAME, mac2, IPv4Address("10.224.0.2"))
    ports.neighbours.apply_neighbours(replace=[n])
    ports.fdb.apply_fdb(replace=[f])
    assert ports.neighbours.list_neighbours(VXLAN_IFNAME) == [n]
    assert ports.neighbours.get_neighbour(VXLAN_IFNAME, n.ip) == n
    assert ports.neighbours.get_neighbour(VXLAN_IFNAME, IPv4Address("10.244.7.0")) is None
    assert ports.fdb.list_fdb(VXLAN_IFNAME) == [f]
    n2 = Neighbour(VXLAN_IFNAME, n.ip, mac2b)  # changed in place
    f2 = FdbEntry(VXLAN_IFNAME, mac2, IPv4Address("10.224.0.20"))
    ports.neighbours.apply_neighbours(replace=[n2])
    ports.fdb.apply_fdb(replace=[f2])
    assert ports.neighbours.list_neighbours(VXLAN_IFNAME) == [n2]
    assert ports.fdb.list_fdb(VXLAN_IFNAME) == [f2]
    for _ in range(2):
        ports.fdb.apply_fdb(delete=[f2])
        ports.neighbours.apply_neighbours(delete=[n2])
    assert ports.fdb.list_fdb(VXLAN_IFNAME) == [] and ports.neighbours.list_neighbours(VXLAN_IFNAME) == []
    with pytest.raises(DataplaneError):
        ports.neighbours.apply_neighbours(replace=[Neighbour("nope0", n.ip, mac2)])


def test_nft(env):
    ports, _ = env
    assert ports.nft.get_table() is None
    assert ports.nft.list_set("node_ips") is None
    table = nftmodel.NftTable(pod_cidr=IPv4Network("10.244.0.0/16"), vxlan_port=4789, node_ips=frozenset({ME}),
                              pod_endpoints=frozenset({("oc0000000000001", IPv4Address("10.244.1.5"))}),
                              non_masquerade=frozenset({IPv4Network("10.10.0.0/16")}))
    ports.nft.apply(nftmodel.render_table(table))
    ports.nft.apply(nftmodel.render_table(table))  # atomic replace, twice
    got = ports.nft.get_table()
    assert got.fingerprint == nftmodel.fingerprint(table) and got.sets == table.sets()
    two = IPv4Address("10.224.0.2")
    ports.nft.apply(nftmodel.render_set_update("node_ips", add=[two]))
    assert ports.nft.list_set("node_ips") == {ME, two}
    with pytest.raises(DataplaneError):  # one transaction: the add is not applied either
        ports.nft.apply(nftmodel.render_set_update("node_ips", add=[IPv4Address("10.224.0.3")],
                                                   delete=[IPv4Address("10.224.0.9")]))
    assert ports.nft.list_set("node_ips") == {ME, two}


def test_nft_peer_sets_counters_and_pod_guards(env):
    """Peer sets (a raw-range concatenation, MAC ranges), named counters, the arp and ip6
    tables, and one transaction across two tables through one port."""
    ports, _ = env
    assert ports.nft.counters() == {} and ports.arp_nft.counters() == {}
    blocks = frozenset({(IPv4Address("10.224.0.2"), IPv4Network("10.244.2.0/24"))})
    macs = frozenset({("02:00:00:00:00:02", IPv4Network("10.244.2.0/24"))})
    table = nftmodel.NftTable(pod_cidr=IPv4Network("10.244.0.0/16"), vxlan_port=4789, node_ips=frozenset({ME}),
                              peer_blocks=blocks, peer_macs=macs, direct=True)
    arp = podguard.arp_table_for(IPv4Network("10.244.1.0/24"), pod_endpoints=[])
    ports.nft.apply(nftmodel.render_table(table))
    ports.arp_nft.apply(arp.layout().render(arp.sets()))
    ports.ip6_nft.apply(nftmodel6.Ip6Table().layout().render({}))
    assert ports.nft.get_table().sets == table.sets()
    assert ports.nft.counters() == dict.fromkeys(nftmodel.DROP_RULES, 0)
    assert ports.ip6_nft.counters() == dict.fromkeys(nftmodel6.SINGLE_STACK_DROP_RULES, 0)
    pod = ("oc0000000000001", IPv4Address("10.244.1.5"))
    ports.nft.apply(nftables.element_commands("add", "ip", "overlaycni", "pod_endpoints", [pod])
                    + nftables.element_commands("add", "arp", "overlaycni", "pod_endpoints", [pod]))
    assert ports.nft.list_set("pod_endpoints") == {pod} and ports.arp_nft.list_set("pod_endpoints") == {pod}
    moved = (IPv4Address("10.224.0.2"), nftables.RawRange.of(IPv4Network("10.244.2.0/25")))
    ports.nft.apply(nftables.element_commands("delete", "ip", "overlaycni", "peer_blocks", table.sets()["peer_blocks"])
                    + nftables.element_commands("add", "ip", "overlaycni", "peer_blocks", [moved]))
    assert ports.nft.list_set("peer_blocks") == {moved}


def test_policy_table(env):
    """The NetworkPolicy table port over either ``inet overlaycni`` ruleset: whole
    renders in, element updates when only pods or labels changed, the whole
    table after drift; the kernel's listing decodes to what was rendered."""
    ports, _ = env
    c = case("updated-pod-labels")
    before, after = build_model(), c.model()
    pols = parse_policies(c.manifest(after))
    old = render_node("node-1", pods=before.pods, namespaces=before.namespaces, policies=pols)
    new = render_node("node-1", pods=after.pods, namespaces=after.namespaces, policies=pols)
    table = PolicyTableSync(ports.policy_nft)
    assert ports.policy_nft.get_table() is None
    assert table.sync(old) == "full"
    assert ports.policy_nft.get_table().sets == nftables.image(old).sets
    assert table.sync(old) == "none"
    assert table.sync(new) == "elements"
    listed = ports.policy_nft.get_table().sets
    assert listed == nftables.image(new).sets
    assert any(isinstance(e, nftables.MapEntry) for e in listed["ingress-pods"])
    # drift: the element the next update deletes is gone already; the element update is refused whole
    (name, gone), = [(n, e) for n, elems in nftables.image(new).sets.items() for e in elems - nftables.image(old).sets[n]]
    ports.policy_nft.apply(nftables.element_commands("delete", "inet", "overlaycni", name, [gone]))
    assert table.sync(old) == "full"
    assert ports.policy_nft.get_table().sets == nftables.image(old).sets
    assert ports.nft.get_table() is None  # the node table is another table
    table.remove()
    table.remove()
    assert ports.policy_nft.get_table() is None


def test_sysctls(env):
    ports, _ = env
    ports.sysctls.write("net/ipv4/ip_forward", "1")
    assert ports.sysctls.read("net/ipv4/ip_forward") == "1"
    ports.sysctls.write("net/ipv4/ip_forward", "0")
    assert ports.sysctls.read("net/ipv4/ip_forward") == "0"
    with pytest.raises(DataplaneError):
        ports.sysctls.write("net/ipv4/conf/nope0/proxy_arp", "1")


def test_pod_links(env):
    ports, pod = env
    ip, gw = IPv4Interface("10.244.1.5/24"), IPv4Address("10.244.1.1")
    addrs = (PodAddress(ip, gw),)
    res = ports.pods.setup_pod_link(host_veth="oc0000000000001", ifname="eth0", netns_path=pod, addresses=addrs, mtu=1400)
    assert (res.ifname, res.mtu, res.host_veth, res.addresses) == ("eth0", 1400, "oc0000000000001", addrs)
    host = ports.links.get_link("oc0000000000001")
    assert host is not None and host.up and host.mac == res.host_mac
    view = ports.pods.inspect_pod(netns_path=pod, ifname="eth0")
    assert view.mac == res.mac and view.mtu == 1400 and view.up and ip in view.addresses
    assert Route(dst=IPv4Network("0.0.0.0/0"), dev="eth0", gateway=gw) in view.routes
    assert Route(dst=IPv4Network("10.244.1.1/32"), dev="eth0", scope_link=True) in view.routes
    with pytest.raises(InterfaceExists, match="eth0"):
        ports.pods.setup_pod_link(host_veth="oc0000000000002", ifname="eth0", netns_path=pod, addresses=addrs, mtu=1400)
    assert ports.links.get_link("oc0000000000002") is None
    ports.pods.teardown_pod_link(host_veth="oc0000000000001")
    ports.pods.teardown_pod_link(host_veth="oc0000000000001")
    assert ports.pods.inspect_pod(netns_path=pod, ifname="eth0") is None
    assert ports.links.get_link("oc0000000000001") is None
    with pytest.raises(NetnsNotFound):
        ports.pods.setup_pod_link(host_veth="oc0000000000003", ifname="eth0", netns_path=MISSING_NETNS, addresses=addrs,
                                  mtu=1400)
    assert ports.pods.inspect_pod(netns_path=MISSING_NETNS, ifname="eth0") is None


@pytest.fixture(params=["fake", "linux"])
def batch_env(request, topo):
    """(ports, four pod netns paths) for one implementation."""
    if request.param == "fake":
        k = FakeKernel(auto_underlay=False, auto_netns=False)
        paths = [f"/fake/pod{i}" for i in range(4)]
        for p in paths:
            k.netns[p] = FakePodNetns()
        yield fake_ports(k), paths
        return
    topo.add_underlay()
    node = topo.add_node("n1", "10.224.0.1/16")
    paths = [topo.add_netns(f"pod{i}") for i in range(4)]
    dp = LinuxDataplane(node.ns)
    try:
        p = dp.ports
        yield Ports(**{name: OnWorker(dp, getattr(p, name)) for name in p.__dataclass_fields__}), paths
    finally:
        dp.close()


def test_pod_links_batch(batch_env):
    """``setup_pod_links`` answers per pod: an existing interface, a missing
    namespace and a host veth held by another namespace fail alone; the
    others are configured as ``setup_pod_link`` configures one."""
    from overlaycni.dataplane import PodAttachment
    from overlaycni.errors import AttachmentConflict

    ports, (a, b, c, d) = batch_env
    gw = IPv4Address("10.244.1.1")
    ports.pods.setup_pod_link(host_veth="oc00000000000c0", ifname="eth0", netns_path=c,
                              addresses=(PodAddress(IPv4Interface("10.244.1.9/24"), gw),), mtu=1400)  # c already has its eth0
    pods = [PodAttachment(f"cid{i}", "eth0", p, IPv4Interface(f"10.244.1.{20 + i}/24"), gw, 1400)
            for i, p in enumerate([a, b, c, MISSING_NETNS])]
    pods.append(PodAttachment("cid0", "eth0", d, IPv4Interface("10.244.1.30/24"), gw, 1400))  # cid0's veth: a's
    res = ports.pods.setup_pod_links(pods[:4])
    assert isinstance(res[2], InterfaceExists) and isinstance(res[3], NetnsNotFound)
    for i, path in ((0, a), (1, b)):
        assert res[i].host_veth == pods[i].host_veth and res[i].ip == pods[i].ip and res[i].sandbox == path
        host = ports.links.get_link(pods[i].host_veth)
        assert host is not None and host.up and host.mac == res[i].host_mac
        view = ports.pods.inspect_pod(netns_path=path, ifname="eth0")
        assert view.up and view.mac == res[i].mac and pods[i].ip in view.addresses and view.mtu == 1400
        assert Route(dst=IPv4Network("0.0.0.0/0"), dev="eth0", gateway=gw) in view.routes
    assert ports.links.get_link(pods[2].host_veth) is None and ports.links.get_link(pods[3].host_veth) is None
    (conflict,) = ports.pods.setup_pod_links([pods[4]])
    assert isinstance(conflict, AttachmentConflict) and ports.pods.inspect_pod(netns_path=d, ifname="eth0") is None
    ports.pods.teardown_pod_links([pods[0].host_veth, pods[1].host_veth, "oc00000000dead0"])  # one never existed
    ports.pods.teardown_pod_links([pods[0].host_veth, pods[1].host_veth])  # already gone: success
    for path, host in ((a, pods[0].host_veth), (b, pods[1].host_veth)):
        assert ports.links.get_link(host) is None and ports.pods.inspect_pod(netns_path=path, ifname="eth0") is None
    assert ports.links.get_link("oc00000000000c0") is not None  # control: c's pod is untouched
    assert ports.pods.inspect_pod(netns_path=c, ifname="eth0") is not None


def test_pod_links_dual_stack(env):
    """A dual-stack pod: both addresses usable (none tentative), a default
    route per family, the link-local gateway on the host veth; the routes and
    addresses ports speak IPv6 (an IPv6 device route reads back as written)."""
    ports, pod = env
    v4 = PodAddress(IPv4Interface("10.244.1.5/24"), IPv4Address("10.244.1.1"))
    v6 = PodAddress(IPv6Interface("fd12:3456:789a:0:1::5/80"), IPv6Address("fe80::1"))
    res = ports.pods.setup_pod_link(host_veth="oc0000000000004", ifname="eth0", netns_path=pod, addresses=(v4, v6),
                                    mtu=1400)  # fmt: skip
    assert res.addresses == (v4, v6)
    view = ports.pods.inspect_pod(netns_path=pod, ifname="eth0")
    # usable on return; the pod's own link-local address comes (and may be tentative for a moment) when
    # the kernel sees the carrier, which it may do after ADD returned: not ours to wait for
    assert v4.ip in view.addresses and v6.ip in view.addresses and v6.ip not in view.tentative
    assert Route(dst=IPv6Network("::/0"), dev="eth0", gateway=v6.gateway) in view.routes
    assert Route(dst=IPv4Network("0.0.0.0/0"), dev="eth0", gateway=v4.gateway) in view.routes
    assert not any(r.dst == IPv6Network("fd12:3456:789a:0:1::/80") for r in view.routes)  # noprefixroute
    assert IPv6Interface("fe80::1/64") in ports.addresses.list_addresses("oc0000000000004", version=6)
    assert all(a.version == 4 for a in ports.addresses.list_addresses("oc0000000000004"))
    route = Route(dst=IPv6Network("fd12:3456:789a:0:1::5/128"), dev="oc0000000000004", scope_link=True)
    ports.routes.apply_routes(replace=[route])
    assert route in ports.routes.list_routes()
    ports.routes.apply_routes(replace=[route])  # idempotent
    assert [r for r in ports.routes.list_routes() if r.dst.version == 6] == [route]
    ports.routes.apply_routes(delete=[route, route])
    assert route not in ports.routes.list_routes()
    assert ports.addresses.ensure_address("oc0000000000004", IPv6Interface("fd00::9/64"))
    assert not ports.addresses.ensure_address("oc0000000000004", IPv6Interface("fd00::9/64"))
    assert IPv6Interface("fd00::9/64") in ports.addresses.list_addresses("oc0000000000004", version=6)
    assert ports.addresses.delete_address("oc0000000000004", IPv6Interface("fd00::9/64"))
    ports.pods.teardown_pod_link(host_veth="oc0000000000004")
    assert ports.pods.inspect_pod(netns_path=pod, ifname="eth0") is None


def test_pod_links_park(env):
    """A DEL's park: the host veth down, renamed, in the park group, its
    routes (both families) gone, its pod end still there (the pod's
    interface name is taken: the control for an ADD's drain first); one
    delete of the park group removes it and its pod end, and nothing else."""
    from overlaycni.dataplane.model import parked_veth_name

    ports, pod = env
    v4 = PodAddress(IPv4Interface("10.244.1.5/24"), IPv4Address("10.244.1.1"))
    v6 = PodAddress(IPv6Interface("fd12:3456:789a:0:1::5/80"), IPv6Address("fe80::1"))
    host, parked = "oc0000000000005", parked_veth_name("oc0000000000005")
    ports.pods.setup_pod_link(host_veth=host, ifname="eth0", netns_path=pod, addresses=(v4, v6), mtu=1400)
    routes = [Route(dst=IPv4Network("10.244.1.5/32"), dev=host, scope_link=True),
              Route(dst=IPv6Network("fd12:3456:789a:0:1::5/128"), dev=host)]
    ports.routes.apply_routes(replace=routes)
    assert {r.dst for r in ports.routes.list_routes() if r.dev == host} == {r.dst for r in routes}  # control
    ports.pods.park_pod_links([host, "oc00000000dead0"])  # one that does not exist: success
    link = ports.links.get_link(parked)
    assert ports.links.get_link(host) is None and link is not None and not link.up
    assert not [r for r in ports.routes.list_routes() if r.dev in (host, parked)]
    assert ports.pods.inspect_pod(netns_path=pod, ifname="eth0") is not None
    with pytest.raises(InterfaceExists):
        ports.pods.setup_pod_link(host_veth="oc0000000000006", ifname="eth0", netns_path=pod, addresses=(v4,), mtu=1400)
    ports.pods.park_pod_links([host])  # a second DEL: nothing to do
    ports.pods.delete_parked_links()
    assert ports.links.get_link(parked) is None and ports.pods.inspect_pod(netns_path=pod, ifname="eth0") is None
    assert ports.links.get_link("eth0") is not None  # control: the node's own link stays
    ports.pods.delete_parked_links()  # none left: success
    ports.pods.setup_pod_link(host_veth="oc0000000000006", ifname="eth0", netns_path=pod, addresses=(v4,), mtu=1400)
    ports.pods.teardown_pod_link(host_veth="oc0000000000006")
