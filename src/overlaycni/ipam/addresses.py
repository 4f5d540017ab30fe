"""Address arithmetic for IPAM (pure, property-tested).

Blocks are numbered from the start of the pod CIDR, so a block keeps its
number's meaning only while the pod CIDR's network address stays; that is
why claims and cursors are stored as CIDRs, never as numbers, and a pod CIDR
expansion (a superset) leaves every existing claim valid.

In a node block the network address, the gateway (network + 1) and the
broadcast address are never handed to pods (IPv6: the first address and
``::1``; the model, ``families``, says which). The address functions work
on either family: IPv6 blocks are up to 2^80 addresses, so nothing here
takes ``len()`` of a block's range or walks it whole.
"""

from __future__ import annotations

from collections.abc import Collection
from ipaddress import IPv4Network

from .. import families
from ..cidr import IPAddress, IPNetwork


def ip_to_int(text: str) -> int:
    """An address key part (``datastore.keys.ip_part``: a zero-padded dotted
    quad, or an exploded IPv6 address) to an integer (10x faster than
    ``ipaddress``, which matters when a block holds hundreds of pods)."""
    if ":" in text:
        return int(text.replace(":", ""), 16)
    a, b, c, d = text.split(".")
    return (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d)


def block_size(prefixlen: int) -> int:
    return 1 << (32 - prefixlen)


def block_count(pod_cidr: IPv4Network, prefixlen: int) -> int:
    if prefixlen < pod_cidr.prefixlen:
        return 0
    return 1 << (prefixlen - pod_cidr.prefixlen)


def block_at(pod_cidr: IPv4Network, prefixlen: int, index: int) -> IPv4Network:
    """The ``index``-th block of ``/prefixlen`` in ``pod_cidr``."""
    count = block_count(pod_cidr, prefixlen)
    if not 0 <= index < count:
        raise IndexError(f"block {index} outside 0..{count - 1}")
    return IPv4Network((int(pod_cidr.network_address) + index * block_size(prefixlen), prefixlen))


def block_index(pod_cidr: IPv4Network, block: IPv4Network) -> int | None:
    """The number of ``block`` in ``pod_cidr``, or None when it is not one of
    its blocks."""
    if not block.subnet_of(pod_cidr):
        return None
    return (int(block.network_address) - int(pod_cidr.network_address)) >> (32 - block.prefixlen)


def next_block(pod_cidr: IPv4Network, prefixlen: int, after: IPv4Network | None, *, skip: int = 0) -> IPv4Network:
    """The block ``skip + 1`` places after ``after`` (wrapping); the
    ``skip``-th block when ``after`` is None or not in the pod CIDR."""
    count = block_count(pod_cidr, prefixlen)
    if count == 0:
        raise ValueError(f"no /{prefixlen} block fits in {pod_cidr}")
    idx = block_index(pod_cidr, after) if after is not None and after.prefixlen == prefixlen else None
    start = 0 if idx is None else idx + 1
    return block_at(pod_cidr, prefixlen, (start + skip) % count)


def gateway(block: IPNetwork) -> IPAddress:
    """The pods' gateway of ``block`` (``families.pod_gateway``)."""
    return families.pod_gateway(block)


def usable_range(block: IPNetwork) -> range:
    """Integer addresses pods may get (IPv4: network + 2 .. broadcast - 1).
    Fine to iterate or test membership in; ``capacity`` counts it."""
    first, last = (int(a) for a in families.pod_range(block))
    return range(first, max(first, last + 1))


def capacity(block: IPNetwork) -> int:
    first, last = (int(a) for a in families.pod_range(block))
    return max(0, last - first + 1)


def is_reserved(block: IPNetwork, ip: IPAddress) -> bool:
    """Network, gateway or broadcast address of ``block`` (IPv6: its first
    address or ``::1``)."""
    return families.is_reserved(ip, block)


def next_free(block: IPNetwork, used: Collection[int], after: IPAddress | None, *, skip: int = 0) -> IPAddress | None:
    """The first usable address of ``block`` after ``after`` that is not in
    ``used`` (integers), wrapping around once; with ``skip`` > 0 the
    ``skip``-th such address instead (fewer free: the last one found). None
    when the block is full. Costs O(used + skip), whatever the block size."""
    first, last = (int(a) for a in families.pod_range(block))
    n = last - first + 1
    if n <= 0:
        return None
    start = 0
    if after is not None and after.version == block.version and first <= int(after) <= last:
        start = (int(after) - first + 1) % n
    found: int | None = None
    remaining = skip
    for i in range(min(n, len(used) + skip + 1)):
        candidate = first + (start + i) % n
        if candidate in used:
            continue
        found = candidate
        if remaining == 0:
            break
        remaining -= 1
    return None if found is None else type(block.network_address)(found)
