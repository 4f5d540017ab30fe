"""Hypothesis strategies for NetworkPolicy tests over the x/y/z model
(``policy_cases``): random selectors, peers (ipBlocks of IPv4, and with
``ipv6=True`` of IPv6 too, over the model's pod addresses and their IPv6
twins), ports, rules and policies as manifests."""

from __future__ import annotations

from hypothesis import strategies as st

from tests.policy_cases import build_model, ipv6_twin

MODEL = build_model()
LABEL_VALUES = {"pod": ["a", "b", "c"], "ns": ["x", "y", "z"], "tier": ["web", "db"]}


def _values(*extra):
    return st.lists(st.sampled_from(["a", "b", "c", "x", "y", *extra]), min_size=1, max_size=2, unique=True)


def requirement(keys):
    return st.one_of(
        st.builds(lambda k, vs: {"key": k, "operator": "In", "values": vs}, st.sampled_from(keys), _values("web")),
        st.builds(lambda k, vs: {"key": k, "operator": "NotIn", "values": vs}, st.sampled_from(keys), _values("db")),
        st.builds(lambda k: {"key": k, "operator": "Exists"}, st.sampled_from(keys)),
        st.builds(lambda k: {"key": k, "operator": "DoesNotExist"}, st.sampled_from(keys)),
    )


def selector(key):
    keys = [key, "tier"]
    return st.one_of(
        st.just({}),
        st.builds(lambda v: {"matchLabels": {key: v}}, st.sampled_from(LABEL_VALUES[key])),
        st.builds(lambda r: {"matchExpressions": r}, st.lists(requirement(keys), min_size=1, max_size=2)),
    )


pod_ips = [str(p.ip) for p in MODEL.pods]
pod_ips_v6 = [str(ipv6_twin(p.ip)) for p in MODEL.pods]
ip_block = st.one_of(
    st.builds(lambda ip: {"cidr": f"{ip}/32"}, st.sampled_from(pod_ips)),
    st.builds(lambda ip: {"cidr": "10.244.0.0/16", "except": [f"{ip}/32"]}, st.sampled_from(pod_ips)),
    st.builds(lambda ip: {"cidr": "0.0.0.0/0", "except": [ip.rsplit(".", 2)[0] + ".0.0/16"]}, st.sampled_from(pod_ips)),
    st.just({"cidr": "10.244.2.0/24"}),
)
# IPv6 blocks over the dual-stack model's addresses (twins of the IPv4 ones, in fd12:3456:789a::/96)
ip_block_v6 = st.one_of(
    st.builds(lambda ip: {"cidr": f"{ip}/128"}, st.sampled_from(pod_ips_v6)),
    st.builds(lambda ip: {"cidr": "fd12:3456:789a::/64", "except": [f"{ip}/128"]}, st.sampled_from(pod_ips_v6)),
    st.builds(lambda ip: {"cidr": "::/0", "except": [f"{ip}/124"]}, st.sampled_from(pod_ips_v6)),
    st.just({"cidr": "fd12:3456:789a::af4:200/120"}),  # the twin of 10.244.2.0/24
)


def peer_strategy(*, ipv6: bool = False):
    """A peer; with ``ipv6``, half of them ipBlocks of either family (an
    ipBlock decides a verdict less often than a selector does)."""
    selectors = [
        st.builds(lambda s: {"podSelector": s}, selector("pod")),
        st.builds(lambda s: {"namespaceSelector": s}, selector("ns")),
        st.builds(lambda p, n: {"podSelector": p, "namespaceSelector": n}, selector("pod"), selector("ns")),
    ]
    if not ipv6:
        return st.one_of(*selectors, st.builds(lambda b: {"ipBlock": b}, ip_block))
    blocks = [st.builds(lambda b: {"ipBlock": b}, ip_block), st.builds(lambda b: {"ipBlock": b}, ip_block_v6)]
    return st.one_of(*selectors, *blocks, blocks[1])


peer = peer_strategy()
port = st.one_of(
    st.builds(lambda p, proto: {"port": p, "protocol": proto}, st.sampled_from([80, 81]), st.sampled_from(["TCP", "UDP"])),
    st.builds(lambda proto: {"protocol": proto}, st.sampled_from(["TCP", "UDP", "SCTP"])),
    st.builds(
        lambda n, proto: {"port": n, "protocol": proto},
        st.sampled_from(["serve-80-tcp", "serve-81-udp", "serve-80-udp"]),
        st.sampled_from(["TCP", "UDP"]),
    ),
    st.just({"port": 79, "endPort": 80}),
)


def rule_strategy(*, ipv6: bool = False):
    return st.fixed_dictionaries(
        {}, optional={"ports": st.lists(port, max_size=2), "peers": st.lists(peer_strategy(ipv6=ipv6), max_size=2)}
    )


def policy(i, *, ipv6: bool = False):
    rule = rule_strategy(ipv6=ipv6)

    def rules(rs, peers_key):
        return [{**({"ports": r["ports"]} if "ports" in r else {}), **({peers_key: r["peers"]} if "peers" in r else {})} for r in rs]

    return st.builds(
        lambda ns, sel, types, ing, eg: {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": f"p{i}", "namespace": ns},
            "spec": {
                "podSelector": sel,
                **({"policyTypes": types} if types else {}),
                "ingress": rules(ing, "from"),
                "egress": rules(eg, "to"),
            },
        },
        st.sampled_from(["x", "y", "z"]),
        selector("pod"),
        st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]]),
        st.lists(rule, max_size=2),
        st.lists(rule, max_size=2),
    )


def policies_strategy(*, ipv6: bool = False):
    """One to three policies; ``ipv6``: their ipBlocks may be IPv6 too."""
    return st.integers(1, 3).flatmap(lambda n: st.tuples(*[policy(i, ipv6=ipv6) for i in range(n)]))


policies = policies_strategy()
tiers = st.dictionaries(st.sampled_from([p.key for p in MODEL.pods]), st.sampled_from(["web", "db"]), max_size=4)
ns_tiers = st.dictionaries(st.sampled_from(["x", "y", "z"]), st.sampled_from(["web", "db"]), max_size=2)
