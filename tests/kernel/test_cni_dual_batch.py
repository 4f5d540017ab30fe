"""Dual-stack on issue 14's group commit, on the kernel: one ``attach_pods``
for a batch of dual-stack pods (and a single-stack one beside them) programs
each pod's IPv6 side in the batch's raw rtnetlink steps; ``detach_pods``
removes it; the conntrack port flushes IPv6 addresses too."""

from __future__ import annotations

import json
import os
import subprocess
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, IPv6Network

import pytest

from overlaycni.dataplane import PodAttachment
from overlaycni.dataplane.model import host_veth_name
from overlaycni.errors import InterfaceExists
from overlaycni.families import PodAddress
from tests.kernel.test_dataplane_reconcile import GW, node, state  # noqa: F401 - the node fixture
from tests.kernel.topology import Topology, ip_json, run

pytestmark = pytest.mark.kernel

V6_CIDR = IPv6Network("fd12:3456:789a::/64")
V6_BLOCK = IPv6Network("fd12:3456:789a:0:1::/80")
LL_GW = IPv6Address("fe80::1")


def v6(i: int) -> IPv6Interface:
    return IPv6Interface((int(V6_BLOCK.network_address) + i, 80))


def ip6_pod_elements(topo, ns: str) -> list:
    out = json.loads(topo.exec(ns, "nft", "-j", "list", "set", "ip6", "overlaycni", "pod_endpoints").stdout)
    return next(i["set"] for i in out["nftables"] if "set" in i).get("elem", [])


def test_attach_and_detach_a_dual_stack_batch(node):  # noqa: F811
    topo, ns, dp = node
    dp.reconcile(state(block_v6=V6_BLOCK, pod_cidr_v6=V6_CIDR))
    paths = [topo.add_netns(f"d{i}") for i in range(4)]
    busy = topo.ns_name("d2")
    run("ip", "-n", busy, "link", "add", "eth0", "type", "veth", "peer", "name", "other0")  # the pod's own eth0
    pods = [PodAttachment(f"d{i}", "eth0", p, IPv4Interface(f"10.244.1.{20 + i}/24"), GW, 1450,
                          ip6=PodAddress(v6(0x20 + i), LL_GW) if i != 3 else None)
            for i, p in enumerate(paths)]  # fmt: skip
    res = dp.attach_pods(pods)
    assert isinstance(res[2], InterfaceExists)
    routes6 = {(r["dst"], r.get("dev")) for r in ip_json(ns, "-6", "route", "show", "proto", "119")}
    elems = ip6_pod_elements(topo, ns)
    assert topo.exec(ns, "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"
    for i in (0, 1):
        host, pod_ns, want = host_veth_name(f"d{i}", "eth0"), topo.ns_name(f"d{i}"), v6(0x20 + i)
        assert res[i].addresses == pods[i].addresses
        (link,) = ip_json(pod_ns, "-6", "addr", "show", "dev", "eth0", "scope", "global")
        (addr,) = [a for a in link["addr_info"] if a]  # iproute2 leaves {} for the filtered ones
        assert (addr["local"], addr["prefixlen"]) == (str(want.ip), 80)
        assert not addr.get("tentative") and not addr.get("dadfailed"), addr  # usable when ADD returns
        default6 = [r for r in ip_json(pod_ns, "-6", "route", "show") if r["dst"] == "default"]
        assert [(r["gateway"], r["dev"]) for r in default6] == [("fe80::1", "eth0")]
        assert not any(r["dst"] == str(V6_BLOCK) for r in ip_json(pod_ns, "-6", "route", "show"))  # noprefixroute
        for key in ("accept_ra", "autoconf", "accept_dad"):
            assert topo.exec(pod_ns, "sysctl", "-n", f"net.ipv6.conf.eth0.{key}").stdout.strip() == "0"
        held = [a for link in ip_json(ns, "-6", "addr", "show", "dev", host) for a in link["addr_info"]]
        assert [(a["local"], a["prefixlen"]) for a in held if a["local"] == "fe80::1"] == [("fe80::1", 64)]
        assert not any(a.get("tentative") for a in held if a["local"] == "fe80::1")
        assert (str(want.ip), host) in routes6 and {"concat": [host, str(want.ip)]} in elems
    # the single-stack pod of the same batch: no IPv6 of ours at all
    host3 = host_veth_name("d3", "eth0")
    assert not [a for link in ip_json(topo.ns_name("d3"), "-6", "addr", "show", "dev", "eth0", "scope", "global")
                for a in link["addr_info"] if a]
    assert not any(dev == host3 for _, dev in routes6) and not any(e["concat"][0] == host3 for e in elems)
    assert res[3].addresses == pods[3].addresses and len(res[3].addresses) == 1
    # the failed pod left nothing; its namespace is untouched
    assert (str(v6(0x22).ip), host_veth_name("d2", "eth0")) not in routes6
    assert {link["ifname"] for link in ip_json(busy, "link", "show")} == {"lo", "other0", "eth0"}
    # same-node IPv6 pod to pod through the node (the ip6 guard lets each pod's own address out)
    ping = topo.exec(topo.ns_name("d0"), "ping", "-6", "-c1", "-W2", str(v6(0x21).ip), check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    errs = dp.detach_pods([(f"d{i}", "eth0") for i in range(4)])
    assert errs == [None] * 4
    assert ip_json(ns, "-6", "route", "show", "proto", "119") == [] or not any(
        r.get("dev", "").startswith("oc") for r in ip_json(ns, "-6", "route", "show", "proto", "119"))
    assert ip6_pod_elements(topo, ns) == []


NFT_CT = """table inet cttest {
  chain in { type filter hook input priority 0; ct state new counter; }
  chain out { type filter hook output priority 0; ct state new counter; }
}
"""  # a ct expression turns connection tracking on in the namespace (both families: inet)


@pytest.mark.parametrize("small_table", [1000, 0], ids=["one-unfiltered-walk", "filtered-walks"])
def test_conntrack_flush_of_both_families(monkeypatch, small_table):
    from overlaycni.dataplane.linux import conntrack
    from overlaycni.dataplane.linux.netns import NetnsWorker

    monkeypatch.setattr(conntrack, "SMALL_TABLE", small_table)
    with Topology() as topo:
        r = os.path.basename(topo.add_netns("ct6r"))
        h = os.path.basename(topo.add_netns("ct6h"))
        run("ip", "-n", r, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", h)
        run("ip", "-n", r, "addr", "add", "10.9.0.1/24", "dev", "v0")
        run("ip", "-n", r, "addr", "add", "fd00:9::1/64", "dev", "v0", "nodad")
        run("ip", "-n", r, "link", "set", "v0", "up")
        for addr in ("10.9.0.2/24", "10.9.0.3/24"):
            run("ip", "-n", h, "addr", "add", addr, "dev", "v1")
        for addr in ("fd00:9::2/64", "fd00:9::3/64"):
            run("ip", "-n", h, "addr", "add", addr, "dev", "v1", "nodad")
        run("ip", "-n", h, "link", "set", "v1", "up")
        subprocess.run(["ip", "netns", "exec", r, "nft", "-f", "-"], input=NFT_CT, text=True, check=True)
        for src, dst in (("10.9.0.2", "10.9.0.1"), ("10.9.0.3", "10.9.0.1"), ("fd00:9::2", "fd00:9::1"),
                         ("fd00:9::3", "fd00:9::1")):
            assert topo.exec(h, "ping", "-c1", "-W2", "-I", src, dst, check=False).returncode == 0, src
        worker = NetnsWorker(r)
        try:
            ct = worker.call(conntrack.LinuxConntrack)

            def listed(ip: str) -> list[str]:
                family = "ipv6" if ":" in ip else "ipv4"
                lines = run("ip", "netns", "exec", r, "conntrack", "-L", "-f", family).stdout.splitlines()
                return [line for line in lines if f"src={ip} " in line or f"dst={ip} " in line]

            assert listed("fd00:9::2") and listed("fd00:9::3") and listed("10.9.0.2")
            assert ct.flush_addresses([IPv4Address("10.9.0.2"), IPv6Address("fd00:9::2")]) == 2
            assert listed("10.9.0.2") == [] and listed("fd00:9::2") == []
            assert listed("10.9.0.3") and listed("fd00:9::3")  # control: other addresses' flows stay
            assert ct.flush_address(IPv6Address("fd00:9::3")) == 1 and listed("fd00:9::3") == []
            assert listed("10.9.0.3")  # an IPv6 flush never touches IPv4 entries
            assert ct.flush_addresses([IPv6Address("fd00:9::2")]) == 0
            worker.call(ct.close)
        finally:
            worker.close()
