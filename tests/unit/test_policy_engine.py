"""The pure engine against the hand-written conformance tables."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlaycni.families import IPFamily
from overlaycni.policy import allowed, matrix, parse_policies
from overlaycni.policy.engine import Cluster, connection_family, evaluate
from tests.policy_cases import CASES, ORDER, build_model, case, np, with_ipv6_twins
from tests.policy_strategies import policies, tiers


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


# ----- dual stack ----------------------------------------------------------------------------


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_dual_stack_truth_table_holds_over_both_families(c):
    """Every pod also has an IPv6 address and every ipBlock its IPv6 twin:
    the hand-written table holds over IPv4 and over IPv6."""
    model = c.model(dual=True)
    policies = with_ipv6_twins(parse_policies(c.manifest(model)))
    expected = c.expected()
    for family in IPFamily:
        got = matrix(list(model.pods), port=c.port, protocol=c.protocol, namespaces=model.namespaces, policies=policies, family=family)
        diff = [k for k in expected if expected[k] != got[k]]
        assert not diff, f"{family}:\n" + _show(diff, got)


def _policy(spec: str, ns: str = "x", name: str = "p"):
    return parse_policies(np(ns, name, spec))


def test_ipv6_ipblock_128_admits_that_pod_over_ipv6_only():
    m = build_model(dual=True)
    yb = m.pod("y/b")
    pols = _policy(f"  podSelector:\n    matchLabels: {{pod: a}}\n  ingress:\n  - from:\n    - ipBlock: {{cidr: '{yb.ip_v6}/128'}}\n")
    kw = dict(port=80, protocol="TCP", namespaces=m.namespaces, policies=pols)
    v6 = matrix(list(m.pods), family=IPFamily.ipv6, **kw)
    v4 = matrix(list(m.pods), family=IPFamily.ipv4, **kw)
    assert [s for s in ORDER if v6[(s, "x/a")]] == ["x/a", "y/b"]  # itself (loopback) and y/b
    assert [s for s in ORDER if v4[(s, "x/a")]] == ["x/a"]  # the IPv6 block opens nothing over IPv4
    assert all(v6[k] and v4[k] for k in v6 if k[1] != "x/a")  # nobody else is isolated
    # by address: either address of a pod is that pod, and the address decides the family
    common = dict(pods=m.pods, namespaces=m.namespaces, policies=pols)
    by_v6 = allowed(yb.ip_v6, m.pod("x/a").ip_v6, 80, "TCP", **common)
    assert by_v6.allowed and by_v6.family is IPFamily.ipv6 and by_v6.rule == "ingress[0]" and by_v6.policy == "x/p"
    by_v4 = allowed(yb.ip, m.pod("x/a").ip, 80, "TCP", **common)
    assert not by_v4.allowed and by_v4.family is IPFamily.ipv4 and by_v4.ingress.policies == ("x/p",)
    # an outside IPv6 source is in no block; the pod's own /128 with except of itself admits nobody
    assert not allowed(IPv6Address("fd00::9"), m.pod("x/a"), 80, "TCP", **common).allowed
    pols = _policy(f"  podSelector: {{}}\n  ingress:\n  - from:\n    - ipBlock: {{cidr: 'fd12:3456:789a::/64', except: ['{yb.ip_v6}/128']}}\n")
    v6 = matrix(list(m.pods), port=80, protocol="TCP", namespaces=m.namespaces, policies=pols, family=IPFamily.ipv6)
    assert [s for s in ORDER if not v6[(s, "x/a")]] == ["y/b"]


def test_ipv4_block_never_admits_ipv6_and_zero_zero_is_not_everything():
    """``0.0.0.0/0`` is every IPv4 address, no IPv6 one (Kubernetes: an
    ipBlock matches its own family); ``::/0`` the other way round."""
    m = build_model(dual=True)
    kw = dict(port=80, protocol="TCP", namespaces=m.namespaces)
    for cidr, opens in (("0.0.0.0/0", IPFamily.ipv4), ("'::/0'", IPFamily.ipv6)):
        pols = _policy(f"  podSelector: {{}}\n  ingress:\n  - from:\n    - ipBlock: {{cidr: {cidr}}}\n")
        for family in IPFamily:
            got = matrix(list(m.pods), policies=pols, family=family, **kw)
            into_x = [got[(s, d)] for s in ORDER for d in ORDER if d.startswith("x/") and s != d]
            assert all(into_x) if family is opens else not any(into_x), (cidr, family)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=policies, tiers=tiers, probe=st.sampled_from([(80, "TCP"), (81, "UDP"), (80, "UDP"), (81, "SCTP")]))
def test_verdict_is_the_same_over_a_pods_ipv4_and_ipv6_address(docs, tiers, probe):
    """Random policies, each ipBlock with its IPv6 twin: for every pair the
    verdict (allowed, deciding policy and rule) over the pods' IPv6 addresses
    equals the one over their IPv4 addresses, and both equal the verdict the
    single-stack cluster gets from the policies without twins."""
    labels = {k: {"pod": k[-1], "tier": t} for k, t in tiers.items()}
    single, dual = build_model(pod_labels=labels), build_model(pod_labels=labels, dual=True)
    pols = parse_policies(yaml.safe_dump_all(list(docs)))
    twins = with_ipv6_twins(pols)
    port, protocol = probe
    old = Cluster.of(single.pods, single.namespaces)
    new = Cluster.of(dual.pods, dual.namespaces)
    for s in dual.pods:
        for d in dual.pods:
            v4 = evaluate(s.ip, d.ip, port, protocol, policies=twins, cluster=new)
            v6 = evaluate(s.ip_v6, d.ip_v6, port, protocol, policies=twins, cluster=new)
            before = evaluate(s.ip, d.ip, port, protocol, policies=pols, cluster=old)
            assert (v4.family, v6.family) == (IPFamily.ipv4, IPFamily.ipv6)
            assert (v6.allowed, v6.policy, v6.rule) == (v4.allowed, v4.policy, v4.rule) == (before.allowed, before.policy, before.rule), (s.key, d.key)


def test_connection_family():
    m = build_model(dual=True)
    a = m.pod("x/a")
    assert connection_family(a, a) is IPFamily.ipv4
    assert connection_family(a, a, IPFamily.ipv6) is IPFamily.ipv6
    assert connection_family(a.ip_v6, a) is IPFamily.ipv6
    for bad in ((a.ip, a.ip_v6, None), (a.ip, a, IPFamily.ipv6)):
        with pytest.raises(ValueError):
            connection_family(*bad)
    assert Cluster.of(m.pods, m.namespaces).pods_by_ip[a.ip_v6] is a
