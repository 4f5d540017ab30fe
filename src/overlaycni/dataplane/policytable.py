"""The NetworkPolicy table ``inet overlaycni``: the ``PolicyTable`` port,
written once over an ``NftRuleset`` (the fake's and the Linux one).

Design note. ``policy.render`` turns the cluster's policies, pods and
namespaces into the whole table for one node (pure); this class brings the
kernel there with the least change. It remembers the image (structure
fingerprint + elements, ``nftables.image``) of the last render that reached
the kernel. A new render with the same structure (a pod came or went, a
label changed) becomes element deletes and adds in one transaction; a
different structure (a policy changed), the first sync, or a sync after
``reset`` replaces the whole table atomically, which also adopts whatever a
previous agent left and repairs a table edited behind our back. If the
element update is refused (the kernel drifted from the image), the whole
table is applied instead. A failure leaves the image unknown, so the next
sync replaces the table. Crash safety: the kernel is the only state; a
restarted agent's first sync is a full replace.

An incremental caller (the agent's policy controller, ``policy.incremental``)
keeps the table's state itself and hands ``update`` only the commands of a
change: element deletes and adds, and for a policy change the chains and
sets it touches. It replaces the table through ``sync`` after ``reset`` on
its first pass, periodically, and whenever ``update`` is refused. An update
that changes chains or sets lists the table back once (its structure's
digest, for ``repair``); ``repair`` renders the table the updates built
(``update`` is handed how) before comparing it with the kernel's.

Rejected: listing the table back before each update (a dump of every set per
label change) and per-pod chains (see ``policy.render``). The table never
touches ``ip overlaycni`` (the node table), nor the other way round.

Growth: rules (``log`` statements for flow logs, say) are structure and
need nothing here; maps of any type ``nftables.decode_value`` knows are
diffed element by element. A set the rules fill from the packet path (flow
logs' per-source rate set, ``PACKET_PATH_SETS``) is declared empty by every
render and never compared by ``repair``: its elements are the table's own
doing, not drift.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..errors import DataplaneError
from . import nftables
from .nflog import RATE_SET, RATE_SET_V6
from .nftables import NftState
from .ports import NftRuleset

FAMILY = "inet"
TABLE = "overlaycni"
PACKET_PATH_SETS = frozenset({RATE_SET, RATE_SET_V6})  # elements the rules themselves add (flow logs' per-source rates)

log = logging.getLogger(__name__)


class PolicyTableSync:
    """Implements ``ports.PolicyTable``; call it from one thread at a time."""

    def __init__(self, nft: NftRuleset) -> None:
        self.nft = nft
        self.applied: NftState | None = None  # image of the last render the kernel took
        # that render (repair re-applies it without the datastore); a callable after incremental updates
        self.last: dict[str, Any] | Callable[[], dict[str, Any]] | None = None
        self.digest: str | None = None  # the table's structure as listed after the last full apply

    def sync(self, render: dict[str, Any]) -> str:
        new = nftables.image(render)
        commands = nftables.diff(FAMILY, TABLE, self.applied, new) if self.applied is not None else None
        try:
            if commands == []:
                return "none"
            if commands is not None:
                try:
                    self.nft.apply(commands)
                    self.applied, self.last = new, render
                    return "elements"
                except DataplaneError as exc:
                    log.debug("policy table: element update refused (%s); replacing the table", exc.message)
            self._full(render)
        except BaseException:
            self.applied = None  # unknown kernel state: the next sync applies everything
            raise
        self.applied, self.last = new, render
        return "full"

    def _full(self, render: dict[str, Any]) -> None:
        self.nft.apply(render["nftables"])
        listed = self.nft.get_table()
        self.digest = listed.digest if listed is not None else None

    def repair(self) -> str | None:
        """Re-apply the last render if the kernel's table is not what we left
        (gone, its chains or rules edited, its elements changed): no datastore
        needed. Returns why it was re-applied, None when it was intact (or
        nothing was ever applied)."""
        if self.last is None or self.applied is None:
            return None
        if callable(self.last):  # incremental updates since the last whole render: render what they built
            self.last = self.last()
            self.applied = nftables.image(self.last)
        last = self.last
        have = self.nft.get_table()
        if have is None:
            why = "missing"
        elif self.digest is not None and have.digest is not None and have.digest != self.digest:
            why = "chains or rules changed behind our back"
        elif _ours(have.sets) != _ours(self.applied.sets):
            why = "set or map elements changed behind our back"
        else:
            return None
        try:
            self._full(last)
        except BaseException:
            self.applied = None
            raise
        return why

    def update(self, commands: list[dict[str, Any]], *, render: Callable[[], dict[str, Any]]) -> None:
        """Apply the changes an incremental state computed against what it
        knows the kernel holds (``policy.incremental``), in one transaction.
        ``render``: the whole table the kernel holds then (rendered only if a
        repair needs it). Raises ``PolicyApplyError`` when the kernel refuses
        (it drifted): the caller then applies a whole render."""
        try:
            self.nft.apply(commands)
            if any("element" not in body for cmd in commands for body in cmd.values()):
                listed = self.nft.get_table()  # chains or sets changed: the structure's new digest
                self.digest = listed.digest if listed is not None else None
        except BaseException:
            self.applied = None  # unknown kernel state: the next sync applies everything
            raise
        self.last = render
        if self.applied is not None:
            self.applied = NftState(None, self.applied.sets)  # a later sync replaces the table; repair renders first

    def reset(self) -> None:
        self.applied = None
        self.digest = None

    def remove(self) -> None:
        self.applied = None
        self.nft.apply(nftables.delete_table(FAMILY, TABLE))


def _ours(sets: dict[str, frozenset]) -> dict[str, frozenset]:
    """The elements the agent writes: without the sets the packet path fills."""
    return {name: elems for name, elems in sets.items() if name not in PACKET_PATH_SETS}
