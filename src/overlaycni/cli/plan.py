"""``overlaycni plan``: validate a network and compare capacity per model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import ConfigError, FieldError
from .common import Output, OutputOpt, console, err_console, print_error, print_json, print_warning, with_dual_stack_network_flags

if TYPE_CHECKING:
    from rich.console import Console

    from ..plan import Plan

EPILOG = (
    "Example (the AKS overlay default): overlaycni plan --network-plugin azure "
    "--network-plugin-mode overlay --pod-cidr 10.244.0.0/16 --service-cidr 10.0.0.0/24 "
    "--dns-service-ip 10.0.0.10 --nodes 300. "
    "Dual-stack with AKS's defaults: overlaycni plan --network-plugin azure --network-plugin-mode overlay "
    "--ip-families ipv4,ipv6"
)


@with_dual_stack_network_flags
def plan(
    nodes: Annotated[
        int | None, typer.Option("--nodes", min=1, help="Check whether this many nodes fit each model.")
    ] = None,
    underlay_mtu: Annotated[
        int, typer.Option("--underlay-mtu", min=576, max=65535, help="MTU of the node network, for the pod MTU shown.")
    ] = 1500,
    output: OutputOpt = Output.table,
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="YAML/JSON file of network settings (flag names as keys); flags override it."),
    ] = None,
    *,
    network: dict[str, Any],
) -> None:
    """Validate a cluster network like AKS does, then show how many nodes and
    pods overlay, flat Azure CNI and kubenet can run on the same VNet.

    Exit status: 0 valid, 2 invalid configuration or usage.
    """
    from ..config import check_network, load_file, merge_settings
    from ..plan import make_plan, plan_json

    try:
        settings = merge_settings(load_file(file) if file is not None else None, network)
    except ConfigError as exc:
        net, errors, warnings = None, exc.errors, exc.warnings
    else:
        net, errors, warnings = check_network(settings)
    result = make_plan(net, nodes, underlay_mtu=underlay_mtu) if net else None
    if output is Output.json:
        print_json(plan_json(result, errors, warnings, nodes=nodes))
    else:
        for e in errors:
            print_error(error_line(e), out=err_console)
        for w in warnings:
            print_warning(str(w), out=err_console)
        if result:
            render_plan(result)
    if errors:
        raise typer.Exit(2)


def error_line(e: FieldError) -> str:
    """The message, prefixed with the flag unless it already names it."""
    return e.message if e.message.startswith(f"--{e.field}") else str(e)


def render_plan(p: Plan, out: Console | None = None) -> None:
    """Print the capacity table and the verdict (fits in 100 columns)."""
    from rich.table import Table

    out = out or console
    n = p.network
    for f in n.families:
        out.print(
            f"{f.family.label + ': ' if n.is_dual_stack else ''}VNet {f.vnet_cidr}, node subnet {f.node_subnet_cidr}, "
            f"pod CIDR {f.pod_cidr} ({f.block_count:,} x /{f.node_cidr_size} blocks)",
            highlight=False,
        )
    services = " and ".join(str(f.service_cidr) for f in n.families)
    out.print(
        f"service CIDR{'s' if n.is_dual_stack else ''} {services}, DNS {n.dns_service_ip}, max pods {n.max_pods}, "
        f"plugin {n.network_plugin}{' ' + n.network_plugin_mode if n.network_plugin_mode else ''}",
        highlight=False,
    )
    table = Table(title="Capacity on the same VNet", title_justify="left")
    table.add_column("model")
    table.add_column("max nodes", justify="right")
    table.add_column("max pods", justify="right")
    table.add_column("VNet IPs/node", justify="right")
    table.add_column("limited by")
    if p.nodes is not None:
        table.add_column(f"{p.nodes:,} fit?")
        table.add_column("VNet IPs", justify="right")
    for m in p.models():
        row = [m.model, f"{m.max_nodes:,}", f"{m.max_pods:,}", f"{m.vnet_ips_per_node:,}", m.limited_by]
        if p.nodes is not None:
            row += ["[green]yes[/]" if m.fits else "[red]no[/]", f"{m.vnet_ips_needed:,}"]
        table.add_row(*row)
    out.print(table)
    if p.ipv6 is not None:
        v6 = p.ipv6.side
        out.print(
            f"IPv6: each node also owns a /{v6.node_cidr_size} of {v6.pod_cidr} (2^{128 - v6.node_cidr_size} addresses); "
            f"overlay: {p.ipv6.max_nodes:,} nodes x {n.pods_per_node} pods = {p.ipv6.max_pods:,} pods "
            "with an address of each family.",
            highlight=False,
        )
    flat_note = " (IPv4 only: AKS offers dual-stack with overlay and kubenet)" if n.is_dual_stack else ""
    out.print(f"flat: Azure CNI without overlay; every pod IP is a node subnet IP{flat_note}.", highlight=False)
    if p.data_plane is not None:
        d = p.data_plane
        how = "encrypted between node IPs" if d.encrypted else ("encapsulated" if d.overhead else "routed")
        out.print(
            f"data plane: {d.backend} ({how}), {d.overhead} bytes per packet ({d.parts}); "
            f"pod MTU {d.pod_mtu} on a {d.underlay_mtu}-byte underlay",
            highlight=False,
        )
    out.print(f"[bold]Verdict:[/] {p.verdict()}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("plan", epilog=EPILOG)(plan)
