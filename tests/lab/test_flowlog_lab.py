"""Flow logs in a real lab: real agents, real packets, ``lab flows``.

One lab (2 nodes, vxlan, sqlite): x/web on node1 (app=web), y/client on
node2 (app=client). Connections are real TCP connects and UDP datagrams
from inside the pods; the flows are read with ``overlaycni lab flows
--output json`` (every node's agent, from inside the lab). Each check waits
for the records it expects (a generous deadline, no timing asserted), and
each has its control: the same connection under the opposite policy.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from overlaycni.agent.flows import CONTRACT_KEYS
from overlaycni.dataplane.linux.netns import NetnsWorker
from overlaycni.lab import flows as lab_flows
from overlaycni.lab import state as lab_state

from .conftest import OC, Lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]

DEADLINE = 60.0
DENY_INGRESS = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all-ingress, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
"""
WEB_FROM_Y = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-y, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: 8443}]
"""
CLIENT_EGRESS = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-egress, namespace: y}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress: [{ports: [{port: 53, protocol: UDP}]}]
"""
CONNECT = """
import socket, sys
proto, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if proto == "tcp":
    try:
        socket.create_connection((ip, port), timeout=0.5).close()
    except OSError:
        pass
else:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", (ip, port))
"""
SYN_FLOOD = """
import socket, struct, sys, time
src, dst, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def csum(b):
    if len(b) % 2: b += b"\\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, 20)
for i in range(count):
    sport = 10000 + i % 50000
    hdr = struct.pack("!HHIIBBHHH", sport, port, i, 0, 5 << 4, 0x02, 64240, 0, 0)
    hdr = hdr[:16] + struct.pack("!H", csum(pseudo + hdr)) + hdr[18:]
    raw.sendto(hdr, (dst, 0))
    if i % 200 == 199:
        time.sleep(0.02)  # paced: nothing is lost on the way, so the node's accounting is exact
print(count)
"""


COUNT_TABLE = """table inet flowtest {{
  counter syns {{ }}
  chain count {{
    type filter hook forward priority -10; policy accept;
    ip saddr {src} tcp dport 7001 tcp flags syn counter name "syns"
  }}
}}
"""


def policy(lab: Lab, verb: str, arg: str) -> None:
    import subprocess

    if verb == "apply":
        proc = subprocess.run([OC, "policy", "apply", "-f", "-", "--lab", lab.name], input=arg, capture_output=True, text=True, env=lab.env)
    else:
        proc = subprocess.run([OC, "policy", "delete", arg, "--lab", lab.name], capture_output=True, text=True, env=lab.env)
    assert proc.returncode == 0, proc.stderr


def flows(lab: Lab, *args: str) -> list[dict[str, Any]]:
    doc = lab.json("flows", *args)
    assert list(doc) == ["flows"]
    for f in doc["flows"]:  # the contract, exactly
        assert tuple(f) == CONTRACT_KEYS and list(f["src"]) == list(f["dst"]) == ["ip", "pod", "namespace"], f
    return doc["flows"]


def wait_flow(lab: Lab, send, match, *, args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Send (again, every few seconds: the agents apply policy asynchronously)
    until a flow matching ``match`` is listed; that flow."""
    deadline = time.monotonic() + DEADLINE
    since = time.time()
    while True:
        send()
        for _ in range(6):
            for f in flows(lab, *args):
                if _epoch(f["time"]) >= since - 1 and match(f):  # logged after this wait began
                    return f
            time.sleep(0.5)
        assert time.monotonic() < deadline, f"no matching flow within {DEADLINE:.0f}s; got: {flows(lab)[-10:]}"


def _epoch(t: str) -> float:
    from overlaycni.agent.flows import parse_time

    return parse_time(t, field="time")


@pytest.fixture(scope="module")
def fl_lab(make_lab) -> dict[str, Any]:
    lab = make_lab("fl", "--nodes", "2", "--pods-per-node", "0", "--backend", "vxlan", "--store", "sqlite")
    lab.oc("namespace", "add", "x", "--labels", "ns=x")
    lab.oc("namespace", "add", "y", "--labels", "ns=y")
    lab.oc("pod", "add", "web", "--namespace", "x", "--node", "node1", "--labels", "app=web")
    lab.oc("pod", "add", "client", "--namespace", "y", "--node", "node2", "--labels", "app=client")
    st = lab_state.load(lab.name, str(lab.root))
    pods = {f"{p.namespace}/{p.name}": p for p in st.pods}
    return {"lab": lab, "state": st, "web": pods["x/web"], "client": pods["y/client"]}


def sender(ctx: dict[str, Any], src: str, proto: str, dst: str, port: int):
    lab, s, d = ctx["lab"], ctx[src], ctx[dst]

    def send() -> None:
        import sys

        lab.ns(s.netns, sys.executable, "-c", CONNECT, proto, str(d.ip.ip), str(port), check=False)

    return send


def _is(f: dict[str, Any], *, direction: str, verdict: str, proto: str, port: int, src: str, dst: str) -> bool:
    return (
        f["direction"] == direction and f["verdict"] == verdict and f["proto"] == proto and f["dport"] == port
        and f"{f['src']['namespace']}/{f['src']['pod']}" == src and f"{f['dst']['namespace']}/{f['dst']['pod']}" == dst
    )  # fmt: skip


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_deny_all_ingress_then_deleted(fl_lab, proto):
    lab = fl_lab["lab"]
    port, p = (8080, "TCP") if proto == "tcp" else (5300, "UDP")
    send = sender(fl_lab, "client", proto, "web", port)
    policy(lab, "apply", DENY_INGRESS)
    try:
        f = wait_flow(lab, send, lambda f: _is(f, direction="ingress", verdict="deny", proto=p, port=port, src="y/client", dst="x/web"),
                      args=("--verdict", "deny"))  # fmt: skip
        assert f["node"] == "node1" and f["policies"] == ["x/deny-all-ingress"]
        assert f["src"]["ip"] == str(fl_lab["client"].ip.ip) and f["dst"]["ip"] == str(fl_lab["web"].ip.ip)
        # the source's node saw it leave, allowed (the client is not isolated for egress)
        eg = wait_flow(lab, send, lambda f: _is(f, direction="egress", verdict="allow", proto=p, port=port, src="y/client", dst="x/web"),
                       args=("--node", "node2"))  # fmt: skip
        assert eg["node"] == "node2" and eg["policies"] == []
    finally:
        policy(lab, "delete", "x/deny-all-ingress")
    # control: the same connection, no policy: an allow at the destination, no policy named
    f = wait_flow(lab, send, lambda f: _is(f, direction="ingress", verdict="allow", proto=p, port=port, src="y/client", dst="x/web"),
                  args=("--pod", "x/web", "--verdict", "allow"))  # fmt: skip
    assert f["policies"] == [] and f["node"] == "node1"


def test_allow_names_the_policy_rule(fl_lab):
    lab = fl_lab["lab"]
    policy(lab, "apply", WEB_FROM_Y)
    try:
        # (until the agent applies the policy the pod is not isolated: allowed by no policy)
        allowed = wait_flow(lab, sender(fl_lab, "client", "tcp", "web", 8443),
                            lambda f: _is(f, direction="ingress", verdict="allow", proto="TCP", port=8443, src="y/client", dst="x/web")
                            and f["policies"] != [])  # fmt: skip
        assert allowed["policies"] == ["x/web-from-y"] and allowed["node"] == "node1"
        denied = wait_flow(lab, sender(fl_lab, "client", "tcp", "web", 8444),  # control: a port the rule does not admit
                           lambda f: _is(f, direction="ingress", verdict="deny", proto="TCP", port=8444, src="y/client", dst="x/web"))  # fmt: skip
        assert denied["policies"] == ["x/web-from-y"]
    finally:
        policy(lab, "delete", "x/web-from-y")


def test_egress_deny_is_attributed_to_the_egress_policy(fl_lab):
    lab = fl_lab["lab"]
    policy(lab, "apply", CLIENT_EGRESS)
    try:
        f = deny = wait_flow(lab, sender(fl_lab, "client", "tcp", "web", 9090),
                             lambda f: _is(f, direction="egress", verdict="deny", proto="TCP", port=9090, src="y/client", dst="x/web"))  # fmt: skip
        assert f["node"] == "node2" and f["policies"] == ["y/client-egress"]
        ok = wait_flow(lab, sender(fl_lab, "client", "udp", "web", 53),  # control: the port the policy allows
                       lambda f: _is(f, direction="egress", verdict="allow", proto="UDP", port=53, src="y/client", dst="x/web")
                       and _epoch(f["time"]) >= _epoch(deny["time"]))  # fmt: skip
        assert ok["policies"] == ["y/client-egress"]
        # once the egress policy decides (the deny above), nothing of the connection reaches node1
        # (attempts sent before the agent applied the policy were allowed; a second of margin for those in flight)
        after = _epoch(f["time"]) + 1
        assert wait_flow(lab, sender(fl_lab, "client", "tcp", "web", 9090), lambda g: _epoch(g["time"]) > after + 2
                         and _is(g, direction="egress", verdict="deny", proto="TCP", port=9090, src="y/client", dst="x/web"))  # fmt: skip
        assert not [g for g in flows(lab, "--node", "node1") if g["dport"] == 9090 and _epoch(g["time"]) > after]
    finally:
        policy(lab, "delete", "y/client-egress")


def _health(ctx: dict[str, Any], node: str) -> dict[str, Any]:
    import urllib.request

    (agent,) = lab_flows.agents(ctx["state"], node=node)
    worker = NetnsWorker(agent.netns)  # the agent listens in its node's namespace: ask from there
    try:
        return json.loads(worker.call(lambda: urllib.request.urlopen(agent.url + "/healthz", timeout=10).read()))
    finally:
        worker.close()


def test_a_syn_flood_is_bounded_and_counted(fl_lab):
    import subprocess
    import sys

    lab, web, client = fl_lab["lab"], fl_lab["web"], fl_lab["client"]
    node1 = next(n for n in fl_lab["state"].nodes if n.name == "node1").netns
    policy(lab, "apply", DENY_INGRESS)
    try:
        wait_flow(lab, sender(fl_lab, "client", "tcp", "web", 7000),
                  lambda f: _is(f, direction="ingress", verdict="deny", proto="TCP", port=7000, src="y/client", dst="x/web"))  # fmt: skip
        # an independent count of the flood's SYNs reaching node1's forward hook, before the policy table sees them
        # (a busy machine can drop some on the way; every one that arrives must be recorded or counted)
        subprocess.run(["ip", "netns", "exec", node1, "nft", "-f", "-"], input=COUNT_TABLE.format(src=client.ip.ip),
                       text=True, check=True)  # fmt: skip
        before = _settled(fl_lab, "node1")["flow_log"]
        # the agent replaces its whole table every minute (repair), which restarts the kernel's counter
        # (it reads the counter just before; packets counted during the replace itself would be lost):
        # the flood starts right after such a pass, so it does not meet the next one
        full = _health(fl_lab, "node1")["policy_passes"]["full"]
        deadline = time.monotonic() + 90
        while _health(fl_lab, "node1")["policy_passes"]["full"] == full:
            assert time.monotonic() < deadline, "no periodic policy pass within 90s"
            time.sleep(0.2)
        n = 10_000
        flood = subprocess.Popen(
            ["ip", "netns", "exec", client.netns, sys.executable, "-c", SYN_FLOOD, str(client.ip.ip), str(web.ip.ip), "7001", str(n)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        while flood.poll() is None:
            assert _health(fl_lab, "node1")["flow_log"]["enabled"]  # /healthz answers during the flood
        out, err = flood.communicate()
        assert flood.returncode == 0 and int(out) == n, err
        after = _settled(fl_lab, "node1")["flow_log"]
        recorded = after["recorded"] - before["recorded"]
        dropped = {k: after["dropped"][k] - before["dropped"][k] for k in after["dropped"]}
        assert after["buffered"] <= after["capacity"]
        assert dropped["ratelimit"] > 0 and recorded < n  # the kernel rules logged a few and counted the rest
        arrived = json.loads(lab.ns(node1, "nft", "-j", "list", "counter", "inet", "flowtest", "syns").stdout)
        arrived = next(o["counter"]["packets"] for o in arrived["nftables"] if "counter" in o)
        assert 0 < arrived <= n
        assert recorded + dropped["ratelimit"] + dropped["socket"] == arrived, (recorded, dropped, arrived)
        in_ring = [f for f in flows(lab, "--node", "node1", "--verdict", "deny") if f["dport"] == 7001]
        assert 0 < len(in_ring) <= recorded
    finally:
        policy(lab, "delete", "x/deny-all-ingress")
        lab.ns(node1, "nft", "delete", "table", "inet", "flowtest", check=False)


def _settled(ctx: dict[str, Any], node: str) -> dict[str, Any]:
    """/healthz once the flow log counters stop moving (the collector folds
    the kernel's counts in every second)."""
    last = None
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        h = _health(ctx, node)
        now = (h["flow_log"]["recorded"], tuple(sorted(h["flow_log"]["dropped"].items())))
        if now == last:
            return h
        last = now
        time.sleep(2.5)
    raise AssertionError("the flow log counters never settled")
