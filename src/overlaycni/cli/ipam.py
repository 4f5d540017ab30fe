"""``overlaycni ipam ...``: pod addresses (allocate, release, show, check, gc)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ConfigError, FieldError
from .common import ClusterOpt, Output, OutputOpt, SkippedRecords, console, open_store, print_json

ipam_app = typer.Typer(
    help="Pod IP addresses. Example: overlaycni ipam allocate --cluster dev --node n1 --container-id abc --ifname eth0",
    no_args_is_help=True,
)

CidOpt = Annotated[str, typer.Option("--container-id", help="The container (sandbox) ID, as CNI_CONTAINERID.")]
IfOpt = Annotated[str, typer.Option("--ifname", help="Interface name in the pod, as CNI_IFNAME.")]
ValidOpt = Annotated[
    Path,
    typer.Option(
        "--valid",
        help="File of attachments still in use ('-' for stdin): JSON [{containerID, ifname}], "
        "a CNI GC config, or lines 'CONTAINER_ID IFNAME'.",
    ),
]


def parse_attachments(text: str, *, source: str = "--valid") -> list[tuple[str, str]]:
    """Attachments from JSON (a list of {containerID, ifname}, or an object
    with ``cni.dev/valid-attachments`` / ``cni.dev/attachments``) or text
    lines ``CONTAINER_ID IFNAME``."""
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ConfigError(FieldError("valid", f"{source} is not valid JSON: {exc}")) from None
        if isinstance(data, dict):
            data = data.get("cni.dev/valid-attachments", data.get("cni.dev/attachments"))
        if not isinstance(data, list):
            raise ConfigError(FieldError("valid", f"{source}: expected a list of {{containerID, ifname}}"))
        out = []
        for i, item in enumerate(data):
            cid = item.get("containerID", item.get("container_id")) if isinstance(item, dict) else None
            ifname = item.get("ifname") if isinstance(item, dict) else None
            if not cid or not ifname:
                raise ConfigError(FieldError("valid", f"{source}: entry {i} lacks containerID or ifname"))
            out.append((str(cid), str(ifname)))
        return out
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(FieldError("valid", f"{source} line {n}: expected 'CONTAINER_ID IFNAME', got {line!r}"))
        out.append((parts[0], parts[1]))
    return out


def _read_valid(path: Path) -> list[tuple[str, str]]:
    if str(path) == "-":
        return parse_attachments(sys.stdin.read(), source="stdin")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(FieldError("valid", f"cannot read {path}: {exc.strerror}")) from None
    return parse_attachments(text, source=str(path))


@ipam_app.command(
    "allocate",
    epilog="Example: overlaycni ipam allocate --cluster dev --node n1 --container-id abc123 --ifname eth0 "
    "--pod default/web-0 -o json",
)
def ipam_allocate(
    ctx: typer.Context,
    cluster: ClusterOpt,
    node: Annotated[str, typer.Option("--node", help="The node whose block the address comes from.")],
    container_id: CidOpt,
    ifname: IfOpt = "eth0",
    pod: Annotated[str | None, typer.Option("--pod", help="NAMESPACE/NAME of the pod (recorded).")] = None,
    ip: Annotated[
        list[str] | None,
        typer.Option("--ip", help="Ask for this address (must be free, in the node's block); "
                     "dual-stack: once per family (--ip 10.244.1.9 --ip fd12:3456:789a:0:1::9)."),
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Allocate addresses for a pod interface (the same ones again for the same container ID and ifname):
    one IPv4 address, and in a dual-stack cluster one IPv6 address too."""
    from .. import ipam
    from ..ipam.model import parse_any_ip, parse_pod

    pod_ref = parse_pod(pod)
    requested = [parse_any_ip("ip", one) for one in ip or []]
    with open_store(ctx) as store:
        alloc = ipam.allocate(store, cluster, node, container_id, ifname, pod=pod_ref, requested_ips=requested)
    if output is Output.json:
        print_json({
            "ip": str(alloc.ip), "gateway": str(alloc.gateway),
            "ip_v6": str(alloc.ip_v6) if alloc.ip_v6 else None, "gateway_v6": str(alloc.gateway_v6) if alloc.gateway_v6 else None,
        })  # fmt: skip
    else:
        shown = ", ".join(f"{a.ip} gateway {a.gateway}" for a in alloc.addresses)
        console.print(f"{shown} (node {alloc.node})", highlight=False)


@ipam_app.command("release", epilog="Example: overlaycni ipam release --cluster dev --container-id abc123 --ifname eth0")
def ipam_release(
    ctx: typer.Context, cluster: ClusterOpt, container_id: CidOpt, ifname: IfOpt = "eth0", output: OutputOpt = Output.table
) -> None:
    """Release a pod interface's address (releasing twice is fine)."""
    from .. import ipam

    with open_store(ctx) as store:
        alloc = ipam.release(store, cluster, container_id, ifname)
    if output is Output.json:
        print_json({"released": str(alloc.ip) if alloc else None,
                    "released_v6": str(alloc.ip_v6) if alloc and alloc.ip_v6 else None})  # fmt: skip
    else:
        shown = " and ".join(str(a.ip) for a in alloc.addresses) if alloc else ""
        console.print(f"released {shown}" if alloc else "nothing to release", highlight=False)


@ipam_app.command("show", epilog="Example: overlaycni ipam show --cluster dev")
def ipam_show(ctx: typer.Context, cluster: ClusterOpt, output: OutputOpt = Output.table) -> None:
    """Per node: its block of each family, whether it is live, addresses used and free.

    JSON per node: node, block, live, used, free, and block_v6, used_v6,
    free_v6 (null in a single-stack cluster). A record that does not decode
    is skipped with a warning on stderr (the agents skip it too) and listed
    under "skipped" ({key, kind, reason}) with -o json; `ipam check` reports
    it as a problem."""
    from rich.table import Table

    from .. import ipam
    from ..ipam import addresses

    skipped = SkippedRecords()
    with open_store(ctx) as store:
        claims = ipam.list_claims(store, cluster, on_bad=skipped)
        live = set(ipam.cluster_nodes(store, cluster, on_bad=skipped).live)
        used: dict[tuple[str, int], int] = {}
        for a in ipam.list_allocations(store, cluster, on_bad=skipped):
            for ip in a.ips:
                used[a.node, ip.version] = used.get((a.node, ip.version), 0) + 1
    rows: list[dict[str, Any]] = []
    for name, claim in sorted(claims.items(), key=lambda item: int(item[1].block.network_address)):
        row: dict[str, Any] = {"node": name, "block": str(claim.block), "live": name in live}
        for suffix, block in (("", claim.block), ("_v6", claim.block_v6)):
            n = used.get((name, 6 if suffix else 4), 0)
            row |= {f"block{suffix}": str(block) if block else None, f"used{suffix}": n if block else None,
                    f"free{suffix}": addresses.capacity(block) - n if block else None}  # fmt: skip
        rows.append(row)
    skipped.warn()
    if output is Output.json:
        print_json({"cluster": cluster, "nodes": rows, "skipped": skipped.to_json()})
        return
    dual = any(r["block_v6"] for r in rows)
    # an IPv6 block's free count (2^48 for a /80) is in the JSON; the table stays narrow
    table = Table("node", "block", "live", "used", "free", *(["IPv6 block", "used"] if dual else []))
    for r in rows:
        v6 = [r["block_v6"] or "-", str(r["used_v6"] or 0)] if dual else []
        table.add_row(r["node"], r["block"], "yes" if r["live"] else "no", str(r["used"]), str(r["free"]), *v6)
    console.print(table)


@ipam_app.command("check", epilog="Example: overlaycni ipam check --cluster dev || echo inconsistent")
def ipam_check(
    ctx: typer.Context,
    cluster: ClusterOpt,
    valid: Annotated[
        Path | None, typer.Option("--valid", help="Also report allocations not in this attachment file.")
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Check the cluster's IPAM records: duplicates, leaks, addresses outside their node's block.

    Exit 0 when consistent, 1 when not."""
    from .. import ipam

    attachments = _read_valid(valid) if valid is not None else None
    with open_store(ctx) as store:
        report = ipam.check(store, cluster, valid=attachments)
    if output is Output.json:
        print_json(report.to_dict())
    else:
        console.print(
            f"cluster {cluster}: {report.nodes} nodes, {report.blocks} blocks, {report.allocations} addresses",
            highlight=False,
        )
        for p in report.problems:
            console.print(f"[red]{p.kind}[/]: {p.message}", highlight=False)
        console.print("consistent" if report.ok else f"{len(report.problems)} problems", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@ipam_app.command("gc", epilog="Example: overlaycni ipam gc --cluster dev --valid attachments.json")
def ipam_gc(
    ctx: typer.Context,
    cluster: ClusterOpt,
    valid: ValidOpt,
    node: Annotated[str | None, typer.Option("--node", help="Only this node's addresses.")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Release every address whose (container ID, ifname) is not in --valid."""
    from .. import ipam

    attachments = _read_valid(valid)
    with open_store(ctx) as store:
        released = ipam.gc(store, cluster, attachments, node=node)
    if output is Output.json:
        print_json({"released": [a.to_dict() for a in released]})
    else:
        for a in released:
            console.print(f"released {a.ip} ({a.container_id} {a.ifname}, node {a.node})", highlight=False)
        console.print(f"{len(released)} released", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(ipam_app, name="ipam")
