"""Backup and restore of overlaycni's keys, over the ``Store`` protocol (both backends).

Design note.
* What: every key under ``keys.ROOT`` (``/overlaycni/``), the whole of what
  overlaycni keeps; keys outside it (an etcd shared with other tools) are
  neither saved nor touched, and an etcd user granted only that prefix can
  take and restore a backup.
* Consistent: one ``Store.read`` of the prefix, which both backends answer
  at one revision (SQLite: one read transaction; etcd: one range in one
  txn); the file records that revision.
* Format: versioned JSON, ``{"format": "overlaycni-datastore-backup",
  "version": 1, "revision", "prefix", "taken_at", "source", "keys": [{"key",
  "value", "leased"}]}``. ``leased`` marks keys that lived under a lease
  (the nodes' liveness records ``leases/<node>``): they are kept in the
  file for the reader but never restored, since a restored key would
  outlive the agent that owned it; each node's agent writes its liveness
  record again under its own lease (at its next resync). Node records
  carry no lease and are restored.
* Restore into an empty prefix: puts in chunks of ``CHUNK`` keys, each a
  transaction that also requires its keys to be absent, so a concurrent
  writer is noticed, not overwritten. With ``force``: keys that differ or are
  missing are written, then keys the backup does not hold are deleted
  (leased keys of live agents are left alone), so there is no moment when
  the cluster record is gone. etcd allows 128 operations per transaction by
  default: a chunk is 64 puts (+ 64 compares). A restore is therefore not
  one transaction: if it is interrupted, ``restore --force`` with the same
  file finishes it (it is idempotent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from ..errors import Conflict, UsageError
from .base import Store
from .keys import ROOT

FORMAT = "overlaycni-datastore-backup"
VERSION = 1
CHUNK = 64


@dataclass(frozen=True)
class Entry:
    key: str
    value: str
    leased: bool = False


@dataclass(frozen=True)
class Backup:
    revision: int
    entries: tuple[Entry, ...]
    prefix: str = ROOT
    taken_at: str = ""
    source: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "revision": self.revision,
                "prefix": self.prefix,
                "taken_at": self.taken_at,
                "source": self.source,
                "keys": [{"key": e.key, "value": e.value, "leased": e.leased} for e in self.entries],
            },
            indent=1,
        )


@dataclass(frozen=True)
class RestoreReport:
    written: int  # keys put (new or changed)
    unchanged: int  # keys that already held the backup's value (force)
    deleted: int  # keys removed because the backup does not hold them (force)
    skipped_leased: int  # liveness records: not restored
    revision: int  # the store's revision afterwards


def take(store: Store, *, prefix: str = ROOT) -> Backup:
    """Every key under ``prefix``, read at one revision."""
    snap = store.read(prefixes=[prefix])
    entries = tuple(Entry(kv.key, kv.value, leased=kv.lease is not None) for kv in snap.kvs)
    return Backup(
        revision=snap.revision,
        entries=entries,
        prefix=prefix,
        taken_at=datetime.now(UTC).isoformat(timespec="seconds"),
        source=store.url,
    )


def parse(text: str, *, name: str = "FILE") -> Backup:
    """A backup file, checked field by field; ``UsageError`` naming the
    file and the field (e.g. ``keys[3].value``) otherwise."""

    def bad(where: str, problem: str) -> UsageError:
        return UsageError(f"{where}: {problem}", field=name)

    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise bad("the file", f"is not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad("format", f"expected {FORMAT!r}: this is not an overlaycni datastore backup")
    if doc.get("version") != VERSION:
        raise bad("version", f"{doc.get('version')!r}: this overlaycni reads version {VERSION}")
    revision, prefix, items = doc.get("revision"), doc.get("prefix"), doc.get("keys")
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise bad("revision", f"{revision!r} is not a revision number")
    if prefix != ROOT:
        raise bad("prefix", f"{prefix!r}: expected {ROOT!r}")
    if not isinstance(items, list):
        raise bad("keys", "expected a list of {key, value, leased}")
    entries: list[Entry] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad(f"keys[{i}]", "expected an object {key, value, leased}")
        key, value, leased = item.get("key"), item.get("value"), item.get("leased", False)
        if not isinstance(key, str) or not key.startswith(prefix):
            raise bad(f"keys[{i}].key", f"{key!r} is not a key under {prefix}")
        if key in seen:
            raise bad(f"keys[{i}].key", f"{key!r} appears twice")
        if not isinstance(value, str):
            raise bad(f"keys[{i}].value", "expected a string")
        if not isinstance(leased, bool):
            raise bad(f"keys[{i}].leased", "expected true or false")
        seen.add(key)
        entries.append(Entry(key, value, leased))
    return Backup(
        revision=revision,
        entries=tuple(entries),
        prefix=prefix,
        taken_at=str(doc.get("taken_at", "")),
        source=str(doc.get("source", "")),
    )


def restore(store: Store, backup: Backup, *, force: bool = False) -> RestoreReport:
    """Write ``backup`` into ``store`` (see the design note). Without
    ``force`` the prefix must hold no key: ``UsageError`` otherwise,
    nothing written."""
    wanted = {e.key: e.value for e in backup.entries if not e.leased}
    skipped = sum(1 for e in backup.entries if e.leased)
    current = store.read(prefixes=[backup.prefix]).kvs
    if current and not force:
        sample = ", ".join(kv.key for kv in current[:3])
        raise UsageError(
            f"the datastore already holds {len(current)} key(s) under {backup.prefix} ({sample}{', ...' if len(current) > 3 else ''}); "
            "restore goes into an empty store, or give --force to replace them; nothing was written",
            field="FILE",
        )
    have = {kv.key: kv for kv in current}
    puts = [(k, v) for k, v in sorted(wanted.items()) if k not in have or have[k].value != v]
    written = 0
    for i in range(0, len(puts), CHUNK):
        chunk = puts[i : i + CHUNK]
        compare = [] if force else [(k, 0) for k, _ in chunk]
        if not store.transact(compare=compare, put=[(k, v, None) for k, v in chunk]).succeeded:
            raise Conflict(
                f"a key of {chunk[0][0]} .. {chunk[-1][0]} was written by someone else during the restore; "
                f"{written} of {len(puts)} keys were restored",
                details="stop what writes to the store, then run restore --force with the same file to finish",
            )
        written += len(chunk)
    stale = sorted(k for k, kv in have.items() if k not in wanted and kv.lease is None) if force else []
    for i in range(0, len(stale), CHUNK):
        store.transact(compare=[], delete=stale[i : i + CHUNK])
    return RestoreReport(
        written=written,
        unchanged=len(wanted) - len(puts),
        deleted=len(stale),
        skipped_leased=skipped,
        revision=store.revision(),
    )
