"""The lab's control plane and node daemons: etcd, ``cluster create``, the
agent per node, ``install-cni``, and pod ADD/DEL through the real plugin.

Every ``overlaycni`` command that talks to an in-lab etcd runs inside a lab
namespace (the control-plane one), never in the root namespace. With the
sqlite store the datastore is a file; commands then need no network.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from ..errors import CNIError, DataplaneError, DatastoreUnavailable, OverlayCNIError, UsageError
from . import etcdtls, netns, procs, runtime
from .state import LabState, NodeState, PodState, Proc
from .topology import ETCD_CLIENT_PORT, ETCD_PEER_PORT

MAX_UNIX_PATH = 107
AGENT_READY_TIMEOUT = 90.0
RESYNC_INTERVAL = 5.0
SYSTEM_CNI_PATH = "/usr/lib/cni"


def overlaycni_argv() -> list[str]:
    """How to run this very overlaycni (the venv's console script)."""
    script = Path(sys.executable).parent / "overlaycni"
    if script.is_file():
        return [str(script)]
    found = shutil.which("overlaycni")
    return [found] if found else [sys.executable, "-m", "overlaycni.cli.main"]


def cli(state: LabState, args: list[str], *, timeout: float = 60) -> str:
    """Run ``overlaycni --datastore <lab store> ARGS``; inside the control
    namespace when the store is the in-lab etcd. Returns stdout."""
    argv = [*overlaycni_argv(), *etcdtls.store_args(state), *args]
    if state.store == "etcd":
        assert state.control_netns
        argv = netns.in_ns(state.control_netns, argv)
    proc = netns.run(argv, check=False, timeout=timeout)
    if proc.returncode != 0:
        raise OverlayCNIError(
            f"overlaycni {' '.join(args[:2])} failed (exit {proc.returncode})",
            details=(proc.stderr.strip() or proc.stdout.strip())[-2000:],
        )
    return proc.stdout


def cluster_flags(network: dict[str, Any]) -> list[str]:
    """The flags the user gave (validated like ``plan``) as CLI arguments."""
    out: list[str] = []
    for key, value in network.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out += [f"--{key}", str(value)]
    return out


def create_cluster(state: LabState, given: dict[str, Any]) -> None:
    cli(state, ["cluster", "create", "--name", state.name, *cluster_flags(given)])


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
    assert state.control_netns and state.control_ip
    if etcdtls.uses_tls(state):
        c = etcdtls.credentials(state)
        endpoint = f"https://{state.control_ip.ip}:{ETCD_CLIENT_PORT}/health"
        code = (
            f"import ssl,urllib.request;ctx=ssl.create_default_context(cafile={c.ca!r});"
            f"ctx.load_cert_chain({c.cert!r},{c.key!r});urllib.request.urlopen({endpoint!r},timeout=1,context=ctx).read()"
        )
    else:
        endpoint = f"http://{state.control_ip.ip}:{ETCD_CLIENT_PORT}/health"
        code = f"import urllib.request;urllib.request.urlopen({endpoint!r}, timeout=1).read()"
    probe = [sys.executable, "-c", code]

    def healthy() -> bool:
        if not procs.alive(proc):
            raise DatastoreUnavailable("etcd exited while starting", details=procs.tail(Path(state.lab_dir) / "etcd.log"))
        return netns.ns_run(state.control_netns, probe, check=False, timeout=10).returncode == 0  # type: ignore[arg-type]

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


def start_agent(state: LabState, node: NodeState) -> NodeState:
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
    if state.backend == "wireguard":  # the key and wireguard-go's socket live in the node's dir
        argv += ["--wireguard-key", str(d / "wireguard.key"), "--wireguard-socket-dir", str(d)]
    proc = procs.spawn(node.netns, argv, log=d / "agent.log", out=out)
    return replace(node, agent=proc)


def wait_agent(state: LabState, node: NodeState, *, timeout: float = AGENT_READY_TIMEOUT) -> NodeState:
    """Wait for the agent's ready line; record its block."""
    assert node.agent is not None
    d = node_dir(state, node.name)
    ready = procs.wait_for_json_event(d / "agent.out", "ready", proc=node.agent, timeout=timeout, log=d / "agent.log")
    block = ready.get("block")
    return replace(node, block=IPv4Network(block) if block else node.block)


def install_cni(state: LabState, node: NodeState) -> None:
    argv = [
        *overlaycni_argv(),
        "install-cni",
        "--cluster", state.name,
        "--bin-dir", str(cni_bin_dir(state)),
        "--conf-dir", node.conf_dir,
        "--socket", node.socket,
    ]  # fmt: skip
    netns.run(argv)


# --- pods through the real plugin -----------------------------------------------------------


def _attachment(pod: PodState, ip: IPv4Address | None = None) -> runtime.Attachment:
    return runtime.Attachment(
        container_id=pod.container_id,
        netns=runtime.netns_path(pod.netns),
        ifname="eth0",
        pod_namespace=pod.namespace,
        pod_name=pod.name,
        capability_args={"ips": [str(ip)]} if ip is not None else {},
    )


def _cni_path(state: LabState) -> list[str]:
    return [str(cni_bin_dir(state)), SYSTEM_CNI_PATH]


def _result_file(state: LabState, pod: PodState) -> Path:
    return Path(state.lab_dir) / "pods" / f"{pod.name}.json"


def cni_add(state: LabState, node: NodeState, pod: PodState, *, ip: IPv4Address | None = None) -> PodState:
    """Create the pod's namespace and ADD it like a container runtime
    (``ip``: a requested address, passed as ``runtimeConfig.ips``)."""
    netns.ensure_netns(pod.netns)
    conf = runtime.load_conflist(node.conf_dir)
    result = runtime.add(conf, _attachment(pod, ip), cni_path=_cni_path(state))
    f = _result_file(state, pod)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(result.raw))
    return replace(pod, ip=result.ip)


def cni_del(state: LabState, node: NodeState | None, pod: PodState, *, best_effort: bool = False) -> None:
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
