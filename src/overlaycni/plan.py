"""Capacity planning: overlay vs flat Azure CNI vs kubenet, on one VNet (pure).

Formulas from the AKS docs (IP address planning in
https://learn.microsoft.com/azure/aks/azure-cni-overlay and
https://learn.microsoft.com/azure/aks/configure-azure-cni; the kubenet route
table limit in https://learn.microsoft.com/azure/aks/configure-kubenet):

* overlay: the VNet holds node IPs only, pods come from the private pod CIDR:
  ``nodes = min(blocks in pod CIDR, usable node-subnet IPs, 5000)``.
* flat Azure CNI (node-subnet mode): every pod IP is a subnet IP, reserved up
  front per node: ``nodes = usable IPs // (1 + max pods)``.
* kubenet: pods from a private CIDR, one route per node in a route table
  capped at 400 routes: ``nodes = min(usable IPs, 400, blocks in pod CIDR)``.
  The blocks term is ours: kubenet also carves one block per node from the
  pod CIDR, so a small pod CIDR caps it too.

"usable" is the node subnet's size minus the 5 addresses Azure reserves in
every subnet (https://learn.microsoft.com/azure/virtual-network/virtual-networks-faq).

Data plane: each backend adds bytes to every pod packet on the underlay
(IPv4): vxlan 50 (outer IP 20, UDP 8, VXLAN 8, inner Ethernet 14), direct 0,
wireguard 60 (outer IP 20, UDP 8, WireGuard data header 16, Poly1305 tag 16;
https://www.wireguard.com/protocol/). The pod MTU is the underlay MTU minus
that, unless ``--mtu`` sets it.

Why overlay ends VNet IP exhaustion: a node costs the VNet 1 address in
overlay but ``1 + max pods`` in flat mode. When the pod CIDR (not the VNet)
is what caps overlay, the verdict names the pod CIDR size that would lift
the cap to the VNet's own limit.

Dual-stack (``--ip-families ipv4,ipv6``): a node needs a block of each
family, so the node count is capped by the smaller of the two pod CIDRs'
block counts, and a node's pods by the smaller block
(``ClusterNetwork.pods_per_node``). kubenet programs two routes per node, one
per family, so its 400-route table holds 200 nodes ("dual-stack clusters are
limited to 200 nodes", https://learn.microsoft.com/azure/aks/configure-kubenet-dual-stack).
"VNet IPs per node" stays the IPv4 count: the scarce family (a node also
takes one address of its /64 IPv6 subnet). AKS offers dual-stack with
overlay and kubenet only; the flat row shows what the same VNet would cost
in IPv4 without overlay. The plan's JSON keeps its keys and, for a
dual-stack network, adds ``ipv6``: the IPv6 pod CIDR, its blocks, and the
nodes and pods that get an address of both families.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import (
    MAX_NODES_KUBENET,
    MAX_NODES_OVERLAY,
    ClusterNetwork,
    FamilyNetwork,
    IPFamily,
    usable_subnet_ips,
)
from .errors import FieldError

MODELS = ("overlay", "flat", "kubenet")

# Short reasons (they are table cells and JSON values).
LIMIT_POD_CIDR = "pod CIDR blocks"
LIMIT_SUBNET = "node subnet IPs"
LIMIT_AKS = "AKS node limit"
LIMIT_ROUTES = "route table (400)"
# dual-stack: the pod CIDR blocks of each family; 2 routes per kubenet node
LIMIT_POD_CIDR_FAMILY = {IPFamily.ipv4: "IPv4 pod CIDR blocks", IPFamily.ipv6: "IPv6 pod CIDR blocks"}
LIMIT_ROUTES_DUAL = "route table (400/2)"  # 400 routes, 2 per node
MIN_POD_PREFIX = 8  # no pod CIDR suggestion larger than a /8
MIN_POD_PREFIX_FAMILY = {IPFamily.ipv4: MIN_POD_PREFIX, IPFamily.ipv6: 32}


@dataclass(frozen=True)
class ModelCapacity:
    model: str
    max_nodes: int
    max_pods: int
    vnet_ips_per_node: int
    limited_by: str
    fits: bool | None = None  # only with a requested node count
    vnet_ips_needed: int | None = None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "max_nodes": self.max_nodes,
            "max_pods": self.max_pods,
            "vnet_ips_per_node": self.vnet_ips_per_node,
            "limited_by": self.limited_by,
        }
        if self.vnet_ips_needed is not None:
            out["vnet_ips_needed"] = self.vnet_ips_needed
        return out


OVERHEAD_PARTS = {
    "vxlan": "outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14",
    "direct": "none: pod packets are routed as they are",
    "wireguard": "outer IPv4 20 + UDP 8 + WireGuard header 16 + auth tag 16",
}


@dataclass(frozen=True)
class DataPlane:
    """What the backend does to a pod packet on an underlay of ``underlay_mtu``."""

    backend: str
    overhead: int
    underlay_mtu: int
    pod_mtu: int
    encrypted: bool

    @property
    def parts(self) -> str:
        return OVERHEAD_PARTS[self.backend]

    def to_dict(self) -> dict[str, object]:
        return {"backend": self.backend, "overhead": self.overhead, "underlay_mtu": self.underlay_mtu,
                "pod_mtu": self.pod_mtu, "encrypted": self.encrypted}  # fmt: skip


def data_plane(net: ClusterNetwork, underlay_mtu: int = 1500) -> DataPlane:
    """The data plane on an IPv4 underlay of ``underlay_mtu``."""
    return DataPlane(net.backend, net.overhead, underlay_mtu, net.pod_mtu(underlay_mtu), net.backend == "wireguard")


def pod_prefix_for(nodes: int, block_prefix: int, *, min_prefix: int = MIN_POD_PREFIX) -> int | None:
    """The longest prefix (smallest pod CIDR) holding ``nodes`` blocks of
    /block_prefix; None if that would be larger than a /min_prefix."""
    prefix = block_prefix - max(0, nodes - 1).bit_length()
    return prefix if prefix >= min_prefix else None


@dataclass(frozen=True)
class FamilyCapacity:
    """The IPv6 side of a dual-stack plan: its pod CIDR and blocks, and the
    overlay nodes and pods that hold an address of every family."""

    side: FamilyNetwork
    max_nodes: int
    max_pods: int
    limited_by: str

    def to_dict(self) -> dict[str, object]:
        s = self.side
        return {
            "pod_cidr": str(s.pod_cidr),
            "service_cidr": str(s.service_cidr),
            "node_cidr_size": s.node_cidr_size,
            "blocks": s.block_count,
            "addresses_per_block": s.block_addresses,
            "max_nodes": self.max_nodes,
            "max_pods": self.max_pods,
            "limited_by": self.limited_by,
        }


@dataclass(frozen=True)
class Plan:
    network: ClusterNetwork
    overlay: ModelCapacity
    flat: ModelCapacity
    kubenet: ModelCapacity
    nodes: int | None
    ipv6: FamilyCapacity | None = None  # dual-stack only
    data_plane: DataPlane | None = None

    def models(self) -> tuple[ModelCapacity, ModelCapacity, ModelCapacity]:
        return (self.overlay, self.flat, self.kubenet)

    @property
    def vnet_node_limit(self) -> int:
        """The most overlay nodes the VNet side allows (subnet IPs, AKS cap)."""
        return min(usable_subnet_ips(self.network.node_subnet_cidr), MAX_NODES_OVERLAY)

    def pod_cidr_hint(self) -> str:
        """When a pod CIDR caps overlay: the pod CIDR size (of each family
        that caps it) that would not."""
        o, n = self.overlay, self.network
        if o.limited_by not in (LIMIT_POD_CIDR, *LIMIT_POD_CIDR_FAMILY.values()):
            return ""
        limit = self.vnet_node_limit
        target = limit if self.nodes is None else min(self.nodes, limit)
        short = [f for f in n.families if f.block_count < target]
        prefixes = [
            pod_prefix_for(target, f.node_cidr_size, min_prefix=MIN_POD_PREFIX_FAMILY[f.family]) for f in short
        ]
        if not short or None in prefixes or target <= o.max_nodes:
            return ""
        label = {f.family: f"{f.family.label} " if n.is_dual_stack else "" for f in short}
        names = [f"/{prefix} {label[f.family]}pod CIDR" for f, prefix in zip(short, prefixes, strict=True)]
        what = f"the VNet's limit of {limit:,} nodes" if target == limit else f"{target:,} nodes"
        return f" A {' and a '.join(names)} would lift overlay to {what}."

    def verdict(self) -> str:
        o, f, k = self.models()
        per_flat = f.vnet_ips_per_node
        if self.nodes is None:
            return (
                f"Overlay: {o.max_nodes:,} nodes at 1 VNet IP each; flat Azure CNI: {f.max_nodes:,} nodes "
                f"at {per_flat} each (1 + max pods)." + self.pod_cidr_hint()
            )
        n = self.nodes
        if not o.fits:
            return (
                f"{n:,} nodes do not fit in overlay: max {o.max_nodes:,} (limit: {o.limited_by})."
                + self.pod_cidr_hint()
            )
        flat_part = f"flat Azure CNI would need {f.vnet_ips_needed:,} ({per_flat} per node)"
        flat_part += " and fits" if f.fits else f" and does not fit (max {f.max_nodes:,})"
        kube_part = "" if k.fits else f"; kubenet does not fit (max {k.max_nodes:,})"
        return f"{n:,} nodes fit in overlay with {o.vnet_ips_needed:,} VNet IPs (1 per node); {flat_part}{kube_part}."


def _with_need(cap: ModelCapacity, nodes: int | None) -> ModelCapacity:
    if nodes is None:
        return cap
    return replace(cap, fits=nodes <= cap.max_nodes, vnet_ips_needed=nodes * cap.vnet_ips_per_node)


def _min_with_reason(*terms: tuple[int, str]) -> tuple[int, str]:
    """The smallest term and its name (the first named on a tie)."""
    value = min(t[0] for t in terms)
    return value, next(name for v, name in terms if v == value)


def make_plan(net: ClusterNetwork, nodes: int | None = None, *, underlay_mtu: int = 1500) -> Plan:
    usable = usable_subnet_ips(net.node_subnet_cidr)
    dual = net.is_dual_stack
    blocks = tuple((f.block_count, LIMIT_POD_CIDR_FAMILY[f.family] if dual else LIMIT_POD_CIDR) for f in net.families)
    per_node = net.pods_per_node

    o_nodes, o_why = _min_with_reason(*blocks, (usable, LIMIT_SUBNET), (MAX_NODES_OVERLAY, LIMIT_AKS))
    overlay = ModelCapacity("overlay", o_nodes, o_nodes * per_node, 1, o_why)

    f_nodes = usable // (1 + net.max_pods)  # flat: IPv4 VNet IPs, no IPv6 blocks
    flat = ModelCapacity("flat", f_nodes, f_nodes * net.max_pods, 1 + net.max_pods, LIMIT_SUBNET)

    routes = (MAX_NODES_KUBENET // 2, LIMIT_ROUTES_DUAL) if dual else (MAX_NODES_KUBENET, LIMIT_ROUTES)
    k_nodes, k_why = _min_with_reason((usable, LIMIT_SUBNET), routes, *blocks)
    kubenet = ModelCapacity("kubenet", k_nodes, k_nodes * per_node, 1, k_why)
    v6 = net.family(IPFamily.ipv6)
    ipv6 = FamilyCapacity(v6, o_nodes, o_nodes * per_node, o_why) if v6 is not None else None
    return Plan(net, _with_need(overlay, nodes), _with_need(flat, nodes), _with_need(kubenet, nodes), nodes, ipv6,
                data_plane(net, underlay_mtu))  # fmt: skip


def plan_json(
    plan: Plan | None, errors: list[FieldError], warnings: list[str], *, nodes: int | None = None
) -> dict[str, object]:
    """The ``plan --output json`` document. Its top-level keys are a public
    contract: ``valid``, ``errors``, ``warnings``, ``overlay``, ``flat``,
    ``kubenet`` (null when invalid), only when a node count was asked for
    ``fits`` (null when invalid), and only for a valid dual-stack network
    ``ipv6`` (``FamilyCapacity.to_dict``)."""
    valid = plan is not None and not errors
    out: dict[str, object] = {
        "valid": valid,
        "errors": [e.to_dict() for e in errors],
        "warnings": list(warnings),
    }
    for name in MODELS:
        out[name] = getattr(plan, name).to_dict() if valid and plan else None
    if valid and plan and plan.data_plane and isinstance(out["overlay"], dict):
        out["overlay"]["data_plane"] = plan.data_plane.to_dict()  # the overlay's packets: backend, overhead, MTU
    asked = nodes if nodes is not None else (plan.nodes if plan else None)
    if asked is not None:
        out["fits"] = {m.model: bool(m.fits) for m in plan.models()} if valid and plan else None
    if valid and plan and plan.ipv6 is not None:
        out["ipv6"] = plan.ipv6.to_dict()
    return out
