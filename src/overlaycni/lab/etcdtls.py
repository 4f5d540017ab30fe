"""The lab's etcd over TLS: its PKI, etcd's flags, and the client arguments.

With ``lab up --store etcd`` (``--etcd-tls on``, the default) the etcd in the
lab's control namespace listens only on HTTPS, for clients and peers, and
requires a client certificate signed by the lab's CA (``--client-cert-auth``)
that is not in its CRL (``--client-crl-file``). The PKI lives in
``LAB_DIR/pki`` (0700, every file 0600; ``datastore.pki`` makes it): each
node's agent gets its own certificate, ``nodes/NODE.crt``; the lab's own
commands (and ``--lab`` on the CLI) use ``operator.crt``. ``--etcd-tls off``
keeps a plain-HTTP etcd for comparison.
"""

from __future__ import annotations

from pathlib import Path

from ..datastore import pki
from ..datastore.tls import EtcdCredentials
from .state import LabState

PKI_DIR = "pki"


def uses_tls(state: LabState) -> bool:
    return state.datastore.startswith("etcds://")


def layout(state: LabState) -> pki.Layout:
    return pki.Layout(Path(state.lab_dir) / PKI_DIR)


def setup(state: LabState, nodes: list[str]) -> None:
    """The CA, etcd's certificate (for the control IP) and one client
    certificate per node; kept when they exist."""
    assert state.control_ip is not None
    pki.init_pki(layout(state).dir, etcd_addresses=[str(state.control_ip.ip)], nodes=nodes)


def ensure_node(state: LabState, node: str) -> None:
    """A client certificate for a node added later (``lab node add``)."""
    if uses_tls(state) and not layout(state).node(node)[0].exists():
        pki.init_pki(layout(state).dir, nodes=[node])


def etcd_flags(state: LabState) -> list[str]:
    """etcd's TLS flags (clients and peers; see etcd's transport security docs)."""
    lay = layout(state)
    ca, cert, key = str(lay.ca[0]), str(lay.server[0]), str(lay.server[1])
    return [
        "--cert-file", cert, "--key-file", key,
        "--client-cert-auth", "--trusted-ca-file", ca, "--client-crl-file", str(lay.crl),
        "--peer-cert-file", cert, "--peer-key-file", key,
        "--peer-client-cert-auth", "--peer-trusted-ca-file", ca,
    ]  # fmt: skip


def credentials(state: LabState, who: str = "operator") -> EtcdCredentials:
    """The settings of ``who``: "operator" or a node name."""
    lay = layout(state)
    cert, key = lay.operator if who == "operator" else lay.node(who)
    return EtcdCredentials(ca=str(lay.ca[0]), cert=str(cert), key=str(key))


def store_args(state: LabState, who: str = "operator") -> list[str]:
    """``--datastore URL`` plus, for a TLS etcd, the --etcd-* flags of ``who``."""
    args = ["--datastore", state.datastore]
    if uses_tls(state):
        c = credentials(state, who)
        args += ["--etcd-ca", str(c.ca), "--etcd-cert", str(c.cert), "--etcd-key", str(c.key)]
    return args
