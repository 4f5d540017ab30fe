"""The ``overlaycni`` entry point: the global options and the command tree.

The tree is lazy: the root knows each top-level command by name and by the
first paragraph of its help (``LAZY_COMMANDS``, checked against the real
commands by tests/unit/test_cli_lazy.py), and imports a command's module
the first time that command is resolved. ``overlaycni --help`` imports no
command module; ``overlaycni ipam show`` imports ``cli.ipam`` alone, and a
node agent (``overlaycni agent ...``, ``install-cni``) ``cli.agent`` alone:
the other groups import the lab, the policy CLI, the certificate tools and
their libraries (``cryptography``, ``ssl``, YAML), which a long-running
agent would keep resident for nothing (issue 14). Commands, help, output and
errors are those of the whole tree (``build()``, the eager form, which the
tests compare against).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any, NamedTuple

import typer
import typer.main
from typer.core import TyperCommand

from .common import (
    DatastoreOpt,
    EtcdCaOpt,
    EtcdCertOpt,
    EtcdKeyOpt,
    EtcdPasswordFileOpt,
    EtcdUserOpt,
    ReportingGroup,
)

GROUPS = ("cluster", "ipam", "agent", "flows", "lab", "lab_policy", "lab_flows", "policy", "certs", "datastore")


class LazyCommand(NamedTuple):
    """A top-level command: the ``overlaycni.cli`` modules that define it
    (the first registers it) and its help in ``overlaycni --help``."""

    modules: tuple[str, ...]
    help: str


# In the order of ``overlaycni --help`` (typer lists a tree's commands before its groups).
LAZY_COMMANDS: dict[str, LazyCommand] = {
    "plan": LazyCommand(
        ("plan",),
        "Validate a cluster network like AKS does, then show how many nodes and\n"
        "pods overlay, flat Azure CNI and kubenet can run on the same VNet.",
    ),
    "install-cni": LazyCommand(("agent",), "Install the plugin executable and 10-overlaycni.conflist for the container runtime."),
    "flows": LazyCommand(
        ("flows",),
        "Show the new flows one node's NetworkPolicy table decided: who talked to\n"
        "whom, allowed or denied, and which policy decided.",
    ),
    "cluster": LazyCommand(
        ("cluster",),
        "Cluster networks in the datastore. Example: overlaycni --datastore sqlite:///tmp/s.db "
        "cluster create --name dev --network-plugin azure --network-plugin-mode overlay",
    ),
    "node": LazyCommand(
        ("cluster",), "Nodes and their pod CIDR blocks. Example: overlaycni node register --cluster dev --name n1 --node-ip 10.224.0.4"
    ),
    "ipam": LazyCommand(
        ("ipam",), "Pod IP addresses. Example: overlaycni ipam allocate --cluster dev --node n1 --container-id abc --ifname eth0"
    ),
    "agent": LazyCommand(("agent",), "The node agent: joins this node to the overlay, keeps peers programmed, serves the CNI plugin."),
    "lab": LazyCommand(
        ("lab", "lab_policy", "lab_flows"),
        "A whole overlay cluster on this machine: a VNet, nodes with the real agent, pods through the real plugin.",
    ),
    "policy": LazyCommand(
        ("policy",), "Kubernetes NetworkPolicy: validate manifests, explain who may talk to whom, show the nftables."
    ),
    "certs": LazyCommand(
        ("certs",),
        "Certificates for etcd over TLS: a CA, etcd's server certificate, one client certificate per node and one "
        "for the operator's CLI. Example: overlaycni certs init --dir /etc/overlaycni/pki --etcd-address "
        "10.224.0.4,10.224.0.5,10.224.0.6 --node node1,node2,node3",
    ),
    "datastore": LazyCommand(
        ("datastore",),
        "Read and write the datastore's keys, back them up and restore them (SQLite or etcd; --lab NAME for a lab's "
        "own store). Records are JSON; the key layout is in src/overlaycni/datastore/keys.py.",
    ),
}


def _new_app(cls: type[ReportingGroup] = ReportingGroup) -> typer.Typer:
    return typer.Typer(
    name="overlaycni",
    help=(
        "An overlay pod network for Kubernetes-style clusters, in the model of AKS "
        "Azure CNI Overlay: pods get IPs from a private pod CIDR, one block per node; "
        "cross-node traffic is VXLAN between node IPs; traffic leaving the pod CIDR is "
        "SNATed to the node IP."
    ),
    no_args_is_help=True,
    cls=cls,
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
    # the --etcd-* values as given: ``etcd_credentials`` makes them an
    # EtcdCredentials when a command opens the store (the datastore package
    # is not imported for a command that has none)
    etcd = {"ca": etcd_ca, "cert": etcd_cert, "key": etcd_key, "user": etcd_user, "password_file": etcd_password_file}
    ctx.obj = {"datastore": datastore, "etcd": etcd}


def _register(tree: typer.Typer, module: str) -> None:
    importlib.import_module(f"{__package__}.{module}").register(tree)


def build(groups: tuple[str, ...] = GROUPS) -> typer.Typer:
    """The eager command tree with ``groups`` (modules of ``overlaycni.cli``,
    all imported now); the whole tree has ``plan`` too. ``app`` is the lazy
    form of ``build()``."""
    tree = _new_app()
    tree.callback()(root)
    if groups == GROUPS:
        _register(tree, "plan")
    for name in groups:
        _register(tree, name)
    return tree


def _load(name: str) -> dict[str, Any]:
    """The click commands of the modules that define top-level command
    ``name``: everything they register, converted as in the whole tree."""
    sub = _new_app()
    for module in LAZY_COMMANDS[name].modules:
        _register(sub, module)
    return dict(typer.main.get_group(sub).commands)


class _LazyCommands(MutableMapping[str, Any]):
    """The root's ``commands``: every name in ``LAZY_COMMANDS`` from the
    start (typer's "did you mean" reads the keys), each command loaded
    (``_load``) when it is first looked up."""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] = {}
        self._added: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name in self._added:
            return self._added[name]
        if name not in LAZY_COMMANDS:
            raise KeyError(name)
        if name not in self._loaded:
            self._loaded.update(_load(name))
        return self._loaded[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._added[name] = command

    def __delitem__(self, name: str) -> None:
        del self._added[name]

    def __iter__(self) -> Iterator[str]:
        yield from LAZY_COMMANDS
        yield from (n for n in self._added if n not in LAZY_COMMANDS)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: object) -> bool:
        return name in LAZY_COMMANDS or name in self._added


class LazyGroup(ReportingGroup):
    """The root command of ``app``: commands are imported when resolved;
    its own help lists them from ``LAZY_COMMANDS`` without importing them."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        added = self.commands
        self.commands = _LazyCommands()
        self.commands.update(added)
        self._listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        lazy = LAZY_COMMANDS.get(cmd_name)
        if self._listing and lazy is not None:
            return TyperCommand(cmd_name, help=lazy.help)  # all that the help's command table reads
        return self.commands.get(cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


def lazy_app() -> typer.Typer:
    """The whole tree, each command imported when it is first resolved."""
    tree = _new_app(LazyGroup)
    tree.callback()(root)
    return tree


app = lazy_app()


def main() -> None:
    """The console script (errors are printed by ``ReportingGroup``)."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
