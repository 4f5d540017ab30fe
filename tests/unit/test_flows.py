"""The agent's flow log without root: the ring and its filters, records from
logged packets (pods, policies, rules), the drop counters, ``GET /flows``,
and ``overlaycni flows`` (its JSON contract) against an agent in-process on
the in-memory data plane."""

from __future__ import annotations

import json
import threading
import urllib.request
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

import pytest
from typer.testing import CliRunner

from overlaycni.agent.flowlog import FlowCollector, FlowLogOptions
from overlaycni.agent.flows import (
    CONTRACT_KEYS,
    FlowBuffer,
    FlowEndpoint,
    FlowFilter,
    FlowRecord,
    answer_flows,
    format_time,
    read_flows,
)
from overlaycni.agent.metrics import AgentMetrics
from overlaycni.cli.main import app
from overlaycni.dataplane.nflog import LoggedPacket
from overlaycni.dataplane.nflog_fake import FakeVerdictLog
from overlaycni.errors import UsageError
from overlaycni.policy import parse_policies
from overlaycni.policy.flowlog import RuleRef
from overlaycni.policy.model import NamespaceInfo, PodInfo
from tests.unit.test_agent import add_web_pod, cluster, cni, deny_web, start_agent, wait_for  # noqa: F401 - fixture

WEB = PodInfo("x", "web", IPv4Address("10.244.0.2"), "n1", {"app": "web"})
CLIENT = PodInfo("y", "client", IPv4Address("10.244.1.2"), "n2", {"app": "client"})
POLICIES = parse_policies("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-y, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]
    ports: [{port: 80}]
""")


def rec(i: int, *, verdict="allow", src="10.244.1.2", pod=("y", "client"), t=1000.0) -> FlowRecord:
    return FlowRecord(t + i, "n1", "ingress", verdict, "TCP", 80, FlowEndpoint(src, pod[1], pod[0]),
                      FlowEndpoint("10.244.0.2", "web", "x"), ("x/deny-all",) if verdict == "deny" else ())  # fmt: skip


def test_ring_is_bounded_and_pages_by_cursor():
    buf = FlowBuffer(3)
    for i in range(5):
        buf.append(rec(i))
    assert len(buf) == 3 and buf.evicted == 2 and buf.seq == 5
    got, cursor = buf.query()
    assert [r.seq for r in got] == [3, 4, 5] and cursor == 5
    assert [r.seq for r in buf.query(after=4)[0]] == [5]
    assert buf.query(after=5) == ([], 5)
    with pytest.raises(UsageError, match="flow-log-buffer"):
        FlowBuffer(0)


def test_filters():
    buf = FlowBuffer(10)
    buf.append(rec(0))
    buf.append(rec(1, verdict="deny"))
    buf.append(rec(2, src="203.0.113.9", pod=(None, None)))
    assert [r.seq for r in buf.query(FlowFilter(verdict="deny"))[0]] == [2]
    assert [r.seq for r in buf.query(FlowFilter(pod="y/client"))[0]] == [1, 2]
    assert [r.seq for r in buf.query(FlowFilter(pod="x/web"))[0]] == [1, 2, 3]  # either end
    assert [r.seq for r in buf.query(FlowFilter(since=1001.5))[0]] == [3]
    assert buf.query(FlowFilter(pod="x/nope"))[0] == []
    for bad, field in (({"verdict": "drop"}, "--verdict"), ({"pod": "web"}, "--pod"), ({"pod": "x/y/z"}, "--pod")):
        with pytest.raises(UsageError, match=field):
            FlowFilter(**bad)
    q = FlowFilter.from_query({"since": ["2026-01-02T03:04:05Z"], "verdict": ["deny"], "pod": ["x/web"]})
    assert q.verdict == "deny" and q.pod == "x/web" and q.since == 1767323045.0
    with pytest.raises(UsageError, match="--since"):
        FlowFilter.from_query({"since": ["yesterday"]})


def test_record_json_contract_round_trips():
    r = rec(0, verdict="deny")
    out = r.to_json(contract=True)
    assert tuple(out) == CONTRACT_KEYS
    assert out["src"] == {"ip": "10.244.1.2", "pod": "client", "namespace": "y"}
    assert out["time"] == format_time(1000.0) == "1970-01-01T00:16:40.000000Z"
    assert FlowRecord.from_json(json.loads(json.dumps(r.to_json()))) == r
    for broken, field in ((dict(out, verdict="maybe"), "verdict"), (dict(out, dport=70000), "dport"),
                          ({k: v for k, v in out.items() if k != "dst"}, "dst"), (dict(out, src="x"), "src")):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            FlowRecord.from_json(broken)


def test_answer_flows_errors_cursor_and_wait():
    assert answer_flows(None, {}).code == 404
    buf = FlowBuffer(10)
    assert answer_flows(buf, {"verdict": ["nope"]}).code == 400
    assert b"--after" in answer_flows(buf, {"after": ["-1"]}).body
    buf.append(rec(0))
    a = answer_flows(buf, {"after": ["99"]})  # ahead of the ring: the agent restarted, start over
    assert a.code == 200 and len(a.body.splitlines()) == 1 and dict(a.headers)["X-Flow-Cursor"] == "1"
    threading.Timer(0.2, lambda: buf.append(rec(1, verdict="deny"))).start()
    a = answer_flows(buf, {"after": ["1"], "wait": ["20"]})
    (line,) = a.body.splitlines()
    assert json.loads(line)["verdict"] == "deny" and json.loads(line)["seq"] == 2


def collector(capacity: int = 100) -> tuple[FlowCollector, FakeVerdictLog, AgentMetrics]:
    source, metrics = FakeVerdictLog(), AgentMetrics()
    c = FlowCollector(source, node="n1", buffer=FlowBuffer(capacity), metrics=metrics, stop=threading.Event(),
                      options=FlowLogOptions())  # fmt: skip
    c.update([WEB, CLIENT], [NamespaceInfo("x"), NamespaceInfo("y")], POLICIES)
    return c, source, metrics


def pkt(prefix: str, src="10.244.1.2", dst="10.244.0.2", *, dport=80, t: float | None = None) -> LoggedPacket:
    return LoggedPacket(prefix, IPv4Address(src), IPv4Address(dst), "TCP", dport, t)


def test_records_name_pods_and_deciding_policies():
    c, _, _ = collector()
    deny = c.record(pkt("ocni:deny:in"), now=5000.0)
    assert deny is not None and (deny.direction, deny.verdict, deny.dport) == ("ingress", "deny", 80)
    assert deny.src == FlowEndpoint("10.244.1.2", "client", "y") and deny.dst == FlowEndpoint("10.244.0.2", "web", "x")
    assert deny.policies == ("x/deny-all", "x/web-from-y") and deny.rule is None and deny.time == 5000.0
    d = RuleRef("x/web-from-y", "Ingress", 0).digest
    allow = c.record(pkt(f"ocni:allow:in:{d}", t=4999.5), now=5000.0)
    assert allow is not None and allow.policies == ("x/web-from-y",) and allow.rule == "ingress[0]"
    assert allow.time == 4999.5  # the kernel's timestamp when plausible
    assert c.record(pkt("ocni:allow:eg:default", t=12.0), now=5000.0).time == 5000.0  # type: ignore[union-attr]
    out = c.record(pkt("ocni:allow:eg:default", src="10.244.0.2", dst="203.0.113.7"), now=1.0)
    assert out is not None and out.policies == () and out.dst == FlowEndpoint("203.0.113.7", None, None)
    assert c.record(pkt("someone-else:drop"), now=1.0) is None
    # egress deny: the policies isolating the source for egress (none here: not isolated)
    eg = c.record(pkt("ocni:deny:eg", src="10.244.0.2", dst="10.244.1.2"), now=1.0)
    assert eg is not None and eg.direction == "egress" and eg.policies == ()


def test_a_dual_stack_pods_ipv6_flows_name_it():
    """A dual-stack pod's IPv6 address names the pod and finds its isolating
    policies, as its IPv4 address does (control: an address of no pod)."""
    c, _, _ = collector()
    web6, client6 = IPv6Address("fd12:3456:789a::2"), IPv6Address("fd12:3456:789a:0:1::2")
    c.update([replace(WEB, ip_v6=web6), replace(CLIENT, ip_v6=client6)], [], POLICIES)
    deny = c.record(LoggedPacket("ocni:deny:in", client6, web6, "TCP", 80, None), now=1.0)
    assert deny is not None and deny.src == FlowEndpoint(str(client6), "client", "y")
    assert deny.dst == FlowEndpoint(str(web6), "web", "x") and deny.policies == ("x/deny-all", "x/web-from-y")
    other = c.record(LoggedPacket("ocni:deny:in", IPv6Address("fd12::9"), web6, "TCP", 80, None), now=1.0)
    assert other is not None and other.src == FlowEndpoint("fd12::9", None, None)


def test_rules_of_the_previous_inventory_still_resolve():
    c, _, _ = collector()
    d = RuleRef("x/web-from-y", "Ingress", 0).digest
    c.update([WEB, CLIENT], [], [p for p in POLICIES if p.name != "web-from-y"])
    assert c.record(pkt(f"ocni:allow:in:{d}"), now=1.0).policies == ("x/web-from-y",)  # type: ignore[union-attr]
    c.update([WEB, CLIENT], [], [])
    gone = c.record(pkt(f"ocni:allow:in:{d}"), now=1.0)
    assert gone is not None and gone.policies == () and gone.rule == "ingress[?]"


def test_counters_and_drops():
    c, source, metrics = collector(capacity=2)
    source.push(pkt("ocni:deny:in"), pkt("ocni:deny:in"), pkt(f"ocni:allow:in:{RuleRef('x/web-from-y', 'Ingress', 0).digest}"),
                pkt("garbage"))  # fmt: skip
    c.handle(source.receive(1.0), now=1.0)
    source.lose(7)
    source.ratelimit(1000)
    c.poll_stats()
    assert c.dropped == {"ratelimit": 1000, "socket": 7, "buffer": 1, "malformed": 1}
    c.poll_stats()  # deltas only
    assert c.dropped == {"ratelimit": 1000, "socket": 7, "buffer": 1, "malformed": 1}
    text = metrics.exposition().decode()
    assert 'overlaycni_policy_verdicts_total{direction="ingress",namespace="x",policy="deny-all",verdict="deny"} 2.0' in text
    assert 'overlaycni_policy_verdicts_total{direction="ingress",namespace="x",policy="web-from-y",verdict="deny"} 2.0' in text
    assert 'overlaycni_policy_verdicts_total{direction="ingress",namespace="x",policy="web-from-y",verdict="allow"} 1.0' in text
    assert 'overlaycni_flow_log_dropped_total{reason="ratelimit"} 1000.0' in text
    assert c.status()["buffered"] == 2 and c.status()["recorded"] == 3


def test_agent_serves_flows_from_its_verdict_log(cluster, tmp_path):  # noqa: F811 - the fixture
    url, store = cluster
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4", flow_log=FlowLogOptions(), metrics_addr="127.0.0.1:0")
    try:
        ip = add_web_pod(agent, store)
        table = lambda: dp.kernel.nft_table("inet", "overlaycni")  # noqa: E731
        # no policy yet: the pod is logged as not isolated (flow logs render every local pod)
        assert wait_for(lambda: table() is not None and any(
            e.key == ip and e.value.target == "fl-in-default" for e in table().sets.get("ingress-pods", ())))
        deny_web(store)
        assert wait_for(lambda: "in-ns-default" in table().chains)
        assert wait_for(lambda: table().chains["in-ns-default"][-1]["expr"] == [{"goto": {"target": "fl-in-deny"}}])
        log = dp.kernel.verdict_logs[161]
        log.push(pkt("ocni:deny:in", src="203.0.113.5", dst=str(ip)), pkt("ocni:allow:eg:default", src=str(ip), dst="10.9.9.9"))
        base = agent._metrics_url()  # noqa: SLF001
        assert wait_for(lambda: len(read_flows(base)[0]) == 2)
        records, cursor = read_flows(base, FlowFilter(verdict="deny"))
        assert cursor == 2 and [r.policies for r in records] == [("default/deny",)]
        assert records[0].dst == FlowEndpoint(str(ip), "web", "default") and records[0].src.pod is None
        health = json.loads(urllib.request.urlopen(base + "/healthz").read())
        assert health["flow_log"]["enabled"] and health["flow_log"]["buffered"] == 2

        runner = CliRunner()
        out = runner.invoke(app, ["flows", "--agent", base, "--output", "json"])
        assert out.exit_code == 0, out.output
        doc = json.loads(out.stdout)
        assert list(doc) == ["flows"] and [tuple(f) for f in doc["flows"]] == [CONTRACT_KEYS] * 2
        assert doc["flows"][0]["policies"] == ["default/deny"] and doc["flows"][0]["dst"]["pod"] == "web"
        table_out = runner.invoke(app, ["flows", "--agent", base, "--pod", "default/web", "--verdict", "deny"])
        assert table_out.exit_code == 0 and "DENY" in table_out.stdout and "default/deny" in table_out.stdout
        assert "allow" not in table_out.stdout
        bad = runner.invoke(app, ["flows", "--agent", base, "--verdict", "nope"])
        assert bad.exit_code != 0
    finally:
        agent.shutdown()


def test_follow_streams_json_lines(monkeypatch):
    from overlaycni.cli import flows as cli_flows

    calls = []

    def fake_read(agent, flt, *, after=0, wait=0.0):
        calls.append((after, wait))
        if len(calls) == 1:
            return [rec(0)], 1
        if len(calls) == 2:
            return [rec(1, verdict="deny")], 2
        raise KeyboardInterrupt

    monkeypatch.setattr("overlaycni.agent.flows.read_flows", fake_read)  # cli.flows imports it when it runs
    out = CliRunner().invoke(app, ["flows", "--follow", "--output", "json"])
    assert out.exit_code == 0, out.output
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x["verdict"] for x in lines] == ["allow", "deny"] and all(tuple(x) == CONTRACT_KEYS for x in lines)
    assert calls[1] == (1, cli_flows.FOLLOW_WAIT) and calls[2][0] == 2


def test_lab_reads_the_agents_last_ready_line_and_merges_by_time(tmp_path):
    from overlaycni.lab.flows import _metrics_url, merge

    out = tmp_path / "agent.out"
    assert _metrics_url(out) is None  # no file: the agent never started
    out.write_text('{"event": "ready", "metrics": "http://127.0.0.1:4001"}\nnot json\n'
                   '{"event": "ready", "metrics": "http://127.0.0.1:4002"}\n{"event": "other"}\n')  # fmt: skip
    assert _metrics_url(out) == "http://127.0.0.1:4002"  # a restarted agent's port
    a = [rec(0), rec(5)]
    b = [FlowRecord(1002.0, "n2", "egress", "allow", "UDP", 53, FlowEndpoint("10.244.1.2"), FlowEndpoint("10.244.0.2"))]
    assert [(r.time, r.node) for r in merge([a, b])] == [(1000.0, "n1"), (1002.0, "n2"), (1005.0, "n1")]


def test_the_controller_reads_the_flow_log_counters_right_before_it_applies(cluster):  # noqa: F811 - the fixture
    """A whole-table replace restarts the kernel's counter: the controller
    hands its inventory to the flow log, then lets it read the counter, then
    applies."""
    from overlaycni.agent.policy import PolicyController
    from overlaycni.policy.flowlog import FlowLogSpec

    url, store = cluster
    calls: list[str] = []

    class Table:
        def sync(self, render):
            calls.append("sync" + (":logged" if '"log"' in json.dumps(render) else ""))
            return "full"

        def reset(self):
            calls.append("reset")

        def remove(self):
            pass

    ctl = PolicyController(
        store, cluster="c1", node="n1", stop=threading.Event(), table=Table(), on_bad=lambda exc: None,
        flow_log=FlowLogSpec(), on_inventory=lambda *_: calls.append("inventory"), before_apply=lambda: calls.append("read"),
    )  # fmt: skip
    ctl.sync(full=True)
    assert calls == ["inventory", "reset", "read", "sync:logged"]
