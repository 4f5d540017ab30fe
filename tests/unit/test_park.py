"""A DEL parks its host veth (down, renamed, in the park group) and the
quarantine's drain deletes it: the fake data plane's park and link groups,
the engine and reconcile never treating a parked veth as a pod, the agent's
drain-first re-ADD, an ADD into the namespace a parked veth still holds,
and the leftovers of a crash (``agent.quarantine``)."""

from __future__ import annotations

import json

import pytest

from overlaycni import ipam
from overlaycni.cni import shim
from overlaycni.dataplane import FakeDataplane, host_veth_name
from overlaycni.dataplane.model import PARK_GROUP, PodEndpoint, parked_veth_name
from tests.unit.test_agent import cluster, start_agent  # noqa: F401 (cluster is a fixture)
from tests.unit.test_reconcile_race import HOST, NETNS, V4, V6, attach, node, ready  # the same node and pod

PARKED = parked_veth_name(HOST)


def attached() -> FakeDataplane:
    dp = ready()
    attach(dp)
    return dp


def elements(dp: FakeDataplane) -> dict[str, frozenset]:
    return {f: dp.kernel.nft_table(f, "overlaycni").sets["pod_endpoints"] for f in ("ip", "arp", "ip6")}


def test_park_leaves_a_down_renamed_veth_until_the_parked_are_deleted():
    dp = attached()
    assert all(elements(dp).values()) and [r for r in dp.kernel.routes.values() if r.dev == HOST]
    assert dp.park_pods([("c1", "eth0")]) == [None]
    k = dp.kernel
    link = k.links[PARKED]
    assert not link.up and k.groups[PARKED] == PARK_GROUP and HOST not in k.links
    assert dp.list_pod_veths() == [] and dp.list_parked_veths() == [PARKED]
    assert not [r for r in k.routes.values() if r.dev in (HOST, PARKED)]  # both families' routes
    assert not any(elements(dp).values())
    assert "eth0" in k.netns[NETNS].links  # the pod end lives until the drain
    assert dp.park_pods([("c1", "eth0")]) == [None]  # a second DEL: nothing to do
    dp.delete_parked_veths()
    assert PARKED not in k.links and "eth0" not in k.netns[NETNS].links and dp.list_parked_veths() == []
    dp.delete_parked_veths()  # none left: nothing to do


@pytest.mark.parametrize("parked", [False, True], ids=["control-live", "parked"])
def test_a_stale_reconcile_gives_a_parked_veth_no_route_nor_element(parked):
    """A reconcile from a state that still names the pod (read before its
    DEL): a parked veth is no pod veth, so it gets nothing back. The
    control: the same reconcile keeps a live pod's route and elements."""
    dp = attached()
    stale = node(PodEndpoint(V4.ip.ip, HOST, ip_v6=V6.ip.ip))
    if parked:
        assert dp.park_pods([("c1", "eth0")]) == [None]
    assert not dp.reconcile(stale).errors
    routes = [r for r in dp.kernel.routes.values() if r.dev in (HOST, PARKED)]
    if parked:
        assert routes == [] and not any(elements(dp).values())
        assert dp.list_parked_veths() == [PARKED]  # the reconcile leaves it to the drain
    else:
        assert {r.dst.prefixlen for r in routes} == {32, 128} and all(elements(dp).values())


# ----- the agent ---------------------------------------------------------------------


@pytest.fixture()
def agent(cluster, tmp_path):  # noqa: F811 - the fixture imported above
    url, store = cluster
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    yield agent, dp, store, url
    agent.shutdown()


def cni(agent, command: str, cid: str, netns: str) -> tuple[int, dict | None]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0", "CNI_NETNS": netns,
           "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=" + cid}
    config = {"cniVersion": "1.1.0", "name": "overlaycni", "type": "overlaycni", "socket": agent.opts.socket}
    return shim.run(env, json.dumps(config))


def hold_drain(agent, monkeypatch) -> None:
    """The batcher never idles into a drain (the test decides when it runs)."""
    monkeypatch.setattr(agent.node.ops.quarantine, "due", lambda: None)


@pytest.mark.parametrize("drain_first", [True, False], ids=["drain-first", "control-no-drain"])
def test_a_re_add_of_the_same_attachment_after_del_succeeds(agent, monkeypatch, drain_first):
    """The pod's eth0 outlives the DEL while its veth is parked: the re-ADD
    drains first (the parked veth, then the walk, then the release). The
    control, without the drain before the ADD, fails: the interface exists."""
    agent, dp, store, _url = agent
    hold_drain(agent, monkeypatch)
    assert cni(agent, "ADD", "p", "/var/run/netns/p")[0] == 0
    assert cni(agent, "DEL", "p", "/var/run/netns/p") == (0, None)
    q = agent.node.ops.quarantine
    assert dp.list_parked_veths() == [parked_veth_name(host_veth_name("p", "eth0"))] and q.status()["parked"] == 1
    assert len(q) == 1 and dp.list_pod_veths() == []
    if not drain_first:
        monkeypatch.setattr(q, "needed_by", lambda *a, **kw: False)
        monkeypatch.setattr(q, "delete_parked", lambda: None)
    code, res = cni(agent, "ADD", "p", "/var/run/netns/p")
    if drain_first:
        assert code == 0, res
        assert dp.list_parked_veths() == [] and len(q) == 0 and q.status()["parked"] == 0
        assert ipam.check(store, "c1").ok
    else:
        assert code != 0 and "exists" in json.dumps(res), res


@pytest.mark.parametrize("parked_left", [True, False], ids=["parked", "control-deleted"])
def test_an_add_into_the_namespace_a_parked_veth_holds_deletes_it_and_retries(agent, monkeypatch, parked_left):
    """Another container ID into the same namespace (and ifname) right after
    a DEL: the parked veth's pod end still holds eth0; the batch deletes the
    parked veths and attaches again. The control: with the parked veths
    already deleted the first attach succeeds at once."""
    agent, dp, store, _url = agent
    hold_drain(agent, monkeypatch)
    assert cni(agent, "ADD", "a", "/var/run/netns/shared")[0] == 0
    assert cni(agent, "DEL", "a", "/var/run/netns/shared") == (0, None)
    if not parked_left:
        agent.node.ops.quarantine.delete_parked()
    before = list(dp.kernel.batches)
    code, res = cni(agent, "ADD", "b", "/var/run/netns/shared")
    assert code == 0, res
    setups = [op for op in dp.kernel.batches[len(before):] if op[0] == "setup_pod_links"]
    assert len(setups) == (2 if parked_left else 1)
    assert dp.list_parked_veths() == [] and dp.list_pod_veths() == [host_veth_name("b", "eth0")]
    agent.node.ops.quarantine.drain()
    assert ipam.check(store, "c1").ok and sorted(a.container_id for a in ipam.list_allocations(store, "c1")) == ["b"]


@pytest.mark.parametrize("restart", [True, False], ids=["restart", "control-no-restart"])
def test_parked_veths_left_by_a_crash_go_at_start_and_the_reaper_releases(agent, tmp_path, monkeypatch, restart):
    """A SIGKILL after a DEL: the quarantine (memory) is lost, the parked veth
    stays. A new agent deletes it before its first reconcile and the reaper
    releases the allocation (its pod veth is gone). The control: the kernel
    as the crash left it, before any restart, still has the parked veth."""
    from overlaycni.agent.daemon import Agent
    from overlaycni.agent.reaper import Reaper
    from overlaycni.datastore import open_datastore

    agent, dp, store, url = agent
    hold_drain(agent, monkeypatch)
    assert cni(agent, "ADD", "p", "/var/run/netns/p")[0] == 0
    assert cni(agent, "DEL", "p", "/var/run/netns/p") == (0, None)
    monkeypatch.setattr(agent.node.ops.quarantine, "drain", lambda: None)  # the crash: it never drains
    agent.shutdown()
    assert dp.list_parked_veths() and [a.container_id for a in ipam.list_allocations(store, "c1")] == ["p"]
    if not restart:
        return
    again = Agent(agent.opts, store=open_datastore(url), dataplane=dp)
    again.start()
    try:
        assert dp.list_parked_veths() == [] and "p" not in dp.kernel.netns.get("/var/run/netns/p").links
        reaper = Reaper(again.node.ops, grace=0.0)
        reaper.sweep()
        assert [r.container_id for r in reaper.sweep() + list(reaper.recent)] == ["p"]
        assert ipam.list_allocations(store, "c1") == [] and ipam.check(store, "c1").ok
    finally:
        again.shutdown()


def test_the_reaper_deletes_parked_leftovers_only_when_nothing_is_parked(agent, monkeypatch):
    agent, dp, _store, _url = agent
    hold_drain(agent, monkeypatch)
    from overlaycni.agent.reaper import Reaper

    assert cni(agent, "ADD", "p", "/var/run/netns/p")[0] == 0
    assert cni(agent, "DEL", "p", "/var/run/netns/p") == (0, None)
    reaper = Reaper(agent.node.ops, grace=60.0)
    reaper.sweep()
    assert dp.list_parked_veths()  # control: the quarantine's own, left to its drain
    monkeypatch.setattr(type(agent.node.ops.quarantine), "parked_count", property(lambda self: 0))  # a crash's
    reaper.sweep()
    assert dp.list_parked_veths() == []
