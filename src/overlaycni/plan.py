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

Why overlay ends VNet IP exhaustion: a node costs the VNet 1 address in
overlay but ``1 + max pods`` in flat mode. When the pod CIDR (not the VNet)
is what caps overlay, the verdict names the pod CIDR size that would lift
the cap to the VNet's own limit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import (
    MAX_NODES_KUBENET,
    MAX_NODES_OVERLAY,
    ClusterNetwork,
    count_blocks,
    usable_subnet_ips,
)
from .errors import FieldError

MODELS = ("overlay", "flat", "kubenet")

# Short reasons (they are table cells and JSON values).
LIMIT_POD_CIDR = "pod CIDR blocks"
LIMIT_SUBNET = "node subnet IPs"
LIMIT_AKS = "AKS node limit"
LIMIT_ROUTES = "route table (400)"
MIN_POD_PREFIX = 8  # no pod CIDR suggestion larger than a /8


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


def pod_prefix_for(nodes: int, block_prefix: int) -> int | None:
    """The longest prefix (smallest pod CIDR) holding ``nodes`` blocks of
    /block_prefix; None if that would be larger than a /8."""
    prefix = block_prefix - max(0, nodes - 1).bit_length()
    return prefix if prefix >= MIN_POD_PREFIX else None


@dataclass(frozen=True)
class Plan:
    network: ClusterNetwork
    overlay: ModelCapacity
    flat: ModelCapacity
    kubenet: ModelCapacity
    nodes: int | None

    def models(self) -> tuple[ModelCapacity, ModelCapacity, ModelCapacity]:
        return (self.overlay, self.flat, self.kubenet)

    @property
    def vnet_node_limit(self) -> int:
        """The most overlay nodes the VNet side allows (subnet IPs, AKS cap)."""
        return min(usable_subnet_ips(self.network.node_subnet_cidr), MAX_NODES_OVERLAY)

    def pod_cidr_hint(self) -> str:
        """When the pod CIDR caps overlay: the pod CIDR size that would not."""
        o, n = self.overlay, self.network
        if o.limited_by != LIMIT_POD_CIDR:
            return ""
        limit = self.vnet_node_limit
        target = limit if self.nodes is None else min(self.nodes, limit)
        prefix = pod_prefix_for(target, n.node_cidr_size)
        if prefix is None or target <= o.max_nodes:
            return ""
        what = f"the VNet's limit of {limit:,} nodes" if target == limit else f"{target:,} nodes"
        return f" A /{prefix} pod CIDR would lift overlay to {what}."

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


def make_plan(net: ClusterNetwork, nodes: int | None = None) -> Plan:
    usable = usable_subnet_ips(net.node_subnet_cidr)
    blocks = count_blocks(net.pod_cidr, net.node_cidr_size)
    per_node = net.max_pods

    o_nodes, o_why = _min_with_reason(
        (blocks, LIMIT_POD_CIDR), (usable, LIMIT_SUBNET), (MAX_NODES_OVERLAY, LIMIT_AKS)
    )
    overlay = ModelCapacity("overlay", o_nodes, o_nodes * per_node, 1, o_why)

    f_nodes = usable // (1 + per_node)
    flat = ModelCapacity("flat", f_nodes, f_nodes * per_node, 1 + per_node, LIMIT_SUBNET)

    k_nodes, k_why = _min_with_reason(
        (usable, LIMIT_SUBNET), (MAX_NODES_KUBENET, LIMIT_ROUTES), (blocks, LIMIT_POD_CIDR)
    )
    kubenet = ModelCapacity("kubenet", k_nodes, k_nodes * per_node, 1, k_why)
    return Plan(net, _with_need(overlay, nodes), _with_need(flat, nodes), _with_need(kubenet, nodes), nodes)


def plan_json(
    plan: Plan | None, errors: list[FieldError], warnings: list[str], *, nodes: int | None = None
) -> dict[str, object]:
    """The ``plan --output json`` document. Its top-level keys are a public
    contract: ``valid``, ``errors``, ``warnings``, ``overlay``, ``flat``,
    ``kubenet`` (null when invalid) and, only when a node count was asked
    for, ``fits`` (null when invalid)."""
    valid = plan is not None and not errors
    out: dict[str, object] = {
        "valid": valid,
        "errors": [e.to_dict() for e in errors],
        "warnings": list(warnings),
    }
    for name in MODELS:
        out[name] = getattr(plan, name).to_dict() if valid and plan else None
    asked = nodes if nodes is not None else (plan.nodes if plan else None)
    if asked is not None:
        out["fits"] = {m.model: bool(m.fits) for m in plan.models()} if valid and plan else None
    return out
