"""The pure engine against the hand-written conformance tables."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from overlaycni.policy import allowed, matrix, parse_policies
from tests.policy_cases import CASES, ORDER, case


def _show(diff, got):
    return "\n".join(f"{s} -> {d}: expected {'.' if not got[(s, d)] else 'X'}, engine {'.' if got[(s, d)] else 'X'}" for s, d in diff)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_engine_matches_hand_written_truth_table(c):
    model = c.model()
    policies = parse_policies(c.manifest(model))
    got = matrix(list(model.pods), port=c.port, protocol=c.protocol, namespaces=model.namespaces, policies=policies)
    expected = c.expected()
    assert set(got) == set(expected) and len(got) == 81
    diff = [k for k in expected if expected[k] != got[k]]
    assert not diff, _show(diff, got)


def test_at_least_thirty_cases_with_distinct_names():
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)
    assert len(ORDER) == 9


def _verdict(name, src, dst, port=None, proto=None):
    c = case(name)
    m = c.model()
    return allowed(
        m.pod(src), m.pod(dst), port or c.port, proto or c.protocol,
        pods=m.pods, namespaces=m.namespaces, policies=parse_policies(c.manifest(m)),
    )


def test_verdict_names_policy_and_rule_that_allowed():
    v = _verdict("pod-or-namespace", "x/b", "x/a")
    assert v.allowed and v.policy == "x/x-a-pod-or-ns" and v.rule == "ingress[0]"
    assert v.ingress.isolated and not v.egress.isolated


def test_verdict_default_deny_names_isolating_policies():
    v = _verdict("stacked-policies", "y/a", "x/a")
    assert not v.allowed and v.policy is None
    assert v.ingress.policies == ("x/x-a-80-from-z", "x/x-a-81-from-y")
    assert "isolated for ingress" in v.reason


def test_egress_denial_reported_on_the_egress_side():
    v = _verdict("egress-denied-even-if-server-allows", "x/a", "y/b")
    assert not v.allowed and not v.egress.allowed and v.ingress.allowed
    assert v.reason.startswith("egress denied")


def test_unisolated_pair_allowed_by_default():
    v = _verdict("no-policies", "x/a", "z/c")
    assert v.allowed and v.policy is None and "default" in v.reason


def test_loopback_always_allowed():
    assert _verdict("default-deny-all", "x/a", "x/a").allowed


def test_address_of_a_pod_is_that_pod_and_outside_address_only_matches_ipblock():
    c = case("egress-cidr-except")
    m = c.model()
    pols = parse_policies(c.manifest(m))
    kw = dict(pods=m.pods, namespaces=m.namespaces, policies=pols)
    # y/b by address: the except clause applies
    assert not allowed(m.pod("x/a"), m.pod("y/b").ip, 80, "TCP", **kw).allowed
    # an outside address in neither the CIDR: egress denied
    assert not allowed(m.pod("x/a"), IPv4Address("10.1.2.3"), 80, "TCP", **kw).allowed
    assert allowed(m.pod("x/a"), IPv4Address("10.244.200.7"), 80, "TCP", **kw).allowed
    # an outside source is never isolated itself; x/b is not isolated for ingress
    assert allowed(IPv4Address("10.1.2.3"), m.pod("x/b"), 80, "TCP", **kw).allowed


def test_outside_source_matches_only_ipblock_or_all_peers():
    c = case("deny-from-other-namespaces")
    m = c.model()
    kw = dict(pods=m.pods, namespaces=m.namespaces, policies=parse_policies(c.manifest(m)))
    assert not allowed(IPv4Address("10.9.9.9"), m.pod("x/a"), 80, "TCP", **kw).allowed
    c = case("named-port-81-probe-81")  # ports only, no peers: every source
    kw["policies"] = parse_policies(c.manifest(m))
    assert allowed(IPv4Address("10.9.9.9"), m.pod("x/a"), 81, "TCP", **kw).allowed
    # a named port never resolves on a non-pod destination
    v = allowed(m.pod("x/a"), IPv4Address("10.9.9.9"), 80, "TCP", **{**kw, "policies": parse_policies(case("egress-named-port-probe-80").manifest(m))})
    assert not v.allowed
