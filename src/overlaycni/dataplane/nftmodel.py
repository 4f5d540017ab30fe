"""The ``ip overlaycni`` nftables table, rendered from a model (pure).

Static chains, dynamic sets. The chains depend only on the pod CIDR, the
VXLAN port and the VXLAN device name; everything that changes at run time
(node IPs, pod endpoints, non-masquerade CIDRs) lives in sets, so watch
events and pod ADD/DEL touch set elements only. A regular, empty chain named
``fp_<hash of the static part>`` fingerprints the chains: when it matches,
reconciliation edits set elements; when it does not, the whole table is
replaced in one atomic transaction (the expressions, the element
encoding and the diff are ``nftables``', shared with the NetworkPolicy table
``inet overlaycni``, which this table never touches).

Chains:

* ``prerouting`` (filter, priority raw): a packet entering from a pod's host
  veth (``oc*`` but not the tunnel device, ``ocni.vxlan`` or ``ocni.wg``)
  whose ``iifname . saddr`` is not in ``@pod_endpoints`` is dropped
  (anti-spoofing, before conntrack). With the wireguard backend a packet
  with a pod-CIDR source is also dropped unless it arrives on the interface
  the route back to that source uses (``fib saddr . iif oif missing``, a
  strict reverse-path check for pod sources only): pod packets come from the
  tunnel or a pod veth, never in clear from the underlay.
* ``input`` (filter): VXLAN (UDP dport) from a pod source, or from a source
  not in ``@node_ips``, is dropped.
* ``forward`` (filter): VXLAN from a pod source to a node IP is dropped (it
  would otherwise be SNATed to a node IP and accepted by the peer).
* ``postrouting`` (nat, srcnat): RETURN for kube-proxy's mark 0x4000; RETURN
  unless the source is in the pod CIDR; RETURN for pod CIDR, non-masquerade
  and multicast destinations; otherwise masquerade with fully random ports.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, collapse_addresses
from typing import Any

from . import nftables as nft
from .model import KUBE_PROXY_MASQ_MARK, VETH_PREFIX, VXLAN_IFNAME, NodeState
from .nftables import NftState
from .wgmodel import WG_IFNAME

FAMILY = "ip"
TABLE = "overlaycni"
SET_NODE_IPS = "node_ips"
SET_POD_ENDPOINTS = "pod_endpoints"
SET_NON_MASQ = "non_masq"
MULTICAST = IPv4Network("224.0.0.0/4")

Element = Any  # an IPv4Address, IPv4Network or (ifname, IPv4Address)


@dataclass(frozen=True)
class NftTable:
    pod_cidr: IPv4Network
    vxlan_port: int
    node_ips: frozenset[IPv4Address] = frozenset()
    pod_endpoints: frozenset[tuple[str, IPv4Address]] = frozenset()
    non_masquerade: frozenset[IPv4Network] = frozenset()
    vxlan_ifname: str = VXLAN_IFNAME  # the tunnel device (ocni.wg with backend wireguard)
    pod_source_rpf: bool = False  # wireguard: drop pod-CIDR sources from the wrong interface

    def sets(self) -> dict[str, frozenset]:
        return {
            SET_NODE_IPS: self.node_ips,
            SET_POD_ENDPOINTS: self.pod_endpoints,
            SET_NON_MASQ: self.non_masquerade,
        }


def table_for(state: NodeState, *, pod_endpoints: Iterable[tuple[str, IPv4Address]]) -> NftTable:
    return NftTable(
        pod_cidr=state.pod_cidr,
        vxlan_port=state.vxlan_port,
        node_ips=frozenset({state.node_ip, *(p.node_ip for p in state.peers)}),
        pod_endpoints=frozenset(pod_endpoints),
        non_masquerade=frozenset(collapse_addresses(state.non_masquerade_cidrs)),
        vxlan_ifname=WG_IFNAME if state.backend == "wireguard" else VXLAN_IFNAME,
        pod_source_rpf=state.backend == "wireguard",
    )


# --- rendering ---------------------------------------------------------------------


def _obj(kind: str, **fields: Any) -> dict[str, Any]:
    return nft.obj(kind, FAMILY, TABLE, **fields)


IIFNAME = nft.meta("iifname")
SADDR = nft.payload("ip", "saddr")
DADDR = nft.payload("ip", "daddr")
COUNTER = {"counter": None}


def _rpf_rule(pod: Any) -> list[dict[str, Any]]:
    """``ip saddr <pod CIDR> fib saddr . iif oif missing drop``."""
    fib = {"fib": {"flags": ["saddr", "iif"], "result": "oif"}}
    return [nft.match(SADDR, pod), nft.match(fib, False), COUNTER, {"drop": None}]


def _chains(t: NftTable) -> list[tuple[dict[str, Any], list[list[dict[str, Any]]]]]:
    pod = nft.prefix(t.pod_cidr)
    vx = nft.match(nft.payload("udp", "dport"), t.vxlan_port)
    return [
        (
            {"name": "prerouting", "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"},
            [[
                nft.match(IIFNAME, VETH_PREFIX + "*"),
                nft.match(IIFNAME, t.vxlan_ifname, "!="),
                nft.match({"concat": [IIFNAME, SADDR]}, "@" + SET_POD_ENDPOINTS, "!="),
                COUNTER,
                {"drop": None},
            ]] + ([_rpf_rule(pod)] if t.pod_source_rpf else []),
        ),
        (
            {"name": "input", "type": "filter", "hook": "input", "prio": 0, "policy": "accept"},
            [
                [vx, nft.match(SADDR, pod), COUNTER, {"drop": None}],
                [vx, nft.match(SADDR, "@" + SET_NODE_IPS, "!="), COUNTER, {"drop": None}],
            ],
        ),
        (
            {"name": "forward", "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"},
            [[nft.match(SADDR, pod), vx, nft.match(DADDR, "@" + SET_NODE_IPS), COUNTER, {"drop": None}]],
        ),
        (
            {"name": "postrouting", "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"},
            [
                [nft.match({"&": [nft.meta("mark"), KUBE_PROXY_MASQ_MARK]}, KUBE_PROXY_MASQ_MARK), {"return": None}],
                [nft.match(SADDR, pod, "!="), {"return": None}],
                [nft.match(DADDR, pod), {"return": None}],
                [nft.match(DADDR, "@" + SET_NON_MASQ), {"return": None}],
                [nft.match(DADDR, nft.prefix(MULTICAST)), {"return": None}],
                [COUNTER, {"masquerade": {"flags": ["fully-random"]}}],
            ],
        ),
    ]


_SET_DEFS: dict[str, dict[str, Any]] = {
    SET_NODE_IPS: {"type": "ipv4_addr"},
    SET_POD_ENDPOINTS: {"type": ["ifname", "ipv4_addr"]},
    SET_NON_MASQ: {"type": "ipv4_addr", "flags": ["interval"]},
}


def fingerprint(t: NftTable) -> str:
    static = json.dumps({"chains": _chains(t), "sets": _SET_DEFS}, sort_keys=True)
    return hashlib.sha256(static.encode()).hexdigest()[:12]


def element_commands(verb: str, name: str, elems: Iterable[Element]) -> list[dict[str, Any]]:
    return nft.element_commands(verb, FAMILY, TABLE, name, elems)


def render_table(t: NftTable) -> list[dict[str, Any]]:
    """Commands that atomically replace the table with ``t`` (one transaction)."""
    cmds: list[dict[str, Any]] = [*nft.replace_table(FAMILY, TABLE), {"add": _obj("chain", name="fp_" + fingerprint(t))}]
    for name, spec in _SET_DEFS.items():
        cmds.append({"add": _obj("set", name=name, **spec)})
    for chain, rules in _chains(t):
        cmds.append({"add": _obj("chain", **chain)})
        for expr in rules:
            cmds.append({"add": _obj("rule", chain=chain["name"], expr=expr)})
    for name, elems in t.sets().items():
        cmds.extend(element_commands("add", name, elems))
    return cmds


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
