"""NetworkPolicy's datastore records: policies, pods and namespaces (pure).

Keys (``datastore.keys``): ``policies/<ns>/<name>`` (the defaulted manifest,
``policy_to_dict``), ``pods/<ns>/<name>`` (``pod_to_dict``) and
``namespaces/<ns>`` (``namespace_to_dict``), under the cluster's root. Values
are JSON objects (``encode``). The one decoder per kind (``decode_policy``,
``decode_pod``, ``decode_namespace``) validates again and raises
``BadRecord`` naming the key and the problem; ``load_*`` read a whole kind
and, given ``on_bad``, skip and report a bad record instead of failing.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from typing import Any

from ..datastore.keys import (
    BadRecordHandler,
    Record,
    decode_all,
    json_object,
    namespaces_prefix,
    pods_prefix,
    policies_prefix,
    policy_key,
)
from ..errors import BadRecord, ConfigError, DatastoreError, PolicyFieldError
from .model import (
    API_VERSION,
    PROTOCOLS,
    NamedPort,
    NamespaceInfo,
    NetworkPolicy,
    PodInfo,
    PolicyPeer,
    PolicyPort,
    Rule,
    policy_from_manifest,
)
from .selectors import label_key_problem, label_value_problem


def encode(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _decoded(kv: Record, kind: str, parse: Any) -> Any:
    data = json_object(kv, kind)
    try:
        return parse(data)
    except ConfigError as exc:
        raise BadRecord(key=kv.key, kind=kind, problem=exc.message, revision=kv.revision) from None


# ----- policies ----------------------------------------------------------------


def policy_to_dict(policy: NetworkPolicy) -> dict[str, Any]:
    """The defaulted manifest of ``policy`` (valid input for parsing again)."""

    def peer(p: PolicyPeer) -> dict[str, Any]:
        if p.ip_block is not None:
            block: dict[str, Any] = {"cidr": str(p.ip_block.cidr)}
            if p.ip_block.except_:
                block["except"] = [str(e) for e in p.ip_block.except_]
            return {"ipBlock": block}
        out: dict[str, Any] = {}
        if p.pod_selector is not None:
            out["podSelector"] = p.pod_selector.to_dict()
        if p.namespace_selector is not None:
            out["namespaceSelector"] = p.namespace_selector.to_dict()
        return out

    def port(p: PolicyPort) -> dict[str, Any]:
        out: dict[str, Any] = {"protocol": p.protocol}
        if p.port is not None:
            out["port"] = p.port
        if p.end_port is not None:
            out["endPort"] = p.end_port
        return out

    def rules(rs: tuple[Rule, ...], key: str) -> list[dict[str, Any]]:
        out = []
        for r in rs:
            d: dict[str, Any] = {}
            if r.ports:
                d["ports"] = [port(p) for p in r.ports]
            if r.peers:
                d[key] = [peer(p) for p in r.peers]
            out.append(d)
        return out

    spec: dict[str, Any] = {"podSelector": policy.pod_selector.to_dict(), "policyTypes": list(policy.policy_types)}
    if policy.ingress:
        spec["ingress"] = rules(policy.ingress, "from")
    if policy.egress:
        spec["egress"] = rules(policy.egress, "to")
    return {
        "apiVersion": API_VERSION,
        "kind": "NetworkPolicy",
        "metadata": {"name": policy.name, "namespace": policy.namespace},
        "spec": spec,
    }


def policy_from_dict(data: Mapping[str, Any]) -> NetworkPolicy:
    """Inverse of ``policy_to_dict`` (validates again; ConfigError if bad)."""
    errors: list[PolicyFieldError] = []
    policy = policy_from_manifest(data, errors=errors)
    if errors or policy is None:
        raise ConfigError(errors or [PolicyFieldError("document", "not a NetworkPolicy")])
    return policy


def validate_labels(labels: Any, path: str) -> list[PolicyFieldError]:
    """Problems with a pod's or namespace's labels (for the lab / CLI)."""
    if not isinstance(labels, Mapping):
        return [PolicyFieldError(path, "must be a map of label key to value")]
    out = []
    for k, v in labels.items():
        problem = label_key_problem(k) or label_value_problem(v)
        if problem:
            out.append(PolicyFieldError(f"{path}.{k}", problem))
    return out


# ----- pods and namespaces -----------------------------------------------------------


_POD_FIELDS = ("namespace", "name", "ip", "ipv6", "node", "labels", "ports")


def pod_to_dict(pod: PodInfo) -> dict[str, Any]:
    """The stored/declared form; ``ipv6`` only for a dual-stack pod, so a
    single-stack record stays what it always was."""
    out: dict[str, Any] = {
        "namespace": pod.namespace,
        "name": pod.name,
        "ip": str(pod.ip),
        "node": pod.node,
        "labels": dict(pod.labels),
        "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol} for p in pod.ports],
    }
    if pod.ip_v6 is not None:
        out["ipv6"] = str(pod.ip_v6)
    return out


def pod_from_dict(data: Mapping[str, Any], *, path: str = "pod") -> PodInfo:
    """A PodInfo from its stored/declared form (``ip`` IPv4, ``ipv6``
    optional); ConfigError naming the field."""
    errors: list[PolicyFieldError] = []
    if not isinstance(data, Mapping):
        raise ConfigError(PolicyFieldError(path, "must be an object"))
    for key in data:
        if key not in _POD_FIELDS:
            errors.append(PolicyFieldError(f"{path}.{key}", f"unknown field (expected {', '.join(_POD_FIELDS)})"))
    for key in ("namespace", "name"):
        if not isinstance(data.get(key), str) or not data.get(key):
            errors.append(PolicyFieldError(f"{path}.{key}", "required"))
    ip = None
    try:
        ip = ipaddress.IPv4Address(str(data.get("ip")))
    except ValueError:
        errors.append(PolicyFieldError(f"{path}.ip", f"{data.get('ip')!r} is not an IPv4 address"))
    ip_v6 = None
    if data.get("ipv6") is not None:
        try:
            ip_v6 = ipaddress.IPv6Address(str(data["ipv6"]))
            if ip_v6.scope_id is not None:
                raise ValueError
        except ValueError:
            ip_v6 = None
            errors.append(PolicyFieldError(f"{path}.ipv6", f"{data['ipv6']!r} is not an IPv6 address (without a zone)"))
    labels = data.get("labels") or {}
    errors.extend(validate_labels(labels, f"{path}.labels"))
    ports: list[NamedPort] = []
    raw_ports = data.get("ports") or []
    if not isinstance(raw_ports, list):
        errors.append(PolicyFieldError(f"{path}.ports", "must be a list"))
        raw_ports = []
    for i, p in enumerate(raw_ports):
        pp = f"{path}.ports[{i}]"
        if isinstance(p, str):  # NAME=PORT/PROTO, the lab's flag syntax
            try:
                p = parse_named_port(p)
            except ValueError as exc:
                errors.append(PolicyFieldError(pp, str(exc)))
                continue
            ports.append(p)
            continue
        if not isinstance(p, Mapping):
            errors.append(PolicyFieldError(pp, "must be {name, port, protocol} or NAME=PORT/PROTO"))
            continue
        port, proto = p.get("port"), p.get("protocol", "TCP")
        if not isinstance(p.get("name"), str) or not p.get("name"):
            errors.append(PolicyFieldError(f"{pp}.name", "required"))
        elif isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            errors.append(PolicyFieldError(f"{pp}.port", f"{port!r} must be a number 1-65535"))
        elif proto not in PROTOCOLS:
            errors.append(PolicyFieldError(f"{pp}.protocol", f"{proto!r} is not one of TCP, UDP, SCTP"))
        else:
            ports.append(NamedPort(p["name"], port, proto))
    if errors or ip is None:  # a bad ip is among the errors
        raise ConfigError(errors)
    return PodInfo(data["namespace"], data["name"], ip, str(data.get("node") or ""), labels, tuple(ports), ip_v6=ip_v6)


def parse_named_port(text: str) -> NamedPort:
    """``serve-80-tcp=80/TCP`` (protocol optional, default TCP)."""
    name, sep, rest = text.partition("=")
    number, _, proto = rest.partition("/")
    proto = (proto or "TCP").upper()
    if not sep or not name or not number.isdigit() or not 1 <= int(number) <= 65535:
        raise ValueError(f"{text!r}: expected NAME=PORT/PROTO, e.g. serve-80-tcp=80/TCP")
    if proto not in PROTOCOLS:
        raise ValueError(f"{text!r}: protocol must be TCP, UDP or SCTP")
    return NamedPort(name, int(number), proto)


def namespace_to_dict(ns: NamespaceInfo) -> dict[str, Any]:
    return {"name": ns.name, "labels": dict(ns.labels)}


def namespace_from_dict(data: Mapping[str, Any], *, path: str = "namespace") -> NamespaceInfo:
    if not isinstance(data, Mapping) or not isinstance(data.get("name"), str) or not data.get("name"):
        raise ConfigError(PolicyFieldError(f"{path}.name", "required"))
    errors = validate_labels(data.get("labels") or {}, f"{path}.labels")
    if errors:
        raise ConfigError(errors)
    return NamespaceInfo(data["name"], data.get("labels") or {})


def decode_policy(kv: Record) -> NetworkPolicy:
    return _decoded(kv, "policy", policy_from_dict)


def decode_pod(kv: Record) -> PodInfo:
    return _decoded(kv, "pod", pod_from_dict)


def decode_namespace(kv: Record) -> NamespaceInfo:
    return _decoded(kv, "namespace", namespace_from_dict)


# ----- reading and writing a Store (anything with get/list/put/delete) ----------------


def save_policies(store: Any, cluster: str, *, policies: list[NetworkPolicy]) -> list[str]:
    """Create or replace every policy in one datastore transaction (all or
    none); returns the keys written."""
    puts = [(policy_key(cluster, namespace=p.namespace, name=p.name), encode(policy_to_dict(p)), None) for p in policies]
    if puts and not store.txn(compare=[], put=puts):  # pragma: no cover - no compare cannot fail
        raise DatastoreError("the datastore refused the policy transaction")
    return [k for k, _, _ in puts]


def delete_policy(store: Any, cluster: str, *, namespace: str, name: str) -> bool:
    """Delete one policy; False when it did not exist."""
    return bool(store.delete(policy_key(cluster, namespace=namespace, name=name)))


def load_policies(store: Any, cluster: str, *, on_bad: BadRecordHandler | None = None) -> list[NetworkPolicy]:
    return decode_all(store.list(policies_prefix(cluster)), decode_policy, on_bad=on_bad)


def load_pods(store: Any, cluster: str, *, on_bad: BadRecordHandler | None = None) -> list[PodInfo]:
    return decode_all(store.list(pods_prefix(cluster)), decode_pod, on_bad=on_bad)


def load_namespaces(store: Any, cluster: str, *, on_bad: BadRecordHandler | None = None) -> list[NamespaceInfo]:
    return decode_all(store.list(namespaces_prefix(cluster)), decode_namespace, on_bad=on_bad)
