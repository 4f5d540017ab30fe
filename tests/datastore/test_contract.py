"""The Store contract, run on sqlite and etcd alike."""

from __future__ import annotations

import threading
import time

import pytest

from overlaycni.datastore import KV, Event, Store, open_datastore
from overlaycni.errors import NotFound, WatchCompacted


def _collect(store: Store, prefix: str, *, start: int | None, until: int, stop: threading.Event) -> list[Event]:
    """Run a watch in a thread until ``until`` events arrived (or 15 s)."""
    events: list[Event] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for ev in store.watch(prefix, start_revision=start, stop=stop):
                events.append(ev)
                if len(events) >= until:
                    return
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(15)
    stop.set()
    t.join(5)
    assert not t.is_alive(), "watch did not return after stop was set"
    if errors:
        raise errors[0]
    return events


def test_is_a_store(store):
    assert isinstance(store, Store)
    assert store.url


def test_get_put_revision(store):
    assert store.get("/t/a") is None
    r1 = store.put("/t/a", "one")
    r2 = store.put("/t/a", "two")
    assert r2 > r1
    kv = store.get("/t/a")
    assert kv == KV("/t/a", "two", r2, None)
    assert store.revision() >= r2


def test_values_round_trip_unicode_and_empty(store):
    store.put("/t/u", "żółw ✓ {\"json\": [1]}")
    store.put("/t/e", "")
    assert store.get("/t/u").value == "żółw ✓ {\"json\": [1]}"
    assert store.get("/t/e").value == ""


def test_list_is_prefix_only_and_sorted(store):
    for key in ("/t/b", "/t/a", "/t/c/d", "/tx", "/s"):
        store.put(key, key)
    assert [kv.key for kv in store.list("/t/")] == ["/t/a", "/t/b", "/t/c/d"]
    assert store.list("/nothing/") == []


def test_delete(store):
    store.put("/t/a", "1")
    assert store.delete("/t/a") is True
    assert store.get("/t/a") is None
    assert store.delete("/t/a") is False


def test_delete_prefix(store):
    for key in ("/t/a", "/t/b", "/tz"):
        store.put(key, "1")
    assert store.delete_prefix("/t/") == 2
    assert [kv.key for kv in store.list("/t")] == ["/tz"]


def test_create_only_if_absent(store):
    assert store.create("/t/a", "first") is True
    assert store.create("/t/a", "second") is False
    assert store.get("/t/a").value == "first"


def test_txn_all_or_nothing(store):
    r = store.put("/t/a", "1")
    store.put("/t/gone", "x")
    # one compare fails -> nothing of the puts or deletes happens
    assert store.txn(compare=[("/t/a", r), ("/t/b", r)], put=[("/t/c", "3", None)], delete=["/t/gone"]) is False
    assert store.get("/t/c") is None and store.get("/t/gone") is not None
    # all compares hold (0 = absent) -> everything happens, at one revision
    assert store.txn(compare=[("/t/a", r), ("/t/b", 0)], put=[("/t/c", "3", None), ("/t/b", "2", None)], delete=["/t/gone"])
    b, c = store.get("/t/b"), store.get("/t/c")
    assert b.revision == c.revision > r
    assert store.get("/t/gone") is None
    # the old revision no longer matches
    assert store.txn(compare=[("/t/b", r)], put=[("/t/b", "x", None)]) is False
    assert store.get("/t/b").value == "2"


def test_transact_returns_reads_when_it_fails(store):
    store.put("/t/a", "1")
    store.put("/t/p/x", "2")
    res = store.transact(compare=[("/t/a", 0)], put=[("/t/z", "z", None)], read_keys=["/t/a"], read_prefixes=["/t/p/"])
    assert not res.succeeded
    assert [(kv.key, kv.value) for kv in res.kvs] == [("/t/a", "1"), ("/t/p/x", "2")]
    assert store.get("/t/z") is None
    ok = store.transact(compare=[("/t/z", 0)], put=[("/t/z", "z", None)], delete_prefix=["/t/p/"], read_keys=["/t/a"])
    assert ok.succeeded and ok.kvs == ()
    assert store.list("/t/p/") == [] and store.get("/t/z").revision == ok.revision


def test_read_snapshot(store):
    r = store.put("/t/a", "1")
    store.put("/t/p/1", "x")
    store.put("/t/p/2", "y")
    snap = store.read(["/t/a", "/t/missing"], ["/t/p/"])
    assert snap.get("/t/a").revision == r
    assert snap.get("/t/missing") is None
    assert [kv.value for kv in snap.prefixed("/t/p/")] == ["x", "y"]
    assert snap.revision == store.revision()


def test_lease_owns_keys_and_revoke_deletes_them(store):
    lease = store.grant_lease(30)
    store.put("/t/l1", "a", lease=lease)
    assert store.create("/t/l2", "b", lease=lease)
    assert store.get("/t/l1").lease == lease
    store.refresh_lease(lease)
    store.revoke_lease(lease)
    assert store.get("/t/l1") is None and store.get("/t/l2") is None
    store.revoke_lease(lease)  # not-found is success
    with pytest.raises(NotFound):
        store.refresh_lease(lease)


def test_put_under_unknown_lease_fails_and_writes_nothing(store):
    lease = store.grant_lease(30)
    store.revoke_lease(lease)
    with pytest.raises(NotFound):
        store.put("/t/x", "1", lease=lease)
    assert store.get("/t/x") is None


def test_lease_expires(store):
    lease = store.grant_lease(1)
    start = store.put("/t/l", "a", lease=lease) + 1
    deadline = time.monotonic() + 10
    while store.get("/t/l") is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.get("/t/l") is None
    assert store.list("/t/") == []
    with pytest.raises(NotFound):
        store.refresh_lease(lease)
    events = _collect(store, "/t/", start=start, until=1, stop=threading.Event())
    assert events[0].kind == "delete" and events[0].key == "/t/l"


def test_lease_expiry_seen_by_another_client(store_url):
    a, b = open_datastore(store_url), open_datastore(store_url)
    try:
        lease = a.grant_lease(1)
        a.put("/t/node", "x", lease=lease)
        assert b.get("/t/node") is not None
        deadline = time.monotonic() + 10
        while b.list("/t/") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert b.list("/t/") == []
    finally:
        a.close()
        b.close()


def test_watch_replays_history_in_order(store):
    start = store.revision() + 1
    r1 = store.put("/w/a", "1")
    store.put("/other", "x")
    r2 = store.put("/w/b", "2")
    r3 = store.revision() + 1
    store.delete("/w/a")
    events = _collect(store, "/w/", start=start, until=3, stop=threading.Event())
    assert events == [
        Event("put", "/w/a", "1", r1),
        Event("put", "/w/b", "2", r2),
        Event("delete", "/w/a", None, r3),
    ]


def test_watch_from_now_sees_live_events(store):
    stop = threading.Event()
    store.put("/w/old", "x")
    got: list[Event] = []
    started = threading.Event()

    def run() -> None:
        it = store.watch("/w/", stop=stop)
        started.set()
        for ev in it:
            got.append(ev)
            if len(got) == 2:
                return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    started.wait(5)
    time.sleep(0.5)  # let the watch register before writing (events before it are not replayed)
    store.txn(compare=[], put=[("/w/x", "1", None), ("/w/y", "2", None)])
    t.join(15)
    stop.set()
    assert [(e.key, e.value) for e in got] == [("/w/x", "1"), ("/w/y", "2")]
    assert got[0].revision == got[1].revision


def test_watch_stops_when_asked(store):
    stop = threading.Event()
    done = threading.Event()

    def run() -> None:
        for _ in store.watch("/quiet/", stop=stop):
            pass
        done.set()

    threading.Thread(target=run, daemon=True).start()
    time.sleep(0.3)
    stop.set()
    assert done.wait(10), "watch kept running after stop was set"


def test_watch_compacted(store):
    old = store.put("/w/a", "1")
    for i in range(5):
        store.put("/w/a", str(i))
    store.compact(store.revision() - 1)
    with pytest.raises(WatchCompacted):
        _collect(store, "/w/", start=old, until=1, stop=threading.Event())


def test_threads_share_one_store(store):
    """CAS counter from 4 threads: every successful txn is one increment."""
    store.put("/t/counter", "0")
    wins = []

    def worker() -> None:
        n = 0
        while n < 15:
            kv = store.get("/t/counter")
            if store.txn(compare=[(kv.key, kv.revision)], put=[(kv.key, str(int(kv.value) + 1), None)]):
                n += 1
        wins.append(n)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(wins) == 60
    assert store.get("/t/counter").value == "60"


def test_range_reads_with_limit(store):
    for i in (1, 2, 3, 5, 8):
        store.put(f"/r/{i:03d}", f"v{i}")
    snap = store.read(ranges=[("/r/002", "/r/999", 2)])
    assert [kv.key for kv in snap.kvs] == ["/r/002", "/r/003"]
    snap = store.read(["/r/001"], ranges=[("/r/004", "/r/999", 0)], keys_only=True)
    assert [(kv.key, kv.value) for kv in snap.kvs] == [("/r/001", "v1"), ("/r/005", ""), ("/r/008", "")]
    res = store.transact(compare=[("/r/001", 0)], read_ranges=[("/r/003", "/r/006", 5)])
    assert not res.succeeded and [kv.key for kv in res.kvs] == ["/r/003", "/r/005"]


def test_short_lived_threads_leave_no_connections_behind(store):
    """The agent serves each CNI request in a thread: the store must not keep
    one connection per thread it has ever seen."""
    import os

    store.put("/t/a", "1")
    store.get("/t/a")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(40):
        t = threading.Thread(target=lambda: store.get("/t/a"))
        t.start()
        t.join()
    assert len(os.listdir("/proc/self/fd")) - before < 10


def test_with_closes_the_store_and_lets_errors_through(store_url):
    closed: list[str] = []
    with pytest.raises(NotFound), open_datastore(store_url) as s:
        real_close = s.close
        s.close = lambda: (closed.append(s.url), real_close())  # type: ignore[method-assign]
        s.put("/t/cm", "v")
        raise NotFound("from the body")
    assert closed == [store_url]
    with open_datastore(store_url) as again:
        assert again.get("/t/cm").value == "v"
