"""The incremental policy table (``policy.incremental.NodePolicy``) against
the full render: after any sequence of pod, namespace and policy changes, the
table that the full render of the final inventory builds and the table that
the first full render plus every incremental transaction builds are the
same (chains and their rules in order, set and map declarations, elements).
The transactions run through the fake nftables, which refuses what the
kernel refuses (a chain or set deleted while referenced, elements of a
missing set)."""

from __future__ import annotations

import copy
import threading
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlaycni.agent.policy import PolicyController
from overlaycni.dataplane.fake import FakeKernel, FakeNft, FakeNftTable, _nft_apply
from overlaycni.dataplane.policytable import FAMILY, PACKET_PATH_SETS, TABLE, PolicyTableSync
from overlaycni.errors import DataplaneError
from overlaycni.families import DUAL_STACK
from overlaycni.policy import parse_policies
from overlaycni.policy.flowlog import FlowLogSpec
from overlaycni.policy.incremental import NodePolicy
from overlaycni.policy.model import NamedPort, NamespaceInfo, NetworkPolicy, PodInfo, Rule, policy_from_manifest
from overlaycni.policy.render import _digest, render_node
from overlaycni.policy.selectors import LabelSelector
from tests.policy_cases import CASES, build_model

NODE = "node-1"
NAMESPACES = ("x", "y", "z")
KEYS, VALUES = ("app", "tier"), ("a", "b", "c")
PORTS = (NamedPort("http", 8080), NamedPort("http", 8081, "UDP"), NamedPort("dns", 53, "UDP"), NamedPort("metrics", 9090))


def kernel(doc: dict, table: FakeNftTable | None = None) -> FakeNftTable:
    """The fake kernel's table after ``doc`` (on top of ``table``)."""
    tables = {} if table is None else {(FAMILY, TABLE): copy.deepcopy(table)}
    _nft_apply(tables, doc["nftables"])
    return tables[(FAMILY, TABLE)]


def same(a: FakeNftTable, b: FakeNftTable) -> None:
    assert sorted(a.chains) == sorted(b.chains)
    for name in a.chains:
        assert a.chains[name] == b.chains[name], name
    assert a.decls == b.decls
    assert a.sets == b.sets


def full(node: str, inv: dict, **opts) -> dict:
    """The whole render of ``inv``; ``opts``: render options, as the state takes them."""
    return render_node(node, pods=inv["pods"].values(), namespaces=inv["ns"].values(), policies=inv["pol"].values(), **opts)


def build(inv: dict, **opts) -> NodePolicy:
    return NodePolicy(NODE, pods=inv["pods"].values(), namespaces=inv["ns"].values(), policies=inv["pol"].values(), **opts)


def check_view(state: NodePolicy, table: FakeNftTable) -> None:
    """The state's own view (chains, sets) is the kernel's table."""
    base = {n: r for n, r in table.chains.items() if n not in ("egress", "ingress")}
    assert {n: list(r) for n, r in state.chains.items()} == base
    assert {n: e for n, (_, e) in state.sets().items()} == {n: e for n, e in table.sets.items() if n not in PACKET_PATH_SETS}


# ----- strategies -------------------------------------------------------------------------

labels = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=2)


@st.composite
def selectors(draw):
    kind = draw(st.sampled_from(("empty", "labels", "expr")))
    if kind == "empty":
        return {}
    if kind == "labels":
        return {"matchLabels": draw(st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), min_size=1, max_size=2))}
    op = draw(st.sampled_from(("In", "NotIn", "Exists", "DoesNotExist")))
    expr = {"key": draw(st.sampled_from(KEYS)), "operator": op}
    if op in ("In", "NotIn"):
        expr["values"] = draw(st.lists(st.sampled_from(VALUES), min_size=1, max_size=2, unique=True))
    return {"matchExpressions": [expr]}


@st.composite
def peers(draw):
    kind = draw(st.sampled_from(("pod", "ns", "both", "ip")))
    if kind == "ip":
        return {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.1.0/24"]}}
    out = {}
    if kind in ("pod", "both"):
        out["podSelector"] = draw(selectors())
    if kind in ("ns", "both"):
        out["namespaceSelector"] = draw(selectors())
    return out


ports = st.one_of(
    st.fixed_dictionaries({"port": st.sampled_from((80, 443, "http", "dns", "metrics"))}),
    st.fixed_dictionaries({"protocol": st.just("UDP"), "port": st.sampled_from((53, "http", "dns"))}),
    st.just({"port": 9000, "endPort": 9010}),
    st.just({"protocol": "UDP"}),
)


@st.composite
def rules(draw, peers_key):
    rule = {}
    if draw(st.booleans()):
        rule[peers_key] = draw(st.lists(peers(), min_size=1, max_size=2))
    if draw(st.booleans()):
        rule["ports"] = draw(st.lists(ports, min_size=1, max_size=2))
    return rule


@st.composite
def policies(draw) -> NetworkPolicy:
    spec = {
        "podSelector": draw(selectors()),
        "policyTypes": draw(st.sampled_from((["Ingress"], ["Egress"], ["Ingress", "Egress"]))),
        "ingress": draw(st.lists(rules("from"), max_size=2)),
        "egress": draw(st.lists(rules("to"), max_size=2)),
    }
    meta = {"name": draw(st.sampled_from(("p1", "p2", "p3", "p4"))), "namespace": draw(st.sampled_from(NAMESPACES))}
    errors: list = []
    pol = policy_from_manifest(
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec}, errors=errors
    )
    assert pol is not None and not errors, errors
    return pol


@st.composite
def pods(draw, *, dual: bool = False) -> PodInfo:
    """A pod; ``dual``: maybe with an IPv6 address too (derived from the IPv4 one, so unique with it)."""
    ns = draw(st.sampled_from(NAMESPACES))
    name = draw(st.sampled_from(("a", "b", "c", "d")))
    n = draw(st.integers(2, 40))
    ip = IPv4Address(int(IPv4Address("10.244.1.0")) + n)
    ip_v6 = IPv6Address(f"fd12:3456:789a:0:1::{n:x}") if dual and draw(st.booleans()) else None
    node = draw(st.sampled_from((NODE, "node-2")))
    ports = tuple(draw(st.lists(st.sampled_from(PORTS), max_size=3, unique=True)))
    return PodInfo(ns, name, ip, node, draw(labels), ports, ip_v6=ip_v6)


def change_kinds(*, dual: bool = False):
    return st.one_of(
        st.tuples(st.just("pod"), pods(dual=dual)),
        st.tuples(st.just("pod-"), st.sampled_from(NAMESPACES), st.sampled_from(("a", "b", "c", "d"))),
        st.tuples(st.just("ns"), st.sampled_from(NAMESPACES), labels),
        st.tuples(st.just("ns-"), st.sampled_from(NAMESPACES)),
        st.tuples(st.just("pol"), policies()),
        st.tuples(st.just("pol-"), st.sampled_from(NAMESPACES), st.sampled_from(("p1", "p2", "p3", "p4"))),
        st.tuples(st.just("take")),
    )


changes = change_kinds()


def apply_change(state: NodePolicy, inv: dict, change: tuple) -> None:
    """One change to the inventory and to the state; a pod whose address
    another pod holds is skipped (IPAM never hands out one address twice)."""
    kind = change[0]
    if kind == "pod":
        pod = change[1]
        if any(p.ip == pod.ip and p.key != pod.key for p in inv["pods"].values()):
            return
        inv["pods"][pod.key] = pod
        state.set_pod(pod)
    elif kind == "pod-":
        inv["pods"].pop(f"{change[1]}/{change[2]}", None)
        state.remove_pod(change[1], change[2])
    elif kind == "ns":
        ns = NamespaceInfo(change[1], change[2])
        inv["ns"][ns.name] = ns
        state.set_namespace(ns)
    elif kind == "ns-":
        inv["ns"].pop(change[1], None)
        state.remove_namespace(change[1])
    elif kind == "pol":
        inv["pol"][change[1].key] = change[1]
        state.set_policy(change[1])
    elif kind == "pol-":
        inv["pol"].pop(f"{change[1]}/{change[2]}", None)
        state.remove_policy(change[1], change[2])


def run(start: dict, steps: list[tuple], *, inexact_ok: bool = False, **opts) -> None:
    """The steps from ``start``; at each "take" (and at the end) the table
    built by the state's commands is the full render's. With ``inexact_ok``
    a state that says it is not exact is rebuilt, as the agent renders whole
    then; otherwise it must stay exact."""
    inv = {k: dict(v) for k, v in start.items()}
    state = build(inv, **opts)
    table = kernel(full(NODE, inv, **opts))
    check_view(state, table)
    for step in [*steps, ("take",)]:
        if step[0] != "take":
            apply_change(state, inv, step)
            continue
        if not state.exact:
            assert inexact_ok
            state, table = build(inv, **opts), kernel(full(NODE, inv, **opts))
        table = kernel({"nftables": state.take_changes()}, table)
        same(table, kernel(full(NODE, inv, **opts)))
        check_view(state, table)
        assert state.describes(full(NODE, inv, **opts)) is None
        assert state.take_changes() == []  # taken once


def empty() -> dict:
    return {"pods": {}, "ns": {}, "pol": {}}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(changes, max_size=25))
def test_incremental_equals_full_from_empty(steps):
    run(empty(), steps)


def test_a_set_that_goes_and_comes_back_in_one_transaction_is_not_deleted_under_its_rules():
    """Found by the property above: a policy's selector changes and changes
    back before the kernel takes the changes, so its target set goes and
    comes back and the namespace chain naming it is the same again; the set
    is deleted and added whole, so that chain must be flushed first (the
    kernel refuses to delete a set a rule names: EBUSY)."""
    pod = PodInfo("x", "a", IPv4Address("10.244.1.2"), "node-1", {})
    isolating = NetworkPolicy("x", "p1", LabelSelector((("app", "a"),)), ("Ingress",), ingress=(Rule((), ()),))
    bare = NetworkPolicy("x", "p1", LabelSelector(), ("Ingress",))
    run(empty(), [("pod", pod), ("pol", isolating), ("take",), ("pod", pod), ("pol", bare), ("pol", isolating)])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(changes, max_size=25))
def test_incremental_equals_full_with_flow_logs(steps):
    """Flow logs on: a log chain per allowing rule, deny by goto, every local pod in the verdict maps."""
    run(empty(), steps, flow_log=FlowLogSpec())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(change_kinds(dual=True), max_size=25))
def test_incremental_equals_full_dual_stack(steps):
    """A dual-stack cluster: every set, named-port set and verdict map has its IPv6 twin, every address rule its ip6 twin."""
    run(empty(), steps, families=DUAL_STACK)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(change_kinds(dual=True), max_size=25))
def test_incremental_equals_full_dual_stack_with_flow_logs(steps):
    """Dual-stack with flow logs on (the agents' default)."""
    run(empty(), steps, families=DUAL_STACK, flow_log=FlowLogSpec())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(change_kinds(dual=True), max_size=25))
def test_incremental_equals_full_families_from_the_pods(steps):
    """Families derived from the pods: the first IPv6 pod (or the last one gone) makes the state inexact."""
    run(empty(), steps, inexact_ok=True)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start_pods=st.lists(pods(), max_size=10),
    start_pols=st.lists(policies(), max_size=4),
    steps=st.lists(changes, max_size=15),
)
def test_incremental_equals_full_from_any_start(start_pods, start_pols, steps):
    start = empty()
    for p in start_pods:
        if all(q.ip != p.ip or q.key == p.key for q in start["pods"].values()):
            start["pods"][p.key] = p
    start["pol"] = {p.key: p for p in start_pols}
    start["ns"] = {n: NamespaceInfo(n, {"app": "a"}) for n in NAMESPACES[:2]}
    run(start, steps)


# ----- each change kind on the conformance model -------------------------------------------


def conformance(name: str) -> dict:
    m = build_model()
    case = next(c for c in CASES if c.name == name)
    pols = parse_policies(case.manifest(m))
    return {"pods": {p.key: p for p in m.pods}, "ns": {n.name: n for n in m.namespaces}, "pol": {p.key: p for p in pols}}


def one_change(start: dict, change: tuple) -> list[dict]:
    """The transaction of ``change``, checked against the full render."""
    inv = {k: dict(v) for k, v in start.items()}
    state = build(inv)
    before = kernel(full(NODE, inv))
    apply_change(state, inv, change)
    cmds = state.take_changes()
    same(kernel({"nftables": cmds}, before), kernel(full(NODE, inv)))
    return cmds


def verbs(cmds: list[dict]) -> set[tuple[str, str]]:
    return {(verb, kind) for c in cmds for verb, body in c.items() for kind in body}


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_pod_label_change_is_elements_only(c):
    start = conformance(c.name)
    pod = start["pods"]["x/a"]
    cmds = one_change(start, ("pod", replace(pod, labels={"pod": "b"})))
    assert verbs(cmds) <= {("add", "element"), ("delete", "element")}


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_namespace_label_change_is_elements_only(c):
    cmds = one_change(conformance(c.name), ("ns", "y", {"ns": "x"}))
    assert verbs(cmds) <= {("add", "element"), ("delete", "element")}


def test_new_pod_and_address_change_and_removal():
    start = conformance("default-deny-ingress")
    pod = start["pods"]["x/a"]
    new = PodInfo("x", "d", IPv4Address("10.244.1.99"), NODE, {"pod": "d"}, PORTS)
    cmds = one_change(start, ("pod", new))
    assert ("add", "element") in verbs(cmds) and ("delete", "element") not in verbs(cmds)
    cmds = one_change(start, ("pod", replace(pod, ip=IPv4Address("10.244.1.98"))))
    assert verbs(cmds) == {("add", "element"), ("delete", "element")}
    cmds = one_change(start, ("pod-", "x", "a"))
    assert verbs(cmds) == {("delete", "element")}


def test_policy_change_touches_only_its_chains():
    start = conformance("stacked-policies")
    pol = next(iter(start["pol"].values()))
    extra = parse_policies(
        f"""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: extra, namespace: {pol.namespace}}}
spec:
  podSelector: {{matchLabels: {{pod: c}}}}
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{ns: z}}}}, podSelector: {{matchLabels: {{pod: b}}}}}}]
    ports: [{{port: serve-81-udp, protocol: UDP}}]
"""
    )[0]
    cmds = one_change(start, ("pol", extra))
    kinds = verbs(cmds)
    assert ("add", "table") not in kinds and ("delete", "table") not in kinds  # never the whole table
    added = [c["add"]["chain"]["name"] for c in cmds if "chain" in c.get("add", {})]
    assert added == [f"in-{_digest(extra.key)}"]
    flushed = [c["flush"]["chain"]["name"] for c in cmds if "flush" in c]
    assert flushed == [f"in-ns-{pol.namespace}"]
    # and back: removing it deletes the chain and the sets only it used
    state_inv = {**start, "pol": {**start["pol"], extra.key: extra}}
    cmds = one_change(state_inv, ("pol-", extra.namespace, extra.name))
    assert ("delete", "chain") in verbs(cmds) and ("delete", "set") in verbs(cmds)


def test_removing_the_last_policy_of_a_namespace_drops_its_chains_and_map_entries():
    start = conformance("default-deny-ingress")
    (pol,) = start["pol"].values()
    cmds = one_change(start, ("pol-", pol.namespace, pol.name))
    assert [c["delete"]["chain"]["name"] for c in cmds if "chain" in c.get("delete", {})] == [f"in-ns-{pol.namespace}"]
    assert [c["flush"]["chain"]["name"] for c in cmds if "flush" in c] == [f"in-ns-{pol.namespace}"]
    gone = [e for c in cmds if "element" in c.get("delete", {}) for e in c["delete"]["element"]["elem"]]
    local = sorted(str(p.ip) for p in start["pods"].values() if p.namespace == pol.namespace and p.node == NODE)
    assert sorted(gone) == local  # the namespace's local pods leave ingress-pods


def test_unchanged_inputs_give_no_commands():
    start = conformance("stacked-policies")
    state = build(start)
    for pod in start["pods"].values():
        state.set_pod(replace(pod))
    for pol in start["pol"].values():
        state.set_policy(pol)
    for ns in start["ns"].values():
        state.set_namespace(ns)
    assert state.take_changes() == []


def test_two_pods_of_one_address_are_not_exact():
    start = conformance("default-deny-ingress")
    state = build(start)
    assert state.exact
    a = start["pods"]["x/a"]
    state.set_pod(replace(a, name="twin"))
    assert not state.exact
    state.remove_pod("x", "twin")
    assert state.exact


def test_fake_refuses_deleting_a_referenced_set_or_chain():
    """Control for the ordering checks above: the fake kernel refuses what
    the kernel refuses, so a wrong order would fail those tests."""
    start = conformance("stacked-policies")
    table = kernel(full(NODE, start))
    in_use = next(n for n in table.sets if n.startswith("sel-"))
    with pytest.raises(DataplaneError, match="busy"):
        kernel({"nftables": [{"delete": {"set": {"family": FAMILY, "table": TABLE, "name": in_use}}}]}, table)
    ns_chain = next(n for n in table.chains if n.startswith("in-ns-"))
    with pytest.raises(DataplaneError, match="busy"):
        kernel(
            {
                "nftables": [
                    {"flush": {"chain": {"family": FAMILY, "table": TABLE, "name": ns_chain}}},
                    {"delete": {"chain": {"family": FAMILY, "table": TABLE, "name": ns_chain}}},
                ]
            },
            table,
        )


# ----- the agent's policy controller: passes by what changed ------------------------------


class Controller(PolicyController):
    """The agent's controller with the inventory held here instead of a datastore."""

    def __init__(self, inv: dict, kernel: FakeKernel, flow_log: FlowLogSpec | None = None) -> None:
        super().__init__(
            None,  # type: ignore[arg-type]
            cluster="c1",
            node=NODE,
            stop=threading.Event(),
            table=PolicyTableSync(FakeNft(kernel, family=FAMILY, table=TABLE)),
            on_bad=lambda *a: None,
            flow_log=flow_log,
        )
        self.inv = inv

    def load(self):
        return list(self.inv["pods"].values()), list(self.inv["ns"].values()), list(self.inv["pol"].values())


@pytest.mark.parametrize("flow_log", [None, FlowLogSpec()], ids=["plain", "flow-logs"])
def test_controller_passes_follow_the_change(flow_log):
    inv = conformance("stacked-policies")
    k = FakeKernel()
    ctl = Controller(inv, k, flow_log)

    def pass_is(how: str) -> None:
        assert ctl.sync() == how
        same(k.nft_table(FAMILY, TABLE), kernel(full(NODE, inv, flow_log=flow_log)))

    pass_is("full")  # the first pass renders whole
    pass_is("none")
    pod = inv["pods"]["x/a"]
    inv["pods"]["x/a"] = replace(pod, labels={"pod": "c"})
    pass_is("elements")
    inv["ns"]["y"] = NamespaceInfo("y", {"ns": "z"})
    pass_is("elements")
    extra = replace(next(iter(inv["pol"].values())), name="extra", pod_selector=LabelSelector((("pod", "b"),)))
    inv["pol"][extra.key] = extra
    pass_is("rules")
    del inv["pol"][extra.key]
    pass_is("rules")
    assert ctl.passes == {"none": 1, "elements": 2, "rules": 2, "full": 1}
    held = ctl.state
    assert ctl.sync(full=True) == "full"  # the periodic pass replaces the table
    assert ctl.state is held  # and keeps the state, which followed the inventory
    same(k.nft_table(FAMILY, TABLE), kernel(full(NODE, inv, flow_log=flow_log)))
    inv["pods"]["x/a"] = pod
    pass_is("elements")


def test_controller_renders_whole_when_the_kernel_refuses_or_addresses_repeat():
    inv = conformance("stacked-policies")
    k = FakeKernel()
    ctl = Controller(inv, k)
    assert ctl.sync() == "full"
    # drift: an element the next update deletes is gone already; the kernel refuses the update
    pod = inv["pods"]["x/a"]
    table = k.nft_table(FAMILY, TABLE)
    holding = next(n for n, elems in table.sets.items() if pod.ip in elems)
    table.sets[holding] = table.sets[holding] - {pod.ip}
    inv["pods"]["x/a"] = replace(pod, ip=IPv4Address("10.244.1.77"))
    assert ctl.sync() == "full"
    same(k.nft_table(FAMILY, TABLE), kernel(full(NODE, inv)))
    # control: the same change without drift is an element update
    inv["pods"]["x/a"] = pod
    assert ctl.sync() == "elements"
    # two pods of one address: the state does not follow the render there
    inv["pods"]["x/twin"] = replace(pod, name="twin")
    assert ctl.sync() == "full"
    same(k.nft_table(FAMILY, TABLE), kernel(full(NODE, inv)))


def test_describes_names_what_differs():
    inv = conformance("stacked-policies")
    state = build(inv)
    doc = full(NODE, inv)
    assert state.describes(doc) is None
    extra = {"add": {"chain": {"family": FAMILY, "table": TABLE, "name": "unknown"}}}
    assert "chains differ" in state.describes({"nftables": [*doc["nftables"], extra]})
    name = next(n for n in state.set_names() if n.startswith("sel-"))
    more = {"add": {"element": {"family": FAMILY, "table": TABLE, "name": name, "elem": ["10.9.9.9"]}}}
    assert name in state.describes({"nftables": [*doc["nftables"], more]})


def test_controller_renders_whole_when_the_state_does_not_describe_the_render(monkeypatch):
    """A render feature the incremental state does not follow (here: one more
    chain) turns incremental updates off at the first whole render; every
    pass is then a whole render, and the table is always the render."""
    import overlaycni.agent.policy as agent_policy

    def render_more(*args, **kwargs):
        doc = render_node(*args, **kwargs)
        return {"nftables": [*doc["nftables"], {"add": {"chain": {"family": FAMILY, "table": TABLE, "name": "new-feature"}}}]}

    monkeypatch.setattr(agent_policy, "render_node", render_more)
    inv = conformance("stacked-policies")
    k = FakeKernel()
    ctl = Controller(inv, k)
    assert ctl.sync() == "full" and "chains differ" in (ctl.incremental_off or "")
    inv["pods"]["x/a"] = replace(inv["pods"]["x/a"], labels={"pod": "c"})
    assert ctl.sync() == "full"
    assert "new-feature" in k.nft_table(FAMILY, TABLE).chains
