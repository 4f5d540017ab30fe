"""Races between a pod's ADD/DEL and the other writers of the node's kernel
state, forced deterministically (no sleeps, no threads racing for real).

* The fake kernel's nftables: a transaction on one table (the policy
  controller's ``inet overlaycni``, applied outside the kernel lock) must not
  undo a transaction on another table (an ADD's ``pod_endpoints`` elements)
  committed while it ran. The kernel serialises transactions and each only
  touches the tables it names; the fake once copied *every* table at the
  start of a transaction and put the copy back at its end, losing what
  another thread committed in between (the one-off CHECK failure "anti-spoofing
  element ... is missing from ip6 pod_endpoints" of
  ``test_cni_dual.py::test_agent_add_check_del_in_a_dual_stack_cluster``).
* A reconcile from a state older than a DEL (the repairer reconciles to the
  last full resync's state) must not put the deleted pod's elements back.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, IPv6Network

import pytest

from overlaycni.dataplane import FakeDataplane, fake, host_veth_name, policytable
from overlaycni.dataplane.model import NodeState, PodEndpoint
from overlaycni.families import PodAddress
from tests.unit.test_agent import cluster, start_agent  # noqa: F401 (cluster is a fixture)

ME = IPv4Address("10.224.0.4")
V4 = PodAddress(IPv4Interface("10.244.1.5/24"), IPv4Address("10.244.1.1"))
V6 = PodAddress(IPv6Interface("fd12:3456:789a:0:1::5/80"), IPv6Address("fe80::1"))
BLOCK6 = IPv6Network("fd12:3456:789a:0:1::/80")
NETNS = "/var/run/netns/p1"
HOST = host_veth_name("c1", "eth0")
POLICY_TABLE = [{"add": {"table": {"family": policytable.FAMILY, "name": policytable.TABLE}}}]


def node(*pods: PodEndpoint) -> NodeState:
    return NodeState(node_ip=ME, block=V4.ip.network, pod_cidr=V4.ip.network.supernet(8), block_v6=BLOCK6,
                     pod_cidr_v6=BLOCK6.supernet(16), pods=pods)


def ready() -> FakeDataplane:
    dp = FakeDataplane(underlay_ip=ME)
    assert not dp.reconcile(node()).errors
    return dp


def attach(dp: FakeDataplane) -> None:
    dp.attach_pod(container_id="c1", ifname="eth0", netns_path=NETNS, addresses=(V4, V6), mtu=1450)


def check(dp: FakeDataplane) -> list[str]:
    return dp.check_pod(container_id="c1", ifname="eth0", netns_path=NETNS, addresses=(V4, V6))


@pytest.mark.parametrize("add_inside", [False, True], ids=["add-after", "add-during"])
def test_a_transaction_on_another_table_keeps_an_add_committed_meanwhile(monkeypatch, add_inside):
    """The policy table's transaction is held open (between its start and its
    commit) while the ADD commits its elements: the interleaving of the
    policy thread and a CNI batch, run on one thread. ``add-after`` is the
    control: the same two transactions one after the other."""
    dp = ready()
    real = fake._nft_apply
    done = []

    def policy_then_add(tables, commands):
        real(tables, commands)
        if add_inside and not done and commands == POLICY_TABLE:
            done.append(True)
            attach(dp)  # commits while the policy transaction is still open

    monkeypatch.setattr(fake, "_nft_apply", policy_then_add)
    dp.p.policy_nft.apply(POLICY_TABLE)
    if not add_inside:
        attach(dp)
    assert check(dp) == []
    k = dp.kernel
    assert k.nft_table("ip6", "overlaycni").sets["pod_endpoints"] == frozenset({(HOST, V6.ip.ip)})
    assert k.nft_table("ip", "overlaycni").sets["pod_endpoints"] == frozenset({(HOST, V4.ip.ip)})
    assert k.nft_table(policytable.FAMILY, policytable.TABLE) is not None  # and the policy table is there


def test_a_failed_transaction_changes_no_table():
    """All-or-nothing still holds, per transaction, across the tables it names."""
    dp = ready()
    attach(dp)
    before = {key: t.state() for key, t in dp.kernel.nft_tables.items()}
    bad = [{"add": {"element": {"family": "ip6", "table": "overlaycni", "name": "pod_endpoints",
                                 "elem": [{"concat": ["oc0000000000009", "fd12:3456:789a:0:1::9"]}]}}},
           {"add": {"element": {"family": "ip", "table": "overlaycni", "name": "no_such_set", "elem": ["10.0.0.1"]}}}]
    with pytest.raises(fake.DataplaneError):
        dp.p.nft.apply(bad)
    assert {key: t.state() for key, t in dp.kernel.nft_tables.items()} == before


def test_a_stale_reconcile_does_not_restore_a_deleted_pods_elements():
    """The repairer reconciles to the last full resync's state: a pod deleted
    since is still in it. Its veth is gone, so are its routes (the kernel
    dropped them); its anti-spoofing elements must stay gone too (a re-ADD
    of the same attachment, the same veth name, would otherwise inherit the
    old address's element). The control: a pod whose veth is live keeps its
    elements through the same reconcile."""
    dp = ready()
    attach(dp)
    stale = node(PodEndpoint(V4.ip.ip, HOST, ip_v6=V6.ip.ip))
    assert not dp.reconcile(stale).errors
    assert check(dp) == []  # control: live, so kept
    dp.detach_pod(container_id="c1", ifname="eth0", netns_path=NETNS)
    assert not dp.reconcile(stale).errors  # the state still names the deleted pod
    k = dp.kernel
    for family in ("ip", "arp", "ip6"):
        assert k.nft_table(family, "overlaycni").sets["pod_endpoints"] == frozenset(), family
    assert not [r for r in k.routes.values() if r.dev == HOST]


# ----- the agent: a stale pod list must not undo a re-ADD of the same attachment --------------
#
# A DEL then an ADD of the same attachment (same container ID and ifname: the
# same host veth name) with another address. A reconcile whose pod list was
# read before them names the veth with its *old* address: without the
# attachments the CNI batches made since, it removes the new address's
# anti-spoofing element (the pod's traffic is dropped until the next resync)
# and routes the old address (perhaps another pod's by now) into this pod.


@pytest.fixture()
def agent(cluster, tmp_path):  # noqa: F811 - the fixture imported above
    from overlaycni import ipam

    url, store = cluster
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    yield agent, dp, ipam.get_node(store, "c1", "n1").block
    agent.shutdown()


def _readd(agent, block, last: int) -> dict:
    """DEL pod p, then ADD it again asking for ``block``'s address ``.last``."""
    from .test_agent import cni, drained

    assert cni(agent, "DEL", cid="p") == (0, None)
    assert drained(agent)
    code, res = cni(agent, "ADD", cid="p", runtimeConfig={"ips": [str(block.network_address + last)]})
    assert code == 0, res
    return res


def _only_new_address(agent, dp, block, res) -> None:
    from .test_agent import cni

    assert cni(agent, "CHECK", cid="p", prevResult=res) == (0, None)
    veth = host_veth_name("p", "eth0")
    on_veth = sorted(str(r.dst) for r in dp.kernel.routes.values() if r.dev == veth)
    assert on_veth == [f"{block.network_address + 9}/32"]
    assert {e for e in dp.kernel.nft.sets["pod_endpoints"] if e[0] == veth} == {(veth, block.network_address + 9)}


@pytest.mark.parametrize("readd", [False, True], ids=["control", "re-add"])
def test_a_repair_from_the_last_resync_keeps_a_re_added_pod(agent, readd):
    from .test_agent import cni

    agent, dp, block = agent
    code, res = cni(agent, "ADD", cid="p", runtimeConfig={"ips": [str(block.network_address + 9 - readd)]})
    assert code == 0, res
    agent.node.resync()  # the state the repairer reconciles to now names p
    if readd:
        res = _readd(agent, block, 9)
    agent.repair.check()
    _only_new_address(agent, dp, block, res)
    agent.node.resync()  # the next resync reads the new allocation itself: the log is empty again
    _only_new_address(agent, dp, block, res)
    assert len(agent.node.podlog) == 0


@pytest.mark.parametrize("readd", [False, True], ids=["control", "re-add"])
def test_a_resync_listed_before_a_re_add_keeps_it(agent, monkeypatch, readd):
    """The resync reads the allocations, then (the hook) the pod is deleted
    and added again, then the resync takes the kernel lock and programs what it read."""
    from overlaycni import ipam

    from .test_agent import cni

    agent, dp, block = agent
    code, res = cni(agent, "ADD", cid="p", runtimeConfig={"ips": [str(block.network_address + 9 - readd)]})
    assert code == 0, res
    real = ipam.list_allocations
    done: list[dict] = []

    def listed_then_readd(*args, **kw):
        got = real(*args, **kw)
        if readd and not done:
            done.append(_readd(agent, block, 9))
        return got

    monkeypatch.setattr(ipam, "list_allocations", listed_then_readd)
    agent.node.resync()
    _only_new_address(agent, dp, block, done[0] if done else res)
    assert len(agent.node.podlog) == 0


def test_the_pod_log_keeps_an_attachment_while_a_reconcile_that_read_before_it_runs():
    from overlaycni.agent.podlog import PodLog
    from overlaycni.ipam import Allocation

    def alloc(cid: str, last: int) -> Allocation:
        return Allocation(container_id=cid, ifname="eth0", ip=IPv4Interface(f"10.244.0.{last}/24"),
                          gateway=IPv4Address("10.244.0.1"), node="n1")

    log = PodLog()
    log.attached([])
    assert len(log) == 0  # an empty batch logs nothing
    with log.reading() as early:
        log.attached([alloc("a", 5)])
        with log.reading() as late:
            log.attached([alloc("a", 9), alloc("b", 6)])  # a again: the latest wins
            log.settled()  # a reconcile that read later settled: the early one still needs both entries
            assert len(log) == 2
            assert [str(a.ip) for a in log.merge([alloc("a", 7), alloc("c", 8)], early)] == [
                "10.244.0.8/24", "10.244.0.9/24", "10.244.0.6/24"]
            assert log.since(late) == log.since(early)
        assert len(log) == 2
    assert len(log) == 0 and log.since(0) == {}  # nobody needs them any more
