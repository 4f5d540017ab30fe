"""``overlaycni agent`` (the node daemon, and ``agent status``) and ``install-cni``."""

from __future__ import annotations

import ipaddress
import json
import socket as socketlib
from enum import StrEnum
from typing import Annotated

import typer

from ..cni.install import Shim, install_cni
from ..errors import AgentUnavailable, UsageError
from .common import (
    Output,
    OutputOpt,
    console,
    datastore_url,
    etcd_credentials,
    print_json,
    warn_plain_etcd,
    with_datastore_options,
)

agent_app = typer.Typer(
    help="The node agent: joins this node to the overlay, keeps peers programmed, serves the CNI plugin.",
    invoke_without_command=True,
    no_args_is_help=False,
)

DEFAULT_SOCKET = "/run/overlaycni/agent.sock"


class WireGuardMode(StrEnum):
    auto = "auto"
    kernel = "kernel"
    userspace = "userspace"


SocketOpt = Annotated[str, typer.Option("--socket", help="Unix socket the plugin talks to (mode 0600).")]


@agent_app.callback()
@with_datastore_options
def agent(
    ctx: typer.Context,
    cluster: Annotated[str | None, typer.Option("--cluster", help="Cluster name (created with `cluster create`).")] = None,
    node: Annotated[str | None, typer.Option("--node", help="This node's name (re-claims its block on restart).")] = None,
    node_ip: Annotated[str | None, typer.Option("--node-ip", help="This node's underlay (VNet) IP.")] = None,
    node_ip_v6: Annotated[str | None, typer.Option(
        "--node-ip-v6", help="Dual-stack: this node's IPv6 underlay address (default: the address in the cluster's "
        "IPv6 node subnet on the device holding --node-ip).")] = None,
    socket: SocketOpt = DEFAULT_SOCKET,
    metrics_addr: Annotated[
        str, typer.Option("--metrics-addr", help="host:port for /metrics and /healthz ('' to disable; port 0 picks one).")
    ] = "127.0.0.1:9161",
    lease_ttl: Annotated[int, typer.Option("--lease-ttl", min=2, max=3600, help="Seconds before peers drop a silent node.")] = 15,
    resync_interval: Annotated[float, typer.Option("--resync-interval", min=0.5, help="Seconds between full reconciles.")] = 30.0,
    wireguard_key: Annotated[
        str, typer.Option("--wireguard-key", help="Backend wireguard: this node's private key file (generated 0600 if missing).")
    ] = "/var/lib/overlaycni/wireguard.key",
    wireguard_socket_dir: Annotated[
        str, typer.Option("--wireguard-socket-dir", help="Backend wireguard: wireguard-go's UAPI socket dir (one per node).")
    ] = "/var/run/wireguard",
    wireguard_mode: Annotated[
        WireGuardMode,
        typer.Option("--wireguard-mode", help="Backend wireguard: kernel (module), userspace (wireguard-go), or auto."),
    ] = WireGuardMode.auto,
    reap_interval: Annotated[float, typer.Option(
        "--reap-interval", min=0,
        help="Seconds between leak-reaper passes, which release addresses whose pod veth is gone (0: off); "
        "it also passes at start, and early when a noted address's grace ends first.")] = 120.0,
    reap_grace: Annotated[float, typer.Option(
        "--reap-grace", min=0, help="Seconds a pod's veth must stay gone before the reaper releases its address.")] = 60.0,
    flow_logs: Annotated[
        bool, typer.Option("--flow-logs/--no-flow-logs", help="Log each new flow the NetworkPolicy table decides (GET /flows).")
    ] = True,
    flow_log_buffer: Annotated[
        int, typer.Option("--flow-log-buffer", min=1, max=10_000_000, help="Flow records kept in memory (oldest dropped first).")
    ] = 10_000,
    flow_log_rate: Annotated[
        int, typer.Option("--flow-log-rate", min=1, max=1_000_000, help="New flows logged per second per source address (burst: twice that).")
    ] = 100,
    flow_log_cap: Annotated[
        int, typer.Option("--flow-log-cap", min=1, max=1_000_000, help="New flows logged per second on this node, all sources together.")
    ] = 1000,
    flow_log_group: Annotated[
        int, typer.Option("--flow-log-group", min=0, max=65535, help="NFLOG group the policy table logs to (one per namespace).")
    ] = 161,
) -> None:
    """Run the node agent in the foreground (for systemd or a DaemonSet).

    Example: overlaycni agent --datastore etcds://10.224.0.4:2379 --etcd-ca /etc/overlaycni/pki/ca.crt
    --etcd-cert /etc/overlaycni/pki/node-1.crt --etcd-key /etc/overlaycni/pki/node-1.key
    --cluster prod --node node-1 --node-ip 10.224.0.5

    The client certificate and key are re-read when their files change (no restart).
    Flow logs (on by default): GET /flows on --metrics-addr, or `overlaycni flows --agent URL`.
    """
    if ctx.invoked_subcommand is not None:
        return
    missing = [f for f, v in (("--cluster", cluster), ("--node", node), ("--node-ip", node_ip)) if not v]
    if missing:
        raise UsageError(f"agent needs {', '.join(missing)} (see overlaycni agent --help)")
    try:
        ip = ipaddress.IPv4Address(node_ip)
    except ValueError:
        raise UsageError(f"{node_ip!r} is not an IPv4 address", field="node-ip") from None
    try:
        ip6 = ipaddress.IPv6Address(node_ip_v6) if node_ip_v6 else None
    except ValueError:
        raise UsageError(f"{node_ip_v6!r} is not an IPv6 address", field="node-ip-v6") from None
    from ..agent.daemon import AgentOptions, run_agent  # heavy (pyroute2): only when running
    from ..agent.flowlog import FlowLogOptions
    from ..policy.flowlog import FlowLogSpec

    warn_plain_etcd(datastore_url(ctx))
    opts = AgentOptions(
        cluster=cluster,  # type: ignore[arg-type]
        node=node,  # type: ignore[arg-type]
        node_ip=ip,
        node_ip_v6=ip6,
        datastore=datastore_url(ctx),
        etcd=etcd_credentials(ctx),
        socket=socket,
        metrics_addr=metrics_addr or None,
        lease_ttl=lease_ttl,
        resync_interval=resync_interval,
        wireguard_key=wireguard_key,
        wireguard_socket_dir=wireguard_socket_dir,
        wireguard_mode=wireguard_mode.value,
        reap_interval=reap_interval,
        reap_grace=reap_grace,
        flow_log=FlowLogOptions(
            FlowLogSpec(group=flow_log_group, rate=flow_log_rate, burst=2 * flow_log_rate, cap=flow_log_cap),
            buffer=flow_log_buffer,
        ) if flow_logs else None,
    )  # fmt: skip
    raise typer.Exit(run_agent(opts))


def query_agent(path: str, timeout: float = 3.0) -> dict:
    s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps({"command": "AGENT_STATUS", "config": {}}).encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    except OSError as exc:
        raise AgentUnavailable(f"no agent answers at {path}", details=str(exc.strerror or exc)) from None
    finally:
        s.close()
    answer = json.loads(data or b"{}")
    if "result" not in answer:
        raise AgentUnavailable(f"agent at {path} did not report status: {answer}")
    return answer["result"]


@agent_app.command("status")
def status(socket: SocketOpt = DEFAULT_SOCKET, output: OutputOpt = Output.table) -> None:
    """Print the health of the agent behind --socket (exit 1 if not ready)."""
    health = query_agent(socket)
    if output is Output.json:
        print_json(health)
    else:
        for k, v in health.items():
            console.print(f"[bold]{k:16}[/] {v}", highlight=False)
    if not health.get("ready"):
        raise typer.Exit(1)


def install_cni_cmd(
    cluster: Annotated[str, typer.Option("--cluster", help="Cluster name the plugin serves.")],
    bin_dir: Annotated[str, typer.Option("--bin-dir", help="CNI binary dir (e.g. /opt/cni/bin).")] = "/opt/cni/bin",
    conf_dir: Annotated[str, typer.Option("--conf-dir", help="CNI config dir (e.g. /etc/cni/net.d).")] = "/etc/cni/net.d",
    socket: SocketOpt = DEFAULT_SOCKET,
    cni_version: Annotated[str, typer.Option("--cni-version", help="cniVersion of the conflist.")] = "1.0.0",
    chain: Annotated[
        str, typer.Option("--chain", help="Comma-separated reference plugins chained after ours: portmap,tuning,bandwidth.")
    ] = "",
    shim: Annotated[
        Shim,
        typer.Option(
            "--shim",
            help="Which build of the plugin to install. native: build/overlaycni-shim, compiled from cni/shim.c by"
            " `make` (starts in ~1 ms); python: cni/shim.py run by python3 -IS (starts in 6-9 ms, the floor of a pod"
            " ADD); auto: native when it is built, up to date and built for this machine, else python (the output"
            " says which, and why).",
        ),
    ] = Shim.auto,
    output: OutputOpt = Output.table,
) -> None:
    """Install the plugin executable and 10-overlaycni.conflist for the container runtime.

    Both builds of the plugin behave alike (same checks, codes and messages);
    the native one only starts faster.

    Example: overlaycni install-cni --cluster prod --chain portmap,bandwidth
    """
    result = install_cni(
        cluster=cluster,
        bin_dir=bin_dir,
        conf_dir=conf_dir,
        socket=socket,
        cni_version=cni_version,
        chain=tuple(c.strip() for c in chain.split(",") if c.strip()),
        shim=shim,
    )
    if output is Output.json:
        print_json(
            {"plugin": str(result.plugin), "conflist": str(result.conflist), "config": result.config,
             "shim": str(result.shim), "shim_reason": result.shim_reason}
        )  # fmt: skip
    else:
        console.print(
            f"installed plugin [bold]{result.plugin}[/] ({result.shim} shim: {result.shim_reason}) and config [bold]{result.conflist}[/]",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.add_typer(agent_app, name="agent")
    app.command("install-cni")(install_cni_cmd)
