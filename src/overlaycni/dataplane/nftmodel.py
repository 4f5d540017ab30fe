"""The ``ip overlaycni`` nftables table, rendered from a model (pure).

Static chains, dynamic sets. The chains depend only on the pod CIDR, the
backend, the VXLAN port and device name; everything that changes at run
time (node IPs, pod endpoints, peers' blocks, non-masquerade CIDRs) lives in
sets, so watch events and pod ADD/DEL touch set elements only. A regular,
empty chain named ``fp_<hash of the static part>`` fingerprints the chains:
when it matches, reconciliation edits set elements; when it does not, the
whole table is replaced in one atomic transaction (``nftables.TableLayout``;
the expressions, the element encoding and the diff are shared with the
NetworkPolicy table ``inet overlaycni``, which this table never touches,
and with the pods' ARP and IPv6 guards, ``podguard``).

Every drop rule counts into a named counter (``DROP_RULES``), which the
agent exports as ``overlaycni_dropped_packets_total{rule=...}``.

Chains:

* ``prerouting`` (filter, priority raw, before conntrack):
  - ``pod_source_spoofed``: a packet from a pod's host veth (``oc*`` but
    not the tunnel device) whose ``iifname . saddr`` is not in
    ``@pod_endpoints``;
  - a packet with a pod-CIDR source from anywhere else but ``lo``, a pod
    veth or the tunnel (that is: from the underlay) goes to
    ``underlay_in``, which drops it (``underlay_pod_source``) unless, on
    the ``direct`` backend, ``ether saddr . ip saddr`` is in
    ``@peer_macs``: the source lies in the block of a peer and the frame
    comes from that peer's underlay MAC. Pod packets reach a node in clear
    from the underlay only on ``direct``; with VXLAN they arrive on the
    tunnel device after decapsulation (checked in ``vxlan_in``), with
    WireGuard on ``ocni.wg`` after decryption (cryptokey routing accepts
    from each peer only its block; the encrypted UDP comes from node IPs
    and is not a pod source).
* ``input`` (filter): VXLAN (UDP to the VXLAN port, delivered locally) goes
  to ``vxlan_in``, which drops it from a pod source (``vxlan_from_pod``),
  from a source not in ``@node_ips`` (``vxlan_unknown_node``), and unless
  the inner frame is IPv4 and ``outer saddr . inner saddr`` is in
  ``@peer_blocks`` (``vxlan_inner_source``): a node speaks for its own
  block only. In a dual-stack cluster the same device carries IPv6 pod
  packets over the IPv4 underlay, and an inner IPv6 frame passes when
  ``outer saddr . inner IPv6 saddr`` is in ``@peer_blocks6`` (the sender's
  IPv6 block); the drop is the same rule for both. A single-stack table has
  neither the set nor the rule (it is what it always was).
* ``forward`` (filter): VXLAN from a pod source to a node IP
  (``vxlan_pod_to_node``; it would otherwise be SNATed to a node IP and
  accepted by the peer).
* ``postrouting`` (nat, srcnat): RETURN for kube-proxy's mark 0x4000; RETURN
  unless the source is in the pod CIDR; RETURN for pod CIDR, non-masquerade
  and multicast destinations; otherwise masquerade with fully random ports.
  A nat chain sees only a connection's first packet (nft(8), NAT
  statements), so this costs nothing per packet of an established flow.
* ``notrack`` (VXLAN backend): the outer VXLAN flow between two node IPs
  (UDP to the VXLAN port, ``ip saddr`` and ``ip daddr`` in ``@node_ips``)
  is not tracked by conntrack: a rule at the end of ``prerouting`` for what
  arrives, and ``output`` (filter, priority raw) for what the VXLAN device
  sends. Nothing needs a connection entry for it (no NAT between node IPs,
  no ``ct`` match on it: ``vxlan_in`` matches headers), and each outer
  packet otherwise costs a conntrack lookup on both nodes, on top of the
  inner flow's own (which stays tracked: the policy table's ``ct state``
  and the masquerade need it). Defragmentation still happens: it runs at
  priority -400, before the raw chains mark the packet untracked. A pod's
  own UDP to port 4789 (not node IP to node IP) keeps its tracking, so its
  SNAT works. Measured in ``bench/lab.py`` (issue 14).

Binding the outer to the inner source. The kernel keeps no trace of the
outer header once it has decapsulated a packet (the VXLAN device's receive
path hands the inner frame on with the device as its only origin), so the
check runs before decapsulation, in ``input``, on the outer packet: the
inner IPv4 source sits at a fixed offset from the UDP header (UDP 8 +
VXLAN 8 + Ethernet 14 + 12 = 42 bytes: ``@th,336,32``, the inner ethertype
at ``@th,224,16``) whatever the outer header's options. nft 1.0.6 (Debian
12) can neither type that raw field (so ``@peer_blocks`` is declared with
``typeof ip saddr . @th,336,32`` and holds each block as a range of
integers, ``nftables.RawRange``) nor parse the inner headers itself (``vxlan
ip saddr`` needs nft 1.0.7). The inner IPv6 source is ``@th,304,128`` (UDP 8
+ VXLAN 8 + Ethernet 14 + 8 bytes into the IPv6 header), its ethertype
0x86dd at the same ``@th,224,16``; ``@peer_blocks6`` is ``typeof ip saddr .
@th,304,128`` with each IPv6 block a range of 128-bit integers (written as
hex strings: nft's JSON reads no wider number than 64 bits). Checked on this project's kernel (6.x) and nft
1.0.6: a set typed ``ipv4_addr . ipv4_addr`` is refused for the raw field
("datatype mismatch"), and nft's JSON parser knows no ``typeof`` and cannot
size ``integer`` ("variable sized data types"), so the table's full
replacement runs as native nft text (``nfttext``, still one transaction)
while element updates stay JSON. A payload load past the end of a short packet
ends the rule without a match, so the accept is the positive rule and the
drop comes last. Packets arrive reassembled (conntrack's defragmentation,
priority -400, runs before every chain here). Rejected: a per-peer VXLAN
device or FDB trick (the kernel would still accept any inner source from
a known VTEP), and ``meta mark`` set on the outer packet and matched after
decapsulation (marks are shared with kube-proxy and others).

Direct peers. A plain pod packet from a peer carries the peer's underlay
MAC as its Ethernet source (the direct backend needs L2 adjacency). The
agent publishes its underlay MAC in its node record (the field that holds
the VTEP MAC with VXLAN; ``NodeDataplane.node_info``), so ``@peer_macs``
(``ether_addr . ipv4_addr`` ranges) is kept with the peers from the
datastore like every other per-peer object, without depending on ARP
(which anyone on the segment can poison). Rejected: a reverse-path ``fib``
check (it tells the interface, not the neighbour: every host on the VNet
arrives on the same one) and MACs learnt from the neighbour table (absent
until traffic flows, so the first packets of a new peer would be dropped).
A sender on the segment that forges both a peer's MAC and a source in that
peer's block still gets through: on a shared L2 segment the MAC is no more
authentic than the IP (see docs/security.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, collapse_addresses
from typing import Any

from . import nftables as nft
from .model import KUBE_PROXY_MASQ_MARK, VETH_PREFIX, VXLAN_IFNAME, NodeState, Peer, normalize_mac
from .nftables import NftState, RawRange, TableLayout
from .wgmodel import WG_IFNAME

FAMILY = "ip"
TABLE = "overlaycni"
SET_NODE_IPS = "node_ips"
SET_POD_ENDPOINTS = "pod_endpoints"
SET_NON_MASQ = "non_masq"
SET_PEER_BLOCKS = "peer_blocks"
SET_PEER_MACS = "peer_macs"
SET_PEER_BLOCKS6 = "peer_blocks6"  # dual-stack: node IP . IPv6 block
MULTICAST = IPv4Network("224.0.0.0/4")

# Named counters, one per drop rule (the ``rule`` label of overlaycni_dropped_packets_total).
POD_SOURCE_SPOOFED = "pod_source_spoofed"
UNDERLAY_POD_SOURCE = "underlay_pod_source"
VXLAN_FROM_POD = "vxlan_from_pod"
VXLAN_UNKNOWN_NODE = "vxlan_unknown_node"
VXLAN_INNER_SOURCE = "vxlan_inner_source"
VXLAN_POD_TO_NODE = "vxlan_pod_to_node"
DROP_RULES = (POD_SOURCE_SPOOFED, UNDERLAY_POD_SOURCE, VXLAN_FROM_POD, VXLAN_UNKNOWN_NODE, VXLAN_INNER_SOURCE,
              VXLAN_POD_TO_NODE)  # fmt: skip

# The outer UDP header is the transport header (@th); offsets in bits.
INNER_ETHERTYPE = nft.payload_raw("th", 224, 16)  # UDP 8 + VXLAN 8 + dst, src MAC 12 bytes
INNER_SADDR = nft.payload_raw("th", 336, 32)  # ... + ethertype 2 + IPv4 saddr offset 12 bytes
INNER_SADDR6 = nft.payload_raw("th", 304, 128)  # ... + ethertype 2 + IPv6 saddr offset 8 bytes
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD

Element = Any  # an IPv4Address, IPv4Network or a tuple (concatenation) of those, str and RawRange


@dataclass(frozen=True)
class NftTable:
    pod_cidr: IPv4Network
    vxlan_port: int
    node_ips: frozenset[IPv4Address] = frozenset()
    pod_endpoints: frozenset[tuple[str, IPv4Address]] = frozenset()
    non_masquerade: frozenset[IPv4Network] = frozenset()
    vxlan_ifname: str = VXLAN_IFNAME  # the tunnel device (ocni.wg with backend wireguard)
    peer_blocks: frozenset[tuple[IPv4Address, IPv4Network]] = frozenset()  # node IP . block
    peer_macs: frozenset[tuple[str, IPv4Network]] = frozenset()  # direct: underlay MAC . block
    direct: bool = False  # backend direct: plain pod packets from peers' MACs are accepted
    notrack_vxlan: bool = False  # backend vxlan: the outer flow between node IPs skips conntrack
    peer_blocks6: frozenset[tuple[IPv4Address, IPv6Network]] | None = None  # dual-stack: node IP . IPv6 block

    def sets(self) -> dict[str, frozenset]:
        sets = {
            SET_NODE_IPS: self.node_ips,
            SET_POD_ENDPOINTS: self.pod_endpoints,
            SET_NON_MASQ: self.non_masquerade,
            SET_PEER_BLOCKS: frozenset(peer_block_element(ip, block) for ip, block in self.peer_blocks),
            SET_PEER_MACS: self.peer_macs,
        }
        if self.peer_blocks6 is not None:
            sets[SET_PEER_BLOCKS6] = frozenset(peer_block_element(ip, block) for ip, block in self.peer_blocks6)
        return sets

    def layout(self) -> TableLayout:
        defs = _SET_DEFS if self.peer_blocks6 is not None else {k: v for k, v in _SET_DEFS.items() if k != SET_PEER_BLOCKS6}
        return TableLayout(FAMILY, TABLE, DROP_RULES, defs, _chains(self))


def peer_block_element(node_ip: IPv4Address, block: IPv4Network | IPv6Network) -> tuple[IPv4Address, RawRange]:
    return (node_ip, RawRange.of(block))


def peer_elements(peer: Peer, *, backend: str, dual_stack: bool = False) -> dict[str, list[Element]]:
    """The set elements one peer contributes (``node_ips`` aside: a node IP may be shared in passing)."""
    out: dict[str, list[Element]] = {SET_PEER_BLOCKS: [peer_block_element(peer.node_ip, peer.block)]}
    if backend == "direct":
        out[SET_PEER_MACS] = [(normalize_mac(peer.vtep_mac), peer.block)]
    if dual_stack:
        out[SET_PEER_BLOCKS6] = [peer_block_element(peer.node_ip, peer.block_v6)] if peer.block_v6 is not None else []
    return out


def endpoint_elements(host_veth: str, ips: Iterable[IPv4Address | IPv6Address]) -> list[tuple[str, IPv4Address]]:
    """A pod's ``pod_endpoints`` elements: this ``ip`` table checks IPv4
    sources only (a pod's IPv6 addresses are the IPv6 anti-spoofing's)."""
    return [(host_veth, ip) for ip in ips if isinstance(ip, IPv4Address)]


def table_for(state: NodeState, *, pod_endpoints: Iterable[tuple[str, IPv4Address]]) -> NftTable:
    direct = state.backend == "direct"
    return NftTable(
        pod_cidr=state.pod_cidr,
        vxlan_port=state.vxlan_port,
        node_ips=frozenset({state.node_ip, *(p.node_ip for p in state.peers)}),
        pod_endpoints=frozenset(pod_endpoints),
        non_masquerade=frozenset(collapse_addresses(state.non_masquerade_cidrs)),
        vxlan_ifname=WG_IFNAME if state.backend == "wireguard" else VXLAN_IFNAME,
        peer_blocks=frozenset((p.node_ip, p.block) for p in state.peers),
        peer_macs=frozenset((normalize_mac(p.vtep_mac), p.block) for p in state.peers) if direct else frozenset(),
        direct=direct,
        notrack_vxlan=state.backend == "vxlan",
        peer_blocks6=frozenset((p.node_ip, p.block_v6) for p in state.peers if p.block_v6 is not None)
        if state.family(6) is not None else None,
    )


# --- rendering ---------------------------------------------------------------------

IIFNAME = nft.meta("iifname")
SADDR = nft.payload("ip", "saddr")
DADDR = nft.payload("ip", "daddr")
COUNTER = {"counter": None}


def snat_chain(protocol: str, pod: Any, multicast: IPv4Network | IPv6Network) -> tuple[dict[str, Any], list[list[dict[str, Any]]]]:
    """The family's (``protocol`` "ip" or "ip6") SNAT chain: traffic from the
    pod CIDR ``pod`` leaving it is masqueraded to the node's address (fully
    random ports), except kube-proxy's marked packets (it masquerades them
    itself), pod-to-pod, the non-masquerade destinations and multicast."""
    saddr, daddr = nft.payload(protocol, "saddr"), nft.payload(protocol, "daddr")
    return (
        {"name": "postrouting", "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"},
        [
            [nft.match({"&": [nft.meta("mark"), KUBE_PROXY_MASQ_MARK]}, KUBE_PROXY_MASQ_MARK), {"return": None}],
            [nft.match(saddr, pod, "!="), {"return": None}],
            [nft.match(daddr, pod), {"return": None}],
            [nft.match(daddr, "@" + SET_NON_MASQ), {"return": None}],
            [nft.match(daddr, nft.prefix(multicast)), {"return": None}],
            [COUNTER, {"masquerade": {"flags": ["fully-random"]}}],
        ],
    )


def _drop(name: str) -> list[dict[str, Any]]:
    return [{"counter": name}, {"drop": None}]


def _chains(t: NftTable) -> list[tuple[dict[str, Any], list[list[dict[str, Any]]]]]:
    pod = nft.prefix(t.pod_cidr)
    vx = nft.match(nft.payload("udp", "dport"), t.vxlan_port)
    from_peer = [nft.match({"concat": [nft.payload("ether", "saddr"), SADDR]}, "@" + SET_PEER_MACS), {"return": None}]
    # node IP to node IP VXLAN: the outer flow is not tracked (see the note)
    notrack = [vx, nft.match(SADDR, "@" + SET_NODE_IPS), nft.match(DADDR, "@" + SET_NODE_IPS), {"notrack": None}]
    chains: list[tuple[dict[str, Any], list[list[dict[str, Any]]]]] = [
        (
            {"name": "prerouting", "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"},
            [
                [
                    nft.match(IIFNAME, VETH_PREFIX + "*"),
                    nft.match(IIFNAME, t.vxlan_ifname, "!="),
                    nft.match({"concat": [IIFNAME, SADDR]}, "@" + SET_POD_ENDPOINTS, "!="),
                    *_drop(POD_SOURCE_SPOOFED),
                ],
                [
                    nft.match(SADDR, pod),
                    nft.match(IIFNAME, "lo", "!="),
                    nft.match(IIFNAME, VETH_PREFIX + "*", "!="),
                    nft.jump("underlay_in"),
                ],
                *([notrack] if t.notrack_vxlan else []),
            ],
        ),
        ({"name": "underlay_in"}, [*([from_peer] if t.direct else []), _drop(UNDERLAY_POD_SOURCE)]),
        (
            {"name": "input", "type": "filter", "hook": "input", "prio": 0, "policy": "accept"},
            [[vx, nft.jump("vxlan_in")]],
        ),
        (
            {"name": "vxlan_in"},
            [
                [nft.match(SADDR, pod), *_drop(VXLAN_FROM_POD)],
                [nft.match(SADDR, "@" + SET_NODE_IPS, "!="), *_drop(VXLAN_UNKNOWN_NODE)],
                [
                    nft.match(INNER_ETHERTYPE, ETHERTYPE_IPV4),
                    nft.match({"concat": [SADDR, INNER_SADDR]}, "@" + SET_PEER_BLOCKS),
                    {"return": None},
                ],
                *([[
                    nft.match(INNER_ETHERTYPE, ETHERTYPE_IPV6),
                    nft.match({"concat": [SADDR, INNER_SADDR6]}, "@" + SET_PEER_BLOCKS6),
                    {"return": None},
                ]] if t.peer_blocks6 is not None else []),
                _drop(VXLAN_INNER_SOURCE),
            ],
        ),
        (
            {"name": "forward", "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"},
            [[nft.match(SADDR, pod), vx, nft.match(DADDR, "@" + SET_NODE_IPS), *_drop(VXLAN_POD_TO_NODE)]],
        ),
        snat_chain("ip", pod, MULTICAST),
    ]
    if t.notrack_vxlan:
        chains.append(({"name": "output", "type": "filter", "hook": "output", "prio": -300, "policy": "accept"}, [notrack]))
    return chains


_SET_DEFS: dict[str, dict[str, Any]] = {
    SET_NODE_IPS: {"type": "ipv4_addr"},
    SET_POD_ENDPOINTS: {"type": ["ifname", "ipv4_addr"]},
    SET_NON_MASQ: {"type": "ipv4_addr", "flags": ["interval"]},
    # typeof ip saddr . @th,336,32 (rendered as text, see nfttext); nft lists it by "type"
    SET_PEER_BLOCKS: {"type": ["ipv4_addr", "integer"], "flags": ["interval"], "typeof": {"concat": [SADDR, INNER_SADDR]}},
    SET_PEER_MACS: {"type": ["ether_addr", "ipv4_addr"], "flags": ["interval"]},
    SET_PEER_BLOCKS6: {"type": ["ipv4_addr", "integer"], "flags": ["interval"], "typeof": {"concat": [SADDR, INNER_SADDR6]}},
}


def fingerprint(t: NftTable) -> str:
    return t.layout().fingerprint()


def element_commands(verb: str, name: str, elems: Iterable[Element]) -> list[dict[str, Any]]:
    return nft.element_commands(verb, FAMILY, TABLE, name, elems)


def render_table(t: NftTable) -> list[dict[str, Any]]:
    """Commands that atomically replace the table with ``t`` (one transaction)."""
    return t.layout().render(t.sets())


def render_set_update(name: str, *, add: Iterable[Element] = (), delete: Iterable[Element] = ()) -> list[dict[str, Any]]:
    return element_commands("delete", name, delete) + element_commands("add", name, add)


def diff_sets(current: NftState, desired: NftTable) -> list[dict[str, Any]]:
    """Element updates from ``current`` (the kernel's sets) to ``desired``;
    the caller has checked that the fingerprints match."""
    return nft.diff(FAMILY, TABLE, NftState(None, current.sets), NftState(None, dict(desired.sets()))) or []


# --- parsing `nft -j list table ip overlaycni` ----------------------------------------

SET_DECLS = {name: nft.SetDecl.of(spec) for name, spec in _SET_DEFS.items()}


def parse_listing(doc: dict[str, Any]) -> NftState:
    return nft.parse_listing(doc, decls=SET_DECLS)
