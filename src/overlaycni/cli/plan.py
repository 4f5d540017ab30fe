"""``overlaycni plan``: validate a network and compare capacity per model."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ..config import check_network
from ..plan import Plan, make_plan, plan_json
from .common import Output, OutputOpt, console, err_console, print_json, with_network_flags

EPILOG = (
    "Example (the AKS overlay default): overlaycni plan --network-plugin azure "
    "--network-plugin-mode overlay --pod-cidr 10.244.0.0/16 --service-cidr 10.0.0.0/24 "
    "--dns-service-ip 10.0.0.10 --nodes 300"
)


@with_network_flags
def plan(
    nodes: Annotated[Optional[int], typer.Option("--nodes", min=1, help="Check whether this many nodes fit each model.")] = None,
    output: OutputOpt = Output.table,
    *,
    network: dict[str, Any],
) -> None:
    """Validate a cluster network like AKS does, then show how many nodes and
    pods overlay, flat Azure CNI and kubenet can run on the same VNet.

    Exit status: 0 valid, 2 invalid configuration.
    """
    net, errors, warnings = check_network(network)
    result = make_plan(net, nodes) if net else None
    if output is Output.json:
        print_json(plan_json(result, errors, warnings))
    else:
        for e in errors:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        for w in warnings:
            err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
        if result:
            render_plan(result)
    if errors:
        raise typer.Exit(2)


def render_plan(p: Plan) -> None:
    n = p.network
    console.print(
        f"VNet [bold]{n.vnet_cidr}[/], node subnet [bold]{n.node_subnet_cidr}[/], "
        f"pod CIDR [bold]{n.pod_cidr}[/] (/{n.node_cidr_size} per node), "
        f"service CIDR [bold]{n.service_cidr}[/], DNS [bold]{n.dns_service_ip}[/], max pods {n.max_pods}",
        highlight=False,
    )
    table = Table(title="Capacity on this VNet", title_justify="left")
    table.add_column("model")
    table.add_column("max nodes", justify="right")
    table.add_column("max pods", justify="right")
    table.add_column("VNet IPs / node", justify="right")
    table.add_column("limited by")
    if p.nodes is not None:
        table.add_column(f"{p.nodes} nodes fit?")
        table.add_column("VNet IPs needed", justify="right")
    names = {"overlay": "overlay (this)", "flat": "flat Azure CNI", "kubenet": "kubenet"}
    for m in p.models():
        row = [names[m.model], f"{m.max_nodes:,}", f"{m.max_pods:,}", f"{m.vnet_ips_per_node:,}", m.limited_by]
        if p.nodes is not None:
            row += ["[green]yes[/]" if m.fits else "[red]no[/]", f"{m.vnet_ips_needed:,}"]
        table.add_row(*row)
    console.print(table)
    console.print(f"[bold]Verdict:[/] {p.verdict()}", highlight=False)
