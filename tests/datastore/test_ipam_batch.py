"""Group commit in IPAM (``ipam.podbatch``) on every store: a batch of
attachments reserved and released in one transaction, with the answers of
``reserve``/``release`` per attachment, and one attachment's problem
(a conflicting write, a taken address, a full block) failing that
attachment alone. Batches larger than etcd's 128 operations per
transaction are split."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from overlaycni import ipam
from overlaycni.config import parse_network
from overlaycni.datastore.keys import handle_key, ip_key
from overlaycni.errors import AddressUnavailable, BadRecord, ConfigError, PoolExhausted
from overlaycni.ipam import Reservation
from overlaycni.ipam.podbatch import TXN_ATTACHMENTS

IP = IPv4Address


def _cluster(store, size=24):
    ipam.create_cluster(store, "c", parse_network({"network-plugin": "azure", "network-plugin-mode": "overlay",
                                                   "node-cidr-size": size, "max-pods": min(250, (1 << (32 - size)) - 3)}))
    ipam.register_node(store, "c", "n1", IP("10.224.0.4"))
    ipam.register_node(store, "c", "n2", IP("10.224.0.5"))


class Spy:
    """The store, counting transactions; ``before_txn`` runs once before the first."""

    def __init__(self, inner, before_txn=None):
        self.inner, self.before_txn, self.txns = inner, before_txn, 0

    def transact(self, **kw):
        if self.before_txn is not None:
            hook, self.before_txn = self.before_txn, None
            hook()
        self.txns += 1
        return self.inner.transact(**kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_batch_is_one_transaction_and_repeats_are_the_same(store):
    _cluster(store)
    spy = Spy(store)
    wanted = [Reservation(f"p{i}", "eth0", pod=("default", f"p{i}")) for i in range(30)]
    got = ipam.reserve_many(spy, "c", "n1", wanted)
    assert spy.txns == 1
    assert all(isinstance(r, tuple) and r[1] for r in got), got
    ips = [r[0].ip.ip for r in got]
    assert len(set(ips)) == 30 and ipam.check(store, "c").ok
    assert [ipam.get_allocation(store, "c", f"p{i}", "eth0").ip.ip for i in range(30)] == ips
    again = ipam.reserve_many(spy, "c", "n1", wanted)  # repeated ADDs: the same addresses, not made now
    assert [(r[0].ip.ip, r[1]) for r in again] == [(ip, False) for ip in ips] and spy.txns == 1
    single = ipam.reserve(store, "c", "n1", "p30", "eth0")  # the cursor moved past the batch
    assert single[0].ip.ip not in ips and single[1]


def test_larger_than_one_transaction_is_split(store):
    _cluster(store, size=23)
    spy = Spy(store)
    n = 2 * TXN_ATTACHMENTS + 5  # 85 allocations: 340 operations, more than etcd takes in one transaction
    got = ipam.reserve_many(spy, "c", "n1", [Reservation(f"p{i}", "eth0") for i in range(n)])
    assert spy.txns == 3 and len({r[0].ip.ip for r in got}) == n
    assert ipam.check(store, "c").ok
    released = ipam.release_many(spy, "c", [(f"p{i}", "eth0") for i in range(n)], node="n1")
    assert [r.ip.ip for r in released] == [r[0].ip.ip for r in got] and spy.txns == 6
    assert ipam.list_allocations(store, "c") == [] and ipam.check(store, "c").ok


def test_each_attachment_gets_its_own_answer(store):
    _cluster(store)
    ipam.allocate(store, "c", "n2", "elsewhere", "eth0")
    taken = ipam.allocate(store, "c", "n1", "holder", "eth0").ip.ip
    wanted = [
        Reservation("ok1", "eth0"),
        Reservation("bad id!", "eth0"),
        Reservation("elsewhere", "eth0"),  # held on n2
        Reservation("want-taken", "eth0", requested_ip=taken),
        Reservation("want-outside", "eth0", requested_ip=IP("10.244.77.7")),
        Reservation("want-free", "eth0", requested_ip=IP("10.244.0.200")),
        Reservation("twice", "eth0", requested_ip=IP("10.244.0.201")),
        Reservation("twice-too", "eth0", requested_ip=IP("10.244.0.201")),
        Reservation("ok1", "eth0"),  # the same attachment again in the batch
        Reservation("ok2", "eth0"),
    ]
    got = ipam.reserve_many(store, "c", "n1", wanted)
    assert isinstance(got[1], ConfigError) and "container" in str(got[1])
    assert isinstance(got[2], AddressUnavailable) and "'n2'" in str(got[2])
    assert isinstance(got[3], AddressUnavailable) and "already in use" in str(got[3])
    assert isinstance(got[4], AddressUnavailable) and "not a usable address" in str(got[4])
    assert got[5][0].ip.ip == IP("10.244.0.200") and got[6][0].ip.ip == IP("10.244.0.201")
    assert isinstance(got[7], AddressUnavailable)
    assert got[8] == (got[0][0], False) and got[9][1] and got[9][0].ip.ip not in (taken, got[0][0].ip.ip)
    held = {a.container_id for a in ipam.list_allocations(store, "c", node="n1")}
    assert held == {"holder", "ok1", "ok2", "want-free", "twice"}  # nothing for the failed ones
    assert ipam.check(store, "c").ok


def test_a_conflicting_write_fails_only_its_attachment(store):
    """Between the batch's read and its transaction another writer gives
    "x" an address on node n2 and takes the batch's first candidate: the
    transaction fails, the retry answers "x" alone with its conflict and
    allocates the others past the taken address."""
    _cluster(store)
    cursor_next = ipam.reserve(store, "c", "n1", "probe", "eth0")[0].ip.ip + 1
    ipam.release(store, "c", "probe", "eth0")

    def meanwhile():
        ipam.allocate(store, "c", "n2", "x", "eth0")
        ipam.allocate(store, "c", "n1", "intruder", "eth0", requested_ip=cursor_next)

    spy = Spy(store, before_txn=meanwhile)
    got = ipam.reserve_many(spy, "c", "n1", [Reservation(c, "eth0") for c in ("a", "x", "b", "c")])
    assert spy.txns == 2  # the first transaction failed on the conflicts, the second is the retry
    assert isinstance(got[1], AddressUnavailable) and "'n2'" in str(got[1])
    ips = [got[i][0].ip.ip for i in (0, 2, 3)]
    assert len(set(ips)) == 3 and cursor_next not in ips and all(got[i][1] for i in (0, 2, 3))
    assert ipam.get_allocation(store, "c", "x", "eth0").node == "n2"  # the other writer's is untouched
    assert ipam.check(store, "c").ok


def test_a_handle_written_meanwhile_on_this_node_is_returned_not_made(store):
    _cluster(store)
    spy = Spy(store, before_txn=lambda: ipam.allocate(store, "c", "n1", "y", "eth0"))
    got = ipam.reserve_many(spy, "c", "n1", [Reservation("y", "eth0"), Reservation("z", "eth0")])
    assert got[0] == (ipam.get_allocation(store, "c", "y", "eth0"), False)  # not ours: a failed ADD must not release it
    assert got[1][1] and got[1][0].ip.ip != got[0][0].ip.ip
    assert ipam.check(store, "c").ok


def test_a_full_block_fails_the_attachments_that_do_not_fit(store):
    _cluster(store, size=28)  # 13 usable addresses
    got = ipam.reserve_many(store, "c", "n1", [Reservation(f"p{i}", "eth0") for i in range(16)])
    ok = [r for r in got if isinstance(r, tuple)]
    full = [r for r in got if isinstance(r, PoolExhausted)]
    assert len(ok) == 13 and len(full) == 3 and got[-1] in full
    assert ipam.check(store, "c").ok


def test_release_many_per_attachment(store):
    _cluster(store)
    mine = [ipam.allocate(store, "c", "n1", f"p{i}", "eth0") for i in range(5)]
    other = ipam.allocate(store, "c", "n2", "q", "eth0")
    # a half-written pair: the handle rewritten without its address key (a crash between two writes)
    h_k = handle_key("c", "p4", "eth0")
    store.put(h_k, store.get(h_k).value)
    keys = [(f"p{i}", "eth0") for i in range(5)] + [("q", "eth0"), ("never", "eth0"), ("p0", "eth0")]
    got = ipam.release_many(store, "c", keys, node="n1")
    assert got[:4] == mine[:4] and got[4].ip == mine[4].ip  # the half-written one through ipam.release
    assert got[5:] == [None, None, None]  # another node's, never allocated, the duplicate
    assert ipam.list_allocations(store, "c") == [other]
    assert store.get(ip_key("c", "n1", mine[4].ip.ip)) is None
    assert ipam.check(store, "c").ok
    assert ipam.release_many(store, "c", keys[:5], node="n1") == [None] * 5  # idempotent


def test_get_allocations_reads_every_handle_once(store):
    _cluster(store)
    a = ipam.allocate(store, "c", "n1", "a", "eth0")
    store.put(handle_key("c", "bad", "eth0"), "not json")
    got = ipam.get_allocations(store, "c", [("a", "eth0"), ("none", "eth0"), ("bad", "eth0")])
    assert got[:2] == [a, None] and isinstance(got[2], BadRecord)


@pytest.mark.parametrize("n", [1, 7])
def test_batch_matches_one_by_one(store, n):
    """Control: the same attachments reserved one at a time in a twin cluster get the batch's addresses."""
    _cluster(store)
    ipam.create_cluster(store, "d", parse_network({"network-plugin": "azure", "network-plugin-mode": "overlay"}))
    ipam.register_node(store, "d", "n1", IP("10.224.0.4"))
    got = ipam.reserve_many(store, "c", "n1", [Reservation(f"p{i}", "eth0") for i in range(n)])
    one = [ipam.reserve(store, "d", "n1", f"p{i}", "eth0")[0].ip for i in range(n)]
    assert [r[0].ip for r in got] == one
