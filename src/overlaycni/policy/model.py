"""NetworkPolicy (``networking.k8s.io/v1``): the pure model, parsing from YAML
with the API server's defaulting and validation, and a JSON round trip.

Defaulting (as the API server does it): ``metadata.namespace`` defaults to
``default``; ``spec.policyTypes`` defaults to ``[Ingress]`` plus ``Egress``
when ``spec.egress`` is non-empty; a port's ``protocol`` defaults to TCP; an
absent ``podSelector`` is the empty selector (all pods of the namespace).

Validation errors carry the JSON path of the offending field
(``spec.ingress[0].ports[1].endPort``); unknown fields are errors too (kubectl
validates strictly by default), so a typo cannot silently widen a policy.

Families: an ``ipBlock`` is IPv4 or IPv6 (its ``except`` entries must be of
the same family and strict subsets of ``cidr``, as the API server requires)
and matches addresses of its own family only, as in Kubernetes. A pod has an
IPv4 address and, in a dual-stack cluster, an IPv6 one (``PodInfo.ips``,
IPv4 first); pod selectors select both. Two spellings the API server's
parser may let through are refused here because they cannot mean what they
say: a zone (``fe80::%eth0/64``: nftables matches addresses, not zones) and
an IPv4-mapped IPv6 CIDR (``::ffff:10.0.0.0/104``: a packet of either family
never carries such an address, so the peer would silently match nothing);
the error names the IPv4 CIDR to write instead.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import MappingProxyType
from typing import Any

from ..cidr import IPAddress
from ..errors import ConfigError, PolicyFieldError
from ..families import IPFamily
from .selectors import EVERYTHING, LabelSelector, parse_selector

PROTOCOLS = ("TCP", "UDP", "SCTP")
POLICY_TYPES = ("Ingress", "Egress")
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
API_VERSION = "networking.k8s.io/v1"

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


# ----- pods and namespaces (what the datastore holds) -------------------------------


def _frozen_labels(labels: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted(labels.items())))


@dataclass(frozen=True)
class NamedPort:
    """A named container port: ``serve-80-tcp`` = 80/TCP."""

    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True)
class PodInfo:
    """A pod as policy sees it: its addresses (``ip``, and ``ip_v6`` in a
    dual-stack cluster), its node, labels and named container ports."""

    namespace: str
    name: str
    ip: IPv4Address
    node: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    ports: tuple[NamedPort, ...] = ()
    ip_v6: IPv6Address | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen_labels(self.labels))
        object.__setattr__(self, "ports", tuple(self.ports))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ips(self) -> tuple[IPAddress, ...]:
        """The pod's addresses, IPv4 first."""
        return (self.ip,) if self.ip_v6 is None else (self.ip, self.ip_v6)

    def address(self, family: IPFamily) -> IPAddress | None:
        """The pod's address of ``family`` (None: the pod has none)."""
        return self.ip if family is IPFamily.ipv4 else self.ip_v6

    def named_port(self, name: str, protocol: str) -> int | None:
        """The number of the container port called ``name`` with ``protocol``."""
        for p in self.ports:
            if p.name == name and p.protocol == protocol:
                return p.port
        return None


@dataclass(frozen=True)
class NamespaceInfo:
    """A namespace and its labels; ``kubernetes.io/metadata.name`` is always
    set to the name (the API server does the same)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        labels = dict(self.labels)
        labels[NAMESPACE_NAME_LABEL] = self.name
        object.__setattr__(self, "labels", _frozen_labels(labels))


# ----- the policy ------------------------------------------------------------------


@dataclass(frozen=True)
class IPBlock:
    cidr: IPv4Network | IPv6Network
    except_: tuple[IPv4Network | IPv6Network, ...] = ()

    @property
    def family(self) -> IPFamily:
        return IPFamily.of(self.cidr)

    def contains(self, ip: IPAddress | None) -> bool:
        """Whether ``ip`` is in the block: an address of the other family
        (or none) never is."""
        if ip is None or ip.version != self.cidr.version or ip not in self.cidr:
            return False
        return not any(ip in e for e in self.except_)


@dataclass(frozen=True)
class PolicyPeer:
    """One ``from``/``to`` entry. Exactly one of: selectors (either or both),
    or an ipBlock. ``pod_selector`` alone means "in the policy's namespace";
    with ``namespace_selector`` it means "in the selected namespaces"."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True)
class PolicyPort:
    protocol: str = "TCP"
    port: int | str | None = None  # None: every port of the protocol; str: a named port
    end_port: int | None = None


@dataclass(frozen=True)
class Rule:
    """An ingress or egress rule. Empty ``ports``: all ports; empty ``peers``:
    every source (ingress) or destination (egress), pods or not."""

    ports: tuple[PolicyPort, ...] = ()
    peers: tuple[PolicyPeer, ...] = ()


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector = EVERYTHING
    policy_types: tuple[str, ...] = ("Ingress",)
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def affects(self, direction: str) -> bool:
        """True when the policy isolates its pods in ``Ingress`` / ``Egress``."""
        return direction in self.policy_types

    def rules(self, direction: str) -> tuple[Rule, ...]:
        return self.ingress if direction == "Ingress" else self.egress


# ----- parsing ----------------------------------------------------------------------


def parse_policies(text: str) -> list[NetworkPolicy]:
    """Parse one or many YAML documents (``kind: NetworkPolicy`` or
    ``kind: List`` of them). Raises ConfigError listing every problem."""
    import yaml  # local: the agent reads stored policies (JSON), never YAML (less for it to keep resident)

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available
    try:
        docs = [d for d in yaml.load_all(text, Loader=loader) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(PolicyFieldError("yaml", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}")) from None
    objects: list[tuple[str, Any]] = []
    for i, doc in enumerate(docs):
        if isinstance(doc, Mapping) and doc.get("kind") == "List":
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise ConfigError(PolicyFieldError("items", "must be a list", document=f"document {i + 1}"))
            objects.extend((f"items[{j}].", item) for j, item in enumerate(items))
        else:
            objects.append(("", doc))
    many = len(objects) > 1
    errors: list[PolicyFieldError] = []
    out: list[NetworkPolicy] = []
    seen: dict[str, int] = {}
    for i, (prefix, obj) in enumerate(objects):
        doc_errors: list[PolicyFieldError] = []
        policy = policy_from_manifest(obj, errors=doc_errors, prefix=prefix)
        label = f"document {i + 1}" + (f" ({policy.key})" if policy and policy.name else "")
        errors.extend(
            PolicyFieldError(e.field, e.message, document=label if many else "") for e in doc_errors
        )
        if policy is not None and not doc_errors:
            if policy.key in seen:
                errors.append(
                    PolicyFieldError(
                        f"{prefix}metadata.name",
                        f"{policy.key} is defined twice (also document {seen[policy.key] + 1})",
                        document=label if many else "",
                    )
                )
            seen[policy.key] = i
            out.append(policy)
    if errors:
        raise ConfigError(errors)
    return out


def policy_from_manifest(obj: Any, *, errors: list[PolicyFieldError], prefix: str = "") -> NetworkPolicy | None:
    """One manifest (a decoded YAML/JSON object) to a NetworkPolicy with
    defaults applied; problems go to ``errors`` with paths under ``prefix``."""
    p = prefix
    if not isinstance(obj, Mapping):
        errors.append(PolicyFieldError(p.rstrip(".") or "document", "must be a NetworkPolicy object"))
        return None
    _unknown(obj, ("apiVersion", "kind", "metadata", "spec", "status"), p.rstrip("."), errors)
    if obj.get("kind") != "NetworkPolicy":
        errors.append(PolicyFieldError(f"{p}kind", f"{obj.get('kind')!r}: expected NetworkPolicy (or List)"))
    if obj.get("apiVersion") != API_VERSION:
        errors.append(PolicyFieldError(f"{p}apiVersion", f"{obj.get('apiVersion')!r}: expected {API_VERSION}"))
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        errors.append(PolicyFieldError(f"{p}metadata", "required: an object with name (and namespace)"))
        meta = {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        why = "required" if name in (None, "") else f"{name!r} must be a string"
        errors.append(PolicyFieldError(f"{p}metadata.name", why))
        name = ""
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        errors.append(PolicyFieldError(f"{p}metadata.name", f"{name!r} must be a DNS subdomain (lowercase)"))
    namespace = meta.get("namespace", "default")
    if not isinstance(namespace, str) or len(namespace) > 63 or not _DNS1123_LABEL.match(namespace):
        errors.append(PolicyFieldError(f"{p}metadata.namespace", f"{namespace!r} must be a DNS label (lowercase)"))
        namespace = "default"
    spec = obj.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        errors.append(PolicyFieldError(f"{p}spec", "must be an object"))
        spec = {}
    sp = f"{p}spec"
    _unknown(spec, ("podSelector", "policyTypes", "ingress", "egress"), sp, errors)
    pod_selector = parse_selector(spec.get("podSelector"), f"{sp}.podSelector", errors=errors)
    ingress = _parse_rules(spec.get("ingress"), f"{sp}.ingress", "from", errors)
    egress = _parse_rules(spec.get("egress"), f"{sp}.egress", "to", errors)
    types_raw = spec.get("policyTypes")
    if types_raw is None:
        policy_types: tuple[str, ...] = ("Ingress", "Egress") if spec.get("egress") else ("Ingress",)
    elif not isinstance(types_raw, list) or not types_raw:
        errors.append(PolicyFieldError(f"{sp}.policyTypes", "must be a non-empty list of Ingress and/or Egress"))
        policy_types = ("Ingress",)
    else:
        for i, t in enumerate(types_raw):
            if t not in POLICY_TYPES:
                errors.append(PolicyFieldError(f"{sp}.policyTypes[{i}]", f"{t!r} is not Ingress or Egress"))
            elif types_raw.index(t) != i:
                errors.append(PolicyFieldError(f"{sp}.policyTypes[{i}]", f"{t} is listed twice"))
        policy_types = tuple(t for t in POLICY_TYPES if t in types_raw)
    return NetworkPolicy(namespace, name, pod_selector, policy_types, ingress, egress)


def _unknown(obj: Mapping, allowed: tuple[str, ...], path: str, errors: list[PolicyFieldError]) -> None:
    for key in obj:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            errors.append(PolicyFieldError(where, f"unknown field (expected one of {', '.join(allowed)})"))


def _parse_rules(raw: Any, path: str, peers_key: str, errors: list[PolicyFieldError]) -> tuple[Rule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        errors.append(PolicyFieldError(path, "must be a list of rules"))
        return ()
    rules = []
    for i, item in enumerate(raw):
        rp = f"{path}[{i}]"
        if item is None:
            item = {}
        if not isinstance(item, Mapping):
            errors.append(PolicyFieldError(rp, "must be an object with ports and/or " + peers_key))
            continue
        _unknown(item, ("ports", peers_key), rp, errors)
        ports = _parse_ports(item.get("ports"), f"{rp}.ports", errors)
        peers = _parse_peers(item.get(peers_key), f"{rp}.{peers_key}", errors)
        rules.append(Rule(ports, peers))
    return tuple(rules)


def _parse_ports(raw: Any, path: str, errors: list[PolicyFieldError]) -> tuple[PolicyPort, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        errors.append(PolicyFieldError(path, "must be a list"))
        return ()
    out = []
    for i, item in enumerate(raw):
        pp = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            errors.append(PolicyFieldError(pp, "must be an object with protocol, port, endPort"))
            continue
        _unknown(item, ("protocol", "port", "endPort"), pp, errors)
        protocol = item.get("protocol", "TCP")
        if protocol not in PROTOCOLS:
            errors.append(PolicyFieldError(f"{pp}.protocol", f"{protocol!r} is not one of TCP, UDP, SCTP"))
            protocol = "TCP"
        port = item.get("port")
        if isinstance(port, bool):
            errors.append(PolicyFieldError(f"{pp}.port", f"{port!r} is not a port number or name"))
            port = None
        elif isinstance(port, int):
            if not 1 <= port <= 65535:
                errors.append(PolicyFieldError(f"{pp}.port", f"{port} must be between 1 and 65535"))
        elif isinstance(port, str):
            if port.isdigit():  # the API's IntOrString keeps "80" a name; a name cannot be all digits
                errors.append(PolicyFieldError(f"{pp}.port", f"{port!r} is a quoted number; write it unquoted"))
            elif len(port) > 15 or not _PORT_NAME.match(port) or "--" in port or not re.search("[a-z]", port):
                errors.append(
                    PolicyFieldError(
                        f"{pp}.port",
                        f"{port!r} is not a valid port name (1-15 lowercase letters, digits and '-', "
                        "at least one letter, no '--', not starting or ending with '-')",
                    )
                )
        elif port is not None:
            errors.append(PolicyFieldError(f"{pp}.port", f"{port!r} is not a port number or name"))
            port = None
        end = item.get("endPort")
        if end is not None:
            if isinstance(end, bool) or not isinstance(end, int):
                errors.append(PolicyFieldError(f"{pp}.endPort", f"{end!r} must be a port number"))
                end = None
            elif port is None:
                errors.append(PolicyFieldError(f"{pp}.endPort", "requires port to be set"))
            elif isinstance(port, str):
                errors.append(PolicyFieldError(f"{pp}.endPort", "may not be set when port is a named port"))
            elif not 1 <= end <= 65535:
                errors.append(PolicyFieldError(f"{pp}.endPort", f"{end} must be between 1 and 65535"))
            elif end < port:
                errors.append(PolicyFieldError(f"{pp}.endPort", f"{end} must be greater than or equal to port ({port})"))
        out.append(PolicyPort(protocol, port, end))
    return tuple(out)


def _parse_peers(raw: Any, path: str, errors: list[PolicyFieldError]) -> tuple[PolicyPeer, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        errors.append(PolicyFieldError(path, "must be a list of peers"))
        return ()
    out = []
    for i, item in enumerate(raw):
        pp = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            errors.append(PolicyFieldError(pp, "must be an object with podSelector, namespaceSelector or ipBlock"))
            continue
        _unknown(item, ("podSelector", "namespaceSelector", "ipBlock"), pp, errors)
        has = [k for k in ("podSelector", "namespaceSelector", "ipBlock") if item.get(k) is not None]
        if not has:
            errors.append(PolicyFieldError(pp, "must set podSelector, namespaceSelector or ipBlock"))
            continue
        if "ipBlock" in has and len(has) > 1:
            errors.append(PolicyFieldError(f"{pp}.ipBlock", "may not be combined with podSelector or namespaceSelector"))
            continue
        if "ipBlock" in has:
            block = _parse_ip_block(item["ipBlock"], f"{pp}.ipBlock", errors)
            if block is not None:
                out.append(PolicyPeer(ip_block=block))
            continue
        pod = parse_selector(item["podSelector"], f"{pp}.podSelector", errors=errors) if "podSelector" in has else None
        ns = parse_selector(item["namespaceSelector"], f"{pp}.namespaceSelector", errors=errors) if "namespaceSelector" in has else None
        out.append(PolicyPeer(pod_selector=pod, namespace_selector=ns))
    return tuple(out)


_CIDR_EXAMPLE = "expected e.g. 10.0.0.0/8 or fd00::/64"


def _cidr(text: Any, path: str, errors: list[PolicyFieldError]) -> IPv4Network | IPv6Network | None:
    if not isinstance(text, str) or "/" not in text:
        errors.append(PolicyFieldError(path, f"{text!r} is not a CIDR ({_CIDR_EXAMPLE})"))
        return None
    if "%" in text:
        errors.append(PolicyFieldError(path, f"{text!r}: a CIDR may not carry a zone (%...) ({_CIDR_EXAMPLE})"))
        return None
    try:
        net = ipaddress.ip_network(text, strict=False)  # the API server masks host bits too
    except ValueError:
        errors.append(PolicyFieldError(path, f"{text!r} is not a valid CIDR ({_CIDR_EXAMPLE})"))
        return None
    if isinstance(net, IPv6Network) and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
        v4 = IPv4Network((net.network_address.ipv4_mapped, net.prefixlen - 96))
        errors.append(
            PolicyFieldError(path, f"{text!r} is an IPv4-mapped IPv6 CIDR, which no packet carries: write {v4}")
        )
        return None
    return net


def _parse_ip_block(raw: Any, path: str, errors: list[PolicyFieldError]) -> IPBlock | None:
    if not isinstance(raw, Mapping):
        errors.append(PolicyFieldError(path, "must be an object with cidr (and except)"))
        return None
    _unknown(raw, ("cidr", "except"), path, errors)
    if raw.get("cidr") in (None, ""):
        errors.append(PolicyFieldError(f"{path}.cidr", "required"))
        return None
    cidr = _cidr(raw["cidr"], f"{path}.cidr", errors)
    excepts_raw = raw.get("except") or []
    if not isinstance(excepts_raw, list):
        errors.append(PolicyFieldError(f"{path}.except", "must be a list of CIDRs"))
        return None
    excepts = []
    for i, text in enumerate(excepts_raw):
        ep = f"{path}.except[{i}]"
        net = _cidr(text, ep, errors)
        if net is None or cidr is None:
            continue
        if net.version != cidr.version:
            errors.append(
                PolicyFieldError(ep, f"{text} is {IPFamily.of(net).label} but cidr {cidr} is {IPFamily.of(cidr).label}: "
                                 "except must be of the cidr's family")
            )
            continue
        if not net.subnet_of(cidr) or net.prefixlen <= cidr.prefixlen:  # type: ignore[arg-type]
            errors.append(PolicyFieldError(ep, f"{text} must be a strict subset of cidr {cidr}"))
            continue
        excepts.append(net)
    if cidr is None:
        return None
    return IPBlock(cidr, tuple(excepts))
