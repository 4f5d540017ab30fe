"""An agent's ``last_error`` is its current trouble, not its history: once
the datastore is back (a full resync succeeds with no reconcile error) it is
cleared, as the policy controller's and the flow log's are. Found by
``bench/soak.py --store etcd`` (its ``etcd_pause`` fault, seed 11): after a
few seconds of SIGSTOPped etcd every agent that had not restarted still
reported ``node watch: ... unreachable`` long after etcd came back, ready
and fully resynced, so ``agent status`` showed a stale error with no age."""

from __future__ import annotations

import pytest

from overlaycni import ipam
from overlaycni.errors import DatastoreUnavailable
from tests.unit.test_agent import cluster, start_agent  # noqa: F401 (cluster is a fixture)

AWAY = DatastoreUnavailable("etcd datastore etcds://10.224.255.253:2379 is unreachable")


def test_a_watch_error_is_cleared_by_the_next_good_resync(cluster, tmp_path):  # noqa: F811
    url, _store = cluster
    agent, _dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    try:
        agent.node._failed("node watch", AWAY)  # what the node watch's on_error does when etcd is away  # noqa: SLF001
        h = agent.health()
        assert not h["ready"] and "unreachable" in h["last_error"]  # control: the error shows while it lasts
        agent.node.resync()  # the watch re-lists once etcd answers (on_relist)
        h = agent.health()
        assert h["ready"] and h["last_error"] is None, h
    finally:
        agent.shutdown()


def test_a_failing_resync_keeps_its_error(cluster, tmp_path, monkeypatch):  # noqa: F811
    url, _store = cluster
    agent, _dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    try:

        def away(*_a, **_k):
            raise AWAY

        monkeypatch.setattr(ipam, "list_allocations", away)
        assert not agent.node.safe_resync("periodic")
        assert "periodic resync" in agent.health()["last_error"] and not agent.health()["ready"]
        monkeypatch.undo()
        assert agent.node.safe_resync("periodic")
        assert agent.health()["last_error"] is None and agent.health()["ready"]
    finally:
        agent.shutdown()


@pytest.mark.parametrize("errors", [["route 10.244.1.0/24: File exists"]])
def test_a_resync_with_reconcile_errors_reports_them(cluster, tmp_path, monkeypatch, errors):  # noqa: F811
    url, _store = cluster
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    try:
        real = dp.reconcile

        def with_errors(state):
            report = real(state)
            return type(report)(changes=report.changes, errors=list(errors))

        monkeypatch.setattr(dp, "reconcile", with_errors)
        agent.node.resync()
        assert agent.health()["last_error"] == errors[0]  # a resync that did not fully succeed keeps an error
    finally:
        agent.shutdown()
