"""A dual-stack batch of attachments reserved at once (``podbatch``'s ADD side).

In a dual-stack cluster the node's claim names a block per family, and each
attachment of a batch gets one address of each (``pods.reserve``'s rule: an
attachment holds both or neither). As in the single-stack batch: one read
(every handle, the claim, both cursors, the requested addresses), then one
transaction that writes every allocation of the batch (``ips/<node>/<ipv4>``,
``ips/<node>/<ipv6, exploded>`` and ``handles/<cid>/<ifname>`` naming both)
and moves each family's cursor (``cursor/<node>``, ``cursor6/<node>``) past
its last free pick, under the compares of one allocation (every handle and
address absent, the claim unchanged). A failed attempt returns, in the same
round trip, a window of used addresses per family from its first candidate
on, and the next try recomputes each attachment. An allocation is six
operations (three compares, three puts) instead of four, so a transaction
holds ``TXN_ATTACHMENTS`` attachments (etcd's ``--max-txn-ops``, 128 by
default). IPv6 blocks hold up to 2^80 addresses: ``addresses.next_free``
never walks one.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from ..cidr import IPAddress, IPNetwork
from ..datastore import Snapshot, Store
from ..datastore.keys import cursor_key, handle_key, ip_key, ips_prefix, nodeblock_key
from ..errors import AddressUnavailable, BadRecord, Conflict, NotFound, OverlayCNIError
from . import addresses
from .clusters import get_cluster
from .model import Allocation
from .pods import _allocation, _check_families, _check_requested, _handle, _requested, held_here, pool_full, scan
from .records import address_value, decode_block, decode_cursor

_ATTEMPTS = 64
_WINDOW = 64
TXN_ATTACHMENTS = 20  # dual-stack attachments per transaction: 1 + 6 x 20 + 2 operations <= 128

Picks = list[tuple[IPNetwork, IPAddress]]  # (block, address) per family, IPv4 first
Answer = tuple[Allocation, bool] | OverlayCNIError


def reserve_dual(store: Store, cluster: str, node: str, wanted: list, pending: list[int], out: list) -> None:
    """Answer ``out[i]`` for every ``i`` of ``pending`` (``wanted[i]``: a
    ``podbatch.Reservation``), ``TXN_ATTACHMENTS`` per transaction. A
    datastore failure is the answer of that transaction's attachments."""
    for start in range(0, len(pending), TXN_ATTACHMENTS):
        chunk = pending[start : start + TXN_ATTACHMENTS]
        try:
            _reserve(store, cluster, node, wanted, chunk, out)
        except OverlayCNIError as exc:
            for i in chunk:
                if out[i] is None:
                    out[i] = exc


def _reserve(store: Store, cluster: str, node: str, wanted: list, idx: list[int], out: list) -> None:
    req: dict[int, dict[int, IPAddress]] = {}
    for i in idx:
        w = wanted[i]
        try:
            req[i] = _requested(w.requested_ips or ((w.requested_ip,) if w.requested_ip is not None else ()))
        except OverlayCNIError as exc:
            out[i] = exc
    idx = [i for i in idx if i in req]
    h_ks = {i: handle_key(cluster, wanted[i].container_id, wanted[i].ifname) for i in idx}
    nb_k, used_prefix = nodeblock_key(cluster, node), ips_prefix(cluster, node)
    cur_ks = {v: cursor_key(cluster, node, version=v) for v in (4, 6)}
    keys = [*h_ks.values(), nb_k, *cur_ks.values(), *(ip_key(cluster, node, ip) for i in idx for ip in req[i].values())]
    snap = store.read(keys)
    used: dict[int, set[int]] = {4: set(), 6: set()}  # seen taken during this call (may go stale: only to skip)
    confirmed_full = False
    races = 0
    last_cursors: tuple[str | None, ...] | None = None
    for attempt in range(_ATTEMPTS):
        claim = snap.get(nb_k)
        todo = []
        for i in idx:
            handle = snap.get(h_ks[i]) if out[i] is None else None
            if out[i] is not None:
                continue
            if handle is not None:
                try:
                    held = held_here(handle, node, wanted[i].container_id, wanted[i].ifname)
                except (BadRecord, AddressUnavailable) as exc:
                    out[i] = exc
                    continue
                if claim is not None:
                    out[i] = (held, False)
                    continue
            todo.append(i)
        if not todo:
            return
        if claim is None:
            get_cluster(store, cluster)  # raises NotFound for an unknown cluster
            raise NotFound(f"node {node!r} has no block in cluster {cluster!r}; register it first")
        blocks = decode_block(claim).blocks
        last_cursors, races, skip = scan(snap, used_prefix, used, cur_ks, blocks, last_cursors, attempt=attempt, races=races)
        taken = {v: set(s) for v, s in used.items()}
        for i in todo:  # requested addresses first: no free pick may take one
            try:
                _check_families(req[i], blocks, node)
                for block in blocks:
                    ip = req[i].get(block.version)
                    if ip is None:
                        continue
                    _check_requested(ip, block, node)
                    if snap.get(ip_key(cluster, node, ip)) is not None or int(ip) in taken[ip.version]:
                        raise AddressUnavailable(f"requested IP {ip} is already in use on node {node!r}")
            except OverlayCNIError as exc:
                out[i] = exc
                continue
            for ip in req[i].values():
                taken[ip.version].add(int(ip))
        after: dict[int, IPAddress | None] = {}
        for b in blocks:
            found = decode_cursor(snap.get(cur_ks[b.version]))
            after[b.version] = found if isinstance(found, (IPv4Address, IPv6Address)) else None
        chosen: dict[int, Picks] = {}
        free: dict[int, list[IPAddress]] = {4: [], 6: []}
        short: list[int] = []
        for i in todo:
            if out[i] is not None:
                continue
            picks: Picks = []
            for block in blocks:
                ip = req[i].get(block.version)
                if ip is None:
                    ip = addresses.next_free(block, taken[block.version], after[block.version], skip=skip)
                    if ip is None:
                        short.append(i)
                        for _b, made in picks:  # its other family's free pick is not used
                            if made in free[made.version]:
                                free[made.version].remove(made)
                        break
                    after[block.version] = ip
                    free[block.version].append(ip)
                    taken[block.version].add(int(ip))
                picks.append((block, ip))
            else:
                chosen[i] = picks
            skip = 0
        if short and not confirmed_full:
            # what this call saw says full; check against a fresh, complete read
            snap = store.read(keys, [used_prefix], keys_only=True)
            used = {4: set(), 6: set()}
            confirmed_full = True
            continue
        for i in short:
            full = next((b for b in blocks if req[i].get(b.version) is None
                         and addresses.next_free(b, used[b.version], None) is None), blocks[0])  # fmt: skip
            out[i] = pool_full(cluster, node, full)
        if not chosen:
            continue  # every pending attachment was answered: the loop ends at the top
        confirmed_full = False
        allocs = {i: _allocation(node, picks, wanted[i].container_id, wanted[i].ifname, wanted[i].pod)
                  for i, picks in chosen.items()}  # fmt: skip
        result = _commit(store, cluster, node, wanted, chosen, allocs, free, h_ks=h_ks, claim_rev=claim.revision,
                         keys=keys, blocks=blocks)  # fmt: skip
        if result is None:
            for i, alloc in allocs.items():
                out[i] = (alloc, True)
            continue
        snap = result
    for i in idx:
        if out[i] is None:
            out[i] = Conflict(f"node {node!r}: could not allocate after {_ATTEMPTS} attempts (heavy contention); try again")


def _commit(
    store: Store, cluster: str, node: str, wanted: list, chosen: dict[int, Picks], allocs: dict[int, Allocation],
    free: dict[int, list[IPAddress]], *, h_ks: dict[int, str], claim_rev: int, keys: list[str],
    blocks: tuple[IPNetwork, ...],
) -> Snapshot | None:
    """One transaction for every chosen pair; None when it succeeded, else
    the snapshot it returned (the keys, and per family the used addresses
    from the first candidate on)."""
    compare = [(nodeblock_key(cluster, node), claim_rev)]
    put = []
    for i, picks in chosen.items():
        w = wanted[i]
        i_ks = [ip_key(cluster, node, ip) for _, ip in picks]
        compare += [(h_ks[i], 0), *((k, 0) for k in i_ks)]
        put += [(k, address_value(w.container_id, w.ifname, w.pod), None) for k in i_ks]
        put.append((h_ks[i], _handle(allocs[i], w.pod), None))
    windows = []
    limit = len(chosen) + _WINDOW
    for block in blocks:
        mine = free[block.version]
        if mine:
            put.append((cursor_key(cluster, node, version=block.version), str(mine[-1]), None))
        picked = [ip for picks in chosen.values() for _, ip in picks if ip.version == block.version]
        first = mine[0] if mine else min(picked, key=int)
        windows.append((ip_key(cluster, node, first), ip_key(cluster, node, block.broadcast_address), limit))
        if mine and int(mine[-1]) < int(first):
            windows.append((ip_key(cluster, node, block.network_address), ip_key(cluster, node, first), limit))
    result = store.transact(compare=compare, put=put, read_keys=keys, read_ranges=windows, keys_only=True)
    return None if result.succeeded else result.snapshot()
