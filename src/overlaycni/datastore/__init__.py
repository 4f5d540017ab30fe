"""The datastore: one ``Store`` protocol, two backends, chosen by URL.

* ``sqlite:///path/state.db`` — embedded default
  (``sqlite:///var/lib/overlaycni/state.db``), several processes on one machine.
* ``etcd://host:port[,host:port...]`` — etcd v3 through its JSON gateway.

``open_datastore(None)`` reads ``OVERLAYCNI_DATASTORE`` and falls back to
the sqlite default.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from ..errors import DatastoreURLError
from .base import DEFAULT_URL, ENV_VAR, KV, Event, Snapshot, Store, TxnResult, prefix_end

__all__ = [
    "KV",
    "Event",
    "Snapshot",
    "Store",
    "TxnResult",
    "DEFAULT_URL",
    "ENV_VAR",
    "open_datastore",
    "parse_url",
    "prefix_end",
]

_EXAMPLES = "expected sqlite:///path/state.db or etcd://host:port[,host:port...]"


def parse_url(url: str) -> tuple[str, str | list[tuple[str, int]]]:
    """Split a datastore URL into ("sqlite", path) or ("etcd", [(host, port)]).
    Raises ``DatastoreURLError`` naming the problem."""
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
    if scheme == "etcd":
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
        return "etcd", endpoints
    raise DatastoreURLError(f"--datastore {text!r}: unknown scheme {scheme!r} ({_EXAMPLES})")


def open_datastore(url: str | None) -> Store:
    """Open the datastore named by ``url`` (None: ``OVERLAYCNI_DATASTORE``
    or the sqlite default). Raises ``DatastoreURLError`` for a malformed URL
    and ``DatastoreUnavailable`` when the store cannot be reached."""
    if url is None or not str(url).strip():
        url = os.environ.get(ENV_VAR) or DEFAULT_URL
    _, where = parse_url(url)
    if isinstance(where, str):  # sqlite: a path (etcd: a list of endpoints)
        from .sqlite import SQLiteStore

        return SQLiteStore(where, url=url)
    from .etcd import EtcdStore

    return EtcdStore(where, url=url)
