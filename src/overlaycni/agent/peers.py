"""The node's peers: the node view the watch folds events into, and the
peer selection that programs the difference (``RunningNode`` takes these
methods from ``PeerSelector``; ``node`` holds the loops).

Design note. The node watch (``RunningNode.watch_loop``) hands over one
node record at a time. ``on_node_event`` reads what the record needs (its
block claims, its liveness record: records and claims change in one
transaction), folds it into ``view`` under ``_view_lock`` and asks the
peer selection thread (``coalesce.Coalescer``) for a run: the events of a
burst that arrive while a selection runs share the next one.
``select_peers`` chooses the peers from the latest view
(``desired.select_peers``) and programs only the difference: removals first
(a peer taking over an IP or block never meets its old holder), then the
additions and changes. A full reconcile (``node._reconcile``) replaces the
view with a fresh listing and bumps ``view_epoch``; a selection computed
from an older view never programs over it (the epoch guard), later events
ask for their own run. A failed selection falls back to a full resync.

Cost of a burst of k joins next to n nodes (a cluster bring-up: k ~ n, on
every agent). The view is dicts keyed by name (``NodeView``): an event folds
in at O(1) (it used to rebuild the records, claims and liveness maps, O(n)
per event, O(n^2) per bring-up); a selection copies them once (C-speed). A
selection programs its difference in one ``delete_peers`` and one
``ensure_peers`` batch (``dataplane.peerops``: admitted once, one batch per
kind of kernel object), and ``state``'s peers are re-sorted once: it used to
call ``ensure_peer`` per changed peer, each admitting all n peers and
copying the peer tuple, O(k n) per selection. What stays O(n log n) per
selection is choosing the peers itself (``desired.select_peers`` and the
data plane's admission both look at every peer: a collision anywhere can
change who wins). A burst shares selections (``coalesce``), so the agent
spends about one selection per selection-time of the burst; joins spaced
wider than one selection each pay one (one join next to 5,000 peers: ~0.17
s of the agent's CPU with the in-memory data plane, ``bench/peer_burst.py``
``--peers 5000 --burst 1``; 100 joins: ~0.3 s). Making the
selection incremental (indices of the admitted peers' IPs, MACs, keys and
blocks; the full selection only when a change collides) is the next step.

``keep_view`` / ``keep_peers``: a full resync keeps the held objects where
nothing changed (see their notes).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

from .. import ipam
from ..cidr import IPNetwork
from ..dataplane import Dataplane, NodeState, Peer
from ..datastore import Event, Store
from ..datastore.keys import block_key, lease_key, nodes_prefix, split_key
from ..datastore.watch import watch_loop
from ..errors import BadRecord, OverlayCNIError
from .cniops import NodeContext
from .coalesce import Coalescer
from .desired import PeerSelection, pod_mtu, select_peers, with_peers
from .heap import release_free_memory
from .metrics import AgentMetrics, BadRecords

log = logging.getLogger(__name__)
TRIM_AFTER_PEERS = 64  # a peer selection that changed this many peers gives the freed heap back (heap.py)


class PeerSelector:
    """The peer methods of ``RunningNode`` (a mixin: the node brings what is declared here)."""

    ctx: NodeContext
    store: Store
    dp: Dataplane
    metrics: AgentMetrics
    state: NodeState
    kernel_lock: threading.RLock
    view: NodeView
    _view_lock: threading.Lock
    view_epoch: int
    peer_selection: Coalescer
    disabled: dict[str, str]
    not_live: tuple[str, ...]

    bad: BadRecords

    stop: threading.Event

    def resync(self) -> None:
        raise NotImplementedError  # the node's

    def safe_resync(self, why: str) -> bool:
        raise NotImplementedError  # the node's

    def _failed(self, what: str, exc: OverlayCNIError) -> None:
        raise NotImplementedError  # the node's

    def _note(self, selection: PeerSelection) -> None:
        """Log and count each newly disabled peer once; keep the gauges current."""
        now = {p.peer: p.message for p in selection.problems}
        for peer, message in sorted(now.items()):
            if self.disabled.get(peer) != message:
                log.warning("%s: not programmed", message)
                self.metrics.peer_conflicts.inc()
        for peer in sorted(self.disabled.keys() - now.keys()):
            log.info("peer %s: no longer in conflict", peer)
        self.disabled = now
        self.not_live = selection.not_live
        m = self.metrics
        m.peers.set(len(selection.records))
        m.peers_disabled.set(len(now))
        m.peers_not_live.set(len(selection.not_live))

    def watch_loop(self, start_revision: int) -> None:
        """Node records: the peers re-selected per event; a full resync whenever the watch re-lists."""
        watch_loop(
            self.store,
            nodes_prefix(self.ctx.cluster),
            stop=self.stop,
            on_event=self.on_node_event,
            on_relist=self.resync,
            start_revision=start_revision,
            on_error=lambda exc: self._failed("node watch", exc),
        )

    def on_node_event(self, ev: Event) -> None:
        c = self.ctx
        me = c.record.name
        parts = split_key(ev.key)
        name = parts.rest[0] if parts is not None and parts.rest else ev.key
        record = None
        if ev.kind == "put":
            try:
                record = ipam.decode_node(ev)
            except BadRecord as exc:
                self.bad.report(exc)  # and the node counts as absent, as in a resync
        if name == me:
            if record != c.record:
                self.safe_resync("own record changed")
            return
        block_claims: dict[IPNetwork, str | None] = {}  # this record's blocks: who claims each now (None: nobody)
        liveness = None
        if record is not None:  # who claims its block(s) now (records and claims change in one transaction), is it live
            snap = self.store.read([*(block_key(c.cluster, b) for b in record.blocks), lease_key(c.cluster, name)])
            for block in record.blocks:
                kv = snap.get(block_key(c.cluster, block))
                block_claims[block] = None if kv is None else kv.value
            lv = snap.get(lease_key(c.cluster, name))
            if lv is not None:
                try:
                    liveness = ipam.decode_liveness(lv)
                except BadRecord as exc:
                    self.bad.report(exc)
        with self._view_lock:  # folded into the latest view (a resync may have replaced it meanwhile)
            self.view.fold(name, record, block_claims=block_claims, liveness=liveness)
        self.peer_selection.request()  # a burst of events: one selection (``coalesce``)

    def select_peers(self) -> None:
        """Choose the peers from the latest view and program the difference
        (the ``Coalescer``'s function: once per burst of node events). A
        failure falls back to a full resync, as a failed event did."""
        c = self.ctx
        try:
            with self._view_lock:
                view, epoch = self.view.snapshot(), self.view_epoch
            selection = select_peers(c.network, c.record, view.records, live=view.live, claims=view.claims)
            if pod_mtu(c.network, c.record, selection.records) != self.state.mtu:
                self.safe_resync("pod MTU changed with the node records")  # the VXLAN device and new pods follow
                return
            with self.kernel_lock:
                if self.view_epoch != epoch:
                    return  # a full reconcile ran meanwhile from a newer listing; later events asked for their own run
                changed = self._program_difference(selection)
            self._note(selection)
            if len(changed) >= TRIM_AFTER_PEERS:
                release_free_memory()  # a burst's transient structures (heap.py), outside the kernel lock
        except OverlayCNIError as exc:
            self._failed("peer selection", exc)
            self.safe_resync("peer selection failed")

    def _program_difference(self, selection: PeerSelection) -> list[str]:
        """Bring the kernel from ``state``'s peers to the selection's, in one
        batch each way (under the kernel lock): removals first (a peer taking
        over an IP or block never meets its old holder; a changed MAC or
        WireGuard key is updated in place), then additions and changes. A
        peer the data plane skips is logged and raised after the others are
        programmed (the caller falls back to a full resync, which reports
        it). Returns the names of the peers that changed."""
        old = {p.name: p for p in self.state.peers}
        new = {p.name: p for p in selection.peers}
        changed = sorted(n for n in old.keys() | new.keys() if old.get(n) != new.get(n))
        gone = [old[n] for n in changed if n in old and (n not in new or _where(old[n]) != _where(new[n]))]
        if gone:
            self.dp.delete_peers(self.state, gone)
            names = {p.name for p in gone}
            self.state = replace(self.state, peers=tuple(p for p in self.state.peers if p.name not in names))
        came = [new[n] for n in changed if n in new]
        failed: dict[str, OverlayCNIError] = {}
        if came:
            names = {p.name for p in came}
            self.state = with_peers(self.state, (*(p for p in self.state.peers if p.name not in names), *came))
            failed = self.dp.ensure_peers(self.state, came)
        for name in changed:
            if name in failed:
                log.warning("peer %s: not programmed: %s", name, failed[name])
            elif (after := new.get(name)) is not None:
                log.info("peer %s %s (%s, block %s)", name, "updated" if name in old else "added", after.node_ip, after.block)
            else:
                log.info("peer %s removed", name)
        if failed:
            raise next(iter(failed.values()))
        return changed


class NodeView:
    """Every node record, the live ones and the block claims, as dicts keyed
    by name (block): an event folds in at O(1) (``fold``), a selection takes
    a copy (``snapshot``), a full resync replaces the whole view (a new
    ``NodeView``). Not locked: the node holds ``_view_lock`` around each use."""

    def __init__(self, view: ipam.ClusterNodes) -> None:
        self._records = {r.name: r for r in view.records}
        self.live = dict(view.live)
        self.claims = dict(view.claims)
        self.revision = view.revision

    @property
    def records(self) -> tuple[ipam.NodeRecord, ...]:
        return tuple(self._records.values())

    def record(self, name: str) -> ipam.NodeRecord | None:
        return self._records.get(name)

    def fold(
        self, name: str, record: ipam.NodeRecord | None, *, block_claims: dict[IPNetwork, str | None],
        liveness: ipam.Liveness | None,
    ) -> None:
        """Node ``name``'s record (None: deleted or undecodable), who claims its blocks now (None: nobody)
        and its liveness record (None: not live)."""
        if record is None:
            self._records.pop(name, None)
        else:
            self._records[name] = record
        for block, holder in block_claims.items():
            if holder is None:
                self.claims.pop(block, None)
            else:
                self.claims[block] = holder
        if liveness is None:
            self.live.pop(name, None)
        else:
            self.live[name] = liveness

    def snapshot(self) -> ipam.ClusterNodes:
        """A copy that later folds do not change."""
        return ipam.ClusterNodes(records=self.records, live=dict(self.live), claims=dict(self.claims), revision=self.revision)


def keep_view(old: ipam.ClusterNodes, new: ipam.ClusterNodes) -> ipam.ClusterNodes:
    """``new`` with every record, and the liveness and claim maps, that equal
    ``old``'s replaced by ``old``'s objects.

    A periodic resync decodes every node record again; without this its
    thousands of fresh objects replace the held ones, so each resync moves
    the agent's long-lived data into memory it allocated among that
    resync's transient objects, and CPython's allocator (1 MiB arenas, freed
    only when empty) keeps arenas alive that would otherwise empty. Kept,
    the long-lived objects stay where the first listing put them and a
    resync's own objects all die together (``bench/peers.py`` memory)."""
    held = {r.name: r for r in old.records}
    records = tuple(r if (h := held.get(r.name)) is None or h != r else h for r in new.records)
    if len(records) == len(old.records) and all(a is b for a, b in zip(records, old.records, strict=True)):
        records = old.records
    return replace(
        new,
        records=records,
        live=old.live if new.live == old.live else new.live,
        claims=old.claims if new.claims == old.claims else new.claims,
    )


def keep_peers(old: NodeState, new: NodeState) -> NodeState:
    """``new`` with the peers that equal ``old``'s as ``old``'s objects (see ``keep_view``)."""
    held = {p.name: p for p in old.peers}
    peers = tuple(p if (h := held.get(p.name)) is None or h != p else h for p in new.peers)
    if len(peers) == len(old.peers) and all(a is b for a, b in zip(peers, old.peers, strict=True)):
        peers = old.peers
    return replace(new, peers=peers)


def _where(peer: Peer) -> tuple[object, ...]:
    """What a peer's routes lead to: a change here replaces the peer (delete, then ensure)."""
    return peer.blocks, peer.node_ip, peer.node_ip_v6


