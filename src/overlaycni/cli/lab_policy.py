"""``overlaycni lab namespace|pod label|probe``: the lab as a Kubernetes API
for NetworkPolicy (namespace and pod labels) and a reachability matrix
measured with real packets (parse, dispatch, format).

The commands hang off the ``lab`` group of ``cli/lab.py``; this module only
has to be imported (``_GROUPS`` in ``cli/main.py`` lists it after the lab).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..errors import ConfigError, PolicyFieldError
from .common import LabDirOpt, LabNameOpt, Output, OutputOpt, console, print_json
from .lab import PodArg, lab_app, pod_app

ns_app = typer.Typer(
    help="Kubernetes namespaces of a lab and their labels (what namespaceSelector matches).", no_args_is_help=True
)
lab_app.add_typer(ns_app, name="namespace")

LabelsArg = Annotated[list[str], typer.Argument(metavar="LABELS...", help="KEY=VALUE sets a label, KEY- removes it (as in kubectl label).")]


@ns_app.command("add")
def namespace_add(
    namespace: Annotated[str, typer.Argument(metavar="NAMESPACE", help="Namespace name (\\[a-z0-9-]).")],
    labels: Annotated[str | None, typer.Option("--labels", help="k=v,k2=v2")] = None,
    name: LabNameOpt = "demo",
    output: OutputOpt = Output.table,
    lab_dir: LabDirOpt = None,
) -> None:
    """Create a namespace with labels; kubernetes.io/metadata.name=NAMESPACE is always added.

    Example: overlaycni lab namespace add x --labels ns=x
    """
    from ..lab import policy as lab_policy

    got = lab_policy.add_namespace(name, namespace, [labels] if labels else [], root=lab_dir)
    _print_ns(namespace, dict(got), output, "created")


@ns_app.command("label")
def namespace_label(
    namespace: Annotated[str, typer.Argument(metavar="NAMESPACE", help="An existing namespace of the lab.")],
    labels: LabelsArg,
    name: LabNameOpt = "demo",
    output: OutputOpt = Output.table,
    lab_dir: LabDirOpt = None,
) -> None:
    """Set (KEY=VALUE) or remove (KEY-) namespace labels; agents re-render at once.

    Example: overlaycni lab namespace label y team=blue env-
    """
    from ..lab import policy as lab_policy

    got = lab_policy.label_namespace(name, namespace, labels, root=lab_dir)
    _print_ns(namespace, dict(got), output, "labelled")


def _print_ns(namespace: str, labels: dict[str, str], output: Output, verb: str) -> None:
    from ..lab.policy import format_labels

    if output is Output.json:
        print_json({"namespace": namespace, "labels": labels})
    else:
        console.print(f"namespace {namespace} {verb}: {format_labels(labels)}", highlight=False)


@ns_app.command("list")
def namespace_list(name: LabNameOpt = "demo", output: OutputOpt = Output.table, lab_dir: LabDirOpt = None) -> None:
    """The lab's namespaces, their labels and pods."""
    from rich.table import Table

    from ..lab import members
    from ..lab import policy as lab_policy
    from ..lab.policy import format_labels
    from ..policy.model import NAMESPACE_NAME_LABEL

    state = members.open_lab(name, lab_dir)
    known = lab_policy.load_namespaces(state)
    rows: list[dict[str, Any]] = [
        {"namespace": ns, "labels": {**labels, NAMESPACE_NAME_LABEL: ns}, "pods": [p.name for p in state.pods if p.namespace == ns]}
        for ns, labels in sorted(known.items())
    ]
    if output is Output.json:
        print_json(rows)
        return
    table = Table(title=f"lab {name}: namespaces", title_justify="left")
    for col in ("namespace", "labels", "pods"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["namespace"], format_labels(r["labels"]), ", ".join(r["pods"]) or "-")
    console.print(table)


@pod_app.command("label")
def pod_label(
    pod: PodArg,
    labels: LabelsArg,
    name: LabNameOpt = "demo",
    output: OutputOpt = Output.table,
    lab_dir: LabDirOpt = None,
) -> None:
    """Set (KEY=VALUE) or remove (KEY-) pod labels; agents re-render at once.

    Example: overlaycni lab pod label x/web tier=frontend old-
    """
    from ..lab import policy as lab_policy
    from ..lab.policy import format_labels

    p = lab_policy.label_pod(name, pod, labels, root=lab_dir)
    if output is Output.json:
        print_json({"pod": p.name, "namespace": p.namespace, "labels": dict(p.labels)})
    else:
        console.print(f"pod {p.key} labelled: {format_labels(p.labels)}", highlight=False)


@lab_app.command("probe")
def probe(
    port: Annotated[int, typer.Option("--port", help="Destination port every pod serves (80 and 81 always run).")] = 80,
    protocol: Annotated[str, typer.Option("--protocol", help="tcp or udp (this kernel has no SCTP).")] = "tcp",
    pods: Annotated[
        str | None, typer.Option("--pods", help="Comma-separated pods to probe between, each NAMESPACE/NAME or NAME (default all).")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds before a probe counts as blocked.")] = 2.0,
    retries: Annotated[int, typer.Option("--retries", help="Probe a blocked pair again up to this often (a busy machine can lose a first packet).")] = 1,
    family: Annotated[str, typer.Option("--family", help="ipv4, or ipv6 in a dual-stack lab: which pod addresses to connect to.")] = "ipv4",
    name: LabNameOpt = "demo",
    output: OutputOpt = Output.table,
    lab_dir: LabDirOpt = None,
) -> None:
    """Reachability matrix with real packets: every pod connects to every pod on PORT/PROTOCOL.

    Rows are sources, columns destinations; '.' connected, 'X' blocked (the
    style of the upstream NetworkPolicy tests). Starts a TCP/UDP echo server
    in each pod on first use. Exit status: 0 measured (whatever the matrix).

    Example: overlaycni lab probe --port 81 --protocol udp -o json
    """
    from rich.table import Table

    from ..lab import members
    from ..lab import probe as lab_probe
    from ..lab.netns import require_privileges

    state = members.open_lab(name, lab_dir)
    require_privileges()
    if not 0.1 <= timeout <= 30:
        raise ConfigError(PolicyFieldError("--timeout", f"{timeout} is out of range (0.1-30 seconds)"))
    if not 0 <= retries <= 5:
        raise ConfigError(PolicyFieldError("--retries", f"{retries} is out of range (0-5)"))
    if family not in ("ipv4", "ipv6"):
        raise ConfigError(PolicyFieldError("--family", f"{family!r} is not one of: ipv4, ipv6"))
    version = 6 if family == "ipv6" else 4
    chosen = [p.strip() for p in pods.split(",") if p.strip()] if pods else None
    with console.status(f"probing {protocol.upper()}/{port} between {len(chosen or state.pods)} pods ..."):
        rep = lab_probe.probe_matrix(state, port=port, protocol=protocol, pods=chosen, retries=retries, timeout=timeout, family=version)
    if output is Output.json:
        print_json(rep.to_json())
        return
    over = " over IPv6" if rep.family == 6 else ""
    table = Table(title=f"{rep.protocol}/{rep.port}{over}, rows → columns", title_justify="left")
    table.add_column("src \\ dst")
    for k in rep.keys:
        table.add_column(k, justify="center")
    for s, k in zip(rep.pods, rep.keys, strict=True):
        table.add_row(k, *("[green].[/]" if rep.connected[(s, d)] else "[red]X[/]" for d in rep.pods))
    console.print(table)
    total = len(rep.connected)
    console.print(f"{sum(rep.connected.values())} of {total} pairs connected, {total - sum(rep.connected.values())} blocked", highlight=False)


def register(app: typer.Typer) -> None:
    """Nothing to add at the top: the commands above live in the ``lab`` group."""
    return None
