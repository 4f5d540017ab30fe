"""SQLite leases run on CLOCK_BOOTTIME (issue 10, item 12): a wall-clock jump
expires nothing; the lease clock running past the TTL does (the control); a
reboot (a new boot id, the clock back near 0) gives every lease one TTL
from then, as does a file written by a version that used the wall clock."""

from __future__ import annotations

import sqlite3
import time

import pytest

from overlaycni.datastore import sqlite as sqlite_mod
from overlaycni.datastore._sqlite_writer import boot_id, lease_clock
from overlaycni.datastore.sqlite import SQLiteStore


@pytest.fixture()
def store(tmp_path):
    s = SQLiteStore(tmp_path / "s.db")
    yield s
    s.close()


def test_a_wall_clock_jump_expires_nothing(store, monkeypatch):
    lease = store.grant_lease(5)
    store.put("/k", "v", lease=lease)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 86400)  # NTP or an operator moves the clock a day on
    assert store.get("/k") is not None
    store.refresh_lease(lease)
    # control: the lease clock itself running past the TTL does expire it
    now = lease_clock()
    monkeypatch.setattr(sqlite_mod, "lease_clock", lambda: now + 6)
    assert store.get("/k") is None


def test_a_reboot_gives_every_lease_one_ttl_from_then(tmp_path, monkeypatch):
    path = tmp_path / "s.db"
    s = SQLiteStore(path)
    s.put("/k", "v", lease=s.grant_lease(5))
    s.close()
    monkeypatch.setattr(sqlite_mod, "boot_id", lambda: "another-boot")
    monkeypatch.setattr(sqlite_mod, "lease_clock", lambda: 1.0)  # just booted: the clock starts again
    s = SQLiteStore(path)
    try:
        assert s.get("/k") is not None  # not expired by the clock going back, ...
        monkeypatch.setattr(sqlite_mod, "lease_clock", lambda: 7.0)
        assert s.get("/k") is None  # ... nor kept for the old boot's uptime: one TTL from the reboot
    finally:
        s.close()


def test_a_file_with_wall_clock_expiries_is_rebased(tmp_path):
    path = tmp_path / "s.db"
    s = SQLiteStore(path)
    lease = s.grant_lease(5)
    s.put("/k", "v", lease=lease)
    s.close()
    conn = sqlite3.connect(path)  # what an older version wrote: wall-clock expiry, no boot id
    conn.execute("UPDATE leases SET expires = ?", (time.time() + 5,))
    conn.execute("DELETE FROM clock")
    conn.commit()
    conn.close()
    s = SQLiteStore(path)
    try:
        (expires,) = s._read(lambda c: c.execute("SELECT expires FROM leases").fetchone())  # noqa: SLF001
        assert abs(expires - (lease_clock() + 5)) < 60  # on the lease clock now, one TTL out
        assert s.get("/k") is not None
        assert s._read(lambda c: c.execute("SELECT value FROM clock").fetchone())[0] == boot_id()  # noqa: SLF001
    finally:
        s.close()
