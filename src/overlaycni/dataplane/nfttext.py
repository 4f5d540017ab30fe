"""Our nftables JSON commands in nft's native syntax (pure).

Why: nft 1.0.6 (Debian 12) cannot declare in JSON a set keyed by a raw
payload field (``typeof ip saddr . @th,336,32``: its JSON parser knows no
``typeof``, and ``integer`` has no size to concatenate), while its native
syntax can, and JSON element commands into such a set work. A command list
whose ``add set`` carries a ``typeof`` expression (the node table's
``peer_blocks``) is therefore run as text, in one transaction all the same
(``linux/nft.py``); everything else stays JSON.

Covers what this project renders, nothing more: tables, base and regular
chains, named counters, sets, rules of ``match`` (payload, raw payload,
meta, concatenations, ``&``, prefixes, set references), ``counter``,
``drop``/``accept``/``return``, ``jump``, ``notrack`` and ``masquerade``, and elements
(addresses, prefixes, ranges, names, concatenations, map entries). Every
string is quoted (nft parses a quoted address or MAC by the field's type),
so an interface name can never be taken for a keyword. Anything else raises
``ValueError``: a silent mistranslation would be worse than none.
"""

from __future__ import annotations

import json
from typing import Any

VERDICTS = ("accept", "drop", "return", "continue")


def needs_text(commands: list[dict[str, Any]]) -> bool:
    """True when a command declares a set by ``typeof`` (JSON cannot)."""
    return any("typeof" in body.get("set", {}) for cmd in commands for body in cmd.values())


def _quote(text: str) -> str:
    if '"' in text or "\n" in text:
        raise ValueError(f"nftables text: a quote or newline in {text!r}")
    return json.dumps(text)


def _name(text: str) -> str:
    if not text or not all(c.isalnum() or c in "_-." for c in text):
        raise ValueError(f"nftables text: {text!r} is not a plain name")
    return text


def expr(e: Any) -> str:
    """An expression (either side of a match, a set key, an element)."""
    if isinstance(e, bool):
        raise ValueError(f"nftables text: boolean {e!r}")
    if isinstance(e, int):
        return str(e)
    if isinstance(e, str):
        return "@" + _name(e[1:]) if e.startswith("@") else _quote(e)
    if isinstance(e, list):  # a map element: key : value
        key, value = e
        return f"{expr(key)} : {expr(value)}"
    if isinstance(e, dict) and len(e) == 1:
        (kind, v), = e.items()
        if kind == "payload" and "base" in v:
            return f"@{_name(v['base'])},{int(v['offset'])},{int(v['len'])}"
        if kind == "payload":  # fields may be two words: arp saddr ip
            return " ".join(_name(w) for w in [v["protocol"], *v["field"].split(" ")])
        if kind == "meta":
            return f"meta {_name(v['key'])}"
        if kind == "concat":
            return " . ".join(expr(x) for x in v)
        if kind == "prefix":
            return f"{_quote(str(v['addr']))}/{int(v['len'])}" if isinstance(v["addr"], str) else f"{int(v['addr'])}/{int(v['len'])}"
        if kind == "range":
            lo, hi = v
            return f"{expr(lo)}-{expr(hi)}"
        if kind == "&":
            left, right = v
            return f"{expr(left)} & {expr(right)}"
        if kind == "set":
            return "{ " + ", ".join(expr(x) for x in v) + " }"
        if kind == "jump":
            return f"jump {_name(v['target'])}"
    raise ValueError(f"nftables text: no native form for {e!r}")


def statement(s: dict[str, Any]) -> str:
    (kind, v), = s.items()
    if kind == "match":
        if v["op"] not in ("==", "!="):
            raise ValueError(f"nftables text: operator {v['op']!r}")
        return f"{expr(v['left'])} {v['op']} {expr(v['right'])}"
    if kind == "counter":
        return "counter" if v is None else f"counter name {_quote(v)}"
    if kind in VERDICTS and v is None:
        return kind
    if kind == "notrack" and v is None:
        return kind
    if kind == "jump":
        return f"jump {_name(v['target'])}"
    if kind == "masquerade":
        flags = (v or {}).get("flags", [])
        return " ".join(["masquerade", ",".join(_name(f) for f in flags)]).strip()
    raise ValueError(f"nftables text: no native form for statement {s!r}")


def _where(o: dict[str, Any]) -> str:
    return f"{_name(o['family'])} {_name(o['table'])}"


def command(cmd: dict[str, Any]) -> str:
    (verb, body), = cmd.items()
    (kind, o), = body.items()
    if verb not in ("add", "delete"):
        raise ValueError(f"nftables text: verb {verb!r}")
    if kind == "table":
        return f"{verb} table {_name(o['family'])} {_name(o['name'])}"
    head = f"{verb} {kind} {_where(o)}"
    if kind == "chain":
        if "hook" not in o:
            return f"{head} {_name(o['name'])}"
        spec = f"type {_name(o['type'])} hook {_name(o['hook'])} priority {int(o['prio'])}; policy {_name(o['policy'])};"
        return f"{head} {_name(o['name'])} {{ {spec} }}"
    if kind == "counter":
        return f"{head} {_name(o['name'])}"
    if kind == "set":
        if "typeof" in o:
            key = f"typeof {expr(o['typeof'])};"
        else:
            types = o["type"] if isinstance(o["type"], list) else [o["type"]]
            key = "type " + " . ".join(_name(t) for t in types) + ";"
        flags = o.get("flags") or []
        spec = key + (f" flags {','.join(_name(f) for f in flags)};" if flags else "")
        return f"{head} {_name(o['name'])} {{ {spec} }}"
    if kind == "rule":
        return f"{verb} rule {_where(o)} {_name(o['chain'])} " + " ".join(statement(s) for s in o["expr"])
    if kind == "element":
        return f"{head} {_name(o['name'])} {{ " + ", ".join(expr(e) for e in o["elem"]) + " }"
    raise ValueError(f"nftables text: no native form for {kind!r}")


def script(commands: list[dict[str, Any]]) -> str:
    """One nft script (one transaction when run as one buffer)."""
    return "".join(command(c) + "\n" for c in commands)
