"""The SQLite state file and its side files are private (issue 10 item 10):
0600 files in a 0700 directory, no symbolic link followed. Checked with
``os.stat``/``os.lstat``, not through the store."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from overlaycni.datastore.sqlite import SQLiteStore
from overlaycni.errors import DatastoreError


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_new_store_files_0600_in_a_new_0700_directory(tmp_path):
    d = tmp_path / "a" / "b"
    with SQLiteStore(d / "state.db") as store:
        store.put("/overlaycni/k", "v")  # a write: the WAL and SHM files exist now
        names = sorted(os.listdir(d))
        assert names == ["state.db", "state.db-shm", "state.db-wal", "state.db.lock"]
        assert {n: _mode(d / n) for n in names} == {n: 0o600 for n in names}
    assert _mode(d) == 0o700  # (missing parents above it are made like mkdir -p makes them)


def test_files_left_0644_by_an_older_version_are_narrowed(tmp_path):
    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)  # what SQLite does on its own: 0644 under umask 022
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE x (a)")
    old = os.umask(0o022)
    try:
        os.chmod(db, 0o644)
        for side in ("state.db-wal", "state.db-shm"):
            if (tmp_path / side).exists():
                os.chmod(tmp_path / side, 0o644)
        assert _mode(db) == 0o644  # control: the test starts from the old state
        with SQLiteStore(db) as store:
            store.put("/overlaycni/k", "v")
    finally:
        os.umask(old)
        conn.close()
    for name in os.listdir(tmp_path):
        assert _mode(tmp_path / name) == 0o600, name


def test_an_existing_directory_keeps_its_mode(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp: narrowing it would break everyone else
    with SQLiteStore(shared / "state.db"):
        pass
    assert _mode(shared) == 0o1777 and _mode(shared / "state.db") == 0o600


def test_a_symlink_at_the_database_path_is_refused(tmp_path):
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"")
    link = tmp_path / "state.db"
    link.symlink_to(target)
    with pytest.raises(DatastoreError, match="state.db is a symbolic link"):
        SQLiteStore(link)
    assert target.read_bytes() == b"" and not (tmp_path / "state.db.lock").exists()
    with SQLiteStore(target):  # control: the real path opens
        pass
