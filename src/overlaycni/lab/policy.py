"""NetworkPolicy in the lab: pod and namespace metadata.

The lab plays the Kubernetes API server: it knows every pod's namespace,
labels, named ports, IP and node, and every namespace's labels. Pod labels
and ports live in the lab state (``LabPod``); namespace labels in
``namespaces.json`` in the lab directory. After each change the lab writes
the full records (``pods/<ns>/<name>``, ``namespaces/<ns>`` as
``datastore.keys`` names them, encoded by ``policy.records``) to the
datastore in one transaction, in-process (``control.with_store``: inside
the control namespace for an in-lab etcd), so the sqlite and etcd labs take
one path. The agents watch those keys and re-render their tables.

The reachability matrix measured with real packets is in ``lab.probe``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

from ..datastore import Store, keys
from ..errors import AlreadyExists, ConfigError, NotFound, UsageError
from ..policy import records
from ..policy.model import NAMESPACE_NAME_LABEL, NamespaceInfo, PodInfo
from . import control, topology
from . import state as st
from .state import LabPod, LabState

NAMESPACES_FILE = "namespaces.json"


# --- label edits (k=v sets, k- removes, like kubectl label) -----------------------------------


def parse_label_edits(items: Sequence[str], *, field: str = "LABELS") -> tuple[dict[str, str], set[str]]:
    """``["a=1", "b-", "c=2,d=3"]`` -> ({a: 1, c: 2, d: 3}, {b}); UsageError
    naming the item; label keys and values are validated like the API server."""
    sets: dict[str, str] = {}
    removes: set[str] = set()
    for raw in items:
        for item in (x.strip() for x in raw.split(",")):
            if not item:
                continue
            if "=" not in item and item.endswith("-"):
                removes.add(item[:-1])
                continue
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"{field}: {item!r} is neither key=value nor key- (to remove a label)")
            sets[key.strip()] = value.strip()
    check_labels(sets, field=field)
    return sets, removes


def check_labels(labels: Mapping[str, str], *, field: str) -> None:
    """ConfigError naming ``field.key`` for a label the API server would refuse."""
    problems = records.validate_labels(labels, field)
    if problems:
        raise ConfigError(problems)


def parse_ports(items: Sequence[str]) -> tuple[str, ...]:
    """``--port NAME=PORT/PROTO`` values, normalised; UsageError naming it."""
    out = []
    for item in items:
        try:
            p = records.parse_named_port(item)
        except ValueError as exc:
            raise UsageError(str(exc), field="port") from None
        out.append(f"{p.name}={p.port}/{p.protocol}")
    names = [(p.split("=")[0], p.rsplit("/", 1)[1]) for p in out]
    if len(set(names)) != len(names):
        raise UsageError("a port name is given twice for the same protocol", field="port")
    return tuple(out)


def parse_ips(texts: Sequence[str]) -> tuple[IPv4Address | IPv6Address, ...]:
    """``--ip`` (repeatable): at most one address per family, IPv4 first."""
    out: list[IPv4Address | IPv6Address] = []
    for text in texts:
        try:
            out.append(ip_address(text.strip()))
        except ValueError:
            raise UsageError(f"{text!r} is not an IP address", field="ip") from None
    if len({a.version for a in out}) != len(out):
        raise UsageError(f"{', '.join(texts)}: at most one address per family", field="ip")
    return tuple(sorted(out, key=lambda a: a.version))


def open_lab_state(name: str, root: str | None = None) -> LabState:
    """The state of lab ``name`` (``--lab``); NotFound naming the labs."""
    topology.validate_lab_name(name)
    try:
        return st.load(name, root)
    except NotFound:
        known = ", ".join(st.list_labs(root)) or "none"
        raise NotFound(f"--lab: no lab named {name!r} (labs: {known}); start one with: overlaycni lab up --name {name}") from None


# --- records -----------------------------------------------------------------------------------


def pod_info(pod: LabPod) -> PodInfo:
    assert pod.ip is not None
    ports = tuple(records.parse_named_port(p) for p in pod.ports)
    return PodInfo(pod.namespace, pod.name, pod.ip.ip, pod.node, dict(pod.labels), ports, ip_v6=pod.ip_v6.ip if pod.ip_v6 else None)


def load_namespaces(state: LabState) -> dict[str, dict[str, str]]:
    """The lab's namespaces and their labels (without the automatic name label)."""
    path = Path(state.lab_dir) / NAMESPACES_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        data = {}
    except ValueError as exc:
        raise UsageError(f"lab {state.name}: {path} is damaged ({exc})") from None
    known = {str(k): {str(a): str(b) for a, b in v.items()} for k, v in data.items()}
    for p in state.pods:  # a namespace a pod uses exists, like "default"
        known.setdefault(p.namespace, {})
    return known


def _save_namespaces(state: LabState, namespaces: Mapping[str, Mapping[str, str]]) -> None:
    path = Path(state.lab_dir) / NAMESPACES_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: dict(v) for k, v in sorted(namespaces.items())}, indent=2))
    os.replace(tmp, path)


@dataclass(frozen=True)
class MetaChange:
    """Records to write (each replaces its key) and pods whose record goes."""

    namespaces: tuple[NamespaceInfo, ...] = ()
    pods: tuple[PodInfo, ...] = ()
    delete_pods: tuple[tuple[str, str], ...] = ()  # (namespace, name)

    def __bool__(self) -> bool:
        return bool(self.namespaces or self.pods or self.delete_pods)


def meta_change(
    *,
    pods: Iterable[LabPod] = (),
    namespaces: Mapping[str, Mapping[str, str]] | None = None,
    delete_pods: Iterable[LabPod] = (),
) -> MetaChange:
    """The records of lab pods (those with an IP) and namespaces."""
    return MetaChange(
        namespaces=tuple(NamespaceInfo(n, dict(labels)) for n, labels in (namespaces or {}).items()),
        pods=tuple(pod_info(p) for p in pods if p.ip is not None),
        delete_pods=tuple((p.namespace, p.name) for p in delete_pods),
    )


def write_meta(store: Store, cluster: str, change: MetaChange) -> None:
    """Write ``change`` in one transaction. Every record is first read back
    through the decoder the agents use: one they would skip as bad is a
    ``ConfigError`` naming its field, and nothing is written."""
    puts = []
    for i, ns in enumerate(change.namespaces):
        doc = records.namespace_to_dict(ns)
        records.namespace_from_dict(doc, path=f"namespaces[{i}]")
        puts.append((keys.namespace_key(cluster, namespace=ns.name), records.encode(doc), None))
    for i, pod in enumerate(change.pods):
        doc = records.pod_to_dict(pod)
        records.pod_from_dict(doc, path=f"pods[{i}]")
        puts.append((keys.pod_key(cluster, namespace=pod.namespace, name=pod.name), records.encode(doc), None))
    deletes = [keys.pod_key(cluster, namespace=ns, name=name) for ns, name in change.delete_pods]
    if puts or deletes:
        store.txn(compare=[], put=puts, delete=deletes)


def publish(state: LabState, change: MetaChange) -> None:
    """Write ``change`` to the lab's datastore."""
    if change:
        control.with_store(state, lambda store: write_meta(store, state.name, change))


def publish_pod(state: LabState, pod: LabPod) -> None:
    """After a successful ADD: the pod's record, and its namespace's record
    if the lab did not know the namespace yet."""
    with st.locked(Path(state.lab_dir)):
        known = load_namespaces(state.without_pod(pod))
        new_ns: dict[str, dict[str, str]] = {} if pod.namespace in known else {pod.namespace: {}}
        if new_ns:
            _save_namespaces(state, {**known, **new_ns})
        publish(state, meta_change(pods=[pod], namespaces=new_ns))


def unpublish_pods(state: LabState, pods: Iterable[LabPod]) -> None:
    publish(state, meta_change(delete_pods=pods))


def add_namespace(name: str, namespace: str, labels: Sequence[str] = (), *, root: str | None = None) -> dict[str, str]:
    """``lab namespace add``: a namespace with labels (plus the automatic
    ``kubernetes.io/metadata.name``); AlreadyExists if the lab has it."""
    topology.validate_pod_name(namespace, field="NAMESPACE")
    sets, removes = parse_label_edits(labels, field="--labels")
    if removes:
        raise UsageError(f"{sorted(removes)[0]}- removes a label; a new namespace has none to remove", field="labels")
    state = st.load(topology.validate_lab_name(name), root)
    with st.locked(Path(state.lab_dir)):
        state = st.load(name, root)
        known = load_namespaces(state)
        if namespace in known:
            raise AlreadyExists(
                f"NAMESPACE: lab {name} already has namespace {namespace!r}",
                details=f"change its labels with: overlaycni lab namespace label {namespace} KEY=VALUE --name {name}",
            )
        sets.pop(NAMESPACE_NAME_LABEL, None)
        known[namespace] = sets
        publish(state, meta_change(namespaces={namespace: sets}))
        _save_namespaces(state, known)
    return NamespaceInfo(namespace, sets).labels  # type: ignore[return-value]


def _edit(labels: Mapping[str, str], sets: Mapping[str, str], removes: set[str], *, what: str) -> dict[str, str]:
    out = dict(labels)
    for k in removes:
        if k not in out:
            raise UsageError(f"LABELS: {what} has no label {k!r} to remove (labels: {format_labels(out, empty='none')})")
        del out[k]
    out.update(sets)
    return out


def format_labels(labels: Mapping[str, str] | Iterable[tuple[str, str]], *, empty: str = "-") -> str:
    """``a=1,b=2`` (sorted by key), or ``empty`` for no labels."""
    pairs = labels.items() if isinstance(labels, Mapping) else labels
    return ",".join(f"{k}={v}" for k, v in sorted(pairs)) or empty


def label_namespace(name: str, namespace: str, edits: Sequence[str], *, root: str | None = None) -> dict[str, str]:
    sets, removes = parse_label_edits(edits)
    if NAMESPACE_NAME_LABEL in sets or NAMESPACE_NAME_LABEL in removes:
        raise UsageError(f"LABELS: {NAMESPACE_NAME_LABEL} is set by the API server to the namespace's name and cannot be changed")
    state = st.load(topology.validate_lab_name(name), root)
    with st.locked(Path(state.lab_dir)):
        state = st.load(name, root)
        known = load_namespaces(state)
        if namespace not in known:
            raise NotFound(f"NAMESPACE: lab {name} has no namespace {namespace!r} (namespaces: {', '.join(sorted(known)) or 'none'})")
        known[namespace] = _edit(known[namespace], sets, removes, what=f"namespace {namespace}")
        publish(state, meta_change(namespaces={namespace: known[namespace]}))
        _save_namespaces(state, known)
    return NamespaceInfo(namespace, known[namespace]).labels  # type: ignore[return-value]


def label_pod(name: str, pod: str, edits: Sequence[str], *, root: str | None = None) -> LabPod:
    """``lab pod label POD``: POD is ``NAMESPACE/NAME`` or an unambiguous ``NAME``."""
    sets, removes = parse_label_edits(edits)
    state = st.load(topology.validate_lab_name(name), root)
    with st.locked(Path(state.lab_dir)):
        state = st.load(name, root)
        p = state.pod(pod)
        p = replace(p, labels=tuple(sorted(_edit(dict(p.labels), sets, removes, what=f"pod {p.key}").items())))
        publish(state, meta_change(pods=[p]))
        st.save(state.with_pod(p))
    return p
