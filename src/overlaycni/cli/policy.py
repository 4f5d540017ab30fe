"""``overlaycni policy``: validate NetworkPolicy manifests, explain a verdict,
show the nftables a node would get, and store policies in a cluster
(parse, dispatch, format).

The datastore-backed verbs take ``--cluster C`` (in the global
``--datastore``) or ``--lab N`` (a lab on this machine: its datastore and
cluster; ``lab.control.with_store`` reaches an in-lab etcd from inside the
lab). The domain logic is in ``policy.explain`` (verdicts),
``policy.stored`` (the inventory the agents see) and ``policy.records``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from ..errors import BadRecord, ConfigError, NotFound, PolicyFieldError
from .common import FromOpt, LabOpt, Output, OutputOpt, TargetClusterOpt, console, open_store, print_json, print_warning

if TYPE_CHECKING:
    from ..datastore import Store
    from ..datastore.keys import BadRecordHandler
    from ..policy.inventory import Inventory

T = TypeVar("T")

EPILOG = (
    "Examples: overlaycni policy validate -f netpol.yaml; "
    "overlaycni policy explain x/a y/b 80/TCP --from cluster.yaml; "
    "overlaycni policy explain x/web 10.244.1.7 80/TCP --lab demo"
)
FileOpt = Annotated[str, typer.Option("--file", "-f", help="YAML with one or more NetworkPolicy documents ('-': stdin).")]

policy_app = typer.Typer(
    name="policy",
    help="Kubernetes NetworkPolicy: validate manifests, explain who may talk to whom, show the nftables.",
    no_args_is_help=True,
)


# ----- where the policies live -------------------------------------------------------------


def on_store(ctx: typer.Context, *, cluster: str | None, lab: str | None, use: Callable[[Store, str], T]) -> T:
    """``use(store, cluster)`` on the datastore of ``--cluster`` (in
    ``--datastore``) or of ``--lab`` (its own datastore and cluster)."""
    if lab and cluster:
        raise ConfigError(PolicyFieldError("--lab", "give --lab or --cluster, not both"))
    if lab:
        from ..lab import control
        from ..lab.policy import open_lab_state

        state = open_lab_state(lab)
        return control.with_store(state, lambda store: use(store, state.name))
    if not cluster:
        raise ConfigError(PolicyFieldError("--cluster", "required: the cluster name (or --lab NAME for a lab on this machine)"))
    with open_store(ctx) as store:
        return use(store, cluster)


def load_any_inventory(ctx: typer.Context, *, from_file: str | None, cluster: str | None, lab: str | None) -> Inventory:
    """The inventory of ``--from FILE``, or of the datastore of ``--cluster`` / ``--lab``."""
    from ..policy.inventory import load_inventory
    from ..policy.stored import inventory_from_store

    if from_file is not None:
        if cluster or lab:
            raise ConfigError(PolicyFieldError("--from", "give --from FILE or --cluster/--lab, not both"))
        return load_inventory(read_text(from_file))
    if not cluster and not lab:
        raise ConfigError(PolicyFieldError("--from", "required: --from FILE, or --cluster C / --lab N for a datastore"))
    with skipped_records() as on_bad:
        return on_store(ctx, cluster=cluster, lab=lab, use=lambda store, name: inventory_from_store(store, name, on_bad=on_bad))


@contextmanager
def skipped_records() -> Iterator[BadRecordHandler]:
    """A handler that collects the records a command skips because they do
    not decode (as the agents skip them); one warning each, printed at the
    end (the handler may run on a lab's control-namespace thread)."""
    bad: list[BadRecord] = []
    try:
        yield bad.append
    finally:
        for exc in bad:
            print_warning(f"skipped {exc} (the agents skip it too)")


def read_text(path: str) -> str:
    """A file's text, or stdin for ``-``; ConfigError naming the file."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(PolicyFieldError("file", f"cannot read {path}: {exc.strerror}")) from None


def _reraise(output: Output, exc: ConfigError) -> NoReturn:
    """With ``-o json`` a ConfigError is JSON on stdout (exit 2); otherwise
    it goes on to the error printer (``common.ReportingGroup``)."""
    if output is not Output.json:
        raise exc
    print_json({"valid": False, "errors": [e.to_dict() for e in exc.errors]})
    raise typer.Exit(2)


# ----- the commands ------------------------------------------------------------------------


@policy_app.command("validate", epilog=EPILOG)
def validate_cmd(file: FileOpt, output: OutputOpt = Output.table) -> None:
    """Validate NetworkPolicy manifests and print them defaulted.

    Parsing applies the API server's defaulting and validation.

    Exit status: 0 valid, 2 invalid (each error names the field path).
    """
    import yaml

    from ..policy.model import parse_policies
    from ..policy.records import policy_to_dict

    try:
        policies = parse_policies(read_text(file))
    except ConfigError as exc:
        _reraise(output, exc)
    docs = [policy_to_dict(p) for p in policies]
    if output is Output.json:
        print_json({"valid": True, "policies": docs})
    else:
        sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False) if docs else "# no policies\n")


@policy_app.command("explain", epilog=EPILOG)
def explain_cmd(
    src: Annotated[str, typer.Argument(help="Source: NAMESPACE/POD or an IPv4 or IPv6 address (with --lab also POD alone, if unambiguous).")],
    dst: Annotated[str, typer.Argument(help="Destination: NAMESPACE/POD or an IPv4 or IPv6 address (with --lab also POD alone).")],
    port: Annotated[str, typer.Argument(help="PORT/PROTOCOL, e.g. 80/TCP (protocol defaults to TCP).")],
    ctx: typer.Context,
    from_file: FromOpt = None,
    cluster: TargetClusterOpt = None,
    lab: LabOpt = None,
    family: Annotated[
        str | None,
        typer.Option("--family", help="ipv4 or ipv6: the connection's family when SRC and DST are both pods (default ipv4; an address decides it)."),
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Explain whether SRC may connect to DST on PORT/PROTOCOL.

    Prints the verdict and the policy and rule that decided it, or the
    default (allow when neither end is isolated, deny when one is).
    The pods, namespaces and policies come from --from FILE, or from the
    datastore of --cluster C / --lab N (pod IPs and nodes from IPAM).
    In a dual-stack cluster a pod is found by either address; an ipBlock
    only matches addresses of its own family, so the verdict can differ
    between IPv4 and IPv6 (--family, or give an address).

    Exit status: 0 allowed, 1 denied, 2 bad input.
    """
    from ..policy.explain import explain

    try:
        inv = load_any_inventory(ctx, from_file=from_file, cluster=cluster, lab=lab)
        _, data = explain(inv, src=src, dst=dst, port=port, bare_names=lab is not None, family=family)
    except ConfigError as exc:
        _reraise(output, exc)
    if output is Output.json:
        print_json(data)
    else:
        _print_verdict(data)
    if not data["allowed"]:
        raise typer.Exit(1)


@policy_app.command("render", epilog=EPILOG)
def render_cmd(
    ctx: typer.Context,
    node: Annotated[str, typer.Option("--node", help="The node whose table to render.")],
    from_file: FromOpt = None,
    cluster: TargetClusterOpt = None,
    lab: LabOpt = None,
    flow_logs: Annotated[
        bool, typer.Option("--flow-logs/--no-flow-logs", help="With the flow log rules of an agent at its defaults (as agents run).")
    ] = True,
    output: OutputOpt = Output.json,
) -> None:
    """Print the nftables document (nft -j) that NODE would apply.

    The inventory comes from --from FILE or the datastore of --cluster /
    --lab (what the node's agent renders). With --output table, print
    its size (rules and set elements)."""
    from ..policy.flowlog import FlowLogSpec
    from ..policy.render import counts, render_node

    inv = load_any_inventory(ctx, from_file=from_file, cluster=cluster, lab=lab)
    doc = render_node(
        node, pods=inv.pods, namespaces=inv.namespaces, policies=inv.policies, flow_log=FlowLogSpec() if flow_logs else None
    )
    if output is Output.json:
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
    else:
        rules, elements = counts(doc)
        console.print(f"table inet overlaycni for {node}: {rules} rules, {elements} set elements", highlight=False, markup=False)


@policy_app.command("apply", epilog="Examples: overlaycni policy apply -f netpol.yaml --cluster dev; ... --lab demo")
def apply_cmd(
    ctx: typer.Context,
    file: FileOpt,
    cluster: TargetClusterOpt = None,
    lab: LabOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Validate policies and store them (create or replace) in the cluster.

    Nothing is stored unless every document is valid. Exit status: 0
    stored, 2 invalid input or unknown cluster.
    """
    from ..ipam import get_cluster
    from ..policy.model import parse_policies
    from ..policy.records import load_policies, save_policies

    def store_all(store: Store, name: str) -> tuple[str, set[str]]:
        get_cluster(store, name)  # NotFound for an unknown cluster
        before = {p.key for p in load_policies(store, name, on_bad=on_bad)}  # a bad record is replaced, not fatal
        save_policies(store, name, policies=policies)
        return name, before

    try:
        policies = parse_policies(read_text(file))
        with skipped_records() as on_bad:
            cluster, before = on_store(ctx, cluster=cluster, lab=lab, use=store_all)
    except ConfigError as exc:
        _reraise(output, exc)
    done = [{"policy": p.key, "action": "configured" if p.key in before else "created"} for p in policies]
    if output is Output.json:
        print_json({"cluster": cluster, "applied": done})
    else:
        for d in done:
            console.print(f"networkpolicy {d['policy']} {d['action']}", highlight=False, markup=False)


@policy_app.command("delete", epilog="Example: overlaycni policy delete x/deny-all --cluster dev")
def delete_cmd(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAMESPACE/NAME", help="The policy to delete.")],
    cluster: TargetClusterOpt = None,
    lab: LabOpt = None,
) -> None:
    """Delete one policy. Exit status: 0 deleted, 2 not found."""
    from ..policy.records import delete_policy

    namespace, sep, name = ref.partition("/")
    if not sep or not namespace or not name:
        raise ConfigError(PolicyFieldError("policy", f"{ref!r}: expected NAMESPACE/NAME, e.g. x/deny-all"))

    def delete(store: Store, cluster: str) -> None:
        if not delete_policy(store, cluster, namespace=namespace, name=name):
            raise NotFound(f"networkpolicy {ref} not found in cluster {cluster}")

    on_store(ctx, cluster=cluster, lab=lab, use=delete)
    console.print(f"networkpolicy {ref} deleted", highlight=False, markup=False)


@policy_app.command("list", epilog="Example: overlaycni policy list --cluster dev -o json")
def list_cmd(ctx: typer.Context, cluster: TargetClusterOpt = None, lab: LabOpt = None, output: OutputOpt = Output.table) -> None:
    """List the cluster's policies."""
    from rich.table import Table

    from ..policy.records import load_policies, policy_to_dict

    with skipped_records() as on_bad:
        cluster, policies = on_store(
            ctx, cluster=cluster, lab=lab, use=lambda store, name: (name, load_policies(store, name, on_bad=on_bad))
        )
    policies = sorted(policies, key=lambda p: p.key)
    if output is Output.json:
        print_json({"cluster": cluster, "policies": [policy_to_dict(p) for p in policies]})
        return
    table = Table(title=f"NetworkPolicies in {cluster}", title_justify="left")
    for col in ("namespace", "name", "pod selector", "policy types", "ingress rules", "egress rules"):
        table.add_column(col)
    for p in policies:
        table.add_row(p.namespace, p.name, p.pod_selector.describe(), ",".join(p.policy_types), str(len(p.ingress)), str(len(p.egress)))
    console.print(table)


def _print_verdict(data: dict[str, Any]) -> None:
    from rich.table import Table

    word = "[bold green]ALLOW[/]" if data["allowed"] else "[bold red]DENY[/]"
    over = " over IPv6" if data.get("family") == "ipv6" else ""
    console.print(f"{word} {data['src']} -> {data['dst']} {data['port']}/{data['protocol']}{over}", highlight=False)
    if data["policy"]:
        decided = f"{data['policy']} {data['rule']}"
    elif data["allowed"]:
        decided = "default allow (no policy isolates either end)"
    else:
        side = "egress" if not data["egress"]["allowed"] else "ingress"
        decided = f"default deny ({side}: isolated and no rule matches)"
    console.print(f"decided by: {decided}", highlight=False, markup=False)
    console.print(f"reason: {data['reason']}", highlight=False, markup=False)
    table = Table(show_header=True, header_style="bold")
    for col in ("direction", "isolated", "verdict", "policy / rule", "selecting policies"):
        table.add_column(col)
    for key in ("egress", "ingress"):
        d = data[key]
        table.add_row(
            key,
            "yes" if d["isolated"] else "no",
            "allow" if d["allowed"] else "deny",
            f"{d['policy']} {d['rule']}" if d["policy"] else "-",
            ", ".join(d["policies"]) or "-",
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(policy_app)
