"""Address arithmetic for IPAM (pure, property-tested).

Blocks are numbered from the start of the pod CIDR, so a block keeps its
number's meaning only while the pod CIDR's network address stays; that is
why claims and cursors are stored as CIDRs, never as numbers, and a pod CIDR
expansion (a superset) leaves every existing claim valid.

In a node block the network address, the gateway (network + 1) and the
broadcast address are never handed to pods.
"""

from __future__ import annotations

from collections.abc import Collection
from ipaddress import IPv4Address, IPv4Network


def ip_to_int(text: str) -> int:
    """Dotted quad to integer, for keys this module wrote (10x faster than
    ``IPv4Address``, which matters when a block holds hundreds of pods)."""
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


def gateway(block: IPv4Network) -> IPv4Address:
    return block.network_address + 1


def usable_range(block: IPv4Network) -> range:
    """Integer addresses pods may get: network + 2 .. broadcast - 1."""
    first = int(block.network_address) + 2
    last = int(block.broadcast_address) - 1
    return range(first, max(first, last + 1))


def capacity(block: IPv4Network) -> int:
    return len(usable_range(block))


def is_reserved(block: IPv4Network, ip: IPv4Address) -> bool:
    """Network, gateway or broadcast address of ``block``."""
    return ip in (block.network_address, gateway(block), block.broadcast_address)


def next_free(
    block: IPv4Network, used: Collection[int], after: IPv4Address | None, *, skip: int = 0
) -> IPv4Address | None:
    """The first usable address of ``block`` after ``after`` that is not in
    ``used`` (integers), wrapping around once; with ``skip`` > 0 the
    ``skip``-th such address instead (fewer free: the last one found). None
    when the block is full."""
    usable = usable_range(block)
    n = len(usable)
    if n == 0:
        return None
    start = 0
    if after is not None and int(after) in usable:
        start = (int(after) - usable.start + 1) % n
    found: int | None = None
    remaining = skip
    for i in range(n):
        candidate = usable.start + (start + i) % n
        if candidate in used:
            continue
        found = candidate
        if remaining == 0:
            break
        remaining -= 1
    return None if found is None else IPv4Address(found)
