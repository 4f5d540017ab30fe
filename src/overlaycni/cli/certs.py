"""``overlaycni certs ...``: the etcd CA, etcd's server certificate and the
client certificates of nodes and operators (the work is in ``datastore.pki``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from .common import Output, OutputOpt, console, print_json

certs_app = typer.Typer(
    help="Certificates for etcd over TLS: a CA, etcd's server certificate, one client certificate per node "
    "and one for the operator's CLI. Example: overlaycni certs init --dir /etc/overlaycni/pki "
    "--etcd-address 10.224.0.4,10.224.0.5,10.224.0.6 --node node1,node2,node3",
    no_args_is_help=True,
)

DirOpt = Annotated[str, typer.Option("--dir", help="Directory of the PKI (created 0700; every file in it is 0600).")]
DaysOpt = Annotated[int, typer.Option("--days", min=1, max=3650, help="Validity of the certificates issued now, in days.")]

INIT_EPILOG = """\
What it writes in --dir:

  ca.crt, ca.key         the CA: ca.crt goes to every node and etcd
                         member; ca.key stays on this machine.
  etcd-server.crt, .key  etcd's certificate, for every member (also as
                         its peer certificate). Its names (SANs) are the
                         --etcd-address list plus 127.0.0.1, localhost.
  operator.crt, .key     for the operator's CLI on this machine.
  nodes/NAME.crt, .key   one per --node, for that node's agent only.

etcd then runs with (see the README's real-node recipe):

  --cert-file etcd-server.crt --key-file etcd-server.key
  --client-cert-auth --trusted-ca-file ca.crt
  --listen-client-urls https://IP:2379
  --advertise-client-urls https://IP:2379

and every client with:

  overlaycni --datastore etcds://IP:2379 --etcd-ca ca.crt \\
    --etcd-cert nodes/NAME.crt --etcd-key nodes/NAME.key ...
  (or OVERLAYCNI_ETCD_CA, OVERLAYCNI_ETCD_CERT, OVERLAYCNI_ETCD_KEY)

Re-running is safe: existing files are kept (and checked against the
CA and the address list); new --node names get certificates. --force
re-issues the server, operator and named node certificates from the
existing CA. The CA is never replaced: to start over, remove ca.crt
and ca.key, then run with --force. To rotate a client certificate,
see `overlaycni certs renew --help`.
"""

RENEW_EPILOG = """\
A running agent notices new files within a second or two, checks that
the key matches the certificate, and uses them for its next
connections (its watch re-connects too): no restart. Install the
certificate and key together (write each, then rename into place).
With --revoke-old, etcd refuses the old certificates once crl.pem is
copied to its members (--client-crl-file): do that after the nodes
have their new files.
"""

REVOKE_EPILOG = """\
etcd reads its --client-crl-file at every new connection: copy crl.pem
to every member and the revoked certificates are refused from then on
(connections already open stay until they close).
"""


def _emit(directory: str, files: list, output: Output, *, title: str) -> None:
    from rich.table import Table

    if output is Output.json:
        print_json({"dir": directory, "files": [f.to_dict() for f in files]})
        return
    table = Table(title=title)
    for col in ("kind", "name", "file", "action", "names (SAN)", "valid until"):
        table.add_column(col)
    for f in files:
        table.add_row(f.kind, f.name, os.path.relpath(f.cert, directory), f.action, ", ".join(f.sans), f"{f.not_after:%Y-%m-%d}")
    console.print(table)


@certs_app.command("init", epilog=INIT_EPILOG)
def init(
    directory: DirOpt,
    etcd_address: Annotated[
        list[str] | None,
        typer.Option(
            "--etcd-address",
            help="IP or DNS name clients use to reach etcd; comma-separated or repeated (one per member). "
            "Required the first time.",
        ),
    ] = None,
    node: Annotated[
        list[str] | None,
        typer.Option("--node", help="Node name(s) to issue a client certificate for; comma-separated or repeated."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-issue the certificates named here even if they exist.")] = False,
    days: DaysOpt = 365,
    output: OutputOpt = Output.table,
) -> None:
    """Create a CA, etcd's server certificate and client certificates (files 0600)."""
    from ..datastore import pki

    files = pki.init_pki(
        directory,
        etcd_addresses=pki.parse_addresses(etcd_address or []),
        nodes=pki.parse_names(node or []),
        force=force,
        days=days,
    )
    _emit(directory, files, output, title=f"certificates in {directory}")


@certs_app.command("renew", epilog=RENEW_EPILOG)
def renew(
    directory: DirOpt,
    node: Annotated[
        list[str] | None, typer.Option("--node", help="Node(s) whose client certificate to re-issue.")
    ] = None,
    operator: Annotated[bool, typer.Option("--operator", help="Re-issue the operator's client certificate.")] = False,
    server: Annotated[bool, typer.Option("--server", help="Re-issue etcd's server certificate (same names).")] = False,
    revoke_old: Annotated[
        bool, typer.Option("--revoke-old", help="Add the replaced certificates to crl.pem (etcd's --client-crl-file).")
    ] = False,
    days: DaysOpt = 365,
    output: OutputOpt = Output.table,
) -> None:
    """Re-issue certificates with new keys from the same CA (rotation)."""
    from ..datastore import pki

    files = pki.renew(
        directory, nodes=pki.parse_names(node or []), operator=operator, server=server, revoke_old=revoke_old, days=days
    )
    _emit(directory, files, output, title=f"re-issued in {directory}")


@certs_app.command("revoke", epilog=REVOKE_EPILOG)
def revoke(
    directory: DirOpt,
    serial: Annotated[list[str], typer.Option("--serial", help="Serial(s) to revoke, hex as `certs show` prints them.")],
    output: OutputOpt = Output.table,
) -> None:
    """Revoke client certificates: add them to crl.pem."""
    from ..datastore import pki

    serials = [x.strip() for raw in serial for x in raw.split(",") if x.strip()]
    total = pki.revoke(directory, serials)
    if output is Output.json:
        print_json({"crl": str(pki.Layout(Path(directory)).crl), "revoked": total})
    else:
        console.print(f"{pki.Layout(Path(directory)).crl} now revokes {total} certificate(s); copy it to every etcd member")


@certs_app.command("show")
def show(directory: DirOpt, output: OutputOpt = Output.table) -> None:
    """List the certificates in --dir: names, serials, expiry."""
    from ..datastore import pki

    _emit(directory, pki.show(directory), output, title=f"certificates in {directory}")


def register(app: typer.Typer) -> None:
    app.add_typer(certs_app, name="certs")
