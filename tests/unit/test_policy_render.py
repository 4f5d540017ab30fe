"""The nftables renderer: golden files, structure, incremental diffs, growth.

Regenerate the golden files with ``UPDATE_GOLDEN=1``.
"""

from __future__ import annotations

import json
import os
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlaycni.families import DUAL_STACK, SINGLE_STACK, IPFamily
from overlaycni.policy import parse_policies
from overlaycni.policy.model import NamedPort, NamespaceInfo, PodInfo
from overlaycni.policy.render import counts, diff_render, render_families, render_node
from tests.policy_cases import CASES, build_model, case, np, with_ipv6_twins

GOLDEN = Path(__file__).parent / "golden" / "policy"


def _render(name: str, node: str = "node-1", *, twins: bool = False, **model_kw) -> dict:
    c = case(name)
    m = c.model(**model_kw)
    pols = parse_policies(c.manifest(m))
    return render_node(node, pods=m.pods, namespaces=m.namespaces, policies=with_ipv6_twins(pols) if twins else pols)


def _golden(doc: dict, path: Path) -> None:
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"render changed; rerun with UPDATE_GOLDEN=1 if intended ({path})"


@pytest.mark.parametrize("name", ["pod-or-namespace", "named-port-from-namespace", "ingress-and-egress-together", "egress-cidr-except"])
def test_golden(name):
    _golden(_render(name), GOLDEN / f"{name}.json")


@pytest.mark.parametrize("name", ["named-port-from-namespace", "ingress-and-egress-together", "egress-cidr-except"])
def test_golden_dual_stack(name):
    """Dual-stack: every pod with an IPv6 address, every ipBlock with its IPv6 twin."""
    _golden(_render(name, dual=True, twins=True), GOLDEN / f"{name}.dual-stack.json")


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


# ----- dual stack ----------------------------------------------------------------------------


def _ipv4_part(doc: dict) -> dict:
    """A render without its IPv6 objects: the ``-v6`` sets and maps and every
    rule that matches an ``ip6`` header field."""
    out = []
    for cmd in doc["nftables"]:
        body = cmd.get("add", {})
        kind = next((k for k in ("set", "map") if k in body), None)
        if kind and body[kind]["name"].endswith("-v6"):
            continue
        if "rule" in body and '"protocol": "ip6"' in json.dumps(body["rule"]["expr"]):
            continue
        out.append(cmd)
    return {"nftables": out}


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_dual_stack_render_is_the_single_stack_one_plus_ipv6_objects(c):
    """Additive: without its IPv6 objects, a dual-stack render is exactly the
    single-stack render of the same policies; with the cluster's families
    given as IPv4 only, dual-stack pods render exactly as single-stack ones."""
    single, dual = c.model(), c.model(dual=True)
    pols = parse_policies(c.manifest(single))
    want = render_node("node-1", pods=single.pods, namespaces=single.namespaces, policies=pols)
    for policies in (pols, with_ipv6_twins(pols)):
        doc = render_node("node-1", pods=dual.pods, namespaces=dual.namespaces, policies=policies)
        assert '"ip6"' in json.dumps(doc) and _ipv4_part(doc) == want
    assert render_node("node-1", pods=dual.pods, namespaces=dual.namespaces, policies=with_ipv6_twins(pols), families=SINGLE_STACK) == want
    text = json.dumps(want)
    assert "ip6" not in text and "ipv6_addr" not in text and "-v6" not in text


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_every_address_rule_has_its_ipv6_twin(c):
    """Both families are enforced on every rule: each rule matching an IPv4
    address (selection sets, named-port sets, verdict maps) is followed by
    the same rule over IPv6 (``ip6``, the ``-v6`` set); an ipBlock's rule is
    its own family's only."""
    dual = c.model(dual=True)
    doc = render_node("node-1", pods=dual.pods, namespaces=dual.namespaces, policies=parse_policies(c.manifest(dual)))
    rules = [cmd["add"]["rule"] for cmd in doc["nftables"] if "rule" in cmd.get("add", {})]
    checked = 0
    for i, r in enumerate(rules):
        if not any(_header(e) == "ip" for e in r["expr"]) or any(_is_block(e) for e in r["expr"]):
            continue
        twin = json.loads(json.dumps(r).replace('"protocol": "ip"', '"protocol": "ip6"').replace('-pods"', '-pods-v6"'))
        for e in twin["expr"]:
            m = e.get("match", {})
            if isinstance(m.get("right"), str) and m["right"].startswith("@"):
                m["right"] += "-v6"
        assert rules[i + 1] == twin, r["comment"]
        checked += 1
    assert checked >= 2  # the verdict maps at least


def _header(e: dict) -> str | None:
    """The address header an expression matches on (``ip``/``ip6``), if any."""
    left = (e.get("match") or e.get("vmap") or {}).get("left") or (e.get("vmap") or {}).get("key") or {}
    parts = left.get("concat", [left])
    return next((p["payload"]["protocol"] for p in parts if p.get("payload", {}).get("protocol") in ("ip", "ip6")), None)


def _is_block(e: dict) -> bool:
    """An ipBlock's match: an address header against a prefix or addresses, not a named set."""
    m = e.get("match")
    return m is not None and _header(e) is not None and not (isinstance(m["right"], str) and m["right"].startswith("@"))


def test_verdict_maps_hold_both_addresses_of_local_isolated_pods():
    model = build_model(dual=True)
    for node in ("node-1", "node-2"):
        doc = _render("default-deny-all", node, dual=True)
        local_x = [p for p in model.pods if p.namespace == "x" and p.node == node]
        assert _map_elems(doc, "ingress-pods") == {str(p.ip): "in-ns-x" for p in local_x}
        assert _map_elems(doc, "ingress-pods-v6") == {str(p.ip_v6): "in-ns-x" for p in local_x}
        assert _map_elems(doc, "egress-pods-v6") == {str(p.ip_v6): "eg-ns-x" for p in local_x}
        maps = {m["name"]: m["type"] for m in _cmds(doc, "add", "map")}
        assert maps == {"egress-pods": "ipv4_addr", "egress-pods-v6": "ipv6_addr", "ingress-pods": "ipv4_addr", "ingress-pods-v6": "ipv6_addr"}
        vmaps = [r["expr"][0]["vmap"] for r in _cmds(doc, "add", "rule") if "vmap" in r["expr"][0]]
        assert [(v["key"]["payload"]["protocol"], v["data"]) for v in vmaps] == [
            ("ip", "@egress-pods"), ("ip6", "@egress-pods-v6"), ("ip", "@ingress-pods"), ("ip6", "@ingress-pods-v6")]


def test_ipv6_ipblock_with_except_matches_ipv6_only():
    m = build_model(dual=True)
    spec = ("  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to:\n"
            "    - ipBlock: {cidr: 'fd12:3456:789a::/64', except: ['fd12:3456:789a::af4:0/120', 'fd12:3456:789a::5/128']}\n"
            "    ports: [{port: 443}]\n")
    pols = parse_policies(np("x", "v6-out", spec))
    doc = render_node("node-1", pods=m.pods, namespaces=m.namespaces, policies=pols)
    (rule,) = [r for r in _cmds(doc, "add", "rule") if r["comment"] == "x/v6-out egress[0]"]
    daddr = {"payload": {"protocol": "ip6", "field": "daddr"}}
    assert rule["expr"] == [
        {"match": {"op": "==", "left": daddr, "right": {"prefix": {"addr": "fd12:3456:789a::", "len": 64}}}},
        {"match": {"op": "!=", "left": daddr, "right": {"set": [{"prefix": {"addr": "fd12:3456:789a::af4:0", "len": 120}}, "fd12:3456:789a::5"]}}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 443}},
        {"accept": None},
    ]
    # single-stack (no pod has an IPv6 address): the IPv6 block renders nothing, the pods stay isolated
    single = build_model()
    doc = render_node("node-1", pods=single.pods, namespaces=single.namespaces, policies=pols)
    assert not [r for r in _cmds(doc, "add", "rule") if r["comment"] == "x/v6-out egress[0]"]
    assert "ip6" not in json.dumps(doc) and _map_elems(doc, "egress-pods")


def test_named_port_sets_per_family():
    doc = _render("named-port-from-namespace", dual=True)
    sets = {s["name"]: s for s in _cmds(doc, "add", "set")}
    v4, v6 = sets["np-tcp-serve-80-tcp"], sets["np-tcp-serve-80-tcp-v6"]
    assert v6["type"] == ["ipv6_addr", "inet_service"]
    pods = build_model(dual=True).pods
    assert {tuple(e["concat"]) for e in v4["elem"]} == {(str(p.ip), 80) for p in pods}
    assert {tuple(e["concat"]) for e in v6["elem"]} == {(str(p.ip_v6), 80) for p in pods}
    lefts = [e["match"]["left"]["concat"][0] for r in _cmds(doc, "add", "rule") for e in r["expr"] if "concat" in e.get("match", {}).get("left", {})]
    assert lefts == [{"payload": {"protocol": "ip", "field": "daddr"}}, {"payload": {"protocol": "ip6", "field": "daddr"}}]


def test_render_families():
    single, dual = build_model(), build_model(dual=True)
    assert render_families(single.pods) == SINGLE_STACK
    assert render_families(dual.pods) == DUAL_STACK  # inferred: some pod has an IPv6 address
    assert render_families(single.pods, [IPFamily.ipv6, IPFamily.ipv4]) == DUAL_STACK  # given: the cluster's, IPv4 first
    assert render_families(dual.pods, SINGLE_STACK) == SINGLE_STACK
    # a dual-stack cluster renders its IPv6 objects before any pod has an address: the structure depends on policies only
    c = case("default-deny-all")
    pols = parse_policies(c.manifest(dual))
    empty = render_node("node-1", pods=[], namespaces=dual.namespaces, policies=pols, families=DUAL_STACK)
    full = render_node("node-1", pods=dual.pods, namespaces=dual.namespaces, policies=pols, families=DUAL_STACK)
    diff = diff_render(empty, full)
    assert diff is not None and {c["add"]["element"]["name"] for c in diff["nftables"]} >= {"ingress-pods-v6", "egress-pods-v6"}


def test_dual_stack_label_change_and_new_pod_are_element_diffs():
    c = case("updated-pod-labels")
    before, after = build_model(dual=True), c.model(dual=True)
    pols = parse_policies(c.manifest(after))
    old = render_node("node-1", pods=before.pods, namespaces=before.namespaces, policies=pols)
    new = render_node("node-1", pods=after.pods, namespaces=after.namespaces, policies=pols)
    xb = after.pod("x/b")
    adds = {(c["add"]["element"]["name"], json.dumps(c["add"]["element"]["elem"])) for c in diff_render(old, new)["nftables"]}
    (v4_set,) = _sets_with(new, str(xb.ip)) - _sets_with(old, str(xb.ip))
    assert adds == {(v4_set, json.dumps([str(xb.ip)])), (v4_set + "-v6", json.dumps([str(xb.ip_v6)]))}
    assert [next(iter(c)) for c in diff_render(new, old)["nftables"]] == ["delete", "delete"]
    # a new dual-stack pod in an isolated namespace: both verdict maps of both families gain it
    d = case("default-deny-all")
    pols = parse_policies(d.manifest(before))
    newpod = PodInfo("x", "d", IPv4Address("10.244.1.99"), "node-1", {"pod": "d"}, ip_v6=IPv6Address("fd12:3456:789a:0:1::99"))
    a = render_node("node-1", pods=before.pods, namespaces=before.namespaces, policies=pols)
    b = render_node("node-1", pods=(*before.pods, newpod), namespaces=before.namespaces, policies=pols)
    names = {c["add"]["element"]["name"] for c in diff_render(a, b)["nftables"]}
    assert {"ingress-pods", "egress-pods", "ingress-pods-v6", "egress-pods-v6"} <= names
