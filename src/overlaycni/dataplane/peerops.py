"""Peers programmed incrementally, written once against the ports.

``NodeDataplane`` (``engine``) takes these methods from ``PeerOps``, so the
fake and the Linux data plane run this code. The agent's node watch hands
over the peers a selection added, changed or removed (``agent.peers``);
the full reconcile (``engine``) programs every peer from scratch.

Batches: ``ensure_peers`` / ``delete_peers`` take every peer of one
selection and run each step once for the batch, so a burst of k joins next
to n peers costs O(n + k) here, not O(k * n): the state is validated once
and the peers admitted once (``admit_peers`` over the other peers of the
state followed by the batch, in its order: each new peer is checked against
every other peer and the batch's peers before it, as k single calls in a
row would), then one WireGuard transaction, one nftables transaction for the set
elements (before any route: the filters accept a peer before a route leads
to it), one neighbour batch, one FDB batch and one route batch (in
flannel's order, as the reconcile does). Removal runs in reverse (routes,
FDB, neighbours, WireGuard peers, elements), and keeps the elements some
peer left in the state still needs.

A peer the kernel cannot take is skipped and returned with its error (the
error the single call raises: ``ConfigError`` naming ``peers`` for a peer
``admit_peers`` refuses, ``PeerNotAdjacent`` on ``direct``, a WireGuard
peer without a valid key), and every other peer of the batch is
programmed. A failure of a shared step (the kernel refuses a batch) raises,
as the single call does. ``ensure_peer`` / ``delete_peer`` are batches of one.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import ConfigError, FieldError, OverlayCNIError, PeerNotAdjacent
from .model import VXLAN_IFNAME, FdbEntry, NodeState, Peer, admit_peers, peer_objects, validate_state

if TYPE_CHECKING:
    from .engine import Ports
    from .nodetables import NodeTables
    from .wireguard import WireGuardBackend


class PeerOps:
    """The peer methods of ``NodeDataplane`` (a mixin: it brings ``p``, ``_lock``, ``tables``, ``_wg``,
    ``last_state`` and ``_check_adjacent``)."""

    p: Ports
    _lock: threading.RLock
    tables: NodeTables
    _wg: WireGuardBackend
    last_state: NodeState | None

    def _check_adjacent(self, peer: Peer) -> None: ...

    def ensure_peer(self, state: NodeState, peer: Peer) -> None:
        """Program one peer of ``state`` (which lists it); ``ConfigError`` if the
        kernel cannot take it next to the others (``admit_peers``)."""
        failed = self.ensure_peers(state, [peer])
        if failed:
            raise failed[peer.name]

    def ensure_peers(self, state: NodeState, peers: Sequence[Peer]) -> dict[str, OverlayCNIError]:
        """Program ``peers`` (each listed in ``state``) in one pass; returns the
        peers skipped (name -> why, see the module note). Raises for the node's
        own settings (``validate_state``) or a kernel refusal of a batch."""
        if not peers:
            return {}
        validate_state(replace(state, pods=()))
        names = {p.name for p in peers}
        others = tuple(p for p in state.peers if p.name not in names)
        _, problems = admit_peers(replace(state, peers=(*others, *peers), pods=()))
        failed: dict[str, OverlayCNIError] = {}
        for problem in problems:
            if problem.peer in names and problem.peer not in failed:
                failed[problem.peer] = ConfigError(FieldError("peers", problem.message))
        with self._lock:
            todo = [p for p in peers if p.name not in failed]
            if state.backend == "wireguard":
                failed.update(self._wg.ensure_peers(state, todo))
            elif state.backend == "direct":
                for peer in todo:
                    try:
                        self._check_adjacent(peer)
                    except PeerNotAdjacent as exc:
                        failed[peer.name] = exc
            todo = [p for p in todo if p.name not in failed]
            if not todo:
                return failed
            # the node's filters accept a peer (its node address, its blocks) before a route leads to it:
            # once a route is there, the replies it brings back are already let in (a peer that saw this
            # node's route appear and sent at once had its VXLAN packets dropped until the elements came)
            self.tables.add_peers(state, todo)
            objs = [(peer, peer_objects(peer, backend=state.backend)) for peer in todo]
            stale: list[FdbEntry] = []
            if state.backend == "vxlan":
                for peer, o in objs:  # a changed MAC: the old FDB entry goes after the new one is in
                    old = self.p.neighbours.get_neighbour(VXLAN_IFNAME, o.neighbours[0].ip)
                    if old is not None and o.fdb is not None and old.mac != o.fdb.mac:
                        stale.append(FdbEntry(dev=VXLAN_IFNAME, mac=old.mac, dst=peer.node_ip))
                self.p.neighbours.apply_neighbours(replace=[n for _, o in objs for n in o.neighbours])
                self.p.fdb.apply_fdb(replace=[o.fdb for _, o in objs if o.fdb is not None])
            self.p.routes.apply_routes(replace=[r for _, o in objs for r in o.routes])
            if stale:
                self.p.fdb.apply_fdb(delete=stale)
            self._remember(state, todo, keep=True)
        return failed

    def delete_peer(self, state: NodeState, peer: Peer) -> None:
        self.delete_peers(state, [peer])

    def delete_peers(self, state: NodeState, peers: Sequence[Peer]) -> None:
        """Remove ``peers``' objects (``state``: the peers before, which may still list them); one gone already is
        success."""
        if not peers:
            return
        with self._lock:
            objs = [peer_objects(peer, backend=state.backend) for peer in peers]
            self.p.routes.apply_routes(delete=[r for o in objs for r in o.routes])
            if objs[0].fdb is not None and self.p.links.get_link(VXLAN_IFNAME) is not None:
                self.p.fdb.apply_fdb(delete=[o.fdb for o in objs if o.fdb is not None])
                self.p.neighbours.apply_neighbours(delete=[n for o in objs for n in o.neighbours])
            if state.backend == "wireguard":
                self._wg.delete_peers(peers)
            self.tables.remove_peers(state, peers)
            self._remember(state, peers, keep=False)

    def _remember(self, state: NodeState, peers: Sequence[Peer], *, keep: bool) -> None:
        """Keep ``last_state`` current across incremental peer changes (the repairer reconciles to it)."""
        base = self.last_state if self.last_state is not None else state
        names = {p.name for p in peers}
        kept = [p for p in base.peers if p.name not in names] + (list(peers) if keep else [])
        self.last_state = replace(base, peers=tuple(sorted(kept, key=lambda p: p.name)))
