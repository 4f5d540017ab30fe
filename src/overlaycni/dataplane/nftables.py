"""nftables JSON, written once for every table this project owns (pure).

Two tables are rendered from these pieces: the node's ``ip overlaycni``
(``nftmodel``: anti-spoofing, VXLAN filter, SNAT) and the NetworkPolicy
table ``inet overlaycni`` (``policy.render``). Both are applied by the same
runner (``linux/nft.py``, one libnftables transaction per command list) and
kept up to date by the same diff: when a table's *structure* (chains, rules,
set and map declarations) is unchanged, only the set and map elements that
differ are deleted and added, in one transaction; when it changed, the
caller replaces the whole table atomically (add + delete + add the table,
then its content). The JSON schema is libnftables-json(5).

Elements are Python values, encoded by their type, so that a rendered
table, a kernel listing and a diff compare the same things:

================================  =============================================
``IPv4Address``                   ``"10.0.0.1"``
``IPv4Network``                   ``{"prefix": ...}``; a /32 as its bare address,
                                  which is how ``nft -j list`` shows it
``int`` / ``str``                 a port / an interface name (as is)
``tuple``                         a concatenation ``{"concat": [...]}``
``MapEntry(key, value)``          a map element ``[key, value]``; a map element
                                  is deleted by its key alone
``Jump(chain)``                   the verdict ``{"jump": {"target": chain}}``
``RawRange(lo, hi)``              ``{"range": [lo, hi]}``: a range of a raw
                                  payload field (``@th,336,32``), which nft
                                  can only type as an integer; a value past
                                  64 bits (an IPv6 block, ``@th,304,128``) as
                                  a hex string, as nft lists it (its JSON
                                  parser reads no wider numbers)
================================  =============================================

Decoding goes by the declared type of the set or map (``SetDecl``), taken
from the render or the listing itself. A table that grows (per-peer map
elements, ``log`` expressions in rules) needs no change here: rules are
structure, and any map whose key and value types ``decode_value`` knows is
diffed element by element.

``TableLayout`` is the structure of a table rendered whole (named counters,
set declarations, chains and their rules) with a fingerprint chain
``fp_<hash>`` among them, so that a listing tells in one look whether the
kernel holds this structure: the node's tables (``nftmodel``, ``podguard``)
are written through it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, summarize_address_range
from typing import Any

Element = Any  # IPv4Address, IPv4Network, int, str, RawRange, a tuple of those (concatenation), or MapEntry


@dataclass(frozen=True)
class Jump:
    """A verdict that jumps to a chain (the value of a verdict map)."""

    target: str


@dataclass(frozen=True)
class MapEntry:
    """An element of a map; a delete names its key alone."""

    key: Any
    value: Any


@dataclass(frozen=True)
class RawRange:
    """A range of values of a raw payload field (``@th,336,32``, say). nft
    types such a field as a plain integer, so a set keyed by it takes and
    lists integers: an IPv4 network is the range of its addresses as
    numbers (network byte order on the wire, as the field is read)."""

    lo: int
    hi: int

    @classmethod
    def of(cls, net: IPv4Network | IPv6Network) -> RawRange:
        return cls(int(net.network_address), int(net.broadcast_address))


@dataclass(frozen=True)
class NftState:
    """What a table holds, in the terms the diff compares: a fingerprint of
    its structure (None when unknown) and the elements of each set and map.
    The fingerprint is whatever compares equal exactly when the structures
    are: the node table's ``fp_<hash>`` chain name, or a render's structure
    itself (comparing two renders' structures is cheaper than hashing one)."""

    fingerprint: Any
    sets: dict[str, frozenset]
    digest: str | None = None  # a hash of the listed structure (``structure_digest``); None: not listed


# ----- expressions ---------------------------------------------------------------------


def match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def payload_raw(base: str, offset: int, length: int) -> dict[str, Any]:
    """A raw payload field: ``@base,offset,length`` (bits; base ``ll``, ``nh`` or ``th``)."""
    return {"payload": {"base": base, "offset": offset, "len": length}}


def meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def prefix(net: IPv4Network | IPv6Network) -> Any:
    """A network as an expression; a host route (/32, /128) as its address,
    the form nft itself lists."""
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def jump(chain: str) -> dict[str, Any]:
    return {"jump": {"target": chain}}


def obj(kind: str, family: str, table: str, **fields: Any) -> dict[str, Any]:
    """``{kind: {family, table, ...}}`` for a chain, set, map, rule or element."""
    return {kind: {"family": family, "table": table, **fields}}


def replace_table(family: str, table: str) -> list[dict[str, Any]]:
    """The head of an atomic replacement: the table exists, is deleted with
    everything in it, and is created empty again, in one transaction."""
    t = {"family": family, "name": table}
    return [{"add": {"table": dict(t)}}, {"delete": {"table": dict(t)}}, {"add": {"table": dict(t)}}]


def delete_table(family: str, table: str) -> list[dict[str, Any]]:
    """Delete a table whether or not it exists (add + delete in one transaction)."""
    return replace_table(family, table)[:2]


# ----- elements ------------------------------------------------------------------------


def encode(elem: Element) -> Any:
    if isinstance(elem, (IPv4Address, IPv6Address)):
        return str(elem)
    if isinstance(elem, (IPv4Network, IPv6Network)):
        return prefix(elem)
    if isinstance(elem, MapEntry):
        return [encode(elem.key), encode(elem.value)]
    if isinstance(elem, Jump):
        return jump(elem.target)
    if isinstance(elem, RawRange):
        return {"range": [_raw_int(elem.lo), _raw_int(elem.hi)]}
    if isinstance(elem, tuple):
        return {"concat": [encode(x) for x in elem]}
    return elem


def encode_key(elem: Element) -> Any:
    """What a delete names: a map element's key, any other element itself."""
    return encode(elem.key if isinstance(elem, MapEntry) else elem)


def sort_key(elem: Element) -> tuple[Any, ...]:
    """Addresses in numeric order, then numbers, names and tuples of those."""
    if isinstance(elem, (IPv4Address, IPv6Address)):
        return (0, elem.version, int(elem), 0)
    if isinstance(elem, (IPv4Network, IPv6Network)):
        return (0, elem.version, int(elem.network_address), elem.prefixlen)
    if isinstance(elem, bool) or not isinstance(elem, (int, str, tuple, MapEntry, Jump, RawRange)):
        return (9, repr(elem))
    if isinstance(elem, int):
        return (1, elem)
    if isinstance(elem, str):
        return (2, elem)
    if isinstance(elem, MapEntry):
        return (3, sort_key(elem.key), sort_key(elem.value))
    if isinstance(elem, Jump):
        return (4, elem.target)
    if isinstance(elem, RawRange):
        return (6, elem.lo, elem.hi)
    return (5, tuple(sort_key(x) for x in elem))


def element_commands(verb: str, family: str, table: str, name: str, elems: Iterable[Element]) -> list[dict[str, Any]]:
    """One ``add``/``delete element`` command for ``elems`` (none when empty)."""
    code = encode_key if verb == "delete" else encode
    encoded = [code(e) for e in sorted(elems, key=sort_key)]
    if not encoded:
        return []
    return [{verb: obj("element", family, table, name=name, elem=encoded)}]


@dataclass(frozen=True)
class SetDecl:
    """The declared type of a set (``type``, ``flags``) or map (plus ``map``,
    the type of its values), as in the ``add set`` / ``add map`` command."""

    type: str | tuple[str, ...]
    interval: bool = False
    map: str | None = None

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> SetDecl:
        kind = body.get("type", "ipv4_addr")
        flags = body.get("flags") or ()
        return cls(
            type=tuple(kind) if isinstance(kind, list) else kind,
            interval="interval" in (flags if isinstance(flags, (list, tuple)) else (flags,)),
            map=body.get("map"),
        )


@functools.lru_cache(maxsize=1 << 16)
def _address(text: str) -> IPv4Address:
    """Parsing dominates a diff of a large table, and the same pod addresses
    recur in many sets and in every render: parse each once."""
    return IPv4Address(text)


def decode_value(kind: str, raw: Any, *, interval: bool = False) -> list[Any]:
    """One listed value of nft type ``kind``; an interval may list as a
    range, which becomes the prefixes that cover it."""
    if kind == "ipv4_addr" and not interval and isinstance(raw, str):
        return [_address(raw)]
    if kind in ("ipv4_addr", "ipv6_addr"):
        net_t, addr_t = (IPv4Network, IPv4Address) if kind == "ipv4_addr" else (IPv6Network, IPv6Address)
        if isinstance(raw, dict) and "prefix" in raw:
            return [net_t(f"{raw['prefix']['addr']}/{raw['prefix']['len']}")]
        if isinstance(raw, dict) and "range" in raw:
            lo, hi = (addr_t(a) for a in raw["range"])
            return list(summarize_address_range(lo, hi))
        return [net_t(raw)] if interval else [addr_t(raw)]
    if kind == "inet_service":
        return [int(raw)]
    if kind == "integer" and interval:  # a raw payload field in an interval set (wide values are hex strings)
        if isinstance(raw, dict) and "range" in raw:
            return [RawRange(_int(raw["range"][0]), _int(raw["range"][1]))]
        return [RawRange(_int(raw), _int(raw))]
    if kind == "verdict" and isinstance(raw, dict) and "jump" in raw:
        return [Jump(raw["jump"]["target"])]
    return [raw]


def _raw_int(value: int) -> int | str:
    """A raw field's value as nft's JSON takes it: a number up to 63 bits, a hex string past that."""
    return value if value < 1 << 63 else hex(value)


def _int(raw: Any) -> int:
    return int(raw, 0) if isinstance(raw, str) else int(raw)


def decode(decl: SetDecl, raw: Any) -> list[Element]:
    """The elements one listed or rendered ``elem`` entry stands for."""
    if isinstance(raw, dict) and "elem" in raw:  # an element with attributes (counter, timeout)
        raw = raw["elem"]["val"]
    if decl.map is not None:
        key, value = raw
        keys = decode(SetDecl(decl.type, decl.interval), key)
        return [MapEntry(k, v) for k in keys for v in decode_value(decl.map, value)]
    if isinstance(decl.type, tuple):
        parts = [decode_value(t, v, interval=decl.interval and t == "integer") for t, v in zip(decl.type, raw["concat"], strict=True)]
        return [tuple(p[0] for p in parts)]
    return decode_value(decl.type, raw, interval=decl.interval)


def decode_all(decl: SetDecl, raws: Iterable[Any]) -> set[Element]:
    """The elements of a listed or rendered ``elem`` list; the common shapes
    (plain addresses, address-keyed verdict maps) without the general walk,
    which is most of the cost of diffing a large table."""
    if decl.type == "ipv4_addr" and not decl.interval:
        out: set[Element] = set()
        if decl.map is None:
            for r in raws:
                if type(r) is str:
                    out.add(_address(r))
                else:
                    out.update(decode(decl, r))
            return out
        if decl.map == "verdict":
            for r in raws:
                if type(r) is list and type(r[0]) is str and "jump" in r[1]:
                    out.add(MapEntry(_address(r[0]), Jump(r[1]["jump"]["target"])))
                else:
                    out.update(decode(decl, r))
            return out
    return {x for r in raws for x in decode(decl, r)}


# ----- tables: their state, and the one diff -----------------------------------------------


_VOLATILE = ("handle", "elem", "packets", "bytes")


def _stable(node: Any) -> Any:
    """A listing without what changes on its own: handles, elements, counter values."""
    if isinstance(node, dict):
        return {k: _stable(v) for k, v in node.items() if k not in _VOLATILE}
    if isinstance(node, list):
        return [_stable(x) for x in node]
    return node


def structure_digest(items: Iterable[Mapping[str, Any]]) -> str:
    """A hash of a table's structure as the kernel lists it (its chains,
    rules and set declarations, not elements, handles or counters): the
    same after every listing until something edits a chain, a rule or a set
    declaration. Compared with the digest taken right after our own apply,
    it tells a table edited behind our back (a flushed chain, a deleted
    rule) from ours."""
    kept = [_stable(item) for item in items if "metainfo" not in item]
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def parse_listing(doc: Mapping[str, Any], *, decls: Mapping[str, SetDecl] | None = None) -> NftState:
    """The state of a table from ``nft -j list table``: the fingerprint chain
    (``fp_<hash>``, when the table carries one), every set's and map's
    elements and the structure's digest. ``decls`` stands in for a
    declaration the listing lacks."""
    fp: str | None = None
    sets: dict[str, frozenset] = {}
    for item in doc.get("nftables", []):
        if "chain" in item and item["chain"]["name"].startswith("fp_"):
            fp = item["chain"]["name"][3:]
            continue
        kind = "set" if "set" in item else "map" if "map" in item else None
        if kind is None:
            continue
        body = item[kind]
        decl = SetDecl.of(body) if "type" in body or decls is None else decls.get(body["name"], SetDecl.of(body))
        sets[body["name"]] = frozenset(decode_all(decl, body.get("elem", [])))
    return NftState(fp, sets, structure_digest(doc.get("nftables", [])))


def image(doc: Mapping[str, Any]) -> NftState:
    """A rendered table split in two: everything but the elements (as its
    fingerprint), and the elements of each set and map (``add set``/``add
    map`` with ``elem``, and ``add element`` commands)."""
    structure: list[Any] = []
    decls: dict[str, SetDecl] = {}
    sets: dict[str, set] = {}
    for cmd in doc["nftables"]:
        verb, body = next(iter(cmd.items()))
        kind = "set" if "set" in body else "map" if "map" in body else "element" if "element" in body else None
        if kind is None:
            structure.append(cmd)
            continue
        spec = dict(body[kind])
        elems = spec.pop("elem", [])
        if kind == "element":
            into = sets.setdefault(spec["name"], set())
            (into.update if verb == "add" else into.difference_update)(decode_all(decls[spec["name"]], elems))
            continue
        decls[spec["name"]] = SetDecl.of(spec)
        sets[spec["name"]] = decode_all(decls[spec["name"]], elems)
        structure.append({verb: {kind: spec}})
    return NftState(structure, {name: frozenset(v) for name, v in sets.items()})


def diff(family: str, table: str, have: NftState, want: NftState) -> list[dict[str, Any]] | None:
    """Element deletes, then element adds, that turn ``have`` into ``want``;
    None when their structures differ (the whole table must be replaced).
    An empty list means nothing changed."""
    if have.fingerprint != want.fingerprint:
        return None
    deletes: list[dict[str, Any]] = []
    adds: list[dict[str, Any]] = []
    for name in sorted(want.sets):
        before, after = have.sets.get(name, frozenset()), want.sets[name]
        if before == after:
            continue
        deletes += element_commands("delete", family, table, name, before - after)
        adds += element_commands("add", family, table, name, after - before)
    return deletes + adds


# ----- a table rendered whole, with a fingerprint chain ---------------------------------------

Rule = list[dict[str, Any]]


@dataclass(frozen=True)
class TableLayout:
    """The static part of a table: named counters, set declarations (the
    ``add set`` body without name and elements) and base or regular chains
    (the ``add chain`` body) with their rules. What changes at run time are
    the elements of the sets."""

    family: str
    name: str
    counters: Sequence[str]
    sets: Mapping[str, Mapping[str, Any]]
    chains: Sequence[tuple[Mapping[str, Any], Sequence[Rule]]]

    def fingerprint(self) -> str:
        static = json.dumps(
            {"counters": list(self.counters), "sets": dict(self.sets), "chains": [[c, list(r)] for c, r in self.chains]},
            sort_keys=True,
        )
        return hashlib.sha256(static.encode()).hexdigest()[:12]

    def decls(self) -> dict[str, SetDecl]:
        return {name: SetDecl.of(spec) for name, spec in self.sets.items()}

    def render(self, elements: Mapping[str, Iterable[Element]]) -> list[dict[str, Any]]:
        """Commands that atomically replace the table with this layout holding ``elements``."""
        o = functools.partial(obj, family=self.family, table=self.name)
        cmds: list[dict[str, Any]] = [*replace_table(self.family, self.name)]
        cmds.append({"add": o("chain", name="fp_" + self.fingerprint())})
        cmds += [{"add": o("counter", name=name)} for name in self.counters]
        cmds += [{"add": o("set", name=name, **spec)} for name, spec in self.sets.items()]
        cmds += [{"add": o("chain", **chain)} for chain, _ in self.chains]  # every chain before a jump to it
        for chain, rules in self.chains:
            cmds += [{"add": o("rule", chain=chain["name"], expr=expr)} for expr in rules]
        for name in self.sets:
            cmds += element_commands("add", self.family, self.name, name, elements.get(name, ()))
        return cmds

    def diff(self, current: NftState, elements: Mapping[str, frozenset]) -> list[dict[str, Any]] | None:
        """Element updates from the kernel's ``current`` state; None when its
        structure is another (the table must be replaced)."""
        if current.fingerprint != self.fingerprint():
            return None
        return diff(self.family, self.name, NftState(None, current.sets), NftState(None, dict(elements)))


def counter_values(doc: Mapping[str, Any]) -> dict[str, int]:
    """Packets counted by each named counter of a listing (``list counters table ...``)."""
    return {item["counter"]["name"]: int(item["counter"].get("packets", 0))
            for item in doc.get("nftables", []) if "counter" in item}
