"""Flow log capture on the kernel: the rendered log rules, an NFLOG group
bound through the namespace worker, real packets between pod namespaces.

One node namespace and three pod namespaces (``oct-<hex>-*``, removed at
the end). Pods x/web and x/api are on this node; y/client too. Checks: a
denied TCP connection is logged at ingress (deny) and egress (allow,
default), an allowed UDP stream without replies is logged once, the
per-source limit decides floods without logging and counts exactly what it
did not log, and a group is bound once per namespace.
"""

from __future__ import annotations

import subprocess
import sys
import time
from ipaddress import IPv4Address

import pytest

from overlaycni.dataplane.linux import LinuxDataplane
from overlaycni.dataplane.nflog import LoggedPacket
from overlaycni.errors import DataplaneError
from overlaycni.policy import parse_policies
from overlaycni.policy.flowlog import FlowLogSpec, RuleRef
from overlaycni.policy.model import NamespaceInfo, PodInfo
from overlaycni.policy.render import render_node

pytestmark = pytest.mark.kernel

GROUP = 7
PODS = {
    "x/web": PodInfo("x", "web", IPv4Address("10.244.0.2"), "n1", {"app": "web"}),
    "x/api": PodInfo("x", "api", IPv4Address("10.244.0.3"), "n1", {"app": "api"}),
    "y/client": PodInfo("y", "client", IPv4Address("10.244.0.4"), "n1", {"app": "client"}),
}
POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-udp, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{ports: [{port: 53, protocol: UDP}]}]
"""
SEND_UDP = (
    "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "for p in range(int(sys.argv[2]),int(sys.argv[3])):\n s.sendto(b'x',(sys.argv[1],p))"
)


def sh(*argv: str) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout


@pytest.fixture(scope="module")
def node(request):
    prefix = "oct-" + __import__("secrets").token_hex(3)
    ns = {"node": f"{prefix}-node", **{k: f"{prefix}-{k.replace('/', '')}" for k in PODS}}
    made: list[str] = []
    dp = None
    try:
        for name in ns.values():
            sh("ip", "netns", "add", name)
            made.append(name)
        n = ns["node"]
        sh("ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for i, (key, pod) in enumerate(PODS.items()):
            p, host = ns[key], f"h{i}"
            sh("ip", "-n", n, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", p)
            sh("ip", "-n", n, "addr", "add", "169.254.1.1/32", "dev", host)
            sh("ip", "-n", n, "link", "set", host, "up")
            sh("ip", "-n", n, "route", "add", f"{pod.ip}/32", "dev", host)
            sh("ip", "-n", p, "link", "set", "lo", "up")
            sh("ip", "-n", p, "addr", "add", f"{pod.ip}/32", "dev", "eth0")
            sh("ip", "-n", p, "link", "set", "eth0", "up")
            sh("ip", "-n", p, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
            sh("ip", "-n", p, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        dp = LinuxDataplane(n)
        spec = FlowLogSpec(group=GROUP, rate=50, burst=50, cap=100000)
        doc = render_node("n1", pods=PODS.values(), namespaces=[NamespaceInfo("x"), NamespaceInfo("y")],
                          policies=parse_policies(POLICY), flow_log=spec)  # fmt: skip
        assert dp.policy_table.sync(doc) == "full"
        log = dp.open_verdict_log(group=GROUP)
        yield ns, dp, log
        log.close()
    finally:
        if dp is not None:
            dp.close()
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


def collect(log, until, timeout: float = 10.0) -> list[LoggedPacket]:
    got: list[LoggedPacket] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(got):
        got += log.receive(0.2)
    return got


def drain(log) -> None:
    while log.receive(0.3):
        pass
    log.stats()


def in_pod(ns: dict, key: str, code: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns[key], sys.executable, "-c", code, *args], capture_output=True, timeout=30)


def test_denied_tcp_is_logged_at_ingress_and_egress(node):
    ns, _, log = node
    drain(log)
    in_pod(ns, "y/client", "import socket\ntry: socket.create_connection(('10.244.0.2', 8080), timeout=0.5)\nexcept OSError: pass")
    got = collect(log, lambda g: {p.prefix for p in g} >= {"ocni:deny:in", "ocni:allow:eg:default"})
    deny = next(p for p in got if p.prefix == "ocni:deny:in")
    assert (str(deny.src), str(deny.dst), deny.proto, deny.dport) == ("10.244.0.4", "10.244.0.2", "TCP", 8080)
    egress = next(p for p in got if p.prefix == "ocni:allow:eg:default")
    assert (str(egress.src), str(egress.dst), egress.dport) == ("10.244.0.4", "10.244.0.2", 8080)


def test_an_allowed_udp_stream_without_replies_is_logged_once(node):
    ns, _, log = node
    drain(log)
    code = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',5353))\nfor _ in range(5): s.sendto(b'x',('10.244.0.2',53))"
    in_pod(ns, "x/api", code)
    rule = f"ocni:allow:in:{RuleRef('x/web-udp', 'Ingress', 0).digest}"
    got = collect(log, lambda g: any(p.prefix == rule for p in g), timeout=5)
    got += collect(log, lambda g: False, timeout=1.0)  # anything more that arrives
    assert [p.prefix for p in got if p.dport == 53].count(rule) == 1
    assert [p.prefix for p in got if p.dport == 53].count("ocni:allow:eg:default") == 1


def test_a_flood_is_rate_limited_and_what_is_not_logged_is_counted(node):
    ns, _, log = node
    drain(log)
    before = log.stats()
    n = 2000  # each to a new port of x/api: a new flow each, every one allowed (x/api is not isolated)
    in_pod(ns, "y/client", SEND_UDP, "10.244.0.3", "20000", str(20000 + n))
    got = collect(log, lambda g: False, timeout=2.0)
    after = log.stats()
    logged = [p for p in got if str(p.dst) == "10.244.0.3" and 20000 <= (p.dport or 0) < 20000 + n]
    skipped = after.ratelimited - before.ratelimited
    lost = after.lost - before.lost
    # two log chains per packet (egress and ingress: both pods are on this node), one shared per-source bucket
    assert len(logged) + lost + skipped == 2 * n
    assert skipped > 0 and len(logged) < n


def test_a_group_is_bound_once_per_namespace(node):
    ns, dp, _ = node
    with pytest.raises(DataplaneError, match=f"NFLOG group {GROUP}: bound by another process"):
        dp.open_verdict_log(group=GROUP)
    other = LinuxDataplane(ns["x/web"])  # another namespace has its own instance of the group
    try:
        other.open_verdict_log(group=GROUP).close()
    finally:
        other.close()


def test_what_the_packet_path_writes_is_not_drift(node):
    """The rate set's elements (``update @flowlog-rl`` from the packet path)
    and the counters are the table's own doing: the repair check leaves the
    table alone. Control: a verdict rule deleted behind our back is drift."""
    ns, dp, log = node
    in_pod(ns, "y/client", SEND_UDP, "10.244.0.3", "30000", "30100")
    rate_set = sh("ip", "netns", "exec", ns["node"], "nft", "list", "set", "inet", "overlaycni", "flowlog-rl")
    assert "10.244.0.4" in rate_set  # the packet path added the source
    assert dp.policy_table.repair() is None
    handle = sh("ip", "netns", "exec", ns["node"], "nft", "-a", "list", "chain", "inet", "overlaycni", "fl-in-default")
    last = [line for line in handle.splitlines() if "# handle" in line][-1].rsplit(" ", 1)[-1]
    sh("ip", "netns", "exec", ns["node"], "nft", "delete", "rule", "inet", "overlaycni", "fl-in-default", "handle", last)
    assert dp.policy_table.repair() is not None
    assert dp.policy_table.repair() is None
