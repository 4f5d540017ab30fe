"""The DEL quarantine (issue 14, item 3; ``agent.quarantine``): a DEL is
answered once the pod's veth is gone, and its address stays allocated until
its conntrack entries are flushed. The agent with the in-memory data plane
behind a real worker thread and a real SQLite store, driven through the real
shim. A drain is held back deterministically by making the conntrack flush
fail (never by timing); each test has a control that breaks the quarantine
and shows the test fails. The kernel versions are in
tests/kernel/test_cni_batch.py."""

from __future__ import annotations

from ipaddress import IPv4Address, ip_interface

import pytest

from overlaycni import ipam
from overlaycni.agent import quarantine as quarantine_mod
from overlaycni.agent.daemon import Agent, AgentOptions
from overlaycni.agent.reaper import Reaper
from overlaycni.config import parse_network
from overlaycni.datastore import open_datastore
from overlaycni.errors import CNI_IPAM_EXHAUSTED, CNI_TRY_AGAIN_LATER, DataplaneError
from tests.unit.test_agent import drained
from tests.unit.test_agent_cniops import WorkerFake, cni, used

OTHER = IPv4Address("10.224.9.9")  # a peer the pods talked to
CAPACITY = 13  # pods in a /28 block


@pytest.fixture()
def small(tmp_path, monkeypatch):
    """A cluster with small node blocks (/28: 13 pods), and failed drains retried only when asked."""
    monkeypatch.setattr(quarantine_mod, "RETRY_SECONDS", 3600.0)
    url = f"sqlite://{tmp_path}/state.db"
    store = open_datastore(url)
    ipam.create_cluster(store, "c1", parse_network({"pod-cidr": "10.244.0.0/24", "node-cidr-size": 28,
                                                     "network-plugin": "azure", "network-plugin-mode": "overlay", "max-pods": 13}))
    yield url, store
    store.close()


class Gate:
    """The data plane's conntrack flush, failing while ``shut`` (the kernel refuses it)."""

    def __init__(self, dp):
        self.dp, self.shut, self.real = dp, False, dp.flush_conntrack_many
        dp.flush_conntrack_many = self

    def __call__(self, ips):
        if self.shut:
            raise DataplaneError("conntrack entries: refused (test)")
        return self.real(ips)


def start(url, tmp_path, dp=None, **opts):
    dp = dp or WorkerFake(underlay_ip=IPv4Address("10.224.0.4"))
    o = AgentOptions(cluster="c1", node="n1", node_ip=IPv4Address("10.224.0.4"), datastore=url,
                     socket=str(tmp_path / "n1.sock"), metrics_addr=None, lease_ttl=5, resync_interval=60,
                     reap_interval=0, **opts)
    agent = Agent(o, store=open_datastore(url), dataplane=dp)
    agent.start()
    return agent, dp


def address(res) -> IPv4Address:
    return ip_interface(res["ips"][0]["address"]).ip


def stale(dp, ip) -> set:
    """The conntrack entries that name ``ip``."""
    return {e for e in dp.kernel.conntrack if ip in e}


def break_quarantine(monkeypatch, what):
    """The controls: ``release`` frees a DEL's address at once without its flush
    (a DEL answered early with no quarantine); ``skip`` never drains before an
    ADD of the same attachment."""
    if what == "release":
        def put(self, allocs):
            for a in allocs:
                ipam.release(self.store, self.cluster, a.container_id, a.ifname, node=self.node)
        monkeypatch.setattr(quarantine_mod.Quarantine, "put", put)
    else:
        monkeypatch.setattr(quarantine_mod.Quarantine, "needed_by", lambda self, attachment, requested=(): False)


@pytest.mark.parametrize("control", [False, True], ids=["quarantine", "control-released-at-once"])
def test_a_quarantined_address_is_never_handed_out_before_its_flush(small, tmp_path, monkeypatch, control):
    url, store = small
    if control:
        break_quarantine(monkeypatch, "release")
    agent, dp = start(url, tmp_path)
    gate = Gate(dp)
    try:
        pods = {}
        for i in range(CAPACITY):
            code, res = cni(agent, "ADD", f"p{i}")
            assert code == 0, res
            pods[f"p{i}"] = address(res)
        code, res = cni(agent, "ADD", "full")
        assert code == 1 and res["code"] == CNI_IPAM_EXHAUSTED, res  # the block is full
        a = pods["p0"]
        dp.kernel.conntrack |= {(a, OTHER), (OTHER, a), (OTHER, pods["p1"])}
        gate.shut = True  # the flush fails: p0's address cannot leave the quarantine
        assert cni(agent, "DEL", "p0") == (0, None)  # answered once the veth is gone
        assert len(dp.list_pod_veths()) == CAPACITY - 1
        code, res = cni(agent, "ADD", "new")  # the pool is full but for p0's address: a drain is tried, and fails
        if control:
            assert code == 0 and address(res) == a and stale(dp, a), res  # the old pod's flows, inherited
            return
        assert code == 1 and res["code"] == CNI_IPAM_EXHAUSTED, res
        assert used(store)["p0"] == str(a) and "new" not in used(store)  # still held, never handed out
        status = agent.node.ops.quarantine.status()
        assert status["held"] == 1 and status["addresses"] == [str(a)] and "refused" in status["last_error"]
        gate.shut = False
        code, res = cni(agent, "ADD", "new")  # the pool-full drain flushes, releases, and the ADD gets it
        assert code == 0 and address(res) == a, res
        assert stale(dp, a) == set() and stale(dp, pods["p1"])  # only p0's flows went
        assert "p0" not in used(store) and ipam.check(store, "c1").ok
        assert agent.node.ops.quarantine.status()["held"] == 0
    finally:
        agent.shutdown()


@pytest.mark.parametrize("control", [False, True], ids=["quarantine", "control-no-drain-first"])
def test_an_add_of_the_same_attachment_after_del_succeeds_with_a_clean_address(small, tmp_path, monkeypatch, control):
    url, store = small
    if control:
        break_quarantine(monkeypatch, "skip")
    agent, dp = start(url, tmp_path)
    gate = Gate(dp)
    try:
        code, res = cni(agent, "ADD", "p")
        assert code == 0, res
        a = address(res)
        dp.kernel.conntrack |= {(a, OTHER), (OTHER, a)}
        gate.shut = True
        assert cni(agent, "DEL", "p") == (0, None)
        code, res = cni(agent, "ADD", "p")  # the same container ID and ifname, while its address is quarantined
        if control:
            assert code == 0 and address(res) == a and stale(dp, a), res  # its old allocation and flows, back
            return
        assert code == 1 and res["code"] == CNI_TRY_AGAIN_LATER and "try again" in res["msg"], res  # flush failed
        assert used(store) == {"p": str(a)} and dp.list_pod_veths() == []
        gate.shut = False
        code, res = cni(agent, "ADD", "p")  # the drain runs first, inside the ADD's batch
        assert code == 0, res
        assert stale(dp, address(res)) == set() and stale(dp, a) == set()
        assert len(dp.list_pod_veths()) == 1 and ipam.check(store, "c1").ok
        assert cni(agent, "DEL", "p") == (0, None) and cni(agent, "DEL", "p") == (0, None)  # DEL stays idempotent
        assert drained(agent) and used(store) == {} and ipam.check(store, "c1").ok
    finally:
        agent.shutdown()


@pytest.mark.parametrize("control", [False, True], ids=["reaped", "control-no-reaper"])
def test_addresses_quarantined_at_a_crash_are_flushed_and_released_by_the_reaper(small, tmp_path, control):
    """A SIGKILL loses the in-memory quarantine: what is left is an allocation
    without a veth (a stop that cannot drain leaves the same), which the
    restarted agent's reaper flushes and releases."""
    url, store = small
    agent, dp = start(url, tmp_path)
    gate = Gate(dp)
    try:
        ips = {}
        for cid in ("a", "b", "live"):
            code, res = cni(agent, "ADD", cid)
            assert code == 0, res
            ips[cid] = address(res)
        dp.kernel.conntrack |= {(ips["a"], OTHER), (OTHER, ips["b"]), (OTHER, ips["live"])}
        gate.shut = True
        assert cni(agent, "DEL", "a") == (0, None) and cni(agent, "DEL", "b") == (0, None)
        assert agent.node.ops.quarantine.status()["held"] == 2
    finally:
        agent.shutdown()  # its last drain fails too: the quarantine dies with the agent
    assert set(used(store)) == {"a", "b", "live"}  # held: never handed out meanwhile
    gate.shut = False
    dp.worker = type(dp.worker)(None)  # the fake kernel lives on; a new worker for the new agent
    agent, dp = start(url, tmp_path, dp=dp)
    try:
        assert agent.node.ops.quarantine.status()["held"] == 0  # memory is gone
        if not control:
            reaped = Reaper(agent.node.ops, grace=0).sweep()
            assert sorted(r.container_id for r in reaped) == ["a", "b"]
        assert stale(dp, ips["live"])  # another pod's flows stay either way
        done = used(store) == {"live": str(ips["live"])} and not stale(dp, ips["a"]) and not stale(dp, ips["b"])
        assert done != control
        assert ipam.check(store, "c1").ok
    finally:
        agent.shutdown()
