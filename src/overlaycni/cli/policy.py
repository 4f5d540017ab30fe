"""``overlaycni policy``: validate NetworkPolicy manifests, explain a verdict,
show the nftables a node would get.

The datastore-backed verbs (apply / delete / list, ``--cluster C`` in the
global ``--datastore``) are thin wrappers over ``policy.store_codec``
(``save_policies``, ``delete_policy``, ``load_policies``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from ..errors import ConfigError, NotFound, OverlayCNIError, PolicyFieldError
from ..policy.engine import Verdict, allowed
from ..policy.inventory import Inventory, load_inventory
from ..policy.model import PROTOCOLS, NetworkPolicy, PodInfo, parse_policies
from ..policy.render import counts, render_node
from ..policy.store_codec import delete_policy, load_namespaces, load_pods, load_policies, policy_to_dict, save_policies
from .common import Output, OutputOpt, console, open_store, print_json, report_error

ClusterOpt = Annotated[
    str | None, typer.Option("--cluster", help="Cluster name (see `overlaycni cluster list`), in --datastore.", show_default=False)
]
LabOpt = Annotated[
    str | None,
    typer.Option("--lab", help="A lab on this machine (`overlaycni lab list`): its datastore and cluster.", show_default=False),
]


def resolve_target(ctx: typer.Context, *, cluster: str | None, lab: str | None, rerun: Callable[[str], list[str]]) -> str:
    """The cluster to act on. With ``--lab`` the lab's datastore is used; for
    a lab whose store is its in-lab etcd, the command (``rerun(cluster)``)
    runs again inside the lab's control namespace and this process exits
    with its status: nothing talks to a lab address from outside the lab."""
    if lab and cluster:
        raise ConfigError(PolicyFieldError("--lab", "give --lab or --cluster, not both"))
    if not lab:
        if not cluster:
            raise ConfigError(PolicyFieldError("--cluster", "required: the cluster name (or --lab NAME for a lab on this machine)"))
        return cluster
    from ..lab import policy as lab_policy

    state = lab_policy.open_lab_state(lab)
    if state.store == "etcd":
        raise typer.Exit(lab_policy.run_in_lab(state, rerun(state.name)))
    root = ctx.find_root()
    root.obj = {**(root.obj or {}), "datastore": state.datastore}
    return state.name


def load_any_inventory(
    ctx: typer.Context, *, from_file: str | None, cluster: str | None, lab: str | None, rerun: Callable[[str], list[str]]
) -> Inventory:
    """The inventory of ``--from FILE``, or of the datastore of ``--cluster``
    / ``--lab`` (an etcd lab re-runs the command inside the lab)."""
    if from_file is not None:
        if cluster or lab:
            raise ConfigError(PolicyFieldError("--from", "give --from FILE or --cluster/--lab, not both"))
        return load_inventory(read_text(from_file))
    if not cluster and not lab:
        raise ConfigError(PolicyFieldError("--from", "required: --from FILE, or --cluster C / --lab N for a datastore"))
    name = resolve_target(ctx, cluster=cluster, lab=lab, rerun=rerun)
    store = open_store(ctx)
    try:
        return inventory_from_store(store, name)
    finally:
        store.close()


def inventory_from_store(store: Any, cluster: str) -> Inventory:
    """Pods (IP and node from the IPAM allocations, labels and ports from the
    pod records), namespaces and policies of a cluster, as the agents see them."""
    from ..agent.policy import inventory
    from ..ipam import list_allocations

    allocations = list_allocations(store, cluster)  # NotFound for an unknown cluster
    pods, namespaces = inventory(allocations, load_pods(store, cluster), load_namespaces(store, cluster))
    return Inventory(tuple(namespaces), tuple(pods), tuple(load_policies(store, cluster)))

EPILOG = (
    "Examples: overlaycni policy validate -f netpol.yaml; "
    "overlaycni policy explain x/a y/b 80/TCP --from cluster.yaml; "
    "overlaycni policy explain x/web 10.244.1.7 80/TCP --lab demo"
)


def read_text(path: str) -> str:
    """A file's text, or stdin for ``-``; ConfigError naming the file."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(PolicyFieldError("file", f"cannot read {path}: {exc.strerror}")) from None


def parse_port(text: str) -> tuple[int, str]:
    """``80``, ``80/TCP``, ``53/udp`` -> (port, PROTOCOL)."""
    number, _, proto = text.partition("/")
    proto = (proto or "TCP").upper()
    if not number.isdigit() or not 1 <= int(number) <= 65535:
        raise ConfigError(PolicyFieldError("port", f"{text!r}: expected PORT/PROTOCOL, e.g. 80/TCP (port 1-65535)"))
    if proto not in PROTOCOLS:
        raise ConfigError(PolicyFieldError("port", f"{text!r}: protocol must be TCP, UDP or SCTP"))
    return int(number), proto


def explain(inventory: Inventory, *, src: str, dst: str, port: str) -> tuple[Verdict, dict[str, Any]]:
    """The verdict for SRC -> DST PORT/PROTO and its JSON form."""
    s = inventory.endpoint(src, field="src")
    d = inventory.endpoint(dst, field="dst")
    number, proto = parse_port(port)
    v = allowed(s, d, number, proto, pods=inventory.pods, namespaces=inventory.namespaces, policies=inventory.policies)
    return v, verdict_json(v, src=s, dst=d, port=number, protocol=proto)


def _name(e: PodInfo | Any) -> str:
    return e.key if isinstance(e, PodInfo) else str(e)


def verdict_json(v: Verdict, *, src: Any, dst: Any, port: int, protocol: str) -> dict[str, Any]:
    def decision(d) -> dict[str, Any]:
        return {
            "allowed": d.allowed,
            "isolated": d.isolated,
            "policy": d.policy,
            "rule": f"{d.direction.lower()}[{d.rule}]" if d.rule is not None else None,
            "policies": list(d.policies),
            "reason": d.reason,
        }

    return {
        "src": _name(src),
        "dst": _name(dst),
        "port": port,
        "protocol": protocol,
        "allowed": v.allowed,
        "verdict": "allow" if v.allowed else "deny",
        "policy": v.policy,
        "rule": v.rule,
        "reason": v.reason,
        "egress": decision(v.egress),
        "ingress": decision(v.ingress),
    }


def validate(text: str) -> list[NetworkPolicy]:
    """Parse with defaulting; ConfigError with field paths when invalid."""
    return parse_policies(text)


def _errors_json(exc: ConfigError) -> dict[str, Any]:
    return {"valid": False, "errors": [e.to_dict() for e in exc.errors]}


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        name="policy",
        help="Kubernetes NetworkPolicy: validate manifests, explain who may talk to whom, show the nftables.",
        no_args_is_help=True,
    )

    @group.command("validate", epilog=EPILOG)
    def validate_cmd(
        file: Annotated[str, typer.Option("--file", "-f", help="YAML with one or more NetworkPolicy documents ('-': stdin).")],
        output: OutputOpt = Output.table,
    ) -> None:
        """Validate NetworkPolicy manifests and print them defaulted.

        Parsing applies the API server's defaulting and validation.

        Exit status: 0 valid, 2 invalid (each error names the field path).
        """
        try:
            policies = validate(read_text(file))
        except ConfigError as exc:
            if output is Output.json:
                print_json(_errors_json(exc))
            else:
                report_error(exc)
            raise typer.Exit(2) from None
        docs = [policy_to_dict(p) for p in policies]
        if output is Output.json:
            print_json({"valid": True, "policies": docs})
        else:
            sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False) if docs else "# no policies\n")

    @group.command("explain", epilog=EPILOG)
    def explain_cmd(
        src: Annotated[str, typer.Argument(help="Source: NAMESPACE/POD or an IPv4 address.")],
        dst: Annotated[str, typer.Argument(help="Destination: NAMESPACE/POD or an IPv4 address.")],
        port: Annotated[str, typer.Argument(help="PORT/PROTOCOL, e.g. 80/TCP (protocol defaults to TCP).")],
        ctx: typer.Context,
        from_file: Annotated[
            str | None, typer.Option("--from", help="YAML with namespaces, pods and policies ('-': stdin).", show_default=False)
        ] = None,
        cluster: ClusterOpt = None,
        lab: LabOpt = None,
        output: OutputOpt = Output.table,
    ) -> None:
        """Explain whether SRC may connect to DST on PORT/PROTOCOL.

        Prints the verdict and the policy and rule that decided it, or the
        default (allow when neither end is isolated, deny when one is).
        The pods, namespaces and policies come from --from FILE, or from the
        datastore of --cluster C / --lab N (pod IPs and nodes from IPAM).

        Exit status: 0 allowed, 1 denied, 2 bad input.
        """
        try:
            inv = load_any_inventory(
                ctx, from_file=from_file, cluster=cluster, lab=lab,
                rerun=lambda c: ["policy", "explain", src, dst, port, "--cluster", c, "--output", output.value],
            )  # fmt: skip
            _, data = explain(inv, src=src, dst=dst, port=port)
        except OverlayCNIError as exc:
            if output is Output.json and isinstance(exc, ConfigError):
                print_json(_errors_json(exc))
                raise typer.Exit(2) from None
            raise typer.Exit(report_error(exc)) from None
        if output is Output.json:
            print_json(data)
        else:
            _print_verdict(data)
        if not data["allowed"]:
            raise typer.Exit(1)

    @group.command("render", epilog=EPILOG)
    def render_cmd(
        ctx: typer.Context,
        node: Annotated[str, typer.Option("--node", help="The node whose table to render.")],
        from_file: Annotated[
            str | None, typer.Option("--from", help="YAML with namespaces, pods and policies ('-': stdin).", show_default=False)
        ] = None,
        cluster: ClusterOpt = None,
        lab: LabOpt = None,
        output: OutputOpt = Output.json,
    ) -> None:
        """Print the nftables document (nft -j) that NODE would apply.

        The inventory comes from --from FILE or the datastore of --cluster /
        --lab (what the node's agent renders). With --output table, print
        its size (rules and set elements)."""
        try:
            inv = load_any_inventory(
                ctx, from_file=from_file, cluster=cluster, lab=lab,
                rerun=lambda c: ["policy", "render", "--node", node, "--cluster", c, "--output", output.value],
            )  # fmt: skip
        except OverlayCNIError as exc:
            raise typer.Exit(report_error(exc)) from None
        doc = render_node(node, pods=inv.pods, namespaces=inv.namespaces, policies=inv.policies)
        if output is Output.json:
            sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        else:
            rules, elements = counts(doc)
            console.print(f"table inet overlaycni for {node}: {rules} rules, {elements} set elements", highlight=False)

    @group.command("apply", epilog="Examples: overlaycni policy apply -f netpol.yaml --cluster dev; ... --lab demo")
    def apply_cmd(
        ctx: typer.Context,
        file: Annotated[str, typer.Option("--file", "-f", help="YAML with one or more NetworkPolicy documents ('-': stdin).")],
        cluster: ClusterOpt = None,
        lab: LabOpt = None,
        output: OutputOpt = Output.table,
    ) -> None:
        """Validate policies and store them (create or replace) in the cluster.

        Nothing is stored unless every document is valid. Exit status: 0
        stored, 2 invalid input or unknown cluster.
        """
        try:
            cluster = resolve_target(
                ctx, cluster=cluster, lab=lab,
                rerun=lambda c: ["policy", "apply", "--file", file if file == "-" else os.path.abspath(file),
                                 "--cluster", c, "--output", output.value],
            )  # fmt: skip
            policies = validate(read_text(file))
            store = open_store(ctx)
            try:
                from ..ipam import get_cluster

                get_cluster(store, cluster)  # NotFound for an unknown cluster
                before = {p.key for p in load_policies(store, cluster)}
                save_policies(store, cluster, policies=policies)
            finally:
                store.close()
        except OverlayCNIError as exc:
            if output is Output.json and isinstance(exc, ConfigError):
                print_json(_errors_json(exc))
                raise typer.Exit(2) from None
            raise typer.Exit(report_error(exc)) from None
        done = [{"policy": p.key, "action": "configured" if p.key in before else "created"} for p in policies]
        if output is Output.json:
            print_json({"cluster": cluster, "applied": done})
        else:
            for d in done:
                console.print(f"networkpolicy {d['policy']} {d['action']}", highlight=False)

    @group.command("delete", epilog="Example: overlaycni policy delete x/deny-all --cluster dev")
    def delete_cmd(
        ctx: typer.Context,
        ref: Annotated[str, typer.Argument(metavar="NAMESPACE/NAME", help="The policy to delete.")],
        cluster: ClusterOpt = None,
        lab: LabOpt = None,
    ) -> None:
        """Delete one policy. Exit status: 0 deleted, 2 not found."""
        namespace, sep, name = ref.partition("/")
        try:
            if not sep or not namespace or not name:
                raise ConfigError(PolicyFieldError("policy", f"{ref!r}: expected NAMESPACE/NAME, e.g. x/deny-all"))
            cluster = resolve_target(ctx, cluster=cluster, lab=lab, rerun=lambda c: ["policy", "delete", ref, "--cluster", c])
            store = open_store(ctx)
            try:
                if not delete_policy(store, cluster, namespace=namespace, name=name):
                    raise NotFound(f"networkpolicy {ref} not found in cluster {cluster}")
            finally:
                store.close()
        except OverlayCNIError as exc:
            raise typer.Exit(report_error(exc)) from None
        console.print(f"networkpolicy {ref} deleted", highlight=False)

    @group.command("list", epilog="Example: overlaycni policy list --cluster dev -o json")
    def list_cmd(ctx: typer.Context, cluster: ClusterOpt = None, lab: LabOpt = None, output: OutputOpt = Output.table) -> None:
        """List the cluster's policies."""
        try:
            cluster = resolve_target(
                ctx, cluster=cluster, lab=lab, rerun=lambda c: ["policy", "list", "--cluster", c, "--output", output.value]
            )
            store = open_store(ctx)
            try:
                policies = sorted(load_policies(store, cluster), key=lambda p: p.key)
            finally:
                store.close()
        except OverlayCNIError as exc:
            raise typer.Exit(report_error(exc)) from None
        if output is Output.json:
            print_json({"cluster": cluster, "policies": [policy_to_dict(p) for p in policies]})
            return
        table = Table(title=f"NetworkPolicies in {cluster}", title_justify="left")
        for col in ("namespace", "name", "pod selector", "policy types", "ingress rules", "egress rules"):
            table.add_column(col)
        for p in policies:
            table.add_row(
                p.namespace, p.name, p.pod_selector.describe(), ",".join(p.policy_types), str(len(p.ingress)), str(len(p.egress))
            )
        console.print(table)

    app.add_typer(group)


def _print_verdict(data: dict[str, Any]) -> None:
    word = "[bold green]ALLOW[/]" if data["allowed"] else "[bold red]DENY[/]"
    console.print(f"{word} {data['src']} -> {data['dst']} {data['port']}/{data['protocol']}", highlight=False)
    if data["policy"]:
        decided = f"{data['policy']} {data['rule']}"
    elif data["allowed"]:
        decided = "default allow (no policy isolates either end)"
    else:
        side = "egress" if not data["egress"]["allowed"] else "ingress"
        decided = f"default deny ({side}: isolated and no rule matches)"
    console.print(f"decided by: {decided}", highlight=False)
    console.print(f"reason: {data['reason']}", highlight=False)
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
