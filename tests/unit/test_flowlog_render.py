"""Flow log rules in the policy render (``policy.flowlog``): golden files,
what changes and what does not, prefixes and their map back to policies.

Regenerate the golden files with ``UPDATE_GOLDEN=1``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from overlaycni.policy import parse_policies
from overlaycni.policy.flowlog import (
    FlowLogSpec,
    LogTag,
    RuleRef,
    parse_prefix,
    rule_index,
)
from overlaycni.policy.render import diff_render, render_node
from tests.policy_cases import build_model, case

GOLDEN = Path(__file__).parent / "golden" / "policy"
SPEC = FlowLogSpec()


def _render(name: str, node: str = "node-1", *, flow_log: FlowLogSpec | None = SPEC, pods=None) -> dict:
    c = case(name)
    m = c.model()
    return render_node(
        node, pods=pods if pods is not None else m.pods, namespaces=m.namespaces,
        policies=parse_policies(c.manifest(m)), flow_log=flow_log,
    )  # fmt: skip


def _rules(doc: dict, chain: str) -> list[dict]:
    return [c["add"]["rule"] for c in doc["nftables"] if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain]


def _map(doc: dict, name: str) -> dict[str, str]:
    m = next(c["add"]["map"] for c in doc["nftables"] if c.get("add", {}).get("map", {}).get("name") == name)
    return {ip: v["jump"]["target"] for ip, v in m.get("elem", [])}


@pytest.mark.parametrize("name", ["ingress-and-egress-together", "egress-cidr-except"])
def test_golden_with_flow_logs(name):
    text = json.dumps(_render(name), indent=1, sort_keys=True) + "\n"
    path = GOLDEN / f"{name}.flowlog.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"render changed; rerun with UPDATE_GOLDEN=1 if intended ({path})"


@pytest.mark.parametrize("name", ["pod-or-namespace", "named-port-from-namespace", "ingress-and-egress-together", "egress-cidr-except"])
def test_flow_logs_off_is_todays_table(name):
    """Off renders byte for byte the golden file without logs."""
    text = json.dumps(_render(name, flow_log=None), indent=1, sort_keys=True) + "\n"
    assert text == (GOLDEN / f"{name}.json").read_text()
    assert "log" not in json.dumps(_render(name, flow_log=None))


def test_every_decision_ends_in_a_log_chain_with_the_same_verdict():
    doc = _render("ingress-and-egress-together")
    off = _render("ingress-and-egress-together", flow_log=None)
    # the policy chains' rules differ only in their verdict: goto the rule's log chain instead of accept
    chains = {c["add"]["chain"]["name"] for c in off["nftables"] if "chain" in c.get("add", {})}
    policy_chains = [c for c in chains if re.fullmatch(r"(in|eg)-[0-9a-f]{12}", c)]
    assert policy_chains
    for chain in policy_chains:
        for a, b in zip(_rules(off, chain), _rules(doc, chain), strict=True):
            assert a["expr"][:-1] == b["expr"][:-1] and a["expr"][-1] == {"accept": None}
            target = b["expr"][-1]["goto"]["target"]
            assert _rules(doc, target)[-1]["expr"][-1] == {"accept": None}
            assert _rules(doc, target)[-1]["comment"] == a["comment"]  # names the policy rule
    for direction in ("in", "eg"):
        last = _rules(doc, f"{direction}-ns-x")[-1]
        assert last["expr"] == [{"goto": {"target": f"fl-{direction}-deny"}}]
        deny = _rules(doc, f"fl-{direction}-deny")
        assert all(r["expr"][-1] == {"drop": None} for r in deny)  # every path drops
        assert {"log": {"prefix": f"ocni:deny:{direction}", "group": SPEC.group}} in deny[-1]["expr"]


def test_log_chain_order_and_limits():
    doc = _render("ingress-and-egress-together")
    rules = _rules(doc, "fl-in-default")
    first = rules[0]["expr"][0]["match"]
    assert (first["left"], first["op"], first["right"]) == ({"ct": {"key": "state"}}, "!=", "new")
    assert rules[1]["expr"][0]["match"]["left"] == {"&": [{"ct": {"key": "mark"}}, SPEC.mark_ingress]}
    update = rules[2]["expr"][0]["set"]
    assert update["op"] == "update" and update["set"] == "@flowlog-rl"
    assert update["stmt"] == [{"limit": {"rate": SPEC.rate, "burst": SPEC.burst, "per": "second", "inv": True}}]
    assert rules[2]["expr"][1] == {"counter": "flowlog-ratelimited"}
    assert rules[3]["expr"][:2] == [{"limit": "flowlog-cap"}, {"counter": "flowlog-ratelimited"}]
    mark, logged, verdict = rules[4]["expr"]
    assert mark["mangle"]["value"] == {"|": [{"ct": {"key": "mark"}}, SPEC.mark_ingress]}
    assert logged == {"log": {"prefix": "ocni:allow:in:default", "group": SPEC.group}} and verdict == {"accept": None}
    objects = {k: c["add"][k]["name"] for c in doc["nftables"] for k in ("counter", "limit") if k in c.get("add", {})}
    assert objects == {"counter": "flowlog-ratelimited", "limit": "flowlog-cap"}


def test_verdict_maps_send_every_local_pod_somewhere_and_no_remote_pod():
    model = build_model()
    doc = _render("ingress-and-egress-independent", "node-2")  # x/b isolated for ingress on node-2
    local = {str(p.ip) for p in model.pods if p.node == "node-2"}
    ingress = _map(doc, "ingress-pods")
    assert set(ingress) == local
    assert ingress[str(model.pod("x/b").ip)] == "in-ns-x"
    assert {v for k, v in ingress.items() if k != str(model.pod("x/b").ip)} == {"fl-in-default"}
    assert set(_map(doc, "egress-pods")) == local


def test_new_pod_and_label_change_stay_element_diffs():
    model = build_model()
    old = _render("ingress-and-egress-together")
    extra = replace(model.pod("x/a"), name="d", ip=model.pod("x/a").ip + 100)
    new = _render("ingress-and-egress-together", pods=[*model.pods, extra])
    diff = diff_render(old, new)
    assert diff is not None and diff["nftables"], "a new pod is an element update"
    relabelled = [replace(p, labels={**p.labels, "pod": "zz"}) if p.key == "x/a" else p for p in model.pods]
    assert diff_render(old, _render("ingress-and-egress-together", pods=relabelled)) is not None


def test_prefixes_round_trip_and_foreign_ones_are_refused():
    pols = parse_policies(case("ingress-and-egress-together").manifest(build_model()))
    index = rule_index(pols)
    ref = next(iter(index.values()))
    d = ref.digest
    assert index[d] == ref and ref.chain.endswith(d) and ref.prefix == f"ocni:allow:{'in' if ref.direction == 'Ingress' else 'eg'}:{d}"
    assert parse_prefix(f"ocni:allow:in:{d}") == LogTag("ingress", "allow", d)
    assert parse_prefix("ocni:allow:eg:default") == LogTag("egress", "allow", None)
    assert parse_prefix("ocni:deny:in") == LogTag("ingress", "deny")
    for bad in ("", "ocni", "ocni:deny:up", "ocni:deny:in:x", "ocni:allow:in", "ocni:allow:in:", "other:deny:in", "ocni:drop:in"):
        assert parse_prefix(bad) is None, bad
    # a digest depends on the policy, direction and rule only
    assert RuleRef("x/p", "Ingress", 0).digest == RuleRef("x/p", "Ingress", 0).digest != RuleRef("x/p", "Ingress", 1).digest
    assert RuleRef("x/p", "Egress", 2).name == "egress[2]"


def test_dual_stack_ipv6_sources_have_their_own_rate_set():
    """In a table of both families, an IPv6 source is rate limited in its own
    set (an ``ip saddr`` update does not match an IPv6 packet); a single-stack
    table has no such set (control)."""
    from overlaycni.families import DUAL_STACK, SINGLE_STACK

    def render(families):
        return render_node("node-1", pods=(), namespaces=(), policies=(), flow_log=FlowLogSpec(), families=families)

    def rate_sets(doc):
        return {c["add"]["set"]["name"]: c["add"]["set"]["type"] for c in doc["nftables"]
                if "set" in c.get("add", {}) and "timeout" in (c["add"]["set"].get("flags") or ())}  # fmt: skip

    assert rate_sets(render(DUAL_STACK)) == {"flowlog-rl": "ipv4_addr", "flowlog-rl6": "ipv6_addr"}
    assert rate_sets(render(SINGLE_STACK)) == {"flowlog-rl": "ipv4_addr"}
    deny = [c["add"]["rule"] for c in render(DUAL_STACK)["nftables"]
            if c.get("add", {}).get("rule", {}).get("chain") == "fl-in-deny"]  # fmt: skip
    updates = [e["set"] for r in deny for e in r["expr"] if "set" in e]
    assert [(u["set"], u["elem"]["payload"]["protocol"]) for u in updates] == [("@flowlog-rl", "ip"), ("@flowlog-rl6", "ip6")]
