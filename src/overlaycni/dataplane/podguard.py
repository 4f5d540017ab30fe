"""What a pod may send over ARP: the ``arp overlaycni`` table, rendered
from a model (pure).

The ``ip overlaycni`` table (``nftmodel``) checks a pod's IPv4 source; it
does not see ARP, which the kernel handles on another path. This table
closes it, with the same static-chains / dynamic-sets layout, fingerprint
chain and element diff (``nftables.TableLayout``), reconciled with the node
table and updated in the same transaction on pod ADD/DEL. It matches
packets from a pod's host veth: ``oc*`` but not the tunnel device, exactly
as the IPv4 anti-spoofing rule does. (What a pod may send over IPv6 is the
``ip6 overlaycni`` table's, ``nftmodel6``.)

``arp overlaycni`` (hook input: every ARP packet the node receives):

* ``pod_arp_sender``: the sender IP is not the pod's own (``iifname . arp
  saddr ip`` not in ``@pod_endpoints``, the same ``ifname . address``
  elements as the IPv4 set): a pod cannot make the node record a neighbour
  entry, or answer, for an address it does not hold;
* ``pod_arp_target``: a request for anything but the pod's gateway (or its
  own address: a gratuitous announcement). The gateway ``<block>.1`` is a
  local address of the node (on ``lo``), answered by the host veth; the
  veth's proxy ARP would answer for every address routed elsewhere, and no
  longer sees such a request. A pod's only neighbour is its gateway
  (``noprefixroute``, see ``linux/pods.py``).

ARP replies from the pod (answers to the node's own requests) need only a
true sender. The node's replies and requests leave by the output hook and
are not filtered. The table is IPv4's and stays the same in a dual-stack
cluster (IPv6 finds its neighbours with ICMPv6, ``nftmodel6``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from . import nftables as nft
from .model import VETH_PREFIX, VXLAN_IFNAME, gateway_of
from .nftables import TableLayout

TABLE = "overlaycni"
ARP_FAMILY = "arp"
SET_POD_ENDPOINTS = "pod_endpoints"

POD_ARP_SENDER = "pod_arp_sender"
POD_ARP_TARGET = "pod_arp_target"
ARP_DROP_RULES = (POD_ARP_SENDER, POD_ARP_TARGET)

IIFNAME = nft.meta("iifname")
ARP_SENDER_IP = nft.payload("arp", "saddr ip")
ARP_TARGET_IP = nft.payload("arp", "daddr ip")


def _drop(name: str) -> list[dict[str, Any]]:
    return [{"counter": name}, {"drop": None}]


def _from_pod(tunnel_ifname: str) -> list[dict[str, Any]]:
    return [nft.match(IIFNAME, VETH_PREFIX + "*"), nft.match(IIFNAME, tunnel_ifname, "!="), nft.jump("from_pod")]


@dataclass(frozen=True)
class ArpTable:
    gateway: IPv4Address
    pod_endpoints: frozenset[tuple[str, IPv4Address]] = frozenset()
    tunnel_ifname: str = VXLAN_IFNAME

    family = ARP_FAMILY

    def sets(self) -> dict[str, frozenset]:
        return {SET_POD_ENDPOINTS: self.pod_endpoints}

    def layout(self) -> TableLayout:
        own = nft.match({"concat": [IIFNAME, ARP_TARGET_IP]}, "@" + SET_POD_ENDPOINTS, "!=")
        chains: list[tuple[dict[str, Any], list[list[dict[str, Any]]]]] = [
            (
                {"name": "input", "type": "filter", "hook": "input", "prio": 0, "policy": "accept"},
                [_from_pod(self.tunnel_ifname)],
            ),
            (
                {"name": "from_pod"},
                [
                    [nft.match({"concat": [IIFNAME, ARP_SENDER_IP]}, "@" + SET_POD_ENDPOINTS, "!="), *_drop(POD_ARP_SENDER)],
                    [
                        nft.match(nft.payload("arp", "operation"), "request"),
                        nft.match(ARP_TARGET_IP, str(self.gateway), "!="),
                        own,
                        *_drop(POD_ARP_TARGET),
                    ],
                ],
            ),
        ]
        return TableLayout(ARP_FAMILY, TABLE, ARP_DROP_RULES, _ARP_SETS, chains)


_ARP_SETS: dict[str, dict[str, Any]] = {SET_POD_ENDPOINTS: {"type": ["ifname", "ipv4_addr"]}}
ARP_SET_DECLS = {name: nft.SetDecl.of(spec) for name, spec in _ARP_SETS.items()}


def arp_table_for(block: IPv4Network, *, pod_endpoints: Iterable[tuple[str, IPv4Address]]) -> ArpTable:
    return ArpTable(gateway=gateway_of(block), pod_endpoints=frozenset(pod_endpoints))
