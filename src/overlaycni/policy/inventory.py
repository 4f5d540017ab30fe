"""A cluster described in one YAML file: namespaces, pods and policies.

Used by ``policy explain --from FILE`` and ``policy render --from FILE`` (and
by tests) before a datastore is involved::

    namespaces:
    - {name: x, labels: {ns: x}}
    pods:
    - {namespace: x, name: a, ip: 10.244.1.10, node: node-1, labels: {pod: a},
       ports: [serve-80-tcp=80/TCP]}
    - {namespace: x, name: b, ip: 10.244.1.11, ipv6: 'fd12:3456:789a:0:1::b',
       node: node-1}
    policies:
    - {apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, ...}

Namespaces that pods or policies use but the file does not list exist with
only their ``kubernetes.io/metadata.name`` label. ``ipv6`` is a dual-stack
pod's IPv6 address; no two pods may share an address of either family.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..cidr import IPAddress
from ..errors import ConfigError, PolicyFieldError
from .model import NamespaceInfo, NetworkPolicy, PodInfo, policy_from_manifest
from .records import namespace_from_dict, pod_from_dict


@dataclass(frozen=True)
class Inventory:
    namespaces: tuple[NamespaceInfo, ...]
    pods: tuple[PodInfo, ...]
    policies: tuple[NetworkPolicy, ...]

    def endpoint(self, text: str, *, field: str) -> PodInfo | IPAddress:
        """``ns/pod`` or an IPv4 or IPv6 address (either address of a pod
        means that pod)."""
        if "/" in text:
            for p in self.pods:
                if p.key == text:
                    return p
            known = ", ".join(p.key for p in self.pods[:8]) or "none"
            raise ConfigError(PolicyFieldError(field, f"no pod {text!r} in the inventory (pods: {known})"))
        ip = parse_address(text)
        if ip is None:
            raise ConfigError(PolicyFieldError(field, f"{text!r} is neither NAMESPACE/POD nor an IPv4 or IPv6 address"))
        return next((p for p in self.pods if ip in p.ips), ip)


def parse_address(text: str) -> IPAddress | None:
    """An IPv4 or IPv6 address (without a zone); None when ``text`` is not one."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return None if getattr(ip, "scope_id", None) is not None else ip


def load_inventory(text: str) -> Inventory:
    import yaml  # local: the agent builds its inventory from records, never from YAML

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(PolicyFieldError("yaml", f"not valid YAML: {exc}")) from None
    if not isinstance(data, Mapping):
        raise ConfigError(PolicyFieldError("document", "must be a map with namespaces, pods and policies"))
    errors: list[PolicyFieldError] = []
    for key in data:
        if key not in ("namespaces", "pods", "policies"):
            errors.append(PolicyFieldError(str(key), "unknown field (expected namespaces, pods, policies)"))
    sections: dict[str, list[Any]] = {}
    for key in ("namespaces", "pods", "policies"):
        value = data.get(key) or []
        if not isinstance(value, list):
            errors.append(PolicyFieldError(key, "must be a list"))
            value = []
        sections[key] = value
    namespaces: dict[str, NamespaceInfo] = {}
    for i, raw in enumerate(sections["namespaces"]):
        try:
            ns = namespace_from_dict(raw, path=f"namespaces[{i}]")
            namespaces[ns.name] = ns
        except ConfigError as exc:
            errors.extend(exc.errors)  # type: ignore[arg-type]
    pods: list[PodInfo] = []
    for i, raw in enumerate(sections["pods"]):
        try:
            pods.append(pod_from_dict(raw, path=f"pods[{i}]"))
        except ConfigError as exc:
            errors.extend(exc.errors)  # type: ignore[arg-type]
    seen_ips: dict[IPAddress, str] = {}
    for i, p in enumerate(pods):
        for key, ip in zip(("ip", "ipv6"), p.ips, strict=False):
            if ip in seen_ips:
                errors.append(PolicyFieldError(f"pods[{i}].{key}", f"{ip} is already the address of {seen_ips[ip]}"))
            seen_ips[ip] = p.key
    policies: list[NetworkPolicy] = []
    for i, raw in enumerate(sections["policies"]):
        perrs: list[PolicyFieldError] = []
        pol = policy_from_manifest(raw, errors=perrs, prefix=f"policies[{i}].")
        errors.extend(perrs)
        if pol is not None and not perrs:
            policies.append(pol)
    if errors:
        raise ConfigError(errors)
    for name in sorted({p.namespace for p in pods} | {p.namespace for p in policies}):
        namespaces.setdefault(name, NamespaceInfo(name))
    return Inventory(tuple(namespaces.values()), tuple(pods), tuple(policies))
