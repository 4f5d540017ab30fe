"""The wireguard backend on the kernel: wireguard-go in two node namespaces.

Two nodes, a pod on each, an outside host, all in namespaces the test makes.
Each node's wireguard-go gets its own UAPI socket dir (both devices are named
``ocni.wg``). Checks go through independent tools: ping, tcpdump, ``ip -j``,
``wg``-free UAPI reads are only used for pids. The wireguard-go processes are
stopped by pid (``ip netns pids``) when the module ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network

import pytest

from overlaycni.dataplane.linux import LinuxDataplane, WireGuardSettings
from overlaycni.dataplane.model import NodeState, Peer, PodEndpoint, vtep_mac
from overlaycni.dataplane.wgmodel import WG_IFNAME, PrivateKey
from overlaycni.families import PodAddress
from tests.kernel.topology import Topology, ip_json, run

pytestmark = pytest.mark.kernel

POD_CIDR = IPv4Network("10.244.0.0/16")
B1, B2 = IPv4Network("10.244.1.0/24"), IPv4Network("10.244.2.0/24")
N1, N2 = IPv4Address("10.224.0.1"), IPv4Address("10.224.0.2")
POD_A, POD_B = IPv4Interface("10.244.1.5/24"), IPv4Interface("10.244.2.5/24")


@dataclass
class Cluster:
    topo: Topology
    n1: str
    n2: str
    pa: str
    pb: str
    dirs: tuple[str, str]
    d1: LinuxDataplane
    d2: LinuxDataplane
    s1: NodeState
    s2: NodeState


def wg_pid(sock_dir: str) -> int:
    import json

    with open(os.path.join(sock_dir, f"{WG_IFNAME}.pid")) as f:
        return int(json.load(f)["pid"])


def netns_pids(ns: str) -> list[int]:
    return [int(p) for p in run("ip", "netns", "pids", ns, check=False).stdout.split()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def settings(d: str, mode: str = "userspace") -> WireGuardSettings:
    return WireGuardSettings(mode=mode, socket_dir=d)


@pytest.fixture(scope="module")
def cluster():
    topo = Topology()
    dps: list[LinuxDataplane] = []
    tmp = tempfile.mkdtemp(prefix="ocwg-")
    dirs = (os.path.join(tmp, "n1"), os.path.join(tmp, "n2"))
    try:
        topo.add_underlay()
        n1 = topo.add_node("n1", "10.224.0.1/16")
        n2 = topo.add_node("n2", "10.224.0.2/16")
        pa, pb = topo.add_netns("pa"), topo.add_netns("pb")
        d1 = LinuxDataplane(n1.ns, wireguard=settings(dirs[0], "auto"))  # auto: no module here -> wireguard-go
        d2 = LinuxDataplane(n2.ns, wireguard=settings(dirs[1]))
        dps += [d1, d2]
        k1, k2 = PrivateKey.generate(), PrivateKey.generate()
        p1 = Peer("n1", N1, B1, vtep_mac(N1), k1.public)
        p2 = Peer("n2", N2, B2, vtep_mac(N2), k2.public)
        mtu = d1.node_info(N1, backend="wireguard", mtu=None).pod_mtu
        assert mtu == 1440
        a = d1.attach_pod(container_id="ca", ifname="eth0", netns_path=pa, addresses=(PodAddress(POD_A, IPv4Address("10.244.1.1")),), mtu=mtu)
        b = d2.attach_pod(container_id="cb", ifname="eth0", netns_path=pb, addresses=(PodAddress(POD_B, IPv4Address("10.244.2.1")),), mtu=mtu)
        common = dict(pod_cidr=POD_CIDR, backend="wireguard")
        s1 = NodeState(node_ip=N1, block=B1, peers=(p2,), pods=(PodEndpoint(POD_A.ip, a.host_veth),), wireguard_key=k1, **common)
        s2 = NodeState(node_ip=N2, block=B2, peers=(p1,), pods=(PodEndpoint(POD_B.ip, b.host_veth),), wireguard_key=k2, **common)
        for d, s in ((d1, s1), (d2, s2)):
            report = d.reconcile(s)
            assert report.errors == [], report.errors
        yield Cluster(topo, n1.ns, n2.ns, topo.ns_name("pa"), topo.ns_name("pb"), dirs, d1, d2, s1, s2)
    finally:
        for d in dps:
            d.close()
        for ns in topo.namespaces:  # wireguard-go outlives its agent by design: stop it by pid
            for pid in netns_pids(ns):
                os.kill(pid, signal.SIGKILL)
        topo.cleanup()
        subprocess.run(["rm", "-rf", tmp], check=False)


def capture(topo: Topology, ns: str, bpf: str, action) -> str:
    """tcpdump on ``ns``'s eth0 while ``action()`` runs; its text output."""
    proc = topo.spawn(ns, "timeout", "20", "tcpdump", "-i", "eth0", "-n", "-l", "-c", "200", *bpf.split(),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stderr is not None
    while "listening on" not in (line := proc.stderr.readline()):  # tcpdump is ready (not a timing assertion)
        assert line, "tcpdump did not start"
    action()
    time.sleep(0.3)  # let the last packets reach the capture
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    return out


def test_two_devices_named_ocni_wg_with_their_own_sockets(cluster: Cluster):
    for ns, d in ((cluster.n1, cluster.dirs[0]), (cluster.n2, cluster.dirs[1])):
        (link,) = ip_json(ns, "-d", "link", "show", WG_IFNAME)
        assert link["mtu"] == 1440 and "UP" in link["flags"] and link["linkinfo"]["info_kind"] == "tun"
        assert os.path.exists(os.path.join(d, f"{WG_IFNAME}.sock"))
        assert wg_pid(d) in netns_pids(ns)
        assert stat_mode(d) == 0o700
    assert wg_pid(cluster.dirs[0]) != wg_pid(cluster.dirs[1])
    routes = {r["dst"]: r for r in ip_json(cluster.n1, "route", "show", "proto", "119")}
    assert routes["10.244.2.0/24"]["dev"] == WG_IFNAME and routes["10.244.0.0/16"]["type"] == "unreachable"


def stat_mode(path: str) -> int:
    return os.stat(path).st_mode & 0o777


def wg_show(sock_dir: str, *args: str) -> str:
    """``wg show ocni.wg ARGS`` (wireguard-tools) against a node's own socket dir."""
    script = 'mount --bind "$1" /var/run/wireguard && shift && exec wg show ocni.wg "$@"'
    return run("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", sock_dir, *args).stdout


def test_handshake_starts_without_any_traffic(cluster: Cluster):
    """Programming a peer starts its handshake at once: nothing has pinged yet."""
    peer_key = cluster.s1.peers[0].wg_public_key
    deadline = time.monotonic() + 15
    handshakes = ""
    while time.monotonic() < deadline:
        handshakes = wg_show(cluster.dirs[0], "latest-handshakes")
        if handshakes.startswith(peer_key) and handshakes.split()[1] != "0":
            break
        time.sleep(0.2)
    assert handshakes.startswith(peer_key) and handshakes.split()[1] != "0", handshakes
    assert wg_show(cluster.dirs[0], "public-key").strip() == cluster.s1.wireguard_key.public


def test_pods_talk_encrypted_and_no_pod_address_is_on_the_wire(cluster: Cluster):
    topo = cluster.topo
    out = capture(topo, cluster.n1, "udp or icmp", lambda: topo.ping(cluster.pa, str(POD_B.ip), count=3))
    assert "10.224.0.1.51820 > 10.224.0.2.51820: UDP" in out and "10.224.0.2.51820 > 10.224.0.1.51820: UDP" in out
    assert "10.244." not in out, out
    assert topo.ping(cluster.pb, str(POD_A.ip))
    assert topo.ping(cluster.pa, "10.244.2.1")  # node 2's gateway address, through the tunnel


def test_dual_stack_pods_talk_over_ipv6_through_the_same_tunnel(cluster: Cluster):
    """The same two nodes turned dual-stack: each WireGuard peer's allowed IPs are both of
    its blocks, both blocks are routed into ocni.wg, and IPv6 pods on the two nodes reach
    each other through the tunnel over the IPv4 underlay, nothing of them in clear."""
    b1_6, b2_6 = IPv6Network("fd12:3456:789a:0:1::/80"), IPv6Network("fd12:3456:789a:0:2::/80")
    a6, b6 = IPv6Interface("fd12:3456:789a:0:1::6/80"), IPv6Interface("fd12:3456:789a:0:2::6/80")
    p1 = replace(cluster.s2.peers[0], block_v6=b1_6)
    p2 = replace(cluster.s1.peers[0], block_v6=b2_6)
    pa6, pb6 = cluster.topo.add_netns("pa6"), cluster.topo.add_netns("pb6")
    mtu = cluster.d1.node_info(N1, backend="wireguard", mtu=None).pod_mtu

    def addrs(v4: str, gw: str, v6: IPv6Interface) -> tuple[PodAddress, ...]:
        return PodAddress(IPv4Interface(v4), IPv4Address(gw)), PodAddress(v6, IPv6Address("fe80::1"))

    try:
        a = cluster.d1.attach_pod(container_id="ca6", ifname="eth0", netns_path=pa6, addresses=addrs("10.244.1.6/24", "10.244.1.1", a6), mtu=mtu)
        b = cluster.d2.attach_pod(container_id="cb6", ifname="eth0", netns_path=pb6, addresses=addrs("10.244.2.6/24", "10.244.2.1", b6), mtu=mtu)
        six = dict(pod_cidr_v6=IPv6Network("fd12:3456:789a::/64"))
        s1 = replace(cluster.s1, block_v6=b1_6, peers=(p2,), pods=(*cluster.s1.pods, PodEndpoint(IPv4Address("10.244.1.6"), a.host_veth, ip_v6=a6.ip)), **six)
        s2 = replace(cluster.s2, block_v6=b2_6, peers=(p1,), pods=(*cluster.s2.pods, PodEndpoint(IPv4Address("10.244.2.6"), b.host_veth, ip_v6=b6.ip)), **six)
        for d, s in ((cluster.d1, s1), (cluster.d2, s2)):
            assert d.reconcile(s).errors == []
        allowed = wg_show(cluster.dirs[0], "allowed-ips").split()
        assert allowed[1:] == ["10.244.2.0/24", str(b2_6)], allowed
        routes = {r["dst"]: r for r in ip_json(cluster.n1, "-6", "route", "show", "proto", "119")}
        assert routes[str(b2_6)]["dev"] == WG_IFNAME and routes["fd12:3456:789a::/64"]["type"] == "unreachable"
        answered: list[bool] = []
        out = capture(cluster.topo, cluster.n1, "not arp and not icmp6",
                      lambda: answered.append(cluster.topo.ping(cluster.topo.ns_name("pa6"), str(b6.ip))))
        assert answered == [True] and cluster.topo.ping(cluster.topo.ns_name("pb6"), str(a6.ip))
        assert "10.224.0.1.51820 > 10.224.0.2.51820: UDP" in out and "fd12:3456:789a" not in out, out
    finally:
        for d, s in ((cluster.d1, cluster.s1), (cluster.d2, cluster.s2)):
            for cid in ("ca6", "cb6"):
                d.detach_pod(container_id=cid, ifname="eth0", netns_path=None)
            assert d.reconcile(s).errors == []


def test_a_new_data_plane_adopts_the_running_wireguard_go(cluster: Cluster):
    pid = wg_pid(cluster.dirs[0])
    again = LinuxDataplane(cluster.n1, wireguard=settings(cluster.dirs[0], "auto"))
    try:
        report = again.reconcile(cluster.s1)
        assert report.errors == []
        assert report.changes == [f"wireguard-go pid {pid} adopted for {WG_IFNAME}"], report.changes
        assert wg_pid(cluster.dirs[0]) == pid and alive(pid)
        dev = again.wireguard_device()
        assert dev is not None and dev.pid == pid and dev.implementation == "wireguard-go"
        assert [p.peer.public_key for p in dev.peers] == [cluster.s1.peers[0].wg_public_key]
        assert cluster.topo.ping(cluster.pa, str(POD_B.ip))
    finally:
        again.close()
    assert alive(pid)  # closing the data plane (stopping the agent) leaves the tunnel up


def test_wireguard_go_killed_is_restarted_with_its_peers(cluster: Cluster):
    d = cluster.d2
    d.reconcile(cluster.s2)  # the data plane under test remembers this state
    old = wg_pid(cluster.dirs[1])
    d.repaired.clear()
    os.kill(old, signal.SIGKILL)
    assert d.repaired.wait(30), "the watcher did not repair the device"
    new = wg_pid(cluster.dirs[1])
    assert new != old and alive(new) and new in netns_pids(cluster.n2)
    assert cluster.topo.ping(cluster.pb, str(POD_A.ip), attempts=5)
    assert d.reconcile(cluster.s2).changes == []


def test_kernel_mode_without_the_module_is_a_clear_error(cluster: Cluster):
    topo = cluster.topo
    n3 = topo.add_node("n3", "10.224.0.3/16")
    d = LinuxDataplane(n3.ns, wireguard=settings(os.path.join(os.path.dirname(cluster.dirs[0]), "n3"), "kernel"))
    try:
        s = replace(cluster.s1, node_ip=IPv4Address("10.224.0.3"), block=IPv4Network("10.244.3.0/24"), pods=())
        report = d.reconcile(s)
        assert any("no WireGuard module" in e for e in report.errors), report.errors
        assert not netns_pids(n3.ns)
    finally:
        d.close()


def test_switching_backend_stops_wireguard_go(cluster: Cluster):
    topo = cluster.topo
    n4 = topo.add_node("n4", "10.224.0.4/16")
    sock_dir = os.path.join(os.path.dirname(cluster.dirs[0]), "n4")
    d = LinuxDataplane(n4.ns, wireguard=settings(sock_dir))
    try:
        s = replace(cluster.s1, node_ip=IPv4Address("10.224.0.4"), block=IPv4Network("10.244.4.0/24"), pods=())
        assert d.reconcile(s).errors == []
        pid = wg_pid(sock_dir)
        report = d.reconcile(replace(s, backend="vxlan"))
        assert any(WG_IFNAME in c and "deleted" in c for c in report.changes)
        assert not alive(pid) and not ip_json(n4.ns, "link", "show", "type", "tun")
        assert not os.path.exists(os.path.join(sock_dir, f"{WG_IFNAME}.pid"))
    finally:
        d.close()
