"""AKS's rules for the flags and the IPv4 ranges of a cluster network (pure).

``config`` applies them while it builds a ``ClusterNetwork``; each records
its problems as ``FieldError``s naming the flag, so that every problem of a
configuration is reported at once. The dual-stack rules are in
``dualstack``.

The rules are AKS's, from the AKS docs
(https://learn.microsoft.com/azure/aks/azure-cni-overlay,
https://learn.microsoft.com/azure/aks/configure-azure-cni) and azure-cli's
validators (``src/azure-cli/azure/cli/command_modules/acs/_validators.py``
in https://github.com/Azure/azure-cli):

* reserved ranges 169.254.0.0/16, 172.30.0.0/16, 172.31.0.0/16 and
  192.0.2.0/24 may not overlap the pod CIDR, the service CIDR, the VNet or
  the node subnet (a range that *contains* one is rejected too);
* the pod CIDR may not overlap the VNet (NetworkProfileCIDROverlapVNET) or the
  service CIDR; the service CIDR may not overlap the VNet
  (ServiceCidrOverlapExistingSubnetsCidr); the node subnet lies in the VNet
  (and when it does not, pod and service ranges are also kept off it);
* the service CIDR is no larger than /12; the DNS service IP lies inside it
  and is not its network, first usable (kubernetes.default) or broadcast
  address; ``--service-cidr`` and ``--dns-service-ip`` go together;
* ``--pod-cidr`` with ``--network-plugin azure`` requires
  ``--network-plugin-mode overlay``; ranges without ``--network-plugin`` are
  an error;
* max pods 10..250, and a node block must hold max pods plus its reserved
  addresses (network, gateway ``.1``, broadcast);
* a public (non RFC 1918 / RFC 6598) pod CIDR is a warning, not an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from .cidr import _parse_choice, contains, is_private, overlaps
from .errors import FieldError
from .families import IPFamily


def check_flags(
    given: Mapping[str, Any], errors: list[FieldError], *, plugins: tuple[str, ...], modes: tuple[str, ...]
) -> tuple[str | None, str | None]:
    """azure-cli's flag combinations; returns the (plugin, mode) to use."""
    plugin = given.get("network-plugin")
    mode = given.get("network-plugin-mode")
    if plugin is not None:
        plugin = _parse_choice("network-plugin", plugin, plugins, errors)
    if mode is not None:
        mode = _parse_choice("network-plugin-mode", mode, modes, errors)
    ranges_given = [k for k in ("pod-cidr", "pod-cidrs", "service-cidr", "service-cidrs", "dns-service-ip") if k in given]
    if "network-plugin" not in given:
        if ranges_given:
            errors.append(
                FieldError(
                    "network-plugin",
                    f"--network-plugin is missing: specify the network plugin type when setting "
                    f"{', '.join('--' + k for k in ranges_given)} (e.g. --network-plugin azure "
                    "--network-plugin-mode overlay)",
                )
            )
        if mode is not None:
            errors.append(
                FieldError("network-plugin", "--network-plugin is missing: --network-plugin-mode needs --network-plugin azure")
            )
        plugin, mode = "azure", "overlay"
    elif plugin == "azure" and ("pod-cidr" in given or "pod-cidrs" in given) and mode != "overlay":
        flag = "--pod-cidr" if "pod-cidr" in given else "--pod-cidrs"
        errors.append(
            FieldError(
                "network-plugin-mode",
                f"--network-plugin-mode is missing: {flag} with --network-plugin azure requires "
                "--network-plugin-mode overlay (flat Azure CNI takes pod IPs from the node subnet)",
            )
        )
    elif plugin == "kubenet" and mode is not None:
        errors.append(
            FieldError("network-plugin-mode", "--network-plugin-mode overlay applies to --network-plugin azure only")
        )
    service_given = "service-cidr" in given or "service-cidrs" in given
    if service_given != ("dns-service-ip" in given):
        missing = "dns-service-ip" if service_given else "service-cidr"
        given_flag = "--service-cidrs" if "service-cidrs" in given and "service-cidr" not in given else "--service-cidr"
        errors.append(FieldError(missing, f"--{missing} is missing: {given_flag} and --dns-service-ip go together"))
    return plugin, mode


def check_reserved(ranges: dict[str, IPv4Network], reserved: tuple[IPv4Network, ...], errors: list[FieldError]) -> None:
    """No range may touch a reserved range (equal, contain, or lie inside)."""
    for name, net in ranges.items():
        for r in reserved:
            if not overlaps(net, r):
                continue
            if net == r:
                how = "is"
            elif contains(net, r):
                how = "contains"
            else:  # two CIDRs that overlap are nested
                how = "lies inside"
            errors.append(FieldError(name, f"--{name} {net} {how} the reserved range {r}, which AKS forbids"))


def check_overlaps(
    vnet: IPv4Network | None,
    subnet: IPv4Network | None,
    pod: IPv4Network | None,
    svc: IPv4Network | None,
    errors: list[FieldError],
) -> None:
    """The node subnet lies in the VNet; pod and service ranges stay out of
    the VNet (and of a node subnet that strays outside it) and of each other."""
    subnet_outside = bool(vnet and subnet and not contains(vnet, subnet))
    if subnet_outside:
        errors.append(FieldError("node-subnet-cidr", f"--node-subnet-cidr {subnet} is not inside --vnet-cidr {vnet}"))
    codes = {"pod-cidr": "NetworkProfileCIDROverlapVNET", "service-cidr": "ServiceCidrOverlapExistingSubnetsCidr"}
    for name, net in (("pod-cidr", pod), ("service-cidr", svc)):
        if net is None:
            continue
        if vnet and overlaps(net, vnet):
            errors.append(FieldError(name, f"--{name} {net} overlaps --vnet-cidr {vnet} ({codes[name]})"))
        if subnet_outside and subnet and overlaps(net, subnet):
            errors.append(FieldError(name, f"--{name} {net} overlaps --node-subnet-cidr {subnet} ({codes[name]})"))
    if pod and svc and overlaps(pod, svc):
        errors.append(FieldError("pod-cidr", f"--pod-cidr {pod} overlaps --service-cidr {svc}"))


def check_service(svc: IPv4Network | None, dns: IPv4Address | None, errors: list[FieldError]) -> None:
    """Service CIDR size, and where the DNS service IP may sit in it."""
    if svc is None:
        return
    if svc.prefixlen < 12:
        errors.append(FieldError("service-cidr", f"--service-cidr {svc} is larger than /12 (prefix length must be >= 12)"))
    if svc.prefixlen > 30:
        errors.append(FieldError("service-cidr", f"--service-cidr {svc} is too small (prefix length must be <= 30)"))
    if dns is None:
        return
    if dns not in svc:
        problem = f"is not inside --service-cidr {svc}"
    elif dns == svc.network_address:
        problem = f"is the network address of {svc}"
    elif dns == svc.network_address + 1:
        problem = f"is the first usable address of {svc}, reserved for kubernetes.default"
    elif dns == svc.broadcast_address:
        problem = f"is the broadcast address of {svc}"
    else:
        return
    errors.append(FieldError("dns-service-ip", f"--dns-service-ip {dns} {problem}"))


def check_blocks(
    pod: IPv4Network | None,
    block: int | None,
    max_pods: int | None,
    errors: list[FieldError],
    warnings: list[str],
) -> None:
    """The pod CIDR holds a block; a block holds max pods plus network,
    gateway and broadcast; a public pod CIDR is only a warning."""
    if pod is not None:
        if block is not None and block < pod.prefixlen:
            errors.append(
                FieldError("pod-cidr", f"--pod-cidr {pod} is smaller than one node block (/{block}); use a /{block} or larger")
            )
        if not is_private(pod):
            warnings.append(
                f"--pod-cidr {pod} is not an RFC 1918 or RFC 6598 range; public pod ranges are accepted but unsupported"
            )
    if block is None or max_pods is None:
        return
    capacity = (1 << (32 - block)) - IPFamily.ipv4.reserved_per_block
    if capacity < max_pods:
        best = 32 - (max_pods + IPFamily.ipv4.reserved_per_block - 1).bit_length()
        errors.append(
            FieldError(
                "node-cidr-size",
                f"--node-cidr-size {block}: a /{block} node block holds {capacity} pods "
                f"(after network, gateway and broadcast), fewer than --max-pods {max_pods}; "
                f"use --node-cidr-size {best} or --max-pods {capacity}",
            )
        )
