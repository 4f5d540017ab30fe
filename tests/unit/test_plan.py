"""Unit tests of the capacity planner (pure): the AKS docs' formulas per
model (cited in overlaycni/plan.py), the verdict, the pod CIDR suggestion and
the JSON contract."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlaycni.config import check_network, count_blocks, parse_network
from overlaycni.errors import FieldError
from overlaycni.plan import (
    LIMIT_AKS,
    LIMIT_POD_CIDR,
    LIMIT_ROUTES,
    LIMIT_SUBNET,
    make_plan,
    plan_json,
    pod_prefix_for,
)

OVERLAY = {"network-plugin": "azure", "network-plugin-mode": "overlay"}
SEED = {**OVERLAY, "pod-cidr": "10.244.0.0/16", "service-cidr": "10.0.0.0/24", "dns-service-ip": "10.0.0.10"}


def plan_for(nodes: int | None = None, **settings_: object):
    return make_plan(parse_network({**OVERLAY, **settings_}), nodes)


def test_seed_example_capacity():
    p = make_plan(parse_network(SEED))
    assert (p.overlay.max_nodes, p.overlay.max_pods, p.overlay.limited_by) == (256, 256 * 250, LIMIT_POD_CIDR)
    # /16 node subnet: 65,536 - 5 usable; flat needs 1 + 250 per node
    assert (p.flat.max_nodes, p.flat.vnet_ips_per_node) == (65531 // 251, 251)
    assert (p.kubenet.max_nodes, p.kubenet.limited_by) == (256, LIMIT_POD_CIDR)
    assert p.overlay.vnet_ips_per_node == p.kubenet.vnet_ips_per_node == 1


def test_overlay_limited_by_node_subnet():
    p = plan_for(node_subnet_cidr="10.224.0.0/24")
    assert (p.overlay.max_nodes, p.overlay.limited_by) == (251, LIMIT_SUBNET)
    assert p.flat.max_nodes == 1  # 251 // 251


def test_overlay_limited_by_aks_node_limit():
    p = plan_for(pod_cidr="100.64.0.0/10")
    assert (p.overlay.max_nodes, p.overlay.limited_by) == (5000, LIMIT_AKS)


def test_kubenet_limited_by_route_table():
    p = plan_for(pod_cidr="100.64.0.0/10")
    assert (p.kubenet.max_nodes, p.kubenet.limited_by) == (400, LIMIT_ROUTES)


def test_smaller_max_pods_helps_flat_only():
    p = plan_for(max_pods=30)
    assert p.flat.max_nodes == 65531 // 31 and p.flat.max_pods == p.flat.max_nodes * 30
    assert p.overlay.max_nodes == 256


def test_nodes_fit_and_vnet_ips_needed():
    p = plan_for(300, pod_cidr="10.244.0.0/15")
    assert p.overlay.fits and (p.overlay.vnet_ips_needed == 300)
    assert not p.flat.fits and p.flat.vnet_ips_needed == 300 * 251
    assert p.kubenet.fits and p.kubenet.vnet_ips_needed == 300


def test_nodes_exactly_at_the_limit_fit():
    p = plan_for(256)
    assert p.overlay.fits and not plan_for(257).overlay.fits


@pytest.mark.parametrize(
    "nodes,block,prefix",
    [(1, 24, 24), (2, 24, 23), (256, 24, 16), (257, 24, 15), (5000, 24, 11), (1024, 26, 16), (2**17, 24, None)],
)
def test_pod_prefix_for(nodes, block, prefix):
    assert pod_prefix_for(nodes, block) == prefix


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=2**16), st.integers(min_value=16, max_value=28))
def test_pod_prefix_for_is_the_smallest_cidr_that_holds_the_nodes(nodes, block):
    prefix = pod_prefix_for(nodes, block)
    if prefix is None:
        assert count_blocks(IPv4Network("0.0.0.0/8"), block) < nodes
        return
    assert count_blocks(IPv4Network((0, prefix)), block) >= nodes
    if prefix < block:
        assert count_blocks(IPv4Network((0, prefix + 1)), block) < nodes


# ----- verdict ---------------------------------------------------------------------------


def test_verdict_explains_vnet_ips_per_node_and_suggests_pod_cidr():
    v = make_plan(parse_network(SEED)).verdict()
    assert v == (
        "Overlay: 256 nodes at 1 VNet IP each; flat Azure CNI: 261 nodes at 251 each (1 + max pods). "
        "A /11 pod CIDR would lift overlay to the VNet's limit of 5,000 nodes."
    )


def test_verdict_suggests_pod_cidr_for_the_asked_nodes():
    v = plan_for(300).verdict()
    assert "300 nodes do not fit in overlay: max 256" in v
    assert "A /15 pod CIDR would lift overlay to 300 nodes." in v


def test_verdict_without_hint_when_the_vnet_is_the_limit():
    v = plan_for(node_subnet_cidr="10.224.0.0/24").verdict()
    assert "Overlay: 251 nodes at 1 VNet IP each" in v and "pod CIDR would" not in v


def test_verdict_hint_stops_at_the_vnet_limit():
    v = plan_for(1000, node_subnet_cidr="10.224.0.0/23").verdict()  # 507 usable node IPs
    assert "A /15 pod CIDR would lift overlay to the VNet's limit of 507 nodes." in v


def test_verdict_when_overlay_fits_and_flat_does_not():
    v = plan_for(300, pod_cidr="10.244.0.0/15").verdict()
    assert v == (
        "300 nodes fit in overlay with 300 VNet IPs (1 per node); flat Azure CNI would need 75,300 "
        "(251 per node) and does not fit (max 261)."
    )


def test_verdict_when_kubenet_does_not_fit():
    v = plan_for(500, pod_cidr="10.244.0.0/15", max_pods=30).verdict()
    assert "flat Azure CNI would need 15,500 (31 per node) and fits; kubenet does not fit (max 400)." in v


def test_verdict_when_flat_fits_no_node():
    v = plan_for(node_subnet_cidr="10.224.0.0/28").verdict()
    assert "flat Azure CNI: 0 nodes at 251 each" in v


# ----- properties across random valid networks ----------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    st.integers(min_value=16, max_value=29),  # node subnet prefix inside 10.224.0.0/12
    st.integers(min_value=10, max_value=24),  # pod CIDR prefix (100.64.0.0/10 and below)
    st.integers(min_value=10, max_value=250),
    st.one_of(st.none(), st.integers(min_value=1, max_value=10_000)),
)
def test_plan_invariants(subnet_prefix, pod_prefix, max_pods, nodes):
    block = 32 - (max_pods + 2).bit_length()  # smallest block that holds max_pods + 3
    block = max(block, pod_prefix)
    p = plan_for(
        nodes,
        node_subnet_cidr=f"10.224.0.0/{subnet_prefix}",
        pod_cidr=f"100.64.0.0/{pod_prefix}",
        max_pods=max_pods,
        node_cidr_size=block,
    )
    assert p.overlay.max_nodes >= p.kubenet.max_nodes
    assert p.overlay.max_nodes <= 5000 and p.kubenet.max_nodes <= 400
    for m in p.models():
        assert m.max_pods == m.max_nodes * max_pods
        if nodes is not None:
            assert m.fits == (nodes <= m.max_nodes)
            assert m.vnet_ips_needed == nodes * m.vnet_ips_per_node
    # flat always pays 1 + max pods VNet IPs per node, overlay 1
    assert p.flat.vnet_ips_per_node == 1 + max_pods and p.overlay.vnet_ips_per_node == 1
    assert p.flat.max_nodes * (1 + max_pods) <= max(0, 2 ** (32 - subnet_prefix) - 5)
    assert p.verdict()


# ----- JSON contract --------------------------------------------------------------------------


TOP = {"valid", "errors", "warnings", "overlay", "flat", "kubenet"}


def test_json_keys_without_nodes():
    doc = plan_json(make_plan(parse_network(SEED)), [], [])
    assert set(doc) == TOP
    assert doc["valid"] is True and doc["errors"] == [] and doc["overlay"]["max_nodes"] == 256
    for name in ("overlay", "flat", "kubenet"):
        assert {"max_nodes", "max_pods"} <= set(doc[name]) and "vnet_ips_needed" not in doc[name]


def test_json_keys_with_nodes():
    doc = plan_json(plan_for(300), [], [], nodes=300)
    assert set(doc) == TOP | {"fits"}
    assert doc["fits"] == {"overlay": False, "flat": False, "kubenet": False}
    assert doc["flat"]["vnet_ips_needed"] == 75300


def test_json_when_invalid():
    net, errors, warnings = check_network({**OVERLAY, "pod-cidr": "10.224.128.0/17"})
    doc = plan_json(None, errors, warnings, nodes=10)
    assert set(doc) == TOP | {"fits"}
    assert doc["valid"] is False and doc["fits"] is None and doc["overlay"] is None
    assert doc["errors"] == [
        {"field": "pod-cidr", "message": "--pod-cidr 10.224.128.0/17 overlaps --vnet-cidr 10.224.0.0/12 "
         "(NetworkProfileCIDROverlapVNET)"}
    ]


def test_json_carries_warnings():
    net, errors, warnings = check_network({**OVERLAY, "pod-cidr": "20.0.0.0/16"})
    doc = plan_json(make_plan(net), errors, warnings)
    assert doc["valid"] is True and len(doc["warnings"]) == 1


def test_json_with_errors_never_reports_capacity():
    doc = plan_json(plan_for(10), [FieldError("vni", "--vni 0 is out of range")], [], nodes=10)
    assert doc["valid"] is False and doc["overlay"] is None and doc["fits"] is None


@pytest.mark.parametrize(
    "backend, underlay, overhead, pod_mtu",
    [("vxlan", 1500, 50, 1450), ("direct", 1500, 0, 1500), ("wireguard", 1500, 60, 1440), ("wireguard", 9000, 60, 8940)],
)
def test_data_plane_overhead_and_pod_mtu(backend, underlay, overhead, pod_mtu):
    from overlaycni.plan import data_plane

    d = make_plan(parse_network(backend=backend), underlay_mtu=underlay).data_plane
    assert d == data_plane(parse_network(backend=backend), underlay)
    assert (d.overhead, d.pod_mtu, d.encrypted) == (overhead, pod_mtu, backend == "wireguard")
    fixed = make_plan(parse_network(backend=backend, mtu="1300"), underlay_mtu=underlay).data_plane
    assert fixed.pod_mtu == 1300 and fixed.overhead == overhead
