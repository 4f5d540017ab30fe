"""The two-node data path harness shared by the kernel data path tests.

Two node namespaces on one underlay bridge, one pod each, and an outside
host on the underlay (10.224.0.200, also 203.0.113.10: the "internet"). The
data planes are the real Linux ones, reconciled to a one-peer state. With
``dual=True`` the cluster is dual-stack: the nodes and the outside host also
have IPv6 underlay addresses (``fd00:10:224::/64``, the host also
``2001:db8:113::10``, a documentation address, as its IPv6 "internet"),
each node an IPv6 block and each pod an IPv6 address from it. Every
check goes through independent tools (ping, tcpdump, ``ip -j``, ``nft -j``),
never back through the data plane's own code.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network

from overlaycni.dataplane.linux import LinuxDataplane
from overlaycni.dataplane.model import NodeState, Peer, PodEndpoint, vtep_mac
from overlaycni.families import PodAddress
from tests.kernel.topology import Topology, run

POD_CIDR = IPv4Network("10.244.0.0/16")
B1, B2 = IPv4Network("10.244.1.0/24"), IPv4Network("10.244.2.0/24")
N1, N2 = IPv4Address("10.224.0.1"), IPv4Address("10.224.0.2")
POD_A, POD_B = IPv4Interface("10.244.1.5/24"), IPv4Interface("10.244.2.5/24")
INTERNET = "203.0.113.10"
# dual-stack
POD_CIDR6 = IPv6Network("fd12:3456:789a::/64")
B1_6, B2_6 = IPv6Network("fd12:3456:789a:0:1::/80"), IPv6Network("fd12:3456:789a:0:2::/80")
NODE_SUBNET6 = IPv6Network("fd00:10:224::/64")
N1_6, N2_6, HOST6 = IPv6Address("fd00:10:224::1"), IPv6Address("fd00:10:224::2"), IPv6Address("fd00:10:224::c8")
POD_A6, POD_B6 = IPv6Interface("fd12:3456:789a:0:1::5/80"), IPv6Interface("fd12:3456:789a:0:2::5/80")
INTERNET6 = "2001:db8:113::10"
GATEWAY6 = IPv6Address("fe80::1")


@dataclass
class Cluster:
    topo: Topology
    backend: str
    n1: str
    n2: str
    host: str
    pa: str
    pb: str
    wire: str  # node 2's bridge port in the vnet namespace
    d1: LinuxDataplane
    d2: LinuxDataplane
    s1: NodeState
    s2: NodeState
    pod_mtu: int
    dual: bool = False


def _state(me: IPv4Address, block: IPv4Network, peer: Peer, backend: str, pods: tuple[PodEndpoint, ...], *,
           me6: IPv6Address | None = None, block6: IPv6Network | None = None) -> NodeState:
    return NodeState(node_ip=me, block=block, pod_cidr=POD_CIDR, backend=backend, peers=(peer,), pods=pods,
                     block_v6=block6, pod_cidr_v6=POD_CIDR6 if block6 else None, node_ip_v6=me6)


def _addresses(v4: IPv4Interface, v6: IPv6Interface | None) -> tuple[PodAddress, ...]:
    return (PodAddress(v4, v4.network.network_address + 1),) + ((PodAddress(v6, GATEWAY6),) if v6 else ())


@contextmanager
def two_node_cluster(backend: str, *, dual: bool = False) -> Iterator[Cluster]:
    topo = Topology()
    dps: list[LinuxDataplane] = []
    try:
        topo.add_underlay()
        n1 = topo.add_node("n1", "10.224.0.1/16")
        n2 = topo.add_node("n2", "10.224.0.2/16")
        host = topo.add_host("ext", "10.224.0.200/16", extra=("203.0.113.10/24",))
        for n in (n1, n2):
            run("ip", "-n", n.ns, "route", "add", "203.0.113.0/24", "via", "10.224.0.200")
        if dual:
            for ns, addr in ((n1.ns, N1_6), (n2.ns, N2_6), (host.ns, HOST6)):
                run("ip", "-n", ns, "addr", "add", f"{addr}/64", "dev", "eth0", "nodad")
            run("ip", "-n", host.ns, "addr", "add", f"{INTERNET6}/64", "dev", "eth0", "nodad")
            for n in (n1, n2):
                run("ip", "-n", n.ns, "-6", "route", "add", "2001:db8:113::/64", "via", str(HOST6))
        pa, pb = topo.add_netns("pa"), topo.add_netns("pb")
        d1, d2 = LinuxDataplane(n1.ns), LinuxDataplane(n2.ns)
        dps += [d1, d2]
        info1, info2 = (d.node_info(n, backend=backend, mtu=None) for d, n in ((d1, N1), (d2, N2)))
        # what each agent publishes: the VTEP MAC (vxlan) or the underlay's (direct), the IPv6 node address it finds
        n1_6, n2_6 = (d.find_node_ip_v6(n, subnet=NODE_SUBNET6) if dual else None for d, n in ((d1, N1), (d2, N2)))
        p1 = Peer("n1", N1, B1, info1.vtep_mac or vtep_mac(N1), block_v6=B1_6 if dual else None, node_ip_v6=n1_6)
        p2 = Peer("n2", N2, B2, info2.vtep_mac or vtep_mac(N2), block_v6=B2_6 if dual else None, node_ip_v6=n2_6)
        mtu = info1.pod_mtu
        a = d1.attach_pod(container_id="ca", ifname="eth0", netns_path=pa, addresses=_addresses(POD_A, POD_A6 if dual else None), mtu=mtu)
        b = d2.attach_pod(container_id="cb", ifname="eth0", netns_path=pb, addresses=_addresses(POD_B, POD_B6 if dual else None), mtu=mtu)
        s1 = _state(N1, B1, p2, backend, (PodEndpoint(POD_A.ip, a.host_veth, ip_v6=POD_A6.ip if dual else None),),
                    me6=n1_6, block6=B1_6 if dual else None)
        s2 = _state(N2, B2, p1, backend, (PodEndpoint(POD_B.ip, b.host_veth, ip_v6=POD_B6.ip if dual else None),),
                    me6=n2_6, block6=B2_6 if dual else None)
        for d, s in ((d1, s1), (d2, s2)):
            report = d.reconcile(s)
            assert report.errors == []
        yield Cluster(topo, backend, n1.ns, n2.ns, host.ns, topo.ns_name("pa"), topo.ns_name("pb"), n2.port, d1, d2, s1, s2, mtu,
                      dual)
    finally:
        for d in dps:
            d.close()
        topo.cleanup()


def capture(topo: Topology, ns: str, *, iface: str, bpf: str, action, expect: int | None = 1,  # type: ignore[no-untyped-def]
            verbose: bool = False) -> str:
    """Run ``action()`` while tcpdump listens on ``iface`` in ``ns``; returns the decoded packets.

    With ``expect``, tcpdump stops by itself after that many packets (so a busy machine
    cannot make it miss them); with ``expect=None`` (checking that nothing passes) it
    listens for a second after the action."""
    with tempfile.TemporaryDirectory() as tmp:
        pcap = os.path.join(tmp, "cap.pcap")
        count = ["-c", str(expect)] if expect else []
        proc = topo.spawn(ns, "tcpdump", "--immediate-mode", "-i", iface, "-n", "-U", *count, "-w", pcap, bpf,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        line = proc.stderr.readline()  # "listening on ..." once the capture is live
        assert "listening" in line, line
        try:
            for _ in range(3 if expect else 1):  # repeated while nothing was seen (shared ARP table, see topology.ping)
                action()
                try:
                    proc.wait(timeout=3 if expect else 1)
                    break
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
        return run("tcpdump", "-n", *(["-v"] if verbose else []), "-r", pcap).stdout


def drop_count(ns: str, rule: str, *, family: str = "ip") -> int:
    """Packets counted so far by the drop rule ``rule`` (a named counter of ``<family> overlaycni``)."""
    doc = json.loads(run("ip", "netns", "exec", ns, "nft", "-j", "list", "counter", family, "overlaycni", rule).stdout)
    return next(int(i["counter"]["packets"]) for i in doc["nftables"] if "counter" in i)


def normal_rule(expr: list[dict]) -> list[dict]:
    """A rendered or listed rule, minus what nft adds when listing (anonymous counter values)."""
    out = []
    for e in expr:
        if "counter" in e and isinstance(e["counter"], dict):
            e = {"counter": None}
        if "masquerade" in e and isinstance(e["masquerade"].get("flags"), str):
            e = {"masquerade": {"flags": [e["masquerade"]["flags"]]}}
        out.append(e)
    return out
