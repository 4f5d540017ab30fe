"""The datastore: one ``Store`` protocol, two backends, chosen by URL.

* ``sqlite:///path/state.db`` — embedded default
  (``sqlite:///var/lib/overlaycni/state.db``), several processes on one machine.
* ``etcds://host:port[,host:port...]`` — etcd v3 through its JSON gateway
  over HTTPS, with a client certificate (``EtcdCredentials``: ``--etcd-ca``,
  ``--etcd-cert``, ``--etcd-key``) and, where the operator enabled it,
  etcd's user auth (``--etcd-user`` + a password file).
* ``etcd://host:port[,host:port...]`` — the same over plain HTTP: for a
  development etcd on loopback only (``plain_etcd_warning`` says so).

``open_datastore(None)`` reads ``OVERLAYCNI_DATASTORE`` and falls back to
the sqlite default; credentials not given come from ``OVERLAYCNI_ETCD_*``.
"""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

from ..errors import DatastoreURLError
from .base import DEFAULT_URL, ENV_VAR, KV, Event, Snapshot, Store, TxnResult, prefix_end
from .tls import EtcdCredentials

__all__ = [
    "KV",
    "Event",
    "Snapshot",
    "Store",
    "TxnResult",
    "DEFAULT_URL",
    "ENV_VAR",
    "EtcdCredentials",
    "open_datastore",
    "parse_url",
    "plain_etcd_warning",
    "prefix_end",
]

_EXAMPLES = "expected sqlite:///path/state.db, etcds://host:port[,host:port...] or etcd://127.0.0.1:port"


def parse_url(url: str) -> tuple[str, str | list[tuple[str, int]]]:
    """Split a datastore URL into ("sqlite", path) or ("etcd" | "etcds",
    [(host, port)]). Raises ``DatastoreURLError`` naming the problem."""
    text = (url or "").strip()
    if "://" not in text:
        raise DatastoreURLError(f"--datastore {text!r} is not a datastore URL ({_EXAMPLES})")
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme == "sqlite":
        if not rest.startswith("/"):
            raise DatastoreURLError(
                f"--datastore {text!r}: the sqlite path must be absolute, e.g. sqlite:///var/lib/overlaycni/state.db"
            )
        if "?" in rest or "#" in rest:
            raise DatastoreURLError(f"--datastore {text!r}: query strings are not supported")
        if rest.endswith("/") or rest == "/":
            raise DatastoreURLError(f"--datastore {text!r}: the sqlite path names a directory, not a file")
        return "sqlite", rest
    if scheme in ("etcd", "etcds"):
        parts = urlsplit("etcd://" + rest)
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise DatastoreURLError(f"--datastore {text!r}: an etcd URL holds only host:port pairs ({_EXAMPLES})")
        endpoints: list[tuple[str, int]] = []
        for item in parts.netloc.split(","):
            item = item.strip()
            if not item:
                raise DatastoreURLError(f"--datastore {text!r}: empty endpoint in the host:port list")
            if item.startswith("["):
                host, _, port_text = item[1:].partition("]:")
            else:
                host, _, port_text = item.rpartition(":")
            if not host or not port_text:
                raise DatastoreURLError(f"--datastore {text!r}: endpoint {item!r} is not host:port (e.g. 127.0.0.1:2379)")
            try:
                port = int(port_text)
            except ValueError:
                port = 0
            if not 1 <= port <= 65535:
                raise DatastoreURLError(f"--datastore {text!r}: endpoint {item!r} has an invalid port {port_text!r}")
            endpoints.append((host, port))
        return scheme, endpoints
    raise DatastoreURLError(f"--datastore {text!r}: unknown scheme {scheme!r} ({_EXAMPLES})")


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_etcd_warning(url: str | None) -> str | None:
    """A warning for an ``etcd://`` URL (plain HTTP) that leaves this
    machine, else None."""
    try:
        kind, where = parse_url(url or "")
    except DatastoreURLError:
        return None
    if kind != "etcd":
        return None
    if isinstance(where, str):
        return None
    remote = [f"{h}:{p}" for h, p in where if not _loopback(h)]
    if not remote:
        return None
    return (
        f"--datastore {url}: plain HTTP to {', '.join(remote)}; anyone on the path can read and rewrite the "
        "cluster's state. Use etcds:// with --etcd-ca/--etcd-cert/--etcd-key (etcd:// is for a loopback etcd)"
    )


def open_datastore(url: str | None, *, credentials: EtcdCredentials | None = None) -> Store:
    """Open the datastore named by ``url`` (None: ``OVERLAYCNI_DATASTORE``
    or the sqlite default). ``credentials`` (etcd only): settings not given
    come from the ``OVERLAYCNI_ETCD_*`` environment. Raises
    ``DatastoreURLError`` for a malformed URL, ``DatastoreCredentialsError``
    for missing or broken TLS/auth settings, ``DatastoreAuthError`` when etcd
    and we do not accept each other and ``DatastoreUnavailable`` when the
    store cannot be reached."""
    if url is None or not str(url).strip():
        url = os.environ.get(ENV_VAR) or DEFAULT_URL
    kind, where = parse_url(url)
    if isinstance(where, str):  # sqlite: a path (etcd: a list of endpoints)
        from .sqlite import SQLiteStore

        return SQLiteStore(where, url=url)
    creds = (credentials or EtcdCredentials()).or_env()
    creds.check_for(kind, url)
    from .etcd import EtcdStore

    return EtcdStore(where, url=url, tls=kind == "etcds", credentials=creds)
