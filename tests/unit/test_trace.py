"""Where a request's time goes (issue 14, item 1): the trace module, its
crossing to the data plane's worker thread, the ADD result's ``debug``
member when asked for, and the phase histograms. No timing is asserted,
only which phases are recorded."""

from __future__ import annotations

import json
import threading

from overlaycni import trace
from overlaycni.cni import shim
from overlaycni.dataplane.linux.netns import NetnsWorker
from overlaycni.trace import Phases, RequestTrace
from tests.unit.test_agent import cluster  # noqa: F401 (a fixture)
from tests.unit.test_agent_cniops import agent1, cni  # noqa: F401


def test_phases_go_to_the_current_trace_only():
    with trace.phase("ipam"):
        pass  # no trace: nothing to record, no error
    t = RequestTrace(accepted=1.0, complete=1.5)
    with trace.serving(t):
        with trace.phase("ipam"):
            pass
        with trace.phase("ipam"):
            pass
        assert trace.request() is t
        shared = Phases()
        with trace.recording(shared):
            assert trace.request() is None  # a batch's steps are no request's
            with trace.phase("kernel"):
                pass
        t.merge(shared)
    assert trace.current() is None
    t.sent = t.answered + 0.25
    d = t.durations()
    assert set(d) == {"read", "queue", "ipam", "kernel", "reply"}
    assert d["read"] == 0.5 and d["reply"] == 0.25 and d["queue"] >= 0
    assert "reply" not in t.to_debug()["timings"] and t.to_debug()["accepted"] == 1.0


def test_the_worker_thread_records_into_the_callers_trace():
    worker = NetnsWorker(None)
    try:
        rec = Phases()

        def on_worker():
            with trace.phase("veth"):
                return threading.current_thread().name

        with trace.recording(rec):
            name = worker.call(on_worker)
        assert name.startswith("ocni-dp") and set(rec.phases) == {"veth"}
        assert worker.call(trace.current) is None  # nothing stays behind on the worker
    finally:
        worker.close()


def test_add_answers_its_trace_when_asked_and_the_agent_keeps_histograms(agent1):  # noqa: F811
    agent, dp, store = agent1
    code, res = cni(agent, "ADD", "plain")
    assert code == 0 and "debug" not in res  # control: a runtime never asks
    env_args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=dbg;OVERLAYCNI_DEBUG=timings"


    config = {"cniVersion": "1.0.0", "name": "overlaycni", "type": "overlaycni", "socket": agent.opts.socket}
    code, res = shim.run({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "dbg", "CNI_IFNAME": "eth0",
                          "CNI_NETNS": "/var/run/netns/dbg", "CNI_ARGS": env_args}, json.dumps(config))
    assert code == 0, res
    debug = res["debug"]
    assert {"read", "queue", "lock", "netns", "batch", "ipam", "kernel", "veth", "route", "nft"} <= set(debug["timings"])
    assert debug["batch"] == 1 and debug["answered"] >= debug["accepted"]
    assert cni(agent, "DEL", "dbg") == (0, None)
    text = agent.metrics.exposition().decode()
    for command, phase in (("ADD", "ipam"), ("ADD", "veth"), ("ADD", "reply"), ("DEL", "kernel")):
        assert f'overlaycni_cni_phase_seconds_count{{command="{command}",phase="{phase}"}}' in text, (command, phase)
    assert 'overlaycni_cni_batch_size_count{command="ADD"} 2.0' in text
