"""Capacity planning: overlay vs flat Azure CNI vs kubenet, on one VNet (pure).

Formulas (shared/REFERENCE.md, from the AKS docs):

* overlay: the VNet holds node IPs only, pods come from the private pod CIDR:
  ``nodes = min(blocks in pod CIDR, usable node-subnet IPs, 5000)``.
* flat Azure CNI (node-subnet mode): every pod IP is a subnet IP, reserved up
  front per node: ``nodes = usable IPs // (1 + max pods)``.
* kubenet: pods from a private CIDR, one route per node in a route table
  capped at 400 routes: ``nodes = min(usable IPs, 400, blocks in pod CIDR)``.
  The blocks term is ours: kubenet also carves one /24 per node from the pod
  CIDR, so a small pod CIDR caps it too.

"usable" is the node subnet's size minus the 5 addresses Azure reserves.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import (
    MAX_NODES_KUBENET,
    MAX_NODES_OVERLAY,
    ClusterNetwork,
    count_blocks,
    usable_subnet_ips,
)

MODELS = ("overlay", "flat", "kubenet")


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
        out: dict[str, object] = {"max_nodes": self.max_nodes, "max_pods": self.max_pods}
        out["vnet_ips_per_node"] = self.vnet_ips_per_node
        out["limited_by"] = self.limited_by
        if self.vnet_ips_needed is not None:
            out["vnet_ips_needed"] = self.vnet_ips_needed
        return out


@dataclass(frozen=True)
class Plan:
    network: ClusterNetwork
    overlay: ModelCapacity
    flat: ModelCapacity
    kubenet: ModelCapacity
    nodes: int | None

    def models(self) -> tuple[ModelCapacity, ModelCapacity, ModelCapacity]:
        return (self.overlay, self.flat, self.kubenet)

    def verdict(self) -> str:
        o, f, k = self.models()
        if self.nodes is not None:
            fitting = [m.model for m in self.models() if m.fits]
            if not o.fits:
                return f"{self.nodes} nodes do not fit even in overlay mode (max {o.max_nodes}, limited by {o.limited_by})."
            others = [m for m in ("flat", "kubenet") if m not in fitting]
            if others:
                return (
                    f"{self.nodes} nodes fit in overlay mode using {o.vnet_ips_needed} VNet IPs; "
                    f"not in {' or '.join(others)}."
                )
            return f"{self.nodes} nodes fit every model; overlay uses {o.vnet_ips_needed} VNet IPs vs {f.vnet_ips_needed} for flat."
        if f.max_nodes == 0:
            return f"Overlay runs {o.max_nodes} nodes; flat Azure CNI cannot fit a single node with {self.network.max_pods} pods in this subnet."
        ratio = o.max_nodes / f.max_nodes
        return f"Overlay runs {o.max_nodes} nodes vs {f.max_nodes} with flat Azure CNI ({ratio:.1f}x) on the same VNet."


def _with_need(cap: ModelCapacity, nodes: int | None) -> ModelCapacity:
    if nodes is None:
        return cap
    return ModelCapacity(
        cap.model,
        cap.max_nodes,
        cap.max_pods,
        cap.vnet_ips_per_node,
        cap.limited_by,
        fits=nodes <= cap.max_nodes,
        vnet_ips_needed=nodes * cap.vnet_ips_per_node,
    )


def _min_with_reason(*terms: tuple[int, str]) -> tuple[int, str]:
    value = min(t[0] for t in terms)
    return value, next(name for v, name in terms if v == value)


def make_plan(net: ClusterNetwork, nodes: int | None = None) -> Plan:
    usable = usable_subnet_ips(net.node_subnet_cidr)
    blocks = count_blocks(net.pod_cidr, net.node_cidr_size)
    per_node = net.max_pods

    o_nodes, o_why = _min_with_reason(
        (blocks, f"pod CIDR blocks (/{net.node_cidr_size})"),
        (usable, "node subnet IPs"),
        (MAX_NODES_OVERLAY, "AKS overlay node limit"),
    )
    overlay = ModelCapacity("overlay", o_nodes, o_nodes * per_node, 1, o_why)

    f_nodes = usable // (1 + per_node)
    flat = ModelCapacity("flat", f_nodes, f_nodes * per_node, 1 + per_node, "node subnet IPs (1 + max pods per node)")

    k_nodes, k_why = _min_with_reason(
        (usable, "node subnet IPs"),
        (MAX_NODES_KUBENET, "route table limit"),
        (blocks, f"pod CIDR blocks (/{net.node_cidr_size})"),
    )
    kubenet = ModelCapacity("kubenet", k_nodes, k_nodes * per_node, 1, k_why)
    return Plan(net, _with_need(overlay, nodes), _with_need(flat, nodes), _with_need(kubenet, nodes), nodes)


def plan_json(plan: Plan | None, errors: list, warnings: list[str]) -> dict[str, object]:
    """The ``plan --output json`` document (exact keys are a public contract)."""
    out: dict[str, object] = {
        "valid": plan is not None and not errors,
        "errors": [e.to_dict() for e in errors],
        "warnings": list(warnings),
    }
    for name in MODELS:
        out[name] = getattr(plan, name).to_dict() if plan else None
    if plan is not None and plan.nodes is not None:
        out["fits"] = {m.model: bool(m.fits) for m in plan.models()}
    return out
