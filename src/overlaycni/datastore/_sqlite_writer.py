"""SQLite datastore internals: the schema, the writer that turns mutations
into revisions and events, and the cross-process write lock (see the design
note in ``sqlite.py``)."""

from __future__ import annotations

import fcntl
import logging
import random
import sqlite3
import threading
import time

from .. import deadline
from ..errors import DatastoreUnavailable, NotFound
from .base import prefix_end

BUSY_TIMEOUT_MS = 10_000
EVENT_HISTORY = 10_000  # revisions of events kept for watchers
COMPACT_EVERY = 1_000

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value TEXT NOT NULL,
    create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, lease INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_lease ON kv(lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    rev INTEGER NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
    key TEXT NOT NULL, value TEXT, PRIMARY KEY (rev, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS leases_expires ON leases(expires);
CREATE TABLE IF NOT EXISTS clock (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta VALUES ('revision', 1), ('compacted', 0);
"""


BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def lease_clock() -> float:
    """Seconds on the clock lease expiries are kept in: ``CLOCK_BOOTTIME``,
    one clock for every process of the machine (a time namespace aside),
    never set by anyone, counting suspended time too (a machine that slept
    past a TTL comes back with its leases expired, as etcd would have them).
    It starts again at 0 on each boot: see ``boot_id``."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_id() -> str:
    """This boot's random id (``lease_clock`` values of another boot mean nothing here)."""
    try:
        with open(BOOT_ID_PATH) as f:
            return f.read().strip()
    except OSError:
        return ""


def _range(prefix: str) -> tuple[str, tuple[str, ...]]:
    end = prefix_end(prefix)
    if end:
        return "key >= ? AND key < ?", (prefix, end)
    return "key >= ?", (prefix,)


class _Writer:
    """Mutations inside one BEGIN IMMEDIATE transaction; the first mutation
    of a logical change takes the next revision."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.rev: int | None = None
        self.seq = 0

    def current(self) -> int:
        return self.conn.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]

    def new_revision(self) -> int:
        self.rev = self.current() + 1
        self.seq = 0
        self.conn.execute("UPDATE meta SET value=? WHERE name='revision'", (self.rev,))
        if self.rev % COMPACT_EVERY == 0:
            self.compact(self.rev - EVENT_HISTORY)
        return self.rev

    def compact(self, upto: int) -> None:
        compacted = self.conn.execute("SELECT value FROM meta WHERE name='compacted'").fetchone()[0]
        if upto > compacted:
            self.conn.execute("DELETE FROM events WHERE rev <= ?", (upto,))
            self.conn.execute("UPDATE meta SET value=? WHERE name='compacted'", (upto,))

    def _event(self, kind: str, key: str, value: str | None) -> None:
        if self.rev is None:
            self.new_revision()
        self.seq += 1
        self.conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (self.rev, self.seq, kind, key, value))

    def mod_rev(self, key: str) -> int:
        row = self.conn.execute("SELECT mod_rev FROM kv WHERE key=?", (key,)).fetchone()
        return row[0] if row else 0

    def put(self, key: str, value: str, lease: int | None) -> None:
        if lease is not None and not self.conn.execute("SELECT 1 FROM leases WHERE id=?", (lease,)).fetchone():
            raise NotFound(f"lease {lease:x} not found (expired or revoked)")
        if self.rev is None:
            self.new_revision()
        self.conn.execute(
            "INSERT INTO kv VALUES (?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
            "value=excluded.value, mod_rev=excluded.mod_rev, lease=excluded.lease",
            (key, value, self.rev, self.rev, lease),
        )
        self._event("put", key, value)

    def delete(self, key: str) -> bool:
        if not self.conn.execute("SELECT 1 FROM kv WHERE key=?", (key,)).fetchone():
            return False
        if self.rev is None:
            self.new_revision()
        self.conn.execute("DELETE FROM kv WHERE key=?", (key,))
        self._event("delete", key, None)
        return True

    def delete_prefix(self, prefix: str) -> int:
        where, args = _range(prefix)
        keys = [r[0] for r in self.conn.execute(f"SELECT key FROM kv WHERE {where} ORDER BY key", args)]
        for key in keys:
            self.delete(key)
        return len(keys)

    def rebase_leases(self, boot: str, now: float) -> int:
        """Leases written on another boot (or with the wall clock, by an older
        version) get one full TTL from ``now``: their agents renew them if they
        came back, the others lapse. Returns how many were rebased."""
        row = self.conn.execute("SELECT value FROM clock WHERE name='boot_id'").fetchone()
        if row is not None and row[0] == boot:
            return 0
        n = self.conn.execute("UPDATE leases SET expires = ? + ttl", (now,)).rowcount
        self.conn.execute("INSERT OR REPLACE INTO clock VALUES ('boot_id', ?)", (boot,))
        return n

    def expire(self, now: float) -> None:
        """Delete expired leases and their keys, all in one revision."""
        expired = [r[0] for r in self.conn.execute("SELECT id FROM leases WHERE expires <= ?", (now,))]
        if not expired:
            return
        self.rev = None
        for lease in expired:
            self.revoke(lease)
        self.rev = None

    def revoke(self, lease: int) -> bool:
        if not self.conn.execute("DELETE FROM leases WHERE id=?", (lease,)).rowcount:
            return False
        for (key,) in self.conn.execute("SELECT key FROM kv WHERE lease=? ORDER BY key", (lease,)).fetchall():
            self.delete(key)
        return True


def busy_wait() -> float:
    """Seconds a writer may wait for the lock: the busy timeout, cut to the
    request's deadline (``overlaycni.deadline``) when one is set."""
    return deadline.remaining(BUSY_TIMEOUT_MS / 1000) or 0.0


class WriteLock:
    """Hold this process's write lock, then the lock file's flock (polled with a
    short backoff up to the busy timeout)."""

    def __init__(self, lock: threading.Lock, fd: int | None, path: str) -> None:
        self.lock, self.fd, self.path = lock, fd, path

    def __enter__(self) -> None:
        start = time.monotonic()
        wait = busy_wait()  # the busy timeout, or less: what is left of the caller's request deadline
        deadline = start + wait
        if not self.lock.acquire(timeout=wait):
            raise DatastoreUnavailable(f"sqlite datastore {self.path} is busy (write lock held too long)")
        delay = 0.00005
        tries = 0
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # type: ignore[arg-type]
                if tries:
                    log.debug("sqlite %s: waited %.1f ms (%d tries) for the write lock", self.path,
                              (time.monotonic() - start) * 1000, tries)
                return
            except BlockingIOError:
                tries += 1
                if time.monotonic() > deadline:
                    self.lock.release()
                    log.debug("sqlite %s: gave up on the write lock after %d tries", self.path, tries)
                    raise DatastoreUnavailable(
                        f"sqlite datastore {self.path} is busy: another process holds its write lock"
                    ) from None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.002)
            except BaseException:
                self.lock.release()
                raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)  # type: ignore[arg-type]
        finally:
            self.lock.release()

