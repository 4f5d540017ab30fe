"""Parsing, API defaulting, validation (field paths) and the JSON round trip."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from overlaycni.datastore import KV
from overlaycni.datastore.keys import pod_key, policy_key
from overlaycni.errors import BadRecord, ConfigError
from overlaycni.families import IPFamily
from overlaycni.policy import parse_policies, policy_to_dict
from overlaycni.policy.model import IPBlock, NamespaceInfo, PodInfo, PolicyPort
from overlaycni.policy.records import (
    decode_pod,
    decode_policy,
    encode,
    namespace_from_dict,
    namespace_to_dict,
    parse_named_port,
    pod_from_dict,
    pod_to_dict,
)
from overlaycni.policy.selectors import LabelSelector, Requirement, parse_selector
from tests.policy_cases import CASES


def _stored(value: dict, key: str = "/overlaycni/clusters/c1/x") -> KV:
    return KV(key, encode(value), 7)


HEAD = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: x\n"


def errors_of(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_policies(text)
    return {e.field: e.message for e in info.value.errors}


def test_policy_types_default_ingress_only():
    (p,) = parse_policies(HEAD + "spec:\n  podSelector: {}\n  ingress: [{}]\n")
    assert p.policy_types == ("Ingress",)


def test_policy_types_default_adds_egress_when_egress_non_empty():
    (p,) = parse_policies(HEAD + "spec:\n  podSelector: {}\n  egress: [{}]\n")
    assert p.policy_types == ("Ingress", "Egress")
    (p,) = parse_policies(HEAD + "spec:\n  podSelector: {}\n  egress: []\n")
    assert p.policy_types == ("Ingress",)


def test_protocol_defaults_to_tcp_and_namespace_to_default():
    text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  ingress:\n  - ports: [{port: 80}]\n"
    (p,) = parse_policies(text)
    assert p.namespace == "default"
    assert p.ingress[0].ports == (PolicyPort("TCP", 80, None),)
    assert p.pod_selector.empty


def test_multi_document_and_list_kind():
    docs = HEAD + "spec: {}\n---\n---\n" + HEAD.replace("name: p", "name: q") + "spec: {}\n"
    assert [p.name for p in parse_policies(docs)] == ["p", "q"]
    lst = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n  metadata: {name: r, namespace: y}\n  spec: {}\n"
    assert [p.key for p in parse_policies(lst)] == ["y/r"]
    assert parse_policies("") == []


@pytest.mark.parametrize(
    "spec, field, words",
    [
        ("  ingress:\n  - ports:\n    - {port: 80}\n    - {port: 90, endPort: 85}\n", "spec.ingress[0].ports[1].endPort", "greater than or equal"),
        ("  ingress:\n  - ports:\n    - {endPort: 85}\n", "spec.ingress[0].ports[0].endPort", "requires port"),
        ("  ingress:\n  - ports:\n    - {port: http, endPort: 85}\n", "spec.ingress[0].ports[0].endPort", "named port"),
        ("  ingress:\n  - ports:\n    - {port: 70000}\n", "spec.ingress[0].ports[0].port", "between 1 and 65535"),
        ("  ingress:\n  - ports:\n    - {port: Bad_Name}\n", "spec.ingress[0].ports[0].port", "not a valid port name"),
        ("  ingress:\n  - ports:\n    - {protocol: ICMP}\n", "spec.ingress[0].ports[0].protocol", "TCP, UDP, SCTP"),
        ("  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/33}\n", "spec.egress[0].to[0].ipBlock.cidr", "not a valid CIDR"),
        ("  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0}\n", "spec.egress[0].to[0].ipBlock.cidr", "not a CIDR"),
        ("  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}\n", "spec.egress[0].to[0].ipBlock.except[0]", "strict subset"),
        ("  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}\n", "spec.egress[0].to[0].ipBlock.except[0]", "strict subset"),
        ("  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/8}\n      podSelector: {}\n", "spec.egress[0].to[0].ipBlock", "may not be combined"),
        # IPv6 ipBlocks: the same rules, and the family of except
        ("  ingress:\n  - from:\n    - ipBlock: {cidr: 'fd00::/129'}\n", "spec.ingress[0].from[0].ipBlock.cidr", "not a valid CIDR"),
        ("  ingress:\n  - from:\n    - ipBlock: {cidr: 'fd00::1'}\n", "spec.ingress[0].from[0].ipBlock.cidr", "not a CIDR"),
        ("  ingress:\n  - from:\n    - ipBlock: {cidr: 'fd00::/64', except: ['fd01::/80']}\n", "spec.ingress[0].from[0].ipBlock.except[0]", "strict subset"),
        ("  ingress:\n  - from:\n    - ipBlock: {cidr: 'fd00::/64', except: ['fd00::/64']}\n", "spec.ingress[0].from[0].ipBlock.except[0]", "strict subset"),
        ("  ingress:\n  - from:\n    - ipBlock: {cidr: 'fd00::/64', except: ['fd00::/96', 10.0.0.0/8]}\n", "spec.ingress[0].from[0].ipBlock.except[1]", "IPv4 but cidr fd00::/64 is IPv6"),
        ("  egress:\n  - to:\n    - ipBlock: {cidr: 0.0.0.0/0, except: ['::/0']}\n", "spec.egress[0].to[0].ipBlock.except[0]", "except must be of the cidr's family"),
        ("  egress:\n  - to:\n    - ipBlock: {cidr: 'fe80::%eth0/64'}\n", "spec.egress[0].to[0].ipBlock.cidr", "zone"),
        ("  egress:\n  - to:\n    - ipBlock: {cidr: '::ffff:10.0.0.0/104'}\n", "spec.egress[0].to[0].ipBlock.cidr", "IPv4-mapped IPv6 CIDR, which no packet carries: write 10.0.0.0/8"),
        ("  egress:\n  - to:\n    - ipBlock: {cidr: 'fd00::/64', except: ['::ffff:10.0.0.0/104']}\n", "spec.egress[0].to[0].ipBlock.except[0]", "IPv4-mapped"),
        ("  ingress:\n  - from:\n    - {}\n", "spec.ingress[0].from[0]", "must set"),
        ("  podSelector:\n    matchExpressions:\n    - {key: a, operator: Equals, values: [b]}\n", "spec.podSelector.matchExpressions[0].operator", "not one of"),
        ("  podSelector:\n    matchExpressions:\n    - {key: a, operator: In}\n", "spec.podSelector.matchExpressions[0].values", "non-empty"),
        ("  podSelector:\n    matchExpressions:\n    - {key: a, operator: Exists, values: [b]}\n", "spec.podSelector.matchExpressions[0].values", "must be empty"),
        ("  podSelector:\n    matchLabels: {'bad key!': x}\n", "spec.podSelector.matchLabels.bad key!", "label key"),
        ("  podSelector:\n    matchLabels: {app: 5}\n", "spec.podSelector.matchLabels.app", "must be a string"),
        ("  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabel: {a: b}\n", "spec.ingress[0].from[0].namespaceSelector.matchLabel", "unknown field"),
        ("  podselector: {}\n", "spec.podselector", "unknown field"),
        ("  policyTypes: [Ingress, Sideways]\n", "spec.policyTypes[1]", "not Ingress or Egress"),
        ("  policyTypes: [Ingress, Ingress]\n", "spec.policyTypes[1]", "twice"),
    ],
)
def test_validation_names_the_field(spec, field, words):
    errs = errors_of(HEAD + "spec:\n" + spec)
    assert field in errs, errs
    assert words in errs[field]


def test_all_problems_reported_at_once_with_document_names():
    text = HEAD + "spec:\n  ingress:\n  - ports: [{port: 0}]\n---\n" + HEAD.replace("name: p", "name: q") + "spec:\n  egress:\n  - to: [{ipBlock: {cidr: nope}}]\n"
    with pytest.raises(ConfigError) as info:
        parse_policies(text)
    errs = info.value.errors
    assert [(e.document, e.field) for e in errs] == [
        ("document 1 (x/p)", "spec.ingress[0].ports[0].port"),
        ("document 2 (x/q)", "spec.egress[0].to[0].ipBlock.cidr"),
    ]
    assert str(errs[0]).startswith("document 1 (x/p): spec.ingress[0].ports[0].port: ")


def test_bad_yaml_kind_metadata_and_duplicates():
    assert "yaml" in errors_of("a: [")
    assert "kind" in errors_of(HEAD.replace("NetworkPolicy", "Pod") + "spec: {}\n")
    assert "apiVersion" in errors_of(HEAD.replace("networking.k8s.io/v1", "extensions/v1beta1") + "spec: {}\n")
    assert "metadata.name" in errors_of("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nspec: {}\n")
    assert "metadata.name" in errors_of(HEAD + "spec: {}\n---\n" + HEAD + "spec: {}\n")
    assert "document" in errors_of("- 1\n- 2\n")


def test_ipblock_host_bits_are_masked_like_the_api_server():
    (p,) = parse_policies(HEAD + "spec:\n  egress:\n  - to:\n    - ipBlock: {cidr: 10.1.2.3/16, except: [10.1.2.0/24]}\n")
    assert p.egress[0].peers[0].ip_block == IPBlock(ip_network("10.1.0.0/16"), (ip_network("10.1.2.0/24"),))


def test_ipv6_ipblock_parses_masks_host_bits_and_round_trips():
    (p,) = parse_policies(
        HEAD + "spec:\n  ingress:\n  - from:\n    - ipBlock: {cidr: 'FD12:3456:789A::5/64', except: ['fd12:3456:789a::5/128']}\n"
        "    - ipBlock: {cidr: 10.244.0.0/16}\n"
    )
    v6, v4 = (peer.ip_block for peer in p.ingress[0].peers)
    assert v6 == IPBlock(ip_network("fd12:3456:789a::/64"), (ip_network("fd12:3456:789a::5/128"),))
    assert (v6.family, v4.family) == (IPFamily.ipv6, IPFamily.ipv4)
    assert policy_to_dict(p)["spec"]["ingress"][0]["from"][0] == {
        "ipBlock": {"cidr": "fd12:3456:789a::/64", "except": ["fd12:3456:789a::5/128"]}
    }
    assert decode_policy(_stored(policy_to_dict(p))) == p
    # a block matches its own family only: the IPv6 one never an IPv4 address, and the other way round
    assert v6.contains(ip_address("fd12:3456:789a::6")) and not v6.contains(ip_address("fd12:3456:789a::5"))
    assert not v6.contains(ip_address("10.244.0.5")) and not v4.contains(ip_address("fd12:3456:789a::6"))
    assert not v6.contains(None)


def _net(version, addr, plen):
    kind, bits = (IPv4Network, 32) if version == 4 else (IPv6Network, 128)
    return kind((addr % (1 << bits), min(plen, bits)), strict=False)


# both families, with prefixes near each other's so that subsets, equal and disjoint pairs all occur
nets = st.one_of(
    st.builds(_net, st.sampled_from([4, 6]), st.integers(0, (1 << 128) - 1), st.integers(0, 128)),
    st.builds(lambda v, plen: _net(v, 0xFD12 << 112 if v == 6 else 10 << 24, plen), st.sampled_from([4, 6]), st.integers(0, 128)),
)


@settings(max_examples=300, deadline=None)
@given(cidr=nets, excepts=st.lists(nets, max_size=3), probe=st.integers(0, (1 << 128) - 1))
def test_ipblock_pairs_accepted_exactly_when_except_is_a_strict_subset_of_the_same_family(cidr, excepts, probe):
    """Hypothesis over CIDR pairs of both families: an except entry is
    accepted iff it is of cidr's family and a strict subset of it; every
    other entry is an error naming its index; an accepted block contains an
    address iff ipaddress says it is in cidr and in no except."""
    spec = {"egress": [{"to": [{"ipBlock": {"cidr": str(cidr), "except": [str(e) for e in excepts]}}]}]}
    doc = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p"}, "spec": spec}
    good = [e.version == cidr.version and e.subnet_of(cidr) and e.prefixlen > cidr.prefixlen for e in excepts]
    mapped = [n.version == 6 and n.prefixlen >= 96 and n.network_address.ipv4_mapped is not None for n in (cidr, *excepts)]
    try:
        (p,) = parse_policies(yaml.safe_dump(doc))
    except ConfigError as exc:
        fields = {e.field for e in exc.errors}
        path = "spec.egress[0].to[0].ipBlock"
        if mapped[0]:
            assert fields == {f"{path}.cidr"}
            return
        assert fields == {f"{path}.except[{i}]" for i, ok in enumerate(good) if not ok or mapped[i + 1]}
        return
    assert all(good) and not any(mapped)
    block = p.egress[0].peers[0].ip_block
    assert block.cidr == cidr and block.except_ == tuple(excepts)
    same, other = (IPv4Address, IPv6Address) if cidr.version == 4 else (IPv6Address, IPv4Address)
    for ip in (cidr.network_address, cidr.broadcast_address, same(probe % (1 << (32 if cidr.version == 4 else 128)))):
        expect = ip in cidr and not any(ip in e for e in excepts)
        assert block.contains(ip) is expect
        assert block.contains(other(int(ip) % (1 << 32))) is False  # the other family: never


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_round_trip_through_dict_and_json(c):
    from tests.policy_cases import build_model, with_ipv6_twins

    for p in parse_policies(c.manifest(build_model())):
        again = decode_policy(_stored(policy_to_dict(p)))
        assert again == p
    for p in with_ipv6_twins(parse_policies(c.manifest(build_model(dual=True)))):  # the IPv6 twins of every ipBlock
        again = decode_policy(_stored(policy_to_dict(p)))
        assert again == p


def test_pod_and_namespace_codec():
    pod = PodInfo("x", "a", IPv4Address("10.244.1.5"), "n1", {"pod": "a"}, (parse_named_port("serve-80-udp=80/udp"),))
    assert decode_pod(_stored(pod_to_dict(pod))) == pod
    ns = NamespaceInfo("x", {"ns": "x"})
    assert ns.labels["kubernetes.io/metadata.name"] == "x"
    assert namespace_from_dict(namespace_to_dict(ns)) == ns
    assert pod_key("c1", namespace="x", name="a") == "/overlaycni/clusters/c1/pods/x/a"
    assert policy_key("c1", namespace="x", name="p") == "/overlaycni/clusters/c1/policies/x/p"
    with pytest.raises(ConfigError) as info:
        pod_from_dict({"namespace": "x", "name": "a", "ip": "10.0.0.300", "ports": ["http=99999/TCP"], "labels": {"a": "b c"}})
    assert {e.field for e in info.value.errors} == {"pod.ip", "pod.ports[0]", "pod.labels.a"}
    with pytest.raises(BadRecord) as bad:
        decode_pod(KV(pod_key("c1", namespace="x", name="a"), "[1]", 9))
    assert (bad.value.key, bad.value.kind, bad.value.problem, bad.value.revision) == (
        "/overlaycni/clusters/c1/pods/x/a", "pod", "not a JSON object", 9)
    with pytest.raises(BadRecord) as bad:
        decode_pod(_stored({"namespace": "x", "name": "a", "ip": "10.0.0.300"}))
    assert bad.value.kind == "pod" and "pod.ip" in bad.value.problem


def test_dual_stack_pod_codec():
    """A dual-stack pod's record carries ``ipv6``; a single-stack one stays
    what it always was (no ``ipv6`` key)."""
    single = PodInfo("x", "a", IPv4Address("10.244.1.5"), "n1", {"pod": "a"})
    assert "ipv6" not in pod_to_dict(single) and single.ips == (IPv4Address("10.244.1.5"),)
    assert single.address(IPFamily.ipv6) is None
    dual = PodInfo("x", "a", IPv4Address("10.244.1.5"), "n1", {"pod": "a"}, ip_v6=IPv6Address("fd12:3456:789a:0:1::5"))
    assert pod_to_dict(dual)["ipv6"] == "fd12:3456:789a:0:1::5"
    assert decode_pod(_stored(pod_to_dict(dual))) == dual
    assert dual.ips == (IPv4Address("10.244.1.5"), IPv6Address("fd12:3456:789a:0:1::5"))
    assert dual.address(IPFamily.ipv6) == IPv6Address("fd12:3456:789a:0:1::5")
    for bad in ("10.244.1.6", "fe80::1%eth0", "fd00::/64", "nope"):
        with pytest.raises(ConfigError) as info:
            pod_from_dict({"namespace": "x", "name": "a", "ip": "10.244.1.5", "ipv6": bad})
        (e,) = info.value.errors
        assert e.field == "pod.ipv6" and "not an IPv6 address" in e.message, bad
    with pytest.raises(ConfigError) as info:  # an IPv6 address is not an ip
        pod_from_dict({"namespace": "x", "name": "a", "ip": "fd00::5"})
    assert [e.field for e in info.value.errors] == ["pod.ip"]


# ----- matchExpressions against a straightforward reference --------------------------------

KEYS = st.sampled_from(["a", "b", "c"])
VALS = st.sampled_from(["1", "2", "3"])


def reference(labels, match_labels, exprs):
    for k, v in match_labels.items():
        if k not in labels or labels[k] != v:
            return False
    for key, op, values in exprs:
        has = key in labels
        if op == "In" and not (has and labels[key] in values):
            return False
        if op == "NotIn" and has and labels[key] in values:
            return False
        if op == "Exists" and not has:
            return False
        if op == "DoesNotExist" and has:
            return False
    return True


expr = st.one_of(
    st.tuples(KEYS, st.sampled_from(["In", "NotIn"]), st.lists(VALS, min_size=1, max_size=3)),
    st.tuples(KEYS, st.sampled_from(["Exists", "DoesNotExist"]), st.just([])),
)


@given(
    labels=st.dictionaries(KEYS, VALS, max_size=3),
    match_labels=st.dictionaries(KEYS, VALS, max_size=2),
    exprs=st.lists(expr, max_size=3),
)
def test_selector_matches_like_reference(labels, match_labels, exprs):
    raw = {"matchLabels": match_labels, "matchExpressions": [{"key": k, "operator": o, **({"values": v} if v else {})} for k, o, v in exprs]}
    errors: list = []
    sel = parse_selector(raw, "sel", errors=errors)
    assert not errors
    assert sel.matches(labels) == reference(labels, match_labels, exprs)


def test_equal_selectors_are_canonical():
    e1: list = []
    a = parse_selector({"matchExpressions": [{"key": "b", "operator": "In", "values": ["2", "1"]}, {"key": "a", "operator": "Exists"}]}, "s", errors=e1)
    b = parse_selector({"matchExpressions": [{"key": "a", "operator": "Exists"}, {"key": "b", "operator": "In", "values": ["1", "2"]}]}, "s", errors=e1)
    assert a == b and hash(a) == hash(b) and not e1
    assert a == LabelSelector((), (Requirement("a", "Exists"), Requirement("b", "In", ("1", "2"))))


# ----- bad input never escapes as a traceback ------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=False), st.text(max_size=12),
                    st.sampled_from(["TCP", "In", "Exists", "10.0.0.0/8", "0.0.0.0/0", "::/0", "serve-80-tcp", "Ingress", "Egress"]))
KEYS_SEEN = ["podSelector", "namespaceSelector", "ipBlock", "cidr", "except", "ports", "port", "endPort", "protocol",
             "from", "to", "ingress", "egress", "policyTypes", "matchLabels", "matchExpressions", "key", "operator", "values", "bogus"]
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS_SEEN), inner, max_size=4)), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(spec=junk, meta=st.one_of(st.none(), st.dictionaries(st.sampled_from(["name", "namespace", "labels"]), scalars, max_size=3)))
def test_any_input_is_a_policy_or_a_config_error(spec, meta):
    doc = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec}
    try:
        policies = parse_policies(yaml.safe_dump(doc))
    except ConfigError as exc:
        assert exc.errors and all(e.field and e.message for e in exc.errors)
    else:
        for p in policies:  # whatever parses must survive the datastore round trip
            assert decode_policy(_stored(policy_to_dict(p))) == p
