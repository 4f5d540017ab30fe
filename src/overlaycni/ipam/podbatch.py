"""Pod addresses for a batch of attachments at once (group commit).

The agent's batcher (``agent.batch``) hands the CNI ADDs (or DELs) that
arrived together on one node to these functions, which do for the batch
what ``pods.reserve`` / ``pods.release`` do for one attachment, with the
same keys, the same records and the same rules (the handle first, then the
node's claim; a requested address must be usable and free; the cursor moves
forward), in the same number of round trips as one:

* ``reserve_many``: one read (every handle, the claim, the cursor, the
  requested addresses), then one transaction that writes every allocation
  of the batch (``ips/<node>/<ip>`` + ``handles/<cid>/<ifname>`` each) and
  moves the cursor past the last one, under the same compares as one
  allocation (every handle and address absent, the claim unchanged). When
  it fails, the same round trip returns the keys and the used addresses
  from the first candidate on (``len(batch) + _WINDOW``), and the next try
  recomputes each attachment: one whose handle appeared meanwhile gets it
  (or ``AddressUnavailable`` if it is on another node), a requested address
  that was taken fails that attachment only, the others pick past what was
  seen.
* ``release_many``: one read of the handles, then one transaction deleting
  every pair under the handles' revisions. An attachment whose pair is
  half-written (handle and address of different revisions) goes through
  ``pods.release``, which knows that case.
* ``get_allocations``: the handles, one read.

Dual-stack (the node's claim names an IPv6 block too, or an attachment asks
for an IPv6 address): ``podbatch6`` gives each attachment one address per
family, the whole batch in one transaction as here (after the first read
showed the claim's two blocks, it reads both cursors: one round trip more
than a single-stack batch). A single-stack batch is unchanged.
``release_many`` deletes every address the handle names (both families)
in its one transaction.

Every answer is per attachment, in order: an allocation (and whether this
call made it), or the error of that attachment alone. A datastore failure
(unreachable, the deadline) is the answer of every attachment of that
transaction (earlier transactions of the batch stand); ``release_many``
raises ``NotFound`` for a cluster that is gone. A batch larger
than ``TXN_ATTACHMENTS`` is split in transactions of that many, so that no
transaction exceeds etcd's limit of operations per transaction
(``--max-txn-ops``, 128 by default: an allocation is two compares and two
puts). Rejected: one transaction per attachment in parallel threads (N
write transactions that all bump the cursor and collide with each other).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from ..cidr import IPAddress
from ..datastore import Snapshot, Store
from ..datastore.keys import config_key, cursor_key, handle_key, ip_key, ips_prefix, nodeblock_key
from ..errors import AddressUnavailable, BadRecord, Conflict, NotFound, OverlayCNIError
from . import addresses
from .clusters import get_cluster, not_found
from .model import Allocation, check_container_id, check_ifname, check_name, check_pod, parse_ip
from .podbatch6 import reserve_dual
from .pods import _allocation, held_here, pool_full, release
from .records import address_value, decode_allocation, decode_block, decode_cursor, handle_value

log = logging.getLogger(__name__)

_ATTEMPTS = 64
_WINDOW = 64
TXN_ATTACHMENTS = 40  # attachments per transaction (etcd: --max-txn-ops 128 by default)


@dataclass(frozen=True)
class Reservation:
    """One attachment of ``reserve_many``: what ``pods.reserve`` takes."""

    container_id: str
    ifname: str
    pod: tuple[str, str] | None = None
    requested_ip: IPv4Address | None = None
    requested_ips: tuple[IPAddress, ...] = ()  # the ips capability: at most one per family (dual-stack)


Reserved = tuple[Allocation, bool]  # (the allocation, True when this call made it)


def reserve_many(store: Store, cluster: str, node: str, wanted: Sequence[Reservation]) -> list[Reserved | OverlayCNIError]:
    """``pods.reserve`` for every attachment of ``wanted`` at once."""
    check_name("cluster", cluster)
    check_name("node", node)
    out: list[Reserved | OverlayCNIError | None] = [None] * len(wanted)
    first: dict[tuple[str, str], int] = {}
    valid: list[tuple[int, Reservation]] = []
    for i, w in enumerate(wanted):
        try:
            check_container_id(w.container_id)
            check_ifname(w.ifname)
            v4 = w.requested_ip if w.requested_ip is not None else next(
                (ip for ip in w.requested_ips if isinstance(ip, IPv4Address)), None)
            w = Reservation(w.container_id, w.ifname, check_pod(w.pod),
                            parse_ip("ip", v4) if v4 is not None else None, tuple(w.requested_ips))
        except OverlayCNIError as exc:
            out[i] = exc
            continue
        if (w.container_id, w.ifname) in first:
            continue  # the same attachment twice: it gets the first one's answer
        first[(w.container_id, w.ifname)] = i
        valid.append((i, w))
    for start in range(0, len(valid), TXN_ATTACHMENTS):
        chunk = valid[start : start + TXN_ATTACHMENTS]
        try:
            got = _reserve(store, cluster, node, [w for _, w in chunk])
        except OverlayCNIError as exc:  # the datastore (or the node's claim): this transaction's attachments
            got = [exc] * len(chunk)
        for (i, _w), res in zip(chunk, got, strict=True):
            out[i] = res
    for i, w in enumerate(wanted):
        if out[i] is None:
            dup = out[first[(w.container_id, w.ifname)]]
            out[i] = (dup[0], False) if isinstance(dup, tuple) else dup
    return [r for r in out if r is not None]


def _reserve(store: Store, cluster: str, node: str, wanted: list[Reservation]) -> list[Reserved | OverlayCNIError]:
    n = len(wanted)
    out: list[Reserved | OverlayCNIError | None] = [None] * n
    h_ks = [handle_key(cluster, w.container_id, w.ifname) for w in wanted]
    nb_k, cur_k, used_prefix = nodeblock_key(cluster, node), cursor_key(cluster, node), ips_prefix(cluster, node)
    req_ks = [ip_key(cluster, node, w.requested_ip) for w in wanted if w.requested_ip is not None]
    snap = store.read([*h_ks, nb_k, cur_k, *req_ks])
    used: set[int] = set()  # addresses seen taken during this call (may go stale: only used to skip)
    confirmed_full = False
    races = 0
    last_cursor: str | None = None
    for attempt in range(_ATTEMPTS):
        claim = snap.get(nb_k)
        for i, w in enumerate(wanted):
            handle = snap.get(h_ks[i]) if out[i] is None else None
            if handle is None:
                continue
            try:
                held = held_here(handle, node, w.container_id, w.ifname)
            except (BadRecord, AddressUnavailable) as exc:
                out[i] = exc
                continue
            if claim is not None:
                out[i] = (held, False)
        pending = [i for i in range(n) if out[i] is None]
        if not pending:
            break
        if claim is None:
            get_cluster(store, cluster)  # raises NotFound for an unknown cluster
            raise NotFound(f"node {node!r} has no block in cluster {cluster!r}; register it first")
        claimed = decode_block(claim)
        if claimed.block_v6 is not None or any(ip.version == 6 for i in pending for ip in wanted[i].requested_ips):
            reserve_dual(store, cluster, node, wanted, pending, out)  # dual-stack: see the design note
            break
        block = claimed.block_v4
        used.update(addresses.ip_to_int(kv.key[len(used_prefix):]) for kv in snap.prefixed(used_prefix))
        chosen: dict[int, IPv4Address] = {}
        for i in pending:
            ip = wanted[i].requested_ip
            if ip is None:
                continue
            if ip not in block or addresses.is_reserved(block, ip):
                out[i] = AddressUnavailable(
                    f"requested IP {ip} is not a usable address of node {node!r}'s block {block} "
                    f"(usable: {block.network_address + 2} - {block.broadcast_address - 1})"
                )
            elif snap.get(ip_key(cluster, node, ip)) is not None or ip in chosen.values():
                out[i] = AddressUnavailable(f"requested IP {ip} is already in use on node {node!r}")
            else:
                chosen[i] = ip
        cursor = snap.get(cur_k)
        found = decode_cursor(cursor)
        after = found if isinstance(found, IPv4Address) else None
        if attempt and cursor is not None and cursor.value != last_cursor:
            races += 1
        last_cursor = cursor.value if cursor else None
        skip = random.randrange(min(1 << races, 16)) if races else 0  # losers of a race spread out
        taken = used | {int(ip) for ip in chosen.values()}
        short: list[int] = []
        for i in pending:
            if out[i] is not None or wanted[i].requested_ip is not None:
                continue
            ip = addresses.next_free(block, taken, after, skip=skip)  # type: ignore[assignment]  # IPv4 block: IPv4
            skip = 0
            if ip is None:
                short.append(i)
                continue
            chosen[i] = after = ip
            taken.add(int(ip))
        if short and not confirmed_full:
            # what this call saw says full; check against a fresh, complete read
            snap = store.read([*h_ks, nb_k, cur_k, *req_ks], [used_prefix], keys_only=True)
            used.clear()
            confirmed_full = True
            continue
        for i in short:
            out[i] = pool_full(cluster, node, block)
        if not chosen:
            continue  # every pending attachment was answered: the loop ends at the top
        confirmed_full = False
        result = _commit(store, cluster, node, block, wanted, chosen, h_ks=h_ks, claim_rev=claim.revision,
                         keys=[*h_ks, nb_k, cur_k, *req_ks])  # fmt: skip
        if result is None:
            for i, ip in chosen.items():
                w = wanted[i]
                out[i] = (_allocation(node, [(block, ip)], w.container_id, w.ifname, w.pod), True)
            log.debug("allocated %d addresses on %s in one transaction (attempt %d)", len(chosen), node, attempt + 1)
            continue
        snap = result
    else:
        for i in range(n):
            if out[i] is None:
                out[i] = Conflict(f"node {node!r}: could not allocate after {_ATTEMPTS} attempts (heavy contention); try again")
    return [r if r is not None else Conflict("not allocated") for r in out]


def _commit(
    store: Store, cluster: str, node: str, block: IPv4Network, wanted: list[Reservation], chosen: dict[int, IPv4Address],
    *, h_ks: list[str], claim_rev: int, keys: list[str],
) -> Snapshot | None:
    """One transaction for every chosen address; None when it succeeded, else
    the snapshot it returned (the keys, and the used addresses from the
    first candidate on)."""
    nb_k, cur_k = nodeblock_key(cluster, node), cursor_key(cluster, node)
    compare = [(nb_k, claim_rev)]
    put = []
    for i, ip in chosen.items():
        w = wanted[i]
        i_k = ip_key(cluster, node, ip)
        compare += [(h_ks[i], 0), (i_k, 0)]
        put += [(i_k, address_value(w.container_id, w.ifname, w.pod), None),
                (h_ks[i], handle_value(node, ip, block, w.pod), None)]
    free = [ip for i, ip in chosen.items() if wanted[i].requested_ip is None]
    if free:
        put.append((cur_k, str(free[-1]), None))
    # if it fails: the keys, and the used addresses from the first candidate on (and from the block's start if wrapped)
    first = free[0] if free else min(chosen.values())
    limit = len(chosen) + _WINDOW
    windows = [(ip_key(cluster, node, first), ip_key(cluster, node, block.broadcast_address), limit)]
    if free and free[-1] < first:
        windows.append((ip_key(cluster, node, block.network_address), ip_key(cluster, node, first), limit))
    result = store.transact(compare=compare, put=put, read_keys=keys, read_ranges=windows, keys_only=True)
    return None if result.succeeded else result.snapshot()


def get_allocations(
    store: Store, cluster: str, attachments: Sequence[tuple[str, str]]
) -> list[Allocation | None | BadRecord]:
    """The allocation of each (container_id, ifname), in one read (None: none; a record that does not decode: BadRecord)."""
    check_name("cluster", cluster)
    keys = [handle_key(cluster, cid, ifname) for cid, ifname in attachments]
    snap = store.read(keys)
    out: list[Allocation | None | BadRecord] = []
    for k in keys:
        kv = snap.get(k)
        try:
            out.append(decode_allocation(kv) if kv is not None else None)
        except BadRecord as exc:
            out.append(exc)
    return out


def release_many(
    store: Store, cluster: str, attachments: Sequence[tuple[str, str]], *, node: str | None = None
) -> list[Allocation | None | OverlayCNIError]:
    """``pods.release`` for every (container_id, ifname) at once: what each released (None: nothing)."""
    check_name("cluster", cluster)
    out: list[Allocation | None | OverlayCNIError] = [None] * len(attachments)
    valid: list[int] = []
    for i, (cid, ifname) in enumerate(attachments):
        try:
            check_container_id(cid)
            check_ifname(ifname)
            valid.append(i)
        except OverlayCNIError as exc:
            out[i] = exc
    for start in range(0, len(valid), TXN_ATTACHMENTS):
        chunk = list(dict.fromkeys(attachments[i] for i in valid[start : start + TXN_ATTACHMENTS]))
        try:
            done = _release(store, cluster, chunk, node=node)
        except NotFound:
            raise  # the cluster is gone: the caller decides (a DEL has nothing left to release)
        except OverlayCNIError as exc:
            done = dict.fromkeys(chunk, exc)
        for i in valid[start : start + TXN_ATTACHMENTS]:
            out[i] = done.pop(attachments[i], None)  # a duplicate releases nothing the second time
    return out


def _release(
    store: Store, cluster: str, attachments: list[tuple[str, str]], *, node: str | None
) -> dict[tuple[str, str], Allocation | None | OverlayCNIError]:
    h_ks = {a: handle_key(cluster, *a) for a in attachments}
    snap = store.read([*h_ks.values(), config_key(cluster)])
    if snap.get(config_key(cluster)) is None:
        raise not_found(cluster)
    out: dict[tuple[str, str], Allocation | None | OverlayCNIError] = {}
    pending = list(attachments)
    for _ in range(_ATTEMPTS):
        todo: list[tuple[tuple[str, str], Allocation, int]] = []
        for a in pending:
            handle = snap.get(h_ks[a])
            if handle is None:
                out[a] = None
                continue
            try:
                held = decode_allocation(handle)
            except BadRecord as exc:
                out[a] = exc  # never release what cannot be read; `ipam check` shows it
                continue
            if node is not None and held.node != node:
                out[a] = None  # held on another node: left alone
                continue
            todo.append((a, held, handle.revision))
        if not todo:
            return out
        # every address the handle names (dual-stack: both families), written in the handle's transaction
        i_ks = {a: [ip_key(cluster, held.node, ip) for ip in held.ips] for a, held, _ in todo}
        compare = [pair for a, _, rev in todo for pair in ((h_ks[a], rev), *((k, rev) for k in i_ks[a]))]
        result = store.transact(compare=compare, delete=[k for a, _, _ in todo for k in (h_ks[a], *i_ks[a])],
                                read_keys=[k for a, _, _ in todo for k in (h_ks[a], *i_ks[a])])
        if result.succeeded:
            out.update({a: held for a, held, _ in todo})
            log.debug("released %d addresses in one transaction", len(todo))
            return out
        snap = result.snapshot()
        pending = []
        for a, _held, rev in todo:
            now = snap.get(h_ks[a])
            if now is not None and now.revision == rev:  # the handle is as read: its address key is not (half-written)
                try:
                    out[a] = release(store, cluster, *a, node=node)
                except OverlayCNIError as exc:
                    out[a] = exc
            else:
                pending.append(a)  # changed meanwhile: look again
    for a in pending:
        out[a] = Conflict(f"release of {a[0]} {a[1]}: too many concurrent changes, try again")
    return out
