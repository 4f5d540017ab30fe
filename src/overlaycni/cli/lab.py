"""``overlaycni lab``: a whole overlay cluster on one machine (parse, dispatch, format)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import NotFound, UsageError
from .common import (
    LabDirOpt,
    LabNameOpt,
    Output,
    OutputOpt,
    console,
    err_console,
    print_json,
    rich_console,
    with_dual_stack_network_flags,
)

if TYPE_CHECKING:
    from ..lab import check as lab_check
    from ..lab import state as lab_state
    from ..lab import trace as lab_trace

# lab.lifecycle.DEFAULT_LEASE_TTL, written here so that `lab --help` need not import
# the lab (tests/unit/test_cli_lazy.py checks that the two agree)
LAB_LEASE_TTL = 6

lab_app = typer.Typer(
    help="A whole overlay cluster on this machine: a VNet, nodes with the real agent, pods through the real plugin.",
    no_args_is_help=True,
)
pod_app = typer.Typer(help="Add or delete lab pods (through the real CNI plugin).", no_args_is_help=True)
node_app = typer.Typer(help="Add or delete lab nodes (peers converge).", no_args_is_help=True)
agent_app = typer.Typer(help="Restart or kill a node's agent.", no_args_is_help=True)
lab_app.add_typer(pod_app, name="pod")
lab_app.add_typer(node_app, name="node")
lab_app.add_typer(agent_app, name="agent")

NodeArg = Annotated[str, typer.Argument(help="Node name.")]
PodArg = Annotated[str, typer.Argument(metavar="POD", help="NAMESPACE/NAME, or NAME if only one namespace has such a pod.")]
PHASES = {"vnet": "VNet, external host, control plane", "nodes": "nodes and agents", "pods": "pods (CNI ADD)"}


def _next_steps(name: str, pod: str | None, other: str | None) -> list[str]:
    n = "" if name == "demo" else f" --name {name}"
    steps = [f"overlaycni lab check{n}", f"overlaycni lab status{n}"]
    if pod:
        steps.append(f"overlaycni lab exec{n} {pod} -- ip route")
        steps.append(f"overlaycni lab trace{n} {pod} {other or 'external'}")
        steps.append(f"overlaycni lab trace{n} {pod} external")
    steps += [f"overlaycni lab node add{n}", f"overlaycni lab down{n}"]
    return steps


def render_status(state: lab_state.LabState) -> None:
    from rich.table import Table

    from ..lab import members
    from ..lab.policy import format_labels

    dual = state.dual_stack
    cidrs = ",".join(str(state.pod_cidr(v)) for v in state.versions)
    ext = ", ".join(str(state.external_address(v)) for v in state.versions)
    console.print(
        f"lab [bold]{state.name}[/]: backend [bold]{state.backend}[/], store {state.store} ({state.datastore}), "
        f"pod CIDR{'s' if dual else ''} {cidrs}, external host {ext}",
        highlight=False,
    )
    nodes = Table(title="nodes", title_justify="left")
    for col in ("node", "IP", *(("IPv6",) if dual else ()), "block", *(("IPv6 block",) if dual else ()), "agent pid", "netns"):
        nodes.add_column(col)
    for n in state.nodes:
        alive = members.agent_alive(n)
        pid = f"{n.agent.pid}" if n.agent else "-"
        v6 = (str(n.ip_v6.ip) if n.ip_v6 else "-",) if dual else ()
        block_v6 = (str(n.block_v6 or "-"),) if dual else ()
        nodes.add_row(n.name, str(n.ip.ip), *v6, str(n.block or "-"), *block_v6, pid if alive else f"[red]{pid} (down)[/]", n.netns)
    console.print(nodes)
    pods = Table(title="pods", title_justify="left")
    for col in ("pod", "namespace", "node", "IP", *(("IPv6",) if dual else ()), "labels", "netns"):
        pods.add_column(col)
    for p in state.pods:
        v6 = (str(p.ip_v6.ip) if p.ip_v6 else "-",) if dual else ()
        pods.add_row(p.name, p.namespace, p.node, str(p.ip.ip) if p.ip else "-", *v6, format_labels(p.labels), p.netns)
    console.print(pods)


@lab_app.command("up")
@with_dual_stack_network_flags
def up(
    name: LabNameOpt = "demo",
    nodes: Annotated[int, typer.Option("--nodes", help="Number of nodes.")] = 3,
    pods_per_node: Annotated[int, typer.Option("--pods-per-node", help="Pods per node (0 allowed).")] = 2,
    store: Annotated[str, typer.Option("--store", help="sqlite (a file in the lab dir) or etcd (runs inside the lab).")] = "sqlite",
    lease_ttl: Annotated[int, typer.Option("--lease-ttl", help="Seconds before peers drop a silent node.")] = LAB_LEASE_TTL,
    etcd_tls: Annotated[
        str,
        typer.Option(
            "--etcd-tls",
            help="--store etcd: on (HTTPS only, client certificates from the lab's own CA in LAB_DIR/pki) "
            "or off (plain HTTP, to compare).",
        ),
    ] = "on",
    lab_dir: LabDirOpt = None,
    *,
    network: dict[str, Any],
) -> None:
    """Bring up a lab: VNet, nodes with agents, an external host, pods.

    Example: overlaycni lab up --nodes 3 --pods-per-node 2 --backend vxlan

    Dual-stack, as AKS offers it: overlaycni lab up --ip-families ipv4,ipv6
    (the VNet gets an IPv6 ULA range, every node and the external host an
    IPv6 address, every pod both families).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..lab import lifecycle

    if etcd_tls not in ("on", "off"):
        raise UsageError(f"--etcd-tls {etcd_tls!r}: expected on or off")
    req = lifecycle.UpRequest(
        name=name,
        nodes=nodes,
        pods_per_node=pods_per_node,
        store=store,
        network=network,
        lease_ttl=lease_ttl,
        root=lab_dir,
        etcd_tls=etcd_tls == "on",
    )
    lifecycle.validate(req)  # clear errors before any progress display
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=rich_console(err_console), transient=False
    ) as progress:
        tasks: dict[str, Any] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(PHASES.get(phase, phase), total=total)
            progress.update(tasks[phase], completed=done, total=total)

        state = lifecycle.up(req, report=report)
    render_status(state)
    first = state.pods[0] if state.pods else None
    other = next((state.ref(p) for p in state.pods if first and p.node != first.node), None)
    console.print("[bold]Try next:[/]")
    for step in _next_steps(state.name, state.ref(first) if first else None, other):
        console.print(f"  {step}", highlight=False, markup=False)


@lab_app.command("down")
def down(name: LabNameOpt = "demo", lab_dir: LabDirOpt = None) -> None:
    """Stop the lab's processes and delete its namespaces and files (safe to repeat)."""
    from ..lab import lifecycle

    rep = lifecycle.down(name, root=lab_dir)
    if not rep.found_anything:
        console.print(f"lab {name}: nothing to remove", highlight=False)
        return
    console.print(
        f"lab {name}: stopped {len(rep.stopped)} process(es), deleted {len(rep.namespaces)} namespace(s)"
        + (f", removed {rep.removed_dir}" if rep.removed_dir else ""),
        highlight=False,
    )


@lab_app.command("status")
def status(name: LabNameOpt = "demo", output: OutputOpt = Output.table, lab_dir: LabDirOpt = None) -> None:
    """Nodes (IP, block, agent) and pods (node, IP) of a lab."""
    from ..lab import members

    state = members.open_lab(name, lab_dir)
    if output is Output.json:
        data = state.status_json()
        for entry, n in zip(data["nodes"], state.nodes, strict=True):
            entry["agent_alive"] = members.agent_alive(n)
        print_json(data)
    else:
        render_status(state)


@lab_app.command("list")
def list_(output: OutputOpt = Output.table, lab_dir: LabDirOpt = None) -> None:
    """Every lab on this machine."""
    from rich.table import Table

    from ..lab import lifecycle

    found = lifecycle.labs(lab_dir)
    rows: list[dict[str, Any]] = [
        {"name": n, "backend": s.backend if s else None, "store": s.store if s else None,
         "nodes": len(s.nodes) if s else None, "pods": len(s.pods) if s else None, "state_file": s is not None}
        for n, s in found
    ]  # fmt: skip
    if output is Output.json:
        print_json(rows)
        return
    table = Table(title="labs", title_justify="left")
    for col in ("name", "backend", "store", "nodes", "pods"):
        table.add_column(col)
    for r in rows:
        if r["state_file"]:
            table.add_row(r["name"], r["backend"], r["store"], str(r["nodes"]), str(r["pods"]))
        else:
            table.add_row(r["name"], "[yellow]namespaces only (run lab down)[/]", "", "", "")
    console.print(table)


@lab_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_(
    pod: Annotated[str, typer.Argument(help="A pod (NAMESPACE/NAME, or NAME if unambiguous), a node, or 'external'.")],
    cmd: Annotated[list[str] | None, typer.Argument(help="The command, after --.")] = None,
    name: LabNameOpt = "demo",
    lab_dir: LabDirOpt = None,
) -> None:
    """Run a command inside a pod, like kubectl exec: lab exec POD -- CMD..."""
    from ..lab import members

    state = members.open_lab(name, lab_dir)
    if not cmd:
        raise UsageError("give the command after --, e.g. lab exec pod-1-1 -- ip addr", field="CMD")
    if pod in ("external", "ext"):
        ns = state.external_netns
    elif any(n.name == pod for n in state.nodes):
        ns = state.node(pod).netns
    else:
        found = state.find_pod(pod)
        if found is None:
            raise NotFound(f"POD: lab {name} has no pod or node {pod!r} (pods: {', '.join(state.refs().values()) or 'none'})")
        ns = found.netns
    os.execvp("ip", ["ip", "netns", "exec", ns, *cmd])


@pod_app.command("add")
def pod_add(
    pod: Annotated[str, typer.Argument(help="Pod name, or NAMESPACE/NAME.")],
    name: LabNameOpt = "demo",
    namespace: Annotated[
        str | None, typer.Option("--namespace", help="Kubernetes namespace (default: default).", show_default=False)
    ] = None,
    node: Annotated[str | None, typer.Option("--node", help="Node (default: the one with the fewest pods).")] = None,
    labels: Annotated[str | None, typer.Option("--labels", help="k=v,k2=v2")] = None,
    port: Annotated[
        list[str] | None,
        typer.Option("--port", help="A named container port NAME=PORT/PROTO, e.g. serve-80-tcp=80/TCP (repeatable; NetworkPolicy can name it)."),
    ] = None,
    ip: Annotated[
        list[str] | None,
        typer.Option("--ip", help="Request this address (CNI runtimeConfig.ips): free and inside the node's block, else an "
                                 "error. Repeat it for one address per family in a dual-stack lab."),
    ] = None,
    output: OutputOpt = Output.table,
    lab_dir: LabDirOpt = None,
) -> None:
    """Add a pod through the real plugin (CNI ADD, the way a runtime calls it).

    Pod names are unique per namespace, as in Kubernetes: x/web and y/web
    are two pods. Its labels, named ports, IP and node are written to the
    datastore for NetworkPolicy. Example: overlaycni lab pod add web
    --namespace x --labels app=web --port http=80/TCP --ip 10.244.1.50
    """
    from ..lab import members
    from ..lab.topology import parse_labels

    p = members.add_pod(
        name, pod, namespace=namespace, node=node, labels=parse_labels(labels), ports=tuple(port or ()), ips=tuple(ip or ()), root=lab_dir
    )
    if output is Output.json:
        print_json({"name": p.name, "namespace": p.namespace, "node": p.node, "netns": p.netns, "ip": str(p.ip.ip) if p.ip else None,
                    "ipv6": str(p.ip_v6.ip) if p.ip_v6 else None})  # fmt: skip
    else:
        console.print(f"pod {p.key} on {p.node}: {p.ip}{f', {p.ip_v6}' if p.ip_v6 else ''}", highlight=False)


@pod_app.command("delete")
def pod_delete(pod: PodArg, name: LabNameOpt = "demo", lab_dir: LabDirOpt = None) -> None:
    """Delete a pod (CNI DEL, then its namespace)."""
    from ..lab import members

    p = members.delete_pod(name, pod, root=lab_dir)
    console.print(f"pod {p.key} deleted", highlight=False)


@node_app.command("add")
def node_add(
    node: Annotated[str | None, typer.Argument(help="Node name (default nodeN).")] = None,
    name: LabNameOpt = "demo",
    output: OutputOpt = Output.table,
    lab_dir: LabDirOpt = None,
) -> None:
    """Add a node VM and start its agent; peers program it."""
    from ..lab import members

    n = members.add_node(name, node, root=lab_dir)
    if output is Output.json:
        print_json({"name": n.name, "netns": n.netns, "ip": str(n.ip.ip), "block": str(n.block),
                    "ipv6": str(n.ip_v6.ip) if n.ip_v6 else None, "block_v6": str(n.block_v6) if n.block_v6 else None,
                    "agent_pid": n.agent.pid if n.agent else None})  # fmt: skip
    else:
        v6 = f", IPv6 {n.ip_v6.ip}, IPv6 block {n.block_v6}" if n.ip_v6 else ""
        console.print(f"node {n.name}: IP {n.ip.ip}, block {n.block}{v6}, agent pid {n.agent.pid if n.agent else '-'}", highlight=False)


@node_app.command("delete")
def node_delete(node: NodeArg, name: LabNameOpt = "demo", lab_dir: LabDirOpt = None) -> None:
    """Delete a node: its pods, its agent, its VM; peers drop it."""
    from ..lab import members

    n = members.delete_node(name, node, root=lab_dir)
    console.print(f"node {n.name} deleted", highlight=False)


@agent_app.command("restart")
def agent_restart(node: NodeArg, name: LabNameOpt = "demo", lab_dir: LabDirOpt = None) -> None:
    """Restart a node's agent (existing pods keep working)."""
    from ..lab import members

    n = members.restart_agent(name, node, root=lab_dir)
    console.print(f"node {n.name}: agent restarted, pid {n.agent.pid if n.agent else '-'}", highlight=False)


@agent_app.command("kill")
def agent_kill(node: NodeArg, name: LabNameOpt = "demo", lab_dir: LabDirOpt = None) -> None:
    """SIGKILL a node's agent (see what a crash does; `lab agent restart` brings it back)."""
    from ..lab import members

    n = members.kill_agent(name, node, root=lab_dir)
    console.print(f"node {n.name}: agent {n.agent.pid if n.agent else '-'} killed", highlight=False)


@lab_app.command("check")
def check(name: LabNameOpt = "demo", output: OutputOpt = Output.table, lab_dir: LabDirOpt = None) -> None:
    """Ping every ordered pod pair and the external host; verify VXLAN/direct and SNAT on the wire.

    A dual-stack lab is checked over both families (IPv6: ICMPv6, IPv6 inside
    VXLAN between the node IPs, SNAT66 to the node's IPv6 address).

    Exit status: 0 all green, 1 any failure.
    """
    from ..lab import check as lab_check
    from ..lab import members

    state = members.open_lab(name, lab_dir)
    from ..lab.netns import require_privileges

    require_privileges()
    with console.status(f"checking lab {name}: {len(state.pods)} pods ..."):
        rep = lab_check.run_check(state)
    if output is Output.json:
        print_json(rep.to_json())
    else:
        ref = state.refs()
        render_check(rep, {ref[p.key]: p.node for p in state.pods})
    if not rep.ok:
        raise typer.Exit(1)


MAX_POD_MATRIX = 12  # beyond this many pods the matrix is summarised per node pair


def render_node_matrix(rep: lab_check.ConnectivityReport, node_of: dict[str, str]) -> None:
    """Large labs: one cell per (source node, destination node): ✓ when every
    pod pair between them is OK, else OK/pairs in red. Columns by node number."""
    from rich import box
    from rich.table import Table

    nodes = sorted(set(node_of.values()), key=lambda n: (len(n), n))
    ok: dict[tuple[str, str], list[int]] = {}
    for p in rep.pairs:
        cell = ok.setdefault((node_of[p.src], node_of[p.dst]), [0, 0])
        cell[0] += p.ok
        cell[1] += 1
    table = Table(
        title=f"lab {rep.lab}: pod pairs per node pair (rows ping columns; column k = the k-th node)",
        title_justify="left", box=box.SIMPLE, pad_edge=False, padding=(0, 0, 0, 1),
    )  # fmt: skip
    table.add_column("src", no_wrap=True, min_width=max(len(n) for n in nodes))
    for i, _ in enumerate(nodes, 1):
        table.add_column(str(i), justify="right", no_wrap=True, min_width=len(str(i)))
    for s in nodes:
        row = [s]
        for d in nodes:
            good, total = ok.get((s, d), [0, 0])
            row.append("·" if total == 0 else ("[green]✓[/]" if good == total else f"[red]{good}/{total}[/]"))
        table.add_row(*row)
    console.print(table)
    bad_ext = [e for e in rep.external if not e.ok]
    console.print(f"external host: {len(rep.external) - len(bad_ext)}/{len(rep.external)} pods reached it as their node IP", highlight=False)


def render_check(rep: lab_check.ConnectivityReport, node_of: dict[str, str] | None = None) -> None:
    from rich.table import Table

    mark = {"vxlan": "V", "wireguard": "W"}.get(rep.backend, "D")
    if node_of and len(rep.pods) > MAX_POD_MATRIX:
        render_node_matrix(rep, node_of)
        _render_verdict(rep)
        return
    cells: dict[tuple[str, str], list[lab_check.PairResult]] = {}
    for p in rep.pairs:  # dual-stack: one cell holds both families
        cells.setdefault((p.src, p.dst), []).append(p)
    dual = any(p.version == 6 for p in rep.pairs)
    families = " over IPv4 and IPv6" if dual else ""
    table = Table(title=f"lab {rep.lab}: ping matrix{families} (rows ping columns)", title_justify="left")
    table.add_column("src \\ dst")
    for d in rep.pods:
        table.add_column(d, justify="center")
    table.add_column("external", justify="center")
    ext: dict[str, list[lab_check.ExternalResult]] = {}
    for e in rep.external:
        ext.setdefault(e.pod, []).append(e)
    for s in rep.pods:
        row = [s]
        for d in rep.pods:
            ps = cells.get((s, d))
            if not ps:
                row.append("·")
            elif not all(p.ok for p in ps):
                bad = "".join(str(p.version) for p in ps if not p.ok) if dual else ""
                row.append(f"[red]✗{bad}[/]")
            else:
                row.append("[green]✓[/]" if ps[0].same_node else f"[green]✓{mark}[/]")
        es = ext.get(s)
        row.append("-" if not es else ("[green]✓ SNAT[/]" if all(e.ok for e in es) else "[red]✗[/]"))
        table.add_row(*row)
    console.print(table)
    if dual:
        console.print("each cell: IPv4 and IPv6 (✗4 / ✗6: that family failed); SNAT: to the node's IPv4 and IPv6 address (SNAT66)")
    legend = {
        "V": "VXLAN between the node IPs seen on the underlay",
        "W": "WireGuard UDP between the node IPs on the underlay, no pod address in clear",
    }.get(mark, "plain pod packet routed on the underlay")
    console.print(f"✓ reply   ✓{mark} reply + {legend}   ✓ SNAT external host saw the node IP", highlight=False)
    _render_verdict(rep)


def _render_verdict(rep: lab_check.ConnectivityReport) -> None:
    from rich.markup import escape

    fails = rep.failures()
    if fails:
        for f in fails[:50]:
            err_console.print(f"[bold red]FAIL[/] {escape(f)}", highlight=False)
        if len(fails) > 50:
            err_console.print(f"... and {len(fails) - 50} more (see --output json)", highlight=False)
    else:
        if any(p.version == 6 for p in rep.pairs):
            pairs = len({(p.src, p.dst) for p in rep.pairs})
            console.print(f"[bold green]all {pairs} pod pairs over IPv4 and IPv6 ({len(rep.pairs)} paths) "
                          f"and {len(rep.external)} external paths OK[/]")  # fmt: skip
        else:
            console.print(f"[bold green]all {len(rep.pairs)} pod pairs and {len(rep.external)} external paths OK[/]")


@lab_app.command("trace")
def trace(
    src: Annotated[str, typer.Argument(help="Source pod: NAMESPACE/NAME, or NAME if unambiguous.")],
    dst: Annotated[str, typer.Argument(help="Destination pod (as SRC), IPv4 or IPv6 address, or 'external'.")],
    name: LabNameOpt = "demo",
    output: OutputOpt = Output.table,
    lab_dir: LabDirOpt = None,
    family: Annotated[
        str | None,
        typer.Option("--family", help="ipv4 or ipv6: which address of a pod or of 'external' DST means "
                     "(dual-stack labs; default ipv4; an address DST is its own family).", show_default=False),
    ] = None,
) -> None:
    """Send one packet from SRC to DST and show its path, captured from the kernel.

    Dual-stack: overlaycni lab trace pod-1-1 pod-2-1 --family ipv6, or an IPv6 address as DST.
    """
    from ..lab import members
    from ..lab import trace as lab_trace

    state = members.open_lab(name, lab_dir)
    t = lab_trace.run_trace(state, src, dst, family=family)
    if output is Output.json:
        print_json(t.to_json())
    else:
        render_trace(t)
    if not t.replied:
        raise typer.Exit(1)


def render_trace(t: lab_trace.Trace) -> None:
    console.print(f"[bold]{t.src} -> {t.dst}[/] ({t.dst_ip}): {'reply received' if t.replied else '[red]no reply[/]'}", highlight=False)
    r = t.pod_route
    console.print(f"  pod route:  {t.dst_ip} via {r.get('gateway', '-')} dev {r.get('dev')} src {r.get('prefsrc', '-')}", highlight=False)
    r = t.node_route
    flags = " onlink" if "onlink" in r.get("flags", []) else ""
    via = f"via {r['gateway']}" if r.get("gateway") else "directly connected,"
    console.print(f"  node route: {t.dst_ip} {via} dev {r.get('dev')}{flags}", highlight=False)
    for i, h in enumerate(t.hops, 1):
        color = "green" if h.packet else "red"
        console.print(f"  {i}. [bold]{h.where}[/]: [{color}]{h.note}[/]", highlight=False, soft_wrap=True)
        if h.packet:
            for line in h.packet.text.splitlines():
                console.print(f"       [dim]{line}[/]", highlight=False, soft_wrap=True)
    if t.snat:
        console.print(f"  SNAT: inner source {t.snat[0]} -> {t.snat[1]}", highlight=False)


@lab_app.command("tour")
def tour(name: LabNameOpt = "demo", lab_dir: LabDirOpt = None) -> None:
    """A short tour of a running lab, from real output."""
    from ..lab import members
    from ..lab import trace as lab_trace

    state = members.open_lab(name, lab_dir)
    for i, step in enumerate(lab_trace.run_tour(state), 1):
        console.print(f"\n[bold]{i}. {step.title}[/]", highlight=False)
        console.print(f"[cyan]$ {step.command}[/]", highlight=False)
        console.print(step.output.rstrip(), highlight=False, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(lab_app, name="lab")
