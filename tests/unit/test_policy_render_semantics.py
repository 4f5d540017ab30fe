"""The render means what the engine says, for random policies, without a kernel.

A small evaluator of the nft JSON subset the renderer emits (payload / meta /
ct / concat matches, named and anonymous sets, prefixes, ranges, verdict
maps, jump / accept / drop, base chains in priority order) runs each new
connection through the source node's table and then the destination node's
table. Hypothesis generates policies and labels over the x/y/z model; every
ordered pair must get the engine's verdict. The kernel test checks the same
renders with real packets; this one explores many more policies.

Families: a packet is IPv4 or IPv6, and as in the kernel's ``inet`` table an
``ip`` header match never matches an IPv6 packet (nor ``ip6`` an IPv4 one):
the rule does not apply. Dual-stack renders are judged over both families
against the engine's verdict for that family.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlaycni.families import IPFamily
from overlaycni.policy import matrix, parse_policies
from overlaycni.policy.render import render_node
from tests.policy_cases import build_model, case, with_ipv6_twins
from tests.policy_strategies import ns_tiers, policies, policies_strategy, tiers

FAMILIES = (IPFamily.ipv4, IPFamily.ipv6)
_HEADER = {"ip": 4, "ip6": 6}


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
            if p["protocol"] in _HEADER:  # the address of the packet's own family only
                return pkt[p["field"]] if pkt["family"] == _HEADER[p["protocol"]] else None
            assert p["protocol"] in ("tcp", "udp", "sctp"), p
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
            net = ip_network(f"{right['prefix']['addr']}/{right['prefix']['len']}")
            return ip_address(v) in net  # an address of the other family is in no network
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
                    key = self.value(e["vmap"]["key"], pkt)
                    if key is None:  # the key's header is not the packet's: the rule does not apply
                        break
                    target = self.maps[e["vmap"]["data"][1:]].get(key)
                    if target:
                        verdict = self.run(target, pkt)
                        if verdict:
                            return verdict
                else:
                    raise AssertionError(f"unknown statement {e}")
        return None

    def passes(self, pkt: dict) -> bool:
        return all((self.run(name, pkt) or policy) != "drop" for _, name, policy in self.base)


def rendered_matrix(
    model, policies, port: int, protocol: str, family: IPFamily = IPFamily.ipv4, *, tables: dict | None = None
) -> dict[tuple[str, str], bool]:
    """Every ordered pair over ``family`` through the nodes' rendered tables."""
    tables = tables or render_tables(model, policies)
    out = {}
    for s in model.pods:
        for d in model.pods:
            if s.key == d.key:
                out[(s.key, d.key)] = True  # loopback never reaches the node
                continue
            pkt = {"family": family.version, "saddr": str(s.address(family)), "daddr": str(d.address(family)),
                   "proto": protocol.lower(), "dport": port}
            nodes = [s.node] if s.node == d.node else [s.node, d.node]
            out[(s.key, d.key)] = all(tables[n].passes(pkt) for n in nodes)
    return out


def render_tables(model, policies) -> dict[str, Table]:
    return {
        n: Table(render_node(n, pods=model.pods, namespaces=model.namespaces, policies=policies))
        for n in {p.node for p in model.pods}
    }


def test_evaluator_agrees_with_hand_written_tables():
    """The evaluator itself is checked against the hand-written cases first."""
    for name in ("pod-and-namespace", "egress-cidr-except", "named-port-from-namespace", "ingress-and-egress-together"):
        c = case(name)
        m = c.model()
        assert rendered_matrix(m, parse_policies(c.manifest(m)), c.port, c.protocol) == c.expected(), name


def test_evaluator_agrees_with_hand_written_tables_over_both_families():
    """A dual-stack model (every ipBlock with its IPv6 twin): the tables hold
    over IPv4 and over IPv6 alike. Without the twins the IPv4 blocks admit
    nothing over IPv6 (the control: the evaluator tells the families apart)."""
    for name in ("pod-and-namespace", "egress-cidr-except", "named-port-from-namespace", "ingress-and-egress-together",
                 "egress-to-cidr", "cidr-and-except-overlap-allowed"):
        c = case(name)
        m = c.model(dual=True)
        pols = parse_policies(c.manifest(m))
        tables = render_tables(m, with_ipv6_twins(pols))
        for family in FAMILIES:
            assert rendered_matrix(m, pols, c.port, c.protocol, family, tables=tables) == c.expected(), (name, family)
        if name == "egress-to-cidr":  # x/a may only reach y/b, by an IPv4 block: over IPv6 it reaches nobody
            v6 = rendered_matrix(m, pols, c.port, c.protocol, IPFamily.ipv6)
            assert not v6[("x/a", "y/b")] and rendered_matrix(m, pols, c.port, c.protocol)[("x/a", "y/b")]


# ----- random policies -------------------------------------------------------------------

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


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=policies_strategy(ipv6=True), tiers=tiers)
def test_dual_stack_render_agrees_with_engine_over_each_family(docs, tiers):
    """Random policies with IPv4 and IPv6 ipBlocks over a dual-stack model:
    the dual-stack render gives every pair, over each family and probe, the
    engine's verdict for that family."""
    model = build_model(pod_labels={k: {"pod": k[-1], "tier": t} for k, t in tiers.items()}, dual=True)
    pols = parse_policies(yaml.safe_dump_all(list(docs)))
    tables = render_tables(model, pols)
    for port, protocol in ((80, "TCP"), (81, "UDP"), (80, "UDP"), (81, "SCTP")):
        for family in FAMILIES:
            engine = matrix(list(model.pods), port=port, protocol=protocol, namespaces=model.namespaces, policies=pols, family=family)
            assert rendered_matrix(model, pols, port, protocol, family, tables=tables) == engine, (port, protocol, family)
