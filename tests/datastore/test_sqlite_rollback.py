"""A double fault in the SQLite store: the caller's operation fails, then
the ROLLBACK that cleans up after it fails too. The caller must see its own
error (with the ROLLBACK failure noted on it), and the broken connection
must not go back to the pool."""

from __future__ import annotations

import functools
import sqlite3

import pytest

from overlaycni.datastore import sqlite as sqlite_store
from overlaycni.errors import DatastoreError, NotFound


class _FailingRollback(sqlite3.Connection):
    """A connection whose ROLLBACK raises while ``fail`` is set."""

    fail = False
    opened: list[_FailingRollback] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _FailingRollback.opened.append(self)

    def execute(self, sql, *args):  # type: ignore[override]
        if _FailingRollback.fail and sql.strip().upper() == "ROLLBACK":
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return super().execute(sql, *args)


@pytest.fixture
def store(tmp_path, monkeypatch):
    _FailingRollback.fail = False
    _FailingRollback.opened = []
    connect = functools.partial(sqlite3.connect, factory=_FailingRollback)
    monkeypatch.setattr(sqlite_store.sqlite3, "connect", connect)
    s = sqlite_store.SQLiteStore(tmp_path / "state.db")
    yield s
    _FailingRollback.fail = False
    s.close()


def _closed(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("SELECT 1")
    except sqlite3.ProgrammingError:
        return True
    return False


def test_control_a_failed_write_rolls_back_and_reports_its_error(store):
    with pytest.raises(NotFound) as err:
        store.put("/k", "v", lease=0xDEAD)  # no such lease: the writer raises NotFound mid-transaction
    assert not getattr(err.value, "__notes__", None)
    assert store.get("/k") is None
    assert not any(_closed(c) for c in _FailingRollback.opened)  # the connection went back to the pool


def test_a_failing_rollback_keeps_the_callers_error(store):
    _FailingRollback.fail = True
    with pytest.raises(NotFound) as err:  # the old code lost it and then hit an unbound `result`
        store.put("/k", "v", lease=0xDEAD)
    assert any("ROLLBACK failed" in n and "injected" in n for n in err.value.__notes__)
    broken = [c for c in _FailingRollback.opened if _closed(c)]
    assert len(broken) == 1  # closed, not pooled with a transaction open
    _FailingRollback.fail = False
    assert store.get("/k") is None  # nothing was written
    store.put("/k", "v")  # and the store still works on a fresh connection
    assert store.get("/k").value == "v"


def test_a_failing_rollback_after_a_sqlite_error_keeps_that_error(store):
    _FailingRollback.fail = True

    def broken_write(w):
        raise sqlite3.IntegrityError("constraint failed (injected)")

    with pytest.raises(DatastoreError, match="constraint failed") as err:
        store._write(broken_write)
    assert any("ROLLBACK failed" in n for n in err.value.__notes__)
