"""Pod addresses within a node's block.

One allocation is two keys written in one transaction: ``ips/<node>/<ip>``
(no two pods share an address) and ``handles/<cid>/<ifname>`` (one address
per attachment, so a repeated ADD gets the same address; the handle carries
the whole allocation). The transaction also requires the node's claim
(``nodeblocks/<node>``) to be unchanged, so no address is handed out from a
block that was just freed, and it moves ``cursor/<node>`` forward.

Round trips: one small read (handle, claim, cursor) and one transaction that
tries the first address after the cursor. Address keys sort in address
order, so when the candidate is taken the failed transaction returns, in the
same round trip, the next ``_WINDOW`` used addresses from the candidate on;
the next try skips past them (a full block is confirmed by one complete
read before ``PoolExhausted``). Losers of a race with another allocator
(the cursor moved) pick a random one of the next few free addresses.
Addresses move forward and wrap, so a just-released address is not handed
out again at once. Rejected: reading the whole used set each time (payload
grows with the block; 4x slower on etcd with 8 allocators).

Dual-stack: the node's claim names a block per family, and one transaction
writes an address key per family (``ips/<node>/<ipv4>`` and
``ips/<node>/<ipv6, exploded>``), the handle naming both, and each
family's cursor (``cursor/<node>``, ``cursor6/<node>``): an attachment
holds both addresses or neither, and release deletes all three keys at
once. Still two round trips: the first read takes both cursors, a failed
attempt returns a window per family, and each family skips what it saw.
IPv6 blocks hold up to 2^80 addresses, so the arithmetic never walks a
block (``addresses.next_free``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from ..cidr import IPAddress, IPNetwork
from ..datastore import KV, Snapshot, Store
from ..datastore.keys import (
    BadRecordHandler,
    Record,
    config_key,
    cursor_key,
    decode_all,
    handle_key,
    handles_prefix,
    ip_key,
    ips_prefix,
    nodeblock_key,
    nodeblocks_prefix,
)
from ..errors import (
    AddressUnavailable,
    BadRecord,
    ConfigError,
    Conflict,
    FieldError,
    NotFound,
    OverlayCNIError,
    PoolExhausted,
)
from ..families import IPFamily, pod_range
from . import addresses
from .clusters import get_cluster, not_found
from .model import Allocation, check_container_id, check_ifname, check_name, check_pod, parse_any_ip
from .records import (
    AddressRecord,
    address_value,
    allocation_of,
    build_allocation,
    decode_address,
    decode_allocation,
    decode_block,
    decode_cursor,
    handle_value,
)

log = logging.getLogger(__name__)

_ATTEMPTS = 64
_WINDOW = 64  # used addresses returned by a failed allocation attempt


def allocate(
    store: Store,
    cluster: str,
    node: str,
    container_id: str,
    ifname: str,
    *,
    pod: tuple[str, str] | None = None,
    requested_ip: IPAddress | None = None,
    requested_ips: Iterable[IPAddress] = (),
) -> Allocation:
    """Addresses from ``node``'s blocks for (container_id, ifname), one per
    family of the node's claim (IPv4, and IPv6 in a dual-stack cluster), in
    one transaction; the same ones again when that attachment already has
    them. ``requested_ip(s)``: at most one address per family to use
    instead of the next free one."""
    return reserve(store, cluster, node, container_id, ifname, pod=pod, requested_ip=requested_ip,
                   requested_ips=requested_ips)[0]


def reserve(
    store: Store,
    cluster: str,
    node: str,
    container_id: str,
    ifname: str,
    *,
    pod: tuple[str, str] | None = None,
    requested_ip: IPAddress | None = None,
    requested_ips: Iterable[IPAddress] = (),
) -> tuple[Allocation, bool]:
    """``allocate``, and whether this call made the allocation (True) or
    found the attachment's existing one (False): only the first may be
    released when the caller's later steps fail."""
    check_name("cluster", cluster)
    check_name("node", node)
    check_container_id(container_id)
    check_ifname(ifname)
    pod = check_pod(pod)
    wanted = _requested([*requested_ips, *([requested_ip] if requested_ip is not None else [])])
    h_k, nb_k = handle_key(cluster, container_id, ifname), nodeblock_key(cluster, node)
    cur_ks = {v: cursor_key(cluster, node, version=v) for v in (4, 6)}
    used_prefix = ips_prefix(cluster, node)
    snap = store.read([h_k, nb_k, *cur_ks.values()])
    # addresses seen taken during this call, per IP version (may go stale: only used to skip)
    used: dict[int, set[int]] = {4: set(), 6: set()}
    confirmed_full = False
    races = 0  # failed attempts where another allocator moved a cursor meanwhile
    last_cursors: tuple[str | None, ...] | None = None
    for attempt in range(_ATTEMPTS):
        handle = snap.get(h_k)
        claim = snap.get(nb_k)
        if handle is not None:
            held = held_here(handle, node, container_id, ifname)
            if claim is not None:
                return held, False
        if claim is None:
            get_cluster(store, cluster)  # raises NotFound for an unknown cluster
            raise NotFound(f"node {node!r} has no block in cluster {cluster!r}; register it first")
        blocks = decode_block(claim).blocks  # one per family, IPv4 first
        _check_families(wanted, blocks, node)
        last_cursors, races, skip = scan(snap, used_prefix, used, cur_ks, blocks, last_cursors, attempt=attempt, races=races)
        chosen: list[tuple[IPNetwork, IPAddress]] = []
        full: IPNetwork | None = None
        for block in blocks:
            ip = wanted.get(block.version)
            if ip is not None:
                _check_requested(ip, block, node)
                if attempt and snap.get(ip_key(cluster, node, ip)) is not None:
                    raise AddressUnavailable(f"requested IP {ip} is already in use on node {node!r}")
            else:
                after = decode_cursor(snap.get(cur_ks[block.version]))
                ip = addresses.next_free(block, used[block.version], after if not isinstance(after, IPv4Network) else None,
                                         skip=skip)  # fmt: skip
                if ip is None:
                    full = block
                    break
            chosen.append((block, ip))
        if full is not None:
            if confirmed_full:
                raise pool_full(cluster, node, full)
            # what this call saw says full; check against a fresh, complete read
            snap = store.read([h_k, nb_k, *cur_ks.values()], [used_prefix], keys_only=True)
            used = {4: set(), 6: set()}
            confirmed_full = True
            continue
        confirmed_full = False
        alloc = _allocation(node, chosen, container_id, ifname, pod)
        i_ks = [ip_key(cluster, node, ip) for _, ip in chosen]
        compare = [(h_k, handle.revision if handle else 0), *((k, 0) for k in i_ks), (nb_k, claim.revision)]
        put = [(k, address_value(container_id, ifname, pod), None) for k in i_ks]
        put.append((h_k, _handle(alloc, pod), None))
        put += [(cur_ks[ip.version], str(ip), None) for _, ip in chosen if ip.version not in wanted]
        # if it fails: the keys, and per family the next WINDOW used addresses from the candidate on
        windows = [(k, ip_key(cluster, node, block.broadcast_address), _WINDOW) for k, (block, _) in zip(i_ks, chosen, strict=True)]
        result = store.transact(
            compare=compare, put=put, read_keys=[h_k, nb_k, *cur_ks.values()], read_ranges=windows, keys_only=True
        )
        if result.succeeded:
            log.debug("allocated %s to %s %s on %s (attempt %d)", " ".join(str(ip) for _, ip in chosen),
                      container_id, ifname, node, attempt + 1)  # fmt: skip
            return alloc, True
        snap = result.snapshot()
    raise Conflict(f"node {node!r}: could not allocate after {_ATTEMPTS} attempts (heavy contention); try again")


def pool_full(cluster: str, node: str, block: IPNetwork) -> PoolExhausted:
    """The error of a full block, and what to do about it."""
    return PoolExhausted(
        f"node {node!r} (cluster {cluster!r}): block {block} is full ({addresses.capacity(block)} addresses in use)",
        details="release unused addresses (`overlaycni ipam gc`) or use a larger --node-cidr-size block",
    )


def held_here(handle: KV, node: str, container_id: str, ifname: str) -> Allocation:
    """The allocation an attachment's handle names, which must be on ``node``
    (raises ``BadRecord`` or ``AddressUnavailable``)."""
    held = decode_allocation(handle)
    if held.node != node:
        raise AddressUnavailable(
            f"container {container_id} {ifname} already has address {held.ip.ip} on node {held.node!r}, "
            f"not on {node!r}; release it first"
        )
    return held


def scan(
    snap: Snapshot, used_prefix: str, used: dict[int, set[int]], cur_ks: dict[int, str], blocks: tuple[IPNetwork, ...],
    last_cursors: tuple[str | None, ...] | None, *, attempt: int, races: int,
) -> tuple[tuple[str | None, ...], int, int]:
    """Attempt ``attempt``'s reading of ``snap``: the used addresses it shows
    go into ``used`` (per IP version); returns the cursors (one per block),
    the races so far (a cursor moved since the last attempt: another
    allocator won) and how many free addresses to skip (losers of a race
    spread out over the next few)."""
    for kv in snap.prefixed(used_prefix):
        part = kv.key[len(used_prefix):]
        used[6 if ":" in part else 4].add(addresses.ip_to_int(part))
    cursors = tuple(c.value if (c := snap.get(cur_ks[b.version])) else None for b in blocks)
    if attempt and cursors != last_cursors:
        races += 1
    return cursors, races, random.randrange(min(1 << races, 16)) if races else 0


def _requested(ips: Iterable[IPAddress]) -> dict[int, IPAddress]:
    """The requested addresses by IP version: at most one per family."""
    out: dict[int, IPAddress] = {}
    for raw in ips:
        ip = parse_any_ip("ip", raw)
        if ip.version in out and out[ip.version] != ip:
            raise ConfigError(FieldError(
                "ip", f"{out[ip.version]} and {ip} are both {IPFamily.of(ip).label}: ask for one address per family"))
        out[ip.version] = ip
    return out


def _check_families(wanted: dict[int, IPAddress], blocks: tuple[IPNetwork, ...], node: str) -> None:
    have = {b.version for b in blocks}
    for version, ip in wanted.items():
        if version not in have:
            raise ConfigError(FieldError(
                "ip", f"requested IP {ip} is {IPFamily.of(ip).label}, and node {node!r} has no "
                f"{IPFamily.of(ip).label} block (an IPv4 single-stack cluster)"))


def _check_requested(ip: IPAddress, block: IPNetwork, node: str) -> None:
    if ip not in block or addresses.is_reserved(block, ip):
        first, last = pod_range(block)
        raise AddressUnavailable(
            f"requested IP {ip} is not a usable address of node {node!r}'s block {block} (usable: {first} - {last})"
        )


def _allocation(
    node: str, chosen: list[tuple[IPNetwork, IPAddress]], container_id: str, ifname: str, pod: tuple[str, str] | None
) -> Allocation:
    (block, ip), *rest = chosen
    v6 = rest[0] if rest else None
    return build_allocation(
        node, IPv4Address(ip), IPv4Network(block), container_id=container_id, ifname=ifname,
        pod=pod if pod else (None, None), ip_v6=IPv6Address(v6[1]) if v6 else None,
        block_v6=IPv6Network(v6[0]) if v6 else None,
    )


def _handle(alloc: Allocation, pod: tuple[str, str] | None) -> str:
    return handle_value(
        alloc.node, alloc.ip.ip, alloc.ip.network, pod,
        ip_v6=alloc.ip_v6.ip if alloc.ip_v6 is not None else None,
        block_v6=alloc.ip_v6.network if alloc.ip_v6 is not None else None,
    )


def get_allocation(store: Store, cluster: str, container_id: str, ifname: str) -> Allocation | None:
    check_name("cluster", cluster)
    h_k = handle_key(cluster, container_id, ifname)
    handle = store.get(h_k)
    if handle is None:
        return None
    return decode_allocation(handle)


def release(
    store: Store, cluster: str, container_id: str, ifname: str, *, node: str | None = None
) -> Allocation | None:
    """Release the attachment's addresses (every family, in one
    transaction); returns what was released (None when there was nothing).
    Idempotent. With ``node``, only an allocation on that node is released
    (one held on another node is left alone: None)."""
    check_name("cluster", cluster)
    check_container_id(container_id)
    check_ifname(ifname)
    h_k = handle_key(cluster, container_id, ifname)
    snap = store.read([h_k, config_key(cluster)])
    if snap.get(config_key(cluster)) is None:
        raise not_found(cluster)
    owner = node
    for _ in range(_ATTEMPTS):
        handle = snap.get(h_k)
        if handle is None:
            return None
        held = decode_allocation(handle)
        if owner is not None and held.node != owner:
            log.debug("not releasing %s of %s %s: it is held on node %s, not %s", held.ip.ip, container_id, ifname,
                      held.node, owner)
            return None
        node = held.node
        i_ks = [ip_key(cluster, node, ip) for ip in held.ips]
        # the address keys were written in the handle's transaction: same revision
        result = store.transact(
            compare=[(h_k, handle.revision), *((k, handle.revision) for k in i_ks)],
            delete=[h_k, *i_ks],
            read_keys=[h_k, *i_ks],
        )
        if result.succeeded:
            log.debug("released %s of %s %s on %s", " ".join(map(str, held.ips)), container_id, ifname, node)
            return held
        snap = result.snapshot()
        handle_now = snap.get(h_k)
        if handle_now is not None and handle_now.revision == handle.revision:
            # half-written set: drop the handle, and each address only if it is ours
            store.txn(compare=[(h_k, handle.revision)], delete=[h_k])
            for k in i_ks:
                ip_kv = snap.get(k)
                if ip_kv is not None and _held_by(ip_kv, container_id, ifname):
                    store.txn(compare=[(k, ip_kv.revision)], delete=[k])
            return replace(held, pod_namespace=None, pod_name=None)
    raise Conflict(f"release of {container_id} {ifname}: too many concurrent changes, try again")


def _held_by(kv: Record, container_id: str, ifname: str) -> bool:
    try:
        a = decode_address(kv)
    except BadRecord:
        return False
    return a.attachment == (container_id, ifname)


def list_allocations(
    store: Store, cluster: str, *, node: str | None = None, on_bad: BadRecordHandler | None = None
) -> list[Allocation]:
    """The allocations (of ``node``, if given), one per attachment with its
    address of each family. A bad record raises ``BadRecord``, or with
    ``on_bad`` is reported and skipped; so is an IPv6 address whose
    attachment has no IPv4 address (half an allocation: ``ipam check``)."""
    check_name("cluster", cluster)
    if node is not None:
        check_name("node", node)
    prefix = ips_prefix(cluster, node)
    snap = store.read([config_key(cluster)], [nodeblocks_prefix(cluster), prefix])
    if snap.get(config_key(cluster)) is None:
        raise not_found(cluster)
    claims = {c.node: c for c in decode_all(snap.prefixed(nodeblocks_prefix(cluster)), decode_block, on_bad=on_bad)}
    kvs = snap.prefixed(prefix)
    revisions = {kv.key: kv.revision for kv in kvs}
    out = []
    for v4, v6 in pair_addresses(cluster, decode_all(kvs, decode_address, on_bad=on_bad), revisions, on_bad=on_bad):
        claim = claims.get(v4.node)
        out.append(allocation_of(v4, v6, block=claim.block_v4 if claim else None,
                                 block_v6=claim.block_v6 if claim else None))  # fmt: skip
    return sorted(out, key=lambda a: (a.node, int(a.ip)))


def pair_addresses(
    cluster: str, records: Iterable[AddressRecord], revisions: dict[str, int], *, on_bad: BadRecordHandler | None
) -> list[tuple[AddressRecord, AddressRecord | None]]:
    """The address records of each attachment: (IPv4, IPv6 or None). An IPv6
    address whose attachment has no IPv4 address is half an allocation: it
    raises ``BadRecord``, or with ``on_bad`` is reported and left out
    (``revisions``: each record key's, for the report)."""
    v4: dict[tuple[str, str, str], AddressRecord] = {}
    v6: dict[tuple[str, str, str], AddressRecord] = {}
    for rec in records:
        (v4 if rec.ip.version == 4 else v6)[(rec.node, *rec.attachment)] = rec
    for key, rec in v6.items():
        if key not in v4:
            k = ip_key(cluster, rec.node, rec.ip)
            exc = BadRecord(
                key=k, kind="allocation", revision=revisions.get(k, 0),
                problem=f"IPv6 address {rec.ip} of {rec.container_id} {rec.ifname} has no IPv4 address beside it",
            )
            if on_bad is None:
                raise exc
            on_bad(exc)
    return [(rec, v6.get(key)) for key, rec in v4.items()]


def gc(
    store: Store, cluster: str, valid: Iterable[tuple[str, str]], *, node: str | None = None
) -> list[Allocation]:
    """Release every allocation whose (container_id, ifname) is not in
    ``valid`` (on ``node`` only, if given), and drop dangling handles and
    addresses of either family. Keeps going past errors; returns what was
    released."""
    keep = {(c, i) for c, i in valid}
    released: list[Allocation] = []
    errors: list[str] = []
    check_name("cluster", cluster)
    if node is not None:
        check_name("node", node)
    snap = store.read([config_key(cluster)], [nodeblocks_prefix(cluster), ips_prefix(cluster, node)])
    if snap.get(config_key(cluster)) is None:
        raise not_found(cluster)
    claims = {c.node: c for c in decode_all(snap.prefixed(nodeblocks_prefix(cluster)), decode_block,
                                            on_bad=lambda exc: errors.append(str(exc)))}  # fmt: skip
    for kv in snap.prefixed(ips_prefix(cluster, node)):
        try:
            rec = decode_address(kv)
        except BadRecord as exc:
            errors.append(str(exc))
            continue
        if rec.attachment in keep:
            continue
        try:
            alloc = release(store, cluster, rec.container_id, rec.ifname)
            if alloc is not None:
                released.append(alloc)
            elif store.txn(compare=[(kv.key, kv.revision)], delete=[kv.key]):
                # an address without its handle (a leak): delete the address itself
                log.info("gc: deleted %s of %s %s on %s (no handle)", rec.ip, rec.container_id, rec.ifname, rec.node)
                if isinstance(rec.ip, IPv4Address):
                    claim = claims.get(rec.node)
                    released.append(allocation_of(rec, block=claim.block_v4 if claim else None))
        except OverlayCNIError as exc:
            errors.append(f"{rec.container_id} {rec.ifname}: {exc}")
    # handles whose addresses are gone
    for kv in store.list(handles_prefix(cluster)):
        try:
            h = decode_allocation(kv)
        except BadRecord as exc:
            errors.append(str(exc))
            continue
        if (h.container_id, h.ifname) in keep or (node is not None and h.node != node):
            continue
        if all(store.get(ip_key(cluster, h.node, ip)) is None for ip in h.ips):
            try:
                store.txn(compare=[(kv.key, kv.revision)], delete=[kv.key])
            except OverlayCNIError as exc:
                errors.append(f"{h.container_id} {h.ifname}: {exc}")
    if errors:
        # everything that could be released was; report the rest
        raise Conflict(f"gc released {len(released)} allocations but {len(errors)} failed: {'; '.join(errors[:5])}")
    return released
