"""Reconcile and pod attach on Linux, checked with ip -j / bridge -j / nft -j / sysctl."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from overlaycni.dataplane.linux import LinuxDataplane
from overlaycni.dataplane.model import NodeState, Peer, PodEndpoint, host_veth_name, vtep_mac
from overlaycni.errors import ConfigError, DataplaneError, InterfaceExists, NetnsNotFound, PeerNotAdjacent
from overlaycni.families import PodAddress
from tests.kernel.topology import ip_json, run

pytestmark = pytest.mark.kernel

ME = IPv4Address("10.224.0.1")
BLOCK = IPv4Network("10.244.1.0/24")
POD_CIDR = IPv4Network("10.244.0.0/16")
GW = IPv4Address("10.244.1.1")


def peer(i: int, ip: str | None = None) -> Peer:
    node_ip = IPv4Address(ip or f"10.224.0.{i}")
    return Peer(f"n{i}", node_ip, IPv4Network(f"10.244.{i}.0/24"), vtep_mac(node_ip))


def state(*peers: Peer, **kw) -> NodeState:
    return NodeState(node_ip=ME, block=BLOCK, pod_cidr=POD_CIDR, peers=peers, **kw)


@pytest.fixture
def node(node_ns):
    topo, n = node_ns
    dp = LinuxDataplane(n.ns)
    try:
        yield topo, n.ns, dp
    finally:
        dp.close()


def kernel_view(ns: str) -> dict:
    """The owned objects as the iproute2/nft tools report them."""
    routes = {(r["dst"], r.get("gateway"), r.get("dev"), r.get("type", "unicast")) for r in
              ip_json(ns, "route", "show", "proto", "119")}
    neigh = {(n["dst"], n["lladdr"]) for n in ip_json(ns, "neigh", "show", "dev", "ocni.vxlan", "nud", "permanent")}
    fdb = {(f["mac"], f["dst"]) for f in json.loads(run("bridge", "-n", ns, "-j", "fdb", "show", "dev", "ocni.vxlan").stdout)
           if "dst" in f}
    nodes = json.loads(run("ip", "netns", "exec", ns, "nft", "-j", "list", "set", "ip", "overlaycni", "node_ips").stdout)
    node_ips = set(next(i["set"] for i in nodes["nftables"] if "set" in i).get("elem", []))
    return {"routes": routes, "neigh": neigh, "fdb": fdb, "node_ips": node_ips}


def test_reconcile_vxlan_node(node):
    topo, ns, dp = node
    report = dp.reconcile(state(peer(2), peer(3)))
    assert report.errors == [] and report.changes
    link = ip_json(ns, "-d", "link", "show", "ocni.vxlan")[0]
    data = link["linkinfo"]["info_data"]
    assert (data["id"], data["port"], data["local"], data["learning"], data["link"]) == (4096, 4789, "10.224.0.1", False, "eth0")
    assert link["mtu"] == 1450 and link["address"] == vtep_mac(ME) and "UP" in link["flags"]
    addrs = ip_json(ns, "addr", "show", "dev", "ocni.vxlan")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"] == [("10.244.1.0", 32)]
    lo = ip_json(ns, "addr", "show", "dev", "lo")[0]["addr_info"]
    assert any(a["local"] == "10.244.1.1" and a.get("label") == "lo:ocni" for a in lo)
    view = kernel_view(ns)
    assert view["routes"] == {
        ("10.244.2.0/24", "10.244.2.0", "ocni.vxlan", "unicast"),
        ("10.244.3.0/24", "10.244.3.0", "ocni.vxlan", "unicast"),
        ("10.244.1.0/24", None, None, "unreachable"),
        ("10.244.0.0/16", None, None, "unreachable"),  # the pod CIDR catch-all
    }
    assert view["neigh"] == {("10.244.2.0", peer(2).vtep_mac), ("10.244.3.0", peer(3).vtep_mac)}
    assert view["fdb"] == {(peer(2).vtep_mac, "10.224.0.2"), (peer(3).vtep_mac, "10.224.0.3")}
    assert view["node_ips"] == {"10.224.0.1", "10.224.0.2", "10.224.0.3"}
    assert topo.exec(ns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    assert dp.reconcile(state(peer(2), peer(3))).changes == []


def chain_handles(topo, ns: str) -> dict[str, int]:
    doc = json.loads(topo.exec(ns, "nft", "-j", "list", "table", "ip", "overlaycni").stdout)
    return {i["chain"]["name"]: i["chain"]["handle"] for i in doc["nftables"] if "chain" in i}


def test_fresh_process_adopts_then_removes_stale_and_updates_changed_peer(node):
    topo, ns, dp = node
    dp.reconcile(state(peer(2), peer(3), peer(4)))
    dp.close()
    handles = chain_handles(topo, ns)
    fresh = LinuxDataplane(ns)  # the agent restarted; node 3 was deleted and node 2 moved meanwhile
    try:
        assert fresh.reconcile(state(peer(2), peer(3), peer(4))).changes == []
        moved = peer(2, ip="10.224.0.22")
        report = fresh.reconcile(state(moved, peer(4)))
        assert report.errors == []
        view = kernel_view(ns)
        assert {r[0] for r in view["routes"]} == {"10.244.2.0/24", "10.244.4.0/24", "10.244.1.0/24", "10.244.0.0/16"}
        assert view["neigh"] == {("10.244.2.0", moved.vtep_mac), ("10.244.4.0", peer(4).vtep_mac)}
        assert view["fdb"] == {(moved.vtep_mac, "10.224.0.22"), (peer(4).vtep_mac, "10.224.0.4")}
        assert view["node_ips"] == {"10.224.0.1", "10.224.0.22", "10.224.0.4"}
        assert chain_handles(topo, ns) == handles  # only set elements changed, the chains were not rebuilt
        assert fresh.reconcile(state(moved, peer(4))).changes == []
    finally:
        fresh.close()


def test_incremental_peer_add_and_remove(node):
    topo, ns, dp = node
    s = state(peer(2))
    dp.reconcile(s)
    dp.ensure_peer(s, peer(5))
    view = kernel_view(ns)
    assert ("10.244.5.0/24", "10.244.5.0", "ocni.vxlan", "unicast") in view["routes"]
    assert (peer(5).vtep_mac, "10.224.0.5") in view["fdb"] and "10.224.0.5" in view["node_ips"]
    dp.delete_peer(s, peer(5))
    dp.delete_peer(s, peer(5))
    view = kernel_view(ns)
    assert all(r[0] != "10.244.5.0/24" for r in view["routes"])
    assert all(f[1] != "10.224.0.5" for f in view["fdb"]) and "10.224.0.5" not in view["node_ips"]
    assert all(n[0] != "10.244.5.0" for n in view["neigh"])


def test_peer_batch_skips_a_bad_peer_and_programs_the_others(node):
    """``ensure_peers`` / ``delete_peers`` on Linux: one pass for the batch; a
    peer whose node IP another peer holds is returned, not programmed; the
    others are (control: each of them is in the kernel, the bad one not)."""
    topo, ns, dp = node
    s0 = state(peer(2))
    dp.reconcile(s0)
    bad = peer(6, ip="10.224.0.2")  # n2's node IP
    batch = [peer(3), bad, peer(4)]
    s = state(peer(2), *batch)
    failed = dp.ensure_peers(s, batch)
    assert list(failed) == ["n6"] and isinstance(failed["n6"], ConfigError) and "peer n2's" in str(failed["n6"])
    view = kernel_view(ns)
    assert {r[0] for r in view["routes"]} == {"10.244.2.0/24", "10.244.3.0/24", "10.244.4.0/24", "10.244.1.0/24",
                                              "10.244.0.0/16"}
    assert view["fdb"] == {(peer(i).vtep_mac, f"10.224.0.{i}") for i in (2, 3, 4)}
    assert view["neigh"] == {(f"10.244.{i}.0", peer(i).vtep_mac) for i in (2, 3, 4)}
    assert view["node_ips"] == {"10.224.0.1", "10.224.0.2", "10.224.0.3", "10.224.0.4"}
    dp.delete_peers(state(peer(2), peer(3), peer(4)), [peer(2), peer(4)])  # the programmed peers before
    view = kernel_view(ns)
    assert {r[0] for r in view["routes"]} == {"10.244.3.0/24", "10.244.1.0/24", "10.244.0.0/16"}
    assert view["fdb"] == {(peer(3).vtep_mac, "10.224.0.3")} and view["node_ips"] == {"10.224.0.1", "10.224.0.3"}
    assert dp.reconcile(state(peer(3))).changes == []  # the batches left exactly what a reconcile wants


def test_incompatible_vxlan_device_is_rebuilt(node):
    topo, ns, dp = node
    run("ip", "-n", ns, "link", "add", "ocni.vxlan", "type", "vxlan", "id", "77", "dstport", "4789", "local", "10.224.0.1",
        "dev", "eth0", "learning")
    report = dp.reconcile(state(peer(2)))
    assert any("incompatible" in c for c in report.changes)
    data = ip_json(ns, "-d", "link", "show", "ocni.vxlan")[0]["linkinfo"]["info_data"]
    assert data["id"] == 4096 and data["learning"] is False
    assert (peer(2).vtep_mac, "10.224.0.2") in kernel_view(ns)["fdb"]


def test_direct_backend_and_non_adjacent_peer(node):
    topo, ns, dp = node
    dp.reconcile(state(peer(2)))
    run("ip", "-n", ns, "route", "add", "10.225.0.0/16", "via", "10.224.0.254")
    far = peer(5, ip="10.225.0.5")
    report = dp.reconcile(state(peer(2), far, backend="direct"))
    assert len(report.errors) == 1 and "10.225.0.5" in report.errors[0] and "L2 segment" in report.errors[0]
    routes = {(r["dst"], r.get("gateway")) for r in ip_json(ns, "route", "show", "proto", "119")}
    assert routes == {("10.244.2.0/24", "10.224.0.2"), ("10.244.1.0/24", None), ("10.244.0.0/16", None)}
    assert ip_json(ns, "link", "show") and not any(link["ifname"] == "ocni.vxlan" for link in ip_json(ns, "link", "show"))
    with pytest.raises(PeerNotAdjacent, match="10.225.0.5"):
        dp.ensure_peer(state(backend="direct"), far)
    assert dp.node_info(ME, backend="direct", mtu=None).pod_mtu == 1500


def attach(dp, path, cid="c1", ifname="eth0", ip="10.244.1.5/24"):
    return dp.attach_pod(container_id=cid, ifname=ifname, netns_path=path, addresses=(PodAddress(IPv4Interface(ip), GW),), mtu=1450)


def pod_veths(ns: str) -> list[str]:
    return [link["ifname"] for link in ip_json(ns, "link", "show") if link["ifname"].startswith("oc") and link["ifname"] != "ocni.vxlan"]


def test_attach_detach_check(node):
    topo, ns, dp = node
    dp.reconcile(state())
    path = topo.add_netns("pod")
    pod_ns = topo.ns_name("pod")
    res = attach(dp, path)
    host = host_veth_name("c1", "eth0")
    assert res.host_veth == host and pod_veths(ns) == [host] and dp.list_pod_veths() == [host]
    eth0 = ip_json(pod_ns, "addr", "show", "dev", "eth0")[0]
    assert eth0["mtu"] == 1450 and eth0["address"] == res.mac
    assert [(a["local"], a["prefixlen"]) for a in eth0["addr_info"] if a["family"] == "inet"] == [("10.244.1.5", 24)]
    pod_routes = {(r["dst"], r.get("gateway"), r.get("scope")) for r in ip_json(pod_ns, "route", "show")}
    assert ("default", "10.244.1.1", None) in pod_routes and ("10.244.1.1", None, "link") in pod_routes
    assert {(r["dst"], r.get("dev")) for r in ip_json(ns, "route", "show", "proto", "119")} >= {("10.244.1.5", host)}
    assert topo.exec(ns, "sysctl", "-n", f"net.ipv4.conf.{host}.proxy_arp").stdout.strip() == "1"
    elems = json.loads(topo.exec(ns, "nft", "-j", "list", "set", "ip", "overlaycni", "pod_endpoints").stdout)
    assert {"concat": [host, "10.244.1.5"]} in next(i["set"] for i in elems["nftables"] if "set" in i)["elem"]
    assert dp.check_pod(container_id="c1", ifname="eth0", netns_path=path, addresses=(PodAddress(IPv4Interface("10.244.1.5/24"), GW),)) == []
    run("ip", "-n", pod_ns, "route", "del", "default")
    problems = dp.check_pod(container_id="c1", ifname="eth0", netns_path=path, addresses=(PodAddress(IPv4Interface("10.244.1.5/24"), GW),))
    assert any("default route" in p for p in problems)
    with pytest.raises(InterfaceExists, match="eth0"):
        attach(dp, path, cid="c2")
    assert pod_veths(ns) == [host]
    dp.detach_pod(container_id="c1", ifname="eth0", netns_path=path)
    dp.detach_pod(container_id="c1", ifname="eth0", netns_path=path)
    assert pod_veths(ns) == []
    assert [link["ifname"] for link in ip_json(pod_ns, "link", "show")] == ["lo"]
    assert not any(r["dst"] == "10.244.1.5" for r in ip_json(ns, "route", "show", "proto", "119"))
    elems = json.loads(topo.exec(ns, "nft", "-j", "list", "set", "ip", "overlaycni", "pod_endpoints").stdout)
    assert "elem" not in next(i["set"] for i in elems["nftables"] if "set" in i)


def test_delete_pod_veth_for_gc(node):
    topo, ns, dp = node
    dp.reconcile(state())
    res = attach(dp, topo.add_netns("pod"))
    dp.delete_pod_veth(res.host_veth)
    dp.delete_pod_veth(res.host_veth)
    assert pod_veths(ns) == []
    elems = json.loads(topo.exec(ns, "nft", "-j", "list", "set", "ip", "overlaycni", "pod_endpoints").stdout)
    assert "elem" not in next(i["set"] for i in elems["nftables"] if "set" in i)


def test_detach_after_sandbox_vanished(node):
    topo, ns, dp = node
    dp.reconcile(state())
    path = topo.add_netns("gone")
    attach(dp, path)
    run("ip", "netns", "del", topo.ns_name("gone"))
    topo.namespaces.remove(topo.ns_name("gone"))
    dp.detach_pod(container_id="c1", ifname="eth0", netns_path=path)
    assert pod_veths(ns) == []


def test_attach_errors_leave_nothing(node, monkeypatch):
    topo, ns, dp = node
    dp.reconcile(state())
    with pytest.raises(NetnsNotFound, match="oct-no-such"):
        attach(dp, "/var/run/netns/oct-no-such-netns")
    with pytest.raises(ConfigError) as exc:
        attach(dp, "/var/run/netns/x", ip="10.244.9.5/24")
    assert exc.value.errors[0].field == "gateway"
    path = topo.add_netns("pod")
    monkeypatch.setattr(dp.ports.nft, "apply", lambda cmds: (_ for _ in ()).throw(DataplaneError("nft refused")))
    with pytest.raises(DataplaneError, match="nft refused"):
        attach(dp, path)
    assert pod_veths(ns) == []
    assert [link["ifname"] for link in ip_json(topo.ns_name("pod"), "link", "show")] == ["lo"]
    assert not any(r["dst"] == "10.244.1.5" for r in ip_json(ns, "route", "show", "proto", "119"))


def test_pods_from_state_survive_reconcile(node):
    topo, ns, dp = node
    dp.reconcile(state())
    res = attach(dp, topo.add_netns("pod"))
    s = state(pods=(PodEndpoint(IPv4Address("10.244.1.5"), res.host_veth),))
    assert dp.reconcile(s).changes == []
    run("ip", "-n", ns, "route", "del", "10.244.1.5/32")  # lost: the next reconcile restores it
    assert dp.reconcile(s).changes
    assert any(r["dst"] == "10.244.1.5" and r.get("dev") == res.host_veth for r in ip_json(ns, "route", "show", "proto", "119"))


def test_concurrent_attaches_from_many_threads(node):
    """The agent serves one CNI request per thread: all of them must land, none interleave badly."""
    from concurrent.futures import ThreadPoolExecutor

    topo, ns, dp = node
    dp.reconcile(state())
    paths = [topo.add_netns(f"p{i}") for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: attach(dp, paths[i], cid=f"c{i}", ip=f"10.244.1.{10 + i}/24"), range(8)))
    assert sorted(pod_veths(ns)) == sorted(r.host_veth for r in results)
    routes = {(r["dst"], r.get("dev")) for r in ip_json(ns, "route", "show", "proto", "119")}
    assert all((f"10.244.1.{10 + i}", results[i].host_veth) in routes for i in range(8))
    for i in range(8):
        assert topo.ping(topo.ns_name(f"p{i}"), "10.244.1.1")
    assert topo.ping(topo.ns_name("p0"), "10.244.1.17")  # same-node pod to pod (proxy ARP on the host veths)


def test_batched_routes_report_the_failing_one(node):
    """600 routes in one batch (three netlink chunks), one of them impossible: the error names
    exactly that route and every other route is installed."""
    from overlaycni.dataplane.model import Route

    topo, ns, dp = node
    good = [Route(dst=IPv4Network(f"10.250.{i // 256}.{i % 256}/32"), gateway=IPv4Address("10.224.0.9")) for i in range(600)]
    bad = Route(dst=IPv4Network("10.251.0.0/24"), gateway=IPv4Address("10.99.0.1"))  # gateway not on any link
    batch = good[:300] + [bad] + good[300:]
    with pytest.raises(DataplaneError) as exc:
        dp.run(lambda: dp.ports.routes.apply_routes(replace=batch))
    assert "10.251.0.0/24 via 10.99.0.1" in exc.value.message and "1 change(s)" in exc.value.message
    installed = {r["dst"] for r in ip_json(ns, "route", "show", "proto", "119")}
    assert installed == {str(r.dst.network_address) for r in good}


def test_attach_and_detach_a_batch(node):
    """Group commit on the kernel: one ``attach_pods`` for five pods, one of which
    already has an eth0 (it fails alone, leaving nothing), then one ``detach_pods``."""
    from overlaycni.dataplane import PodAttachment

    topo, ns, dp = node
    dp.reconcile(state())
    paths = [topo.add_netns(f"b{i}") for i in range(5)]
    busy = topo.ns_name("b3")
    run("ip", "-n", busy, "link", "add", "eth0", "type", "veth", "peer", "name", "other0")  # the pod's own eth0
    pods = [PodAttachment(f"b{i}", "eth0", p, IPv4Interface(f"10.244.1.{10 + i}/24"), GW, 1450) for i, p in enumerate(paths)]
    res = dp.attach_pods(pods)
    assert isinstance(res[3], InterfaceExists) and "eth0" in str(res[3])
    good = [i for i in range(5) if i != 3]
    assert sorted(pod_veths(ns)) == sorted(host_veth_name(f"b{i}", "eth0") for i in good)
    routes = {(r["dst"], r.get("dev")) for r in ip_json(ns, "route", "show", "proto", "119")}
    elems = json.loads(topo.exec(ns, "nft", "-j", "list", "set", "ip", "overlaycni", "pod_endpoints").stdout)
    elems = next(i["set"] for i in elems["nftables"] if "set" in i)["elem"]
    for i in good:
        host, ip = host_veth_name(f"b{i}", "eth0"), f"10.244.1.{10 + i}"
        assert res[i].host_veth == host and res[i].ip == pods[i].ip
        pod = ip_json(topo.ns_name(f"b{i}"), "addr", "show", "dev", "eth0")[0]
        assert pod["address"] == res[i].mac and "UP" in pod["flags"]
        assert [(a["local"], a["prefixlen"]) for a in pod["addr_info"] if a["family"] == "inet"] == [(ip, 24)]
        assert ip_json(ns, "link", "show", "dev", host)[0]["address"] == res[i].host_mac
        assert (ip, host) in routes and {"concat": [host, ip]} in elems
        assert topo.exec(ns, "sysctl", "-n", f"net.ipv4.conf.{host}.proxy_arp").stdout.strip() == "1"
    assert ("10.244.1.13", host_veth_name("b3", "eth0")) not in routes
    assert {link["ifname"] for link in ip_json(busy, "link", "show")} == {"lo", "other0", "eth0"}  # untouched
    errs = dp.detach_pods([(f"b{i}", "eth0") for i in range(5)] + [("never", "eth0")])
    assert errs == [None] * 6
    assert pod_veths(ns) == [] and not any(r.get("dev", "").startswith("oc") for r in ip_json(ns, "route", "show"))
    elems = json.loads(topo.exec(ns, "nft", "-j", "list", "set", "ip", "overlaycni", "pod_endpoints").stdout)
    assert "elem" not in next(i["set"] for i in elems["nftables"] if "set" in i)
    for i in good:
        assert [link["ifname"] for link in ip_json(topo.ns_name(f"b{i}"), "link", "show")] == ["lo"]
