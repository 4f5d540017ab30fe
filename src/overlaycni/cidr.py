"""CIDR arithmetic and the field parsers of the network model (pure).

Split from ``config.py``: the arithmetic is property-tested on its own, and
every parser appends a ``FieldError`` naming the flag instead of raising, so
that ``config`` can collect every problem of a configuration at once.

The arithmetic works on either IP version; the parsers say which version a
field takes (``_parse_cidr`` IPv4, ``_parse_cidr_any`` either, for the
dual-stack lists).
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from .errors import FieldError

AZURE_RESERVED_PER_SUBNET = 5  # network, gateway, 2 x DNS, broadcast
PRIVATE_RANGES = tuple(
    IPv4Network(r) for r in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)
# IPv6 unicast ranges a pod, service or VNet range may use: unique local
# addresses (RFC 4193) and global unicast (RFC 4291 section 2.4, IANA's
# 2000::/3). Everything else is link-local, multicast, loopback, IPv4-mapped,
# translation or reserved space, named in the error by IPV6_SPECIAL.
ULA_RANGE = IPv6Network("fc00::/7")
GLOBAL_UNICAST_RANGE = IPv6Network("2000::/3")
IPV6_SPECIAL = tuple(
    (IPv6Network(net), what)
    for net, what in (
        ("::/128", "the unspecified address"),
        ("::1/128", "the loopback address"),
        ("::ffff:0:0/96", "IPv4-mapped space (RFC 4291)"),
        ("64:ff9b::/96", "the NAT64 prefix (RFC 6052)"),
        ("64:ff9b:1::/48", "the local-use NAT64 prefix (RFC 8215)"),
        ("fe80::/10", "link-local (RFC 4291)"),
        ("fec0::/10", "deprecated site-local (RFC 3879)"),
        ("ff00::/8", "multicast (RFC 4291)"),
    )
)

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address


# ----- CIDR arithmetic (pure, property-tested) ----------------------------------


def count_blocks(cidr: IPNetwork, block_prefix: int) -> int:
    """How many /block_prefix blocks fit in ``cidr`` (0 if the block is larger)."""
    if block_prefix < cidr.prefixlen:
        return 0
    return 1 << (block_prefix - cidr.prefixlen)


def usable_subnet_ips(subnet: IPv4Network) -> int:
    """Addresses Azure lets VMs use in a subnet (5 are reserved)."""
    return max(0, subnet.num_addresses - AZURE_RESERVED_PER_SUBNET)


def overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    """True when ``a`` and ``b`` share an address (never across versions)."""
    return a.version == b.version and a.overlaps(b)


def contains(outer: IPNetwork, inner: IPNetwork) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def is_private(net: IPv4Network) -> bool:
    return any(contains(p, net) for p in PRIVATE_RANGES)


def is_ula(net: IPv6Network) -> bool:
    return contains(ULA_RANGE, net)


def is_global_unicast(net: IPv6Network) -> bool:
    return contains(GLOBAL_UNICAST_RANGE, net)


def ipv6_scope_problem(net: IPv6Network) -> str | None:
    """None when ``net`` is unique local or global unicast; else what it is
    instead ("link-local (RFC 4291)", "reserved space")."""
    if is_ula(net) or is_global_unicast(net):
        return None
    for special, what in IPV6_SPECIAL:
        if overlaps(net, special):
            return what if contains(special, net) else f"a range that includes {what} {special}"
    if overlaps(net, ULA_RANGE) or overlaps(net, GLOBAL_UNICAST_RANGE):
        return "a range larger than the unique local or global unicast space"
    return "reserved space"


# ----- parsing ---------------------------------------------------------------------


def _norm_key(key: object) -> str:
    return str(key).strip().lstrip("-").replace("_", "-").lower()


def _parse_cidr(name: str, raw: Any, errors: list[FieldError], *, ipv6_problem: str = "") -> IPv4Network | None:
    """Parse one IPv4 CIDR strictly: a prefix length is required and host
    bits must be clear (the error suggests the network the user meant).
    ``ipv6_problem`` replaces the generic text when an IPv6 CIDR is given."""
    text = str(raw).strip()
    try:
        is_v6 = ipaddress.ip_network(text, strict=False).version == 6
    except ValueError:
        is_v6 = False  # _parse_cidr_any says what is wrong with it
    if is_v6:
        errors.append(FieldError(name, f"--{name} {text} is IPv6; {ipv6_problem or 'an IPv4 CIDR is expected here'}"))
        return None
    net = _parse_cidr_any(name, raw, errors)
    return net if isinstance(net, IPv4Network) else None


def _parse_cidr_any(name: str, raw: Any, errors: list[FieldError]) -> IPNetwork | None:
    """Parse one IPv4 or IPv6 CIDR, as strictly as ``_parse_cidr``."""
    text = str(raw).strip()
    addr_text, slash, prefix_text = text.partition("/")
    try:
        addr = ipaddress.ip_address(addr_text)
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        if prefix_text.isdigit() and _is_ipv4(addr_text):
            problem = f"has prefix length /{prefix_text}; IPv4 allows /0 to /32"
        elif prefix_text.isdigit() and _is_ipv6(addr_text):
            problem = f"has prefix length /{prefix_text}; IPv6 allows /0 to /128"
        else:
            problem = "is not a valid CIDR (expected e.g. 10.244.0.0/16)"
        errors.append(FieldError(name, f"--{name} {text!r} {problem}"))
        return None
    if not slash:
        errors.append(FieldError(name, f"--{name} {text} has no prefix length (expected e.g. {addr}/{16 if addr.version == 4 else 64})"))
        return None
    if addr != net.network_address:
        errors.append(FieldError(name, f"--{name} {text} has host bits set; did you mean {net}?"))
        return None
    return net


def _is_ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def _parse_ip(name: str, raw: Any, errors: list[FieldError], *, ipv6_problem: str = "") -> IPv4Address | None:
    text = str(raw).strip()
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        errors.append(FieldError(name, f"--{name} {text!r} is not a valid IP address (expected e.g. 10.0.0.10)"))
        return None
    if ip.version != 4:
        errors.append(FieldError(name, f"--{name} {text} is IPv6; {ipv6_problem or 'an IPv4 address is expected here'}"))
        return None
    return ip


def _parse_int(name: str, raw: Any, lo: int, hi: int, errors: list[FieldError]) -> int | None:
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = int(str(raw).strip())
    except ValueError:
        errors.append(FieldError(name, f"--{name} {raw!r} is not a whole number"))
        return None
    if not lo <= value <= hi:
        errors.append(FieldError(name, f"--{name} {value} is out of range (allowed {lo}..{hi})"))
        return None
    return value


def _parse_choice(name: str, raw: Any, choices: tuple[str, ...], errors: list[FieldError]) -> str | None:
    value = str(raw).strip().lower()
    if value not in choices:
        errors.append(FieldError(name, f"--{name} {raw!r} is not one of: {', '.join(choices)}"))
        return None
    return value


def _split_list(name: str, raw: Any, errors: list[FieldError], *, example: str, what: str = "CIDRs") -> list[Any] | None:
    """A comma-separated string or a list; None (and an error) otherwise."""
    if isinstance(raw, str):
        return [s for s in raw.split(",") if s.strip()]
    if isinstance(raw, (list, tuple)):
        return list(raw)
    errors.append(FieldError(name, f"--{name} {raw!r} is not a list of {what} (expected e.g. {example})"))
    return None


def _parse_cidr_list(name: str, raw: Any, errors: list[FieldError]) -> tuple[IPv4Network, ...]:
    """A comma-separated string or a list of IPv4 CIDRs."""
    items = _split_list(name, raw, errors, example="10.0.0.0/8,192.168.0.0/16")
    return tuple(n for n in (_parse_cidr(name, s, errors) for s in items or ()) if n)

