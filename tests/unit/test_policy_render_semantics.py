"""The render means what the engine says, for random policies, without a kernel.

A small evaluator of the nft JSON subset the renderer emits (payload / meta /
ct / concat matches, named and anonymous sets, prefixes, ranges, verdict
maps, jump / accept / drop, base chains in priority order) runs each new
connection through the source node's table and then the destination node's
table. Hypothesis generates policies and labels over the x/y/z model; every
ordered pair must get the engine's verdict. The kernel test checks the same
renders with real packets; this one explores many more policies.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlaycni.policy import matrix, parse_policies
from overlaycni.policy.render import render_node
from tests.policy_cases import build_model, case


class Table:
    def __init__(self, doc: dict) -> None:
        self.chains: dict[str, list[list[dict]]] = {}
        self.base: list[tuple[int, str, str]] = []
        self.sets: dict[str, set] = {}
        self.maps: dict[str, dict[str, str]] = {}
        for cmd in doc["nftables"]:
            add = cmd.get("add", {})
            if "chain" in add:
                c = add["chain"]
                self.chains[c["name"]] = []
                if "hook" in c:
                    self.base.append((c["prio"], c["name"], c["policy"]))
            elif "set" in add:
                self.sets[add["set"]["name"]] = {
                    tuple(e["concat"]) if isinstance(e, dict) else e for e in add["set"].get("elem", [])
                }
            elif "map" in add:
                self.maps[add["map"]["name"]] = {k: v["jump"]["target"] for k, v in add["map"].get("elem", [])}
            elif "rule" in add:
                self.chains[add["rule"]["chain"]].append(add["rule"]["expr"])
        self.base.sort()

    # --- expressions ---------------------------------------------------------------

    def value(self, left: dict, pkt: dict):
        if "payload" in left:
            p = left["payload"]
            if p["protocol"] == "ip":
                return pkt[p["field"]]
            return pkt["dport"] if pkt["proto"] == p["protocol"] else None
        if "meta" in left:
            return pkt["proto"]
        if "ct" in left:
            return "new"
        if "concat" in left:
            parts = tuple(self.value(x, pkt) for x in left["concat"])
            return None if None in parts else parts
        raise AssertionError(f"unknown expression {left}")

    def contains(self, right, v) -> bool:
        if isinstance(right, str) and right.startswith("@"):
            return v in self.sets[right[1:]]
        if isinstance(right, dict) and "set" in right:
            return any(self.contains(item, v) for item in right["set"])
        if isinstance(right, dict) and "prefix" in right:
            net = IPv4Network(f"{right['prefix']['addr']}/{right['prefix']['len']}")
            return IPv4Address(v) in net
        if isinstance(right, dict) and "range" in right:
            lo, hi = right["range"]
            return lo <= v <= hi
        if isinstance(right, list):
            return v in right
        return v == right

    def matches(self, m: dict, pkt: dict) -> bool:
        v = self.value(m["left"], pkt)
        if v is None:  # a transport field of another protocol: the rule cannot match
            return False
        hit = self.contains(m["right"], v)
        return not hit if m["op"] == "!=" else hit

    # --- statements --------------------------------------------------------------------

    def run(self, chain: str, pkt: dict) -> str | None:
        for expr in self.chains[chain]:
            verdict = None
            for e in expr:
                if "match" in e:
                    if not self.matches(e["match"], pkt):
                        break
                elif "accept" in e:
                    return "accept"
                elif "drop" in e:
                    return "drop"
                elif "jump" in e:
                    verdict = self.run(e["jump"]["target"], pkt)
                    if verdict:
                        return verdict
                elif "vmap" in e:
                    target = self.maps[e["vmap"]["data"][1:]].get(self.value(e["vmap"]["key"], pkt))
                    if target:
                        verdict = self.run(target, pkt)
                        if verdict:
                            return verdict
                else:
                    raise AssertionError(f"unknown statement {e}")
        return None

    def passes(self, pkt: dict) -> bool:
        return all((self.run(name, pkt) or policy) != "drop" for _, name, policy in self.base)


def rendered_matrix(model, policies, port: int, protocol: str) -> dict[tuple[str, str], bool]:
    tables = {
        n: Table(render_node(n, pods=model.pods, namespaces=model.namespaces, policies=policies))
        for n in {p.node for p in model.pods}
    }
    out = {}
    for s in model.pods:
        for d in model.pods:
            if s.ip == d.ip:
                out[(s.key, d.key)] = True  # loopback never reaches the node
                continue
            pkt = {"saddr": str(s.ip), "daddr": str(d.ip), "proto": protocol.lower(), "dport": port}
            nodes = [s.node] if s.node == d.node else [s.node, d.node]
            out[(s.key, d.key)] = all(tables[n].passes(pkt) for n in nodes)
    return out


def test_evaluator_agrees_with_hand_written_tables():
    """The evaluator itself is checked against the hand-written cases first."""
    for name in ("pod-and-namespace", "egress-cidr-except", "named-port-from-namespace", "ingress-and-egress-together"):
        c = case(name)
        m = c.model()
        assert rendered_matrix(m, parse_policies(c.manifest(m)), c.port, c.protocol) == c.expected(), name


# ----- random policies -------------------------------------------------------------------

MODEL = build_model()
LABEL_VALUES = {"pod": ["a", "b", "c"], "ns": ["x", "y", "z"], "tier": ["web", "db"]}


def requirement(keys):
    return st.one_of(
        st.builds(lambda k, vs: {"key": k, "operator": "In", "values": vs}, st.sampled_from(keys), st.lists(st.sampled_from(["a", "b", "c", "x", "y", "web"]), min_size=1, max_size=2, unique=True)),
        st.builds(lambda k, vs: {"key": k, "operator": "NotIn", "values": vs}, st.sampled_from(keys), st.lists(st.sampled_from(["a", "b", "c", "x", "y", "db"]), min_size=1, max_size=2, unique=True)),
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
ip_block = st.one_of(
    st.builds(lambda ip: {"cidr": f"{ip}/32"}, st.sampled_from(pod_ips)),
    st.builds(lambda ip: {"cidr": "10.244.0.0/16", "except": [f"{ip}/32"]}, st.sampled_from(pod_ips)),
    st.builds(lambda ip: {"cidr": "0.0.0.0/0", "except": [ip.rsplit(".", 2)[0] + ".0.0/16"]}, st.sampled_from(pod_ips)),
    st.just({"cidr": "10.244.2.0/24"}),
)
peer = st.one_of(
    st.builds(lambda s: {"podSelector": s}, selector("pod")),
    st.builds(lambda s: {"namespaceSelector": s}, selector("ns")),
    st.builds(lambda p, n: {"podSelector": p, "namespaceSelector": n}, selector("pod"), selector("ns")),
    st.builds(lambda b: {"ipBlock": b}, ip_block),
)
port = st.one_of(
    st.builds(lambda p, proto: {"port": p, "protocol": proto}, st.sampled_from([80, 81]), st.sampled_from(["TCP", "UDP"])),
    st.builds(lambda proto: {"protocol": proto}, st.sampled_from(["TCP", "UDP", "SCTP"])),
    st.builds(lambda n, proto: {"port": n, "protocol": proto}, st.sampled_from(["serve-80-tcp", "serve-81-udp", "serve-80-udp"]), st.sampled_from(["TCP", "UDP"])),
    st.just({"port": 79, "endPort": 80}),
)
rule = st.fixed_dictionaries({}, optional={"ports": st.lists(port, max_size=2), "peers": st.lists(peer, max_size=2)})


def policy(i):
    return st.builds(
        lambda ns, sel, types, ing, eg: {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": f"p{i}", "namespace": ns},
            "spec": {
                "podSelector": sel,
                **({"policyTypes": types} if types else {}),
                "ingress": [{**({"ports": r["ports"]} if "ports" in r else {}), **({"from": r["peers"]} if "peers" in r else {})} for r in ing],
                "egress": [{**({"ports": r["ports"]} if "ports" in r else {}), **({"to": r["peers"]} if "peers" in r else {})} for r in eg],
            },
        },
        st.sampled_from(["x", "y", "z"]),
        selector("pod"),
        st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]]),
        st.lists(rule, max_size=2),
        st.lists(rule, max_size=2),
    )


policies = st.integers(1, 3).flatmap(lambda n: st.tuples(*[policy(i) for i in range(n)]))
tiers = st.dictionaries(st.sampled_from([p.key for p in MODEL.pods]), st.sampled_from(["web", "db"]), max_size=4)
ns_tiers = st.dictionaries(st.sampled_from(["x", "y", "z"]), st.sampled_from(["web", "db"]), max_size=2)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=policies, tiers=tiers, ns_tiers=ns_tiers, probe=st.sampled_from([(80, "TCP"), (81, "UDP"), (80, "UDP"), (81, "SCTP")]))
def test_render_agrees_with_engine_on_random_policies(docs, tiers, ns_tiers, probe):
    model = build_model(
        pod_labels={k: {"pod": k[-1], "tier": t} for k, t in tiers.items()},
        namespace_labels={n: {"ns": n, "tier": t} for n, t in ns_tiers.items()},
    )
    pols = parse_policies(yaml.safe_dump_all(list(docs)))
    port, protocol = probe
    engine = matrix(list(model.pods), port=port, protocol=protocol, namespaces=model.namespaces, policies=pols)
    assert rendered_matrix(model, pols, port, protocol) == engine
