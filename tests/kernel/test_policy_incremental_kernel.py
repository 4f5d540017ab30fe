"""The incremental policy table on the kernel: the commands of each change
(``policy.incremental``) applied to a real ``inet overlaycni`` in a scratch
namespace list back as the full render of the same inventory lists (every
set and map element, every chain with its rules' comments in order). Element
updates go over nfnetlink (``linux/nftelements``); the same sequence through
libnftables is the control. A refused batch changes nothing."""

from __future__ import annotations

import json
import secrets
import subprocess
from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from overlaycni.dataplane import nftables
from overlaycni.dataplane.linux import LinuxDataplane
from overlaycni.dataplane.linux.nftelements import encode
from overlaycni.errors import PolicyApplyError
from overlaycni.policy import parse_policies
from overlaycni.policy.incremental import NodePolicy
from overlaycni.policy.model import NamespaceInfo, PodInfo
from overlaycni.policy.render import render_node
from tests.policy_cases import CASES, NAMED_PORTS, build_model

pytestmark = pytest.mark.kernel
NODE = "node-1"


@pytest.fixture()
def scratch_ns():
    name = "oct-inc-" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def listing(ns: str) -> tuple[dict, dict]:
    """(sets and maps -> elements, chain -> its rules' comments) as the kernel lists them."""
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", "overlaycni"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    doc = json.loads(out)
    chains: dict[str, list[str]] = {}
    for item in doc["nftables"]:
        if "chain" in item:
            chains.setdefault(item["chain"]["name"], [])
        if "rule" in item:
            chains[item["rule"]["chain"]].append(item["rule"].get("comment", ""))
    return dict(nftables.parse_listing(doc).sets), chains


def rendered(inv: dict) -> tuple[dict, dict]:
    doc = render_node(NODE, pods=inv["pods"].values(), namespaces=inv["ns"].values(), policies=inv["pol"].values())
    chains: dict[str, list[str]] = {}
    for cmd in doc["nftables"]:
        body = cmd.get("add", {})
        if "chain" in body:
            chains.setdefault(body["chain"]["name"], [])
        if "rule" in body:
            chains[body["rule"]["chain"]].append(body["rule"]["comment"])
    return dict(nftables.image(doc).sets), chains


def start() -> dict:
    m = build_model()
    pols = []
    for name in ("named-port-from-namespace", "stacked-policies", "egress-to-pod-in-other-namespace"):
        c = next(c for c in CASES if c.name == name)
        pols += [replace(p, name=f"{p.name}-{name}"[:60]) for p in parse_policies(c.manifest(m))]
    return {"pods": {p.key: p for p in m.pods}, "ns": {n.name: n for n in m.namespaces}, "pol": {p.key: p for p in pols}}


def changes(inv: dict):
    """Each change kind in turn: (what, apply to inventory and state)."""
    pods, pol0 = inv["pods"], next(iter(inv["pol"].values()))
    xa, yb = pods["x/a"], pods["y/b"]
    yield "pod label", replace(xa, labels={"pod": "b"})
    yield "pod address", replace(yb, ip=IPv4Address("10.244.1.99"))
    yield "new pod", PodInfo("x", "d", IPv4Address("10.244.1.77"), NODE, {"pod": "a"}, NAMED_PORTS)
    yield "pod removal", ("pod-", "y", "b")
    yield "namespace label", NamespaceInfo("y", {"ns": "z"})
    yield "policy change", replace(pol0, pod_selector=parse_policies(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: t}\nspec: {podSelector: {matchLabels: {pod: c}}}\n"
    )[0].pod_selector)  # fmt: skip
    yield "policy removal", ("pol-", pol0.namespace, pol0.name)


def run(ns: str, *, direct: bool) -> list[tuple[dict, dict]]:
    inv = start()
    state = NodePolicy(NODE, pods=inv["pods"].values(), namespaces=inv["ns"].values(), policies=inv["pol"].values())
    seen = []
    with LinuxDataplane(ns) as dp:
        dp.run(lambda: setattr(dp.ports.policy_nft, "direct_elements", direct))
        table = dp.policy_table
        assert table.sync(render_node(NODE, pods=inv["pods"].values(), namespaces=inv["ns"].values(),
                                      policies=inv["pol"].values())) == "full"  # fmt: skip
        assert listing(ns) == rendered(inv)
        for what, change in changes(inv):
            if isinstance(change, PodInfo):
                inv["pods"][change.key] = change
                state.set_pod(change)
            elif isinstance(change, NamespaceInfo):
                inv["ns"][change.name] = change
                state.set_namespace(change)
            elif isinstance(change, tuple) and change[0] == "pol-":
                del inv["pol"][f"{change[1]}/{change[2]}"]
                state.remove_policy(change[1], change[2])
            elif isinstance(change, tuple):
                del inv["pods"][f"{change[1]}/{change[2]}"]
                state.remove_pod(change[1], change[2])
            else:
                inv["pol"][change.key] = change
                state.set_policy(change)
            commands = state.take_changes()
            assert commands, what
            if what in ("pod label", "pod address", "new pod", "namespace label", "pod removal"):
                assert encode(commands) is not None, what  # element updates take the nfnetlink path
            snapshot = {k: dict(v) for k, v in inv.items()}
            table.update(commands, render=lambda snapshot=snapshot: render_doc(snapshot))
            got = listing(ns)
            assert got == rendered(inv), what
            assert table.repair() is None, what  # nothing drifted: the digest and the rendered table agree
            seen.append(got)
        # drift behind the agent's back after incremental updates: repair renders what they built and re-applies it
        name, elems = next((n, e) for n, e in got[0].items() if n.startswith("sel-") and e)
        gone = next(iter(elems))
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "delete", "element", "inet", "overlaycni", name, f"{{ {gone} }}"], check=True
        )
        assert table.repair() == "set or map elements changed behind our back"
        assert listing(ns) == rendered(inv)
    return seen


def render_doc(inv: dict) -> dict:
    return render_node(NODE, pods=inv["pods"].values(), namespaces=inv["ns"].values(), policies=inv["pol"].values())


def unused() -> dict:
    raise AssertionError("no repair in this test: the whole table is never rendered")


def test_each_change_lists_back_as_the_full_render(scratch_ns):
    direct = run(scratch_ns, direct=True)
    subprocess.run(["ip", "netns", "exec", scratch_ns, "nft", "delete", "table", "inet", "overlaycni"], check=True)
    assert run(scratch_ns, direct=False) == direct  # control: the same through libnftables


def test_a_refused_element_batch_changes_nothing(scratch_ns):
    inv = start()
    doc = render_node(NODE, pods=inv["pods"].values(), namespaces=inv["ns"].values(), policies=inv["pol"].values())
    sets = nftables.image(doc).sets
    name = next(n for n in sets if n.startswith("sel-"))
    fresh, missing = IPv4Address("10.244.9.1"), IPv4Address("10.244.9.2")
    batch = nftables.element_commands("add", "inet", "overlaycni", name, [fresh]) + nftables.element_commands(
        "delete", "inet", "overlaycni", name, [missing]
    )
    assert encode(batch) is not None
    with LinuxDataplane(scratch_ns) as dp:
        dp.policy_table.sync(doc)
        with pytest.raises(PolicyApplyError, match="No such file"):
            dp.policy_table.update(batch, render=unused)
        assert listing(scratch_ns)[0][name] == sets[name]  # the add of the same batch did not stay
        # control: without the bad delete the add goes through
        dp.policy_table.update(batch[:1], render=unused)
        assert listing(scratch_ns)[0][name] == sets[name] | {fresh}


def test_every_element_shape_over_nfnetlink(scratch_ns):
    """Addresses of both families, address . port concatenations and jump map
    entries, added and deleted over nfnetlink, list back as given."""
    from ipaddress import IPv6Address

    t = {"family": "inet", "table": "overlaycni"}
    decls = {
        "a4": {"type": "ipv4_addr"},
        "a6": {"type": "ipv6_addr"},
        "np4": {"type": ["ipv4_addr", "inet_service"]},
        "np6": {"type": ["ipv6_addr", "inet_service"]},
    }
    maps = {"m4": "ipv4_addr", "m6": "ipv6_addr"}
    v4, v6 = [IPv4Address("10.244.1.5"), IPv4Address("10.244.1.6")], [IPv6Address("fd00::5"), IPv6Address("fd00::6")]
    want = {
        "a4": set(v4),
        "a6": set(v6),
        "np4": {(a, 8080) for a in v4},
        "np6": {(a, 53) for a in v6},
        "m4": {nftables.MapEntry(a, nftables.Jump("c")) for a in v4},
        "m6": {nftables.MapEntry(a, nftables.Jump("c")) for a in v6},
    }
    setup = [{"add": {"table": {"family": "inet", "name": "overlaycni"}}}, {"add": {"chain": {**t, "name": "c"}}}]
    setup += [{"add": {"set": {**t, "name": n, **d}}} for n, d in decls.items()]
    setup += [{"add": {"map": {**t, "name": n, "type": k, "map": "verdict"}}} for n, k in maps.items()]
    adds = [c for n, elems in want.items() for c in nftables.element_commands("add", "inet", "overlaycni", n, elems)]
    assert encode(adds) is not None
    with LinuxDataplane(scratch_ns) as dp:
        dp.run(lambda: dp.ports.policy_nft.apply(setup))
        dp.policy_table.update(adds, render=unused)
        assert listing(scratch_ns)[0] == want
        gone = {n: {next(iter(sorted(e, key=nftables.sort_key)))} for n, e in want.items()}
        dels = [c for n, elems in gone.items() for c in nftables.element_commands("delete", "inet", "overlaycni", n, elems)]
        assert encode(dels) is not None
        dp.policy_table.update(dels, render=unused)
        assert listing(scratch_ns)[0] == {n: want[n] - gone[n] for n in want}
