"""The cluster network model and every validation rule (pure).

A ``ClusterNetwork`` is parsed from AKS-style flags, a YAML/JSON file or a
dict. Parsing collects *every* problem before it fails, so a user fixes a
configuration in one round instead of one error at a time. Each error's
``field`` is the flag without dashes (``pod-cidr``), and its message starts
with the flag and the value (``--pod-cidr 10.224.128.0/17 overlaps --vnet-cidr
10.224.0.0/12``), naming the conflicting range where there is one.

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

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from .cidr import (  # noqa: F401 - re-exported: the model's public arithmetic
    AZURE_RESERVED_PER_SUBNET,
    PRIVATE_RANGES,
    _norm_key,
    _parse_choice,
    _parse_cidr,
    _parse_cidr_list,
    _parse_int,
    _parse_ip,
    contains,
    count_blocks,
    is_private,
    overlaps,
    usable_subnet_ips,
)
from .errors import ConfigError, FieldError

DEFAULT_POD_CIDR = "10.244.0.0/16"
DEFAULT_SERVICE_CIDR = "10.0.0.0/16"
DEFAULT_DNS_SERVICE_IP = "10.0.0.10"
DEFAULT_VNET_CIDR = "10.224.0.0/12"
DEFAULT_NODE_SUBNET_CIDR = "10.224.0.0/16"
DEFAULT_MAX_PODS = 250
DEFAULT_NODE_CIDR_SIZE = 24
DEFAULT_VNI = 4096
DEFAULT_VXLAN_PORT = 4789
VXLAN_OVERHEAD = 50  # outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14)
BLOCK_RESERVED = 3  # network, gateway (.1), broadcast
MAX_NODES_OVERLAY = 5000
MAX_NODES_KUBENET = 400
MIN_MAX_PODS, MAX_MAX_PODS = 10, 250

RESERVED_RANGES = tuple(
    IPv4Network(r) for r in ("169.254.0.0/16", "172.30.0.0/16", "172.31.0.0/16", "192.0.2.0/24")
)
NETWORK_PLUGINS = ("azure", "kubenet")
PLUGIN_MODES = ("overlay",)
BACKENDS = ("vxlan", "direct")

# Every key the model accepts, spelled as the flag without dashes.
FIELDS = (
    "network-plugin",
    "network-plugin-mode",
    "vnet-cidr",
    "node-subnet-cidr",
    "pod-cidr",
    "service-cidr",
    "dns-service-ip",
    "max-pods",
    "node-cidr-size",
    "backend",
    "vni",
    "vxlan-port",
    "mtu",
    "non-masquerade-cidrs",
)


@dataclass(frozen=True)
class ClusterNetwork:
    """A validated cluster network. Build it with ``parse_network``."""

    network_plugin: str = "azure"
    network_plugin_mode: str | None = "overlay"
    vnet_cidr: IPv4Network = IPv4Network(DEFAULT_VNET_CIDR)
    node_subnet_cidr: IPv4Network = IPv4Network(DEFAULT_NODE_SUBNET_CIDR)
    pod_cidr: IPv4Network = IPv4Network(DEFAULT_POD_CIDR)
    service_cidr: IPv4Network = IPv4Network(DEFAULT_SERVICE_CIDR)
    dns_service_ip: IPv4Address = IPv4Address(DEFAULT_DNS_SERVICE_IP)
    max_pods: int = DEFAULT_MAX_PODS
    node_cidr_size: int = DEFAULT_NODE_CIDR_SIZE
    backend: str = "vxlan"
    vni: int = DEFAULT_VNI
    vxlan_port: int = DEFAULT_VXLAN_PORT
    mtu: int | None = None  # None: derive from the underlay device
    non_masquerade_cidrs: tuple[IPv4Network, ...] = field(default_factory=tuple)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    # ----- derived values -------------------------------------------------
    @property
    def is_overlay(self) -> bool:
        return self.network_plugin == "kubenet" or self.network_plugin_mode == "overlay"

    @property
    def block_count(self) -> int:
        return count_blocks(self.pod_cidr, self.node_cidr_size)

    @property
    def max_nodes(self) -> int:
        return min(self.block_count, usable_subnet_ips(self.node_subnet_cidr), MAX_NODES_OVERLAY)

    def pod_mtu(self, underlay_mtu: int) -> int:
        """The MTU pods get: explicit ``mtu``, else underlay minus the
        backend's encapsulation overhead."""
        if self.mtu is not None:
            return self.mtu
        return underlay_mtu - (VXLAN_OVERHEAD if self.backend == "vxlan" else 0)

    def with_pod_cidr(self, pod_cidr: IPv4Network) -> ClusterNetwork:
        return replace(self, pod_cidr=pod_cidr)

    # ----- serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict keyed by flag names (round-trips through
        ``parse_network``)."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if k == "warnings" or (k == "pod_cidr" and not self.is_overlay):
                continue  # flat Azure CNI has no pod CIDR; giving one is an error
            key = k.replace("_", "-")
            if isinstance(v, (IPv4Network, IPv4Address)):
                v = str(v)
            elif isinstance(v, (tuple, list)):
                v = [str(x) for x in v]
            out[key] = v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a network config from a YAML or JSON file (a mapping of flag
    names to values; ``network:`` may wrap it)."""
    import yaml  # local: the CNI hot path never needs it

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(FieldError("file", f"--file {path}: cannot read it ({exc.strerror})")) from None
    except UnicodeDecodeError:
        raise ConfigError(FieldError("file", f"--file {path} is not UTF-8 text")) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(FieldError("file", f"--file {path} is not valid YAML/JSON{at}")) from None
    if isinstance(data, dict) and isinstance(data.get("network"), dict):
        data = data["network"]
    if not isinstance(data, dict):
        raise ConfigError(
            FieldError("file", f"--file {path} must hold a mapping of settings (e.g. pod-cidr: 10.244.0.0/16)")
        )
    return data


def merge_settings(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge raw settings; later layers win (flags over a file). Keys are
    normalised to flag names; ``None`` values count as not given."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is not None:
                out[_norm_key(key)] = value
    return out


def parse_network(raw: Mapping[str, Any] | None = None, /, **kwargs: Any) -> ClusterNetwork:
    """Build and validate a ``ClusterNetwork``.

    ``raw`` holds only what the user gave (keys are flag names, with or
    without dashes/underscores; ``None`` values count as not given). Missing
    values take AKS's defaults. Raises ``ConfigError`` listing every problem;
    warnings ride on the result's ``warnings``.
    """
    given: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    errors: list[FieldError] = []
    for key, value in [*(raw or {}).items(), *kwargs.items()]:
        if value is None:
            continue
        k = _norm_key(key)
        if k not in FIELDS:
            errors.append(FieldError(k, f"--{k} is not a known setting (known: {', '.join(FIELDS)})"))
            continue
        if k in given:
            errors.append(FieldError(k, f"--{k} is given twice (as {spelled[k]!r} and {key!r})"))
            continue
        given[k], spelled[k] = value, str(key)
    net, warnings = _build(given, errors)
    if errors or net is None:
        raise ConfigError(errors, warnings=warnings)
    return replace(net, warnings=tuple(warnings))


def check_network(raw: Mapping[str, Any] | None = None) -> tuple[ClusterNetwork | None, list[FieldError], list[str]]:
    """Like ``parse_network`` but returns (network or None, errors, warnings)."""
    try:
        net = parse_network(raw or {})
    except ConfigError as exc:
        return None, exc.errors, exc.warnings
    return net, [], list(net.warnings)


def _build(given: dict[str, Any], errors: list[FieldError]) -> tuple[ClusterNetwork | None, list[str]]:
    """Parse every value, then apply every rule; errors accumulate."""
    warnings: list[str] = []
    n_errors_before = len(errors)
    plugin, mode = _check_flags(given, errors)

    def value(name: str, default: Any) -> Any:
        return given.get(name, default)

    vnet = _parse_cidr("vnet-cidr", value("vnet-cidr", DEFAULT_VNET_CIDR), errors)
    subnet = _parse_cidr("node-subnet-cidr", value("node-subnet-cidr", DEFAULT_NODE_SUBNET_CIDR), errors)
    pod = _parse_cidr("pod-cidr", value("pod-cidr", DEFAULT_POD_CIDR), errors)
    svc = _parse_cidr("service-cidr", value("service-cidr", DEFAULT_SERVICE_CIDR), errors)
    dns = _parse_ip("dns-service-ip", value("dns-service-ip", DEFAULT_DNS_SERVICE_IP), errors)
    max_pods = _parse_int("max-pods", value("max-pods", DEFAULT_MAX_PODS), MIN_MAX_PODS, MAX_MAX_PODS, errors)
    block = _parse_int("node-cidr-size", value("node-cidr-size", DEFAULT_NODE_CIDR_SIZE), 8, 28, errors)
    backend = _parse_choice("backend", value("backend", "vxlan"), BACKENDS, errors)
    vni = _parse_int("vni", value("vni", DEFAULT_VNI), 1, 2**24 - 1, errors)
    port = _parse_int("vxlan-port", value("vxlan-port", DEFAULT_VXLAN_PORT), 1, 65535, errors)
    mtu_raw = value("mtu", "auto")
    mtu = None if str(mtu_raw).strip().lower() == "auto" else _parse_int("mtu", mtu_raw, 576, 9000, errors)
    nomasq = _parse_cidr_list("non-masquerade-cidrs", value("non-masquerade-cidrs", []), errors)

    ranges = {"vnet-cidr": vnet, "node-subnet-cidr": subnet, "pod-cidr": pod, "service-cidr": svc}
    _check_reserved({k: v for k, v in ranges.items() if v is not None}, errors)
    _check_overlaps(vnet, subnet, pod, svc, errors)
    _check_service(svc, dns, errors)
    _check_blocks(pod, block, max_pods, errors, warnings)

    if len(errors) > n_errors_before or None in (vnet, subnet, pod, svc, dns, max_pods, block, backend, vni, port):
        return None, warnings
    assert plugin is not None
    return (
        ClusterNetwork(
            network_plugin=plugin,
            network_plugin_mode=mode,
            vnet_cidr=vnet,  # type: ignore[arg-type]
            node_subnet_cidr=subnet,  # type: ignore[arg-type]
            pod_cidr=pod,  # type: ignore[arg-type]
            service_cidr=svc,  # type: ignore[arg-type]
            dns_service_ip=dns,  # type: ignore[arg-type]
            max_pods=max_pods,  # type: ignore[arg-type]
            node_cidr_size=block,  # type: ignore[arg-type]
            backend=backend,  # type: ignore[arg-type]
            vni=vni,  # type: ignore[arg-type]
            vxlan_port=port,  # type: ignore[arg-type]
            mtu=mtu,
            non_masquerade_cidrs=nomasq,
        ),
        warnings,
    )


def _check_flags(given: dict[str, Any], errors: list[FieldError]) -> tuple[str | None, str | None]:
    """azure-cli's flag combinations; returns the (plugin, mode) to use."""
    plugin = given.get("network-plugin")
    mode = given.get("network-plugin-mode")
    if plugin is not None:
        plugin = _parse_choice("network-plugin", plugin, NETWORK_PLUGINS, errors)
    if mode is not None:
        mode = _parse_choice("network-plugin-mode", mode, PLUGIN_MODES, errors)
    ranges_given = [k for k in ("pod-cidr", "service-cidr", "dns-service-ip") if k in given]
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
    elif plugin == "azure" and "pod-cidr" in given and mode != "overlay":
        errors.append(
            FieldError(
                "network-plugin-mode",
                "--network-plugin-mode is missing: --pod-cidr with --network-plugin azure requires "
                "--network-plugin-mode overlay (flat Azure CNI takes pod IPs from the node subnet)",
            )
        )
    elif plugin == "kubenet" and mode is not None:
        errors.append(
            FieldError("network-plugin-mode", "--network-plugin-mode overlay applies to --network-plugin azure only")
        )
    if ("service-cidr" in given) != ("dns-service-ip" in given):
        missing = "dns-service-ip" if "service-cidr" in given else "service-cidr"
        errors.append(FieldError(missing, f"--{missing} is missing: --service-cidr and --dns-service-ip go together"))
    return plugin, mode


def _check_reserved(ranges: dict[str, IPv4Network], errors: list[FieldError]) -> None:
    """No range may touch a reserved range (equal, contain, or lie inside)."""
    for name, net in ranges.items():
        for r in RESERVED_RANGES:
            if not overlaps(net, r):
                continue
            if net == r:
                how = "is"
            elif contains(net, r):
                how = "contains"
            else:  # two CIDRs that overlap are nested
                how = "lies inside"
            errors.append(FieldError(name, f"--{name} {net} {how} the reserved range {r}, which AKS forbids"))


def _check_overlaps(
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


def _check_service(svc: IPv4Network | None, dns: IPv4Address | None, errors: list[FieldError]) -> None:
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


def _check_blocks(
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
    capacity = (1 << (32 - block)) - BLOCK_RESERVED
    if capacity < max_pods:
        best = 32 - (max_pods + BLOCK_RESERVED - 1).bit_length()
        errors.append(
            FieldError(
                "node-cidr-size",
                f"--node-cidr-size {block}: a /{block} node block holds {capacity} pods "
                f"(after network, gateway and broadcast), fewer than --max-pods {max_pods}; "
                f"use --node-cidr-size {best} or --max-pods {capacity}",
            )
        )


def validate_expansion(old: ClusterNetwork, new_pod_cidr: str) -> ClusterNetwork:
    """Check a pod CIDR expansion: only to a contiguous superset of the old
    range, validated like a new network. Returns the expanded network."""
    errors: list[FieldError] = []
    new = _parse_cidr("pod-cidr", new_pod_cidr, errors)
    if not old.is_overlay:
        errors.append(
            FieldError("pod-cidr", "--pod-cidr cannot be expanded: flat Azure CNI takes pod IPs from the node subnet")
        )
    elif new is not None:
        if new == old.pod_cidr:
            errors.append(FieldError("pod-cidr", f"--pod-cidr {new} is the current pod CIDR; nothing to expand"))
        elif not contains(new, old.pod_cidr):
            errors.append(
                FieldError(
                    "pod-cidr",
                    f"--pod-cidr {new} is not a superset of the current {old.pod_cidr}; "
                    "the pod CIDR can only grow to a range that contains it (existing blocks keep their place)",
                )
            )
    if errors:
        raise ConfigError(errors)
    data = old.to_dict()
    data["pod-cidr"] = str(new)
    return parse_network(data)
