"""The node's own nftables tables, kept on their ports (no kernel access here).

Three tables, one per family the node filters: ``ip overlaycni``
(``nftmodel``: anti-spoofing, underlay and VXLAN source validation, SNAT),
``ip6 overlaycni`` (``nftmodel6``: a single-stack node drops every IPv6
packet from its pods; a dual-stack one checks their IPv6 sources, the
underlay's IPv6 pod sources and masquerades IPv6 egress) and the pods' ARP
guard ``arp overlaycni`` (``podguard``). The NetworkPolicy table ``inet
overlaycni`` is ``policytable``'s.

* Reconcile: per table, a fingerprint that differs (or no table) replaces
  the table whole in one transaction; a matching one gets the element
  deletes and adds that bring it to the desired state, in one transaction.
  Each table is reconciled even when another fails (its error is reported).
  A table edited behind our back keeps its fingerprint chain (a flushed
  chain, a deleted rule): its listed structure (``NftState.digest``) then
  differs from the one listed right after our last full apply, and it is
  replaced too. A table found at start is adopted with its structure.
* Events: a pod's ``ifname . ip`` goes into the ``ip`` and ``arp``
  ``pod_endpoints`` sets, and its ``ifname . ipv6`` into the ``ip6`` one, in
  one transaction (the ports' ``apply`` runs any table's commands); a
  peer's ``node_ips``, ``peer_blocks`` (``peer_blocks6``) and (``direct``)
  ``peer_macs`` elements of both families likewise. Before the first reconcile a table may
  be missing: the sets that exist are updated, the reconcile adds the rest.
  Removals delete only the elements the kernel lists (a delete of an
  absent element would fail the whole transaction).
* ``drop_counters``: every drop rule's named counter, read from the kernel
  (``overlaycni_dropped_packets_total{rule}``); a table that is missing
  reads as no counters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Protocol

from ..cidr import IPAddress
from ..errors import DataplaneError
from . import nftables, nftmodel, nftmodel6, podguard
from .model import NodeState, Peer, ReconcileReport
from .nftables import TableLayout
from .ports import NftRuleset

SUMMARY_OVER = 20  # elements shown per change line
SetKey = tuple[str, str]  # (family, set name); every table is named "overlaycni"
IP_PODS: SetKey = (nftmodel.FAMILY, nftmodel.SET_POD_ENDPOINTS)
ARP_PODS: SetKey = (podguard.ARP_FAMILY, podguard.SET_POD_ENDPOINTS)
IP6_PODS: SetKey = (nftmodel6.FAMILY, nftmodel6.SET_POD_ENDPOINTS)
DROP_RULES = (*nftmodel.DROP_RULES, *podguard.ARP_DROP_RULES, *nftmodel6.DROP_RULES)


def _pod_sets(ip: IPAddress) -> tuple[SetKey, ...]:
    """The sets that hold a pod's address: IPv4 in the ``ip`` and ``arp`` tables, IPv6 in the ``ip6`` table."""
    return (IP_PODS, ARP_PODS) if isinstance(ip, IPv4Address) else (IP6_PODS,)


class Table(Protocol):
    def layout(self) -> TableLayout: ...
    def sets(self) -> dict[str, frozenset]: ...


class NodeTables:
    def __init__(self, *, ip: NftRuleset, arp: NftRuleset, ip6: NftRuleset) -> None:
        self.ports = {nftmodel.FAMILY: ip, podguard.ARP_FAMILY: arp, nftmodel6.FAMILY: ip6}
        self.digests: dict[str, str | None] = {}  # family -> structure as listed after our last full apply

    # --- reconcile -----------------------------------------------------------------

    def desired(self, state: NodeState, pod_endpoints: Iterable[tuple[str, IPAddress]]) -> list[Table]:
        v4: set[tuple[str, IPv4Address]] = set()
        v6: set[tuple[str, IPv6Address]] = set()
        for veth, ip in pod_endpoints:
            v4.add((veth, ip)) if isinstance(ip, IPv4Address) else v6.add((veth, ip))
        return [
            nftmodel.table_for(state, pod_endpoints=v4),
            podguard.arp_table_for(state.block, pod_endpoints=v4),
            nftmodel6.table_for(state, pod_endpoints=v6),
        ]

    def reconcile(
        self, state: NodeState, pod_endpoints: Iterable[tuple[str, IPv4Address | IPv6Address]], report: ReconcileReport
    ) -> None:
        for table in self.desired(state, pod_endpoints):
            layout = table.layout()
            try:
                self._sync(layout, table.sets(), report)
            except DataplaneError as exc:
                report.errors.append(f"nft {layout.family} {layout.name}: {exc.message}")

    def _sync(self, layout: TableLayout, sets: dict[str, frozenset], report: ReconcileReport) -> None:
        port = self.ports[layout.family]
        current = port.get_table()
        commands = None if current is None else layout.diff(current, sets)
        known = self.digests.get(layout.family)
        edited = current is not None and known is not None and current.digest is not None and current.digest != known
        if commands is None or edited:
            port.apply(layout.render(sets))
            listed = port.get_table()
            self.digests[layout.family] = listed.digest if listed is not None else None
            why = " (chains or rules changed behind our back)" if edited and commands is not None else ""
            report.changes.append(f"nftables table {layout.family} {layout.name} replaced{why}")
            return
        if known is None and current is not None:
            self.digests[layout.family] = current.digest  # adopted from an earlier agent
        if not commands:
            return
        port.apply(commands)
        where = "" if layout.family == nftmodel.FAMILY else f"{layout.family} "
        for cmd in commands:
            for verb, body in cmd.items():
                elems = body["element"]["elem"]
                shown = ", ".join(map(str, elems[:SUMMARY_OVER])) + (", ..." if len(elems) > SUMMARY_OVER else "")
                report.changes.append(f"nftables {verb} {len(elems)} element(s) {where}{body['element']['name']} {{ {shown} }}")

    # --- element updates --------------------------------------------------------------

    def list_set(self, key: SetKey) -> frozenset | None:
        return self.ports[key[0]].list_set(key[1])

    def update(self, *, add: Mapping[SetKey, Iterable[Any]] | None = None,
               remove: Mapping[SetKey, Iterable[Any]] | None = None) -> None:
        """Remove (those present) and add elements across the node's sets in one transaction."""
        removals = {}
        for key, elems in (remove or {}).items():
            wanted = set(elems)
            present = self.list_set(key) if wanted else None
            if present:
                removals[key] = wanted & present
        self._apply(add or {}, removals)

    def _apply(self, add: Mapping[SetKey, Iterable[Any]], removals: Mapping[SetKey, Iterable[Any]]) -> None:
        """Delete ``removals`` (elements the kernel lists) and add ``add``, in one transaction."""
        keys = sorted(set(add) | {k for k, v in removals.items() if v})
        if not keys:
            return

        def commands(only: list[SetKey]) -> list[dict[str, Any]]:
            cmds: list[dict[str, Any]] = []
            for family, name in only:
                cmds += nftables.element_commands("delete", family, nftmodel.TABLE, name, removals.get((family, name), ()))
                cmds += nftables.element_commands("add", family, nftmodel.TABLE, name, add.get((family, name), ()))
            return cmds

        runner = self.ports[nftmodel.FAMILY]
        try:
            runner.apply(commands(keys))
            return
        except DataplaneError:
            present_keys = [k for k in keys if self.list_set(k) is not None]
            if present_keys == keys:
                raise  # every set is there: a real failure
        runner.apply(commands(present_keys))

    def add_pod(self, host_veth: str, *ips: IPv4Address | IPv6Address) -> None:
        """A pod's elements: its IPv4 address in the ``ip`` and ``arp`` sets,
        its IPv6 address in the ``ip6`` set (a single-stack node has none)."""
        self.add_pods((host_veth, ip) for ip in ips)

    def add_pods(self, pods: Iterable[tuple[str, IPv4Address | IPv6Address]]) -> None:
        """Several pods' elements in one transaction (a batch of ADDs); a
        dual-stack pod gives one ``(veth, ip)`` per family."""
        elems = list(pods)
        v4 = [e for e in elems if isinstance(e[1], IPv4Address)]
        add: dict[SetKey, list[Any]] = {IP_PODS: v4, ARP_PODS: v4}
        v6 = [e for e in elems if not isinstance(e[1], IPv4Address)]
        if v6:
            add[IP6_PODS] = v6
        self.update(add=add)

    def remove_pod(self, host_veth: str, ip: IPv4Address | IPv6Address | None = None) -> None:
        """Remove the pod's elements (``ip`` None: every element of ``host_veth``)."""
        self.remove_pods({host_veth: ip})

    def remove_pods(self, pods: Mapping[str, IPv4Address | IPv6Address | None]) -> None:
        """Several pods' elements (host veth -> its ip, or None: all of that veth) in one transaction
        (each set listed once)."""
        remove: dict[SetKey, list[Any]] = {}
        for key in (IP_PODS, ARP_PODS, IP6_PODS):
            present = self.list_set(key) or frozenset()
            remove[key] = [e for e in present if e[0] in pods and (pods[e[0]] is None or e[1] == pods[e[0]])]
        self._apply({}, remove)

    def missing_pod_elements(self, host_veth: str, ip: IPv4Address | IPv6Address) -> list[str]:
        problems = []
        for family, name in _pod_sets(ip):
            present = self.list_set((family, name))
            if present is not None and (host_veth, ip) not in present:
                problems.append(f"anti-spoofing element {host_veth} . {ip} is missing from {family} {name}")
        return problems

    def add_peer(self, state: NodeState, peer: Peer) -> None:
        self.add_peers(state, [peer])

    def add_peers(self, state: NodeState, peers: Iterable[Peer]) -> None:
        """Several peers' elements in one transaction."""
        self.update(add=_merged(_peer_elements(state, p) for p in peers))

    def remove_peer(self, state: NodeState, peer: Peer) -> None:
        self.remove_peers(state, [peer])

    def remove_peers(self, state: NodeState, peers: Iterable[Peer]) -> None:
        """Several peers' elements in one transaction (those no other peer of ``state`` needs)."""
        self.update(remove=self._peers_only(state, list(peers)))

    def _peers_only(self, state: NodeState, peers: list[Peer]) -> dict[SetKey, list[Any]]:
        """The elements of ``peers`` that no other peer of ``state`` (nor this node) also needs."""
        names = {p.name for p in peers}
        keep = _merged(_peer_elements(state, p) for p in state.peers if p.name not in names)
        keep.setdefault((nftmodel.FAMILY, nftmodel.SET_NODE_IPS), []).append(state.node_ip)
        kept = {key: set(elems) for key, elems in keep.items()}
        gone = _merged(_peer_elements(state, p) for p in peers)
        return {key: [e for e in elems if e not in kept.get(key, set())] for key, elems in gone.items()}

    # --- counters ---------------------------------------------------------------------

    def drop_counters(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for port in self.ports.values():
            counts.update({k: v for k, v in port.counters().items() if k in DROP_RULES})
        return counts


def _merged(parts: Iterable[dict[SetKey, list[Any]]]) -> dict[SetKey, list[Any]]:
    out: dict[SetKey, list[Any]] = {}
    for part in parts:
        for key, elems in part.items():
            out.setdefault(key, []).extend(elems)
    return out


def _peer_elements(state: NodeState, peer: Peer) -> dict[SetKey, list[Any]]:
    """Every set element ``peer`` contributes to the node's tables."""
    dual = state.family(6) is not None
    out: dict[SetKey, list[Any]] = {(nftmodel.FAMILY, nftmodel.SET_NODE_IPS): [peer.node_ip]}
    for name, elems in nftmodel.peer_elements(peer, backend=state.backend, dual_stack=dual).items():
        out[(nftmodel.FAMILY, name)] = elems
    for name, elems in (nftmodel6.peer_elements(peer, backend=state.backend) if dual else {}).items():
        out[(nftmodel6.FAMILY, name)] = elems
    return out
