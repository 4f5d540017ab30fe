"""The kernel monitor (``dataplane.linux.monitor``) in a fresh node namespace:
changes another process makes to our objects are reported, naming the
object and the process; the data plane's own changes are not (the control:
a reconcile that programs everything reports nothing)."""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlaycni.dataplane.linux import LinuxDataplane
from overlaycni.dataplane.model import NodeState, Peer, vtep_mac
from tests.kernel.topology import run

pytestmark = pytest.mark.kernel

ME = IPv4Address("10.224.0.1")


def _state() -> NodeState:
    peer = Peer("n2", IPv4Address("10.224.0.2"), IPv4Network("10.244.2.0/24"), vtep_mac(IPv4Address("10.224.0.2")))
    return NodeState(node_ip=ME, block=IPv4Network("10.244.1.0/24"), pod_cidr=IPv4Network("10.244.0.0/16"), peers=(peer,))


def _drain(events, seconds: float = 1.0) -> list[str]:
    out: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out += events.wait(0.2)
    return out


def test_foreign_changes_are_reported_and_our_own_are_not(node_ns):
    topo, node = node_ns
    with LinuxDataplane(node.ns) as dp:
        dp.reconcile(_state())
        events = dp.kernel_events()
        try:
            assert _drain(events) == []  # its own calibration transaction is not a foreign change
            dp.reconcile(NodeState(node_ip=ME, block=IPv4Network("10.244.1.0/24"), pod_cidr=IPv4Network("10.244.0.0/16")))
            dp.reconcile(_state())  # peers removed and added again, by the data plane itself
            assert _drain(events) == []
            run("ip", "-n", node.ns, "route", "del", "10.244.2.0/24")
            assert any("route 10.244.2.0/24 deleted by pid" in r for r in _drain(events)), "route"
            run("ip", "netns", "exec", node.ns, "nft", "flush", "chain", "ip", "overlaycni", "postrouting")
            seen = _drain(events)
            assert any(r.startswith("nftables table ip overlaycni changed by pid") and "(nft)" in r for r in seen), seen
            run("ip", "-n", node.ns, "neigh", "del", "10.244.2.0", "dev", "ocni.vxlan")
            assert any("neighbour or FDB entry on ocni.vxlan" in r for r in _drain(events)), "neighbour"
            run("ip", "-n", node.ns, "link", "del", "ocni.vxlan")
            assert any("link ocni.vxlan deleted" in r for r in _drain(events)), "link"
            dp.reconcile(_state())
            _drain(events)
            run("ip", "-n", node.ns, "link", "set", "ocni.vxlan", "down")
            assert any("link ocni.vxlan changed (down)" in r for r in _drain(events)), "link down"
            run("ip", "-n", node.ns, "addr", "del", "10.244.1.1/32", "dev", "lo")
            assert any("address on lo:ocni deleted" in r for r in _drain(events)), "address"
            dp.reconcile(_state())  # the repair itself is ours again: quiet
            assert _drain(events) == []
        finally:
            events.close()
