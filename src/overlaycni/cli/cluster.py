"""``overlaycni cluster ...`` and ``overlaycni node ...``: cluster networks and
node blocks in the datastore."""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import ConfigError, FieldError
from .common import (
    ClusterNameOpt,
    ClusterOpt,
    Output,
    OutputOpt,
    SkippedRecords,
    console,
    open_store,
    print_json,
    print_warning,
    with_dual_stack_network_flags,
)

if TYPE_CHECKING:
    from ..config import ClusterNetwork

cluster_app = typer.Typer(
    help="Cluster networks in the datastore. Example: overlaycni --datastore sqlite:///tmp/s.db "
    "cluster create --name dev --network-plugin azure --network-plugin-mode overlay",
    no_args_is_help=True,
)
node_app = typer.Typer(
    help="Nodes and their pod CIDR blocks. Example: overlaycni node register --cluster dev --name n1 --node-ip 10.224.0.4",
    no_args_is_help=True,
)

NodeNameOpt = Annotated[str, typer.Option("--name", help="Node name; re-registering it returns its block.")]


def _network_json(name: str, net: ClusterNetwork) -> dict[str, Any]:
    # ip-families is in a dual-stack record; a single-stack record keeps its old keys
    return {"name": name, "ip-families": [str(f) for f in net.ip_families], **net.to_dict()}


def _emit_network(name: str, net: Any, output: Output) -> None:
    if output is Output.json:
        print_json(_network_json(name, net))
    else:
        _render_network(name, net)


def _render_network(name: str, net: ClusterNetwork) -> None:
    from rich.table import Table

    table = Table(title=f"cluster {name}", show_header=False)
    for key, value in _network_json(name, net).items():
        if key != "name":
            table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    blocks = " and ".join(f"{f.block_count:,} x /{f.node_cidr_size}" for f in net.families)
    table.add_row("blocks", f"{blocks} (max nodes {net.max_nodes:,})")
    console.print(table)


@cluster_app.command(
    "create",
    epilog="Example: overlaycni cluster create --name dev --network-plugin azure --network-plugin-mode overlay "
    "--pod-cidr 10.244.0.0/16 --node-cidr-size 24",
)
@with_dual_stack_network_flags
def cluster_create(
    ctx: typer.Context,
    name: ClusterNameOpt,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="YAML/JSON file of network settings; flags override it.")
    ] = None,
    output: OutputOpt = Output.table,
    *,
    network: dict[str, Any],
) -> None:
    """Create a cluster network (validated like AKS).

    Creating it again with the same settings is a no-op; with different settings it is an error."""
    from .. import ipam
    from ..config import load_file, merge_settings, parse_network

    net = parse_network(merge_settings(load_file(file) if file is not None else None, network))
    for w in net.warnings:
        print_warning(str(w))
    with open_store(ctx) as store:
        net = ipam.create_cluster(store, name, net)
    _emit_network(name, net, output)


@cluster_app.command("show", epilog="Example: overlaycni cluster show --name dev -o json")
def cluster_show(ctx: typer.Context, name: ClusterNameOpt, output: OutputOpt = Output.table) -> None:
    """Show a cluster's network settings."""
    from .. import ipam

    with open_store(ctx) as store:
        net = ipam.get_cluster(store, name)
    _emit_network(name, net, output)


@cluster_app.command("list", epilog="Example: overlaycni --datastore etcd://127.0.0.1:2379 cluster list")
def cluster_list(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """List the clusters in the datastore."""
    from rich.table import Table

    from .. import ipam

    with open_store(ctx) as store:
        clusters = ipam.list_clusters(store)
    if output is Output.json:
        print_json([_network_json(n, net) for n, net in clusters])
        return
    table = Table("name", "plugin", "pod CIDR", "block", "service CIDR", "backend")
    for n, net in clusters:
        plugin = net.network_plugin + (f"/{net.network_plugin_mode}" if net.network_plugin_mode else "")
        fams = net.families
        table.add_row(
            n,
            plugin,
            ", ".join(str(f.pod_cidr) for f in fams),
            ", ".join(f"/{f.node_cidr_size}" for f in fams),
            ", ".join(str(f.service_cidr) for f in fams),
            net.backend,
        )
    console.print(table)


@cluster_app.command("delete", epilog="Example: overlaycni cluster delete --name dev")
def cluster_delete(ctx: typer.Context, name: ClusterNameOpt, output: OutputOpt = Output.table) -> None:
    """Delete a cluster and all its nodes, blocks and addresses (not-found is success)."""
    from .. import ipam

    with open_store(ctx) as store:
        ipam.delete_cluster(store, name)
    if output is Output.json:
        print_json({"name": name, "deleted": True})
    else:
        console.print(f"cluster {name} deleted", highlight=False)


@cluster_app.command(
    "expand-pod-cidr", epilog="Example: overlaycni cluster expand-pod-cidr --name dev --pod-cidr 10.244.0.0/15"
)
def cluster_expand(
    ctx: typer.Context,
    name: ClusterNameOpt,
    pod_cidr: Annotated[str, typer.Option("--pod-cidr", help="The new pod CIDR: a contiguous superset of the current one.")],
    output: OutputOpt = Output.table,
) -> None:
    """Grow the pod CIDR to a range that contains it; every existing block keeps its place."""
    from .. import ipam

    with open_store(ctx) as store:
        net = ipam.expand_pod_cidr(store, name, pod_cidr)
    _emit_network(name, net, output)


# ----- nodes ---------------------------------------------------------------------------


@node_app.command(
    "register", epilog="Example: overlaycni node register --cluster dev --name node-1 --node-ip 10.224.0.4 -o json"
)
def node_register(
    ctx: typer.Context,
    cluster: ClusterOpt,
    name: NodeNameOpt,
    node_ip: Annotated[str, typer.Option("--node-ip", help="The node's underlay (VNet) IP.")],
    vtep_mac: Annotated[str | None, typer.Option("--vtep-mac", help="VXLAN device MAC (the agent sets it).")] = None,
    node_ip_v6: Annotated[str | None, typer.Option(
        "--node-ip-v6", help="Dual-stack: the node's IPv6 underlay address (the agent finds or takes it).")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Claim a pod CIDR block for a node (the same block again for a known name).

    Refused when another live node holds --node-ip, or the name is live on another node IP."""
    from .. import ipam
    from ..ipam.model import parse_ip

    ip: IPv4Address = parse_ip("node-ip", node_ip)
    try:
        ip6 = IPv6Address(node_ip_v6) if node_ip_v6 else None
    except ValueError:
        raise ConfigError(FieldError("node-ip-v6", f"{node_ip_v6!r} is not a valid IPv6 address")) from None
    with open_store(ctx) as store:
        rec = ipam.register_node(store, cluster, name, ip, vtep_mac=vtep_mac, node_ip_v6=ip6)
    if output is Output.json:
        out = {"name": rec.name, "node_ip": str(rec.node_ip), "block": str(rec.block),
               "block_v6": str(rec.block_v6) if rec.block_v6 else None}  # fmt: skip
        if rec.node_ip_v6 is not None:  # dual-stack, given: its IPv6 underlay address too
            out["node_ip_v6"] = str(rec.node_ip_v6)
        print_json(out)
    else:
        console.print(f"node {rec.name} ({rec.node_ip}): block {' and '.join(map(str, rec.blocks))}", highlight=False)


@node_app.command("list", epilog="Example: overlaycni node list --cluster dev -o json")
def node_list(ctx: typer.Context, cluster: ClusterOpt, output: OutputOpt = Output.table) -> None:
    """List the nodes of a cluster with their blocks, and whether each is live.

    A node is live while its agent holds its lease. A node that is not live
    keeps its block and its peers keep its routes (its pods may still be
    running); `node delete` removes it.

    A record that does not decode is skipped with a warning on stderr (the
    agents skip it too); `ipam check` lists every such record. With -o json
    the list of nodes on stdout keeps its shape."""
    from rich.table import Table

    from .. import ipam

    skipped = SkippedRecords()
    with open_store(ctx) as store:
        view = ipam.cluster_nodes(store, cluster, on_bad=skipped)
    skipped.warn()
    if output is Output.json:
        print_json([{**n.to_dict(), "live": n.name in view.live} for n in view.records])
        return
    wg = any(n.wireguard_public_key for n in view.records)
    dual = any(n.block_v6 for n in view.records)
    ip6 = any(n.node_ip_v6 for n in view.records)
    table = Table("name", "node IP", *(["node IPv6"] if ip6 else []), "block", *(["IPv6 block"] if dual else []),
                  "VTEP MAC", *(["WireGuard public key", "endpoint"] if wg else []), "MTU", "live")  # fmt: skip
    for n in view.records:
        extra = [n.wireguard_public_key or "-", n.wireguard_endpoint or "-"] if wg else []
        v6 = [str(n.block_v6) if n.block_v6 else "-"] if dual else []
        live = "yes" if n.name in view.live else "no"
        table.add_row(n.name, str(n.node_ip), *([str(n.node_ip_v6 or "-")] if ip6 else []), str(n.block), *v6,
                      n.vtep_mac or "-", *extra, str(n.mtu or "-"), live)  # fmt: skip
    console.print(table)


@node_app.command(
    "rotate-key",
    epilog="Example: overlaycni node rotate-key node-1 --cluster prod  (the node's agent makes the new key; "
    "the CLI never sees a private key)",
)
def node_rotate_key(
    ctx: typer.Context,
    node: Annotated[str, typer.Argument(help="The node whose WireGuard key to replace.", show_default=False)],
    cluster: ClusterOpt,
    wait: Annotated[
        float, typer.Option("--wait", min=0, help="Seconds to wait for the node's agent to publish the new key (0: do not wait).")
    ] = 60.0,
    output: OutputOpt = Output.table,
) -> None:
    """Replace a node's WireGuard key pair (backend wireguard).

    Writes a request to the datastore; the node's agent generates the new
    pair on the node, uses it, and publishes the public key in its node
    record; every peer then switches to it (about one handshake of loss).
    Exit status 1 if the agent did not act within --wait (the request stays
    pending and is acted on when the agent runs)."""
    from .. import ipam
    from ..ipam.rotation import pending_key_rotation, request_key_rotation

    with open_store(ctx) as store:
        old = ipam.get_node(store, cluster, node).wireguard_public_key
        req = request_key_rotation(store, cluster, node)
        deadline = time.monotonic() + wait
        new = old
        while wait > 0 and time.monotonic() < deadline:
            new = ipam.get_node(store, cluster, node).wireguard_public_key
            if new != old and pending_key_rotation(store, cluster, node) is None:
                break
            time.sleep(0.1)
        else:
            new = ipam.get_node(store, cluster, node).wireguard_public_key
    rotated = new != old
    if output is Output.json:
        print_json({"node": node, "request": req.id, "old_public_key": old, "new_public_key": new if rotated else None,
                    "rotated": rotated})  # fmt: skip
    elif rotated:
        console.print(f"node {node}: WireGuard key rotated; public key {old} -> {new}", highlight=False)
    else:
        console.print(f"node {node}: key rotation requested ({req.id})" + (
            f"; its agent has not published a new key within {wait:g}s (is it running?)" if wait else ""), highlight=False)  # fmt: skip
    if wait and not rotated:
        raise typer.Exit(1)


@node_app.command("delete", epilog="Example: overlaycni node delete --cluster dev --name node-1")
def node_delete(
    ctx: typer.Context,
    cluster: ClusterOpt,
    name: NodeNameOpt,
    force: Annotated[
        bool, typer.Option("--force", help="Delete even a live node (its agent holds its lease; its pods lose their block).")
    ] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Delete a node: free its block and release its pod addresses; peers drop its routes (not-found is success).

    A live node is refused: stop its agent first (it gives its lease up) or use --force."""
    from .. import ipam

    with open_store(ctx) as store:
        ipam.delete_node(store, cluster, name, force=force)
    if output is Output.json:
        print_json({"name": name, "deleted": True})
    else:
        console.print(f"node {name} deleted; its block is free", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
    app.add_typer(node_app, name="node")
