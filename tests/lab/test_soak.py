"""The soak (bench/soak.py): its invariant checker on hand-made facts (no
root: each broken invariant is caught, and a clean lab's facts pass), and
one fixed seed of ~30 random operations on one vxlan/sqlite lab, checked
every 10 steps and at the end."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
from bench import soak
from bench.soak import AllocFact, Facts, PodFact, violations

from .conftest import lab_namespaces, unique_name

CID_A, CID_B = "a" * 32, "b" * 32
SEED_FAULTS = 5


def clean() -> Facts:
    pods = (
        PodFact("default/a", "node1", CID_A, "ocl-t.pod.default.a", ("10.244.0.2",)),
        PodFact("x/b", "node2", CID_B, "ocl-t.pod.x.b", ("10.244.1.2",)),
    )
    ready = {"ready": True, "reasons": [], "last_error": None, "quarantine": {"held": 0}, "pods": 1}
    return Facts(
        pods=pods,
        allocations=(AllocFact(CID_A, "eth0", "node1", ("10.244.0.2",)), AllocFact(CID_B, "eth0", "node2", ("10.244.1.2",))),
        ipam_problems=(),
        veths={"node1": (soak.host_veth(CID_A),), "node2": (soak.host_veth(CID_B),)},
        pod_netns=("ocl-t.pod.default.a", "ocl-t.pod.x.b"),
        agents={"node1": dict(ready), "node2": dict(ready)},
        lab_nodes={"node1": "10.244.0.0/24", "node2": "10.244.1.0/24"},
        store_nodes={"node1": "10.244.0.0/24", "node2": "10.244.1.0/24"},
    )


LEAK = AllocFact("c" * 32, "eth0", "node1", ("10.244.0.9",))


@pytest.mark.parametrize(
    "broken, needle",
    [
        (lambda f: replace(f, allocations=(*f.allocations, LEAK)), "leak: allocation ('10.244.0.9',) on node1"),
        (lambda f: replace(f, allocations=f.allocations[1:]), "lost: pod default/a on node1"),
        (lambda f: replace(f, allocations=(*f.allocations, AllocFact(CID_A, "eth0", "node1", ("10.244.0.3",)))), "double: pod default/a"),
        (lambda f: replace(f, allocations=(f.allocations[0], AllocFact(CID_B, "eth0", "node2", ("10.244.0.2",)))),
         "double hand-out: 10.244.0.2"),
        (lambda f: replace(f, pods=(f.pods[0], replace(f.pods[1], ips=("10.244.1.7",)))), "mismatch: pod x/b"),
        (lambda f: replace(f, ipam_problems=("leak: address 10.244.0.9 has no handle",)), "ipam check: leak"),
        (lambda f: replace(f, veths={**f.veths, "node2": (*f.veths["node2"], "oc0123456789abc")}), "leftover veth oc0123456789abc"),
        (lambda f: replace(f, veths={**f.veths, "node1": ()}), "missing veth"),
        (lambda f: replace(f, veths={**f.veths, "node1": (*f.veths["node1"], "oz0123456789abc")}), "parked veth oz0123456789abc"),
        (lambda f: replace(f, pod_netns=(*f.pod_netns, "ocl-t.pod.default.gone")), "leftover pod namespace ocl-t.pod.default.gone"),
        (lambda f: replace(f, pod_netns=f.pod_netns[:1]), "pod x/b: its namespace"),
        (lambda f: replace(f, agents={**f.agents, "node1": {**f.agents["node1"], "ready": False, "reasons": ["datastore"]}}),
         "agent node1 not ready"),
        (lambda f: replace(f, agents={**f.agents, "node2": {**f.agents["node2"], "last_error": "boom"}}), "agent node2 last_error: boom"),
        (lambda f: replace(f, agents={**f.agents, "node2": {**f.agents["node2"], "quarantine": {"held": 1}}}), "quarantine holds 1"),
        (lambda f: replace(f, agents={**f.agents, "node2": {"error": "AgentUnavailable: no agent"}}), "agent node2: AgentUnavailable"),
        (lambda f: replace(f, store_nodes={"node1": "10.244.0.0/24"}), "node records"),
        (lambda f: replace(f, connectivity=("default/a -> x/b: no reply",)), "lab check: default/a -> x/b"),
    ],  # fmt: skip
)
def test_the_checker_catches_each_broken_invariant(broken, needle):
    assert violations(clean()) == []  # control: the same lab, nothing broken
    found = violations(broken(clean()))
    assert any(needle in v for v in found), found


def test_a_pod_deleted_just_before_its_agents_sigkill_is_excused_only_on_its_node():
    leaked = replace(clean(), allocations=(*clean().allocations, LEAK))
    leaked = replace(leaked, agents={**leaked.agents, "node1": {**leaked.agents["node1"], "pods": 2}})
    assert violations(leaked, excused={LEAK.container_id: "node1"}) == []
    assert violations(leaked, excused={LEAK.container_id: "node2"})  # control: another node's excuse does not cover it
    assert violations(leaked)  # control: no excuse, a leak


def test_parked_veths_are_allowed_only_while_busy():
    f = replace(clean(), veths={**clean().veths, "node1": (*clean().veths["node1"], "oz0123456789abc")})
    assert violations(f, idle=False) == [] and violations(f, idle=True)


PING_SUMMARY = """--- 10.244.1.6 ping statistics ---
52 packets transmitted, 49 received, 5.76923% packet loss, time 2553ms
rtt min/avg/max/mdev = 0.041/0.090/0.236/0.035 ms
"""


def test_the_traffic_operation_reads_pings_summary():
    assert soak._ping_counts(PING_SUMMARY) == (52, 49)
    with pytest.raises(RuntimeError, match="no summary"):  # control: a ping that printed no summary is not "0 lost"
        soak._ping_counts("ping: connect: Network is unreachable\n")


def _fake_state():
    pod = SimpleNamespace(node="node1"), SimpleNamespace(node="node2")
    return SimpleNamespace(pods=pod, nodes=(SimpleNamespace(name="node1"), SimpleNamespace(name="node2")))


@pytest.mark.parametrize("store", ["sqlite", "etcd"])
def test_later_faults_are_picked_only_when_asked_for_and_etcd_pause_only_with_etcd(monkeypatch, store):
    import random

    def picks(faults):
        sk = soak.Soak("t", "/nonexistent", random.Random(7), faults=faults, store=store)
        monkeypatch.setattr(sk, "state", _fake_state)
        return {sk.pick() for _ in range(2000)}

    old = picks(())
    assert old == set(soak.WEIGHTS) - {"node_del"}  # two nodes: never below 2
    new = picks(soak.FAULT_NAMES)
    assert new - old == ({"inflight", "traffic", "etcd_pause"} if store == "etcd" else {"inflight", "traffic"})


@pytest.mark.lab
@pytest.mark.timeout(900)
def test_one_seed_of_random_operations_keeps_every_invariant(tmp_path):
    name = unique_name("sk")
    out = soak.run(seed=20261130, steps=30, check_every=10, up_args=[], root=str(tmp_path), name=name, say=lambda _s: None)
    try:
        assert out.ok, "\n".join(["step log:", *out.log, "evidence:", *out.evidence])
        assert out.steps == 30 and out.checks == 3
        assert len(out.counts) >= 5  # the seed reaches most kinds of operation
    finally:
        assert lab_namespaces(name) == []  # torn down, pass or fail


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_one_seed_with_agents_killed_mid_request_and_pinged_through_restarts(tmp_path):
    """The later faults that need no etcd (``inflight``, ``traffic``), a short fixed seed: the
    choices are the seed's, the kill's moment relative to the requests is the kernel's."""
    name = unique_name("sk")
    out = soak.run(seed=SEED_FAULTS, steps=12, check_every=6, up_args=[], root=str(tmp_path), name=name,
                   say=lambda _s: None, faults=("inflight", "traffic"))  # fmt: skip
    try:
        assert out.ok, "\n".join(["step log:", *out.log, "evidence:", *out.evidence])
        assert out.steps == 12 and out.checks == 2
        assert out.counts["inflight"] >= 1 and out.counts["traffic"] >= 1, out.counts
        assert len(out.traffic) == out.counts["traffic"]  # each ping's losses are recorded (never asserted)
    finally:
        assert lab_namespaces(name) == []  # torn down, pass or fail
