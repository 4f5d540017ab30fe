"""CIDR arithmetic and the field parsers of the network model (pure).

Split from ``config.py``: the arithmetic is property-tested on its own, and
every parser appends a ``FieldError`` naming the flag instead of raising, so
that ``config`` can collect every problem of a configuration at once.
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from .errors import FieldError

AZURE_RESERVED_PER_SUBNET = 5  # network, gateway, 2 x DNS, broadcast
PRIVATE_RANGES = tuple(
    IPv4Network(r) for r in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)


# ----- CIDR arithmetic (pure, property-tested) ----------------------------------


def count_blocks(cidr: IPv4Network, block_prefix: int) -> int:
    """How many /block_prefix blocks fit in ``cidr`` (0 if the block is larger)."""
    if block_prefix < cidr.prefixlen:
        return 0
    return 1 << (block_prefix - cidr.prefixlen)


def usable_subnet_ips(subnet: IPv4Network) -> int:
    """Addresses Azure lets VMs use in a subnet (5 are reserved)."""
    return max(0, subnet.num_addresses - AZURE_RESERVED_PER_SUBNET)


def overlaps(a: IPv4Network, b: IPv4Network) -> bool:
    return a.overlaps(b)


def contains(outer: IPv4Network, inner: IPv4Network) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)


def is_private(net: IPv4Network) -> bool:
    return any(contains(p, net) for p in PRIVATE_RANGES)


# ----- parsing ---------------------------------------------------------------------


def _norm_key(key: object) -> str:
    return str(key).strip().lstrip("-").replace("_", "-").lower()


def _parse_cidr(name: str, raw: Any, errors: list[FieldError]) -> IPv4Network | None:
    """Parse one IPv4 CIDR strictly: a prefix length is required and host
    bits must be clear (the error suggests the network the user meant)."""
    text = str(raw).strip()
    addr_text, slash, prefix_text = text.partition("/")
    try:
        addr = ipaddress.ip_address(addr_text)
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        if prefix_text.isdigit() and _is_ipv4(addr_text):
            problem = f"has prefix length /{prefix_text}; IPv4 allows /0 to /32"
        else:
            problem = "is not a valid CIDR (expected e.g. 10.244.0.0/16)"
        errors.append(FieldError(name, f"--{name} {text!r} {problem}"))
        return None
    if net.version != 4:
        errors.append(FieldError(name, f"--{name} {text} is IPv6; an IPv4 CIDR is expected here"))
        return None
    if not slash:
        errors.append(FieldError(name, f"--{name} {text} has no prefix length (expected e.g. {addr}/16)"))
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


def _parse_ip(name: str, raw: Any, errors: list[FieldError]) -> IPv4Address | None:
    text = str(raw).strip()
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        errors.append(FieldError(name, f"--{name} {text!r} is not a valid IP address (expected e.g. 10.0.0.10)"))
        return None
    if ip.version != 4:
        errors.append(FieldError(name, f"--{name} {text} is IPv6; an IPv4 address is expected here"))
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


def _parse_cidr_list(name: str, raw: Any, errors: list[FieldError]) -> tuple[IPv4Network, ...]:
    """A comma-separated string or a list of CIDRs."""
    if isinstance(raw, str):
        items: list[Any] = [s for s in raw.split(",") if s.strip()]
    elif isinstance(raw, (list, tuple)):
        items = list(raw)
    else:
        errors.append(FieldError(name, f"--{name} {raw!r} is not a list of CIDRs (expected e.g. 10.0.0.0/8,192.168.0.0/16)"))
        return ()
    return tuple(n for n in (_parse_cidr(name, s, errors) for s in items) if n)
