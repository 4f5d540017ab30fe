"""The one resumable watch loop (``datastore.watch``), against a scripted
store: list + watch from revision + 1, re-list at once on ``WatchCompacted``,
re-list after a doubling backoff on any other error (a lost connection, a
failed handler), stop on the event. No sleeping: waits are recorded."""

from __future__ import annotations

import threading

from overlaycni.datastore import Event
from overlaycni.datastore.watch import watch_loop
from overlaycni.errors import DatastoreUnavailable, OverlayCNIError, WatchCompacted


class Stop(threading.Event):
    """Records the backoff waits instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        return self.is_set()


class ScriptedStore:
    """Each ``watch`` call plays the next step: events, then maybe an error.
    With no step left the loop is told to stop."""

    def __init__(self, stop: Stop, steps: list[list], *, revisions: list) -> None:
        self.stop, self.steps, self.revisions = stop, steps, revisions
        self.watched_from: list[int] = []

    def revision(self) -> int:
        rev = self.revisions.pop(0)
        if isinstance(rev, Exception):
            raise rev
        return rev

    def watch(self, prefix, *, start_revision, stop):
        assert prefix == "/p/" and stop is self.stop
        self.watched_from.append(start_revision)
        if not self.steps:
            self.stop.set()
            return
        for item in self.steps.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


def put(key: str, rev: int) -> Event:
    return Event("put", key, "v", rev)


def run(store: ScriptedStore, **kw) -> tuple[list[str], list[str]]:
    seen: list[str] = []
    lists: list[str] = []
    watch_loop(store, "/p/", stop=store.stop, on_event=lambda ev: seen.append(f"{ev.key}@{ev.revision}"),
               on_relist=lambda: lists.append("list"), **kw)
    return seen, lists


def test_lists_then_watches_from_the_next_revision_and_stops():
    stop = Stop()
    store = ScriptedStore(stop, [[put("/p/a", 11), put("/p/b", 12)]], revisions=[10])
    seen, lists = run(store)
    assert lists == ["list"] and seen == ["/p/a@11", "/p/b@12"]
    assert store.watched_from == [11, 13]  # resumes after the last event seen


def test_start_revision_skips_the_first_listing():
    stop = Stop()
    store = ScriptedStore(stop, [[put("/p/a", 21)]], revisions=[])
    seen, lists = run(store, start_revision=20)
    assert lists == [] and seen == ["/p/a@21"] and store.watched_from == [21, 22]


def test_compacted_relists_at_once():
    stop = Stop()
    store = ScriptedStore(stop, [[put("/p/a", 11), WatchCompacted("compacted", revision=30)]], revisions=[10, 40])
    seen, lists = run(store)
    assert lists == ["list", "list"] and seen == ["/p/a@11"]
    assert store.watched_from == [11, 41] and stop.waits == []


def test_errors_relist_after_a_doubling_backoff_that_resets_when_events_flow():
    stop = Stop()
    lost = DatastoreUnavailable("connection lost")
    errors: list[OverlayCNIError] = []
    store = ScriptedStore(
        stop,
        [[lost], [lost], [put("/p/a", 61), lost], [lost]],
        revisions=[10, DatastoreUnavailable("still down"), 50, 60, 70, 80],
    )
    seen, lists = run(store, on_error=errors.append, delay=0.5, max_delay=1.5)
    # revision() failing during a re-list is one more error, with the next backoff
    assert stop.waits == [0.5, 1.0, 1.5, 0.5, 1.0]
    assert len(errors) == 5 and seen == ["/p/a@61"]
    assert lists == ["list"] * 5
    assert store.watched_from == [11, 51, 61, 71, 81]


def test_a_failing_handler_relists_and_stop_ends_the_loop():
    stop = Stop()
    store = ScriptedStore(stop, [[put("/p/a", 11), put("/p/b", 12)]], revisions=[10, 20])
    calls: list[str] = []

    def on_event(ev: Event) -> None:
        calls.append(ev.key)
        if ev.key == "/p/a":
            raise DatastoreUnavailable("handler could not read")

    watch_loop(store, "/p/", stop=stop, on_event=on_event, on_relist=lambda: calls.append("list"))
    assert calls == ["list", "/p/a", "list"] and store.watched_from == [11, 21]
    stop2 = Stop()
    stop2.set()
    assert watch_loop(ScriptedStore(stop2, [], revisions=[]), "/p/", stop=stop2, on_event=print, on_relist=print) is None
