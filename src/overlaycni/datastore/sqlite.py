"""SQLite datastore: the embedded default (``sqlite:///path/state.db``).

Design note.
* Model: etcd's, in five tables: ``kv`` (key, value, create/mod revision,
  lease), ``events`` (one row per changed key, keyed by revision and a
  sequence within it), ``leases`` (id, ttl, absolute expiry), ``meta``
  (current and compacted revision) and ``clock`` (the boot the expiries
  belong to).
* Lease clock: expiries are absolute because several processes share the
  file, so they must be on a clock that every process of the machine reads
  alike and that nobody sets: ``CLOCK_BOOTTIME`` (monotonic, counts suspend;
  ``CLOCK_MONOTONIC`` would not, and the wall clock jumps with NTP or an
  operator, which used to expire every node at once). It restarts at 0 on
  each boot, so the file records the boot id
  (``/proc/sys/kernel/random/boot_id``) its expiries belong to; the first
  process to open it on a new boot gives every lease one full TTL from now
  (``rebase_leases``). Processes in different time namespaces
  (``CLONE_NEWTIME``) must not share one file.
* Several processes on one machine share the file: WAL journal, a busy
  timeout, and every write runs in ``BEGIN IMMEDIATE`` so that a
  compare-and-swap reads and writes under one write lock. ``synchronous =
  NORMAL``: a crashed process loses nothing committed (power loss may drop
  the last transactions, never corrupts).
* Waits for a lock never outlast the caller's request deadline
  (``overlaycni.deadline``, e.g. a CNI ADD's 3.5 s): the flock poll and
  SQLite's busy timeout are cut to what is left of it.
* Writers queue on a lock file (``<db>.lock``, ``flock``, polled with a
  short backoff up to the busy timeout) before ``BEGIN IMMEDIATE``: SQLite's
  own busy handler sleeps up to 100 ms between tries, which under eight
  concurrent allocators made the p99 latency 30x the median. A killed
  process drops its flock with its file descriptors.
* Threads: a small connection pool; each call checks a connection out and
  back in, so any thread may use the store and short-lived request threads
  leave nothing behind. ``close`` closes the pool.
* Leases really expire: every operation first checks (one indexed query)
  for leases past their expiry and, if any, deletes them and their keys in
  one revision, producing delete events. So a dead agent's node record
  vanishes for every reader and watcher within its TTL.
* Watch polls the event table by revision (every 0.1 s); the event log keeps
  the last ``EVENT_HISTORY`` revisions; a watch from before that raises
  ``WatchCompacted`` (etcd's behaviour after compaction).
* Files: the database, its ``-wal``/``-shm`` and ``.lock`` files are 0600
  (``_prepare_files``), a directory it creates 0700: the state names
  every node and pod of the cluster.
* Rejected: an in-memory store (the lab needs several processes) and
  file locks around JSON (no transactions, no watch).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from ..errors import DatastoreError, DatastoreUnavailable, NotFound, WatchCompacted
from ._sqlite_writer import _SCHEMA, BUSY_TIMEOUT_MS, WriteLock, _range, _Writer, boot_id, busy_wait, lease_clock
from .base import KV, ClosingMixin, Event, Snapshot, Store, TransactMixin, TxnResult, check_key

POLL_INTERVAL = 0.1
MAX_IDLE = 8  # pooled connections kept open


def _prepare_files(path: str) -> None:
    """The database file exists, 0600, before SQLite opens it; a missing
    directory is made 0700. SQLite creates the ``-wal`` and ``-shm`` files
    with the database file's mode (its unix VFS copies it), so they are 0600
    too; those left wider by an older version are narrowed. A directory that
    already exists keeps its mode (it may be shared, like /tmp: the systemd
    unit's ``StateDirectoryMode=0700`` sets /var/lib/overlaycni's). A symbolic
    link at the file's name is refused. An existing file is never opened
    here, only ``lstat``-ed and ``chmod``-ed: closing a descriptor of a
    database file drops every POSIX lock this process holds on it, those of
    SQLite's own connections included (sqlite.org/howtocorrupt.html, 2.2)."""
    try:
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DatastoreError(f"cannot create the directory of {path}: {exc.strerror}") from None
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass  # already there (perhaps open in this process): checked below, never opened
    except OSError as exc:
        raise DatastoreError(f"cannot create {path}: {exc.strerror}") from None
    for name in (path, path + "-wal", path + "-shm"):
        try:
            info = os.lstat(name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DatastoreError(f"cannot stat {name}: {exc.strerror}") from None
        if stat.S_ISLNK(info.st_mode):
            raise DatastoreError(f"{name} is a symbolic link; the datastore does not follow one (give the real path)")
        if info.st_uid == os.geteuid() and info.st_mode & 0o077:
            try:
                os.chmod(name, 0o600)
            except OSError as exc:
                raise DatastoreError(f"cannot make {name} private (0600): {exc.strerror}") from None


def _rollback(conn: sqlite3.Connection, exc: BaseException) -> None:
    """Roll back after ``exc``; a ROLLBACK that fails too is noted on ``exc``
    (the error the caller must see) and the connection is closed, so that
    it never goes back to the pool with a transaction open."""
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error as rollback_exc:
        exc.add_note(f"and then ROLLBACK failed: {rollback_exc}")
        conn.close()


class SQLiteStore(TransactMixin, ClosingMixin):
    def __init__(self, path: str | os.PathLike[str], *, url: str | None = None) -> None:
        self.path = str(path)
        self.url = url or f"sqlite://{self.path}"
        self.round_trips = 0  # transactions run (for benchmarks)
        self._idle: list[sqlite3.Connection] = []  # connection pool (threads check one out per call)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # threads of this process, before the flock
        self._lock_fd: int | None = None
        self._closed = False
        _prepare_files(self.path)
        with self._connection():
            pass  # opens the file as SQLite first: a non-database file fails here, before any side effect
        try:
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise DatastoreError(f"cannot open {self.path}.lock: {exc.strerror}") from None
        with self._connection() as conn, WriteLock(self._write_lock, self._lock_fd, self.path), self._errors():
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")  # before any expiry: leases of another boot are rebased, not expired
            try:
                _Writer(conn).rebase_leases(boot_id(), lease_clock())
                conn.execute("COMMIT")
            except BaseException as exc:
                _rollback(conn, exc)
                raise

    # ----- connections and error mapping ---------------------------------------
    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A pooled connection for one call: any thread may use the store, and
        short-lived threads leave no connection behind."""
        with self._lock:
            if self._closed:
                raise DatastoreError(f"datastore {self.url} is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._open()
        try:
            yield conn
        finally:
            self._release(conn)  # never returns from here: the caller's exception goes on

    def _release(self, conn: sqlite3.Connection) -> None:
        """Back to the pool; closed instead when a transaction is left that
        will not roll back, the pool is full or the store is closed."""
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            conn.close()
            return
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise DatastoreUnavailable(f"cannot open sqlite datastore {self.path}: {exc}") from None
        return conn

    class _errors:
        def __enter__(self) -> None:
            return None

        def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
            if not isinstance(exc, sqlite3.Error):
                return  # not ours to map; it propagates as it is
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                err: DatastoreError = DatastoreUnavailable(f"sqlite datastore is busy: {exc}")
            else:
                err = DatastoreError(f"sqlite datastore error: {exc}")
            for note in getattr(exc, "__notes__", ()):  # e.g. a ROLLBACK that failed after it
                err.add_note(note)
            raise err from None

    def _write(self, fn):
        self.round_trips += 1
        with self._connection() as conn, WriteLock(self._write_lock, self._lock_fd, self.path), self._errors():
            # another process may hold SQLite's own lock (not our flock): wait no longer than the deadline
            conn.execute(f"PRAGMA busy_timeout = {max(1, int(busy_wait() * 1000))}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                w = _Writer(conn)
                w.expire(lease_clock())
                result = fn(w)
                conn.execute("COMMIT")
            except BaseException as exc:
                _rollback(conn, exc)
                raise
        return result

    def _read(self, fn):
        with self._connection() as conn, self._errors():
            if conn.execute("SELECT 1 FROM leases WHERE expires <= ? LIMIT 1", (lease_clock(),)).fetchone():
                self._write(lambda w: None)
            self.round_trips += 1
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")

    @staticmethod
    def _rev(conn: sqlite3.Connection) -> int:
        return conn.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]

    @staticmethod
    def _kvs(
        conn: sqlite3.Connection,
        keys: Sequence[str],
        prefixes: Sequence[str],
        keys_only: bool = False,
        ranges: Sequence[tuple[str, str, int]] = (),
    ) -> list[KV]:
        out: dict[str, KV] = {}
        for key in keys:
            row = conn.execute("SELECT key, value, mod_rev, lease FROM kv WHERE key=?", (key,)).fetchone()
            if row:
                out[row[0]] = KV(*row)
        for prefix in prefixes:
            where, args = _range(prefix)
            cols = "key, '', mod_rev, lease" if keys_only else "key, value, mod_rev, lease"
            for row in conn.execute(f"SELECT {cols} FROM kv WHERE {where} ORDER BY key", args):
                out[row[0]] = KV(*row)
        for start, end, limit in ranges:
            cols = "key, '', mod_rev, lease" if keys_only else "key, value, mod_rev, lease"
            sql = f"SELECT {cols} FROM kv WHERE key >= ? AND key < ? ORDER BY key"
            for row in conn.execute(sql + (f" LIMIT {int(limit)}" if limit else ""), (start, end)):
                out[row[0]] = KV(*row)
        return [out[k] for k in sorted(out)]

    # ----- key/value ------------------------------------------------------------
    def get(self, key: str) -> KV | None:
        check_key(key)
        kvs = self._read(lambda c: self._kvs(c, [key], []))
        return kvs[0] if kvs else None

    def list(self, prefix: str) -> list[KV]:
        return self._read(lambda c: self._kvs(c, [], [prefix]))

    def read(
        self,
        keys: Sequence[str] = (),
        prefixes: Sequence[str] = (),
        *,
        ranges: Sequence[tuple[str, str, int]] = (),
        keys_only: bool = False,
    ) -> Snapshot:
        def fn(c: sqlite3.Connection) -> Snapshot:
            return Snapshot(tuple(self._kvs(c, keys, prefixes, keys_only, ranges)), self._rev(c))

        return self._read(fn)

    def put(self, key: str, value: str, *, lease: int | None = None) -> int:
        check_key(key)

        def fn(w: _Writer) -> int:
            w.put(key, value, lease)
            return w.rev  # type: ignore[return-value]

        return self._write(fn)

    def delete(self, key: str) -> bool:
        check_key(key)
        return self._write(lambda w: w.delete(key))

    def delete_prefix(self, prefix: str) -> int:
        return self._write(lambda w: w.delete_prefix(prefix))

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
    ) -> TxnResult:
        for key, _ in compare:
            check_key(key)
        for key, _, _ in put:
            check_key(key)

        def fn(w: _Writer) -> TxnResult:
            if any(w.mod_rev(key) != int(rev) for key, rev in compare):
                kvs = self._kvs(w.conn, read_keys, read_prefixes, keys_only, read_ranges)
                return TxnResult(False, w.current(), tuple(kvs))
            w.new_revision()
            for prefix in delete_prefix:
                w.delete_prefix(prefix)
            for key in delete:
                w.delete(key)
            for key, value, lease in put:
                w.put(key, value, lease)
            if w.seq == 0:  # nothing changed: do not burn a revision
                w.conn.execute("UPDATE meta SET value=value-1 WHERE name='revision'")
            return TxnResult(True, w.current())

        return self._write(fn)

    def revision(self) -> int:
        return self._read(self._rev)

    def compact(self, revision: int) -> None:
        self._write(lambda w: w.compact(revision))

    # ----- leases ---------------------------------------------------------------
    def grant_lease(self, ttl: int) -> int:
        if int(ttl) < 1:
            raise DatastoreError(f"lease TTL must be at least 1 second, got {ttl}")

        def fn(w: _Writer) -> int:
            while True:
                lease = secrets.randbits(62) + 1
                try:
                    w.conn.execute("INSERT INTO leases VALUES (?, ?, ?)", (lease, int(ttl), lease_clock() + int(ttl)))
                    return lease
                except sqlite3.IntegrityError:
                    continue

        return self._write(fn)

    def refresh_lease(self, lease: int) -> None:
        def fn(w: _Writer) -> bool:
            row = w.conn.execute("SELECT ttl FROM leases WHERE id=?", (lease,)).fetchone()
            if row is None:
                return False
            w.conn.execute("UPDATE leases SET expires=? WHERE id=?", (lease_clock() + row[0], lease))
            return True

        if not self._write(fn):
            raise NotFound(f"lease {lease:x} not found (expired or revoked)")

    def revoke_lease(self, lease: int) -> None:
        self._write(lambda w: w.revoke(lease))

    # ----- watch ----------------------------------------------------------------
    def watch(
        self,
        prefix: str,
        *,
        start_revision: int | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[Event]:
        where, args = _range(prefix)
        next_rev = self.revision() + 1 if start_revision is None else int(start_revision)

        def poll(conn: sqlite3.Connection) -> tuple[int, int, list[tuple]]:
            compacted = conn.execute("SELECT value FROM meta WHERE name='compacted'").fetchone()[0]
            rows = conn.execute(
                f"SELECT rev, kind, key, value FROM events WHERE rev >= ? AND {where} ORDER BY rev, seq",
                (next_rev, *args),
            ).fetchall()
            return self._rev(conn), compacted, rows

        while stop is None or not stop.is_set():
            current, compacted, rows = self._read(poll)
            if next_rev <= compacted:
                raise WatchCompacted(
                    f"watch of {prefix!r} from revision {next_rev} is too old: events up to revision "
                    f"{compacted} were compacted; re-list and watch again",
                    revision=compacted,
                )
            for rev, kind, key, value in rows:
                yield Event(kind, key, value, rev)
            next_rev = max(next_rev, current + 1)
            if stop is not None:
                stop.wait(POLL_INTERVAL)
            else:
                time.sleep(POLL_INTERVAL)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._idle = self._idle, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


if TYPE_CHECKING:  # mypy proves that the backend implements the Store port
    _store: type[Store] = SQLiteStore
