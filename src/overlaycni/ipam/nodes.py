"""Node blocks: each node claims one block of the pod CIDR by compare-and-swap.

A claim writes ``blocks/<cidr>`` (uniqueness of the block), ``nodeblocks/<name>``
(uniqueness per node, and the way a re-registering node finds its block),
the block cursor and the node record in one transaction that requires both
claim keys to be absent. Candidates move forward from the cursor, so the
common case costs two round trips (one read, one transaction); a lost race
returns the fresh cursor in the failed transaction itself, and losers skip a
random few blocks ahead to spread out. After many taken candidates in a row
(a fragmented pool after deletions) one full scan finds a free block or
proves exhaustion.

Records and liveness. The node record ``nodes/<name>`` (IP, block, VTEP MAC,
underlay MTU) stays until ``node delete``: peers program their routes from
it, so the data path outlives an outage of the control plane. Liveness is a
separate record, ``leases/<name>`` (the agent's node IP), under the agent's
lease: when the lease lapses the node shows as not live (``node list``,
``ipam show``, the agents' metrics) and nothing else changes. Registering
refuses a node name that is live from another node IP (two machines with one
name) and a node IP that another live node holds; ``delete_node`` refuses a
live node unless forced.

Dual-stack: a node claims its IPv6 block in the same transaction as its
IPv4 block, at the same index of the IPv6 pod CIDR (node ``i`` owns the
``i``-th block of each, as AKS does; ``families``), under its own claim
key ``blocks/<IPv6 block>``; the reverse index ``nodeblocks/<node>`` then
holds both (``<IPv4 block>,<IPv6 block>``), so an allocation that compares
it sees one claim for both families. The IPv6 block is taken by index
rather than trusted to be free: an IPv4 pod CIDR expanded downwards
renumbers the IPv4 blocks, and the IPv6 block at a new node's index may
then be an older node's. When it is taken (or the IPv6 pod CIDR has fewer
blocks), the node gets the first free IPv6 block after it. A node that
claimed an IPv4 block only (registered by an older agent into a dual-stack
cluster) gains its IPv6 block when it registers again. Single-stack claims
and records are written exactly as before.
"""

from __future__ import annotations

import logging
import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from ..config import ClusterNetwork, FamilyNetwork, IPFamily
from ..dataplane.wgmodel import check_public_key
from ..datastore import KV, Snapshot, Store
from ..datastore.keys import (
    BadRecordHandler,
    block_key,
    blockcursor_key,
    blocks_prefix,
    config_key,
    cursor_key,
    decode_all,
    handle_key,
    ips_prefix,
    lease_key,
    leases_prefix,
    node_key,
    nodeblock_key,
    nodeblocks_prefix,
    nodes_prefix,
    wgrotate_key,
)
from ..errors import BadRecord, ConfigError, Conflict, FieldError, NodeConflict, NotFound, PoolExhausted
from . import addresses
from .clusters import not_found
from .model import ClusterNodes, Liveness, NodeRecord, check_mac, check_mtu, check_name, parse_ip
from .records import (
    BlockClaim,
    decode_address,
    decode_block,
    decode_cluster,
    decode_cursor,
    decode_liveness,
    decode_node,
    nodeblock_value,
)

log = logging.getLogger(__name__)
_ATTEMPTS = 200
_SCAN_AFTER = 16  # taken candidates in a row before a full scan
_TXN_CHUNK = 50  # deletes per transaction (etcd allows 128 ops by default)


def _skip(exc: BadRecord) -> None:
    log.debug("skipping %s", exc)


def _check_node_ip(net: ClusterNetwork, node_ip: IPv4Address) -> None:
    problem = None
    if node_ip.is_unspecified or node_ip.is_multicast or node_ip.is_loopback:
        problem = "is not a unicast host address"
    elif node_ip in net.pod_cidr:
        problem = f"lies inside the pod CIDR {net.pod_cidr}"
    elif node_ip in net.service_cidr:
        problem = f"lies inside the service CIDR {net.service_cidr}"
    if problem:
        raise ConfigError(FieldError("node-ip", f"{node_ip} {problem}"))


def _check_node_ip_v6(v6: FamilyNetwork | None, node_ip_v6: IPv6Address | None) -> None:
    """A node's IPv6 underlay address: only in a dual-stack cluster, a unicast
    address that is not link-local (peers route to it), outside the IPv6 pod
    and service CIDRs (as ``_check_node_ip`` for IPv4)."""
    if node_ip_v6 is None:
        return
    problem = None
    if v6 is None:
        problem = "is an IPv6 address, and the cluster is IPv4 single-stack"
    elif node_ip_v6.is_unspecified or node_ip_v6.is_multicast or node_ip_v6.is_loopback or node_ip_v6.is_link_local:
        problem = "is not a routable unicast address (link-local, multicast, loopback or unspecified)"
    elif node_ip_v6 in v6.pod_cidr:
        problem = f"lies inside the IPv6 pod CIDR {v6.pod_cidr}"
    elif node_ip_v6 in v6.service_cidr:
        problem = f"lies inside the IPv6 service CIDR {v6.service_cidr}"
    if problem:
        raise ConfigError(FieldError("node-ip-v6", f"{node_ip_v6} {problem}"))


def _wireguard_identity(node_ip: IPv4Address, public_key: str | None, port: int | None) -> tuple[str | None, str | None]:
    """(public key, endpoint) of a wireguard node record; (None, None) otherwise."""
    if public_key is None:
        return None, None
    if port is None or not 1 <= port <= 65535:
        raise ConfigError(FieldError("wireguard-port", f"{port} is outside 1..65535"))
    return check_public_key(public_key), f"{node_ip}:{port}"
def _liveness(kv: KV | None) -> Liveness | None:
    """A liveness record; one that does not decode counts as absent."""
    if kv is None:
        return None
    try:
        return decode_liveness(kv)
    except BadRecord as exc:
        _skip(exc)
        return None


def _check_free(snap: Snapshot, cluster: str, name: str, node_ip: IPv4Address, lease: int | None) -> None:
    """Refuse a node name that is live from another node IP (two machines with
    one name) and a node IP that another live node holds."""
    mine = _liveness(snap.get(lease_key(cluster, name)))
    if mine is not None and mine.node_ip != node_ip and (lease is None or mine.lease != lease):
        raise NodeConflict(
            f"node {name!r} is live on node IP {mine.node_ip}, not {node_ip}: two machines with one node name",
            details="give this machine its own --node name, or stop the other agent and wait for its lease to lapse",
        )
    for kv in snap.prefixed(nodes_prefix(cluster)):
        try:
            other = decode_node(kv)
        except BadRecord as exc:
            _skip(exc)
            continue
        if other.name == name or other.node_ip != node_ip:
            continue
        if _liveness(snap.get(lease_key(cluster, other.name))) is not None:
            raise NodeConflict(
                f"--node-ip {node_ip} is held by live node {other.name!r} (block {other.block})",
                details=f"give this node its own IP, or stop {other.name}'s agent and `overlaycni node delete` it",
            )


def register_node(
    store: Store,
    cluster: str,
    name: str,
    node_ip: IPv4Address,
    *,
    vtep_mac: str | None = None,
    wireguard_public_key: str | None = None,
    wireguard_port: int | None = None,
    lease: int | None = None,
    mtu: int | None = None,
    block: IPv4Network | None = None,
    node_ip_v6: IPv6Address | None = None,
) -> NodeRecord:
    """Claim (or re-claim: same name, same block) a block for node ``name``
    and write its node record; with ``lease``, also its liveness record under
    that lease. ``block``: the block this node's pods use; when the node has
    no claim (it was deleted behind its agent's back) exactly that block is
    claimed again, and ``NodeConflict`` names whoever holds it now. Raises
    ``NodeConflict`` for a name live on another node IP or a node IP another
    live node holds. With the wireguard backend the record carries the
    node's public key and its endpoint ``<node IP>:<wireguard_port>``; in a
    dual-stack cluster the node claims its IPv6 block in the same
    transaction (see the module note) and the record carries the node's
    IPv6 underlay address ``node_ip_v6`` when it has one (the direct
    backend routes IPv6 blocks via it)."""
    check_name("cluster", cluster)
    check_name("name", name)
    node_ip = parse_ip("node-ip", node_ip)
    vtep_mac = check_mac(vtep_mac)
    if mtu is not None:
        mtu = check_mtu(mtu)
    wg_key, wg_endpoint = _wireguard_identity(node_ip, wireguard_public_key, wireguard_port)
    cfg_k, nb_k, cur_k, lv_k = config_key(cluster), nodeblock_key(cluster, name), blockcursor_key(cluster), lease_key(cluster, name)
    keys, prefixes = [cfg_k, nb_k, cur_k, lv_k], [nodes_prefix(cluster), leases_prefix(cluster)]
    snap = store.read(keys, prefixes)
    taken_in_row = 0
    skip = 0
    moved6: dict[IPv4Network, IPv6Network] = {}  # IPv4 candidate -> IPv6 block, when the same index was taken

    def record(block: IPv4Network, block_v6: IPv6Network | None = None) -> NodeRecord:
        return NodeRecord(name, node_ip, block, vtep_mac, wireguard_public_key=wg_key, wireguard_endpoint=wg_endpoint, mtu=mtu,
                          block_v6=block_v6, node_ip_v6=node_ip_v6)  # fmt: skip

    def puts(block: IPv4Network, block_v6: IPv6Network | None = None) -> list[tuple[str, str, int | None]]:
        out: list[tuple[str, str, int | None]] = [(node_key(cluster, name), record(block, block_v6).to_json(), None)]
        if lease is not None:
            out.append((lv_k, Liveness(name, node_ip).to_json(), lease))
        return out

    for attempt in range(_ATTEMPTS):
        cfg = snap.get(cfg_k)
        if cfg is None:
            raise not_found(cluster)
        net = decode_cluster(cfg)
        _check_node_ip(net, node_ip)
        v6 = net.family(IPFamily.ipv6)  # None: single-stack
        _check_node_ip_v6(v6, node_ip_v6)
        _check_free(snap, cluster, name, node_ip, lease)
        lv = snap.get(lv_k)
        fresh = [(lv_k, lv.revision if lv is not None else 0)]
        claimed = snap.get(nb_k)
        if claimed is not None:  # re-register: keep the block(s), refresh the record
            claim = decode_block(claimed)
            have, block_v6 = claim.block_v4, claim.block_v6
            if block is not None and have != block:
                raise NodeConflict(f"node {name!r} now holds block {have}, but its pods use {block}")
            claim6: list[tuple[str, str, int | None]] = []
            if v6 is not None and block_v6 is None:  # claimed by an older agent: add the IPv6 block now
                block_v6 = moved6.get(have) or _v6_block(store, cluster, net, v6, have)
                claim6 = [(block_key(cluster, block_v6), name, None), (nb_k, nodeblock_value(have, block_v6), None)]
            result = store.transact(
                compare=[(nb_k, claimed.revision), *fresh, *((k, 0) for k, _, _ in claim6[:1])],
                put=[*puts(have, block_v6), *claim6],
                read_keys=[*keys, *(k for k, _, _ in claim6[:1])],
                read_prefixes=prefixes,
            )
            if result.succeeded:
                log.debug("node %s re-registered with its block(s) %s %s", name, have, block_v6 or "")
                return record(have, block_v6)
            snap = result.snapshot()
            if claim6 and v6 is not None and snap.get(claim6[0][0]) is not None:
                moved6[have] = _free_v6_block(store, cluster, v6, after=block_v6)
            continue
        cursor_kv = snap.get(cur_k)
        found = decode_cursor(cursor_kv)
        cursor = found if isinstance(found, IPv4Network) else None
        if block is not None:
            candidate = block
        elif taken_in_row >= _SCAN_AFTER:
            candidate = _scan_free(store, cluster, net, cursor)
            taken_in_row = 0
        else:
            candidate = addresses.next_block(net.pod_cidr, net.node_cidr_size, cursor, skip=skip)
        b_k = block_key(cluster, candidate)
        cand6 = (moved6.get(candidate) or _v6_block(store, cluster, net, v6, candidate)) if v6 is not None else None
        b6_keys = [block_key(cluster, cand6)] if cand6 is not None else []
        result = store.transact(
            compare=[(b_k, 0), (nb_k, 0), (cfg_k, cfg.revision), *fresh, *((k, 0) for k in b6_keys)],
            put=[
                (b_k, name, None),
                *((k, name, None) for k in b6_keys),
                (nb_k, nodeblock_value(candidate, cand6), None),
                (cur_k, str(candidate), None),
                *puts(candidate, cand6),
            ],
            read_keys=[*keys, b_k, *b6_keys],
            read_prefixes=prefixes,
        )
        if result.succeeded:
            log.debug("node %s claimed block(s) %s %s (attempt %d)", name, candidate, cand6 or "", attempt + 1)
            return record(candidate, cand6)
        snap = result.snapshot()
        holder = snap.get(b_k)
        if holder is None and cand6 is not None and v6 is not None and snap.get(b6_keys[0]) is not None:
            # the IPv4 block is free but the IPv6 block at its index is not (see the module note)
            moved6[candidate] = _free_v6_block(store, cluster, v6, after=cand6)
            continue
        if holder is not None and block is not None and snap.get(nb_k) is None:
            raise NodeConflict(
                f"node {name!r}: its block {block} was claimed by node {holder.value!r} while {name} was deleted; "
                "its pods still use addresses from it",
                details=f"delete the pods on {name} (or node {holder.value}) and restart {name}'s agent",
            )
        if holder is not None:
            taken_in_row += 1
            new_cursor = snap.get(cur_k)
            if new_cursor is None or new_cursor.value == (cursor_kv.value if cursor_kv else None):
                # the cursor did not move: the pool is fragmented; walk on from the candidate
                snap = _with_cursor(snap, cur_k, str(candidate))
            skip = random.randrange(min(attempt + 1, 8))
    raise Conflict(f"node {name!r}: could not claim a block after {_ATTEMPTS} attempts (heavy contention); try again")


def _v6_block(store: Store, cluster: str, net: ClusterNetwork, v6: FamilyNetwork, block: IPv4Network) -> IPv6Network:
    """The IPv6 block that goes with IPv4 block ``block``: the one at its
    index, or (none there) the first free one."""
    index = net.families[0].block_index(block)
    if index is not None and index < v6.block_count:
        return IPv6Network(v6.block_at(index))
    return _free_v6_block(store, cluster, v6, after=None)


def _free_v6_block(store: Store, cluster: str, v6: FamilyNetwork, *, after: IPv6Network | None) -> IPv6Network:
    """The first IPv6 block after ``after`` (wrapping) that no node claims.
    Walks at most one block past the claimed ones (never the whole CIDR:
    a /48 of /124 blocks has 2^76)."""
    taken = {c.block for c in decode_all(store.list(blocks_prefix(cluster)), decode_block, on_bad=_skip)
             if c.block.version == 6}  # fmt: skip
    count = v6.block_count
    if len(taken) < count:
        start = v6.block_index(after) if after is not None else None
        first = 0 if start is None else start + 1
        for i in range(len(taken) + 1):
            block = IPv6Network(v6.block_at((first + i) % count))
            if block not in taken:
                return block
    raise PoolExhausted(
        f"cluster {cluster!r}: no free /{v6.node_cidr_size} block left in IPv6 pod CIDR {v6.pod_cidr} "
        f"({count} blocks, all claimed)",
        details="delete unused nodes",
    )


def renew_liveness(store: Store, cluster: str, name: str, node_ip: IPv4Address, lease: int) -> None:
    """Write ``leases/<name>`` under ``lease`` again (the old lease lapsed);
    ``NodeConflict`` when the name went live from another node IP meanwhile."""
    lv_k = lease_key(cluster, name)
    for _ in range(_ATTEMPTS):
        snap = store.read([lv_k], [nodes_prefix(cluster), leases_prefix(cluster)])
        _check_free(snap, cluster, name, node_ip, lease)
        kv = snap.get(lv_k)
        if store.txn(compare=[(lv_k, kv.revision if kv else 0)], put=[(lv_k, Liveness(name, node_ip).to_json(), lease)]):
            return
    raise Conflict(f"node {name!r}: could not renew its liveness record (heavy contention); try again")


def cluster_nodes(store: Store, cluster: str, *, on_bad: BadRecordHandler | None = None) -> ClusterNodes:
    """Every node record, the live ones and the block claims, at one revision.
    A bad record raises ``BadRecord``, or with ``on_bad`` is reported and
    skipped (a bad liveness record: the node counts as not live)."""
    check_name("cluster", cluster)
    snap = store.read([config_key(cluster)], [nodes_prefix(cluster), leases_prefix(cluster), blocks_prefix(cluster)])
    if snap.get(config_key(cluster)) is None:
        raise not_found(cluster)
    records = decode_all(snap.prefixed(nodes_prefix(cluster)), decode_node, on_bad=on_bad)
    live = decode_all(snap.prefixed(leases_prefix(cluster)), decode_liveness, on_bad=on_bad)
    claims = decode_all(snap.prefixed(blocks_prefix(cluster)), decode_block, on_bad=on_bad)
    return ClusterNodes(
        records=tuple(records), live={lv.node: lv for lv in live}, claims={c.block: c.node for c in claims},
        revision=snap.revision,
    )


def _with_cursor(snap: Snapshot, cur_k: str, value: str) -> Snapshot:
    kvs = tuple(kv for kv in snap.kvs if kv.key != cur_k) + (KV(cur_k, value, 0),)
    return Snapshot(kvs, snap.revision)


def _scan_free(store: Store, cluster: str, net: ClusterNetwork, cursor: IPv4Network | None) -> IPv4Network:
    taken = {c.block for c in decode_all(store.list(blocks_prefix(cluster)), decode_block, on_bad=_skip)}
    count = addresses.block_count(net.pod_cidr, net.node_cidr_size)
    if len(taken) < count:
        start = addresses.next_block(net.pod_cidr, net.node_cidr_size, cursor)
        first = addresses.block_index(net.pod_cidr, start) or 0
        for i in range(count):
            block = addresses.block_at(net.pod_cidr, net.node_cidr_size, (first + i) % count)
            if block not in taken:
                return block
    raise PoolExhausted(
        f"cluster {cluster!r}: no free /{net.node_cidr_size} block left in pod CIDR {net.pod_cidr} "
        f"({count} blocks, all claimed)",
        details="grow it with `overlaycni cluster expand-pod-cidr`, or delete unused nodes",
    )


def get_node(store: Store, cluster: str, name: str) -> NodeRecord:
    check_name("cluster", cluster)
    check_name("name", name)
    snap = store.read([config_key(cluster), node_key(cluster, name)])
    if snap.get(config_key(cluster)) is None:
        raise not_found(cluster)
    kv = snap.get(node_key(cluster, name))
    if kv is None:
        raise NotFound(f"node {name!r} not found in cluster {cluster!r} (not registered, or deleted)")
    return decode_node(kv)


def list_nodes(store: Store, cluster: str, *, on_bad: BadRecordHandler | None = None) -> list[NodeRecord]:
    """Every node record, live or not (``cluster_nodes`` tells which are live).
    A bad record raises ``BadRecord``, or with ``on_bad`` is reported and skipped."""
    check_name("cluster", cluster)
    snap = store.read([config_key(cluster)], [nodes_prefix(cluster)])
    if snap.get(config_key(cluster)) is None:
        raise not_found(cluster)
    return decode_all(snap.prefixed(nodes_prefix(cluster)), decode_node, on_bad=on_bad)


def list_blocks(store: Store, cluster: str, *, on_bad: BadRecordHandler | None = None) -> dict[str, IPv4Network]:
    """Every claimed IPv4 block by node name, live or not."""
    return {node: claim.block_v4 for node, claim in list_claims(store, cluster, on_bad=on_bad).items()}


def list_claims(store: Store, cluster: str, *, on_bad: BadRecordHandler | None = None) -> dict[str, BlockClaim]:
    """Every node's claim (its block of each family) by node name, live or not."""
    check_name("cluster", cluster)
    snap = store.read([config_key(cluster)], [nodeblocks_prefix(cluster)])
    if snap.get(config_key(cluster)) is None:
        raise not_found(cluster)
    claims = decode_all(snap.prefixed(nodeblocks_prefix(cluster)), decode_block, on_bad=on_bad)
    return {c.node: c for c in claims}


def delete_node(store: Store, cluster: str, name: str, *, force: bool = False) -> None:
    """Free the node's block and release its pod addresses: its peers drop
    its routes. A live node (its agent holds its lease) is refused unless
    ``force``: its pods still use the block. Not-found is success;
    re-running after a crash finishes the job."""
    check_name("cluster", cluster)
    check_name("name", name)
    nb_k, lv_k = nodeblock_key(cluster, name), lease_key(cluster, name)
    node_keys = [node_key(cluster, name), cursor_key(cluster, name), cursor_key(cluster, name, version=6),
                 wgrotate_key(cluster, name), lv_k]  # fmt: skip
    snap = store.read([config_key(cluster), nb_k, lv_k])
    if snap.get(config_key(cluster)) is None:
        raise not_found(cluster)
    live = _liveness(snap.get(lv_k))
    if live is not None and not force:
        raise NodeConflict(
            f"node {name!r} is live: its agent on {live.node_ip} holds its lease, and its pods use its block",
            details="stop its agent first (a stopped agent gives its lease up), or use --force",
        )
    claimed = snap.get(nb_k)
    # 1. the claim first, so no allocation on this node can succeed after it
    try:
        claim = decode_block(claimed) if claimed is not None else None
    except BadRecord as exc:  # a corrupt reverse index: drop it with the node's other keys
        log.debug("node %s: %s", name, exc)
        claim = None
    if claim is not None and claimed is not None:
        b_keys = [block_key(cluster, b) for b in claim.blocks]
        ok = store.txn(
            compare=[(nb_k, claimed.revision), *((k, claimed.revision) for k in b_keys)],
            delete=[nb_k, *b_keys, *node_keys],
        )
        if not ok:  # half-written claim, or an IPv6 block claimed later: delete what is ours
            kvs = [store.get(k) for k in b_keys]
            store.txn(compare=[], delete=[nb_k, *node_keys])
            for k, kv in zip(b_keys, kvs, strict=True):
                if kv is not None and kv.value == name:
                    store.txn(compare=[(k, kv.revision)], delete=[k])
    else:
        store.txn(compare=[], delete=[nb_k, *node_keys])
    # 2. the handles of its addresses (each written with its addresses, same revision)
    ips = store.list(ips_prefix(cluster, name))  # after step 1: nothing can be added now

    for i in range(0, len(ips), _TXN_CHUNK):
        chunk = ips[i : i + _TXN_CHUNK]
        handles: dict[str, int] = {}  # one handle for both addresses of an attachment
        for kv in chunk:
            try:
                a = decode_address(kv)
            except BadRecord as exc:  # no handle to find: the address goes in step 3
                _skip(exc)
                continue
            handles[handle_key(cluster, a.container_id, a.ifname)] = kv.revision
        if not store.txn(compare=list(handles.items()), delete=list(handles)):
            for k, rev in handles.items():
                store.txn(compare=[(k, rev)], delete=[k])
    # 3. the addresses themselves
    store.delete_prefix(ips_prefix(cluster, name))
