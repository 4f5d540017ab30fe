"""Why may (or may not) SRC connect to DST on PORT/PROTOCOL: the verdict of
``policy.engine`` for two endpoints of an inventory, and its JSON form (the
contract of ``policy explain -o json``).
"""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

from ..errors import ConfigError, PolicyFieldError
from .engine import Decision, Verdict, allowed
from .inventory import Inventory
from .model import PROTOCOLS, PodInfo


def parse_port(text: str) -> tuple[int, str]:
    """``80``, ``80/TCP``, ``53/udp`` -> (port, PROTOCOL)."""
    number, _, proto = text.partition("/")
    proto = (proto or "TCP").upper()
    if not number.isdigit() or not 1 <= int(number) <= 65535:
        raise ConfigError(PolicyFieldError("port", f"{text!r}: expected PORT/PROTOCOL, e.g. 80/TCP (port 1-65535)"))
    if proto not in PROTOCOLS:
        raise ConfigError(PolicyFieldError("port", f"{text!r}: protocol must be TCP, UDP or SCTP"))
    return int(number), proto


def qualify(inventory: Inventory, text: str, *, field: str) -> str:
    """A bare pod NAME as ``NAMESPACE/NAME`` when exactly one pod of the
    inventory has it (a lab names pods that way); an ambiguous one is a
    ``ConfigError`` listing the candidates. Anything else is returned as is."""
    if "/" in text:
        return text
    try:
        IPv4Address(text)
        return text
    except ValueError:
        pass
    found = sorted(p.key for p in inventory.pods if p.name == text)
    if len(found) > 1:
        raise ConfigError(PolicyFieldError(field, f"pod {text!r} is ambiguous: {', '.join(found)}; give NAMESPACE/NAME"))
    return found[0] if found else text


def explain(inventory: Inventory, *, src: str, dst: str, port: str, bare_names: bool = False) -> tuple[Verdict, dict[str, Any]]:
    """The verdict for SRC -> DST PORT/PROTO and its JSON form. SRC and DST
    are ``NAMESPACE/POD`` or an IPv4 address; with ``bare_names`` also a
    pod NAME that only one namespace has."""
    if bare_names:
        src, dst = qualify(inventory, src, field="src"), qualify(inventory, dst, field="dst")
    s = inventory.endpoint(src, field="src")
    d = inventory.endpoint(dst, field="dst")
    number, proto = parse_port(port)
    v = allowed(s, d, number, proto, pods=inventory.pods, namespaces=inventory.namespaces, policies=inventory.policies)
    return v, verdict_json(v, src=s, dst=d, port=number, protocol=proto)


def _name(e: PodInfo | IPv4Address) -> str:
    return e.key if isinstance(e, PodInfo) else str(e)


def _decision_json(d: Decision) -> dict[str, Any]:
    return {
        "allowed": d.allowed,
        "isolated": d.isolated,
        "policy": d.policy,
        "rule": f"{d.direction.lower()}[{d.rule}]" if d.rule is not None else None,
        "policies": list(d.policies),
        "reason": d.reason,
    }


def verdict_json(v: Verdict, *, src: PodInfo | IPv4Address, dst: PodInfo | IPv4Address, port: int, protocol: str) -> dict[str, Any]:
    return {
        "src": _name(src),
        "dst": _name(dst),
        "port": port,
        "protocol": protocol,
        "allowed": v.allowed,
        "verdict": "allow" if v.allowed else "deny",
        "policy": v.policy,
        "rule": v.rule,
        "reason": v.reason,
        "egress": _decision_json(v.egress),
        "ingress": _decision_json(v.ingress),
    }
