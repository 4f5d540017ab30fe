"""Dual-stack pods on the real kernel: the plugin run as a runtime runs it,
against a real agent of a dual-stack cluster, and (the control) one of a
single-stack cluster. What the pod got is read with ``ip -j`` inside the
pod and the node, never through the project's own code.

One agent pair for the whole module: ``d1`` (dual-stack) and ``s1``
(IPv4 only), each with its own store, on one underlay.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, IPv6Network, ip_interface

import pytest

from overlaycni.dataplane.linux import LinuxDataplane
from overlaycni.dataplane.model import NodeState, PodEndpoint
from overlaycni.families import PodAddress
from tests.kernel.cni_harness import Cluster
from tests.kernel.topology import Topology, ip_json, run

pytestmark = pytest.mark.kernel
V6_BLOCK = IPv6Network("fd12:3456:789a::/80")  # the first node's block of AKS's default IPv6 pod CIDR


class Pair:
    def __init__(self, dual: Cluster, single: Cluster) -> None:
        self.dual, self.single = dual, single
        self.n = 0

    def netns(self) -> str:
        self.n += 1
        return os.path.basename(self.dual.topo.add_netns(f"p{self.n}"))

    def add(self, c: Cluster, node: str, version: str = "1.0.0", **conf) -> tuple[str, dict]:
        ns = self.netns()
        code, res, _ = c.plugin(node, "ADD", ns, c.conf(node, version, **conf))
        assert code == 0, res
        return ns, res


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[Pair]:
    topo = Topology()
    try:
        topo.add_underlay()
        dual = Cluster(topo=topo, workdir=tmp_path_factory.mktemp("dual"))
        dual.create("--ip-families", "ipv4,ipv6")
        dual.install()
        dual.add_node("d1", "10.224.0.4")
        single = Cluster(topo=topo, workdir=tmp_path_factory.mktemp("single"))
        single.create()
        single.install()
        single.add_node("s1", "10.224.0.5")
        yield Pair(dual, single)
    finally:
        topo.cleanup()


def v6_addrs(ns: str, dev: str = "eth0", scope: str = "global") -> list[dict]:
    links = ip_json(ns, "-6", "addr", "show", "dev", dev)
    return [a for link in links for a in link["addr_info"] if a.get("scope") == scope]


def sysctl(ns: str, key: str) -> str:
    return run("ip", "netns", "exec", ns, "cat", f"/proc/sys/{key}").stdout.strip()


def owned_v6_routes(ns: str) -> list[dict]:
    """The node's own IPv6 routes but its catch-alls (unreachable block and pod CIDR): routes to pods."""
    return [r for r in ip_json(ns, "-6", "route", "show", "proto", "119") if r.get("type") != "unreachable"]


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_gives_the_pod_both_families(pair, version):
    c = pair.dual
    ns, res = pair.add(c, "d1", version)
    # the IPv6 address is usable when ADD returns: read before anything else
    (v6,) = v6_addrs(ns)
    assert not v6.get("tentative") and not v6.get("dadfailed"), v6
    legacy = version.startswith("0.")
    ips = res["ips"]
    assert [e.get("version") for e in ips] == (["4", "6"] if legacy else [None, None])
    four, six = (ip_interface(e["address"]) for e in ips)
    assert four.version == 4 and four.network.prefixlen == 24 and ips[0]["gateway"] == str(four.network.network_address + 1)
    assert six.ip in V6_BLOCK and six.network.prefixlen == 80 and ips[1]["gateway"] == "fe80::1"
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": ips[0]["gateway"]}, {"dst": "::/0", "gw": "fe80::1"}]
    # inside the pod, read by ip(8): IPv4 as before, and the IPv6 address of the node's block
    (link,) = ip_json(ns, "addr", "show", "dev", "eth0")
    inet = [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"]
    assert inet == [(str(four.ip), 24)]
    assert (v6["local"], v6["prefixlen"]) == (str(six.ip), 80) and v6.get("noprefixroute") and v6.get("nodad")
    default4 = [(r["gateway"], r["dev"]) for r in ip_json(ns, "route", "show") if r["dst"] == "default"]
    assert default4 == [(ips[0]["gateway"], "eth0")]
    routes6 = ip_json(ns, "-6", "route", "show")
    default6 = [r for r in routes6 if r["dst"] == "default"]
    assert [(r["gateway"], r["dev"]) for r in default6] == [("fe80::1", "eth0")]
    assert not any(r["dst"] == str(six.network) for r in routes6)  # noprefixroute: even neighbours go via the gateway
    assert [sysctl(ns, f"net/ipv6/conf/eth0/{k}") for k in ("accept_ra", "autoconf", "accept_dad")] == ["0", "0", "0"]
    # on the node: the /128 on the host veth, which holds the gateway; IPv6 forwarding in this namespace
    node = c.agents["d1"].node.ns
    host = res["interfaces"][0]["name"]
    (route,) = ip_json(node, "-6", "route", "show", f"{six.ip}/128")
    assert route["dev"] == host and route["protocol"] == "119"
    assert [(a["local"], a["prefixlen"]) for a in v6_addrs(node, host, "link") if a["local"] == "fe80::1"] == [("fe80::1", 64)]
    assert sysctl(node, "net/ipv6/conf/all/forwarding") == "1"
    code, out, _ = c.plugin("d1", "DEL", ns, c.conf("d1", version))
    assert (code, out) == (0, None)


def test_same_node_pods_reach_each_other_over_ipv6(pair):
    c = pair.dual
    a, ra = pair.add(c, "d1")
    b, rb = pair.add(c, "d1")
    b6 = ip_interface(rb["ips"][1]["address"]).ip
    a6 = ip_interface(ra["ips"][1]["address"]).ip
    assert c.topo.ping(a, str(b6)) and c.topo.ping(b, str(a6))
    assert c.topo.ping(a, ip_interface(rb["ips"][0]["address"]).ip.compressed)  # and IPv4, as before
    # the pod's one IPv6 neighbour is its gateway
    assert {n["dst"] for n in ip_json(a, "-6", "neigh", "show", "dev", "eth0")} <= {"fe80::1"}
    for ns in (a, b):
        assert c.plugin("d1", "DEL", ns, c.conf("d1"))[0] == 0
    # control: after DEL the address answers no more
    assert not c.topo.ping(a, str(b6), wait=0.5, attempts=1)


def drop_count(ns: str, rule: str) -> int:
    """Packets counted by a drop rule of the node's ``ip6 overlaycni`` (read by nft)."""
    doc = json.loads(run("ip", "netns", "exec", ns, "nft", "-j", "list", "counter", "ip6", "overlaycni", rule).stdout)
    return next(int(i["counter"]["packets"]) for i in doc["nftables"] if "counter" in i)


def test_a_pod_sends_ipv6_only_from_its_own_address(pair):
    """The node's IPv6 guard lets a pod's own address through (and neighbour
    discovery from its link-local one), nothing else: a forged source from
    the node's block is dropped and counted."""
    c = pair.dual
    node = c.agents["d1"].node.ns
    a, _ = pair.add(c, "d1")
    b, rb = pair.add(c, "d1")
    b6 = str(ip_interface(rb["ips"][1]["address"]).ip)
    assert c.topo.ping(a, b6)  # control: its own address passes
    forged = str(V6_BLOCK.network_address + 0xBAD)
    run("ip", "-n", a, "-6", "addr", "add", f"{forged}/128", "dev", "eth0", "nodad")
    before = drop_count(node, "pod_ipv6")
    assert c.topo.exec(a, "ping", "-6", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1", "-I", forged, b6,
                       check=False).returncode != 0
    assert drop_count(node, "pod_ipv6") >= before + 2
    for ns in (a, b):
        assert c.plugin("d1", "DEL", ns, c.conf("d1"))[0] == 0


def test_check_catches_a_removed_ipv6_address_and_route(pair):
    c = pair.dual
    ns, res = pair.add(c, "d1", "1.1.0")
    conf = c.conf("d1", "1.1.0", prevResult=res)
    assert c.plugin("d1", "CHECK", ns, conf)[:2] == (0, None)  # control: as ADD left it
    six = res["ips"][1]["address"]
    run("ip", "-n", ns, "-6", "addr", "del", six, "dev", "eth0")
    code, out, _ = c.plugin("d1", "CHECK", ns, conf)
    assert code != 0 and out["code"] == 104 and six in out["details"], out
    run("ip", "-n", ns, "-6", "addr", "add", six, "dev", "eth0", "nodad", "noprefixroute")
    run("ip", "-n", ns, "-6", "route", "replace", "default", "via", "fe80::1", "dev", "eth0")
    assert c.plugin("d1", "CHECK", ns, conf)[:2] == (0, None)  # restored: fine again
    run("ip", "-n", ns, "-6", "route", "del", "default")
    code, out, _ = c.plugin("d1", "CHECK", ns, conf)
    assert code != 0 and "::/0 via fe80::1" in out["details"], out
    run("ip", "-n", ns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
    host = res["interfaces"][0]["name"]
    run("ip", "-n", c.agents["d1"].node.ns, "-6", "addr", "del", "fe80::1/64", "dev", host)
    code, out, _ = c.plugin("d1", "CHECK", ns, conf)
    assert code != 0 and "gateway fe80::1 is missing" in out["details"], out
    # a prevResult without the IPv6 entry does not match the reservation
    v4_only = {**res, "ips": res["ips"][:1], "routes": res["routes"][:1]}
    code, out, _ = c.plugin("d1", "CHECK", ns, c.conf("d1", "1.1.0", prevResult=v4_only))
    assert code != 0 and "no IPv6 address" in out["msg"], out
    assert c.plugin("d1", "DEL", ns, c.conf("d1"))[0] == 0


def test_del_removes_both_and_add_del_add_leaves_no_ipv6_behind(pair):
    c = pair.dual
    node = c.agents["d1"].node.ns
    c.drained("d1")  # an earlier test's DELs: their parked veths gone first
    before = (owned_v6_routes(node), {link["ifname"] for link in ip_json(node, "link", "show")})
    for _round in range(2):
        ns, res = pair.add(c, "d1")
        six = ip_interface(res["ips"][1]["address"]).ip
        host = res["interfaces"][0]["name"]
        assert ip_json(node, "-6", "route", "show", f"{six}/128")
        assert c.plugin("d1", "DEL", ns, c.conf("d1"))[:2] == (0, None)
        assert ip_json(node, "-6", "route", "show", f"{six}/128") == []
        assert ip_json(node, "route", "show", res["ips"][0]["address"].split("/")[0]) == []
        assert not any(n.get("dst") == str(six) for n in ip_json(node, "-6", "neigh", "show"))
        assert host not in {link["ifname"] for link in ip_json(node, "link", "show")}  # parked, then deleted
        c.drained("d1")  # the parked veth and so the pod's eth0 go with the drain (``agent.quarantine``)
        assert not any(link["ifname"] == "eth0" for link in ip_json(ns, "link", "show"))
        assert (owned_v6_routes(node), {link["ifname"] for link in ip_json(node, "link", "show")}) == before
    c.drained("d1")
    (row,) = json.loads(c.cli("ipam", "show", "--cluster", "t", "--output", "json").stdout)["nodes"]
    assert (row["used"], row["used_v6"]) == (0, 0) and row["block_v6"] == str(V6_BLOCK)
    assert c.cli("ipam", "check", "--cluster", "t", check=False).returncode == 0


def test_the_ips_capability_takes_one_address_per_family(pair):
    c = pair.dual
    want6 = V6_BLOCK.network_address + 0x99
    ns, res = pair.add(c, "d1", runtimeConfig={"ips": [f"{want6}/80", "10.244.0.99/24"]})
    assert [e["address"] for e in res["ips"]] == ["10.244.0.99/24", f"{want6}/80"]
    assert [a["local"] for a in v6_addrs(ns)] == [str(want6)]
    assert c.plugin("d1", "DEL", ns, c.conf("d1"))[0] == 0
    bad = pair.netns()
    code, out, _ = c.plugin("d1", "ADD", bad, c.conf("d1", runtimeConfig={"ips": ["10.244.0.5", "10.244.0.6"]}))
    assert code != 0 and out["code"] == 7 and "one address per family" in out["msg"], out
    s = pair.single
    code, out, _ = s.plugin("s1", "ADD", bad, s.conf("s1", runtimeConfig={"ips": [str(want6)]}))
    assert code != 0 and out["code"] == 7 and "single-stack" in out["msg"], out
    assert not any(link["ifname"] == "eth0" for link in ip_json(bad, "link", "show"))  # nothing made


def test_single_stack_add_is_unchanged(pair):
    s = pair.single
    node = s.agents["s1"].node.ns
    ns, res = pair.add(s, "s1", "0.4.0")
    assert [e["version"] for e in res["ips"]] == ["4"]
    assert [r["dst"] for r in res["routes"]] == ["0.0.0.0/0"]
    assert v6_addrs(ns) == [] and [r for r in ip_json(ns, "-6", "route", "show") if r["dst"] == "default"] == []
    host = res["interfaces"][0]["name"]
    assert not any(a["local"] == "fe80::1" for a in v6_addrs(node, host, "link"))
    assert ip_json(node, "-6", "route", "show", "proto", "119") == []  # no IPv6 route at all, catch-alls included
    assert sysctl(node, "net/ipv6/conf/all/forwarding") == "0"
    assert s.plugin("s1", "DEL", ns, s.conf("s1"))[0] == 0


def test_the_block_is_the_one_node_list_reports(pair):
    """The block the tests above expect is the node's, as `node list` says."""
    nodes = json.loads(pair.dual.cli("node", "list", "--cluster", "t", "-o", "json").stdout)
    assert [(n["name"], n["block_v6"]) for n in nodes] == [("d1", str(V6_BLOCK))]
    single = json.loads(pair.single.cli("node", "list", "--cluster", "t", "-o", "json").stdout)
    assert [n["block_v6"] for n in single] == [None]
    assert pair.dual.agents["d1"].ready["block_v6"] == str(V6_BLOCK) and pair.single.agents["s1"].ready["block_v6"] is None


def test_reconcile_converges_with_ipv6_pod_routes(pair):
    """The Linux routes port reads back the /128 it wrote (IPv6 routes carry
    no scope): a reconcile with a dual-stack pod changes nothing, and puts
    a deleted /128 back."""
    topo = pair.dual.topo
    node = topo.add_node("r1", "10.224.0.9/16")
    path = topo.add_netns("rp")
    v4 = PodAddress(IPv4Interface("10.244.7.5/24"), IPv4Address("10.244.7.1"))
    v6 = PodAddress(IPv6Interface("fd12:3456:789a:0:7::5/80"), IPv6Address("fe80::1"))
    with LinuxDataplane(node.ns) as dp:
        empty = NodeState(node_ip=IPv4Address("10.224.0.9"), block=v4.ip.network, pod_cidr=v4.ip.network.supernet(8),
                          block_v6=IPv6Network("fd12:3456:789a:0:7::/80"), pod_cidr_v6=IPv6Network("fd12:3456:789a::/64"))
        assert not dp.reconcile(empty).errors
        pod = dp.attach_pod(container_id="r", ifname="eth0", netns_path=path, addresses=(v4, v6), mtu=1450)
        full = replace(empty, pods=(PodEndpoint(v4.ip.ip, pod.host_veth, ip_v6=v6.ip.ip),))
        report = dp.reconcile(full)
        assert not report.errors and not [c for c in report.changes if "route" in c], report.changes
        run("ip", "-n", node.ns, "-6", "route", "del", f"{v6.ip.ip}/128")
        report = dp.reconcile(full)
        assert any("fd12:3456:789a:0:7::5/128" in c for c in report.changes), report.changes
        (route,) = ip_json(node.ns, "-6", "route", "show", f"{v6.ip.ip}/128")
        assert route["dev"] == pod.host_veth and route["protocol"] == "119"
        assert dp.reconcile(full).changes == []
        dp.detach_pod(container_id="r", ifname="eth0", netns_path=path)
    assert owned_v6_routes(node.ns) == []
