"""Shared CLI plumbing: output format, the one error printer, the options
several command groups take, the network flags, the datastore."""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import typer
from typer.core import TyperGroup

from ..errors import BadRecord, ConfigError, OverlayCNIError
from . import coerce

if TYPE_CHECKING:
    from rich.console import Console

    from ..datastore import Store
    from ..datastore.tls import EtcdCredentials

coerce.install()  # plain option values are coerced without importing pydantic


class _LazyConsole:
    """A rich ``Console``, made (and rich.console imported, ~20 ms) when a
    command first prints through it: ``-o json`` and the agent never do."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def real(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)

    # special methods are looked up on the type, not through __getattr__
    def __enter__(self) -> Console:
        return self.real().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.real().__exit__(*exc)


def rich_console(out: Console) -> Console:
    """The rich ``Console`` itself, for rich objects that keep one (``Progress(console=...)``)."""
    return out.real() if isinstance(out, _LazyConsole) else out


console = cast("Console", _LazyConsole())
err_console = cast("Console", _LazyConsole(stderr=True))

F = TypeVar("F", bound=Callable[..., Any])


class Output(StrEnum):
    table = "table"
    json = "json"


OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table for people, json for scripts.")]

# ----- options shared by several command groups ---------------------------------------
# (rich renders help text as markup: a literal "[" is written "\\[")

ClusterOpt = Annotated[str, typer.Option("--cluster", help="Cluster name (see `overlaycni cluster list`).")]
ClusterNameOpt = Annotated[str, typer.Option("--name", help="Cluster name (letters, digits, '.', '_', '-').")]
LabNameOpt = Annotated[str, typer.Option("--name", help="Lab name: up to 12 of \\[a-z0-9-].")]
LabDirOpt = Annotated[
    str | None,
    typer.Option(
        "--lab-dir", envvar="OVERLAYCNI_LAB_DIR", help="Directory holding the labs (default /run/overlaycni/labs).", show_default=False
    ),
]
# ``policy`` acts on a cluster in --datastore, or on a lab on this machine
TargetClusterOpt = Annotated[
    str | None, typer.Option("--cluster", help="Cluster name (see `overlaycni cluster list`), in --datastore.", show_default=False)
]
LabOpt = Annotated[
    str | None,
    typer.Option("--lab", help="A lab on this machine (`overlaycni lab list`): its datastore and cluster.", show_default=False),
]
FromOpt = Annotated[
    str | None, typer.Option("--from", help="YAML with namespaces, pods and policies ('-': stdin).", show_default=False)
]


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# ----- errors: one printer, one place that maps exceptions to exit codes ---------------


def print_error(message: str, *, details: str | None = None, out: Console | None = None) -> None:
    """``error: MESSAGE`` on stderr (or ``out``). The text is printed
    literally: user input inside it (a name, a flag value) is never read as
    rich markup."""
    from rich.markup import escape

    out = out or err_console
    out.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    if details:
        out.print(f"[dim]{escape(details)}[/]", highlight=False)


def print_warning(message: str, *, out: Console | None = None) -> None:
    from rich.markup import escape

    (out or err_console).print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


class SkippedRecords:
    """Collects the datastore records a listing skips because they do not
    decode (the agents skip them too): pass it as ``on_bad``. Each key is
    kept once (one record can be read by several steps of one command)."""

    def __init__(self) -> None:
        self.records: dict[str, BadRecord] = {}

    def __call__(self, exc: BadRecord) -> None:
        self.records.setdefault(exc.key, exc)

    def warn(self) -> None:
        """One warning line on stderr per skipped record."""
        for exc in self.records.values():
            print_warning(f"skipped {exc} (the agents skip it too)")

    def to_json(self) -> list[dict[str, str]]:
        """``[{key, kind, reason}]`` for ``--output json``."""
        return [{"key": e.key, "kind": e.kind, "reason": e.problem} for e in self.records.values()]


def report_error(exc: OverlayCNIError) -> int:
    """Print an OverlayCNIError for a person; return the exit code."""
    if isinstance(exc, ConfigError):
        for e in exc.errors:
            print_error(str(e))
        for w in exc.warnings:
            print_warning(str(w))
    else:
        print_error(exc.message, details=exc.details)
    return 2


class ReportingGroup(TyperGroup):
    """The root command: an ``OverlayCNIError`` from any command is printed
    by ``report_error`` and becomes its exit status (no traceback), however
    the command is invoked (the console script, ``python -m``, a test runner)."""

    def invoke(self, ctx: Any) -> Any:  # ctx: the vendored click Context
        try:
            return super().invoke(ctx)
        except OverlayCNIError as exc:
            raise typer.Exit(report_error(exc)) from None


# ----- the AKS network flags, added to a command by a decorator ----------------------

_NETWORK_FLAGS: list[tuple[str, str, str]] = [
    ("network_plugin", "--network-plugin", "azure or kubenet (AKS). Required when setting pod/service ranges."),
    ("network_plugin_mode", "--network-plugin-mode", "overlay: pods get IPs from --pod-cidr, not the VNet."),
    ("vnet_cidr", "--vnet-cidr", "VNet address space (default 10.224.0.0/12)."),
    ("node_subnet_cidr", "--node-subnet-cidr", "Node subnet inside the VNet (default 10.224.0.0/16)."),
    ("pod_cidr", "--pod-cidr", "Private pod range, outside the VNet (default 10.244.0.0/16)."),
    ("service_cidr", "--service-cidr", "Service range, /12 or smaller (default 10.0.0.0/16)."),
    ("dns_service_ip", "--dns-service-ip", "Cluster DNS IP inside --service-cidr (default 10.0.0.10)."),
    ("max_pods", "--max-pods", "Max pods per node, 10..250 (default 250)."),
    ("node_cidr_size", "--node-cidr-size", "Prefix length of each node's block (default 24)."),
    ("backend", "--backend", "vxlan (encapsulate), direct (plain routing) or wireguard (encrypt) between node IPs."),
    ("vni", "--vni", "VXLAN network identifier (default 4096)."),
    ("vxlan_port", "--vxlan-port", "VXLAN UDP port (default 4789)."),
    ("wireguard_port", "--wireguard-port", "WireGuard UDP port of every node (default 51820)."),
    ("mtu", "--mtu", "Pod MTU, or auto: underlay MTU minus 50 for vxlan, 60 for wireguard (default auto)."),
    ("non_masquerade_cidrs", "--non-masquerade-cidrs", "Comma-separated destinations pods reach without SNAT."),
]


# Dual-stack (``plan``, ``cluster create`` and ``lab up``).
_DUAL_STACK_FLAGS: list[tuple[str, str, str]] = [
    ("ip_families", "--ip-families", "ipv4 (default) or ipv4,ipv6: every pod and node gets an address of each family."),
    ("vnet_cidrs", "--vnet-cidrs", "VNet ranges, one per family, IPv4 first (default 10.224.0.0/12,fd00:10:224::/48)."),
    (
        "node_subnet_cidrs",
        "--node-subnet-cidrs",
        "Node subnets, one per family, IPv4 first; IPv6 a /64 (default 10.224.0.0/16,fd00:10:224::/64).",
    ),
    (
        "pod_cidrs",
        "--pod-cidrs",
        "Pod ranges, one per family, IPv4 first (default 10.244.0.0/16,fd12:3456:789a::/64). "
        "--pod-cidr is the IPv4 entry: give either, or both when they agree.",
    ),
    (
        "service_cidrs",
        "--service-cidrs",
        "Service ranges, one per family, IPv4 first; IPv6 /108 or smaller (default 10.0.0.0/16,fd12:3456:789a:1::/108).",
    ),
    ("node_cidr_size_v6", "--node-cidr-size-v6", "Prefix length of each node's IPv6 block (default 80, as AKS carves)."),
]


def with_network_flags(func: F) -> F:
    """Add every AKS network flag to a typer command. The command receives
    them as one ``network: dict`` of the flags the user gave (keys are the
    flag names without dashes)."""
    return _add_flags(func, [(*f, "Network (AKS flags)") for f in _NETWORK_FLAGS])


def with_dual_stack_network_flags(func: F) -> F:
    """``with_network_flags`` plus the dual-stack flags (``--ip-families``,
    ``--pod-cidrs``, ...), in their own help panel."""
    return _add_flags(
        func,
        [(*f, "Network (AKS flags)") for f in _NETWORK_FLAGS] + [(*f, "Dual-stack (AKS flags)") for f in _DUAL_STACK_FLAGS],
    )


def _add_flags(func: F, flags: list[tuple[str, str, str, str]]) -> F:
    sig = inspect.signature(func, eval_str=True)
    params = [p for p in sig.parameters.values() if p.name != "network"]
    extra = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[str | None, typer.Option(flag, help=help_, rich_help_panel=panel)],
        )
        for name, flag, help_, panel in flags
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        network = {flag[2:]: kwargs.pop(name) for name, flag, _, _ in flags if kwargs.get(name) is not None}
        for name, _, _, _ in flags:
            kwargs.pop(name, None)
        return func(*args, network=network, **kwargs)

    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword = [p for p in params if p.kind == p.KEYWORD_ONLY]
    wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=positional + [p.replace(kind=p.KEYWORD_ONLY) for p in keyword] + extra
    )
    return wrapper  # type: ignore[return-value]


# ----- the datastore: global options, and the one place that opens it ---------------------

DATASTORE_PANEL = "Datastore"

# (parameter, flag, environment variable, help) of the datastore options, in help order
_DATASTORE_OPTIONS = (
    (
        "datastore",
        "--datastore",
        "OVERLAYCNI_DATASTORE",
        "sqlite:///path/state.db (default sqlite:///var/lib/overlaycni/state.db), "
        "etcds://host:port[,host:port...] (etcd over TLS, with --etcd-ca/--etcd-cert/--etcd-key) "
        "or etcd://127.0.0.1:port (plain HTTP, for a loopback etcd only).",
    ),
    ("etcd_ca", "--etcd-ca", "OVERLAYCNI_ETCD_CA", "etcds://: the CA certificate (PEM) that signed etcd's server certificate."),
    ("etcd_cert", "--etcd-cert", "OVERLAYCNI_ETCD_CERT", "etcds://: this client's certificate (PEM); re-read when the file changes."),
    ("etcd_key", "--etcd-key", "OVERLAYCNI_ETCD_KEY", "etcds://: the private key of --etcd-cert (PEM, unencrypted, mode 0600)."),
    ("etcd_user", "--etcd-user", "OVERLAYCNI_ETCD_USER", "etcd user, when the operator enabled etcd's authentication."),
    (
        "etcd_password_file",
        "--etcd-password-file",
        "OVERLAYCNI_ETCD_PASSWORD_FILE",
        "File holding --etcd-user's password (or set OVERLAYCNI_ETCD_PASSWORD); never on the command line.",
    ),
)


def _global_option(name: str) -> Any:
    _, flag, env, help_ = next(o for o in _DATASTORE_OPTIONS if o[0] == name)
    return Annotated[str | None, typer.Option(flag, envvar=env, help=help_, rich_help_panel=DATASTORE_PANEL)]


# the global options (``overlaycni --datastore ... COMMAND``), read from the environment too
DatastoreOpt = _global_option("datastore")
EtcdCaOpt = _global_option("etcd_ca")
EtcdCertOpt = _global_option("etcd_cert")
EtcdKeyOpt = _global_option("etcd_key")
EtcdUserOpt = _global_option("etcd_user")
EtcdPasswordFileOpt = _global_option("etcd_password_file")


def with_datastore_options(func: F) -> F:
    """Accept the global datastore options after the command name too
    (``overlaycni agent --datastore etcds://... --etcd-cert ...``, the way a
    systemd unit writes it). Given values replace the global ones for this
    command; the environment is read once, by the global options. The
    command must take ``ctx: typer.Context``."""
    sig = inspect.signature(func, eval_str=True)
    if "ctx" not in sig.parameters:
        raise TypeError(f"{func.__name__} needs a ctx: typer.Context parameter for with_datastore_options")
    extra = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                str | None,
                typer.Option(flag, help=f"{help_} Default: the global {flag} (or its environment variable).", rich_help_panel=DATASTORE_PANEL),
            ],
        )
        for name, flag, _, help_ in _DATASTORE_OPTIONS
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name, None) for name, _, _, _ in _DATASTORE_OPTIONS}
        if any(v is not None for v in given.values()):
            root = sig.bind_partial(*args, **kwargs).arguments["ctx"].find_root()
            obj = dict(root.obj or {})
            if given["datastore"] is not None:
                obj["datastore"] = given.pop("datastore")
            given.pop("datastore", None)
            changes = {name[5:]: value for name, value in given.items() if value is not None}
            obj["etcd"] = {**(obj.get("etcd") or {}), **changes}
            root.obj = obj
        return func(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def datastore_url(ctx: typer.Context) -> str | None:
    """``--datastore`` as given; None: OVERLAYCNI_DATASTORE or the default."""
    obj = ctx.find_root().obj or {}
    return obj.get("datastore")


def etcd_credentials(ctx: typer.Context) -> EtcdCredentials:
    """The --etcd-* global options (typer has filled them from the
    OVERLAYCNI_ETCD_* environment where not given)."""
    from ..datastore.tls import EtcdCredentials

    obj = ctx.find_root().obj or {}
    return EtcdCredentials(**(obj.get("etcd") or {}))


def warn_plain_etcd(url: str | None) -> None:
    from ..datastore import plain_etcd_warning

    warning = plain_etcd_warning(url)
    if warning:
        print_warning(warning)


def open_store(ctx: typer.Context) -> Store:
    """Open the datastore named by ``--datastore`` / OVERLAYCNI_DATASTORE,
    with the --etcd-* options: every command opens its store here."""
    from ..datastore import open_datastore

    url = datastore_url(ctx)
    warn_plain_etcd(url)
    return open_datastore(url, credentials=etcd_credentials(ctx))
