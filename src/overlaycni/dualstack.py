"""Dual-stack settings: AKS's flags and their rules (pure).

Part of the network model; ``config`` calls these while it builds a
``ClusterNetwork`` and, like every rule there, they record each problem as a
``FieldError`` naming the flag (without dashes) instead of raising, so that a
configuration's problems are all reported at once.

The flags and rules are AKS's (the dual-stack section of
https://learn.microsoft.com/azure/aks/azure-cni-overlay and
https://learn.microsoft.com/azure/aks/configure-kubenet-dual-stack; azure-cli
passes ``--ip-families``, ``--pod-cidrs`` and ``--service-cidrs`` to the AKS
API as lists, ``managed_cluster_decorator.py`` in
https://github.com/Azure/azure-cli):

* ``--ip-families`` is ``ipv4`` (the default) or ``ipv4,ipv6``; IPv6-only is
  not offered ("Single stack IPv6-only isn't supported for node or pod IP
  addresses"). Dual-stack is offered with Azure CNI Overlay and kubenet, not
  with flat Azure CNI, whose pod IPs are VNet IPs.
* ``--pod-cidrs`` / ``--service-cidrs`` take one CIDR per family: "The count
  and order of ranges in this list must match the value provided to
  ``--ip-families``". With ``ipv4,ipv6`` and no list the defaults are pods
  ``10.244.0.0/16,fd12:3456:789a::/64`` and services
  ``10.0.0.0/16,fd12:3456:789a:1::/108``.
* "The IPv6 subnet assigned to ``--service-cidrs`` can be no larger than a
  /108" (an error on ``--service-cidrs``).
* The single-family ``--pod-cidr`` / ``--service-cidr`` keep meaning the
  IPv4 range. Both spellings may be given when they agree (the IPv4 entry of
  the list equals the single flag): a stored record and ``cluster show -o
  json`` carry both, and read back. When they disagree it is an error naming
  both flags; we do not guess which one was meant.
* ``--dns-service-ip`` stays IPv4, inside the IPv4 service CIDR (AKS takes
  one DNS service IP; its dual-stack defaults put it in ``10.0.0.0/16``).
* The VNet is dual-stack ("nodes receive both an IPv4 and IPv6 address from
  the Azure virtual network subnet"). AKS has no flag for the VNet, and
  neither it nor we have one for its IPv4 side beyond ``--vnet-cidr`` /
  ``--node-subnet-cidr``; the IPv6 side mirrors them as ``--vnet-cidrs`` /
  ``--node-subnet-cidrs`` (IPv4 first). Default: the ULA ``fd00:10:224::/48``
  and its first /64 (Azure IPv6 subnets are exactly /64:
  https://learn.microsoft.com/azure/virtual-network/ip-services/ipv6-overview).
  Like AKS's ``fd12:3456:789a::``, it is a fixed, memorable ULA prefix; a real
  network picks a random global ID (RFC 4193 section 3.2.2).
* The IPv4 overlap rules hold for the IPv6 ranges too: the pod CIDR stays out
  of the VNet (NetworkProfileCIDROverlapVNET) and of the service CIDR; the
  service CIDR stays out of the VNet (ServiceCidrOverlapExistingSubnetsCidr);
  the node subnet lies in the VNet. Ranges of different families never
  overlap (``cidr.overlaps`` is False across versions).
* Every IPv6 range is unique local (fc00::/7, RFC 4193) or global unicast
  (2000::/3), the IPv6 counterpart of AKS's ban on 169.254.0.0/16: not
  link-local, multicast, loopback, IPv4-mapped or NAT64 space. A global
  unicast pod CIDR is a warning, as a public IPv4 pod CIDR is.
* ``--node-cidr-size-v6`` (ours; default /80, see ``families``): the block
  fits in the IPv6 pod CIDR and holds max pods plus its 2 reserved addresses.
* An explicit ``--mtu`` of a dual-stack network is at least 1280, the IPv6
  minimum link MTU (RFC 8200 section 5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from .cidr import (
    IPNetwork,
    _parse_cidr,
    _parse_cidr_any,
    _parse_cidr_list,
    _parse_int,
    _split_list,
    contains,
    ipv6_scope_problem,
    is_global_unicast,
    overlaps,
)
from .errors import FieldError
from .families import (
    DEFAULT_NODE_CIDR_SIZE_V6,
    DEFAULT_NODE_SUBNET_CIDR_V6,
    DEFAULT_POD_CIDR_V6,
    DEFAULT_SERVICE_CIDR_V6,
    DEFAULT_VNET_CIDR_V6,
    DUAL_STACK,
    SINGLE_STACK,
    IPFamily,
)

NODE_CIDR_SIZE_V6_RANGE = (48, 124)
NODE_SUBNET_PREFIX_V6 = 64  # Azure: IPv6 subnets are exactly /64
MAX_SERVICE_PREFIX_V6 = 108  # AKS: no larger than /108
MIN_SERVICE_PREFIX_V6 = 126  # four addresses, as /30 is for IPv4
MIN_MTU_IPV6 = 1280  # RFC 8200 section 5: every IPv6 link carries 1280 bytes

# The ranges given per family: (single-family flag, list flag, what it is, IPv6 default).
RANGE_FLAGS = (
    ("vnet-cidr", "vnet-cidrs", "VNet", DEFAULT_VNET_CIDR_V6),
    ("node-subnet-cidr", "node-subnet-cidrs", "node subnet", DEFAULT_NODE_SUBNET_CIDR_V6),
    ("pod-cidr", "pod-cidrs", "pod CIDR", DEFAULT_POD_CIDR_V6),
    ("service-cidr", "service-cidrs", "service CIDR", DEFAULT_SERVICE_CIDR_V6),
)
LIST_FLAG = {single: plural for single, plural, _, _ in RANGE_FLAGS}
# The settings dual-stack adds (a list flag takes a single IPv4 entry too).
FIELDS = ("ip-families", *LIST_FLAG.values(), "node-cidr-size-v6")
DNS_IPV6_PROBLEM = "the DNS service IP stays IPv4, inside the IPv4 service CIDR (also in a dual-stack cluster)"


@dataclass(frozen=True)
class IPv6Side:
    """The IPv6 ranges of a dual-stack network, as parsed (each None where
    an error was recorded)."""

    vnet_cidr: IPv6Network | None
    node_subnet_cidr: IPv6Network | None
    pod_cidr: IPv6Network | None
    service_cidr: IPv6Network | None
    node_cidr_size: int | None
    non_masquerade_cidrs: tuple[IPv6Network, ...] = ()

    @property
    def complete(self) -> bool:
        return None not in (self.vnet_cidr, self.node_subnet_cidr, self.pod_cidr, self.service_cidr, self.node_cidr_size)


def parse_families(given: Mapping[str, Any], errors: list[FieldError]) -> tuple[IPFamily, ...] | None:
    """``--ip-families``: ``ipv4`` or ``ipv4,ipv6`` (a list in a file)."""
    raw = given.get("ip-families", "ipv4")
    items = _split_list("ip-families", raw, errors, example="ipv4,ipv6", what="IP families")
    if items is None:
        return None
    names = [str(x).strip().lower() for x in items if str(x).strip()]
    if names == ["ipv4"]:
        return SINGLE_STACK
    if names == ["ipv4", "ipv6"]:
        return DUAL_STACK
    unknown = [n for n in names if n not in ("ipv4", "ipv6")]
    if unknown:
        why = f"{unknown[0]!r} is not an IP family"
    elif names == ["ipv6"]:
        why = "IPv6-only clusters are not offered (AKS: pods and nodes always have IPv4)"
    elif names == ["ipv6", "ipv4"]:
        why = "IPv4 comes first"
    elif not names:
        why = "it is empty"
    else:
        why = "each family is listed once"
    text = ",".join(names) if not unknown else str(raw)
    errors.append(FieldError("ip-families", f"--ip-families {text!r}: {why}; use ipv4 (single-stack) or ipv4,ipv6 (dual-stack)"))
    return None


def resolve_range(
    given: Mapping[str, Any],
    single: str,
    *,
    default_v4: str,
    families: tuple[IPFamily, ...] | None,
    errors: list[FieldError],
) -> tuple[IPv4Network | None, IPv6Network | None]:
    """The (IPv4, IPv6) ranges of one kind from its single-family flag, its
    list flag and the defaults. A None where a range is due means an error
    was recorded; the IPv6 side is None in a single-stack network."""
    plural = LIST_FLAG[single]
    dual = families == DUAL_STACK
    v4 = _parse_cidr(single, given[single], errors) if single in given else None
    v6: IPv6Network | None = None
    if plural in given:
        nets = _parse_range_list(given, single, families=families, errors=errors)
        if nets is None:
            return None, None
        listed_v4 = nets[0]
        if single in given and v4 is not None and v4 != listed_v4:
            errors.append(
                FieldError(
                    plural,
                    f"--{plural} {_join(nets)} and --{single} {v4} disagree: --{single} is the IPv4 entry of "
                    f"--{plural} ({listed_v4}); give one of them, or the same IPv4 CIDR in both",
                )
            )
            return None, None
        if single not in given:
            v4 = listed_v4  # type: ignore[assignment]
        if dual:
            v6 = nets[1]  # type: ignore[assignment]
    elif single not in given:
        v4 = IPv4Network(default_v4)
    if dual and v6 is None and plural not in given:
        v6 = IPv6Network(next(d for name, _, _, d in RANGE_FLAGS if name == single))
    return v4, v6


def replace_ipv4_entry(raw_list: Any, ipv4: Any) -> Any:
    """A raw list setting with its first (IPv4) entry replaced; a value that
    is not a list is left for the parser to report."""
    if isinstance(raw_list, str):
        items: list[Any] = [s.strip() for s in raw_list.split(",") if s.strip()]
    elif isinstance(raw_list, (list, tuple)):
        items = list(raw_list)
    else:
        return raw_list
    return [ipv4, *items[1:]]


def _parse_range_list(
    given: Mapping[str, Any], single: str, *, families: tuple[IPFamily, ...] | None, errors: list[FieldError]
) -> tuple[IPNetwork, ...] | None:
    """One list flag, checked against the families: one CIDR per family, in
    their order."""
    plural = LIST_FLAG[single]
    items = _split_list(plural, given[plural], errors, example="10.244.0.0/16,fd12:3456:789a::/64")
    if items is None:
        return None
    before = len(errors)
    nets = tuple(n for n in (_parse_cidr_any(plural, item, errors) for item in items) if n is not None)
    if len(errors) > before or families is None:
        return None  # a malformed entry, or no families to check against (both reported)
    got = tuple(IPFamily.of(n) for n in nets)
    if got == families:
        return nets
    fams = ",".join(families)
    if len(nets) != len(families):
        hint = "; add --ip-families ipv4,ipv6 for dual-stack" if len(nets) == 2 and families == SINGLE_STACK else ""
        problem = f"has {len(nets)} CIDR{'s' if len(nets) != 1 else ''} but --ip-families {fams} needs {len(families)}{hint}"
    else:
        problem = (
            f"lists {', '.join(f.label for f in got)} but --ip-families {fams} needs "
            f"{', '.join(f.label for f in families)}, in that order"
        )
    errors.append(FieldError(plural, f"--{plural} {_join(nets) or repr(given[plural])} {problem} (one CIDR per family, IPv4 first)"))
    return None


def _join(nets: tuple[IPNetwork, ...]) -> str:
    return ",".join(str(n) for n in nets)


def parse_node_cidr_size_v6(given: Mapping[str, Any], *, dual: bool, errors: list[FieldError]) -> int | None:
    """``--node-cidr-size-v6``: only a dual-stack network has IPv6 blocks."""
    if not dual:
        if "node-cidr-size-v6" in given:
            errors.append(
                FieldError(
                    "node-cidr-size-v6",
                    "--node-cidr-size-v6 applies to dual-stack networks only; add --ip-families ipv4,ipv6",
                )
            )
        return None
    lo, hi = NODE_CIDR_SIZE_V6_RANGE
    return _parse_int("node-cidr-size-v6", given.get("node-cidr-size-v6", DEFAULT_NODE_CIDR_SIZE_V6), lo, hi, errors)


def parse_non_masquerade(
    raw: Any, *, dual: bool, errors: list[FieldError]
) -> tuple[tuple[IPv4Network, ...], tuple[IPv6Network, ...]]:
    """``--non-masquerade-cidrs``: IPv4 destinations, and IPv6 ones too in a
    dual-stack network (each family's egress is masqueraded on its own)."""
    if not dual:
        return _parse_cidr_list("non-masquerade-cidrs", raw, errors), ()
    items = _split_list("non-masquerade-cidrs", raw, errors, example="10.0.0.0/8,fd00::/8")
    nets = [n for n in (_parse_cidr_any("non-masquerade-cidrs", s, errors) for s in items or ()) if n is not None]
    v4 = tuple(n for n in nets if isinstance(n, IPv4Network))
    v6 = tuple(n for n in nets if isinstance(n, IPv6Network))
    return v4, v6


def check_plugin(plugin: str | None, mode: str | None, *, errors: list[FieldError]) -> None:
    """Dual-stack needs Azure CNI Overlay or kubenet."""
    if plugin == "azure" and mode != "overlay":
        errors.append(
            FieldError(
                "ip-families",
                "--ip-families ipv4,ipv6 needs --network-plugin-mode overlay (or --network-plugin kubenet): "
                "AKS offers dual-stack with Azure CNI Overlay and kubenet, not with flat Azure CNI",
            )
        )


def check_mtu(mtu: int | None, *, errors: list[FieldError]) -> None:
    if mtu is not None and mtu < MIN_MTU_IPV6:
        errors.append(
            FieldError(
                "mtu",
                f"--mtu {mtu} is below {MIN_MTU_IPV6}, the minimum IPv6 link MTU (RFC 8200); "
                "a dual-stack pod needs at least that",
            )
        )


def check_ipv6(side: IPv6Side, *, max_pods: int | None, errors: list[FieldError], warnings: list[str]) -> None:
    """AKS's rules for the IPv6 ranges (see the module note)."""
    for single, flag, what, _ in RANGE_FLAGS:
        net: IPv6Network | None = getattr(side, single.replace("-", "_"))
        problem = ipv6_scope_problem(net) if net is not None else None
        if problem:
            errors.append(
                FieldError(
                    flag,
                    f"--{flag} {net}: the IPv6 {what} is {problem}; use a unique local (fc00::/7) "
                    "or global unicast (2000::/3) range",
                )
            )
    _check_ipv6_overlaps(side, errors)
    _check_ipv6_sizes(side, max_pods=max_pods, errors=errors)
    pod = side.pod_cidr
    if pod is not None and is_global_unicast(pod):
        warnings.append(
            f"--pod-cidrs {pod}: the IPv6 pod CIDR is global unicast, not unique local (fc00::/7); pod egress "
            "is masqueraded to the node's IPv6 address anyway, so AKS's default is a ULA (fd12:3456:789a::/64)"
        )


def _check_ipv6_overlaps(side: IPv6Side, errors: list[FieldError]) -> None:
    vnet, subnet, pod, svc = side.vnet_cidr, side.node_subnet_cidr, side.pod_cidr, side.service_cidr
    subnet_outside = bool(vnet and subnet and not contains(vnet, subnet))
    if subnet_outside:
        errors.append(FieldError("node-subnet-cidrs", f"--node-subnet-cidrs {subnet} is not inside --vnet-cidrs {vnet}"))
    codes = {"pod-cidrs": "NetworkProfileCIDROverlapVNET", "service-cidrs": "ServiceCidrOverlapExistingSubnetsCidr"}
    for flag, net in (("pod-cidrs", pod), ("service-cidrs", svc)):
        if net is None:
            continue
        if vnet and overlaps(net, vnet):
            errors.append(FieldError(flag, f"--{flag} {net} overlaps --vnet-cidrs {vnet} ({codes[flag]})"))
        if subnet_outside and subnet and overlaps(net, subnet):
            errors.append(FieldError(flag, f"--{flag} {net} overlaps --node-subnet-cidrs {subnet} ({codes[flag]})"))
    if pod and svc and overlaps(pod, svc):
        errors.append(FieldError("pod-cidrs", f"--pod-cidrs {pod} overlaps --service-cidrs {svc}"))


def _check_ipv6_sizes(side: IPv6Side, *, max_pods: int | None, errors: list[FieldError]) -> None:
    subnet, pod, svc, block = side.node_subnet_cidr, side.pod_cidr, side.service_cidr, side.node_cidr_size
    if subnet is not None and subnet.prefixlen != NODE_SUBNET_PREFIX_V6:
        errors.append(
            FieldError(
                "node-subnet-cidrs",
                f"--node-subnet-cidrs {subnet}: an Azure IPv6 subnet is exactly /{NODE_SUBNET_PREFIX_V6}, "
                f"not /{subnet.prefixlen}",
            )
        )
    if svc is not None and svc.prefixlen < MAX_SERVICE_PREFIX_V6:
        errors.append(
            FieldError(
                "service-cidrs",
                f"--service-cidrs {svc}: the IPv6 service CIDR is larger than /{MAX_SERVICE_PREFIX_V6} "
                f"(AKS: no larger than a /{MAX_SERVICE_PREFIX_V6}; prefix length must be >= {MAX_SERVICE_PREFIX_V6})",
            )
        )
    if svc is not None and svc.prefixlen > MIN_SERVICE_PREFIX_V6:
        errors.append(
            FieldError(
                "service-cidrs",
                f"--service-cidrs {svc}: the IPv6 service CIDR is too small (prefix length must be <= {MIN_SERVICE_PREFIX_V6})",
            )
        )
    if block is None:
        return
    if pod is not None and block < pod.prefixlen:
        errors.append(
            FieldError(
                "pod-cidrs",
                f"--pod-cidrs {pod}: the IPv6 pod CIDR is smaller than one node block (/{block}, "
                f"--node-cidr-size-v6); use a /{block} or larger, or a longer --node-cidr-size-v6",
            )
        )
    capacity = (1 << (128 - block)) - IPFamily.ipv6.reserved_per_block
    if max_pods is not None and capacity < max_pods:
        best = 128 - (max_pods + IPFamily.ipv6.reserved_per_block - 1).bit_length()
        errors.append(
            FieldError(
                "node-cidr-size-v6",
                f"--node-cidr-size-v6 {block}: a /{block} IPv6 node block holds {capacity} pods (after the "
                f"subnet-router anycast address and the gateway), fewer than --max-pods {max_pods}; "
                f"use --node-cidr-size-v6 {best} or shorter",
            )
        )
