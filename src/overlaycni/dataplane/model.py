"""Pure value types of the data plane and the names of the kernel objects it owns.

Nothing here touches the kernel: the agent, the fake and the Linux adapter
all exchange these frozen dataclasses. ``peer_objects`` turns a peer into
the exact kernel objects (neighbours, FDB entry, routes) so that the fake
and the Linux implementation program the same thing.

Dual-stack: a node and each peer have a block of each family of the
cluster (``NodeState.families``, ``Peer.blocks``), and the per-peer objects
are made once per block. With VXLAN one device carries both families over
the IPv4 underlay (why: ``linux/links.py``): per peer block one permanent
neighbour ``<block's first address> -> <peer VTEP MAC>`` and one ``onlink``
route via it, and one FDB entry ``<VTEP MAC> -> <peer node IP>`` shared by
both. ``direct`` routes each block via the peer's underlay address of the
same family; ``wireguard`` routes both blocks into the tunnel.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network, ip_interface, ip_network

from ..cidr import IPAddress, IPNetwork
from ..errors import ConfigError, FieldError
from ..families import IPFamily, PodAddress
from .wgmodel import DEFAULT_WIREGUARD_PORT, WG_IFNAME, WIREGUARD_OVERHEAD, PrivateKey

VXLAN_IFNAME = "ocni.vxlan"
VETH_PREFIX = "oc"
# Routes the project owns carry this rtnetlink protocol number ("proto 119").
RT_PROTO = 119
# The gateway address <block>.1/32 lives on lo with this label (ownership mark).
GATEWAY_LABEL = "lo:ocni"
VXLAN_OVERHEAD = 50
BACKENDS = ("vxlan", "direct", "wireguard")
BACKEND_OVERHEAD = {"vxlan": VXLAN_OVERHEAD, "direct": 0, "wireguard": WIREGUARD_OVERHEAD}
KUBE_PROXY_MASQ_MARK = 0x4000


def vtep_mac(node_ip: IPv4Address) -> str:
    """A deterministic, locally administered unicast MAC for a node's VTEP."""
    digest = bytearray(hashlib.sha256(b"overlaycni-vtep/" + node_ip.packed).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in digest)


def host_veth_name(container_id: str, ifname: str) -> str:
    """The host-side veth name: ``oc`` + 13 hex digits of sha256(cid/ifname)."""
    digest = hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()
    return VETH_PREFIX + digest[:13]


def is_pod_veth(ifname: str) -> bool:
    rest = ifname[len(VETH_PREFIX):]
    return ifname.startswith(VETH_PREFIX) and len(rest) == 13 and all(c in "0123456789abcdef" for c in rest)


# A DEL parks its host veth rather than deleting it (``agent.quarantine``): one
# RTM_NEWLINK sets it down, renames it ``oz`` + the same 13 hex digits (15
# characters: IFNAMSIZ is 16 with the NUL; ``is_pod_veth`` does not match it,
# nor does the ``oc*`` of the pod rules) and puts it in link group
# ``PARK_GROUP``, which one RTM_DELLINK empties later. Nothing else of the
# project uses the prefix or the group ("ocz1" in ASCII).
PARKED_PREFIX = "oz"
PARK_GROUP = 0x6F637A31


def parked_veth_name(host_veth: str) -> str:
    """The parked name of pod veth ``host_veth``."""
    return PARKED_PREFIX + host_veth[len(VETH_PREFIX):]


def is_parked_veth(ifname: str) -> bool:
    rest = ifname[len(PARKED_PREFIX):]
    return ifname.startswith(PARKED_PREFIX) and len(rest) == 13 and all(c in "0123456789abcdef" for c in rest)


@functools.lru_cache(maxsize=1 << 16)  # admit_peers reads every peer's MAC on every selection: thousands, rarely new
def normalize_mac(mac: str, *, field_name: str = "vtep_mac") -> str:
    parts = mac.lower().replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts):
        raise ConfigError(FieldError(field_name, f"{mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)"))
    return ":".join(parts)


# --- the facade's value types --------------------------------------------------


@dataclass(frozen=True, slots=True)  # one per peer (or pod): thousands
class Peer:
    name: str
    node_ip: IPv4Address
    block: IPv4Network
    vtep_mac: str  # the MAC its pod traffic comes from: its VTEP's (vxlan), its underlay's (direct)
    wg_public_key: str | None = None  # wireguard backend: the peer's published public key
    wg_port: int | None = None  # its WireGuard UDP port (None: the cluster's)
    block_v6: IPv6Network | None = None  # dual-stack: its IPv6 block
    node_ip_v6: IPv6Address | None = None  # dual-stack: its IPv6 underlay address (direct routes via it)

    @property
    def blocks(self) -> tuple[IPNetwork, ...]:
        """Its blocks, IPv4 first."""
        return (self.block,) if self.block_v6 is None else (self.block, self.block_v6)

    def node_ip_of(self, version: int) -> IPAddress | None:
        """Its underlay address of one family (None: it published none)."""
        return self.node_ip if version == 4 else self.node_ip_v6


@dataclass(frozen=True, slots=True)  # one per peer (or pod): thousands
class PodEndpoint:
    """A local pod: its host veth and its address of each family (``ip_v6``
    in a dual-stack cluster: the hook for IPv6 anti-spoofing and routes)."""

    ip: IPv4Address
    host_veth: str
    ip_v6: IPv6Address | None = None

    @property
    def ips(self) -> tuple[IPAddress, ...]:
        """Its addresses, IPv4 first."""
        return (self.ip,) if self.ip_v6 is None else (self.ip, self.ip_v6)


@dataclass(frozen=True)
class NodeState:
    """The full desired state of one node."""

    node_ip: IPv4Address
    block: IPv4Network
    pod_cidr: IPv4Network
    backend: str = "vxlan"
    block_v6: IPv6Network | None = None  # dual-stack: this node's IPv6 block (its pods' IPv6 addresses)
    vni: int = 4096
    vxlan_port: int = 4789
    mtu: int | None = None  # None = auto from the underlay
    peers: tuple[Peer, ...] = ()
    pods: tuple[PodEndpoint, ...] = ()
    non_masquerade_cidrs: tuple[IPv4Network, ...] = ()
    wireguard_port: int = DEFAULT_WIREGUARD_PORT
    wireguard_key: PrivateKey | None = field(default=None, repr=False)  # stays on the node
    # dual-stack: the IPv6 side (None / empty when single-stack; block_v6 is above)
    pod_cidr_v6: IPv6Network | None = None
    node_ip_v6: IPv6Address | None = None  # the node's IPv6 underlay address (None: it has none)
    non_masquerade_cidrs_v6: tuple[IPv6Network, ...] = ()

    @property
    def families(self) -> tuple[NodeFamily, ...]:
        """One ``NodeFamily`` per family this node runs, IPv4 first (IPv6
        when it has an IPv6 pod CIDR and block)."""
        v4 = NodeFamily(IPFamily.ipv4, self.block, self.pod_cidr, self.node_ip, self.non_masquerade_cidrs)
        if self.pod_cidr_v6 is None or self.block_v6 is None:
            return (v4,)
        return v4, NodeFamily(IPFamily.ipv6, self.block_v6, self.pod_cidr_v6, self.node_ip_v6, self.non_masquerade_cidrs_v6)

    def family(self, version: int) -> NodeFamily | None:
        return next((f for f in self.families if f.family.version == version), None)


@dataclass(frozen=True)
class NodeFamily:
    """One family's side of a node's desired state."""

    family: IPFamily
    block: IPNetwork
    pod_cidr: IPNetwork
    node_ip: IPAddress | None  # the node's underlay address of this family
    non_masquerade_cidrs: tuple[IPNetwork, ...] = ()

    @property
    def tunnel_address(self) -> IPv4Interface | IPv6Interface:
        """The node's address on its tunnel device (``ocni.vxlan``, ``ocni.wg``):
        its block's first address, the source of what the node itself sends
        to peers' pods (so that it passes their inner-source checks), and the
        gateway peers' routes to this block point at (VXLAN)."""
        return ip_interface((self.block.network_address, self.block.max_prefixlen))


@dataclass(frozen=True)
class NodeInfo:
    underlay_ifname: str
    underlay_mtu: int
    pod_mtu: int
    vtep_mac: str | None


@dataclass(frozen=True)
class PodInterface:
    ifname: str
    mac: str
    mtu: int
    sandbox: str
    host_veth: str
    host_mac: str
    addresses: tuple[PodAddress, ...]  # one per family, IPv4 first

    @property
    def ip(self) -> IPv4Interface | IPv6Interface:
        """Its IPv4 address (the first)."""
        return self.addresses[0].ip

    @property
    def gateway(self) -> IPAddress:
        return self.addresses[0].gateway


@dataclass(frozen=True)
class PodAttachment:
    """One pod for ``Dataplane.attach_pods``: what ``attach_pod`` takes.
    ``netns_fd``: the pod namespace, opened and validated by the caller (kept
    open until the call returns); None: ``netns_path`` is validated here.
    ``ip6``: a dual-stack pod's IPv6 address and gateway (``addresses``
    lists both, IPv4 first)."""

    container_id: str
    ifname: str
    netns_path: str
    ip: IPv4Interface
    gateway: IPv4Address
    mtu: int
    netns_fd: int | None = None
    ip6: PodAddress | None = None  # dual-stack: the pod's IPv6 address and gateway

    @property
    def host_veth(self) -> str:
        return host_veth_name(self.container_id, self.ifname)

    @property
    def addresses(self) -> tuple[PodAddress, ...]:
        """The pod's addresses, IPv4 first."""
        v4 = PodAddress(self.ip, self.gateway)
        return (v4,) if self.ip6 is None else (v4, self.ip6)


@dataclass
class ReconcileReport:
    changes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# --- kernel objects (what the ports speak) ---------------------------------------


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    kind: str  # "veth", "vxlan", "bridge", "" (physical/unknown)
    mac: str
    mtu: int
    up: bool


@dataclass(frozen=True)
class VxlanSpec:
    name: str
    vni: int
    port: int
    local: IPv4Address
    underlay: str
    mac: str
    mtu: int


@dataclass(frozen=True, slots=True)  # one per peer (or pod): thousands
class Route:
    """A route in the main table; ``gateway`` None means a device route.
    Either family: IPv6 has no route scope, so the Linux adapter reports
    an IPv6 device route (no gateway) as ``scope_link``, which is what it
    means, and both families compare alike."""

    dst: IPNetwork
    dev: str | None = None
    gateway: IPAddress | None = None
    onlink: bool = False
    scope_link: bool = False
    unreachable: bool = False

    def __str__(self) -> str:
        parts = ["unreachable" if self.unreachable else "", str(self.dst)]
        parts += [f"via {self.gateway}" if self.gateway else "", f"dev {self.dev}" if self.dev else ""]
        parts += ["onlink" if self.onlink else "", "scope link" if self.scope_link else ""]
        return " ".join(p for p in parts if p)


@dataclass(frozen=True, slots=True)  # one per peer (or pod): thousands
class Neighbour:
    dev: str
    ip: IPAddress
    mac: str

    def __str__(self) -> str:
        return f"{self.ip} lladdr {self.mac} dev {self.dev}"


@dataclass(frozen=True, slots=True)  # one per peer (or pod): thousands
class FdbEntry:
    dev: str
    mac: str
    dst: IPv4Address

    def __str__(self) -> str:
        return f"{self.mac} dst {self.dst} dev {self.dev}"


@dataclass(frozen=True)
class PodView:
    """What a pod's interface looks like from inside its netns."""

    ifname: str
    mac: str
    mtu: int
    up: bool
    addresses: tuple[IPv4Interface | IPv6Interface, ...]  # both families (IPv6: global ones, not tentative)
    routes: tuple[Route, ...]
    tentative: tuple[IPv6Interface, ...] = ()  # IPv6 addresses still in duplicate address detection


@dataclass(frozen=True, slots=True)  # one per peer (or pod): thousands
class PeerObjects:
    """One peer's kernel objects: a neighbour and a route per block (the
    neighbours on VXLAN only), and the FDB entry its blocks share."""

    neighbours: tuple[Neighbour, ...]
    fdb: FdbEntry | None
    routes: tuple[Route, ...]


def validate_state(state: NodeState) -> None:
    """Reject a desired state the kernel cannot express, naming the field.
    Only this node's own settings and pods count here: peers are admitted
    one by one (``admit_peers``), so one bad peer never stops the node."""
    errors: list[FieldError] = []
    if state.backend not in BACKENDS:
        errors.append(FieldError("backend", f"{state.backend!r} is not one of {', '.join(BACKENDS)}"))
    if not state.block.subnet_of(state.pod_cidr):
        errors.append(FieldError("block", f"{state.block} is not inside the pod CIDR {state.pod_cidr}"))
    if state.block.prefixlen > 30:
        errors.append(FieldError("block", f"{state.block} is too small for a node (needs /30 or larger)"))
    if not 1 <= state.vni <= 0xFFFFFF:
        errors.append(FieldError("vni", f"{state.vni} is outside 1..16777215"))
    if not 1 <= state.vxlan_port <= 65535:
        errors.append(FieldError("vxlan-port", f"{state.vxlan_port} is outside 1..65535"))
    if not 1 <= state.wireguard_port <= 65535:
        errors.append(FieldError("wireguard-port", f"{state.wireguard_port} is outside 1..65535"))
    if state.mtu is not None and not 576 <= state.mtu <= 65535:
        errors.append(FieldError("mtu", f"{state.mtu} is outside 576..65535"))
    if (state.block_v6 is None) != (state.pod_cidr_v6 is None):
        errors.append(FieldError("block_v6", "an IPv6 block and an IPv6 pod CIDR go together (dual-stack): "
                                 f"block_v6 {state.block_v6}, pod_cidr_v6 {state.pod_cidr_v6}"))  # fmt: skip
    elif state.block_v6 is not None and state.pod_cidr_v6 is not None and not state.block_v6.subnet_of(state.pod_cidr_v6):
        errors.append(FieldError("block_v6", f"{state.block_v6} is not inside the IPv6 pod CIDR {state.pod_cidr_v6}"))
    for pod in state.pods:
        if pod.ip not in state.block:
            errors.append(FieldError("pods", f"pod {pod.ip} ({pod.host_veth}) is outside the block {state.block}"))
        if pod.ip_v6 is not None and (state.block_v6 is None or pod.ip_v6 not in state.block_v6):
            where = f"the IPv6 block {state.block_v6}" if state.block_v6 else "this node's blocks (no IPv6 block)"
            errors.append(FieldError("pods", f"pod {pod.ip_v6} ({pod.host_veth}) is outside {where}"))
    if errors:
        raise ConfigError(errors)


@dataclass(frozen=True)
class PeerProblem:
    """Why one peer is not programmed (``other``: the node it collides with)."""

    peer: str
    message: str
    other: str | None = None


def _mac_problem(mac: str) -> str | None:
    try:
        norm = normalize_mac(mac)
    except ConfigError as exc:
        return exc.message
    first = int(norm[:2], 16)
    if first & 1:
        return f"VTEP MAC {norm} is a multicast address"
    if norm == "00:00:00:00:00:00":
        return "VTEP MAC 00:00:00:00:00:00 is not a unicast address"
    return None


class _Blocks:
    """Blocks of one family admitted so far, for overlap tests in O(log n) on integers.
    Admitted blocks never overlap one another (an overlapping one is not
    admitted), so they are disjoint intervals sorted by first address; and
    CIDR blocks overlap only when one contains the other. A block overlaps
    an admitted one exactly when the last interval starting at or before its
    first address reaches it (that one contains it), or the next interval
    starts before its last address (it contains that one)."""

    def __init__(self) -> None:
        self.firsts: list[int] = []
        self.entries: list[tuple[int, IPNetwork, str]] = []  # (last address, block, owner), by first address

    def add(self, block: IPNetwork, owner: str) -> None:
        first = int(block.network_address)
        i = bisect.bisect_right(self.firsts, first)
        self.firsts.insert(i, first)
        self.entries.insert(i, (int(block.broadcast_address), block, owner))

    def overlap(self, block: IPNetwork) -> tuple[IPNetwork, str] | None:
        first, last = int(block.network_address), int(block.broadcast_address)
        i = bisect.bisect_right(self.firsts, first) - 1  # a block containing it (or the same block)
        if i >= 0 and self.entries[i][0] >= first:
            return self.entries[i][1], self.entries[i][2]
        if i + 1 < len(self.firsts) and self.firsts[i + 1] <= last:  # a block inside it
            return self.entries[i + 1][1], self.entries[i + 1][2]
        return None


def admit_peers(state: NodeState) -> tuple[tuple[Peer, ...], tuple[PeerProblem, ...]]:
    """The peers of ``state`` the kernel can take, in their order of priority
    (the caller's order: earlier peers win a collision), and a problem for
    each one left out. A peer is left out when its block is outside the pod
    CIDR, its VTEP MAC is not a unicast MAC (VXLAN), or it collides with this
    node or an admitted peer: the same node IP, the same VTEP MAC (VXLAN) or
    WireGuard public key (WireGuard), an overlapping block. Deterministic, so every node leaves out the same ones.
    Dual-stack, the same holds for a peer's IPv6 block (inside the IPv6 pod
    CIDR, overlapping no admitted one) and IPv6 node address; a peer with an
    IPv6 block next to a single-stack node is left out (the families of a
    cluster are one setting). A peer without an IPv6 block (registered by an
    older agent) is reached over IPv4 only."""
    blocks, blocks6 = _Blocks(), _Blocks()
    blocks.add(state.block, "this node")
    if state.block_v6 is not None:
        blocks6.add(state.block_v6, "this node")
    ips: dict[IPv4Address, str] = {state.node_ip: "this node"}
    ips6: dict[IPv6Address, str] = {state.node_ip_v6: "this node"} if state.node_ip_v6 is not None else {}
    macs: dict[str, str] = {vtep_mac(state.node_ip): "this node"}
    wg_keys: dict[str, str] = {state.wireguard_key.public: "this node"} if state.wireguard_key is not None else {}
    ok: list[Peer] = []
    problems: list[PeerProblem] = []
    for peer in state.peers:
        why: list[str] = []
        other: str | None = None
        mac = None
        if not peer.block.subnet_of(state.pod_cidr):
            why.append(f"block {peer.block} is outside the pod CIDR {state.pod_cidr}")
        elif peer.block.prefixlen > 30:
            why.append(f"block {peer.block} is too small for a node")
        else:
            hit = blocks.overlap(peer.block)
            if hit is not None:
                other = hit[1]
                why.append(f"block {peer.block} overlaps {hit[1]}'s block {hit[0]}")
        if peer.node_ip in ips:
            other = other or ips[peer.node_ip]
            why.append(f"node IP {peer.node_ip} is {ips[peer.node_ip]}'s")
        why6, other6 = _ipv6_problems(state, peer, blocks6, ips6)
        why += why6
        other = other or other6
        if state.backend == "vxlan":
            bad_mac = _mac_problem(peer.vtep_mac)
            if bad_mac is not None:
                why.append(bad_mac)
            else:
                mac = normalize_mac(peer.vtep_mac)
                if mac in macs:
                    other = other or macs[mac]
                    why.append(f"VTEP MAC {mac} is {macs[mac]}'s")
        if state.backend == "wireguard" and peer.wg_public_key and peer.wg_public_key in wg_keys:
            other = other or wg_keys[peer.wg_public_key]
            why.append(f"WireGuard public key {peer.wg_public_key} is {wg_keys[peer.wg_public_key]}'s")
        if why:
            problems.append(PeerProblem(peer.name, f"peer {peer.name}: " + "; ".join(why), other))
            continue
        ok.append(peer)
        blocks.add(peer.block, f"peer {peer.name}")
        ips[peer.node_ip] = f"peer {peer.name}"
        if peer.block_v6 is not None:
            blocks6.add(peer.block_v6, f"peer {peer.name}")
        if peer.node_ip_v6 is not None:
            ips6[peer.node_ip_v6] = f"peer {peer.name}"
        if mac is not None:
            macs[mac] = f"peer {peer.name}"
        if peer.wg_public_key:
            wg_keys[peer.wg_public_key] = f"peer {peer.name}"
    return tuple(ok), tuple(problems)


def _ipv6_problems(
    state: NodeState, peer: Peer, blocks6: _Blocks, ips6: dict[IPv6Address, str]
) -> tuple[list[str], str | None]:
    """Why ``peer``'s IPv6 side keeps it out (``admit_peers``), and whom it collides with."""
    why: list[str] = []
    other: str | None = None
    if peer.block_v6 is not None:
        if state.block_v6 is None or state.pod_cidr_v6 is None:
            why.append(f"IPv6 block {peer.block_v6}, and this node is single-stack")
        elif not peer.block_v6.subnet_of(state.pod_cidr_v6):
            why.append(f"IPv6 block {peer.block_v6} is outside the IPv6 pod CIDR {state.pod_cidr_v6}")
        elif (hit := blocks6.overlap(peer.block_v6)) is not None:
            other = hit[1]
            why.append(f"IPv6 block {peer.block_v6} overlaps {hit[1]}'s IPv6 block {hit[0]}")
    if peer.node_ip_v6 is not None and peer.node_ip_v6 in ips6:
        other = other or ips6[peer.node_ip_v6]
        why.append(f"node IPv6 address {peer.node_ip_v6} is {ips6[peer.node_ip_v6]}'s")
    return why, other


def backend_overhead(backend: str) -> int:
    """Bytes a backend adds to every pod packet on the underlay."""
    return BACKEND_OVERHEAD.get(backend, 0)


def gateway_of(block: IPv4Network) -> IPv4Address:
    return block.network_address + 1


def peer_objects(peer: Peer, *, backend: str) -> PeerObjects:
    """The kernel objects for one peer, in programming order. On ``direct``
    a block whose family the peer has no underlay address for gets no route
    (``direct_unroutable`` names it; the pod CIDR's catch-all refuses it)."""
    if backend == "direct":
        routes = [Route(dst=b, gateway=gw) for b in peer.blocks if (gw := peer.node_ip_of(b.version)) is not None]
        return PeerObjects((), None, tuple(routes))
    if backend == "wireguard":  # the WireGuard peer itself is programmed by dataplane/wireguard.py
        return PeerObjects((), None, tuple(Route(dst=b, dev=WG_IFNAME, scope_link=True) for b in peer.blocks))
    mac = normalize_mac(peer.vtep_mac)
    return PeerObjects(
        tuple(Neighbour(dev=VXLAN_IFNAME, ip=b.network_address, mac=mac) for b in peer.blocks),
        FdbEntry(dev=VXLAN_IFNAME, mac=mac, dst=peer.node_ip),
        tuple(Route(dst=b, dev=VXLAN_IFNAME, gateway=b.network_address, onlink=True) for b in peer.blocks),
    )


def direct_unroutable(peer: Peer) -> tuple[IPNetwork, ...]:
    """The blocks of ``peer`` the direct backend cannot route: those of a
    family it published no underlay address for."""
    return tuple(b for b in peer.blocks if peer.node_ip_of(b.version) is None)


def host_route(ip: IPAddress, host_veth: str) -> Route:
    """``<ip>/32`` (or ``/128``) ``dev <host veth> scope link``: how the node reaches a local pod."""
    return Route(dst=ip_network((ip, ip.max_prefixlen)), dev=host_veth, scope_link=True)


def pod_routes(pod: PodEndpoint) -> tuple[Route, ...]:
    """The node's routes to a local pod, one per address."""
    return tuple(host_route(ip, pod.host_veth) for ip in pod.ips)
