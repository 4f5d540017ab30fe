"""The ``overlaycni`` entry point: the global options and the command tree.

The tree is built on first use (``app``), with every command group. A node
agent (``overlaycni agent ...``, ``install-cni``) gets a tree of its own
group only (``main``): the other groups import the lab, the policy CLI, the
certificate tools and their libraries (``cryptography``, ``ssl``, YAML),
which a long-running agent would keep resident for nothing (an idle lab
agent: VmRSS 75.5 -> 62.9 MiB, medians of 3; issue 14). The root options and
the agent's commands, help and errors are the same in both trees.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer

from .common import (
    _DATASTORE_OPTIONS,
    DatastoreOpt,
    EtcdCaOpt,
    EtcdCertOpt,
    EtcdKeyOpt,
    EtcdPasswordFileOpt,
    EtcdUserOpt,
    ReportingGroup,
)

GROUPS = ("cluster", "ipam", "agent", "flows", "lab", "lab_policy", "lab_flows", "policy", "certs", "datastore")
AGENT_COMMANDS = ("agent", "install-cni")  # registered by cli.agent alone
_ROOT_VALUE_FLAGS = frozenset(flag for _, flag, _, _ in _DATASTORE_OPTIONS)


def _new_app() -> typer.Typer:
    return typer.Typer(
    name="overlaycni",
    help=(
        "An overlay pod network for Kubernetes-style clusters, in the model of AKS "
        "Azure CNI Overlay: pods get IPs from a private pod CIDR, one block per node; "
        "cross-node traffic is VXLAN between node IPs; traffic leaving the pod CIDR is "
        "SNATed to the node IP."
    ),
    no_args_is_help=True,
    cls=ReportingGroup,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def root(
    ctx: typer.Context,
    datastore: DatastoreOpt = None,
    etcd_ca: EtcdCaOpt = None,
    etcd_cert: EtcdCertOpt = None,
    etcd_key: EtcdKeyOpt = None,
    etcd_user: EtcdUserOpt = None,
    etcd_password_file: EtcdPasswordFileOpt = None,
) -> None:
    from ..datastore.tls import EtcdCredentials

    creds = EtcdCredentials(ca=etcd_ca, cert=etcd_cert, key=etcd_key, user=etcd_user, password_file=etcd_password_file)
    ctx.obj = {"datastore": datastore, "etcd": creds}


def build(groups: tuple[str, ...] = GROUPS) -> typer.Typer:
    """The command tree with ``groups`` (modules of ``overlaycni.cli``); the whole tree has ``plan`` too."""
    tree = _new_app()
    tree.callback()(root)
    if groups == GROUPS:
        plan_cmd = importlib.import_module(f"{__package__}.plan")
        tree.command("plan", epilog=plan_cmd.EPILOG)(plan_cmd.plan)
    for name in groups:
        importlib.import_module(f"{__package__}.{name}").register(tree)
    return tree


def command_of(argv: list[str]) -> str | None:
    """The command named by ``argv`` (past the root options and their values), if any."""
    args = iter(argv)
    for arg in args:
        if arg == "--":
            return next(args, None)
        if not arg.startswith("-"):
            return arg
        if arg in _ROOT_VALUE_FLAGS:
            next(args, None)  # its value
    return None


_APP: typer.Typer | None = None


def __getattr__(name: str) -> Any:
    """``app``: the whole tree, built on first use (``from overlaycni.cli.main import app``)."""
    global _APP
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _APP is None:
        _APP = build()
    return _APP


def main() -> None:
    """The console script (errors are printed by ``ReportingGroup``): the
    agent's own tree for its commands, the whole tree otherwise."""
    tree = build(("agent",)) if command_of(sys.argv[1:]) in AGENT_COMMANDS else __getattr__("app")
    try:
        tree()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
