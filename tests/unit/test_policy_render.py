"""The nftables renderer: golden files, structure, incremental diffs, growth.

Regenerate the golden files with ``UPDATE_GOLDEN=1``.
"""

from __future__ import annotations

import json
import os
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlaycni.policy import parse_policies
from overlaycni.policy.model import NamedPort, NamespaceInfo, PodInfo
from overlaycni.policy.render import counts, diff_render, render_node
from tests.policy_cases import CASES, build_model, case

GOLDEN = Path(__file__).parent / "golden" / "policy"


def _render(name: str, node: str = "node-1", **model_kw) -> dict:
    c = case(name)
    m = c.model(**model_kw)
    return render_node(node, pods=m.pods, namespaces=m.namespaces, policies=parse_policies(c.manifest(m)))


@pytest.mark.parametrize("name", ["pod-or-namespace", "named-port-from-namespace", "ingress-and-egress-together", "egress-cidr-except"])
def test_golden(name):
    doc = _render(name)
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    path = GOLDEN / f"{name}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"render changed; rerun with UPDATE_GOLDEN=1 if intended ({path})"


def _cmds(doc, verb, kind):
    return [c[verb][kind] for c in doc["nftables"] if kind in c.get(verb, {})]


def test_table_is_replaced_atomically_and_base_chains_hook_forward():
    doc = _render("default-deny-all")
    head = doc["nftables"][:3]
    assert head == [
        {"add": {"table": {"family": "inet", "name": "overlaycni"}}},
        {"delete": {"table": {"family": "inet", "name": "overlaycni"}}},
        {"add": {"table": {"family": "inet", "name": "overlaycni"}}},
    ]
    base = [c for c in _cmds(doc, "add", "chain") if "hook" in c]
    assert [(c["name"], c["hook"], c["policy"]) for c in base] == [("egress", "forward", "accept"), ("ingress", "forward", "accept")]
    for chain in ("egress", "ingress"):
        first = next(r for r in _cmds(doc, "add", "rule") if r["chain"] == chain)
        assert first["expr"][0]["match"]["left"] == {"ct": {"key": "state"}}
        assert first["expr"][1] == {"accept": None}
    # only the table inet overlaycni is ever named
    assert {c.get("family") for v in ("add", "delete") for k in ("chain", "set", "map", "rule") for c in _cmds(doc, v, k)} == {"inet"}
    assert not any("iifname" in json.dumps(doc) or "oifname" in json.dumps(doc) for _ in [0])


def _map_elems(doc, name):
    m = next(m for m in _cmds(doc, "add", "map") if m["name"] == name)
    return {ip: v["jump"]["target"] for ip, v in m.get("elem", [])}


def test_verdict_maps_hold_only_this_nodes_isolated_pods():
    model = build_model()
    for node in ("node-1", "node-2", "node-3"):
        doc = _render("default-deny-all", node)
        local_x = {str(p.ip) for p in model.pods if p.namespace == "x" and p.node == node}
        assert _map_elems(doc, "ingress-pods") == {ip: "in-ns-x" for ip in local_x}
        assert _map_elems(doc, "egress-pods") == {ip: "eg-ns-x" for ip in local_x}
    doc = _render("ingress-and-egress-independent", "node-2")  # x/b on node-2, x/a on node-1
    assert _map_elems(doc, "ingress-pods") == {str(model.pod("x/b").ip): "in-ns-x"}
    assert _map_elems(doc, "egress-pods") == {}


def test_named_ports_resolve_on_the_destination_address():
    doc = _render("named-port-from-namespace")
    sets = {s["name"]: s for s in _cmds(doc, "add", "set")}
    np = sets["np-tcp-serve-80-tcp"]
    assert np["type"] == ["ipv4_addr", "inet_service"]
    assert {tuple(e["concat"]) for e in np["elem"]} == {(str(p.ip), 80) for p in build_model().pods}
    rule = next(r for r in _cmds(doc, "add", "rule") if r.get("comment", "").endswith("ingress[0]"))
    left = rule["expr"][-2]["match"]["left"]
    assert left["concat"][0] == {"payload": {"protocol": "ip", "field": "daddr"}}


def test_sctp_and_port_ranges_render():
    doc = _render("sctp-allowed")
    assert any(e.get("match", {}).get("left") == {"payload": {"protocol": "sctp", "field": "dport"}} for r in _cmds(doc, "add", "rule") for e in r["expr"])
    doc = _render("end-port-probe-in-range")
    assert any(e.get("match", {}).get("right") == {"range": [81, 82]} for r in _cmds(doc, "add", "rule") for e in r["expr"])


def test_label_change_is_an_element_diff():
    c = case("updated-pod-labels")
    pols = parse_policies(c.manifest(build_model()))
    before, after = build_model(), c.model()
    old = render_node("node-1", pods=before.pods, namespaces=before.namespaces, policies=pols)
    new = render_node("node-1", pods=after.pods, namespaces=after.namespaces, policies=pols)
    diff = diff_render(old, new)
    assert diff == {
        "nftables": [
            {"add": {"element": {"family": "inet", "table": "overlaycni", "name": next(iter(_sets_with(new, str(after.pod("x/b").ip)))), "elem": [str(after.pod("x/b").ip)]}}}
        ]
    }
    back = diff_render(new, old)
    assert [next(iter(c)) for c in back["nftables"]] == ["delete"]
    assert diff_render(old, old) == {"nftables": []}


def _sets_with(doc, ip):
    return {s["name"] for s in _cmds(doc, "add", "set") if ip in s.get("elem", [])}


def test_new_pod_and_map_value_change_are_element_diffs():
    c = case("default-deny-all")
    m = c.model()
    pols = parse_policies(c.manifest(m))
    newpod = PodInfo("x", "d", IPv4Address("10.244.1.99"), "node-1", {"pod": "d"}, (NamedPort("serve-80-tcp", 80),))
    old = render_node("node-1", pods=m.pods, namespaces=m.namespaces, policies=pols)
    new = render_node("node-1", pods=(*m.pods, newpod), namespaces=m.namespaces, policies=pols)
    diff = diff_render(old, new)
    assert diff is not None and {json.dumps(c["add"]["element"]["name"]) for c in diff["nftables"]} >= {'"ingress-pods"', '"egress-pods"'}
    # the same address reused by a pod of another isolated namespace: delete + add of the map key
    pols2 = parse_policies(c.manifest(m) + "---\n" + c.manifest(m).replace("namespace: x", "namespace: y"))
    moved = PodInfo("y", "d", newpod.ip, "node-1", {"pod": "d"})
    a = render_node("node-1", pods=(*m.pods, newpod), namespaces=m.namespaces, policies=pols2)
    b = render_node("node-1", pods=(*m.pods, moved), namespaces=m.namespaces, policies=pols2)
    verbs = [(next(iter(c)), c[next(iter(c))]["element"]["name"]) for c in diff_render(a, b)["nftables"]]
    assert ("delete", "ingress-pods") in verbs and ("add", "ingress-pods") in verbs
    assert verbs.index(("delete", "ingress-pods")) < verbs.index(("add", "ingress-pods"))


def test_policy_change_needs_full_apply():
    m = build_model()
    a = render_node("node-1", pods=m.pods, namespaces=m.namespaces, policies=parse_policies(case("stacked-policies").manifest(m)))
    b = render_node("node-1", pods=m.pods, namespaces=m.namespaces, policies=parse_policies(case("pod-or-namespace").manifest(m)))
    assert diff_render(a, b) is None


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_structure_depends_on_policies_only(c):
    """Moving pods between nodes and relabelling never changes chains or rules."""
    m1 = c.model()
    m2 = build_model(nodes={p.key: "node-1" for p in m1.pods})
    pols = parse_policies(c.manifest(m1))
    a = render_node("node-1", pods=m1.pods, namespaces=m1.namespaces, policies=pols)
    b = render_node("node-1", pods=m2.pods, namespaces=m2.namespaces, policies=pols)
    assert diff_render(a, b) is not None
    assert counts(a)[0] == counts(b)[0]


# ----- growth: linear in pods + policies ------------------------------------------------


def synthetic(namespaces: int, pods_per_ns: int, policies_per_ns: int):
    nss, pods, docs = [], [], []
    for n in range(namespaces):
        ns = f"team{n}"
        nss.append(NamespaceInfo(ns, {"team": ns}))
        for i in range(pods_per_ns):
            ip = IPv4Address(int(IPv4Address("10.244.0.0")) + n * 256 + i + 2)
            pods.append(PodInfo(ns, f"p{i}", ip, f"node-{i % 4}", {"app": f"app{i % 5}"}, (NamedPort("http", 8080),)))
        for k in range(policies_per_ns):
            docs.append(
                f"""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: pol{k}, namespace: {ns}}}
spec:
  podSelector: {{matchLabels: {{app: app{k % 5}}}}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {{matchLabels: {{app: app{(k + 1) % 5}}}}}
    - namespaceSelector: {{matchLabels: {{team: {ns}}}}}
      podSelector: {{matchExpressions: [{{key: app, operator: In, values: [app{(k + 2) % 5}]}}]}}
    ports: [{{port: http}}, {{port: {1000 + k}, endPort: {1010 + k}}}]
  egress:
  - to: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [10.9.0.0/16]}}}}]
"""
            )
    return nss, pods, parse_policies("---\n".join(docs))


BASE_RULES = 4  # ct + vmap in each base chain


@settings(max_examples=15, deadline=None)
@given(namespaces=st.integers(1, 4), pods=st.integers(1, 12), policies=st.integers(1, 6))
def test_counts_grow_linearly(namespaces, pods, policies):
    def measure(n, p, q):
        nss, ps, pols = synthetic(n, p, q)
        return counts(render_node("node-0", pods=ps, namespaces=nss, policies=pols))

    rules, elems = measure(namespaces, pods, policies)
    rules2, elems2 = measure(2 * namespaces, pods, policies)
    assert rules2 - BASE_RULES == 2 * (rules - BASE_RULES)  # doubling namespaces doubles everything
    assert elems2 == 2 * elems
    rules_more_pods, _ = measure(namespaces, 2 * pods, policies)
    assert rules_more_pods == rules  # rules never depend on pods
    _, elems_more_pols = measure(namespaces, pods, 2 * policies)
    # set elements are bounded by pods x distinct selectors, never pods x policies
    assert elems_more_pols <= elems + namespaces * pods * 2 + 2 * namespaces * pods


def test_equal_selections_share_one_set():
    # target "all pods of x" and peer "podSelector: {}" (all pods of x) are one set
    doc = _render("deny-from-other-namespaces")
    sets = [s for s in _cmds(doc, "add", "set") if s["name"].startswith("sel-")]
    assert len(sets) == 1
    assert sorted(sets[0]["elem"]) == sorted(str(p.ip) for p in build_model().pods if p.namespace == "x")
