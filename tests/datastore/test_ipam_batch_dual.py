"""Group commit in a dual-stack cluster (``ipam.podbatch6``) on every store:
each attachment of a batch gets one IPv4 and one IPv6 address from its
node's blocks, the whole batch in one transaction; release frees both; a
requested address of either family that is taken, outside the block or of
a family the cluster lacks fails that attachment alone; a conflicting write
between the read and the transaction is retried from the windows of used
addresses the failed transaction returned."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from overlaycni import ipam
from overlaycni.config import parse_network
from overlaycni.datastore.keys import handle_key, ip_key
from overlaycni.errors import AddressUnavailable, ConfigError
from overlaycni.ipam import Reservation
from overlaycni.ipam.podbatch6 import TXN_ATTACHMENTS

from .test_ipam_batch import Spy, _cluster

DUAL = {"network-plugin": "azure", "network-plugin-mode": "overlay", "ip-families": "ipv4,ipv6"}


def _dual(store):
    ipam.create_cluster(store, "d", parse_network(DUAL))
    n1 = ipam.register_node(store, "d", "n1", IPv4Address("10.224.0.4"))
    ipam.register_node(store, "d", "n2", IPv4Address("10.224.0.5"))
    return n1


def test_a_dual_stack_batch_is_one_transaction_with_both_families(store):
    n1 = _dual(store)
    spy = Spy(store)
    wanted = [Reservation(f"p{i}", "eth0", pod=("default", f"p{i}")) for i in range(12)]
    got = ipam.reserve_many(spy, "d", "n1", wanted)
    assert spy.txns == 1
    assert all(isinstance(r, tuple) and r[1] for r in got), got
    allocs = [r[0] for r in got]
    assert len({a.ip.ip for a in allocs}) == 12 and len({a.ip_v6.ip for a in allocs}) == 12
    assert all(a.ip.ip in n1.block and a.ip_v6.ip in n1.block_v6 for a in allocs)
    assert all(store.get(ip_key("d", "n1", a.ip_v6.ip)) is not None for a in allocs)
    assert [ipam.get_allocation(store, "d", f"p{i}", "eth0") for i in range(12)] == allocs
    assert ipam.check(store, "d").ok
    again = ipam.reserve_many(spy, "d", "n1", wanted)  # repeated ADDs: the same pairs, not made now
    assert [r for r in again] == [(a, False) for a in allocs] and spy.txns == 1
    single = ipam.reserve(store, "d", "n1", "p12", "eth0")[0]  # both cursors moved past the batch
    assert single.ip.ip not in {a.ip.ip for a in allocs} and single.ip_v6.ip not in {a.ip_v6.ip for a in allocs}
    released = ipam.release_many(spy, "d", [(f"p{i}", "eth0") for i in range(12)], node="n1")
    assert released == allocs and spy.txns == 2  # one transaction, every address of both families
    assert all(store.get(ip_key("d", "n1", ip)) is None for a in allocs for ip in a.ips)
    assert [a.container_id for a in ipam.list_allocations(store, "d")] == ["p12"] and ipam.check(store, "d").ok


def test_larger_than_one_dual_stack_transaction_is_split(store):
    _dual(store)
    spy = Spy(store)
    n = 2 * TXN_ATTACHMENTS + 3  # six operations per dual-stack allocation: 43 of them exceed etcd's 128
    got = ipam.reserve_many(spy, "d", "n1", [Reservation(f"p{i}", "eth0") for i in range(n)])
    assert spy.txns == 3 and len({r[0].ip_v6.ip for r in got}) == n and ipam.check(store, "d").ok


def test_each_dual_stack_attachment_gets_its_own_answer(store):
    n1 = _dual(store)
    v6 = n1.block_v6
    held = ipam.allocate(store, "d", "n1", "holder", "eth0")
    free6 = IPv6Address(int(v6.network_address) + 300)
    wanted = [
        Reservation("ok", "eth0"),
        Reservation("want-taken6", "eth0", requested_ips=(held.ip_v6.ip,)),
        Reservation("want-outside6", "eth0", requested_ips=(IPv6Address("fd12:3456:789a:0:7::9"),)),
        Reservation("want-both", "eth0", requested_ips=(IPv4Address("10.244.0.200"), free6)),
        Reservation("want-same", "eth0", requested_ips=(free6,)),  # another of the batch asked first
        Reservation("two-v6", "eth0", requested_ips=(free6, IPv6Address(int(free6) + 1))),
    ]
    got = ipam.reserve_many(store, "d", "n1", wanted)
    assert isinstance(got[0], tuple) and got[0][0].ip_v6 is not None
    assert isinstance(got[1], AddressUnavailable) and "already in use" in str(got[1])
    assert isinstance(got[2], AddressUnavailable) and "not a usable address" in str(got[2])
    assert (got[3][0].ip.ip, got[3][0].ip_v6.ip) == (IPv4Address("10.244.0.200"), free6)
    assert isinstance(got[4], AddressUnavailable)
    assert isinstance(got[5], ConfigError) and "one address per family" in str(got[5])
    for failed in ("want-taken6", "want-outside6", "want-same", "two-v6"):  # nothing of them was written
        assert store.get(handle_key("d", failed, "eth0")) is None
    assert ipam.check(store, "d").ok


def test_ipv6_requested_in_a_single_stack_batch_fails_alone(store):
    _cluster(store)
    got = ipam.reserve_many(store, "c", "n1", [
        Reservation("v4", "eth0"), Reservation("v6", "eth0", requested_ips=(IPv6Address("fd00::5"),))])
    assert isinstance(got[0], tuple) and got[0][0].ip_v6 is None
    assert isinstance(got[1], ConfigError) and "no IPv6 block" in str(got[1])
    assert store.get(handle_key("c", "v6", "eth0")) is None


def test_a_full_block_fails_the_attachments_past_it(store):
    """A /28 IPv4 block runs out (an IPv6 /80 cannot): the attachments past
    its capacity get PoolExhausted, the others their pair of addresses, and
    nothing half-made remains (no IPv6 address without its IPv4 one)."""
    ipam.create_cluster(store, "t", parse_network({**DUAL, "node-cidr-size": 28, "max-pods": 13}))
    ipam.register_node(store, "t", "n1", IPv4Address("10.224.0.4"))
    got = ipam.reserve_many(store, "t", "n1", [Reservation(f"p{i}", "eth0") for i in range(16)])
    ok = [r for r in got if isinstance(r, tuple)]
    assert len(ok) == 13 and all(r[0].ip_v6 is not None for r in ok)
    assert all("is full" in str(r) for r in got if not isinstance(r, tuple))
    assert len(ipam.list_allocations(store, "t")) == 13 and ipam.check(store, "t").ok


def test_a_conflicting_write_in_a_dual_stack_batch_is_retried(store):
    """Between the batch's read and its transaction another writer gives "x"
    a pair on node n2 and takes the batch's first candidates of both
    families on n1: the transaction fails, the retry (from the window of
    used addresses per family it returned) answers "x" alone with its
    conflict and allocates the others past the taken pair."""
    _dual(store)
    taken: list = []

    def meanwhile():
        ipam.allocate(store, "d", "n2", "x", "eth0")
        taken.extend(ipam.allocate(store, "d", "n1", "intruder", "eth0").ips)

    spy = Spy(store, before_txn=meanwhile)
    got = ipam.reserve_many(spy, "d", "n1", [Reservation(c, "eth0") for c in ("a", "x", "b")])
    assert spy.txns == 2  # the first transaction failed on the conflicts, the second is the retry
    assert isinstance(got[1], AddressUnavailable) and "'n2'" in str(got[1])
    mine = [ip for i in (0, 2) for ip in got[i][0].ips]
    assert len(set(mine)) == 4 and not set(mine) & set(taken) and all(got[i][1] for i in (0, 2))
    assert ipam.get_allocation(store, "d", "x", "eth0").node == "n2"  # the other writer's is untouched
    assert ipam.check(store, "d").ok


def test_a_requested_ipv6_address_taken_meanwhile_fails_alone(store):
    n1 = _dual(store)
    want6 = IPv6Address(int(n1.block_v6.network_address) + 500)
    spy = Spy(store, before_txn=lambda: ipam.allocate(store, "d", "n1", "thief", "eth0", requested_ips=(want6,)))
    got = ipam.reserve_many(spy, "d", "n1", [Reservation("want", "eth0", requested_ips=(want6,)),
                                             Reservation("other", "eth0")])
    assert spy.txns == 2
    assert isinstance(got[0], AddressUnavailable) and "already in use" in str(got[0])
    assert got[1][1] and want6 not in got[1][0].ips
    assert store.get(handle_key("d", "want", "eth0")) is None and ipam.check(store, "d").ok
