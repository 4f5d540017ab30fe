"""``overlaycni datastore``: read, write, back up and restore the datastore's
keys by hand (parse, dispatch, format). SQLite has no other tool; for etcd
it saves reaching for etcdctl with the right certificates.

Every verb works on the global ``--datastore`` (with the ``--etcd-*``
options), or on a lab's own store with ``--lab NAME``: its SQLite file, or
its in-lab etcd reached from inside the lab's control namespace
(``lab.control.with_store``), never from the host's namespace. The backup
format and the restore rules live in ``datastore.backup``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from ..datastore import Store
from ..datastore import backup as bk
from ..datastore.keys import CLUSTERS, ROOT
from ..errors import NotFound, UsageError
from .common import LabDirOpt, LabOpt, Output, OutputOpt, console, err_console, open_store, print_json, with_datastore_options

T = TypeVar("T")

datastore_app = typer.Typer(
    name="datastore",
    help=(
        "Read and write the datastore's keys, back them up and restore them (SQLite or etcd; "
        "--lab NAME for a lab's own store). Records are JSON; the key layout is in "
        "src/overlaycni/datastore/keys.py."
    ),
    no_args_is_help=True,
)

KeyArg = Annotated[str, typer.Argument(metavar="KEY", help="A key, e.g. /overlaycni/clusters/prod/config (with --prefix: a prefix).")]
PrefixOpt = Annotated[bool, typer.Option("--prefix", help="KEY is a prefix: every key that starts with it.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Do it even though it replaces or deletes everything (see above).")]


def on_store(ctx: typer.Context, lab: str | None, lab_dir: str | None, use: Callable[[Store], T]) -> T:
    """``use(store)`` on ``--lab``'s store, else on the global ``--datastore``."""
    if lab is not None:
        from ..lab import control
        from ..lab.policy import open_lab_state

        return control.with_store(open_lab_state(lab, lab_dir), use)
    with open_store(ctx) as store:
        return use(store)


def _check_key(key: str) -> str:
    if not key:
        raise UsageError("must not be empty (every key starts with /; `datastore get / --prefix` lists them all)", field="KEY")
    return key


def _covers_everything(prefix: str) -> bool:
    """A prefix that takes in all of overlaycni's keys, or every cluster."""
    return ROOT.startswith(prefix) or CLUSTERS.startswith(prefix)


@datastore_app.command("get", epilog="Examples: overlaycni datastore get /overlaycni/clusters/prod/ --prefix -o json; ... --lab demo")
@with_datastore_options
def get_cmd(
    ctx: typer.Context,
    key: KeyArg,
    prefix: PrefixOpt = False,
    lab: LabOpt = None,
    lab_dir: LabDirOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Print a key's value, or with --prefix every key under it.

    JSON (-o json): a list of {key, value}, in key order. A single KEY
    that does not exist is an error (exit 2); a prefix may match nothing.
    """
    from rich.table import Table

    _check_key(key)
    snap = on_store(ctx, lab, lab_dir, lambda store: store.read(prefixes=[key]) if prefix else store.read(keys=[key]))
    if not prefix and not snap.kvs:
        raise NotFound(f"KEY: {key} does not exist (at revision {snap.revision}); list a prefix with --prefix")
    if output is Output.json:
        print_json([{"key": kv.key, "value": kv.value} for kv in snap.kvs])
        return
    table = Table(title=f"{len(snap.kvs)} key(s) at revision {snap.revision}", title_justify="left")
    table.add_column("key", no_wrap=True)
    table.add_column("revision", justify="right")
    table.add_column("lease")
    table.add_column("value", overflow="fold")
    for kv in snap.kvs:
        table.add_row(kv.key, str(kv.revision), f"{kv.lease:x}" if kv.lease else "-", kv.value, style=None)
    console.print(table, markup=False, highlight=False)


@datastore_app.command("put", epilog="Example: echo '{...}' | overlaycni datastore put /overlaycni/clusters/prod/namespaces/x -")
@with_datastore_options
def put_cmd(
    ctx: typer.Context,
    key: KeyArg,
    value: Annotated[str, typer.Argument(metavar="VALUE", help="The value ('-': read it from stdin).")],
    lab: LabOpt = None,
    lab_dir: LabDirOpt = None,
) -> None:
    """Write VALUE at KEY (created or replaced), without a lease.

    Nothing checks VALUE: a record that does not decode is skipped by the
    agents and counted in overlaycni_bad_records_total{kind}.
    """
    _check_key(key)
    if value == "-":
        value = sys.stdin.read()
    revision = on_store(ctx, lab, lab_dir, lambda store: store.put(key, value))
    console.print(f"put {key} (revision {revision})", markup=False, highlight=False)


@datastore_app.command("delete", epilog="Example: overlaycni datastore delete /overlaycni/clusters/old/ --prefix")
@with_datastore_options
def delete_cmd(
    ctx: typer.Context,
    key: KeyArg,
    prefix: PrefixOpt = False,
    force: ForceOpt = False,
    lab: LabOpt = None,
    lab_dir: LabDirOpt = None,
) -> None:
    """Delete KEY, or with --prefix every key under it.

    A prefix that takes in all of overlaycni's keys or every cluster
    (/, /overlaycni/, /overlaycni/clusters/ ...) is refused without
    --force. A single KEY that does not exist is an error (exit 2).
    """
    _check_key(key)
    if prefix and _covers_everything(key) and not force:
        raise UsageError(f"{key!r} with --prefix takes in every cluster's keys; give --force to delete them all", field="KEY")
    if prefix:
        count = on_store(ctx, lab, lab_dir, lambda store: store.delete_prefix(key))
    else:
        if not on_store(ctx, lab, lab_dir, lambda store: store.delete(key)):
            raise NotFound(f"KEY: {key} does not exist; nothing deleted")
        count = 1
    console.print(f"deleted {count} key(s)", markup=False, highlight=False)


BACKUP_HELP = f"""Save every key under {ROOT} to FILE, read at one revision.

The file is versioned JSON (format {bk.FORMAT!r}, version {bk.VERSION}) with
the revision it was taken at and every key and value; it is written 0600
and never over an existing file unless --force. FILE '-' writes to stdout.
Keys under a lease (the nodes' liveness records) are saved, marked "leased", but
`restore` does not write them back (see its --help).
"""


@datastore_app.command("backup", help=BACKUP_HELP, epilog="Example: overlaycni datastore backup /root/overlaycni-$(date +%F).json")
@with_datastore_options
def backup_cmd(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(metavar="FILE", help="Where to write the backup ('-': stdout).")],
    force: Annotated[bool, typer.Option("--force", help="Replace FILE if it exists.")] = False,
    lab: LabOpt = None,
    lab_dir: LabDirOpt = None,
) -> None:
    if file != "-" and os.path.lexists(file) and not force:
        raise UsageError(f"{file} exists; give --force to replace it", field="FILE")
    taken = on_store(ctx, lab, lab_dir, bk.take)
    text = taken.to_json() + "\n"
    if file == "-":
        sys.stdout.write(text)
    else:
        _write_private(Path(file), text)
    leased = sum(1 for e in taken.entries if e.leased)
    (err_console if file == "-" else console).print(
        f"backed up {len(taken.entries)} key(s) at revision {taken.revision}"
        + (f" ({leased} under a lease, not restored)" if leased else "")
        + ("" if file == "-" else f" to {file}"),
        markup=False,
        highlight=False,
    )


def _write_private(path: Path, text: str) -> None:
    """0600, written under a temporary name and renamed (never half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror}", field="FILE") from None


RESTORE_HELP = f"""Write the keys of a backup FILE back into the datastore.

Into an empty store (no key under {ROOT}), or with --force into one that
has keys: then keys that differ are replaced and keys the backup does not
hold are deleted. Leases are not restored: the nodes' liveness records
(leases/NODE, saved "leased") are skipped, and each comes back when its
agent renews it (within its resync interval; an agent that is not running
when it starts). Node records are restored; liveness records in the store
are left alone. A restore is
written in chunks, not one transaction: if it is interrupted, run it again
with --force. FILE '-' reads stdin.
"""


@datastore_app.command("restore", help=RESTORE_HELP, epilog="Example: overlaycni datastore restore /root/overlaycni-2025-01-31.json")
@with_datastore_options
def restore_cmd(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(metavar="FILE", help="A file written by `datastore backup` ('-': stdin).")],
    force: Annotated[bool, typer.Option("--force", help="Restore into a store that has keys, replacing them.")] = False,
    lab: LabOpt = None,
    lab_dir: LabDirOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {file}: {exc.strerror}", field="FILE") from None
    saved = bk.parse(text)
    rep = on_store(ctx, lab, lab_dir, lambda store: bk.restore(store, saved, force=force))
    if output is Output.json:
        print_json({"from_revision": saved.revision, "written": rep.written, "unchanged": rep.unchanged,
                    "deleted": rep.deleted, "skipped_leased": rep.skipped_leased, "revision": rep.revision})  # fmt: skip
        return
    console.print(
        f"restored {rep.written + rep.unchanged} key(s) from revision {saved.revision} ({rep.written} written, "
        f"{rep.unchanged} unchanged), deleted {rep.deleted}, skipped {rep.skipped_leased} key(s) under a lease "
        f"(liveness records: their agents renew them); the store is at revision {rep.revision}",
        markup=False,
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.add_typer(datastore_app)
