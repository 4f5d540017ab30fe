"""Dual-stack IPAM over a real (sqlite) store: node claims of both families,
one address per family per attachment in one transaction, release, check,
gc, and old records next to new ones."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network

import pytest

from overlaycni import ipam
from overlaycni.config import parse_network
from overlaycni.datastore import open_datastore
from overlaycni.datastore.keys import block_key, cursor_key, handle_key, ip_key, node_key, nodeblock_key
from overlaycni.errors import AddressUnavailable, ConfigError, DatastoreError
from overlaycni.ipam.records import address_value, handle_value

from .test_ipam_pods import CountingStore

ROOT = "/overlaycni/clusters/dual/"
DUAL = {"network-plugin": "azure", "network-plugin-mode": "overlay", "ip-families": "ipv4,ipv6"}
SINGLE = {"network-plugin": "azure", "network-plugin-mode": "overlay"}
V6 = IPv6Network("fd12:3456:789a::/64")


def v6_block(i: int) -> IPv6Network:
    return IPv6Network((int(V6.network_address) + (i << 48), 80))


@pytest.fixture
def store(tmp_path):
    s = open_datastore(f"sqlite://{tmp_path}/state.db")
    ipam.create_cluster(s, "dual", parse_network(DUAL))
    yield s
    s.close()


@pytest.fixture
def two_nodes(store):
    a = ipam.register_node(store, "dual", "n1", IPv4Address("10.224.0.4"))
    b = ipam.register_node(store, "dual", "n2", IPv4Address("10.224.0.5"))
    return a, b


# ----- node claims ----------------------------------------------------------------------------


def test_a_node_claims_both_blocks_at_the_same_index(store, two_nodes):
    a, b = two_nodes
    assert (a.block, a.block_v6) == (IPv4Network("10.244.0.0/24"), v6_block(0))
    assert (b.block, b.block_v6) == (IPv4Network("10.244.1.0/24"), v6_block(1))
    assert str(b.block_v6) == "fd12:3456:789a:0:1::/80"  # AKS's numbering: bits 64..79 are the node index
    assert store.get(nodeblock_key("dual", "n2")).value == "10.244.1.0/24,fd12:3456:789a:0:1::/80"
    assert store.get(block_key("dual", b.block_v6)).value == "n2"
    assert json.loads(store.get(node_key("dual", "n2")).value)["block_v6"] == "fd12:3456:789a:0:1::/80"
    assert ipam.get_node(store, "dual", "n2") == b
    assert ipam.list_claims(store, "dual")["n2"].blocks == (b.block, b.block_v6)
    assert ipam.list_blocks(store, "dual") == {"n1": a.block, "n2": b.block}
    # re-registering keeps both
    assert ipam.register_node(store, "dual", "n2", IPv4Address("10.224.0.5")) == b
    assert ipam.check(store, "dual").ok


def test_single_stack_records_are_written_as_before(tmp_path):
    s = open_datastore(f"sqlite://{tmp_path}/single.db")
    ipam.create_cluster(s, "c", parse_network(SINGLE))
    rec = ipam.register_node(s, "c", "n1", IPv4Address("10.224.0.4"))
    assert rec.block_v6 is None and rec.blocks == (rec.block,)
    assert s.get(nodeblock_key("c", "n1")).value == "10.244.0.0/24"
    assert "block_v6" not in json.loads(s.get(node_key("c", "n1")).value)
    assert rec.to_dict()["block_v6"] is None  # `node list -o json` shows it as null
    a = ipam.allocate(s, "c", "n1", "cid", "eth0")
    assert a.ip_v6 is None and a.addresses == (ipam.Allocation(a.ip, a.gateway, "cid", "eth0", "n1").addresses)
    assert set(json.loads(s.get(handle_key("c", "cid", "eth0")).value)) == {
        "node", "ip", "block", "pod_namespace", "pod_name"}
    with pytest.raises(ConfigError) as err:
        ipam.allocate(s, "c", "n1", "cid2", "eth0", requested_ips=[IPv6Address("fd12::5")])
    assert err.value.errors[0].field == "ip" and "single-stack" in err.value.message
    assert [kv.key for kv in s.list("/overlaycni/clusters/c/ips/")] == ["/overlaycni/clusters/c/ips/n1/010.244.000.002"]
    s.close()


def test_an_older_ipv4_only_claim_gains_its_ipv6_block_on_register(store):
    # a node registered into this dual-stack cluster by an agent that knew IPv4 only
    store.txn(compare=[], put=[
        (block_key("dual", IPv4Network("10.244.3.0/24")), "old", None),
        (nodeblock_key("dual", "old"), "10.244.3.0/24", None),
        (node_key("dual", "old"), json.dumps({"name": "old", "node_ip": "10.224.0.9", "block": "10.244.3.0/24",
                                             "vtep_mac": None}), None),
    ])
    old = ipam.get_node(store, "dual", "old")
    assert old.block_v6 is None  # the old record decodes
    a = ipam.allocate(store, "dual", "old", "before", "eth0")
    assert a.ip_v6 is None  # its claim has no IPv6 block yet: IPv4 only, never half of a pair
    rec = ipam.register_node(store, "dual", "old", IPv4Address("10.224.0.9"))
    assert (rec.block, rec.block_v6) == (IPv4Network("10.244.3.0/24"), v6_block(3))
    assert ipam.get_allocation(store, "dual", "before", "eth0") == a  # untouched
    b = ipam.allocate(store, "dual", "old", "after", "eth0")
    assert b.ip_v6 is not None and b.ip_v6.ip in v6_block(3)
    assert ipam.check(store, "dual").ok
    ipam.delete_node(store, "dual", "old")  # its two claims were written apart: both go
    assert store.get(block_key("dual", v6_block(3))) is None and store.get(block_key("dual", rec.block)) is None
    assert ipam.check(store, "dual").ok


def test_a_taken_ipv6_block_at_the_same_index_moves_to_the_next_free_one(store):
    # after an IPv4 pod CIDR expansion downwards, IPv4 block 0 is a new block whose
    # index meets the IPv6 block an older node holds
    n1 = ipam.register_node(store, "dual", "n1", IPv4Address("10.224.0.4"))
    assert n1.block_v6 == v6_block(0)
    ipam.expand_pod_cidr(store, "dual", "10.244.0.0/15")  # same start: indexes keep their meaning
    ipam.expand_pod_cidr(store, "dual", "10.240.0.0/12")  # 10.244.0.0/24 is now block 1024
    n2 = ipam.register_node(store, "dual", "n2", IPv4Address("10.224.0.5"))
    assert n2.block == IPv4Network("10.244.1.0/24")  # the cursor moves on from the last claim
    assert n2.block_v6 == v6_block(1025)
    store.put(ROOT + "blockcursor", "10.240.255.0/24")  # next candidate: 10.241.0.0/24, index 256
    store.txn(compare=[], put=[(block_key("dual", v6_block(256)), "someone", None)])
    n3 = ipam.register_node(store, "dual", "n3", IPv4Address("10.224.0.6"))
    assert n3.block == IPv4Network("10.241.0.0/24") and n3.block_v6 == v6_block(257)
    assert ipam.list_claims(store, "dual")["n3"].block_v6 == v6_block(257)


def test_delete_node_frees_both_blocks_and_addresses(store, two_nodes):
    _, b = two_nodes
    for i in range(5):
        ipam.allocate(store, "dual", "n2", f"p{i}", "eth0")
    ipam.delete_node(store, "dual", "n2")
    assert store.list(ROOT + "ips/n2/") == [] and store.list(ROOT + "handles/") == []
    assert store.get(block_key("dual", b.block_v6)) is None
    assert store.get(cursor_key("dual", "n2", version=6)) is None
    again = ipam.register_node(store, "dual", "n3", IPv4Address("10.224.0.6"))
    assert again.block_v6 == v6_block(2)  # the cursor moves on; n2's blocks are free for later
    assert ipam.check(store, "dual").ok


# ----- allocations --------------------------------------------------------------------------


def test_an_attachment_gets_one_address_per_family(store, two_nodes):
    a = ipam.allocate(store, "dual", "n2", "abc", "eth0", pod=("default", "web-0"))
    assert a.ip == IPv4Interface("10.244.1.2/24") and a.gateway == IPv4Address("10.244.1.1")
    assert a.ip_v6 == IPv6Interface("fd12:3456:789a:0:1::2/80") and a.gateway_v6 == IPv6Address("fe80::1")
    assert [str(x) for x in a.addresses] == ["10.244.1.2/24 via 10.244.1.1", "fd12:3456:789a:0:1::2/80 via fe80::1"]
    assert a.ips == (IPv4Address("10.244.1.2"), IPv6Address("fd12:3456:789a:0:1::2"))
    assert a.to_dict()["ip_v6"] == "fd12:3456:789a:0:1::2/80"
    keys = [kv.key for kv in store.list(ROOT + "ips/n2/")]
    assert keys == [ROOT + "ips/n2/010.244.001.002", ROOT + "ips/n2/fd12:3456:789a:0000:0001:0000:0000:0002"]
    assert store.get(cursor_key("dual", "n2", version=6)).value == "fd12:3456:789a:0:1::2"
    # idempotent, and the same from every reader
    assert ipam.allocate(store, "dual", "n2", "abc", "eth0") == a
    assert ipam.get_allocation(store, "dual", "abc", "eth0") == a
    assert ipam.list_allocations(store, "dual") == [a]
    b = ipam.allocate(store, "dual", "n2", "abc", "net1")
    assert b.ip.ip == IPv4Address("10.244.1.3") and b.ip_v6.ip == IPv6Address("fd12:3456:789a:0:1::3")
    report = ipam.check(store, "dual")
    assert report.ok and report.allocations == 2 and report.blocks == 4


def test_dual_allocation_costs_two_store_calls(store, two_nodes):
    counting = CountingStore(store)
    ipam.allocate(counting, "dual", "n1", "abc", "eth0")
    assert counting.calls == 2
    counting.calls = 0
    ipam.allocate(counting, "dual", "n1", "def", "eth0")
    assert counting.calls == 2


def test_a_taken_candidate_of_either_family_is_skipped_in_the_same_round_trip(store, two_nodes):
    ipam.allocate(store, "dual", "n1", "a", "eth0")
    # someone else's IPv6 addresses right after the cursor (not through this node's cursor)
    block6 = v6_block(0)
    for i in (3, 4, 5):
        ip = block6.network_address + i
        store.txn(compare=[], put=[(ip_key("dual", "n1", ip), address_value("x", f"e{i}", None), None)])
    counting = CountingStore(store)
    b = ipam.allocate(counting, "dual", "n1", "b", "eth0")
    assert b.ip.ip == IPv4Address("10.244.0.3") and b.ip_v6.ip == block6.network_address + 6
    assert counting.calls == 3  # read, a failed transaction that returned the window, the winner


def test_requested_addresses_one_per_family(store, two_nodes):
    a = ipam.allocate(store, "dual", "n1", "abc", "eth0",
                      requested_ips=[IPv6Address("fd12:3456:789a:0:0:0:0:99"), IPv4Address("10.244.0.77")])
    assert a.ip.ip == IPv4Address("10.244.0.77") and a.ip_v6.ip == IPv6Address("fd12:3456:789a::99")
    # only IPv4 asked for: IPv6 comes from its cursor
    b = ipam.allocate(store, "dual", "n1", "def", "eth0", requested_ip=IPv4Address("10.244.0.78"))
    assert b.ip_v6.ip == IPv6Address("fd12:3456:789a::2")
    with pytest.raises(ConfigError) as err:
        ipam.allocate(store, "dual", "n1", "x", "eth0", requested_ips=[IPv4Address("10.244.0.5"), IPv4Address("10.244.0.6")])
    assert "one address per family" in err.value.message and err.value.errors[0].field == "ip"
    with pytest.raises(AddressUnavailable, match="fd12:3456:789a::99"):
        ipam.allocate(store, "dual", "n1", "y", "eth0", requested_ips=[IPv6Address("fd12:3456:789a::99")])
    for bad in ("fd12:3456:789a::1", "fd12:3456:789a::", "fd12:3456:789a:0:1::5"):  # ::1, the anycast, n2's block
        with pytest.raises(AddressUnavailable, match="not a usable address"):
            ipam.allocate(store, "dual", "n1", "z", "eth0", requested_ips=[IPv6Address(bad)])
    assert ipam.get_allocation(store, "dual", "x", "eth0") is None
    assert ipam.get_allocation(store, "dual", "z", "eth0") is None
    assert ipam.check(store, "dual").ok


def test_release_frees_both_addresses(store, two_nodes):
    a = ipam.allocate(store, "dual", "n1", "abc", "eth0")
    assert ipam.release(store, "dual", "abc", "eth0") == a
    assert store.list(ROOT + "ips/") == [] and store.list(ROOT + "handles/") == []
    assert ipam.release(store, "dual", "abc", "eth0") is None
    # the cursors move forward: the next pod does not get the released pair back at once
    b = ipam.allocate(store, "dual", "n1", "def", "eth0")
    assert b.ip.ip == a.ip.ip + 1 and b.ip_v6.ip == a.ip_v6.ip + 1


def test_release_of_a_half_written_pair_drops_only_what_is_ours(store, two_nodes):
    a = ipam.allocate(store, "dual", "n1", "abc", "eth0")
    v6 = ip_key("dual", "n1", a.ip_v6.ip)
    kv = store.get(v6)
    store.txn(compare=[], put=[(v6, kv.value, None)])  # the IPv6 key now has another revision
    assert ipam.release(store, "dual", "abc", "eth0") is not None
    assert store.list(ROOT + "ips/") == [] and store.list(ROOT + "handles/") == []


def test_old_handles_and_addresses_decode(store, two_nodes):
    a, _ = two_nodes
    # an IPv4-only allocation as an older agent wrote it, in a dual-stack cluster
    ip = IPv4Address("10.244.0.9")
    store.txn(compare=[], put=[
        (ip_key("dual", "n1", ip), address_value("old", "eth0", ("default", "p")), None),
        (handle_key("dual", "old", "eth0"), handle_value("n1", ip, a.block, ("default", "p")), None),
    ])
    held = ipam.get_allocation(store, "dual", "old", "eth0")
    assert held.ip == IPv4Interface("10.244.0.9/24") and held.ip_v6 is None
    assert ipam.list_allocations(store, "dual") == [held]
    assert ipam.check(store, "dual").ok
    assert ipam.release(store, "dual", "old", "eth0") == held


# ----- check and gc ---------------------------------------------------------------------------


def test_check_finds_half_an_allocation_and_bad_ipv6_addresses(store, two_nodes):
    a = ipam.allocate(store, "dual", "n1", "abc", "eth0")
    store.delete(ip_key("dual", "n1", a.ip_v6.ip))  # half a pair
    problems = ipam.check(store, "dual").problems
    assert [p.kind for p in problems] == ["leak"]
    assert "points at fd12:3456:789a::2" in problems[0].message
    ipam.gc(store, "dual", [("abc", "eth0")])  # gc keeps what is valid, leaks and all
    bad = [
        (v6_block(1).network_address + 7, "outside-block"),  # n2's block, on n1
        (v6_block(0).network_address + 1, "reserved"),  # ::1 of n1's block
    ]
    for ip, _ in bad:
        store.txn(compare=[], put=[(ip_key("dual", "n1", ip), address_value("zz", "eth0", None), None)])
    kinds = {p.kind for p in ipam.check(store, "dual").problems}
    assert {"outside-block", "reserved", "leak"} <= kinds
    # an IPv6 address on two nodes
    dup = v6_block(0).network_address + 40
    for n in ("n1", "n2"):
        store.txn(compare=[], put=[(ip_key("dual", n, dup), address_value("d", "eth0", None), None)])
    assert any(p.kind == "duplicate" and str(dup) in p.message for p in ipam.check(store, "dual").problems)


def test_check_reports_a_missing_ipv6_claim_and_a_bad_key(store, two_nodes):
    _, b = two_nodes
    store.delete(block_key("dual", b.block_v6))
    problems = ipam.check(store, "dual").problems
    assert [p.kind for p in problems] == ["leak"] and str(b.block_v6) in problems[0].message
    store.put(ROOT + "ips/n1/fd12:3456:789a::5", json.dumps({"container_id": "c", "ifname": "eth0"}))  # not exploded
    assert "bad-record" in {p.kind for p in ipam.check(store, "dual").problems}


def test_gc_releases_both_families_and_sweeps_lone_ipv6_addresses(store, two_nodes):
    keep = ipam.allocate(store, "dual", "n1", "keep", "eth0")
    gone = ipam.allocate(store, "dual", "n1", "gone", "eth0")
    lone = v6_block(0).network_address + 50
    store.txn(compare=[], put=[(ip_key("dual", "n1", lone), address_value("lone", "eth0", None), None)])
    problems: list = []
    assert ipam.list_allocations(store, "dual", on_bad=problems.append) == [keep, gone]
    assert len(problems) == 1 and "has no IPv4 address beside it" in problems[0].problem
    released = ipam.gc(store, "dual", [("keep", "eth0")])
    assert released == [gone]
    assert [kv.key for kv in store.list(ROOT + "ips/")] == [ip_key("dual", "n1", ip) for ip in keep.ips]
    assert ipam.check(store, "dual", valid=[("keep", "eth0")]).ok


# ----- atomicity under lost replies ---------------------------------------------------------


class FlakyStore(CountingStore):
    """Every ``every``-th transaction fails: before it reaches the store, or
    after it committed (the reply was lost); alternately, or always ``how``."""

    def __init__(self, inner, every: int, how: str | None = None):
        super().__init__(inner)
        self.every, self.n, self.how = every, 0, how

    def transact(self, **kw):
        self.n += 1
        if self.n % self.every == 0:
            how = self.how or ("before" if (self.n // self.every) % 2 else "after")
            if how == "before":
                raise DatastoreError("injected: the request never arrived")
            self.inner.transact(**kw)
            raise DatastoreError("injected: the reply was lost")
        return self.inner.transact(**kw)


def test_lost_replies_never_leave_half_an_allocation(store, two_nodes):
    flaky = FlakyStore(store, every=3)
    for i in range(40):
        cid = f"p{i}"
        try:
            ipam.allocate(flaky, "dual", "n1", cid, "eth0")
        except DatastoreError:
            pass
        if i % 3 == 0:
            try:
                ipam.release(flaky, "dual", f"p{i // 2}", "eth0")
            except DatastoreError:
                pass
    allocs = ipam.list_allocations(store, "dual")
    assert all(a.ip_v6 is not None for a in allocs)
    assert len({a.ip for a in allocs}) == len({a.ip_v6 for a in allocs}) == len(allocs)
    assert ipam.check(store, "dual").ok


# ----- hypothesis: sequences of allocate / release over both families ------------------------

import tempfile  # noqa: E402

from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402

LOSE = st.sampled_from([None, None, "before", "after"])  # a lost request, or a lost reply
ATTACHMENTS = st.tuples(st.sampled_from([f"c{i}" for i in range(8)]), st.sampled_from(["eth0", "net1"]))


class DualIPAM(RuleBasedStateMachine):
    """Allocate and release in any order, on two nodes, some calls losing
    their reply: every attachment holds one address of each family or
    none, no address is held twice, and ``ipam check`` stays clean."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.store = open_datastore(f"sqlite://{self.dir.name}/state.db")
        net = parse_network({**DUAL, "node-cidr-size": 28, "node-cidr-size-v6": 124, "max-pods": 10})
        ipam.create_cluster(self.store, "dual", net)
        for i, n in enumerate(("n1", "n2")):
            ipam.register_node(self.store, "dual", n, IPv4Address(f"10.224.0.{4 + i}"))
        self.held: dict[tuple[str, str], ipam.Allocation] = {}

    def teardown(self) -> None:
        self.store.close()
        self.dir.cleanup()

    def _sync(self, att: tuple[str, str]) -> None:
        """After a lost reply the call may or may not have happened: ask."""
        now = ipam.get_allocation(self.store, "dual", *att)
        if now is None:
            self.held.pop(att, None)
        else:
            self.held[att] = now

    @rule(att=ATTACHMENTS, node=st.sampled_from(["n1", "n2"]), lose=LOSE)
    def allocate(self, att, node, lose):
        store = FlakyStore(self.store, every=1, how=lose) if lose else self.store
        try:
            a = ipam.allocate(store, "dual", node, *att)
        except DatastoreError:
            self._sync(att)
            return
        except AddressUnavailable:  # held on the other node
            assert att in self.held and self.held[att].node != node
            return
        except ipam_errors.PoolExhausted:
            assert sum(1 for h in self.held.values() if h.node == node) == 13  # a /28 holds 13 pods (a /124: 14)
            return
        if att in self.held:
            assert a == self.held[att]
        self.held[att] = a

    @rule(att=ATTACHMENTS, lose=LOSE)
    def release(self, att, lose):
        store = FlakyStore(self.store, every=1, how=lose) if lose else self.store
        try:
            out = ipam.release(store, "dual", *att)
        except DatastoreError:
            self._sync(att)
            return
        assert out == self.held.pop(att, None)

    @invariant()
    def consistent(self):
        allocs = ipam.list_allocations(self.store, "dual")
        assert {(a.container_id, a.ifname): a for a in allocs} == self.held
        assert all(a.ip_v6 is not None for a in allocs)  # never half a pair
        for family in (lambda a: a.ip.ip, lambda a: a.ip_v6.ip):
            ips = [family(a) for a in allocs]
            assert len(ips) == len(set(ips))  # never a duplicate
        for a in allocs:
            blocks = ipam.list_claims(self.store, "dual")[a.node]
            assert a.ip.ip in blocks.block and a.ip_v6.ip in blocks.block_v6
        assert ipam.check(self.store, "dual").ok


from overlaycni import errors as ipam_errors  # noqa: E402

TestDualIPAM = DualIPAM.TestCase
TestDualIPAM.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)
