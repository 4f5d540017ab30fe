"""Why may (or may not) SRC connect to DST on PORT/PROTOCOL: the verdict of
``policy.engine`` for two endpoints of an inventory, and its JSON form (the
contract of ``policy explain -o json``).

A connection is IPv4 or IPv6: an address given as SRC or DST decides the
family (either address of a pod names that pod), ``family`` does when both
are pods, IPv4 otherwise. The JSON says which (``family``); a pod without an
address of that family, or SRC and DST of different families, is an error
naming the argument.
"""

from __future__ import annotations

from typing import Any

from ..cidr import IPAddress
from ..errors import ConfigError, PolicyFieldError
from ..families import IPFamily
from .engine import Decision, Verdict, allowed, connection_family
from .inventory import Inventory, parse_address
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
    if "/" in text or parse_address(text) is not None:
        return text
    found = sorted(p.key for p in inventory.pods if p.name == text)
    if len(found) > 1:
        raise ConfigError(PolicyFieldError(field, f"pod {text!r} is ambiguous: {', '.join(found)}; give NAMESPACE/NAME"))
    return found[0] if found else text


def parse_family(text: str | None) -> IPFamily | None:
    """``ipv4`` / ``ipv6`` (any case) or None; ConfigError naming ``family``."""
    if text is None:
        return None
    try:
        return IPFamily(text.lower())
    except ValueError:
        raise ConfigError(PolicyFieldError("family", f"{text!r}: expected ipv4 or ipv6")) from None


def explain(
    inventory: Inventory,
    *,
    src: str,
    dst: str,
    port: str,
    bare_names: bool = False,
    family: str | None = None,
) -> tuple[Verdict, dict[str, Any]]:
    """The verdict for SRC -> DST PORT/PROTO and its JSON form. SRC and DST
    are ``NAMESPACE/POD`` or an IPv4 or IPv6 address; with ``bare_names``
    also a pod NAME that only one namespace has. ``family`` (ipv4, ipv6)
    picks the family when both are pods."""
    if bare_names:
        src, dst = qualify(inventory, src, field="src"), qualify(inventory, dst, field="dst")
    s = inventory.endpoint(src, field="src")
    d = inventory.endpoint(dst, field="dst")
    number, proto = parse_port(port)
    wanted = parse_family(family)
    addresses = {n: a for n, t in (("src", src), ("dst", dst)) if (a := parse_address(t)) is not None}
    try:  # an address decides the family even when it is a pod's
        fam = connection_family(addresses.get("src", s), addresses.get("dst", d), wanted)
    except ValueError:
        given = ", ".join(f"{n} {a}" for n, a in addresses.items())
        if len({a.version for a in addresses.values()}) > 1:
            raise ConfigError(PolicyFieldError("dst", f"{given}: a connection is IPv4 or IPv6, not both")) from None
        raise ConfigError(PolicyFieldError("family", f"{wanted} contradicts {given}")) from None
    for name, e in (("src", s), ("dst", d)):
        if isinstance(e, PodInfo) and e.address(fam) is None:
            raise ConfigError(PolicyFieldError(name, f"pod {e.key} has no {fam.label} address (a single-stack pod)"))
    v = allowed(
        s, d, number, proto, pods=inventory.pods, namespaces=inventory.namespaces, policies=inventory.policies, family=fam
    )
    return v, verdict_json(v, src=s, dst=d, port=number, protocol=proto)


def _name(e: PodInfo | IPAddress) -> str:
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


def verdict_json(v: Verdict, *, src: PodInfo | IPAddress, dst: PodInfo | IPAddress, port: int, protocol: str) -> dict[str, Any]:
    return {
        "src": _name(src),
        "dst": _name(dst),
        "port": port,
        "protocol": protocol,
        "family": str(v.family),
        "allowed": v.allowed,
        "verdict": "allow" if v.allowed else "deny",
        "policy": v.policy,
        "rule": v.rule,
        "reason": v.reason,
        "egress": _decision_json(v.egress),
        "ingress": _decision_json(v.ingress),
    }
