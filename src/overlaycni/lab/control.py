"""The lab's control plane and node daemons: etcd, the lab's own datastore
writes, the agent per node, and pod ADD/DEL through the real plugin.

Design note. The lab writes to its datastore in-process (``with_store``),
never by re-running its own CLI. With the sqlite store the datastore is a
file and the call runs right here. With ``--store etcd`` etcd listens on a
VNet address inside the lab's control namespace, which the root namespace
must never send a packet to: the call runs on a thread that has entered the
control namespace (``dataplane.linux.netns.NetnsWorker``, the one module
that enters namespaces), and the store is opened, used and closed on that
thread, so every socket it creates belongs to the control namespace (a
socket keeps the namespace it was created in). Rejected: opening the store
here and handing it to callers on other threads (an etcd client reconnects
lazily, from whichever thread makes the next call), and ``ip netns exec
overlaycni ...`` (a process and a hidden command per write).

What stays a process: the agents and etcd (daemons, ``procs.spawn``) and
the CNI plugin (a runtime runs it, ``runtime``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import TypeVar

from ..cidr import IPAddress
from ..config import ClusterNetwork
from ..datastore import Store, open_datastore
from ..errors import CNIError, DataplaneError, DatastoreUnavailable, UsageError
from . import etcdtls, netns, procs, runtime
from .state import LabNode, LabPod, LabState, Proc
from .topology import ETCD_CLIENT_PORT, ETCD_PEER_PORT

MAX_UNIX_PATH = 107
AGENT_READY_TIMEOUT = 90.0
RESYNC_INTERVAL = 5.0
SYSTEM_CNI_PATH = "/usr/lib/cni"
T = TypeVar("T")


def overlaycni_argv() -> list[str]:
    """How to run this very overlaycni (the venv's console script) as a daemon."""
    script = Path(sys.executable).parent / "overlaycni"
    if script.is_file():
        return [str(script)]
    found = shutil.which("overlaycni")
    return [found] if found else [sys.executable, "-m", "overlaycni.cli.main"]


# --- the lab's datastore, in-process ----------------------------------------------------------


def with_store(state: LabState, use: Callable[[Store], T]) -> T:
    """``use(store)`` with the lab's datastore open (a TLS etcd with the
    lab operator's certificate); closed afterwards.

    For an etcd lab everything (open, ``use``, close) runs on a thread
    inside the control namespace; errors are raised here."""
    credentials = etcdtls.credentials(state) if etcdtls.uses_tls(state) else None

    def job() -> T:
        with open_datastore(state.datastore, credentials=credentials) as store:
            return use(store)

    if state.store != "etcd":
        return job()
    if not state.control_netns:
        raise UsageError(f"lab {state.name}: the state file names no control namespace for its etcd")
    from ..dataplane.linux.netns import NetnsWorker

    worker = NetnsWorker(netns.lab_ns(state.control_netns))
    try:
        return worker.call(job)
    finally:
        worker.close()


def create_cluster(state: LabState, net: ClusterNetwork) -> None:
    """The lab's cluster network in its datastore (``cluster create``)."""
    from .. import ipam

    with_store(state, lambda store: ipam.create_cluster(store, state.name, net))


# --- etcd (the control plane) -------------------------------------------------------------


def start_etcd(state: LabState) -> Proc:
    assert state.control_netns and state.control_ip
    ip = state.control_ip.ip
    data_dir = Path(state.lab_dir) / "etcd"
    binary = shutil.which("etcd")
    if not binary:
        raise UsageError("--store etcd: the etcd binary is not installed (Debian package etcd-server)")
    tls = etcdtls.uses_tls(state)
    scheme = "https" if tls else "http"
    argv = [
        binary,
        "--name", f"ocl-{state.name}",
        "--data-dir", str(data_dir),
        "--listen-client-urls", f"{scheme}://{ip}:{ETCD_CLIENT_PORT}",
        "--advertise-client-urls", f"{scheme}://{ip}:{ETCD_CLIENT_PORT}",
        "--listen-peer-urls", f"{scheme}://{ip}:{ETCD_PEER_PORT}",
        "--initial-advertise-peer-urls", f"{scheme}://{ip}:{ETCD_PEER_PORT}",
        "--initial-cluster", f"ocl-{state.name}={scheme}://{ip}:{ETCD_PEER_PORT}",
        "--initial-cluster-state", "new",
        # TLS: etcd warns on every gateway request that it ignores the client
        # certificate's CN for auth (expected: see datastore/etcd.py)
        "--log-level", "error" if tls else "warn",
        *(etcdtls.etcd_flags(state) if tls else []),
    ]  # fmt: skip
    return procs.spawn(state.control_netns, argv, log=Path(state.lab_dir) / "etcd.log")


def wait_etcd(state: LabState, proc: Proc, *, timeout: float = 30.0) -> None:
    """Until the lab's etcd answers a read the way every lab command reaches
    it (``with_store``: from the control namespace, with the operator's
    certificate for a TLS etcd). A refused certificate fails at once."""

    def healthy() -> bool:
        if not procs.alive(proc):
            raise DatastoreUnavailable("etcd exited while starting", details=procs.tail(Path(state.lab_dir) / "etcd.log"))
        try:
            with_store(state, lambda store: store.revision())
        except DatastoreUnavailable:
            return False
        return True

    if not procs.wait_until(healthy, timeout=timeout, interval=0.2):
        raise DatastoreUnavailable(f"etcd in {state.control_netns} was not healthy within {timeout:.0f}s")


# --- agents -------------------------------------------------------------------------------


def node_dir(state: LabState, node: str) -> Path:
    return Path(state.lab_dir) / "nodes" / node


def cni_bin_dir(state: LabState) -> Path:
    return Path(state.lab_dir) / "cni" / "bin"


def check_socket_path(path: str) -> None:
    if len(path) > MAX_UNIX_PATH:
        raise UsageError(
            f"--lab-dir: the agent socket path {path} is {len(path)} bytes, over the unix socket limit of "
            f"{MAX_UNIX_PATH}; choose a shorter lab directory"
        )


def start_agent(state: LabState, node: LabNode) -> LabNode:
    """Start the node's agent inside its namespace (not waiting)."""
    d = node_dir(state, node.name)
    d.mkdir(parents=True, exist_ok=True)
    out = d / "agent.out"
    out.write_text("")  # a fresh ready line per start
    etcdtls.ensure_node(state, node.name)
    argv = [
        *overlaycni_argv(),
        "agent",
        *etcdtls.store_args(state, node.name),
        "--cluster", state.name,
        "--node", node.name,
        "--node-ip", str(node.ip.ip),
        "--socket", node.socket,
        "--metrics-addr", "127.0.0.1:0",
        "--lease-ttl", str(state.lease_ttl),
        "--resync-interval", str(RESYNC_INTERVAL),
    ]  # fmt: skip
    if node.ip_v6 is not None:  # dual-stack: the node's IPv6 address, as the lab gave it
        argv += ["--node-ip-v6", str(node.ip_v6.ip)]
    if state.backend == "wireguard":  # the key and wireguard-go's socket live in the node's dir
        argv += ["--wireguard-key", str(d / "wireguard.key"), "--wireguard-socket-dir", str(d)]
    proc = procs.spawn(node.netns, argv, log=d / "agent.log", out=out)
    return replace(node, agent=proc)


def wait_agent(state: LabState, node: LabNode, *, timeout: float = AGENT_READY_TIMEOUT) -> LabNode:
    """Wait for the agent's ready line; record its block."""
    assert node.agent is not None
    d = node_dir(state, node.name)
    ready = procs.wait_for_json_event(d / "agent.out", "ready", proc=node.agent, timeout=timeout, log=d / "agent.log")
    block, block_v6 = ready.get("block"), ready.get("block_v6")
    return replace(
        node,
        block=IPv4Network(block) if block else node.block,
        block_v6=IPv6Network(block_v6) if block_v6 else node.block_v6,
    )


# --- pods through the real plugin -----------------------------------------------------------


def _attachment(pod: LabPod, ips: tuple[IPAddress, ...] = ()) -> runtime.Attachment:
    return runtime.Attachment(
        container_id=pod.container_id,
        netns=runtime.netns_path(pod.netns),
        ifname="eth0",
        pod_namespace=pod.namespace,
        pod_name=pod.name,
        capability_args={"ips": [str(ip) for ip in ips]} if ips else {},
    )


def _cni_path(state: LabState) -> list[str]:
    return [str(cni_bin_dir(state)), SYSTEM_CNI_PATH]


def _result_file(state: LabState, pod: LabPod) -> Path:
    return Path(state.lab_dir) / "pods" / pod.namespace / f"{pod.name}.json"


def cni_add(state: LabState, node: LabNode, pod: LabPod, *, ips: tuple[IPAddress, ...] = ()) -> LabPod:
    """Create the pod's namespace and ADD it like a container runtime
    (``ips``: requested addresses, one per family, passed as ``runtimeConfig.ips``)."""
    netns.ensure_netns(pod.netns)
    conf = runtime.load_conflist(node.conf_dir)
    result = runtime.add(conf, _attachment(pod, ips), cni_path=_cni_path(state))
    f = _result_file(state, pod)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(result.raw))
    return replace(pod, ip=result.ip, ip_v6=result.ip_v6)


def cni_del(state: LabState, node: LabNode | None, pod: LabPod, *, best_effort: bool = False) -> None:
    """DEL the pod (while its namespace still exists), then delete the namespace."""
    f = _result_file(state, pod)
    try:
        if node is not None and os.path.isdir(node.conf_dir):
            prev = json.loads(f.read_text()) if f.is_file() else None
            conf = runtime.load_conflist(node.conf_dir)
            runtime.delete(conf, _attachment(pod), cni_path=_cni_path(state), prev_result=prev, best_effort=best_effort)
    except (CNIError, DataplaneError):
        if not best_effort:
            raise
    netns.delete_netns(pod.netns)
    f.unlink(missing_ok=True)
