"""Repeated and racing CNI requests, rollback, reaping and the policy wait
(issue 10, items 1, 2, 5, 7, 8, 9), with the in-memory data plane and a real
SQLite store, driven through the real shim. No root needed; the kernel
versions are tests/kernel/test_cni_hardening.py and test_cni_limits.py."""

from __future__ import annotations

import json
import threading
from ipaddress import IPv4Address

import pytest

from overlaycni import ipam
from overlaycni.agent import reaper as reaper_mod
from overlaycni.agent.daemon import Agent, AgentOptions
from overlaycni.agent.reaper import Reaper
from overlaycni.cni import shim
from overlaycni.dataplane import host_veth_name
from overlaycni.dataplane.fake import FakeDataplane
from overlaycni.dataplane.linux.netns import NetnsWorker
from overlaycni.datastore import open_datastore
from overlaycni.errors import PolicyApplyError
from overlaycni.policy import parse_policies, records
from tests.unit.test_agent import cluster, drained, isolated, wait_for  # noqa: F401 (cluster is a fixture)


class WorkerFake(FakeDataplane):
    """The fake kernel behind a real worker thread (``NetnsWorker(None)``, no
    namespace switch), as ``LinuxDataplane`` queues its pod calls: a slow
    attach then holds up the worker and meets the request's deadline."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.worker = NetnsWorker(None)

    def attach_pod(self, **kw):
        return self.worker.call(lambda: super(WorkerFake, self).attach_pod(**kw))

    def detach_pod(self, **kw):
        return self.worker.call(lambda: super(WorkerFake, self).detach_pod(**kw))

    def attach_pods(self, pods):
        return self.worker.call(lambda: super(WorkerFake, self).attach_pods(pods))

    def detach_pods(self, pods):
        return self.worker.call(lambda: super(WorkerFake, self).detach_pods(pods))

    def list_pod_veths(self):
        return self.worker.call(lambda: super(WorkerFake, self).list_pod_veths())

    def park_pods(self, pods):
        return self.worker.call(lambda: super(WorkerFake, self).park_pods(pods))

    def delete_parked_veths(self):
        return self.worker.call(lambda: super(WorkerFake, self).delete_parked_veths())

    def close(self):
        self.worker.close()


def deny_all(store, namespace="default") -> None:
    (pol,) = parse_policies(
        f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny, namespace: {namespace}}}\n"
        "spec: {podSelector: {}, policyTypes: [Ingress]}\n"
    )
    records.save_policies(store, "c1", policies=[pol])


def policy_in_table(dp) -> bool:
    table = dp.kernel.nft_table("inet", "overlaycni")
    return table is not None and "in-ns-default" in table.chains


def start(url, tmp_path, name="n1", ip="10.224.0.4", **opts):
    dp = WorkerFake(underlay_ip=IPv4Address(ip))
    o = AgentOptions(cluster="c1", node=name, node_ip=IPv4Address(ip), datastore=url,
                     socket=str(tmp_path / f"{name}.sock"), metrics_addr=None, lease_ttl=5, resync_interval=60,
                     **{"reap_interval": 0, **opts})
    agent = Agent(o, store=open_datastore(url), dataplane=dp)
    agent.start()
    return agent, dp


def cni(agent, command, cid="a", *, netns=None, ifname="eth0", namespace="default", **conf):
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname,
           "CNI_NETNS": netns or f"/var/run/netns/{cid}", "CNI_ARGS": f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={cid}"}
    config = {"cniVersion": "1.0.0", "name": "overlaycni", "type": "overlaycni", "socket": agent.opts.socket, **conf}
    return shim.run(env, json.dumps(config))


def used(store, node="n1"):
    return {a.container_id: str(a.ip.ip) for a in ipam.list_allocations(store, "c1", node=node)}


@pytest.fixture()
def agent1(cluster, tmp_path):  # noqa: F811
    url, store = cluster
    agent, dp = start(url, tmp_path)
    yield agent, dp, store
    agent.shutdown()


def block_attach(dp):
    """Make the next pod attach wait until the returned event is set (an ADD in flight)."""
    entered, release = threading.Event(), threading.Event()
    pods = dp.p.pods
    real = pods.setup_pod_link

    def slow(**kw):
        entered.set()
        release.wait(10)
        pods.setup_pod_link = real
        return real(**kw)

    pods.setup_pod_link = slow
    return entered, release


# ----- item 1: CNI_NETNS refused before anything is done ------------------------------------


def test_refused_netns_changes_nothing(agent1):
    agent, dp, store = agent1
    dp.kernel.refused_netns["/tmp/fifo"] = "is a FIFO, not a network namespace"
    code, err = cni(agent, "ADD", "a", netns="/tmp/fifo")
    assert code == 1 and err["code"] == 4 and "CNI_NETNS /tmp/fifo" in err["msg"], err
    assert used(store) == {} and dp.list_pod_veths() == []
    assert cni(agent, "ADD", "b")[0] == 0  # control: the node keeps serving


# ----- item 2: repeated ADD, DEL scope -------------------------------------------------------


def test_repeated_add_never_undoes_the_first(agent1):
    agent, dp, store = agent1
    code, res = cni(agent, "ADD", "a", netns="/var/run/netns/A")
    assert code == 0, res
    first = used(store)
    veth = host_veth_name("a", "eth0")
    dp.remove_netns("/var/run/netns/gone")
    for netns, want in (("/var/run/netns/A", 7), ("/var/run/netns/B", 4), ("/var/run/netns/gone", 3)):
        code, err = cni(agent, "ADD", "a", netns=netns)
        assert code == 1 and err["code"] == want, (netns, err)
        assert used(store) == first and dp.list_pod_veths() == [veth], netns
        assert "eth0" in dp.kernel.netns["/var/run/netns/A"].links  # the first pod's interface is intact


def test_a_stale_allocation_is_reattached_and_kept_on_failure(agent1):
    agent, dp, store = agent1
    assert cni(agent, "ADD", "a", netns="/var/run/netns/A")[0] == 0
    ip = used(store)["a"]
    dp.remove_netns("/var/run/netns/A")  # the sandbox died without a DEL: allocation, no veth
    dp.kernel.fail_next["setup_pod_link"] = RuntimeError("boom")
    assert cni(agent, "ADD", "a", netns="/var/run/netns/A2")[0] == 1
    assert used(store) == {"a": ip}  # the failed ADD did not make the reservation: it keeps it
    code, res = cni(agent, "ADD", "a", netns="/var/run/netns/A3")
    assert code == 0 and res["ips"][0]["address"].startswith(ip + "/"), res


def test_a_failed_fresh_add_releases_its_address(agent1):
    agent, dp, store = agent1
    dp.kernel.fail_next["apply_routes"] = RuntimeError("route refused")
    code, _ = cni(agent, "ADD", "a")
    assert code == 1 and used(store) == {} and dp.list_pod_veths() == []


def test_del_releases_only_this_nodes_allocation_and_flushes_conntrack(cluster, tmp_path):  # noqa: F811
    url, store = cluster
    a1, dp1 = start(url, tmp_path, "n1", "10.224.0.4")
    a2, dp2 = start(url, tmp_path, "n2", "10.224.0.5")
    try:
        assert cni(a2, "ADD", "p")[0] == 0
        assert cni(a1, "ADD", "q")[0] == 0
        ip_p = IPv4Address(used(store, "n2")["p"])
        assert cni(a1, "DEL", "p") == (0, None)  # on the wrong node: nothing of n2's is released
        assert used(store, "n2") == {"p": str(ip_p)} and dp2.list_pod_veths() == [host_veth_name("p", "eth0")]
        other = IPv4Address("10.224.9.9")
        dp2.kernel.conntrack |= {(ip_p, other), (other, ip_p), (other, IPv4Address("10.244.200.2"))}
        assert cni(a2, "DEL", "p") == (0, None)  # control: its own node releases it
        assert drained(a2)
        assert used(store, "n2") == {} and dp2.kernel.conntrack == {(other, IPv4Address("10.244.200.2"))}
        assert cni(a1, "DEL", "q") == (0, None)
    finally:
        a2.shutdown()
        a1.shutdown()


def test_del_after_cluster_delete_succeeds(agent1):
    agent, dp, store = agent1
    assert cni(agent, "ADD", "a")[0] == 0
    ipam.delete_cluster(store, "c1")
    assert cni(agent, "DEL", "a") == (0, None)
    assert dp.list_pod_veths() == []
    assert cni(agent, "DEL", "a") == (0, None)


# ----- item 8 and locks: reaper, GC ---------------------------------------------------------


def test_reaper_waits_for_the_first_grace_to_end_not_a_whole_interval(cluster, tmp_path):  # noqa: F811
    url, _ = cluster
    agent, dp = start(url, tmp_path)
    now = [1000.0]
    reaper = Reaper(agent.node.ops, grace=30, clock=lambda: now[0])
    try:
        assert reaper.next_wait(120) == 120  # control: nothing noted, the interval
        assert cni(agent, "ADD", "gone", netns="/var/run/netns/G")[0] == 0
        dp.remove_netns("/var/run/netns/G")
        assert reaper.sweep() == [] and reaper.status()["pending"] == 1
        assert reaper.next_wait(120) == 30  # its grace ends first
        assert reaper.next_wait(10) == 10  # the interval when that is sooner
        now[0] += 29.9
        assert reaper.next_wait(120) == reaper_mod.MIN_WAIT  # never a tight loop
        now[0] += 0.2
        assert [r.container_id for r in reaper.sweep()] == ["gone"] and reaper.next_wait(120) == 120
    finally:
        agent.shutdown()


@pytest.mark.parametrize("grace", [0.2, 3600.0], ids=["released", "noted-within-grace"])
def test_an_agent_passes_its_reaper_at_start(cluster, tmp_path, grace):  # noqa: F811
    """What a crash left (an allocation without a veth: the DEL quarantine is
    memory) is noted by the reaper's pass at start, not a whole interval
    later, and released once its grace ends (soak: a SIGKILL right after a
    DEL held the address for interval + grace, 4 minutes by default)."""
    url, store = cluster
    agent, _ = start(url, tmp_path)
    try:
        assert cni(agent, "ADD", "gone")[0] == 0
    finally:
        agent.shutdown()
    agent, dp = start(url, tmp_path, reap_interval=3600, reap_grace=grace)  # a new kernel: its veth is gone
    try:
        assert host_veth_name("gone", "eth0") not in dp.list_pod_veths()
        if grace < 1:
            assert wait_for(lambda: "gone" not in used(store))
            assert agent.node.reaper.status()["total"] == 1
        else:
            assert wait_for(lambda: agent.node.reaper.status()["pending"] == 1)  # noted at once
            assert "gone" in used(store)  # and held within its grace
    finally:
        agent.shutdown()


def test_reaper_releases_a_vanished_pod_after_grace_never_an_add_in_flight(cluster, tmp_path):  # noqa: F811
    url, store = cluster
    agent, dp = start(url, tmp_path, request_deadline=30)
    now = [1000.0]
    reaper = Reaper(agent.node.ops, grace=30, clock=lambda: now[0])
    try:
        assert cni(agent, "ADD", "gone", netns="/var/run/netns/G")[0] == 0
        assert cni(agent, "ADD", "live")[0] == 0
        dp.remove_netns("/var/run/netns/G")
        kernel = agent.node.kernel_lock
        kernel.acquire()  # "busy" gets its address and its lock, then waits for the kernel: in flight
        adder = threading.Thread(target=lambda: cni(agent, "ADD", "busy"))
        adder.start()
        try:
            assert wait_for(lambda: "busy" in used(store))
            assert reaper.sweep() == []  # first seen without a veth: within the grace period
            now[0] += 31
            reaped = reaper.sweep()
            assert [r.container_id for r in reaped] == ["gone"]
            assert {"busy", "live"} <= set(used(store))  # in flight / alive: kept
            now[0] += 100
            assert reaper.sweep() == []  # still in flight: never reaped
        finally:
            kernel.release()
            adder.join(10)
        assert set(used(store)) == {"live", "busy"} and host_veth_name("busy", "eth0") in dp.list_pod_veths()
        assert reaper.sweep() == [] and reaper.status()["total"] == 1 and reaper.status()["pending"] == 0
    finally:
        agent.shutdown()


def test_gc_waits_for_an_add_in_flight(agent1):
    agent, dp, store = agent1
    entered, release = block_attach(dp)
    results = {}
    adder = threading.Thread(target=lambda: results.update(add=cni(agent, "ADD", "new")))
    adder.start()
    assert entered.wait(5)
    gc = threading.Thread(target=lambda: results.update(gc=cni(agent, "GC", **{
        "cni.dev/valid-attachments": [{"containerID": "new", "ifname": "eth0"}]})))
    gc.start()
    gc.join(0.3)
    assert gc.is_alive()  # GC waits while the ADD holds its attachment
    release.set()
    adder.join(10)
    gc.join(10)
    assert results["add"][0] == 0 and results["gc"] == (0, None)
    assert dp.list_pod_veths() == [host_veth_name("new", "eth0")] and set(used(store)) == {"new"}


# ----- item 9: one deadline, rollback ----------------------------------------------------------


def test_past_the_deadline_add_answers_11_and_leaves_nothing(cluster, tmp_path):  # noqa: F811
    url, store = cluster
    agent, dp = start(url, tmp_path, request_deadline=0.5)
    try:
        entered, release = block_attach(dp)
        threading.Timer(0.8, release.set).start()  # the attach finishes after the deadline (0.5 s), within the rollback budget
        code, err = cni(agent, "ADD", "slow")
        assert code == 1 and err["code"] == 11 and "deadline" in err["msg"], err
        assert used(store) == {}
        assert wait_for(lambda: release.is_set() and dp.list_pod_veths() == [])  # the late attach was undone
        assert cni(agent, "ADD", "slow")[0] == 0  # control: the retry works
    finally:
        agent.shutdown()


# ----- item 5: ADD returns after the policy pass ---------------------------------------------


def test_add_returns_only_once_policy_holds_the_pod(agent1):
    agent, dp, store = agent1
    deny_all(store)
    assert wait_for(lambda: policy_in_table(dp))
    code, res = cni(agent, "ADD", "web")
    assert code == 0, res
    assert isolated(dp, IPv4Address(res["ips"][0]["address"].split("/")[0]))  # already: no waiting here
    code, res = cni(agent, "ADD", "other", namespace="elsewhere")  # control: no policy selects it
    assert code == 0 and not isolated(dp, IPv4Address(res["ips"][0]["address"].split("/")[0]))


def test_a_failed_policy_pass_fails_the_add_and_rolls_it_back(agent1, monkeypatch):
    agent, dp, store = agent1
    deny_all(store)
    assert wait_for(lambda: policy_in_table(dp))
    controller = agent.node.policy
    real = controller.sync

    def broken(*, full=False):
        raise PolicyApplyError("nft refused the table")

    monkeypatch.setattr(controller, "sync", broken)
    code, err = cni(agent, "ADD", "web")
    assert code == 1 and err["code"] == 102 and "could not be programmed" in err["msg"], err
    assert used(store) == {} and dp.list_pod_veths() == []
    monkeypatch.setattr(controller, "sync", real)
    assert cni(agent, "ADD", "web")[0] == 0  # control
