"""The ``ip6 overlaycni`` nftables table, rendered from a model (pure).

IPv6's counterpart of ``nftmodel`` (the ``ip`` table), with the same
static-chains / dynamic-sets layout, fingerprint chain and element diff
(``nftables.TableLayout``), reconciled with the node's other tables and
updated in the same transaction on pod ADD/DEL and peer events
(``nodetables``). It matches a pod's packets as the IPv4 rules do: from a
host veth, ``oc*`` but not the tunnel device (``ocni.vxlan``, ``ocni.wg``).
Every drop counts into a named counter (``overlaycni_dropped_packets_total``).

Single-stack (an IPv4 cluster): pods have no IPv6 address, and the pod keeps
the link-local address its kernel makes (disabling IPv6 inside the pod is
the pod's own setting, which a pod with NET_ADMIN could undo; disabling it
on the host veth would drop packets before any counter sees them). Chain
``prerouting`` (filter, priority raw: before conntrack and routing, so that
nothing a pod sends over IPv6 is forwarded or delivered) sends a pod's
packets to ``from_pod``, which drops them all, counted in two parts:
``pod_ipv6_multicast`` for link-scope multicast (``ff02::/16``: the pod
kernel's own duplicate address detection, router and neighbour
solicitations and MLD reports, a few per pod start), and ``pod_ipv6`` for
the rest. That table is exactly what it was before dual-stack existed.

Dual-stack adds, per family rule for rule what the ``ip`` table does:

* IPv6 anti-spoofing, in ``from_pod``: a packet whose ``iifname . ip6
  saddr`` is in ``@pod_endpoints`` (the pod's own global address on its own
  veth) returns; so does neighbour discovery from the pod's link-local
  address (``fe80::/64`` but not the gateway ``fe80::1``, which is the
  node's; ICMPv6 router solicitation, neighbour solicitation and
  advertisement: how the pod finds its gateway, RFC 4861). Link-local
  addresses mean something on one link only, and a pod's only link is its
  veth, so any ``fe80::/64`` source there is the pod's own. Everything else
  is dropped as above, so ``pod_ipv6`` becomes the IPv6 anti-spoofing rule:
  another pod's address, an address outside the pod CIDR, or anything but
  neighbour discovery from a link-local address (MLD reports, which the pod
  kernel sends to ``ff02::16``, stay in ``pod_ipv6_multicast``).
* Underlay sources, in ``prerouting``: a packet with an IPv6 pod-CIDR
  source from anywhere but ``lo``, a pod veth or the tunnel goes to
  ``underlay_in``, which drops it (``underlay_pod_source_v6``) unless, on
  the ``direct`` backend, ``ether saddr . ip6 saddr`` is in ``@peer_macs``:
  the source lies in the IPv6 block of a peer and the frame comes from that
  peer's underlay MAC (the same MAC as for its IPv4 block). IPv6 VXLAN is
  checked in the ``ip`` table: the tunnel runs over the IPv4 underlay, and
  the outer header is IPv4 (``nftmodel``, ``@peer_blocks6``).
* Egress NAT, chain ``postrouting`` (nat, srcnat): RETURN for kube-proxy's
  mark 0x4000; RETURN unless the source is in the IPv6 pod CIDR; RETURN for
  IPv6 pod CIDR, IPv6 non-masquerade and multicast (``ff00::/8``)
  destinations; otherwise masquerade with fully random ports, to the node's
  IPv6 address on the way out (what AKS does: egress "NATed to the node's
  address of the same family"). Pod-to-pod traffic is never translated.

Not here: VXLAN sent over IPv6 (the VXLAN socket is IPv4, a node receives
no VXLAN over IPv6 at all), and ARP (IPv4 only: ``podguard``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network, collapse_addresses
from typing import Any

from . import nftables as nft
from .model import VETH_PREFIX, VXLAN_IFNAME, NodeState, Peer, normalize_mac
from .nftables import TableLayout
from .nftmodel import snat_chain
from .wgmodel import WG_IFNAME

FAMILY = "ip6"
TABLE = "overlaycni"
SET_POD_ENDPOINTS = "pod_endpoints"
SET_NON_MASQ = "non_masq"
SET_PEER_MACS = "peer_macs"
LINK_SCOPE_MULTICAST = IPv6Network("ff02::/16")
MULTICAST = IPv6Network("ff00::/8")
LINK_LOCAL = IPv6Network("fe80::/64")
GATEWAY = IPv6Address("fe80::1")  # the pods' gateway, held by the node on each host veth (families.POD_GATEWAY_V6)
NEIGHBOUR_DISCOVERY = ("nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert")

POD_IPV6_MULTICAST = "pod_ipv6_multicast"
POD_IPV6 = "pod_ipv6"
UNDERLAY_POD_SOURCE_V6 = "underlay_pod_source_v6"
SINGLE_STACK_DROP_RULES = (POD_IPV6_MULTICAST, POD_IPV6)
DROP_RULES = (*SINGLE_STACK_DROP_RULES, UNDERLAY_POD_SOURCE_V6)

IIFNAME = nft.meta("iifname")
SADDR = nft.payload("ip6", "saddr")
DADDR = nft.payload("ip6", "daddr")

Rules = list[list[dict[str, Any]]]


@dataclass(frozen=True)
class Ip6Table:
    tunnel_ifname: str = VXLAN_IFNAME
    pod_cidr: IPv6Network | None = None  # None: single-stack (every IPv6 packet from a pod is dropped)
    pod_endpoints: frozenset[tuple[str, IPv6Address]] = frozenset()  # host veth . the pod's IPv6 address
    non_masquerade: frozenset[IPv6Network] = frozenset()
    peer_macs: frozenset[tuple[str, IPv6Network]] = frozenset()  # direct: underlay MAC . IPv6 block
    direct: bool = False

    family = FAMILY

    def sets(self) -> dict[str, frozenset]:
        if self.pod_cidr is None:
            return {}
        return {SET_POD_ENDPOINTS: self.pod_endpoints, SET_NON_MASQ: self.non_masquerade, SET_PEER_MACS: self.peer_macs}

    def layout(self) -> TableLayout:
        if self.pod_cidr is None:
            return TableLayout(FAMILY, TABLE, SINGLE_STACK_DROP_RULES, {}, _single_stack_chains(self.tunnel_ifname))
        return TableLayout(FAMILY, TABLE, DROP_RULES, _SET_DEFS, _dual_stack_chains(self, self.pod_cidr))


def _drop(name: str) -> list[dict[str, Any]]:
    return [{"counter": name}, {"drop": None}]


def _from_pod(tunnel_ifname: str) -> list[dict[str, Any]]:
    return [nft.match(IIFNAME, VETH_PREFIX + "*"), nft.match(IIFNAME, tunnel_ifname, "!="), nft.jump("from_pod")]


def _prerouting(rules: Rules) -> tuple[dict[str, Any], Rules]:
    return {"name": "prerouting", "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"}, rules


def _pod_drops() -> Rules:
    return [[nft.match(DADDR, nft.prefix(LINK_SCOPE_MULTICAST)), *_drop(POD_IPV6_MULTICAST)], _drop(POD_IPV6)]


def _single_stack_chains(tunnel_ifname: str) -> list[tuple[dict[str, Any], Rules]]:
    return [_prerouting([_from_pod(tunnel_ifname)]), ({"name": "from_pod"}, _pod_drops())]


def _dual_stack_chains(t: Ip6Table, pod_cidr: IPv6Network) -> list[tuple[dict[str, Any], Rules]]:
    pod = nft.prefix(pod_cidr)
    own = [nft.match({"concat": [IIFNAME, SADDR]}, "@" + SET_POD_ENDPOINTS), {"return": None}]
    nd = [
        nft.match(SADDR, nft.prefix(LINK_LOCAL)),
        nft.match(SADDR, str(GATEWAY), "!="),
        nft.match(nft.payload("icmpv6", "type"), {"set": list(NEIGHBOUR_DISCOVERY)}),
        {"return": None},
    ]
    from_peer = [nft.match({"concat": [nft.payload("ether", "saddr"), SADDR]}, "@" + SET_PEER_MACS), {"return": None}]
    underlay = [
        nft.match(SADDR, pod),
        nft.match(IIFNAME, "lo", "!="),
        nft.match(IIFNAME, VETH_PREFIX + "*", "!="),
        nft.jump("underlay_in"),
    ]
    return [
        _prerouting([_from_pod(t.tunnel_ifname), underlay]),
        ({"name": "from_pod"}, [own, nd, *_pod_drops()]),
        ({"name": "underlay_in"}, [*([from_peer] if t.direct else []), _drop(UNDERLAY_POD_SOURCE_V6)]),
        snat_chain("ip6", pod, MULTICAST),
    ]


_SET_DEFS: dict[str, dict[str, Any]] = {
    SET_POD_ENDPOINTS: {"type": ["ifname", "ipv6_addr"]},
    SET_NON_MASQ: {"type": "ipv6_addr", "flags": ["interval"]},
    SET_PEER_MACS: {"type": ["ether_addr", "ipv6_addr"], "flags": ["interval"]},
}
SET_DECLS = {name: nft.SetDecl.of(spec) for name, spec in _SET_DEFS.items()}


def peer_elements(peer: Peer, *, backend: str) -> dict[str, list[Any]]:
    """The elements one peer contributes to this table (dual-stack): on
    ``direct``, its underlay MAC with its IPv6 block."""
    if backend != "direct" or peer.block_v6 is None:
        return {}
    return {SET_PEER_MACS: [(normalize_mac(peer.vtep_mac), peer.block_v6)]}


def table_for(state: NodeState, *, pod_endpoints: Iterable[tuple[str, IPv6Address]]) -> Ip6Table:
    """The table for ``state``: single-stack unless the node has an IPv6 side."""
    tunnel = WG_IFNAME if state.backend == "wireguard" else VXLAN_IFNAME
    v6 = state.family(6)
    if v6 is None:
        return Ip6Table(tunnel_ifname=tunnel)
    direct = state.backend == "direct"
    return Ip6Table(
        tunnel_ifname=tunnel,
        pod_cidr=IPv6Network(v6.pod_cidr),
        pod_endpoints=frozenset(pod_endpoints),
        non_masquerade=frozenset(collapse_addresses(IPv6Network(n) for n in v6.non_masquerade_cidrs)),
        peer_macs=frozenset(e for p in state.peers for e in peer_elements(p, backend=state.backend).get(SET_PEER_MACS, [])),
        direct=direct,
    )
