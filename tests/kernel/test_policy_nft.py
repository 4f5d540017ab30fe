"""The rendered policy table, applied to real namespaces, judged by real packets.

Topology (all inside namespaces this module creates, prefix ``oct-<hex>``):
two "node" namespaces joined by a veth underlay (10.224.0.1 / .2, direct
routing of each pod's /32 to the other node), and the nine pods of the
upstream x/y/z x a/b/c model, each a namespace with ``eth0`` (its /32 and a
default route via a link-local gateway on the node's host veth). Every pod
serves TCP and UDP on 80 and 81. For each case the renders of both nodes are
applied inside the node namespaces and all 81 ordered pairs are probed; the
result must equal the engine's verdicts and the hand-written table.

Every pod is dual-stack as well: its IPv6 address (the model's twin of its
IPv4 one, ``policy_cases.ipv6_twin``) as a /128 on ``eth0`` with a default
route via ``fe80::1`` on the host veth, routed like the IPv4 /32 (the
underlay carries fd00:224::1 / ::2); the servers listen on both families.
The single-stack cases render IPv4 only (their models have no IPv6 address),
so IPv6 passes unjudged there; the dual-stack tests at the end render both
families and probe both.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from overlaycni.dataplane import nftables
from overlaycni.dataplane.linux import LinuxDataplane
from overlaycni.families import IPFamily
from overlaycni.policy import matrix, parse_policies
from overlaycni.policy.render import diff_render, render_node
from tests.policy_cases import CASES, ORDER, Model, build_model, case, np, with_ipv6_twins

pytestmark = pytest.mark.kernel

NODES = {"node-1": "10.224.0.1", "node-2": "10.224.0.2"}
NODES_V6 = {"node-1": "fd00:224::1", "node-2": "fd00:224::2"}
# node-3 of the model is folded into node-2: cross-node and same-node pairs both remain
PLACEMENT = {"x/a": "node-1", "x/b": "node-2", "x/c": "node-2", "y/a": "node-2", "y/b": "node-2",
             "y/c": "node-1", "z/a": "node-2", "z/b": "node-1", "z/c": "node-2"}

SERVER = r"""
import selectors, socket
sel = selectors.DefaultSelector()
for port in (80, 81):
    for fam, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        t = socket.socket(fam); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        u = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET6:
            for x in (t, u):
                x.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        t.bind((any_addr, port)); t.listen(128); t.setblocking(False); sel.register(t, selectors.EVENT_READ, "tcp")
        u.bind((any_addr, port)); sel.register(u, selectors.EVENT_READ, "udp")
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        try:
            if key.data == "tcp":
                c, _ = s.accept(); c.sendall(b"ok"); sel.register(c, selectors.EVENT_READ, "conn")
            elif key.data == "conn":
                data = s.recv(64)
                if data:
                    s.sendall(data)
                else:
                    sel.unregister(s); s.close()
            else:
                data, addr = s.recvfrom(64); s.sendto(b"ok", addr)
        except OSError:
            try:
                sel.unregister(s); s.close()
            except (KeyError, ValueError, OSError):
                pass
"""

PROBE = r"""
import concurrent.futures as cf, json, socket, sys
proto, port, ips = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def tcp(ip):
    try:
        with socket.create_connection((ip, port), timeout=2) as s:
            s.settimeout(2); return s.recv(2) == b"ok"
    except OSError:
        return False
def udp(ip):
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.7)
        for _ in range(3):
            try:
                s.sendto(b"hi", (ip, port)); data, _ = s.recvfrom(64)
                return data == b"ok"
            except OSError:
                pass
    return False
with cf.ThreadPoolExecutor(len(ips)) as ex:
    print(json.dumps(list(ex.map(tcp if proto == "TCP" else udp, ips))))
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


@dataclass
class Lab:
    prefix: str
    model: Model
    node_ns: dict[str, str]
    pod_ns: dict[str, str]
    dataplanes: dict[str, LinuxDataplane]  # one per node namespace: its policy table is the port under test

    def replace(self, node: str, doc: dict) -> None:
        """The whole table, whatever was applied before."""
        table = self.dataplanes[node].policy_table
        table.reset()
        assert table.sync(doc) == "full"

    def apply(self, docs: dict[str, dict]) -> None:
        for node, doc in docs.items():
            self.replace(node, doc)
            sh("ip", "netns", "exec", self.node_ns[node], "conntrack", "-F", check=False)

    def renders(self, model: Model, policies) -> dict[str, dict]:
        return {n: render_node(n, pods=model.pods, namespaces=model.namespaces, policies=policies) for n in NODES}

    def probe(
        self,
        port: int,
        protocol: str,
        *,
        expect: dict[tuple[str, str], bool] | None = None,
        family: IPFamily = IPFamily.ipv4,
    ) -> dict[tuple[str, str], bool]:
        """Probe all 81 ordered pairs with real packets over ``family``. On a
        loaded machine a probe can time out; pairs that ``expect`` says are
        allowed but came back blocked are probed again (twice at most). A
        pair that connected is never probed again, so a wrongly allowed pair
        is always reported."""
        out = self._probe_pairs([(s, d) for s in ORDER for d in ORDER], port, protocol, family)
        for _ in range(2):
            again = [k for k, ok in out.items() if expect and expect[k] and not ok]
            if not again:
                break
            out.update(self._probe_pairs(again, port, protocol, family))
        return out

    def _probe_pairs(
        self, pairs: list[tuple[str, str]], port: int, protocol: str, family: IPFamily = IPFamily.ipv4
    ) -> dict[tuple[str, str], bool]:
        by_src: dict[str, list[str]] = {}
        for src, dst in pairs:
            by_src.setdefault(src, []).append(dst)
        procs = {
            src: subprocess.Popen(
                ["ip", "netns", "exec", self.pod_ns[src], sys.executable, "-c", PROBE, protocol, str(port),
                 *[str(self.model.pod(d).address(family)) for d in dsts]],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for src, dsts in by_src.items()
        }
        out = {}
        for src, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0, stderr
            for dst, ok in zip(by_src[src], json.loads(stdout), strict=True):
                out[(src, dst)] = ok
        return out

    def wait_ready(self) -> None:
        """Every pod reaches every pod over both families before any test
        runs (no table yet)."""
        for key in ORDER:
            sh("ip", "netns", "exec", self.pod_ns[key], "ping", "-c1", "-W2", "169.254.1.1", check=False)
            sh("ip", "netns", "exec", self.pod_ns[key], "ping", "-6", "-c1", "-W2", "fe80::1%eth0", check=False)
        everything = {(s, d): True for s in ORDER for d in ORDER}
        for family in IPFamily:
            for _ in range(10):
                got = self.probe(80, "TCP", expect=everything, family=family)
                if all(got.values()):
                    break
                time.sleep(1)
            else:
                raise RuntimeError(f"the test topology never became fully connected over {family}:\n" + _table(got))

    def nft_json(self, node: str, *what: str) -> dict:
        return json.loads(sh("ip", "netns", "exec", self.node_ns[node], "nft", "-j", "list", *what).stdout)


@pytest.fixture(scope="module")
def lab():
    prefix = "oct-" + secrets.token_hex(3)
    model = build_model(nodes=PLACEMENT, dual=True)
    node_ns = {n: f"{prefix}-{n}" for n in NODES}
    pod_ns = {k: f"{prefix}-{k.replace('/', '')}" for k in ORDER}
    made: list[str] = []
    servers: list[subprocess.Popen] = []
    dataplanes: dict[str, LinuxDataplane] = {}
    try:
        for ns in [*node_ns.values(), *pod_ns.values()]:
            sh("ip", "netns", "add", ns)
            made.append(ns)
        n1, n2 = node_ns["node-1"], node_ns["node-2"]
        sh("ip", "-n", n1, "link", "add", "u1", "type", "veth", "peer", "name", "u2", "netns", n2)
        for node, dev, _peer in (("node-1", "u1", "node-2"), ("node-2", "u2", "node-1")):
            ns = node_ns[node]
            sh("ip", "-n", ns, "addr", "add", f"{NODES[node]}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{NODES_V6[node]}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        for key in ORDER:
            pod = model.pod(key)
            node, pns = node_ns[pod.node], pod_ns[key]
            host = "h" + key.replace("/", "")
            sh("ip", "-n", node, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", pns)
            sh("ip", "-n", node, "addr", "add", "169.254.1.1/32", "dev", host)
            sh("ip", "-n", node, "addr", "add", "fe80::1/64", "dev", host, "nodad")
            sh("ip", "-n", node, "link", "set", host, "up")
            sh("ip", "-n", node, "route", "add", f"{pod.ip}/32", "dev", host)
            sh("ip", "-n", node, "-6", "route", "add", f"{pod.ip_v6}/128", "dev", host)
            other = "node-2" if pod.node == "node-1" else "node-1"
            sh("ip", "-n", node_ns[other], "route", "add", f"{pod.ip}/32", "via", NODES[pod.node])
            sh("ip", "-n", node_ns[other], "-6", "route", "add", f"{pod.ip_v6}/128", "via", NODES_V6[pod.node])
            sh("ip", "-n", pns, "link", "set", "lo", "up")
            sh("ip", "-n", pns, "addr", "add", f"{pod.ip}/32", "dev", "eth0")
            sh("ip", "-n", pns, "addr", "add", f"{pod.ip_v6}/128", "dev", "eth0", "nodad")
            sh("ip", "-n", pns, "link", "set", "eth0", "up")
            sh("ip", "-n", pns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
            sh("ip", "-n", pns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
            sh("ip", "-n", pns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
            proc = subprocess.Popen(
                ["ip", "netns", "exec", pns, sys.executable, "-c", SERVER],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            servers.append(proc)
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        for node, ns in node_ns.items():
            dataplanes[node] = LinuxDataplane(ns)
        built = Lab(prefix, model, node_ns, pod_ns, dataplanes)
        built.wait_ready()
        yield built
    finally:
        for dp in dataplanes.values():
            dp.close()
        for proc in servers:
            proc.kill()
            proc.wait()
        for ns in made:
            sh("ip", "netns", "del", ns, check=False)


def _table(got: dict[tuple[str, str], bool]) -> str:
    return "\n".join(
        f"{src:4} " + "".join("." if got[(src, dst)] else "X" for dst in ORDER) for src in ORDER
    )


def test_no_table_everything_connects(lab):
    for node in NODES:
        sh("ip", "netns", "exec", lab.node_ns[node], "nft", "delete", "table", "inet", "overlaycni", check=False)
    got = lab.probe(80, "TCP", expect={(s, d): True for s in ORDER for d in ORDER})
    assert all(got.values()), _table(got)


KERNEL_CASES = [
    "default-deny-all",
    "pod-and-namespace",
    "pod-or-namespace",
    "stacked-policies",
    "named-port-from-namespace",
    "egress-named-port-probe-81",
    "egress-denied-even-if-server-allows",
    "ingress-and-egress-together",
    "egress-cidr-except",
    "cidr-and-except-overlap-allowed",
    "udp-81-only-probe-udp-80",
    "protocol-only-udp-probe-udp",
    "end-port-probe-in-range-tcp",
    "exists-and-notin",
    "named-port-protocol-mismatch",
    "sctp-policy-isolates",
]


if os.environ.get("OVERLAYCNI_POLICY_ALL_CASES"):  # every probe-able case (about 3 minutes)
    KERNEL_CASES = [c.name for c in CASES if c.probe]


@pytest.mark.parametrize("name", KERNEL_CASES)
def test_real_packets_match_engine_and_table(lab, name):
    c = case(name)
    model = c.model(nodes=PLACEMENT)
    policies = parse_policies(c.manifest(model))
    lab.apply(lab.renders(model, policies))
    engine = matrix(list(model.pods), port=c.port, protocol=c.protocol, namespaces=model.namespaces, policies=policies)
    got = lab.probe(c.port, c.protocol, expect=engine)
    assert got == engine, f"probed:\n{_table(got)}\nengine:\n{_table(engine)}"
    assert got == c.expected(), f"probed:\n{_table(got)}\nexpected:\n{_table(c.expected())}"


def test_label_change_applied_as_elements_only(lab):
    c = case("updated-pod-labels")
    before = build_model(nodes=PLACEMENT)  # x/b without pod2=updated
    after = c.model(nodes=PLACEMENT)
    policies = parse_policies(c.manifest(after))
    old = lab.renders(before, policies)
    lab.apply(old)
    closed = {k: k[1] != "x/a" or k[0] == "x/a" for k in c.expected()}  # x/a admits nobody yet
    got = lab.probe(c.port, c.protocol, expect=closed)
    assert got == closed, _table(got)
    assert not got[("x/b", "x/a")] and got[("x/a", "x/a")]
    assert not any(got[(s, "x/a")] for s in ORDER if s != "x/a")

    rules_before = {n: _rule_handles(lab.nft_json(n, "table", "inet", "overlaycni")) for n in NODES}
    new = lab.renders(after, policies)
    for node in NODES:
        diff = diff_render(old[node], new[node])
        assert diff is not None and diff["nftables"], "a label change must be an element update"
        assert all(set(cmd[next(iter(cmd))]) == {"element"} for cmd in diff["nftables"])
        assert lab.dataplanes[node].policy_table.sync(new[node]) == "elements"
    for node in NODES:
        assert _rule_handles(lab.nft_json(node, "table", "inet", "overlaycni")) == rules_before[node]
        sets = [o["set"] for o in lab.nft_json(node, "sets", "table", "inet", "overlaycni")["nftables"] if "set" in o]
        assert any(str(after.pod("x/b").ip) in s.get("elem", []) for s in sets)
    got = lab.probe(c.port, c.protocol, expect=c.expected())
    assert got == c.expected(), _table(got)

    # and back: the label goes away again, x/b loses access, still no rule rebuilt
    for node in NODES:
        assert lab.dataplanes[node].policy_table.sync(old[node]) == "elements"
        sh("ip", "netns", "exec", lab.node_ns[node], "conntrack", "-F", check=False)
    got = lab.probe(c.port, c.protocol, expect=closed)
    assert got == closed, _table(got)


def test_established_connection_survives_tightening(lab):
    """Replies of allowed connections pass: a TCP connection opened while
    allowed keeps working after a deny-all is applied; a new one is refused."""
    # a table without policies: conntrack is active (as on a real node) and nothing is isolated
    lab.apply(lab.renders(lab.model, []))
    src, dst = "y/a", "x/a"  # different nodes
    script = (
        "import socket,sys,time\n"
        f"s=socket.create_connection(('{lab.model.pod(dst).ip}',80),timeout=3)\n"
        "print(s.recv(2).decode(),flush=True)\n"
        "sys.stdin.readline()\n"
        "s.settimeout(3)\n"
        "s.sendall(b'echo'); print(s.recv(4).decode(),flush=True)\n"
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.pod_ns[src], sys.executable, "-c", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ok"
        c = case("default-deny-all")
        model = c.model(nodes=PLACEMENT)
        docs = lab.renders(model, parse_policies(c.manifest(model)))
        for node, doc in docs.items():  # no conntrack flush here
            lab.replace(node, doc)
        # the conntrack entry is there in the destination node, marked established
        ct = sh("ip", "netns", "exec", lab.node_ns["node-1"], "conntrack", "-L", "-p", "tcp", "--dst", str(lab.model.pod(dst).ip)).stdout
        assert "ESTABLISHED" in ct
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "echo", proc.stderr.read()
        assert not lab.probe(80, "TCP")[(src, dst)]
    finally:
        proc.kill()
        proc.wait()


def _rule_handles(doc: dict) -> list[tuple[str, int]]:
    return sorted((o["rule"]["chain"], o["rule"]["handle"]) for o in doc["nftables"] if "rule" in o)


def test_every_case_render_is_accepted_by_nft(lab):
    """All cases (SCTP included), both nodes, single- and dual-stack (every
    ipBlock with its IPv6 twin): nft accepts each table."""
    for c in CASES:
        for dual in (False, True):
            model = c.model(nodes=PLACEMENT, dual=dual)
            pols = parse_policies(c.manifest(model))
            for node in NODES:
                doc = render_node(node, pods=model.pods, namespaces=model.namespaces, policies=with_ipv6_twins(pols) if dual else pols)
                lab.replace(node, doc)
            listed = lab.nft_json("node-1", "table", "inet", "overlaycni")["nftables"]
            assert any(o.get("chain", {}).get("hook") == "forward" for o in listed)
            assert any(o.get("map", {}).get("name") == "ingress-pods-v6" for o in listed) is dual


@pytest.fixture
def scratch_ns():
    name = "oct-" + secrets.token_hex(4)
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def test_apply_errors_are_mapped(scratch_ns):
    from overlaycni.errors import NetnsNotFound, PolicyApplyError

    bad = [{"add": {"table": {"family": "inet", "name": "overlaycni"}}},
           {"add": {"rule": {"family": "inet", "table": "overlaycni", "chain": "nope", "expr": [{"accept": None}]}}}]
    with LinuxDataplane(scratch_ns) as dp, pytest.raises(PolicyApplyError) as info:
        dp.run(lambda: dp.ports.policy_nft.apply(bad))
    assert "nope" in info.value.details or "No such file" in info.value.details
    # the failed transaction left nothing behind
    listed = json.loads(sh("ip", "netns", "exec", scratch_ns, "nft", "-j", "list", "ruleset").stdout)["nftables"]
    assert not any("table" in o for o in listed)
    with pytest.raises(NetnsNotFound):
        LinuxDataplane(scratch_ns + "-missing")


def test_policy_table_elements_then_full_and_drift(scratch_ns):
    c = case("updated-pod-labels")
    before, after = build_model(), c.model()
    pols = parse_policies(c.manifest(after))
    old = render_node("node-1", pods=before.pods, namespaces=before.namespaces, policies=pols)
    new = render_node("node-1", pods=after.pods, namespaces=after.namespaces, policies=pols)
    ip = str(after.pod("x/b").ip)
    with LinuxDataplane(scratch_ns) as dp:
        table = dp.policy_table
        assert table.sync(old) == "full"
        assert table.sync(old) == "none"
        assert table.sync(new) == "elements"
        sets = json.loads(sh("ip", "netns", "exec", scratch_ns, "nft", "-j", "list", "sets", "table", "inet", "overlaycni").stdout)
        holding = [o["set"]["name"] for o in sets["nftables"] if "set" in o and ip in o["set"].get("elem", [])]
        assert holding
        adds = diff_render(old, new)["nftables"]
        dp.run(lambda: dp.ports.policy_nft.apply(adds))  # adding a present element is harmless
        assert table.sync(old) == "elements"
        assert table.sync(new) == "elements"
        # the kernel drifts behind the port's back (the element to delete is gone already): full table instead
        sh("ip", "netns", "exec", scratch_ns, "nft", "delete", "element", "inet", "overlaycni", holding[0], f"{{ {ip} }}")
        assert table.sync(old) == "full"
        other = render_node("node-1", pods=after.pods, namespaces=after.namespaces,
                            policies=parse_policies(case("default-deny-all").manifest(after)))
        assert table.sync(other) == "full"
        table.reset()
        assert table.sync(other) == "full"
        table.remove()
        table.remove()  # already gone is fine
    assert "overlaycni" not in sh("ip", "netns", "exec", scratch_ns, "nft", "list", "ruleset").stdout


def test_node_policy_table_sync(scratch_ns):
    c = case("updated-pod-labels")
    before, after = build_model(), c.model()
    pols = parse_policies(c.manifest(after))

    def render(m, policies):
        return render_node("node-1", pods=m.pods, namespaces=m.namespaces, policies=policies)

    with LinuxDataplane(scratch_ns) as dp:
        table = dp.policy_table
        assert table.sync(render(before, pols)) == "full"
        assert table.sync(render(before, pols)) == "none"
        assert table.sync(render(after, pols)) == "elements"
        assert table.sync(render(after, [])) == "full"
        listed = json.loads(sh("ip", "netns", "exec", scratch_ns, "nft", "-j", "list", "table", "inet", "overlaycni").stdout)
        assert not any(o.get("chain", {}).get("name", "").startswith("in-ns-") for o in listed["nftables"])
        # the node table of the same data plane is another table: the policy table never touches it
        assert "table ip overlaycni" not in sh("ip", "netns", "exec", scratch_ns, "nft", "list", "ruleset").stdout
        table.remove()
    assert "overlaycni" not in sh("ip", "netns", "exec", scratch_ns, "nft", "list", "ruleset").stdout


# ----- dual stack: both families judged by real packets -----------------------------------------


def _everyone_but(dst: str, allowed_srcs: set[str]) -> dict[tuple[str, str], bool]:
    """Every pair connects, except into ``dst`` from anyone not in ``allowed_srcs`` (nor itself)."""
    return {(s, d): d != dst or s == dst or s in allowed_srcs for s in ORDER for d in ORDER}


def _check_both_families(lab, policies, want: dict[IPFamily, dict[tuple[str, str], bool]], port=80, protocol="TCP"):
    for family, expected in want.items():
        engine = matrix(list(lab.model.pods), port=port, protocol=protocol, namespaces=lab.model.namespaces,
                        policies=policies, family=family)
        assert engine == expected, f"engine over {family}:\n{_table(engine)}"
        got = lab.probe(port, protocol, expect=expected, family=family)
        assert got == expected, f"probed over {family}:\n{_table(got)}\nexpected:\n{_table(expected)}"


def test_ipv6_ipblock_128_lets_exactly_that_pod_in(lab):
    """Ingress to x/a (node-1) from an IPv6 ipBlock /128 of y/b (node-2):
    over IPv6 TCP exactly y/b gets in; another pod's IPv6 is refused (z/b,
    on x/a's own node, and every other); over IPv4 nobody gets in, y/b
    included: the IPv6 block opens nothing of the other family."""
    yb = lab.model.pod("y/b")
    spec = f"  podSelector:\n    matchLabels: {{pod: a}}\n  ingress:\n  - from:\n    - ipBlock: {{cidr: '{yb.ip_v6}/128'}}\n"
    pols = parse_policies(np("x", "x-a-from-y-b-v6", spec))
    lab.apply(lab.renders(lab.model, pols))
    _check_both_families(lab, pols, {IPFamily.ipv6: _everyone_but("x/a", {"y/b"}), IPFamily.ipv4: _everyone_but("x/a", set())})


def test_ipv6_ipblock_except_on_egress(lab):
    """Egress of x/a to the IPv6 pod range except z/c's /128: over IPv6
    x/a reaches everyone but z/c; over IPv4 (no IPv4 rule) nobody."""
    zc = lab.model.pod("z/c")
    spec = (f"  podSelector:\n    matchLabels: {{pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n"
            f"    - ipBlock: {{cidr: 'fd12:3456:789a::/64', except: ['{zc.ip_v6}/128']}}\n")
    pols = parse_policies(np("x", "x-a-to-v6-but-z-c", spec))
    lab.apply(lab.renders(lab.model, pols))
    v6 = {(s, d): s != "x/a" or d != "z/c" for s in ORDER for d in ORDER}
    v4 = {(s, d): s != "x/a" or d == "x/a" for s in ORDER for d in ORDER}
    _check_both_families(lab, pols, {IPFamily.ipv6: v6, IPFamily.ipv4: v4})


@pytest.mark.parametrize("name", ["pod-and-namespace", "named-port-from-namespace", "ingress-and-egress-together"])
def test_pod_selector_policy_applies_to_both_families(lab, name):
    """Selector policies (and named ports) hold over IPv4 and IPv6 alike:
    the hand-written table, probed with real TCP over each family."""
    c = case(name)
    model = c.model(nodes=PLACEMENT, dual=True)
    pols = parse_policies(c.manifest(model))
    lab.apply(lab.renders(model, pols))
    _check_both_families(lab, pols, {f: c.expected() for f in IPFamily}, c.port, c.protocol)


def test_dual_stack_elements_reach_the_kernel_and_list_back(scratch_ns):
    """A label change on a dual-stack render is an element update of both
    families' sets; what the kernel lists back decodes to exactly the
    render's elements (IPv6 sets, ``ipv6_addr . inet_service`` sets and
    IPv6 verdict maps included)."""
    c = case("updated-pod-labels")
    before, after = build_model(dual=True), c.model(dual=True)
    pols = parse_policies(c.manifest(after) + "---\n" + case("named-port-from-namespace").manifest(after))
    old = render_node("node-1", pods=before.pods, namespaces=before.namespaces, policies=pols)
    new = render_node("node-1", pods=after.pods, namespaces=after.namespaces, policies=pols)
    with LinuxDataplane(scratch_ns) as dp:
        table = dp.policy_table
        assert table.sync(old) == "full"
        assert table.sync(new) == "elements"
        listing = json.loads(sh("ip", "netns", "exec", scratch_ns, "nft", "-j", "list", "table", "inet", "overlaycni").stdout)
        want = nftables.image(new).sets
        assert nftables.parse_listing(listing).sets == want
        assert any(name.endswith("-v6") and after.pod("x/b").ip_v6 in elems for name, elems in want.items())
        assert {n for n in want if n.startswith("np-") and n.endswith("-v6")}
        assert table.sync(old) == "elements"
        table.remove()
