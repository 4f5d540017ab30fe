"""The datastore port: value types and the ``Store`` protocol (pure).

Both backends (``sqlite.py``, ``etcd.py``) implement the same model, which is
etcd v3's: a flat, ordered key space of strings; one global revision that
every write transaction bumps by one; each key remembers the revision of its
last write (``mod_revision``; 0 means "absent" in comparisons); leases with a
TTL own keys and delete them when they expire; a watch replays the events of
a key range from a revision on.

Beyond the contract (get/put/delete/create/txn/leases/watch) the protocol
carries three helpers that keep IPAM at two round trips per allocation:
``read`` (several keys and prefixes at one revision), ``transact`` (a
compare-and-swap that also deletes prefixes and, when it fails, returns what
made it fail in the same round trip) and ``delete_prefix``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Protocol, Self, runtime_checkable

DEFAULT_SQLITE_PATH = "/var/lib/overlaycni/state.db"
DEFAULT_URL = f"sqlite://{DEFAULT_SQLITE_PATH}"
ENV_VAR = "OVERLAYCNI_DATASTORE"


@dataclass(frozen=True)
class KV:
    key: str
    value: str
    revision: int  # mod_revision: the store revision of the key's last write
    lease: int | None = None


@dataclass(frozen=True)
class Event:
    kind: Literal["put", "delete"]
    key: str
    value: str | None
    revision: int


@dataclass(frozen=True)
class Snapshot:
    """Keys read together at one store revision."""

    kvs: tuple[KV, ...]
    revision: int

    def get(self, key: str) -> KV | None:
        for kv in self.kvs:
            if kv.key == key:
                return kv
        return None

    def prefixed(self, prefix: str) -> list[KV]:
        return [kv for kv in self.kvs if kv.key.startswith(prefix)]


@dataclass(frozen=True)
class TxnResult:
    """Outcome of ``transact``. ``kvs`` holds the requested reads, taken at
    ``revision``, and is filled only when the transaction failed."""

    succeeded: bool
    revision: int
    kvs: tuple[KV, ...] = ()

    def snapshot(self) -> Snapshot:
        return Snapshot(self.kvs, self.revision)


Range = tuple[str, str, int]  # [start, end), at most limit keys (0 = no limit)
Compare = tuple[str, int]  # (key, expected mod_revision; 0 = must be absent)
Put = tuple[str, str, "int | None"]  # (key, value, lease)


@runtime_checkable
class Store(Protocol):
    url: str

    def get(self, key: str) -> KV | None: ...

    def list(self, prefix: str) -> list[KV]: ...

    def put(self, key: str, value: str, *, lease: int | None = None) -> int: ...

    def delete(self, key: str) -> bool: ...

    def create(self, key: str, value: str, *, lease: int | None = None) -> bool: ...

    def txn(
        self,
        *,
        compare: Sequence[tuple[str, int]],
        put: Sequence[tuple[str, str, int | None]] = (),
        delete: Sequence[str] = (),
    ) -> bool: ...

    def grant_lease(self, ttl: int) -> int: ...

    def refresh_lease(self, lease: int) -> None: ...

    def revoke_lease(self, lease: int) -> None: ...

    def revision(self) -> int: ...

    def watch(
        self,
        prefix: str,
        *,
        start_revision: int | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[Event]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    # --- helpers beyond the contract (both backends implement them) ---------
    def read(
        self,
        keys: Sequence[str] = (),
        prefixes: Sequence[str] = (),
        *,
        ranges: Sequence[tuple[str, str, int]] = (),
        keys_only: bool = False,
    ) -> Snapshot: ...

    def transact(
        self,
        *,
        compare: Sequence[tuple[str, int]],
        put: Sequence[tuple[str, str, int | None]] = (),
        delete: Sequence[str] = (),
        delete_prefix: Sequence[str] = (),
        read_keys: Sequence[str] = (),
        read_prefixes: Sequence[str] = (),
        read_ranges: Sequence[tuple[str, str, int]] = (),
        keys_only: bool = False,
    ) -> TxnResult: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def compact(self, revision: int) -> None: ...


class ClosingMixin:
    """``with open_datastore(url) as store:`` closes the store on the way out
    (the backend's ``close``), shared by both backends."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self: Store, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class TransactMixin:
    """``create`` and ``txn`` in terms of the backend's ``transact`` (``self:
    Store`` makes mypy check that the backend provides it), shared by both."""

    def create(self: Store, key: str, value: str, *, lease: int | None = None) -> bool:
        return self.transact(compare=[(key, 0)], put=[(key, value, lease)]).succeeded

    def txn(
        self: Store,
        *,
        compare: Sequence[tuple[str, int]],
        put: Sequence[tuple[str, str, int | None]] = (),
        delete: Sequence[str] = (),
    ) -> bool:
        return self.transact(compare=compare, put=put, delete=delete).succeeded


def prefix_end(prefix: str) -> str:
    """The first key after every key that starts with ``prefix`` ("" means
    no upper bound). Works on code points, which order like UTF-8 bytes."""
    chars = list(prefix)
    while chars:
        last = ord(chars[-1])
        if last < 0x10FFFF:
            chars[-1] = chr(last + 1)
            return "".join(chars)
        chars.pop()
    return ""


def check_key(key: str) -> str:
    from ..errors import DatastoreError

    if not isinstance(key, str) or not key:
        raise DatastoreError(f"datastore key must be a non-empty string, got {key!r}")
    return key
