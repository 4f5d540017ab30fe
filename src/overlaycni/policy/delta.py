"""What changed in a policy table since the kernel took it, as one nftables
transaction (pure).

``policy.incremental`` changes its table in place and tells a ``Delta``
each step: an element that came or went (adds and deletes of one element
cancel out), a set or map that appeared or went (it is then added or
deleted whole: its pending elements are moot), a chain whose rules may have
changed. ``commands`` turns that into the transaction, compared against the
chains and sets the kernel was last given, in the order the kernel accepts
it: flush the chains that change or go (their rules drop their references
to sets and chains), delete elements (verdict map entries jumping to a
chain that goes among them), delete the chains and sets that go, add the
sets (whole) and chains that come, add the rules of the chains that come or
change, add elements. A set that went and came back within one transaction
is deleted and added again whole, and the chains whose rules name it are
flushed and filled again even when their rules are the same (the kernel
refuses to delete a set that a rule still names: EBUSY).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..dataplane import nftables as nft
from ..dataplane.policytable import FAMILY, TABLE

_T = {"family": FAMILY, "table": TABLE}

SetView = tuple[Any, frozenset]  # (declared type, elements)


class Delta:
    def __init__(self) -> None:
        self.chains: dict[str, tuple[dict, ...]] = {}  # the chains as the kernel has them
        self.sets: set[str] = set()  # the sets and maps the kernel has
        self._chains: set[str] = set()  # chains that may have changed
        self._sets: set[str] = set()  # sets that appeared or went
        self._remade: set[str] = set()  # sets the kernel has that went and came back
        self._adds: dict[str, set] = defaultdict(set)
        self._dels: dict[str, set] = defaultdict(set)

    def applied(self, chains: Mapping[str, tuple[dict, ...]], sets: Iterable[str]) -> None:
        """The kernel holds these chains and sets (a whole table was applied)."""
        self.chains, self.sets = dict(chains), set(sets)
        self._chains.clear()
        self._sets.clear()
        self._remade.clear()
        self._adds.clear()
        self._dels.clear()

    def element(self, name: str, elem: Any, *, add: bool) -> None:
        if name in self._remade or (name in self._sets and name not in self.sets):
            return  # a set new in this transaction is added whole
        this, other = (self._adds, self._dels) if add else (self._dels, self._adds)
        if elem in other[name]:
            other[name].discard(elem)
        else:
            this[name].add(elem)

    def set_changed(self, name: str) -> None:
        """Set or map ``name`` appeared or went."""
        self._sets.add(name)
        if name in self.sets:
            self._remade.add(name)
        self._adds.pop(name, None)
        self._dels.pop(name, None)

    def chain_changed(self, name: str) -> None:
        self._chains.add(name)

    def commands(self, chains: Mapping[str, tuple[dict, ...]], view: Callable[[str], SetView | None]) -> list[dict]:
        """The transaction from the kernel's table to ``chains`` and the sets
        ``view`` shows; the kernel counts as holding them afterwards."""
        o = functools.partial(nft.obj, family=FAMILY, table=TABLE)
        current = {n: v for n in self._sets if (v := view(n)) is not None}
        gone = sorted(n for n in self._chains if n in self.chains and n not in chains)
        new = sorted(n for n in self._chains if n in chains and n not in self.chains)
        changed = sorted(n for n in self._chains if n in chains and n in self.chains and chains[n] != self.chains[n])
        sets_gone = sorted(n for n in self._sets if n in self.sets and (n not in current or n in self._remade))
        sets_new = sorted(n for n in self._sets if n in current and (n not in self.sets or n in self._remade))
        remade = {n for n in sets_gone if n in current}
        if remade:  # the kernel refuses to delete a set a rule still names: flush and refill those chains too
            held = {n for n in self.chains if n in chains and n not in changed and _names_any(self.chains[n], remade)}
            changed = sorted({*changed, *held})
        cmds: list[dict] = [{"flush": o("chain", name=n)} for n in changed + gone]
        for name in sorted(self._dels):
            cmds += nft.element_commands("delete", FAMILY, TABLE, name, self._dels[name])
        cmds += [{"delete": o("chain", name=n)} for n in gone]
        cmds += [{"delete": o("set", name=n)} for n in sets_gone]  # the verdict maps never go
        for name in sets_new:
            decl, elems = current[name]
            cmds.append({"add": o("set", name=name, type=decl)})
            cmds += nft.element_commands("add", FAMILY, TABLE, name, elems)
        cmds += [{"add": o("chain", name=n)} for n in new]
        for name in sorted(new + changed):
            cmds += [_rule(name, r) for r in chains[name]]
        for name in sorted(self._adds):
            cmds += nft.element_commands("add", FAMILY, TABLE, name, self._adds[name])
        for n in self._chains:
            if n in chains:
                self.chains[n] = chains[n]
            else:
                self.chains.pop(n, None)
        for n in self._sets:
            (self.sets.add if n in current else self.sets.discard)(n)
        self.applied(self.chains, self.sets)
        return cmds


def _names_any(rules: Iterable[dict], sets: set[str]) -> bool:
    """Whether any of ``rules`` refers to one of ``sets`` (``@<name>`` anywhere in its expression)."""
    refs = {"@" + n for n in sets}

    def walk(x: Any) -> bool:
        if isinstance(x, str):
            return x in refs
        if isinstance(x, dict):
            return any(walk(v) for v in x.values())
        if isinstance(x, list | tuple):
            return any(walk(v) for v in x)
        return False

    return any(walk(r.get("expr")) for r in rules)


def _rule(chain: str, rule: dict) -> dict:
    return {"add": {"rule": {**_T, "chain": chain, "expr": rule["expr"], "comment": rule["comment"][:128]}}}
