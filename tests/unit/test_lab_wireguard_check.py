"""``lab check`` and ``lab trace`` for the wireguard backend, on captured text (no root):
what passes, and every way the evidence can be missing or wrong."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from overlaycni.config import parse_network
from overlaycni.lab import state as st
from overlaycni.lab.capture import parse_tcpdump
from overlaycni.lab.check import index_requests, index_wireguard, udp_ports, verify_wireguard
from overlaycni.lab.trace import _wireguard_hop, wireguard_length

POD_CIDR = IPv4Network("10.244.0.0/16")


def lab() -> st.LabState:
    net = parse_network({"backend": "wireguard"})
    nodes = tuple(st.LabNode(f"node{i}", i, f"ocl-t.node{i}", IPv4Interface(f"10.224.0.{3 + i}/16")) for i in (1, 2))
    pods = (
        st.LabPod("a", "default", "node1", "ocl-t.pod.default.a", "c1", IPv4Interface("10.244.0.2/24")),
        st.LabPod("b", "default", "node2", "ocl-t.pod.default.b", "c2", IPv4Interface("10.244.1.2/24")),
    )
    return st.LabState(
        name="t", lab_dir="/tmp/t", backend="wireguard", store="sqlite", datastore="sqlite:///tmp/t/state.db",
        network=net.to_dict(), vnet_netns="ocl-t.vnet", external_netns="ocl-t.ext",
        external_ip=IPv4Interface("10.224.255.254/16"), nodes=nodes, pods=pods,
    )  # fmt: skip


TUNNEL = "12:00:00.000001 IP 10.244.0.2 > 10.244.1.2: ICMP echo request, id 7, seq 1, length 64\n"
WIRE = "12:00:00.000002 IP 10.224.0.4.51820 > 10.224.0.5.51820: UDP, length 128\n"
CLEAR = "12:00:00.000003 IP 10.244.0.2 > 10.244.1.2: ICMP echo request, id 7, seq 1, length 64\n"


def captured(*, tunnel: str = TUNNEL, wire1: str = WIRE, wire2: str = "") -> dict:
    out = {"node1|tunnel": index_requests(parse_tcpdump(tunnel))}
    for node, text in (("node1", wire1), ("node2", wire2)):
        for kind, index in index_wireguard(parse_tcpdump(text), POD_CIDR).items():
            out[f"{node}|{kind}"] = index
    return out


def verify(**kw) -> tuple[bool, str]:
    s = lab()
    return verify_wireguard(s, s.pod("a"), s.pod("b"), captured(**kw))


def test_tunnel_entry_plus_udp_to_the_peer_port_and_nothing_in_clear_passes():
    assert verify() == (True, "wireguard 10.224.0.4 -> 10.224.0.5:51820, nothing in clear")


@pytest.mark.parametrize(
    "kw, problem",
    [
        ({"tunnel": ""}, "entered node1's ocni.wg"),
        ({"wire1": ""}, "no UDP 10.224.0.4 -> 10.224.0.5:51820"),
        ({"wire1": WIRE.replace(".5.51820", ".5.4789")}, "no UDP"),  # wrong port
        ({"wire1": WIRE.replace("10.224.0.5.", "10.224.0.9.")}, "no UDP"),  # another node
        ({"wire1": WIRE + CLEAR}, "in clear on node1's underlay"),
        ({"wire2": CLEAR.replace("10.244.0.2 > 10.244.1.2: ICMP echo request", "10.244.1.2 > 10.244.0.2: ICMP echo reply")},
         "in clear on node2's underlay"),
    ],
)
def test_every_missing_or_wrong_piece_fails(kw, problem):
    ok, detail = verify(**kw)
    assert not ok and problem in detail


def test_udp_ports_and_the_encrypted_length():
    (p,) = parse_tcpdump(WIRE)
    assert udp_ports(p) == (51820, 51820)
    assert udp_ports(parse_tcpdump(TUNNEL)[0]) is None
    assert wireguard_length(84) == 128  # a 64-byte ping: 84 bytes of IP, padded to 96, plus 32
    assert wireguard_length(767) == 800


def test_trace_hop_picks_the_packet_of_the_traced_size_or_reports_a_leak():
    s = lab()
    other = "12:00:00.000001 IP 10.224.0.4.51820 > 10.224.0.5.51820: UDP, length 32\n"
    packets = parse_tcpdump(other + WIRE)
    pkt, note = _wireguard_hop(s, packets, IPv4Address("10.224.0.4"), IPv4Address("10.224.0.5"), inner=84)
    assert pkt is not None and pkt.length == 128 and "carrying 84-byte pod packet" in note
    pkt, note = _wireguard_hop(s, parse_tcpdump(WIRE + CLEAR), IPv4Address("10.224.0.4"), IPv4Address("10.224.0.5"), inner=84)
    assert "IN CLEAR" in note and pkt is not None and pkt.src == IPv4Address("10.244.0.2")
    pkt, note = _wireguard_hop(s, [], IPv4Address("10.224.0.4"), IPv4Address("10.224.0.5"), inner=84)
    assert pkt is None and note.startswith("no WireGuard packet")
