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

import json
import random
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from ..datastore import Store
from ..errors import AddressUnavailable, Conflict, NotFound, OverlayCNIError, PoolExhausted
from . import addresses
from .clusters import get_cluster, not_found
from .model import (
    Allocation,
    allocation_from,
    allocation_from_handle,
    check_container_id,
    check_ifname,
    check_name,
    check_pod,
    config_key,
    cursor_key,
    handle_key,
    handle_value,
    handles_prefix,
    ip_from_part,
    ip_key,
    ip_value,
    ips_prefix,
    nodeblock_key,
    nodeblocks_prefix,
    parse_ip,
)

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
            data = json.loads(handle.value)
            if data["node"] != node:
                raise AddressUnavailable(
                    f"container {container_id} {ifname} already has address {data['ip']} on node {data['node']!r}, "
                    f"not on {node!r}; release it first"
                )
            if claim is not None:
                return allocation_from_handle(container_id, ifname, handle.value)
        if claim is None:
            get_cluster(store, cluster)  # raises NotFound for an unknown cluster
            raise NotFound(f"node {node!r} has no block in cluster {cluster!r}; register it first")
        block = IPv4Network(claim.value)
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
            after = IPv4Address(cursor.value) if cursor else None
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
        put = [(i_k, ip_value(container_id, ifname, pod), None), (h_k, handle_value(node, ip, block, pod), None)]
        if requested_ip is None:
            put.append((cur_k, str(ip), None))
        # if it fails: the keys, and the next WINDOW used addresses from the candidate on
        window = (i_k, ip_key(cluster, node, block.broadcast_address), _WINDOW)
        result = store.transact(
            compare=compare, put=put, read_keys=[h_k, nb_k, cur_k], read_ranges=[window], keys_only=True
        )
        if result.succeeded:
            return allocation_from_handle(container_id, ifname, put[1][1])
        snap = result.snapshot()
    raise Conflict(f"node {node!r}: could not allocate after {_ATTEMPTS} attempts (heavy contention); try again")


def get_allocation(store: Store, cluster: str, container_id: str, ifname: str) -> Allocation | None:
    check_name("cluster", cluster)
    h_k = handle_key(cluster, container_id, ifname)
    handle = store.get(h_k)
    if handle is None:
        return None
    return allocation_from_handle(container_id, ifname, handle.value)


def release(store: Store, cluster: str, container_id: str, ifname: str) -> Allocation | None:
    """Release the attachment's address; returns what was released (None when
    there was nothing). Idempotent."""
    check_name("cluster", cluster)
    check_container_id(container_id)
    check_ifname(ifname)
    h_k = handle_key(cluster, container_id, ifname)
    snap = store.read([h_k, config_key(cluster)])
    if snap.get(config_key(cluster)) is None:
        raise not_found(cluster)
    for _ in range(_ATTEMPTS):
        handle = snap.get(h_k)
        if handle is None:
            return None
        data = json.loads(handle.value)
        node, ip = data["node"], IPv4Address(data["ip"])
        i_k = ip_key(cluster, node, ip)
        # the address key was written in the handle's transaction: same revision
        result = store.transact(
            compare=[(h_k, handle.revision), (i_k, handle.revision)],
            delete=[h_k, i_k],
            read_keys=[h_k, i_k],
        )
        block = IPv4Network(data.get("block") or f"{ip}/32")
        if result.succeeded:
            return allocation_from_handle(container_id, ifname, handle.value)
        snap = result.snapshot()
        ip_kv, handle_now = snap.get(i_k), snap.get(h_k)
        if handle_now is not None and handle_now.revision == handle.revision:
            # half-written pair: drop the handle, and the address only if it is ours
            store.txn(compare=[(h_k, handle.revision)], delete=[h_k])
            if ip_kv is not None:
                owner = json.loads(ip_kv.value)
                if (owner["container_id"], owner["ifname"]) == (container_id, ifname):
                    store.txn(compare=[(i_k, ip_kv.revision)], delete=[i_k])
            return allocation_from(node, ip, block, ip_value(container_id, ifname, None))
    raise Conflict(f"release of {container_id} {ifname}: too many concurrent changes, try again")


def list_allocations(store: Store, cluster: str, *, node: str | None = None) -> list[Allocation]:
    check_name("cluster", cluster)
    if node is not None:
        check_name("node", node)
    prefix = ips_prefix(cluster, node)
    snap = store.read([config_key(cluster)], [nodeblocks_prefix(cluster), prefix])
    if snap.get(config_key(cluster)) is None:
        raise not_found(cluster)
    blocks = {kv.key[len(nodeblocks_prefix(cluster)):]: IPv4Network(kv.value) for kv in snap.prefixed(nodeblocks_prefix(cluster))}
    out = []
    base = ips_prefix(cluster)
    for kv in snap.prefixed(prefix):
        owner, _, ip_text = kv.key[len(base):].rpartition("/")
        ip = ip_from_part(ip_text)
        block = blocks.get(owner, IPv4Network(f"{ip}/32"))
        out.append(allocation_from(owner, ip, block, kv.value))
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
    for alloc in list_allocations(store, cluster, node=node):
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
    prefix = handles_prefix(cluster)
    for kv in store.list(prefix):
        cid, _, ifname = kv.key[len(prefix):].rpartition("/")
        data = json.loads(kv.value)
        if (cid, ifname) in keep or (node is not None and data["node"] != node):
            continue
        if store.get(ip_key(cluster, data["node"], IPv4Address(data["ip"]))) is None:
            try:
                store.txn(compare=[(kv.key, kv.revision)], delete=[kv.key])
            except OverlayCNIError as exc:
                errors.append(f"{cid} {ifname}: {exc}")
    if errors:
        # everything that could be released was; report the rest
        raise Conflict(f"gc released {len(released)} allocations but {len(errors)} failed: {'; '.join(errors[:5])}")
    return released
