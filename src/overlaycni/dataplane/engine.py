"""The data plane's logic, written once against the ports (no kernel access here).

``NodeDataplane`` implements the ``Dataplane`` facade on top of any set of
ports: ``fake.FakeDataplane`` wires in-memory ports, ``linux.LinuxDataplane``
the netlink/nftables ones, so both run exactly this code.

Reconcile is "desired state vs kernel" (Calico style): read the owned
objects, compute the difference, program only that, in flannel's order
(neighbour, FDB, route; removal route, FDB, neighbour). The wireguard
backend's device and peers are a strategy (``wireguard.py``) called at the
same points: WireGuard peer before route, removal in reverse. Pod routes and pod
set elements are only removed when their host veth is gone: a CNI ADD that
raced with a reconcile computed from an older pod list must not lose its
route (leaked veths are found by ``list_pod_veths`` and removed by GC); and
only programmed while it lives: a pod of an older list whose veth is gone
(a DEL since) gets neither back.

The node's nftables tables (``ip``, ``ip6`` and ``arp overlaycni``,
``nodetables``) are reconciled alike: replaced whole when their
fingerprint differs, else brought to the desired elements. A pod ADD/DEL
adds/removes its ``ifname . ip`` element in the ``ip`` and ``arp`` tables
(and ``ifname . ipv6`` in the ``ip6`` one) in one transaction; a peer event
its ``node_ips``/``peer_blocks`` (and, on ``direct``, ``peer_macs``)
elements.

Dual-stack (``NodeState.families``): every per-block object exists once
per family, and nothing here asks which family it holds. Per peer a route
per block (VXLAN: and a neighbour per block, one FDB entry for both;
``model.peer_objects``); the tunnel device holds the first address of each
of the node's blocks; this node's blocks are unreachable routes (a free
address never loops back out), and so is each family's pod CIDR (a packet
for a block no admitted peer routes is refused instead of leaving by a
default route), on every backend. On
``direct`` a peer that published no IPv6 address gets its IPv4 route and a
report error for its IPv6 block. IPv6 forwarding is switched on in the node
namespace only when the node has an IPv6 block; IPv6 has no ``rp_filter``
(the ``ip6`` table checks sources exactly).

Sysctls: only what the data path needs, on the devices it owns. The
``all``/``default`` settings and the underlay's are the operator's. Per
pod host veth ``rp_filter=1`` (strict: the only source a pod may use is
routed back through its own veth; the kernel's check backs the nft rule)
and proxy ARP (see ``pod_veth_sysctls``); on the tunnel device
(``ocni.vxlan``, ``ocni.wg``) ``rp_filter=1`` (a decapsulated or decrypted
packet's source lies in a peer's block, routed back through the device). The kernel applies the larger of
``all`` and the device's value, so a host that sets ``all`` to 2 (loose)
keeps loose checks there; none of the data path needs ``rp_filter=0``.

Throughput (issue 14; ``bench/lab.py --ablate``). Over the kernel's own
VXLAN link between the same nodes, a pod's packet pays one veth hop into
its node and one out of the peer, IP forwarding on both nodes (a route
lookup, plus ``rp_filter``'s), and the nodes' nftables hooks (the
anti-spoofing rules, the policy table's ``ct state established`` rules,
NAT's hooks; the outer VXLAN flow is untracked, see ``nftmodel``). TCP
sends ~56 KB GSO packets that cross the veths, the VXLAN device and the
underlay unsegmented (TSO, GSO and checksum offload are on by default on
veth and VXLAN devices; the average packet size on every link's counters
shows it), so per-packet work is paid once per ~40 MTU-sized segments and
neither the MTU nor segmentation offload settings change anything.
Swapping every node table for a stand-in without rules or NAT hooks
(conntrack kept) gains 2-8% per CPU-second (medians of three runs, each
inside its spread): about half of what separates the pods from the bare
link; the rest is the path itself. Not adopted: an nftables flowtable (``flow add``, kernel
docs networking/nf_flowtable.rst), which would let established flows skip
forwarding and the hooks, needs ``CONFIG_NF_FLOW_TABLE``, which the test
kernel does not have (nor modules); using it where it exists means
proving the guarantees again (the tuple's input interface keeps spoofed
sources out, but on ``direct`` an offloaded reply from the underlay would
skip ``underlay_in``'s MAC check, so the underlay device would have to
stay out of the flowtable). GRO on both ends of the pod veth pair (the
veth's NAPI mode): nothing for one stream, a few percent for four, inside
the spread of interleaved runs; not worth two more feature requests per
ADD. ``rp_filter=0``: within the spread, and the kernel's check would no
longer back the anti-spoofing rule.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from typing import Any

from ..cidr import IPAddress
from ..errors import ConfigError, DataplaneError, FieldError, PeerNotAdjacent, UnderlayNotFound
from .model import (
    GATEWAY_LABEL,
    VXLAN_IFNAME,
    NodeInfo,
    NodeState,
    Peer,
    ReconcileReport,
    Route,
    VxlanSpec,
    admit_peers,
    backend_overhead,
    direct_unroutable,
    gateway_of,
    is_pod_veth,
    peer_objects,
    pod_routes,
    validate_state,
    vtep_mac,
)
from .nodetables import NodeTables
from .peerops import PeerOps
from .podops import NODE_SYSCTLS_V6, PodOps, pod_veth_sysctls
from .policytable import PolicyTableSync
from .ports import Addresses, Fdb, Links, Neighbours, NftRuleset, PodLinks, Routes, Sysctls, WireGuard
from .wgmodel import WG_IFNAME, WgDevice
from .wireguard import WireGuardBackend

log = logging.getLogger(__name__)
SUMMARY_OVER = 20  # more changed objects of one kind than this are reported as one line

NODE_SYSCTLS = {"net/ipv4/ip_forward": "1"}


def tunnel_sysctls(dev: str) -> dict[str, str]:
    """Strict reverse-path filtering on the tunnel: decapsulated sources lie in peers' blocks."""
    return {f"net/ipv4/conf/{dev}/rp_filter": "1"}


@dataclass(frozen=True)
class Ports:
    links: Links
    addresses: Addresses
    routes: Routes
    neighbours: Neighbours
    fdb: Fdb
    nft: NftRuleset  # ip overlaycni
    sysctls: Sysctls
    pods: PodLinks
    policy_nft: NftRuleset  # inet overlaycni (NetworkPolicy)
    arp_nft: NftRuleset  # arp overlaycni (pods' ARP)
    ip6_nft: NftRuleset  # ip6 overlaycni (pods' IPv6)
    wireguard: WireGuard | None = None  # None: backend wireguard is not supported


def _same_route(want: Route, have: Route | None) -> bool:
    """A desired route without a device matches whatever device the kernel resolved."""
    return have is not None and (want == have or (want.dev is None and replace(have, dev=None) == want))


class NodeDataplane(PodOps, PeerOps):
    def __init__(self, ports: Ports) -> None:
        self.p = ports
        self.policy_table = PolicyTableSync(ports.policy_nft)
        self.tables = NodeTables(ip=ports.nft, arp=ports.arp_nft, ip6=ports.ip6_nft)
        self._lock = threading.RLock()
        self._pod_routes: list[Route] | None = None  # pod routes seen by the running reconcile
        self._wg = WireGuardBackend(ports.wireguard)
        self.last_state: NodeState | None = None  # what the kernel was last reconciled to (for repairs)

    # --- node -----------------------------------------------------------------

    def node_info(self, node_ip: IPv4Address, *, backend: str, mtu: int | None) -> NodeInfo:
        """``vtep_mac`` is the MAC peers see this node's pod traffic come from, published
        in the node record: the VXLAN device's, or on ``direct`` the underlay's."""
        link = self.p.links.link_with_address(node_ip)
        if link is None:
            raise UnderlayNotFound(f"node_ip: no interface in the node's network namespace has the address {node_ip}")
        overhead = backend_overhead(backend)
        max_mtu = link.mtu - overhead
        if mtu is not None and mtu > max_mtu:
            raise ConfigError(FieldError("mtu", f"{mtu} exceeds {max_mtu} ({link.name} MTU {link.mtu} - {overhead})"))
        return NodeInfo(
            underlay_ifname=link.name,
            underlay_mtu=link.mtu,
            pod_mtu=mtu if mtu is not None else max_mtu,
            vtep_mac=vtep_mac(node_ip) if backend == "vxlan" else (link.mac or None) if backend == "direct" else None,
        )

    def find_node_ip_v6(self, node_ip: IPv4Address, *, subnet: IPv6Network) -> IPv6Address | None:
        """The node's IPv6 underlay address: the first address inside ``subnet``
        on the device that holds ``node_ip`` (None: it has none)."""
        link = self.p.links.link_with_address(node_ip)
        if link is None:
            raise UnderlayNotFound(f"node_ip: no interface in the node's network namespace has the address {node_ip}")
        found = sorted(a.ip for a in self.p.addresses.list_addresses(link.name, version=6) if a.ip in subnet)
        return IPv6Address(found[0]) if found else None

    def reconcile(self, state: NodeState) -> ReconcileReport:
        """Bring the kernel to ``state``. A peer the kernel cannot take (see
        ``admit_peers``) is left out and named in the report's errors; every
        other peer is programmed."""
        validate_state(state)
        with self._lock:
            report = ReconcileReport()
            peers, problems = admit_peers(state)
            if problems:
                report.errors.extend(p.message for p in problems)
                state = replace(state, peers=peers)
            info = self.node_info(state.node_ip, backend=state.backend, mtu=state.mtu)
            self._pod_routes = None
            self.last_state = state
            try:
                for step in (self._sysctls, self._device, self._gateway, self._peers_and_routes, self._nft):
                    try:
                        step(state, info, report)
                    except DataplaneError as exc:
                        report.errors.append(f"{step.__name__.strip('_')}: {exc.message}")
            finally:
                self._pod_routes = None
            return report

    def _sysctls(self, state: NodeState, info: NodeInfo, report: ReconcileReport) -> None:
        wanted = dict(NODE_SYSCTLS) | (NODE_SYSCTLS_V6 if state.block_v6 is not None else {})
        for link in self.p.links.list_links():
            if is_pod_veth(link.name):
                wanted.update(pod_veth_sysctls(link.name))
        self._ensure_sysctls(wanted, report)

    def _ensure_sysctls(self, wanted: dict[str, str], report: ReconcileReport) -> None:
        for key, value in wanted.items():
            if self.p.sysctls.read(key) != value:
                self.p.sysctls.write(key, value)
                report.changes.append(f"sysctl {key}={value}")

    def _device(self, state: NodeState, info: NodeInfo, report: ReconcileReport) -> None:
        if state.backend != "wireguard":
            self._wg.teardown_device(report)
        if state.backend != "vxlan":
            if self.p.links.delete_link(VXLAN_IFNAME):
                report.changes.append(f"link {VXLAN_IFNAME} deleted (backend {state.backend})")
            if state.backend == "wireguard":
                self._wg.setup_device(state, info, report)
                if self.p.links.get_link(WG_IFNAME) is not None:
                    self._ensure_sysctls(tunnel_sysctls(WG_IFNAME), report)
                self._tunnel_addresses(WG_IFNAME, state, report)
            return
        spec = VxlanSpec(
            name=VXLAN_IFNAME,
            vni=state.vni,
            port=state.vxlan_port,
            local=state.node_ip,
            underlay=info.underlay_ifname,
            mac=vtep_mac(state.node_ip),
            mtu=info.pod_mtu,  # the cluster's pod MTU: larger pod packets get "fragmentation needed" here
        )
        report.changes.extend(self.p.links.ensure_vxlan(spec))
        self._ensure_sysctls(tunnel_sysctls(VXLAN_IFNAME), report)
        self._tunnel_addresses(VXLAN_IFNAME, state, report)

    def _tunnel_addresses(self, dev: str, state: NodeState, report: ReconcileReport) -> None:
        """The tunnel device holds its block's first address of each family
        (``NodeFamily.tunnel_address``); an IPv6 address of a single-stack
        node goes (the kernel's own link-local stays)."""
        for version in (4, 6):
            fam = state.family(version)
            self._only_address(dev, fam.tunnel_address if fam else None, version=version, label=None, report=report)

    def _gateway(self, state: NodeState, info: NodeInfo, report: ReconcileReport) -> None:
        self._only_address("lo", IPv4Interface(f"{gateway_of(state.block)}/32"), version=4, label=GATEWAY_LABEL, report=report)

    def _only_address(self, dev: str, addr: IPv4Interface | IPv6Interface | None, *, version: int, label: str | None,
                      report: ReconcileReport) -> None:
        """``dev``'s only address of family ``version`` (None: none), link-local ones aside."""
        for have in self.p.addresses.list_addresses(dev, label=label, version=version):
            if have != addr and not have.ip.is_link_local and self.p.addresses.delete_address(dev, have):
                report.changes.append(f"address {have} deleted from {dev}")
        if addr is not None and self.p.addresses.ensure_address(dev, addr, label=label):
            report.changes.append(f"address {addr} added to {dev}")

    def _reachable_peers(self, state: NodeState, report: ReconcileReport | None) -> list[Peer]:
        if state.backend == "wireguard":
            return self._wg.usable_peers(state, report)
        if state.backend != "direct":
            return list(state.peers)
        ok = []
        for peer in state.peers:
            try:
                self._check_adjacent(peer)
                ok.append(peer)
            except PeerNotAdjacent as exc:
                if report is None:
                    raise
                report.errors.append(exc.message)
                continue
            if report is not None and state.family(6) is not None and peer.block_v6 is not None:
                for block in direct_unroutable(peer):  # its IPv4 block is routed all the same
                    report.errors.append(f"peer {peer.name}: no IPv6 node address in its node record, so its IPv6 block "
                                         f"{block} is not routed (the direct backend routes it via that address)")
        return ok

    def _check_adjacent(self, peer: Peer) -> None:
        """Each underlay address of the peer (one per family) is on a link of this node."""
        for node_ip in (peer.node_ip, peer.node_ip_v6):
            if node_ip is None:
                continue
            gateway, dev = self.p.routes.lookup_gateway(node_ip)
            if dev is None or gateway is not None:
                how = f"via gateway {gateway}" if gateway is not None else "unreachable"
                raise PeerNotAdjacent(
                    f"peer {peer.name}: node IP {node_ip} is not on this node's L2 segment ({how}); "
                    "the direct backend needs all nodes in one subnet (use backend vxlan)"
                )

    def _peers_and_routes(self, state: NodeState, info: NodeInfo, report: ReconcileReport) -> None:
        peers = self._reachable_peers(state, report)
        objs = [peer_objects(p, backend=state.backend) for p in peers]
        live = {link.name for link in self.p.links.list_links()}
        want_routes = {r.dst: r for o in objs for r in o.routes}
        # Catch-alls, per family (more specific routes win): the pod CIDR, so a
        # packet to a block no (admitted) node owns, or to a peer without a
        # tunnel yet, is refused here instead of leaving by the default route
        # in clear; and this node's block, so a packet to a free address of it
        # never loops back out.
        for fam in state.families:
            want_routes[fam.pod_cidr] = Route(dst=fam.pod_cidr, unreachable=True)
            want_routes[fam.block] = Route(dst=fam.block, unreachable=True)
        for pod in state.pods:
            if pod.host_veth in live:
                want_routes.update((r.dst, r) for r in pod_routes(pod))
        listed = self.p.routes.list_routes()
        self._pod_routes = [r for r in listed if r.dev is not None and is_pod_veth(r.dev)]
        have_routes = {r.dst: r for r in listed}
        stale_routes = [
            r for dst, r in have_routes.items()
            if dst not in want_routes and not (r.dev is not None and is_pod_veth(r.dev) and r.dev in live)
        ]
        if state.backend == "vxlan":
            want_n = {n.ip: n for o in objs for n in o.neighbours}
            want_f = {o.fdb.mac: o.fdb for o in objs if o.fdb}
        else:
            want_n, want_f = {}, {}
        has_vxlan = self.p.links.get_link(VXLAN_IFNAME) is not None
        have_n = {n.ip: n for n in self.p.neighbours.list_neighbours(VXLAN_IFNAME)} if has_vxlan else {}
        have_f = {f.mac: f for f in self.p.fdb.list_fdb(VXLAN_IFNAME)} if has_vxlan else {}
        # Removal first for routes whose destination changes meaning, then adds in flannel's order.
        add_n = [n for ip, n in want_n.items() if have_n.get(ip) != n]
        add_f = [f for mac, f in want_f.items() if have_f.get(mac) != f]
        add_r = [r for dst, r in want_routes.items() if not _same_route(r, have_routes.get(dst))]
        self._apply(report, "route", delete=stale_routes)
        stale_wg = self._wg.sync_peers(state, peers, report) if state.backend == "wireguard" else []
        self._apply(report, "neighbour", replace=add_n)
        self._apply(report, "fdb", replace=add_f)
        self._apply(report, "route", replace=add_r)
        self._wg.remove_peers(stale_wg, report)
        self._apply(report, "fdb", delete=[f for mac, f in have_f.items() if mac not in want_f])
        self._apply(report, "neighbour", delete=[n for ip, n in have_n.items() if ip not in want_n])

    def _apply(self, report: ReconcileReport, kind: str, *, replace: Sequence[Any] = (), delete: Sequence[Any] = ()) -> None:
        if not replace and not delete:
            return
        appliers: dict[str, Callable[..., None]] = {
            "route": self.p.routes.apply_routes,
            "neighbour": self.p.neighbours.apply_neighbours,
            "fdb": self.p.fdb.apply_fdb,
        }
        apply = appliers[kind]
        log.debug("%s batch: %d replace, %d delete", kind, len(replace), len(delete))
        try:
            apply(replace=replace, delete=delete)
        finally:
            for verb, objs in (("replaced", replace), ("deleted", delete)):
                if len(objs) > SUMMARY_OVER:  # keep reports readable (and cheap) for thousands of peers
                    shown = "; ".join(map(str, objs[:3]))
                    report.changes.append(f"{len(objs)} {kind}s {verb} ({shown}; ...)")
                else:
                    report.changes.extend(f"{kind} {o} {verb}" for o in objs)

    def _pod_endpoints(self, state: NodeState) -> set[tuple[str, IPAddress]]:
        """The state's pods whose host veth is live (an element per address, both families), plus
        live pod veths the state does not know yet (a racing ADD), whose addresses the kernel's /32
        and /128 routes tell. A pod of the state whose veth is gone (a DEL since the state was
        computed: the repairer reconciles to the last resync's state) gets no element, as it gets
        no route: its element must not outlive it (a re-ADD of the same veth name would inherit it)."""
        live = {link.name for link in self.p.links.list_links()}
        wanted: set[tuple[str, IPAddress]] = {(p.host_veth, ip) for p in state.pods if p.host_veth in live for ip in p.ips}
        named = {p.host_veth for p in state.pods}
        routes = self._pod_routes if self._pod_routes is not None else self.p.routes.list_routes()
        for r in routes:
            if r.dev in live and r.dev not in named and is_pod_veth(r.dev) and r.dst.prefixlen == r.dst.max_prefixlen:
                wanted.add((r.dev, r.dst.network_address))
        return wanted

    def _nft(self, state: NodeState, info: NodeInfo, report: ReconcileReport) -> None:
        self.tables.reconcile(state, self._pod_endpoints(state), report)

    # --- peers (incremental): ``peerops.PeerOps`` ---------------------------------------

    def wireguard_device(self) -> WgDevice | None:
        """The node's WireGuard device as it reports itself (None: no device or no port)."""
        return self.p.wireguard.get_device(WG_IFNAME) if self.p.wireguard is not None else None

    def drop_counters(self) -> dict[str, int]:
        """Packets dropped so far by each filter rule of the node's tables."""
        with self._lock:
            return self.tables.drop_counters()

    def adopted_block(self, prefixlen: int) -> IPv4Network | None:
        """The /``prefixlen`` block whose gateway (``<block>.1`` on ``lo:ocni``)
        the kernel holds: the block of an earlier run's pods (None: none)."""
        for addr in self.p.addresses.list_addresses("lo", label=GATEWAY_LABEL):
            return IPv4Network(f"{addr.ip}/{prefixlen}", strict=False)
        return None

    def close(self) -> None:
        pass
