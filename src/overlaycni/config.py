"""The cluster network model and its parsing (pure).

A ``ClusterNetwork`` is parsed from AKS-style flags, a YAML/JSON file or a
dict. Parsing collects *every* problem before it fails, so a user fixes a
configuration in one round instead of one error at a time. Each error's
``field`` is the flag without dashes (``pod-cidr``), and its message starts
with the flag and the value (``--pod-cidr 10.224.128.0/17 overlaps --vnet-cidr
10.224.0.0/12``), naming the conflicting range where there is one. The rules
are AKS's: ``rules`` holds (and its note lists, with sources) those of the
flags and the IPv4 ranges, ``dualstack`` those of dual-stack.

Dual-stack (``--ip-families ipv4,ipv6``) adds an IPv6 side to the VNet, the
node subnet, the pod and service CIDRs and the node blocks. The IPv4 fields
of ``ClusterNetwork`` keep their names and meaning; ``ClusterNetwork.families``
gives each family's side alike (``families.FamilyNetwork``), and a
single-stack network serialises exactly as before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path
from typing import Any

from . import dualstack, rules
from .cidr import (  # noqa: F401 - re-exported: the model's public arithmetic
    AZURE_RESERVED_PER_SUBNET,
    PRIVATE_RANGES,
    IPAddress,
    IPNetwork,
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
from .families import (  # noqa: F401 - re-exported: the model's families
    DEFAULT_NODE_CIDR_SIZE_V6,
    DEFAULT_NODE_SUBNET_CIDR_V6,
    DEFAULT_POD_CIDR_V6,
    DEFAULT_SERVICE_CIDR_V6,
    DEFAULT_VNET_CIDR_V6,
    DUAL_STACK,
    SINGLE_STACK,
    FamilyNetwork,
    IPFamily,
)

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
DEFAULT_WIREGUARD_PORT = 51820
# outer IPv4 (20) + UDP (8) + WireGuard data header (type/reserved 4, receiver 4,
# counter 8) + Poly1305 tag (16); the inner IP packet is carried without an Ethernet
# header (https://www.wireguard.com/protocol/). An IPv6 underlay would need 80.
WIREGUARD_OVERHEAD = 60
BLOCK_RESERVED = 3  # network, gateway (.1), broadcast
MAX_NODES_OVERLAY = 5000
MAX_NODES_KUBENET = 400
MIN_MAX_PODS, MAX_MAX_PODS = 10, 250

RESERVED_RANGES = tuple(
    IPv4Network(r) for r in ("169.254.0.0/16", "172.30.0.0/16", "172.31.0.0/16", "192.0.2.0/24")
)
NETWORK_PLUGINS = ("azure", "kubenet")
PLUGIN_MODES = ("overlay",)
BACKENDS = ("vxlan", "direct", "wireguard")
# Bytes each backend adds to a pod packet on an IPv4 underlay.
BACKEND_OVERHEAD = {"vxlan": VXLAN_OVERHEAD, "direct": 0, "wireguard": WIREGUARD_OVERHEAD}

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
    "wireguard-port",
    "mtu",
    "non-masquerade-cidrs",
    *dualstack.FIELDS,
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
    wireguard_port: int = DEFAULT_WIREGUARD_PORT
    mtu: int | None = None  # None: derive from the underlay device
    non_masquerade_cidrs: tuple[IPv4Network, ...] = field(default_factory=tuple)
    # dual-stack: the families, and the IPv6 side (all None when single-stack)
    ip_families: tuple[IPFamily, ...] = SINGLE_STACK
    vnet_cidr_v6: IPv6Network | None = None
    node_subnet_cidr_v6: IPv6Network | None = None
    pod_cidr_v6: IPv6Network | None = None
    service_cidr_v6: IPv6Network | None = None
    node_cidr_size_v6: int | None = None
    non_masquerade_cidrs_v6: tuple[IPv6Network, ...] = field(default_factory=tuple)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    # ----- derived values -------------------------------------------------
    @property
    def is_overlay(self) -> bool:
        return self.network_plugin == "kubenet" or self.network_plugin_mode == "overlay"

    @property
    def block_count(self) -> int:
        """IPv4 node blocks in the pod CIDR (``families`` for every family)."""
        return count_blocks(self.pod_cidr, self.node_cidr_size)

    @property
    def max_nodes(self) -> int:
        """Nodes the network holds: a block of every family each, a node
        subnet IP each, at most AKS's limit."""
        blocks = min(f.block_count for f in self.families)
        return min(blocks, usable_subnet_ips(self.node_subnet_cidr), MAX_NODES_OVERLAY)

    # ----- families ------------------------------------------------------------
    @property
    def is_dual_stack(self) -> bool:
        return self.ip_families == DUAL_STACK

    @property
    def families(self) -> tuple[FamilyNetwork, ...]:
        """One ``FamilyNetwork`` per family, IPv4 first."""
        v4 = FamilyNetwork(
            IPFamily.ipv4,
            vnet_cidr=self.vnet_cidr,
            node_subnet_cidr=self.node_subnet_cidr,
            pod_cidr=self.pod_cidr,
            service_cidr=self.service_cidr,
            node_cidr_size=self.node_cidr_size,
            non_masquerade_cidrs=self.non_masquerade_cidrs,
        )
        if not self.is_dual_stack:
            return (v4,)
        assert self.vnet_cidr_v6 and self.node_subnet_cidr_v6 and self.pod_cidr_v6 and self.service_cidr_v6
        assert self.node_cidr_size_v6 is not None
        v6 = FamilyNetwork(
            IPFamily.ipv6,
            vnet_cidr=self.vnet_cidr_v6,
            node_subnet_cidr=self.node_subnet_cidr_v6,
            pod_cidr=self.pod_cidr_v6,
            service_cidr=self.service_cidr_v6,
            node_cidr_size=self.node_cidr_size_v6,
            non_masquerade_cidrs=self.non_masquerade_cidrs_v6,
        )
        return (v4, v6)

    def family(self, which: IPFamily | int) -> FamilyNetwork | None:
        """The side of one family (``IPFamily.ipv6`` or 6); None when the
        network does not have it."""
        version = which.version if isinstance(which, IPFamily) else which
        return next((f for f in self.families if f.version == version), None)

    def family_of(self, value: IPAddress | IPNetwork | IPv4Interface | IPv6Interface) -> FamilyNetwork:
        """The side an address, network or interface belongs to; ValueError
        when the network does not have its family."""
        side = self.family(value.version)
        if side is None:
            raise ValueError(f"{value} is {IPFamily.of(value).label}, and this network is IPv4 single-stack")
        return side

    def blocks_at(self, index: int) -> tuple[IPNetwork, ...]:
        """Node ``index``'s blocks, one per family (IPv4 first)."""
        return tuple(f.block_at(index) for f in self.families)

    @property
    def pods_per_node(self) -> int:
        """Pods a node runs: max pods, limited by any family's block."""
        return min(self.max_pods, *(f.pods_per_block for f in self.families))

    def encap_overhead(self, underlay: IPFamily = IPFamily.ipv4) -> int:
        """Bytes the backend adds to a pod packet of either family when the
        outer header is ``underlay``'s: VXLAN is outer IP + UDP (8) + VXLAN
        (8) + inner Ethernet (14), 50 over IPv4 and 70 over IPv6
        (RFC 7348); WireGuard is outer IP + UDP (8) + its data header (16)
        + tag (16), 60 over IPv4 and 80 over IPv6; ``direct`` adds nothing."""
        if self.backend not in ("vxlan", "wireguard"):
            return 0
        return BACKEND_OVERHEAD[self.backend] - IPFamily.ipv4.ip_header_bytes + underlay.ip_header_bytes

    def pod_mtu(self, underlay_mtu: int) -> int:
        """The MTU pods get: explicit ``mtu``, else underlay minus the
        backend's encapsulation overhead."""
        if self.mtu is not None:
            return self.mtu
        return underlay_mtu - self.overhead

    @property
    def overhead(self) -> int:
        """Bytes the backend adds to each pod packet (IPv4 underlay)."""
        return self.encap_overhead()

    def with_pod_cidr(self, pod_cidr: IPv4Network) -> ClusterNetwork:
        return replace(self, pod_cidr=pod_cidr)

    # ----- serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict keyed by flag names (round-trips through
        ``parse_network``). A single-stack network gives the keys it always
        gave (``wireguard-port`` only with backend wireguard or a port of its
        own); a dual-stack one adds ``ip-families``, the per-family lists next
        to the IPv4 flags (``pod-cidrs`` after ``pod-cidr``, which agree) and
        ``node-cidr-size-v6``, and lists IPv6 non-masquerade CIDRs too."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if k == "warnings" or k in _DUAL_STACK_ATTRS or (k == "pod_cidr" and not self.is_overlay):
                continue  # flat Azure CNI has no pod CIDR; giving one is an error
            if k == "wireguard_port" and self.backend != "wireguard" and v == DEFAULT_WIREGUARD_PORT:
                continue  # records of the other backends keep the keys they always had
            key = k.replace("_", "-")
            if isinstance(v, (IPv4Network, IPv4Address)):
                v = str(v)
            elif isinstance(v, (tuple, list)):
                v = [str(x) for x in v]
            out[key] = v
        if not self.is_dual_stack:
            return out
        extra: dict[str, dict[str, Any]] = {
            "network-plugin-mode": {"ip-families": [str(f) for f in self.ip_families]},
            "node-cidr-size": {"node-cidr-size-v6": self.node_cidr_size_v6},
        }
        for single, plural, _, _ in dualstack.RANGE_FLAGS:
            extra[single] = {plural: [str(getattr(f, single.replace("-", "_"))) for f in self.families]}
        dual: dict[str, Any] = {}
        for key, value in out.items():
            dual[key] = value
            dual.update(extra.get(key, {}))
        dual["non-masquerade-cidrs"] = [str(n) for n in (*self.non_masquerade_cidrs, *self.non_masquerade_cidrs_v6)]
        return dual

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


_DUAL_STACK_ATTRS = frozenset(
    (
        "ip_families",
        "vnet_cidr_v6",
        "node_subnet_cidr_v6",
        "pod_cidr_v6",
        "service_cidr_v6",
        "node_cidr_size_v6",
        "non_masquerade_cidrs_v6",
    )
)


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
    normalised to flag names; ``None`` values count as not given. A later
    single-family flag (``--pod-cidr``) replaces the IPv4 entry of an earlier
    list (``pod-cidrs``), and a later list replaces an earlier single flag;
    within one layer both must agree (``parse_network`` checks)."""
    out: dict[str, Any] = {}
    for layer in layers:
        given = {_norm_key(k): v for k, v in (layer or {}).items() if v is not None}
        for single, plural in dualstack.LIST_FLAG.items():
            if single in given and plural not in given and plural in out:
                out[plural] = dualstack.replace_ipv4_entry(out[plural], given[single])
            if plural in given and single not in given:
                out.pop(single, None)
        out.update(given)
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
    plugin, mode = rules.check_flags(given, errors, plugins=NETWORK_PLUGINS, modes=PLUGIN_MODES)

    def value(name: str, default: Any) -> Any:
        return given.get(name, default)

    families = dualstack.parse_families(given, errors)
    dual = families == DUAL_STACK

    def ranges_of(name: str, default_v4: str) -> tuple[IPv4Network | None, IPv6Network | None]:
        return dualstack.resolve_range(given, name, default_v4=default_v4, families=families, errors=errors)

    vnet, vnet6 = ranges_of("vnet-cidr", DEFAULT_VNET_CIDR)
    subnet, subnet6 = ranges_of("node-subnet-cidr", DEFAULT_NODE_SUBNET_CIDR)
    pod, pod6 = ranges_of("pod-cidr", DEFAULT_POD_CIDR)
    svc, svc6 = ranges_of("service-cidr", DEFAULT_SERVICE_CIDR)
    dns_v6_problem = dualstack.DNS_IPV6_PROBLEM if dual else ""
    dns = _parse_ip("dns-service-ip", value("dns-service-ip", DEFAULT_DNS_SERVICE_IP), errors, ipv6_problem=dns_v6_problem)
    max_pods = _parse_int("max-pods", value("max-pods", DEFAULT_MAX_PODS), MIN_MAX_PODS, MAX_MAX_PODS, errors)
    block = _parse_int("node-cidr-size", value("node-cidr-size", DEFAULT_NODE_CIDR_SIZE), 8, 28, errors)
    backend = _parse_choice("backend", value("backend", "vxlan"), BACKENDS, errors)
    vni = _parse_int("vni", value("vni", DEFAULT_VNI), 1, 2**24 - 1, errors)
    port = _parse_int("vxlan-port", value("vxlan-port", DEFAULT_VXLAN_PORT), 1, 65535, errors)
    wg_port = _parse_int("wireguard-port", value("wireguard-port", DEFAULT_WIREGUARD_PORT), 1, 65535, errors)
    mtu_raw = value("mtu", "auto")
    mtu = None if str(mtu_raw).strip().lower() == "auto" else _parse_int("mtu", mtu_raw, 576, 9000, errors)
    nomasq, nomasq6 = dualstack.parse_non_masquerade(value("non-masquerade-cidrs", []), dual=dual, errors=errors)
    v6 = dualstack.IPv6Side(
        vnet_cidr=vnet6,
        node_subnet_cidr=subnet6,
        pod_cidr=pod6,
        service_cidr=svc6,
        node_cidr_size=dualstack.parse_node_cidr_size_v6(given, dual=dual, errors=errors),
        non_masquerade_cidrs=nomasq6,
    )

    ranges = {"vnet-cidr": vnet, "node-subnet-cidr": subnet, "pod-cidr": pod, "service-cidr": svc}
    rules.check_reserved({k: v for k, v in ranges.items() if v is not None}, RESERVED_RANGES, errors)
    rules.check_overlaps(vnet, subnet, pod, svc, errors)
    rules.check_service(svc, dns, errors)
    rules.check_blocks(pod, block, max_pods, errors, warnings)
    if dual:
        dualstack.check_plugin(plugin, mode, errors=errors)
        dualstack.check_mtu(mtu, errors=errors)
        dualstack.check_ipv6(v6, max_pods=max_pods, errors=errors, warnings=warnings)

    if families is None or (dual and not v6.complete):
        return None, warnings
    if len(errors) > n_errors_before or None in (vnet, subnet, pod, svc, dns, max_pods, block, backend, vni, port, wg_port):
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
            wireguard_port=wg_port,  # type: ignore[arg-type]
            mtu=mtu,
            non_masquerade_cidrs=nomasq,
            ip_families=families,
            vnet_cidr_v6=v6.vnet_cidr,
            node_subnet_cidr_v6=v6.node_subnet_cidr,
            pod_cidr_v6=v6.pod_cidr,
            service_cidr_v6=v6.service_cidr,
            node_cidr_size_v6=v6.node_cidr_size,
            non_masquerade_cidrs_v6=v6.non_masquerade_cidrs,
        ),
        warnings,
    )


def validate_expansion(old: ClusterNetwork, new_pod_cidr: str) -> ClusterNetwork:
    """Check a pod CIDR expansion: only to a contiguous superset of the old
    range, validated like a new network. Returns the expanded network."""
    errors: list[FieldError] = []
    # AKS: "IPv6 pod CIDR expansion isn't supported" (pod CIDR expansion in
    # https://learn.microsoft.com/azure/aks/azure-cni-overlay-pod-expand)
    new = _parse_cidr("pod-cidr", new_pod_cidr, errors, ipv6_problem="only the IPv4 pod CIDR can be expanded (as in AKS)")
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
    if "pod-cidrs" in data:  # dual-stack: the IPv4 entry grows, the IPv6 one stays
        data["pod-cidrs"] = [str(new), *data["pod-cidrs"][1:]]
    return parse_network(data)
