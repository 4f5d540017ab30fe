"""NetworkPolicy in the lab: pod and namespace metadata.

The lab plays the Kubernetes API server: it knows every pod's namespace,
labels, named ports, IP and node, and every namespace's labels. Pod labels
and ports live in the lab state (``PodState``); namespace labels in
``namespaces.json`` in the lab directory. After each change the lab writes
the full records (``pods/<ns>/<name>``, ``namespaces/<ns>``, as
``policy.store_codec`` encodes them) to the datastore with one internal
command, ``overlaycni --datastore URL lab publish-meta -f FILE``, run the
way the lab runs all its commands (``control.cli``: inside the control
namespace for an in-lab etcd), so the sqlite and etcd labs take one path.
The agents watch those keys and re-render their tables.

The reachability matrix measured with real packets is in ``lab.probe``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from ..errors import AlreadyExists, ConfigError, NotFound, UsageError
from ..policy import store_codec as codec
from ..policy.model import NamespaceInfo, PodInfo
from . import control, etcdtls, netns, topology
from . import state as st
from .state import LabState, PodState

NAMESPACES_FILE = "namespaces.json"
NAME_LABEL = "kubernetes.io/metadata.name"


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
    problems = codec.validate_labels(labels, field)
    if problems:
        raise ConfigError(problems)


def parse_ports(items: Sequence[str]) -> tuple[str, ...]:
    """``--port NAME=PORT/PROTO`` values, normalised; UsageError naming it."""
    out = []
    for item in items:
        try:
            p = codec.parse_named_port(item)
        except ValueError as exc:
            raise UsageError(str(exc), field="port") from None
        out.append(f"{p.name}={p.port}/{p.protocol}")
    names = [(p.split("=")[0], p.rsplit("/", 1)[1]) for p in out]
    if len(set(names)) != len(names):
        raise UsageError("a port name is given twice for the same protocol", field="port")
    return tuple(out)


def parse_ip(text: str | None) -> IPv4Address | None:
    if text is None:
        return None
    try:
        return IPv4Address(text.strip())
    except ValueError:
        raise UsageError(f"{text!r} is not an IPv4 address", field="ip") from None


# --- running a command against a lab's datastore -----------------------------------------------


def open_lab_state(name: str, root: str | None = None) -> LabState:
    """The state of lab ``name`` (``--lab``); NotFound naming the labs."""
    topology.validate_lab_name(name)
    try:
        return st.load(name, root)
    except NotFound:
        known = ", ".join(st.list_labs(root)) or "none"
        raise NotFound(f"--lab: no lab named {name!r} (labs: {known}); start one with: overlaycni lab up --name {name}") from None


def run_in_lab(state: LabState, args: Sequence[str]) -> int:
    """Run ``overlaycni --datastore <lab store> ARGS`` inside the lab's
    control namespace (an in-lab etcd is only reachable there), with this
    process's stdin/stdout/stderr; returns its exit status."""
    netns.require_privileges()
    assert state.control_netns, "only an etcd lab has a control namespace"
    argv = netns.in_ns(state.control_netns, [*control.overlaycni_argv(), *etcdtls.store_args(state), *args])
    return subprocess.run(argv).returncode


# --- records -----------------------------------------------------------------------------------


def pod_info(pod: PodState) -> PodInfo:
    assert pod.ip is not None
    ports = tuple(codec.parse_named_port(p) for p in pod.ports)
    return PodInfo(pod.namespace, pod.name, pod.ip.ip, pod.node, dict(pod.labels), ports)


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


def meta_document(
    state: LabState,
    *,
    pods: Iterable[PodState] = (),
    namespaces: Mapping[str, Mapping[str, str]] | None = None,
    delete_pods: Iterable[PodState] = (),
) -> dict[str, Any]:
    return {
        "cluster": state.name,
        "namespaces": [codec.namespace_to_dict(NamespaceInfo(n, dict(labels))) for n, labels in (namespaces or {}).items()],
        "pods": [codec.pod_to_dict(pod_info(p)) for p in pods if p.ip is not None],
        "delete_pods": [f"{p.namespace}/{p.name}" for p in delete_pods],
    }


def publish(state: LabState, doc: dict[str, Any]) -> None:
    """Write the records of ``doc`` to the lab's datastore (``lab
    publish-meta`` run the way the lab runs its own commands)."""
    if not (doc["namespaces"] or doc["pods"] or doc["delete_pods"]):
        return
    fd, path = tempfile.mkstemp(prefix="meta-", suffix=".json", dir=state.lab_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
        control.cli(state, ["lab", "publish-meta", "--cluster", state.name, "--file", path])
    finally:
        os.unlink(path)


def apply_meta(store: Any, cluster: str, doc: Mapping[str, Any]) -> dict[str, int]:
    """The datastore side of ``publish``: validate every record, then write
    (pods and namespaces replace their records; deleted pods lose theirs)."""
    if not isinstance(doc, Mapping):
        raise ConfigError(codec.PolicyFieldError("document", "must be a JSON object"))
    namespaces = [codec.namespace_from_dict(d, path=f"namespaces[{i}]") for i, d in enumerate(doc.get("namespaces") or [])]
    pods = [codec.pod_from_dict(d, path=f"pods[{i}]") for i, d in enumerate(doc.get("pods") or [])]
    deletes = []
    for i, ref in enumerate(doc.get("delete_pods") or []):
        ns, sep, name = str(ref).partition("/")
        if not sep or not ns or not name:
            raise ConfigError(codec.PolicyFieldError(f"delete_pods[{i}]", f"{ref!r}: expected NAMESPACE/NAME"))
        deletes.append(codec.pod_key(cluster, namespace=ns, name=name))
    puts = [(codec.namespace_key(cluster, namespace=n.name), codec.encode(codec.namespace_to_dict(n)), None) for n in namespaces]
    puts += [(codec.pod_key(cluster, namespace=p.namespace, name=p.name), codec.encode(codec.pod_to_dict(p)), None) for p in pods]
    if puts or deletes:
        store.txn(compare=[], put=puts, delete=deletes)
    return {"namespaces": len(namespaces), "pods": len(pods), "deleted_pods": len(deletes)}


def publish_pod(state: LabState, pod: PodState) -> None:
    """After a successful ADD: the pod's record, and its namespace's record
    if the lab did not know the namespace yet."""
    with st.locked(Path(state.lab_dir)):
        known = load_namespaces(state.without_pod(pod.name))
        new_ns: dict[str, dict[str, str]] = {} if pod.namespace in known else {pod.namespace: {}}
        if new_ns:
            _save_namespaces(state, {**known, **new_ns})
        publish(state, meta_document(state, pods=[pod], namespaces=new_ns))


def unpublish_pod(state: LabState, pod: PodState) -> None:
    publish(state, meta_document(state, delete_pods=[pod]))


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
        sets.pop(NAME_LABEL, None)
        known[namespace] = sets
        publish(state, meta_document(state, namespaces={namespace: sets}))
        _save_namespaces(state, known)
    return NamespaceInfo(namespace, sets).labels  # type: ignore[return-value]


def _edit(labels: Mapping[str, str], sets: Mapping[str, str], removes: set[str], *, what: str) -> dict[str, str]:
    out = dict(labels)
    for k in removes:
        if k not in out:
            raise UsageError(f"LABELS: {what} has no label {k!r} to remove (labels: {_fmt(out)})")
        del out[k]
    out.update(sets)
    return out


def _fmt(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "none"


def label_namespace(name: str, namespace: str, edits: Sequence[str], *, root: str | None = None) -> dict[str, str]:
    sets, removes = parse_label_edits(edits)
    if NAME_LABEL in sets or NAME_LABEL in removes:
        raise UsageError(f"LABELS: {NAME_LABEL} is set by the API server to the namespace's name and cannot be changed")
    state = st.load(topology.validate_lab_name(name), root)
    with st.locked(Path(state.lab_dir)):
        state = st.load(name, root)
        known = load_namespaces(state)
        if namespace not in known:
            raise NotFound(f"NAMESPACE: lab {name} has no namespace {namespace!r} (namespaces: {', '.join(sorted(known)) or 'none'})")
        known[namespace] = _edit(known[namespace], sets, removes, what=f"namespace {namespace}")
        publish(state, meta_document(state, namespaces={namespace: known[namespace]}))
        _save_namespaces(state, known)
    return NamespaceInfo(namespace, known[namespace]).labels  # type: ignore[return-value]


def label_pod(name: str, pod: str, edits: Sequence[str], *, root: str | None = None) -> PodState:
    sets, removes = parse_label_edits(edits)
    state = st.load(topology.validate_lab_name(name), root)
    with st.locked(Path(state.lab_dir)):
        state = st.load(name, root)
        p = state.pod(pod)
        p = replace(p, labels=tuple(sorted(_edit(dict(p.labels), sets, removes, what=f"pod {pod}").items())))
        publish(state, meta_document(state, pods=[p]))
        st.save(state.with_pod(p))
    return p
