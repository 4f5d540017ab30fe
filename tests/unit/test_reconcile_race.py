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
