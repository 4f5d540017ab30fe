"""Changing a running lab: pods and nodes come and go, agents restart.

Each operation loads the state, does its kernel/process work, then re-reads
the state under the lab's lock and records its change, so concurrent
commands (``pod add`` from two shells) do not lose each other's records.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..errors import AlreadyExists, OverlayCNIError, UsageError
from . import control, netns, procs, topology
from . import policy as lab_policy
from . import state as st
from .lifecycle import new_node, new_pod, setup_node
from .state import LabNode, LabPod, LabState


def _update(name: str, root: str | None, change: Callable[[LabState], LabState]) -> LabState:
    with st.locked(st.lab_dir(name, root)):
        state = change(st.load(name, root))
        st.save(state)
        return state


def open_lab(name: str, root: str | None = None) -> LabState:
    topology.validate_lab_name(name)
    return st.load(name, root)


# --- pods ---------------------------------------------------------------------------------------


def add_pod(
    name: str,
    pod: str,
    *,
    namespace: str | None = None,
    node: str | None = None,
    labels: tuple[tuple[str, str], ...] = (),
    ports: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    root: str | None = None,
) -> LabPod:
    """ADD one pod: ``pod`` is ``NAME`` (in ``namespace``, default
    ``default``) or ``NAMESPACE/NAME``; ``ports`` are its named ports
    (NAME=PORT/PROTO), ``ips`` requested addresses, at most one per family
    (CNI ``runtimeConfig.ips``). The pod's record (labels, ports, IP, node) is
    published to the datastore for policy."""
    netns.require_privileges()
    state = open_lab(name, root)
    namespace, pod = split_pod_ref(pod, namespace)
    ports = lab_policy.parse_ports(ports)
    wanted = lab_policy.parse_ips(ips)
    lab_policy.check_labels(dict(labels), field="--labels")
    if not state.nodes:
        raise UsageError(f"lab {name} has no nodes; add one with `overlaycni lab node add --name {name}`")
    if node is None and wanted:  # the node whose block holds the (first) requested address
        first = wanted[0]
        node = next((n.name for n in state.nodes if any(b and first in b for b in (n.block, n.block_v6))), None)
        if node is None:
            blocks = ", ".join(f"{n.name} {n.block}{f' {n.block_v6}' if n.block_v6 else ''}" for n in state.nodes if n.block)
            raise UsageError(f"{first} is in no node's block (blocks: {blocks or 'none yet'})", field="ip")
    if node is None:  # the node with the fewest pods, like a naive scheduler
        node = min(state.nodes, key=lambda n: (len(state.pods_on(n.name)), n.index)).name
    state.node(node)  # raises NotFound naming the nodes
    p = new_pod(state, pod, namespace=namespace, node=node, labels=labels)

    def claim(s: LabState) -> LabState:  # under the lab's lock: a concurrent `pod add` of the same pod loses here
        if s.find_pod(p.key) is not None:
            raise AlreadyExists(f"lab {name}: pod {p.key} already exists")
        return s.with_namespace(p.netns).with_pod(p)

    # Every write of the state file is a locked read-change-write (``_update``):
    # saving the state read above would drop the records that concurrent
    # commands wrote meanwhile (their pods would leak: no `pod delete`, no
    # `lab check` for them).
    state = _update(name, root, claim)
    try:
        result = replace(control.cni_add(state, state.node(node), p, ips=wanted), ports=ports)
        lab_policy.publish_pod(state.with_pod(result), result)
    except BaseException:
        control.cni_del(state, state.node(node), p, best_effort=True)
        _update(name, root, lambda s: s.without_pod(p).without_namespace(p.netns))
        raise
    _update(name, root, lambda s: s.with_namespace(result.netns).with_pod(result))
    return result


def split_pod_ref(pod: str, namespace: str | None) -> tuple[str, str]:
    """``lab pod add``'s POD and ``--namespace`` as (namespace, name), each
    validated; ``NAMESPACE/NAME`` must agree with ``--namespace`` if given."""
    ref_ns, sep, pod_name = pod.rpartition("/")
    if sep:
        if namespace is not None and namespace != ref_ns:
            raise UsageError(f"{pod!r} names namespace {ref_ns!r} but --namespace is {namespace!r}", field="POD")
        namespace = ref_ns
    namespace = topology.validate_pod_name(namespace or "default", field="--namespace" if not sep else "POD")
    return namespace, topology.validate_pod_name(pod_name)


def delete_pod(name: str, pod: str, *, root: str | None = None) -> LabPod:
    """DEL one pod (``NAMESPACE/NAME`` or an unambiguous ``NAME``)."""
    netns.require_privileges()
    state = open_lab(name, root)
    p = state.pod(pod)
    node = next((n for n in state.nodes if n.name == p.node), None)
    procs.kill_strays(p.netns)  # the pod's processes (probe servers, a `lab exec`) go first
    control.cni_del(state, node, p)
    _update(name, root, lambda s: s.without_pod(p).without_namespace(p.netns))
    try:
        lab_policy.unpublish_pods(state, [p])
    except OverlayCNIError:
        pass  # a record without an IP allocation selects nothing; the agents ignore it
    return p


# --- nodes --------------------------------------------------------------------------------------


def add_node(name: str, node: str | None = None, *, root: str | None = None) -> LabNode:
    """A new node VM with its agent; returns once the agent is ready."""
    netns.require_privileges()
    state = open_lab(name, root)
    used = {n.index for n in state.nodes}
    index = topology.next_free_index(used)
    node = topology.validate_node_name(node or topology.node_name(index))
    if any(n.name == node for n in state.nodes):
        raise AlreadyExists(f"lab {name}: node {node!r} already exists")
    if netns.netns_exists(topology.node_netns(name, node)):
        raise AlreadyExists(f"lab {name}: namespace {topology.node_netns(name, node)} already exists")
    n = new_node(state, index, node)
    state = _update(name, root, lambda s: s.with_namespace(n.netns).with_node(n))
    try:
        setup_node(state, n)
        n = control.start_agent(state, n)
        _update(name, root, lambda s: s.with_node(n))
        n = control.wait_agent(state, n)
    except BaseException:
        _remove_node(state, n, deregister=True)
        raise
    _update(name, root, lambda s: s.with_node(n))
    return n


def delete_node(name: str, node: str, *, root: str | None = None) -> LabNode:
    """Drain (DEL its pods through the plugin), stop the agent, remove the
    node from the cluster so peers converge now, delete the VM."""
    netns.require_privileges()
    state = open_lab(name, root)
    n = state.node(node)
    for p in state.pods_on(node):
        procs.kill_strays(p.netns)  # the pod's processes (probe servers) go first
        control.cni_del(state, n, p, best_effort=True)

        def drop(s: LabState, p: LabPod = p) -> LabState:
            return s.without_pod(p).without_namespace(p.netns)

        _update(name, root, drop)
    try:
        lab_policy.unpublish_pods(state, state.pods_on(node))
    except OverlayCNIError:
        pass  # records without an IP allocation select nothing
    _remove_node(state, n, deregister=True)
    return n


def _remove_node(state: LabState, n: LabNode, *, deregister: bool) -> None:
    procs.stop(n.agent)
    procs.kill_strays(n.netns)
    if deregister:
        deregister_node(state, n.name)
    netns.delete_netns(n.netns)
    shutil.rmtree(control.node_dir(state, n.name), ignore_errors=True)
    _update(state.name, str(Path(state.lab_dir).parent), lambda s: s.without_node(n.name).without_namespace(n.netns))


def deregister_node(state: LabState, node: str) -> bool:
    """Delete the node's record (and its block) so peers drop it. Without
    that they keep routing to it. ``force``: the lab has stopped its agent
    itself (a killed agent's lease would still be live for a TTL)."""
    from .. import ipam

    try:
        control.with_store(state, lambda store: ipam.delete_node(store, state.name, node, force=True))
        return True
    except OverlayCNIError:
        return False


# --- agents -------------------------------------------------------------------------------------


def restart_agent(name: str, node: str, *, root: str | None = None) -> LabNode:
    """Stop the node's agent if it still runs (SIGTERM: pods keep working),
    start a new one, wait until it is ready."""
    netns.require_privileges()
    state = open_lab(name, root)
    n = state.node(node)
    procs.stop(n.agent)
    n = control.start_agent(state, n)
    _update(name, root, lambda s: s.with_node(n))
    n = control.wait_agent(state, n)
    _update(name, root, lambda s: s.with_node(n))
    return n


def kill_agent(name: str, node: str, *, root: str | None = None) -> LabNode:
    """SIGKILL the node's agent (to see what a crash does)."""
    netns.require_privileges()
    n = open_lab(name, root).node(node)
    procs.kill(n.agent, signal.SIGKILL)
    return n


def agent_alive(n: LabNode) -> bool:
    return procs.alive(n.agent)
