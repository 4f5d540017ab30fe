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
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from ..datastore import KV, Store
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
from ..errors import AddressUnavailable, BadRecord, Conflict, NotFound, OverlayCNIError, PoolExhausted
from . import addresses
from .clusters import get_cluster, not_found
from .model import Allocation, check_container_id, check_ifname, check_name, check_pod, parse_ip
from .records import address_value, decode_allocation, decode_block, decode_cursor, handle_value

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
    requested_ip: IPv4Address | None = None,
) -> Allocation:
    """An address from ``node``'s block for (container_id, ifname); the same
    one again when that attachment already has one."""
    return reserve(store, cluster, node, container_id, ifname, pod=pod, requested_ip=requested_ip)[0]


def reserve(
    store: Store,
    cluster: str,
    node: str,
    container_id: str,
    ifname: str,
    *,
    pod: tuple[str, str] | None = None,
    requested_ip: IPv4Address | None = None,
) -> tuple[Allocation, bool]:
    """``allocate``, and whether this call made the allocation (True) or
    found the attachment's existing one (False): only the first may be
    released when the caller's later steps fail."""
    check_name("cluster", cluster)
    check_name("node", node)
    check_container_id(container_id)
    check_ifname(ifname)
    pod = check_pod(pod)
    if requested_ip is not None:
        requested_ip = parse_ip("ip", requested_ip)
    h_k, nb_k, cur_k = handle_key(cluster, container_id, ifname), nodeblock_key(cluster, node), cursor_key(cluster, node)
    used_prefix = ips_prefix(cluster, node)
    snap = store.read([h_k, nb_k, cur_k])
    used: set[int] = set()  # addresses seen taken during this call (may go stale: only used to skip)
    confirmed_full = False
    races = 0  # failed attempts where another allocator moved the cursor meanwhile
    last_cursor: str | None = None
    for attempt in range(_ATTEMPTS):
        handle = snap.get(h_k)
        claim = snap.get(nb_k)
        if handle is not None:
            held = decode_allocation(handle)
            if held.node != node:
                raise AddressUnavailable(
                    f"container {container_id} {ifname} already has address {held.ip.ip} on node {held.node!r}, "
                    f"not on {node!r}; release it first"
                )
            if claim is not None:
                return held, False
        if claim is None:
            get_cluster(store, cluster)  # raises NotFound for an unknown cluster
            raise NotFound(f"node {node!r} has no block in cluster {cluster!r}; register it first")
        block = decode_block(claim).block
        used.update(addresses.ip_to_int(kv.key[len(used_prefix):]) for kv in snap.prefixed(used_prefix))
        if requested_ip is not None:
            if requested_ip not in block or addresses.is_reserved(block, requested_ip):
                raise AddressUnavailable(
                    f"requested IP {requested_ip} is not a usable address of node {node!r}'s block {block} "
                    f"(usable: {block.network_address + 2} - {block.broadcast_address - 1})"
                )
            if attempt and snap.get(ip_key(cluster, node, requested_ip)) is not None:
                raise AddressUnavailable(f"requested IP {requested_ip} is already in use on node {node!r}")
            ip = requested_ip
        else:
            cursor = snap.get(cur_k)
            found = decode_cursor(cursor)
            after = found if isinstance(found, IPv4Address) else None
            if attempt and cursor is not None and cursor.value != last_cursor:
                races += 1
            last_cursor = cursor.value if cursor else None
            # losers of a race spread out over the next few free addresses
            skip = random.randrange(min(1 << races, 16)) if races else 0
            found = addresses.next_free(block, used, after, skip=skip)
            if found is None:
                if confirmed_full:
                    raise PoolExhausted(
                        f"node {node!r} (cluster {cluster!r}): block {block} is full "
                        f"({addresses.capacity(block)} addresses in use)",
                        details="release unused addresses (`overlaycni ipam gc`) or use a larger --node-cidr-size block",
                    )
                # what this call saw says full; check against a fresh, complete read
                snap = store.read([h_k, nb_k, cur_k], [used_prefix], keys_only=True)
                used.clear()
                confirmed_full = True
                continue
            ip = found
        confirmed_full = False
        i_k = ip_key(cluster, node, ip)
        compare = [(h_k, handle.revision if handle else 0), (i_k, 0), (nb_k, claim.revision)]
        put = [(i_k, address_value(container_id, ifname, pod), None), (h_k, handle_value(node, ip, block, pod), None)]
        if requested_ip is None:
            put.append((cur_k, str(ip), None))
        # if it fails: the keys, and the next WINDOW used addresses from the candidate on
        window = (i_k, ip_key(cluster, node, block.broadcast_address), _WINDOW)
        result = store.transact(
            compare=compare, put=put, read_keys=[h_k, nb_k, cur_k], read_ranges=[window], keys_only=True
        )
        if result.succeeded:
            log.debug("allocated %s to %s %s on %s (attempt %d)", ip, container_id, ifname, node, attempt + 1)
            return _allocation(node, ip, block, container_id, ifname, pod), True
        snap = result.snapshot()
    raise Conflict(f"node {node!r}: could not allocate after {_ATTEMPTS} attempts (heavy contention); try again")


def _allocation(
    node: str, ip: IPv4Address, block: IPv4Network, container_id: str, ifname: str, pod: tuple[str, str] | None
) -> Allocation:
    ns, name = pod if pod else (None, None)
    return Allocation(IPv4Interface(f"{ip}/{block.prefixlen}"), block.network_address + 1, container_id, ifname,
                      node, ns, name)


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
    """Release the attachment's address; returns what was released (None when
    there was nothing). Idempotent. With ``node``, only an allocation on that
    node is released (one held on another node is left alone: None)."""
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
        node, ip = held.node, held.ip.ip
        i_k = ip_key(cluster, node, ip)
        # the address key was written in the handle's transaction: same revision
        result = store.transact(
            compare=[(h_k, handle.revision), (i_k, handle.revision)],
            delete=[h_k, i_k],
            read_keys=[h_k, i_k],
        )
        if result.succeeded:
            log.debug("released %s of %s %s on %s", ip, container_id, ifname, node)
            return held
        snap = result.snapshot()
        ip_kv, handle_now = snap.get(i_k), snap.get(h_k)
        if handle_now is not None and handle_now.revision == handle.revision:
            # half-written pair: drop the handle, and the address only if it is ours
            store.txn(compare=[(h_k, handle.revision)], delete=[h_k])
            if ip_kv is not None and _held_by(ip_kv, container_id, ifname):
                store.txn(compare=[(i_k, ip_kv.revision)], delete=[i_k])
            return Allocation(held.ip, held.gateway, container_id, ifname, node)
    raise Conflict(f"release of {container_id} {ifname}: too many concurrent changes, try again")


def _held_by(kv: Record, container_id: str, ifname: str) -> bool:
    try:
        a = decode_allocation(kv)
    except BadRecord:
        return False
    return (a.container_id, a.ifname) == (container_id, ifname)


def list_allocations(
    store: Store, cluster: str, *, node: str | None = None, on_bad: BadRecordHandler | None = None
) -> list[Allocation]:
    """The allocations (of ``node``, if given). A bad record raises
    ``BadRecord``, or with ``on_bad`` is reported and skipped."""
    check_name("cluster", cluster)
    if node is not None:
        check_name("node", node)
    prefix = ips_prefix(cluster, node)
    snap = store.read([config_key(cluster)], [nodeblocks_prefix(cluster), prefix])
    if snap.get(config_key(cluster)) is None:
        raise not_found(cluster)
    claims = decode_all(snap.prefixed(nodeblocks_prefix(cluster)), decode_block, on_bad=on_bad)
    blocks = {c.node: c.block for c in claims}
    base = ips_prefix(cluster)

    def decode(kv: KV) -> Allocation:
        owner = kv.key[len(base):].partition("/")[0]
        return decode_allocation(kv, block=blocks.get(owner))

    out = decode_all(snap.prefixed(prefix), decode, on_bad=on_bad)
    return sorted(out, key=lambda a: (a.node, int(a.ip)))


def gc(
    store: Store, cluster: str, valid: Iterable[tuple[str, str]], *, node: str | None = None
) -> list[Allocation]:
    """Release every allocation whose (container_id, ifname) is not in
    ``valid`` (on ``node`` only, if given), and drop dangling handles. Keeps
    going past errors; returns what was released."""
    keep = {(c, i) for c, i in valid}
    released: list[Allocation] = []
    errors: list[str] = []
    for alloc in list_allocations(store, cluster, node=node, on_bad=lambda exc: errors.append(str(exc))):
        if (alloc.container_id, alloc.ifname) in keep:
            continue
        try:
            if release(store, cluster, alloc.container_id, alloc.ifname) is None:
                # an address without its handle (a leak): delete the address itself
                i_k = ip_key(cluster, alloc.node, alloc.ip.ip)
                kv = store.get(i_k)
                if kv is not None and store.txn(compare=[(i_k, kv.revision)], delete=[i_k]):
                    released.append(alloc)
            else:
                released.append(alloc)
        except OverlayCNIError as exc:
            errors.append(f"{alloc.container_id} {alloc.ifname}: {exc}")
    # handles whose address is gone
    for kv in store.list(handles_prefix(cluster)):
        try:
            h = decode_allocation(kv)
        except BadRecord as exc:
            errors.append(str(exc))
            continue
        if (h.container_id, h.ifname) in keep or (node is not None and h.node != node):
            continue
        if store.get(ip_key(cluster, h.node, h.ip.ip)) is None:
            try:
                store.txn(compare=[(kv.key, kv.revision)], delete=[kv.key])
            except OverlayCNIError as exc:
                errors.append(f"{h.container_id} {h.ifname}: {exc}")
    if errors:
        # everything that could be released was; report the rest
        raise Conflict(f"gc released {len(released)} allocations but {len(errors)} failed: {'; '.join(errors[:5])}")
    return released
