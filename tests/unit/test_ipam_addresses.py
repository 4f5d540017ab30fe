"""Address arithmetic (pure): properties over random blocks and used sets."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import given
from hypothesis import strategies as st

from overlaycni.ipam import addresses as A

blocks = st.builds(
    lambda base, plen: IPv4Network((base >> (32 - plen) << (32 - plen), plen)),
    st.integers(0x0A000000, 0x0AFFFFFF),
    st.integers(24, 30),
)


@given(blocks, st.data())
def test_next_free_never_reserved_or_used(block, data):
    usable = list(A.usable_range(block))
    used = set(data.draw(st.lists(st.sampled_from(usable), max_size=len(usable))))
    after = data.draw(st.none() | st.sampled_from(usable))
    ip = A.next_free(block, used, IPv4Address(after) if after else None)
    if len(used) == len(usable):
        assert ip is None
    else:
        assert ip is not None and ip in block
        assert not A.is_reserved(block, ip)
        assert int(ip) not in used


@given(blocks, st.data())
def test_next_free_moves_forward_from_the_cursor(block, data):
    usable = list(A.usable_range(block))
    after = data.draw(st.sampled_from(usable))
    used = set(data.draw(st.lists(st.sampled_from(usable), max_size=len(usable) - 1)))
    used.discard(after)  # keep at least one free
    ip = A.next_free(block, used, IPv4Address(after))
    # every address strictly between the cursor and the answer (cyclically) is used
    n = len(usable)
    i = (usable.index(after) + 1) % n
    while usable[i] != int(ip):
        assert usable[i] in used
        i = (i + 1) % n


def test_reserved_addresses_of_a_24():
    block = IPv4Network("10.244.3.0/24")
    assert A.gateway(block) == IPv4Address("10.244.3.1")
    assert A.capacity(block) == 253
    assert A.next_free(block, set(), None) == IPv4Address("10.244.3.2")
    assert A.next_free(block, set(), IPv4Address("10.244.3.254")) == IPv4Address("10.244.3.2")
    assert A.next_free(block, set(), IPv4Address("10.244.3.7")) == IPv4Address("10.244.3.8")
    assert A.next_free(block, set(), IPv4Address("10.244.3.7"), skip=2) == IPv4Address("10.244.3.10")
    assert all(A.is_reserved(block, IPv4Address(a)) for a in ("10.244.3.0", "10.244.3.1", "10.244.3.255"))


def test_tiny_blocks_have_no_pod_addresses():
    assert A.next_free(IPv4Network("10.0.0.0/31"), set(), None) is None
    assert A.capacity(IPv4Network("10.0.0.0/30")) == 1


@given(st.integers(8, 20), st.integers(0, 8), st.data())
def test_block_index_round_trip(pod_plen, extra, data):
    pod = IPv4Network(("10.0.0.0", 8)).subnets(new_prefix=pod_plen).__next__()
    plen = min(pod_plen + extra, 30)
    count = A.block_count(pod, plen)
    i = data.draw(st.integers(0, count - 1))
    block = A.block_at(pod, plen, i)
    assert block.subnet_of(pod) and A.block_index(pod, block) == i
    assert A.next_block(pod, plen, block) == A.block_at(pod, plen, (i + 1) % count)


def test_next_block_wraps_and_survives_expansion():
    pod = IPv4Network("10.244.0.0/16")
    last = IPv4Network("10.244.255.0/24")
    assert A.next_block(pod, 24, last) == IPv4Network("10.244.0.0/24")
    assert A.next_block(pod, 24, None) == IPv4Network("10.244.0.0/24")
    # after expanding to 10.244.0.0/15 the cursor keeps meaning the same block
    assert A.next_block(IPv4Network("10.244.0.0/15"), 24, last) == IPv4Network("10.245.0.0/24")
    # a cursor from outside the pod CIDR starts from the beginning
    assert A.next_block(pod, 24, IPv4Network("10.9.0.0/24")) == IPv4Network("10.244.0.0/24")


@given(st.integers(0, 2**32 - 1))
def test_ip_to_int_matches_ipaddress(n):
    assert A.ip_to_int(str(IPv4Address(n))) == n
