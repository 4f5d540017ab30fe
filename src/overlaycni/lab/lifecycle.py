"""``lab up`` and ``lab down``.

Up, in order: validate everything (name, network like ``plan``, capacity,
privileges) before touching the kernel -> lab dir + state file -> VNet
bridge -> external host -> control plane (etcd, with ``--store etcd``) ->
the cluster network (in-process, ``control.create_cluster``) -> per node:
namespace, underlay veth, node IP (and IPv6 address: ``--ip-families
ipv4,ipv6``), the plugin's files, agent (all agents
start at once, then we wait for each ready line) -> pods through the real
plugin (a small thread pool). The state file is saved after every step,
and any failure runs ``down``: a failed ``up`` leaves nothing behind.

Down: refuse at once, deleting nothing, when the lab's directory exists
but is not a lab (no marker, a symbolic link, not ours: ``state.open_lab_dir``).
Then stop the processes the state file names (only where pid, start time
and lab namespace all match: ``procs``), then for every namespace of the lab
(from the state file *and* by the lab's unique prefix ``ocl-<lab>.``, so a
lost state file is no obstacle) kill what still runs in it and delete it;
pods first, the VNet last; finally remove the marked lab dir. Safe to
repeat.

``up`` over an existing directory of the lab's name: a lab's (marked)
leftovers without state file or namespaces are removed; a directory that is
not a lab is an error and is left as it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from ..cidr import IPAddress
from ..config import ClusterNetwork, parse_network
from ..errors import AlreadyExists, UsageError
from . import control, etcdtls, netns, procs, topology
from . import state as st
from .state import LabNode, LabPod, LabState

Reporter = Callable[[str, int, int], None]  # (phase, done, total)
STORES = ("sqlite", "etcd")
DEFAULT_LEASE_TTL = 6
POD_WORKERS = 4


def _quiet(phase: str, done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class UpRequest:
    name: str = "demo"
    nodes: int = 3
    pods_per_node: int = 2
    store: str = "sqlite"
    network: dict[str, Any] = field(default_factory=dict)  # the AKS flags the user gave
    lease_ttl: int = DEFAULT_LEASE_TTL
    root: str | None = None
    etcd_tls: bool = True  # --store etcd: HTTPS only, client certificates (lab/etcdtls.py)


def validate(req: UpRequest) -> ClusterNetwork:
    """Every check that needs no kernel; raises ConfigError / UsageError."""
    topology.validate_lab_name(req.name)
    net = parse_network(req.network)
    if req.store not in STORES:
        raise UsageError(f"{req.store!r} is not one of: {', '.join(STORES)}", field="store")
    if not 2 <= req.lease_ttl <= 3600:
        raise UsageError(f"{req.lease_ttl} is out of range (allowed 2..3600)", field="lease-ttl")
    topology.check_capacity(net, nodes=req.nodes, pods_per_node=req.pods_per_node)
    longest = topology.node_name(req.nodes + 99)
    control.check_socket_path(str(st.lab_dir(req.name, req.root) / "nodes" / longest / "agent.sock"))
    if net.backend == "wireguard":  # wireguard-go's UAPI socket sits next to it
        control.check_socket_path(str(st.lab_dir(req.name, req.root) / "nodes" / longest / "ocni.wg.sock"))
    return net


def up(req: UpRequest, *, report: Reporter = _quiet) -> LabState:
    net = validate(req)
    netns.require_privileges()
    d = st.lab_dir(req.name, req.root)
    exists = AlreadyExists(
        f"lab {req.name!r} already exists",
        details=f"see `overlaycni lab status --name {req.name}`, or remove it with `overlaycni lab down --name {req.name}`",
    )
    if netns.list_netns(topology.netns_prefix(req.name)):
        raise exists
    if os.path.lexists(d):
        with st.open_lab_dir(d) as dfd:  # UsageError (nothing deleted) unless it is a lab directory
            if _has(dfd, st.STATE_FILE):
                raise exists
        st.remove_lab_dir(d)  # a lab's leftovers without a state file or namespaces: nothing running uses them
    addr = topology.addressing(net)
    lab = req.name
    state = LabState(
        name=lab,
        lab_dir=str(d),
        backend=net.backend,
        store=req.store,
        datastore=topology.datastore_url(req.store, lab_dir=str(d), control_ip=addr.control_ip.ip, tls=req.etcd_tls),
        network=net.to_dict(),
        vnet_netns=topology.vnet_netns(lab),
        external_netns=topology.ext_netns(lab),
        external_ip=addr.external_ip,
        external_ip_v6=addr.v6_of(addr.external_ip),
        control_netns=topology.ctl_netns(lab) if req.store == "etcd" else None,
        control_ip=addr.control_ip if req.store == "etcd" else None,
        lease_ttl=req.lease_ttl,
    )
    try:
        st.create_lab_dir(req.name, req.root)
    except FileExistsError:  # made by someone else since the check above: not ours to touch
        raise UsageError(f"{d} appeared while the lab was being made; nothing was changed", field="--lab-dir") from None
    try:
        state = _build(state, req, net, report)
    except BaseException:
        down(lab, root=req.root)
        raise
    return state


def _build(state: LabState, req: UpRequest, net: ClusterNetwork, report: Reporter) -> LabState:
    steps = 3 + (1 if req.store == "etcd" else 0)
    report("vnet", 0, steps)
    state = state.with_namespace(state.vnet_netns)
    st.save(state)
    netns.setup_vnet(state.vnet_netns)
    report("vnet", 1, steps)
    state = state.with_namespace(state.external_netns)
    st.save(state)
    netns.setup_vm(state.vnet_netns, state.external_netns, port=topology.EXT_PORT, address=state.external_ip, forwarding=False,
                   address_v6=state.external_ip_v6)  # fmt: skip
    report("vnet", 2, steps)
    if req.store == "etcd":
        ctl_netns, ctl_ip = state.control_netns, state.control_ip
        assert ctl_netns and ctl_ip
        state = state.with_namespace(ctl_netns)
        st.save(state)
        netns.setup_vm(state.vnet_netns, ctl_netns, port=topology.CTL_PORT, address=ctl_ip, forwarding=False)
        if etcdtls.uses_tls(state):
            etcdtls.setup(state, [topology.node_name(i) for i in range(1, req.nodes + 1)])
        etcd = control.start_etcd(state)
        state = replace(state, etcd=etcd)
        st.save(state)
        control.wait_etcd(state, etcd)
        report("vnet", 3, steps)
    control.create_cluster(state, net)
    report("vnet", steps, steps)

    names = [(i, topology.node_name(i)) for i in range(1, req.nodes + 1)]
    report("nodes", 0, len(names))
    for i, name in names:
        node = new_node(state, i, name)
        state = state.with_namespace(node.netns).with_node(node)
        st.save(state)
        setup_node(state, node)
        node = control.start_agent(state, node)
        state = state.with_node(node)
        st.save(state)
    for k, (_, name) in enumerate(names, 1):
        state = state.with_node(control.wait_agent(state, state.node(name)))
        st.save(state)
        report("nodes", k, len(names))

    wanted = topology.default_pods(names, req.pods_per_node)
    state = add_pods(state, [new_pod(state, p, namespace="default", node=n) for p, n in wanted], report=report)
    return state


def new_node(state: LabState, index: int, name: str) -> LabNode:
    net = parse_network(state.network)
    d = control.node_dir(state, name)
    socket = str(d / "agent.sock")
    control.check_socket_path(socket)
    addr = topology.addressing(net)
    ip = addr.node_ip(index)
    return LabNode(
        name=name,
        index=index,
        netns=topology.node_netns(state.name, name),
        ip=ip,
        ip_v6=addr.v6_of(ip),
        socket=socket,
        conf_dir=str(d / "net.d"),
    )


def setup_node(state: LabState, node: LabNode) -> None:
    """The node VM: namespace, underlay on the VNet, the plugin's files."""
    from ..cni.install import install_cni

    netns.setup_vm(state.vnet_netns, node.netns, port=topology.node_port(node.name), address=node.ip, forwarding=True,
                   address_v6=node.ip_v6)  # fmt: skip
    control.node_dir(state, node.name).mkdir(parents=True, exist_ok=True)
    install_cni(cluster=state.name, bin_dir=str(control.cni_bin_dir(state)), conf_dir=node.conf_dir, socket=node.socket)


def new_pod(state: LabState, name: str, *, namespace: str, node: str, labels: tuple[tuple[str, str], ...] = ()) -> LabPod:
    """A pod not yet added: its netns and container ID derive from (lab, namespace, name)."""
    return LabPod(
        name=name,
        namespace=namespace,
        node=node,
        netns=topology.pod_netns(state.name, namespace, name),
        container_id=topology.container_id(state.name, namespace, name),
        labels=labels,
    )


def add_pods(
    state: LabState,
    pods: list[LabPod],
    *,
    report: Reporter = _quiet,
    ips: dict[str, tuple[IPAddress, ...]] | None = None,
) -> LabState:
    """ADD ``pods`` in parallel; save each. ``ips``: requested addresses
    by pod key (NAMESPACE/NAME), passed with the CNI ``ips`` capability."""
    for p in pods:
        state = state.with_namespace(p.netns).with_pod(p)
    st.save(state)
    report("pods", 0, len(pods))
    done = 0
    with ThreadPoolExecutor(max_workers=POD_WORKERS) as pool:
        futures = [pool.submit(control.cni_add, state, state.node(p.node), p, ips=(ips or {}).get(p.key, ())) for p in pods]
        try:
            for fut in futures:
                state = state.with_pod(fut.result())
                done += 1
                report("pods", done, len(pods))
        finally:
            for fut in futures:
                fut.cancel()
            st.save(state)
    return state


@dataclass(frozen=True)
class DownReport:
    name: str
    stopped: tuple[int, ...]
    namespaces: tuple[str, ...]
    removed_dir: str | None

    @property
    def found_anything(self) -> bool:
        return bool(self.stopped or self.namespaces or self.removed_dir)


def _ns_order(lab: str, names: set[str]) -> list[str]:
    prefix = topology.netns_prefix(lab)
    last = [topology.ext_netns(lab), topology.ctl_netns(lab), topology.vnet_netns(lab)]
    pods = sorted(n for n in names if n.startswith(prefix + "pod."))
    others = sorted(n for n in names if n not in pods and n not in last)
    return pods + others + [n for n in last if n in names]


def down(name: str, *, root: str | None = None) -> DownReport:
    """Take lab ``name`` down. A directory of that name that is not a lab
    (a symbolic link, not ours, no marker) is refused before anything is
    touched: ``UsageError`` saying why, nothing deleted."""
    topology.validate_lab_name(name)
    netns.require_privileges()
    d = st.lab_dir(name, root)
    if os.path.lexists(d):
        with st.open_lab_dir(d):
            pass  # refuses (UsageError) anything but this lab's own directory
    state = st.try_load(name, root)
    stopped: list[int] = []
    if state is not None:
        for proc in [n.agent for n in state.nodes] + [state.etcd]:
            if proc is not None and procs.stop(proc):  # only if pid, start time and lab namespace all match
                stopped.append(proc.pid)
    prefix = topology.netns_prefix(name)
    found = set(netns.list_netns(prefix))
    if state is not None:
        found |= {n for n in state.namespaces if n.startswith(prefix) and netns.netns_exists(n)}
    ordered = _ns_order(name, found)
    for ns in ordered:  # strays: an agent from a lost state file, a `lab exec` left running
        stopped += procs.kill_strays(ns)
    for ns in ordered:
        netns.delete_netns(ns)
    removed = str(d) if st.remove_lab_dir(d) else None
    return DownReport(name=name, stopped=tuple(stopped), namespaces=tuple(ordered), removed_dir=removed)


def _has(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def labs(root: str | None = None) -> list[tuple[str, LabState | None]]:
    """Every lab with a state file, plus labs known only by namespaces."""
    names = set(st.list_labs(root))
    for ns in netns.list_netns(topology.NETNS_PREFIX):
        lab = ns[len(topology.NETNS_PREFIX) :].split(".", 1)[0]
        names.add(lab)
    return [(n, st.try_load(n, root)) for n in sorted(names)]
