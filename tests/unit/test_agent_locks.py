"""The request deadline and the attachment/node locks (no root)."""

from __future__ import annotations

import threading

import pytest

from overlaycni import deadline
from overlaycni.agent.locks import AttachmentLocks
from overlaycni.errors import DeadlineExceeded


def test_deadline_scopes():
    assert deadline.remaining() is None and deadline.remaining(5.0) == 5.0  # outside a request: the layer's own limit
    with deadline.within(10.0):
        assert 9.0 < deadline.remaining() <= 10.0
        assert deadline.remaining(2.0) == 2.0
        with deadline.within(60.0):
            assert deadline.remaining() <= 10.0  # the earlier end stays in force
        with deadline.within(0.0):
            assert deadline.remaining(5.0) == 0.0
            with pytest.raises(DeadlineExceeded, match="step"):
                deadline.check("step")
            with deadline.fresh(3.0):  # a rollback gets its own budget
                assert 2.0 < deadline.remaining() <= 3.0
                deadline.check("rollback")
    assert deadline.remaining() is None


def hold(locks: AttachmentLocks, key: str, *, node: bool = False) -> tuple[threading.Event, threading.Event]:
    """Hold ``key`` (or the node) in another thread until the returned event is set."""
    held, done = threading.Event(), threading.Event()

    def run() -> None:
        with locks.node() if node else locks.attachment(key):
            held.set()
            done.wait(10)

    threading.Thread(target=run, daemon=True).start()
    assert held.wait(5)
    return held, done


def test_attachment_lock_waits_no_longer_than_the_deadline():
    locks = AttachmentLocks()
    _, done = hold(locks, "oc1")
    try:
        with deadline.within(0.2), pytest.raises(DeadlineExceeded, match="oc1"), locks.attachment("oc1"):
            pass
        with deadline.within(0.2), locks.attachment("oc2") as got:  # control: another attachment is free
            assert got
        with locks.attachment("oc1", wait=False) as got:  # the reaper never waits
            assert not got
    finally:
        done.set()
    with deadline.within(2.0), locks.attachment("oc1") as got:
        assert got and locks.busy("oc1")
    assert not locks.busy("oc1")


def test_the_node_lock_excludes_every_attachment():
    locks = AttachmentLocks()
    _, done = hold(locks, "", node=True)
    try:
        with deadline.within(0.2), pytest.raises(DeadlineExceeded), locks.attachment("oc1"):
            pass
        with locks.attachment("oc1", wait=False) as got:
            assert not got
    finally:
        done.set()
    _, done = hold(locks, "oc1")
    try:
        with deadline.within(0.2), pytest.raises(DeadlineExceeded, match="GC"), locks.node():
            pass
        with deadline.within(0.2), locks.attachment("oc2") as got:  # a GC that gave up holds nothing off
            assert got
    finally:
        done.set()
