"""Group commit of concurrent CNI requests (issue 14, item 2): the agent with
the in-memory data plane behind a real worker thread and a real SQLite
store, driven through the real shim. A batch is made deterministic by
holding the batcher inside one attach while the other requests queue up
(never by timing). The kernel versions are tests/kernel/test_cni_batch.py."""

from __future__ import annotations

import threading
from ipaddress import IPv4Address

from overlaycni import ipam
from overlaycni.agent.batch import Batcher, Job
from overlaycni.agent.commit import Commit
from overlaycni.agent.daemon import Agent, AgentOptions
from overlaycni.dataplane import host_veth_name
from overlaycni.datastore import open_datastore
from overlaycni.errors import CNI_IP_UNAVAILABLE
from tests.unit.test_agent import cluster, drained, wait_for  # noqa: F401 (cluster is a fixture)
from tests.unit.test_agent_cniops import WorkerFake, agent1, block_attach, cni, start, used  # noqa: F401


def setups(dp) -> list[int]:
    """Sizes of the data plane's pod batches so far."""
    return [n for op, n in dp.kernel.batches if op == "setup_pod_links"]


class Burst:
    """Requests sent from threads; ``results[name]`` is each one's (code, answer)."""

    def __init__(self, agent):
        self.agent, self.results, self.threads = agent, {}, []
        self._lock = threading.Lock()

    def send(self, name, command, cid, **kw):
        def go():
            res = cni(self.agent, command, cid, **kw)
            with self._lock:
                self.results[name] = res

        t = threading.Thread(target=go)
        t.start()
        self.threads.append(t)

    def join(self):
        for t in self.threads:
            t.join(15)
        assert not any(t.is_alive() for t in self.threads)


def held(agent, dp, cid="first"):
    """Hold the batcher inside an attach (``cid`` being added); returns the event that lets it go."""
    entered, release = block_attach(dp)
    burst = Burst(agent)
    burst.send("first", "ADD", cid)
    assert entered.wait(5)
    return burst, release


def test_one_batch_one_failure_the_others_succeed(cluster, tmp_path):  # noqa: F811
    url, store = cluster
    agent, dp = start(url, tmp_path)
    try:
        burst, release = held(agent, dp)
        batcher = agent.node.ops.batcher
        dp.kernel.refused_netns["/tmp/fifo"] = "is a FIFO, not a network namespace"
        burst.send("refused", "ADD", "refused", netns="/tmp/fifo")  # refused before it reaches the batcher
        for i in range(6):
            burst.send(f"p{i}", "ADD", f"p{i}")
        burst.send("vanishes", "ADD", "vanishes", netns="/var/run/netns/V")
        assert wait_for(lambda: batcher.queued() == 7)
        dp.remove_netns("/var/run/netns/V")  # checked and queued, then gone before the kernel work: fails in the batch
        release.set()
        burst.join()
        r = burst.results
        assert r["refused"][0] == 1 and r["refused"][1]["code"] == 4, r["refused"]
        assert r["vanishes"][0] == 1 and r["vanishes"][1]["code"] == 3, r["vanishes"]
        assert all(r[f"p{i}"][0] == 0 for i in range(6)) and r["first"][0] == 0
        assert setups(dp)[-1] == 7  # the six and the one that failed, in one data-plane batch
        ips = {r[f"p{i}"][1]["ips"][0]["address"] for i in range(6)}
        assert len(ips) == 6
        good = {"first", *(f"p{i}" for i in range(6))}
        assert set(used(store)) == good  # the failed one's address was released, only its
        assert set(dp.list_pod_veths()) == {host_veth_name(c, "eth0") for c in good}
        assert ipam.check(store, "c1").ok
        assert not agent.node.ops.locks.busy(host_veth_name("vanishes", "eth0"))
        # DELs together: one park, then (the drain) one delete of the parked veths, one conntrack walk, one release
        burst, release = held(agent, dp, "blocker")
        for c in sorted(good - {"first"}):
            burst.send(f"del-{c}", "DEL", c)
        assert wait_for(lambda: batcher.queued() == 6)
        release.set()
        burst.join()
        assert all(burst.results[f"del-{c}"] == (0, None) for c in good - {"first"})
        assert drained(agent)  # the quarantine: their addresses flushed together, then released
        ops = dp.kernel.batches
        assert ("park_pod_links", 6) in ops
        assert ops.index(("park_pod_links", 6)) < ops.index(("delete_parked_links", 6)) < ops.index(("flush_addresses", 6))
        assert not dp.list_parked_veths() and agent.node.ops.quarantine.status()["parked"] == 0
        assert set(used(store)) == {"first", "blocker"} and ipam.check(store, "c1").ok
    finally:
        agent.shutdown()


def test_add_then_del_of_one_attachment_in_one_window(cluster, tmp_path):  # noqa: F811
    url, store = cluster
    agent, dp = start(url, tmp_path)
    try:
        batcher = agent.node.ops.batcher
        burst, release = held(agent, dp)
        burst.send("add", "ADD", "x")
        assert wait_for(lambda: batcher.queued() == 1)
        burst.send("del", "DEL", "x")  # waits for the ADD: it holds the attachment
        assert wait_for(lambda: agent.node.ops.locks.busy(host_veth_name("x", "eth0")))
        release.set()
        burst.join()
        # the end state shows the order they were applied in (the answers' order does not: the ADD's
        # caller still waits for its policy pass after the DEL, released when the ADD settled, is answered)
        assert burst.results["add"][0] == 0 and burst.results["del"] == (0, None)
        assert drained(agent)
        assert "x" not in used(store) and host_veth_name("x", "eth0") not in dp.list_pod_veths()  # ADD, then DEL
        # control: the other order ends with the pod attached
        burst, release = held(agent, dp, "blocker")
        burst.send("del", "DEL", "y")
        assert wait_for(lambda: batcher.queued() == 1)
        burst.send("add", "ADD", "y")
        assert wait_for(lambda: agent.node.ops.locks.busy(host_veth_name("y", "eth0")))
        release.set()
        burst.join()
        assert "y" in used(store) and host_veth_name("y", "eth0") in dp.list_pod_veths()
        assert ipam.check(store, "c1").ok
    finally:
        agent.shutdown()


def test_jobs_of_one_attachment_never_share_a_batch(cluster, tmp_path):  # noqa: F811
    """Below the locks: the batcher itself keeps a second job of an attachment for the next batch, in order."""
    url, store = cluster
    agent, dp = start(url, tmp_path)
    try:
        ctx = agent.node.ctx
        b = Batcher(Commit(store, dp, cluster="c1", node=ctx.record.name, kernel_lock=threading.RLock(), on_bad=print))
        entered, release = block_attach(dp)
        key = host_veth_name("z", "eth0")
        jobs = [Job("ADD", "w", "eth0", host_veth_name("w", "eth0"), netns="/var/run/netns/w", mtu=1450),
                Job("ADD", "z", "eth0", key, netns="/var/run/netns/z", mtu=1450),
                Job("DEL", "z", "eth0", key), Job("ADD", "z", "eth0", key, netns="/var/run/netns/z2", mtu=1450)]
        out = {}
        threads = [threading.Thread(target=lambda j=j: out.setdefault(id(j), b.run(j))) for j in jobs]
        threads[0].start()
        assert entered.wait(5)
        for t in threads[1:]:
            t.start()
        assert wait_for(lambda: b.queued() == 3)
        release.set()
        for t in threads:
            t.join(10)
        assert b.batches == 4  # w; then z's ADD; its DEL; its second ADD (each waits for the one before)
        assert set(used(store)) == {"w", "z"} and dp.kernel.netns["/var/run/netns/z2"].links  # the last ADD stands
        assert "eth0" not in dp.kernel.netns["/var/run/netns/z"].links
        b.close()
    finally:
        agent.shutdown()


def start_on(url, tmp_path, store, **opts):
    """The agent of node n1 on ``store`` (a wrapper of the cluster's)."""
    dp = WorkerFake(underlay_ip=IPv4Address("10.224.0.4"))
    agent = Agent(AgentOptions(cluster="c1", node="n1", node_ip=IPv4Address("10.224.0.4"), datastore=url,
                               socket=str(tmp_path / "n1.sock"), metrics_addr=None, lease_ttl=5, resync_interval=60,
                               reap_interval=0, **opts), store=store, dataplane=dp)  # fmt: skip
    agent.start()
    return agent, dp


class RacingStore:
    """The agent's store; just before the first batch transaction with several
    allocations, another node takes the handle of attachment ``victim``."""

    def __init__(self, inner, victim):
        self.inner, self.victim, self.fired = inner, victim, False

    def transact(self, **kw):
        if not self.fired and sum(1 for k, *_ in kw.get("put", ()) if "/handles/" in k) >= 3:
            self.fired = True
            ipam.allocate(self.inner, "c1", "n2", self.victim, "eth0")
        return self.inner.transact(**kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_conflicting_datastore_write_fails_one_attachment(cluster, tmp_path):  # noqa: F811
    url, store = cluster
    ipam.register_node(store, "c1", "n2", IPv4Address("10.224.0.5"))
    racing = RacingStore(open_datastore(url), "c2")
    agent, dp = start_on(url, tmp_path, racing)
    try:
        burst, release = held(agent, dp)
        for i in range(4):
            burst.send(f"c{i}", "ADD", f"c{i}")
        assert wait_for(lambda: agent.node.ops.batcher.queued() == 4)
        release.set()
        burst.join()
        r = burst.results
        assert racing.fired
        assert r["c2"][0] == 1 and r["c2"][1]["code"] == CNI_IP_UNAVAILABLE and "'n2'" in r["c2"][1]["msg"], r["c2"]
        assert all(r[c][0] == 0 for c in ("c0", "c1", "c3", "first")), r
        assert set(used(store)) == {"first", "c0", "c1", "c3"} and used(store, "n2") == {"c2": used(store, "n2")["c2"]}
        assert host_veth_name("c2", "eth0") not in dp.list_pod_veths() and ipam.check(store, "c1").ok
    finally:
        agent.shutdown()


class StalledStore:
    """The agent's store; the first reservation transaction waits for ``go`` (the batcher stalls in the datastore)."""

    def __init__(self, inner):
        self.inner, self.entered, self.go = inner, threading.Event(), threading.Event()

    def transact(self, **kw):
        if not self.entered.is_set() and any("/handles/" in k for k, *_ in kw.get("put", ())):
            self.entered.set()
            self.go.wait(10)
        return self.inner.transact(**kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_given_up_jobs_are_skipped_or_undone_and_keep_their_lock(cluster, tmp_path):  # noqa: F811
    url, store = cluster
    stalled = StalledStore(open_datastore(url))
    agent, dp = start_on(url, tmp_path, stalled, request_deadline=0.4)
    locks = agent.node.ops.locks
    try:
        burst = Burst(agent)
        burst.send("first", "ADD", "first")
        assert stalled.entered.wait(5)
        burst.send("queued", "ADD", "queued")
        burst.join()  # both answered 11: "first" inside its batch, "queued" before its batch started
        assert burst.results["first"][1]["code"] == 11 and burst.results["queued"][1]["code"] == 11
        assert locks.busy(host_veth_name("first", "eth0"))  # the batcher still works on it: it keeps the lock
        assert not locks.busy(host_veth_name("queued", "eth0"))
        stalled.go.set()  # the reservation is made after its caller left: the batcher takes it back
        assert wait_for(lambda: not locks.busy(host_veth_name("first", "eth0")))
        assert used(store) == {} and dp.list_pod_veths() == []
        assert setups(dp) == []  # neither reached the data plane
        assert cni(agent, "ADD", "first")[0] == 0 and cni(agent, "ADD", "queued")[0] == 0  # control
        assert set(used(store)) == {"first", "queued"} and ipam.check(store, "c1").ok
    finally:
        agent.shutdown()


def test_a_lone_request_is_a_batch_of_one(agent1):  # noqa: F811
    agent, dp, store = agent1
    for c in ("a", "b"):
        assert cni(agent, "ADD", c)[0] == 0
    assert setups(dp) == [1, 1] and agent.node.ops.batcher.batches == 2
