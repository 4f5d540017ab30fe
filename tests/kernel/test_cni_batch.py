"""Group commit on the real kernel (issue 14, item 2): bursts of concurrent
CNI requests through the installed plugin, against an agent in a node
namespace made here (shared by the module). Results are read with ``ip``,
``nft``, ``conntrack`` and ``ipam show/check``, never through the
project's own code. Which requests share a batch depends on timing, so
these tests assert what must hold whatever the grouping (each request's own
answer, the end state, nothing half done); tests/unit/test_agent_batch.py
makes the batches deterministic."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from ipaddress import IPv4Address

import pytest

from tests.kernel.cni_harness import Cluster
from tests.kernel.topology import Topology, ip_json, run

pytestmark = pytest.mark.kernel
REAP_FLAGS = ("--reap-interval", "1", "--reap-grace", "2")


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    topo = Topology()
    cluster = Cluster(topo=topo, workdir=tmp_path_factory.mktemp("batch"))
    try:
        topo.add_underlay()
        cluster.create()
        cluster.install()
        cluster.add_node("n1", "10.224.0.4", *REAP_FLAGS)
        yield cluster
    finally:
        topo.cleanup()


def host_veth(cid: str, ifname: str = "eth0") -> str:
    import hashlib

    return "oc" + hashlib.sha256(f"{cid}/{ifname}".encode()).hexdigest()[:13]  # the CNI result names it too


def pod_veths(c: Cluster) -> set[str]:
    return {link["ifname"] for link in ip_json(c.agents["n1"].node.ns, "link", "show")
            if link["ifname"].startswith("oc") and link["ifname"] != "ocni.vxlan"}


def parked_veths(c: Cluster) -> set[str]:
    """Host veths a DEL parked (``agent.quarantine``): ``oz`` + 13 hex, down."""
    links = ip_json(c.agents["n1"].node.ns, "link", "show")
    found = {link["ifname"] for link in links if link["ifname"].startswith("oz")}
    assert all("UP" not in link["flags"] for link in links if link["ifname"] in found)
    return found


def ipam_state(c: Cluster) -> tuple[int, bool]:
    shown = json.loads(c.cli("ipam", "show", "--cluster", "t", "--output", "json").stdout)
    check = c.cli("ipam", "check", "--cluster", "t", "--output", "json", check=False)
    return sum(n["used"] for n in shown["nodes"]), check.returncode == 0


def allocated_attachments(c: Cluster) -> set[tuple[str, str]]:
    """(container ID, ifname) of every allocation, from ``ipam check --valid`` with no valid attachment."""
    empty = c.workdir / "no-attachments.json"
    empty.write_text("[]")
    got = c.cli("ipam", "check", "--cluster", "t", "--valid", str(empty), "--output", "json", check=False)
    problems = json.loads(got.stdout)["problems"]
    found = [re.search(r" belongs to (\S+) (\S+), which is not a valid attachment", p["message"])
             for p in problems if p["kind"] == "unreferenced"]
    assert all(found), problems
    return {(m.group(1), m.group(2)) for m in found if m}


def burst(c: Cluster, requests: list[tuple[str, str, dict]]) -> dict[str, tuple[int, object]]:
    """Run (key, command, plugin kwargs) requests at once, each from its own thread; key -> (exit, output)."""
    out: dict[str, tuple[int, object]] = {}
    lock = threading.Lock()

    def one(key: str, command: str, kw: dict) -> None:
        ns = kw.pop("pod")
        code, res, _ = c.plugin("n1", command, ns, c.conf("n1"), **kw)
        with lock:
            out[key] = (code, res)

    threads = [threading.Thread(target=one, args=(k, cmd, dict(kw))) for k, cmd, kw in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_a_burst_with_bad_namespaces_fails_only_those(c, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    names = [os.path.basename(c.topo.add_netns(f"bb{i}")) for i in range(16)]
    busy = names[5]
    run("ip", "-n", busy, "link", "add", "eth0", "type", "veth", "peer", "name", "other0")  # already has an eth0
    reqs = [(n, "ADD", {"pod": n}) for n in names]
    reqs.append(("fifo", "ADD", {"pod": "bbfifo", "netns_path": str(fifo)}))
    got = burst(c, reqs)
    assert got["fifo"][0] == 1 and got["fifo"][1]["code"] == 4, got["fifo"]  # refused before any kernel work
    assert got[busy][0] == 1 and got[busy][1]["code"] == 7 and "eth0" in got[busy][1]["msg"], got[busy]
    good = [n for n in names if n != busy]
    assert all(got[n][0] == 0 for n in good), {n: got[n] for n in good if got[n][0]}
    ips = set()
    for n in good:
        ip = got[n][1]["ips"][0]["address"]
        ips.add(ip)
        eth0 = ip_json(n, "addr", "show", "dev", "eth0")[0]
        assert [f"{a['local']}/{a['prefixlen']}" for a in eth0["addr_info"] if a["family"] == "inet"] == [ip]
        assert "UP" in eth0["flags"] and c.topo.ping(n, got[n][1]["ips"][0]["gateway"])  # the node answers
    assert len(ips) == len(good)
    assert pod_veths(c) == {host_veth(n) for n in good}  # nothing of the failed ones
    assert {link["ifname"] for link in ip_json(busy, "link", "show")} == {"lo", "eth0", "other0"}  # untouched
    assert ipam_state(c) == (len(good), True)
    dels = burst(c, [(n, "DEL", {"pod": n}) for n in names])  # the runtime DELs every one, failed ADDs too
    assert all(code == 0 for code, _ in dels.values()), dels
    c.drained("n1")
    assert pod_veths(c) == set() and ipam_state(c) == (0, True)


def test_add_and_del_of_one_attachment_at_once_end_in_order(c):
    """ADD and DEL of the same attachment sent together: they are serialised,
    and the end state is the one of whichever finished last."""
    names = [os.path.basename(c.topo.add_netns(f"ad{i}")) for i in range(6)]
    finished: list[tuple[str, str]] = []
    lock = threading.Lock()

    def one(ns: str, command: str) -> None:
        code, res, _ = c.plugin("n1", command, ns, c.conf("n1"))
        assert code == 0, res
        with lock:
            finished.append((ns, command))

    threads = [threading.Thread(target=one, args=(n, cmd)) for n in names for cmd in ("ADD", "DEL")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(finished) == 2 * len(names)
    last = {ns: command for ns, command in finished}
    attached = {n for n in names if last[n] == "ADD"}
    assert pod_veths(c) == {host_veth(n) for n in attached}
    c.drained("n1")  # a DEL's parked veth, and so the pod's eth0, goes with the drain (``agent.quarantine``)
    for n in names:
        links = {link["ifname"] for link in ip_json(n, "link", "show")}
        assert ("eth0" in links) == (n in attached), (n, last[n])
    assert ipam_state(c) == (len(attached), True)
    for n in attached:
        assert c.plugin("n1", "DEL", n, c.conf("n1"))[0] == 0
    c.drained("n1")
    assert ipam_state(c) == (0, True)


def test_a_burst_interrupted_by_sigkill_leaves_nothing_half_done(c):
    """SIGKILL the agent while a burst is being applied; restart it; the
    runtime DELs every ADD that did not succeed (as kubelet does). Then IPAM
    is consistent, every node veth belongs to a successful ADD, and those
    pods pass CHECK."""
    names = [os.path.basename(c.topo.add_netns(f"kill{i}")) for i in range(40)]
    results: dict[str, tuple[int, object]] = {}
    runner = threading.Thread(target=lambda: results.update(burst(c, [(n, "ADD", {"pod": n}) for n in names])))
    runner.start()
    deadline = time.monotonic() + 30
    while len(pod_veths(c)) < 8 and time.monotonic() < deadline:  # the burst is under way: kill now
        time.sleep(0.005)
    c.kill_agent("n1")
    runner.join(60)
    assert len(results) == len(names)
    # Frozen at the kill: the datastore is consistent, and every node veth has its address (a veth is made
    # after its reservation and removed before its release); an address without a veth is the runtime's DEL's
    # (or the leak reaper's) to release.
    assert ipam_state(c)[1]
    allocated = allocated_attachments(c)
    assert pod_veths(c) <= {host_veth(cid, ifname) for cid, ifname in allocated}, (pod_veths(c), allocated)
    assert {(n, "eth0") for n, (code, _) in results.items() if code == 0} <= allocated
    c.start_agent("n1", c.agents["n1"].node, *REAP_FLAGS)
    ok = {n for n, (code, _) in results.items() if code == 0}
    for n in set(names) - ok:
        code, res, _ = c.plugin("n1", "DEL", n, c.conf("n1"))
        assert code == 0, res
    c.drained("n1")
    assert pod_veths(c) == {host_veth(n) for n in ok}
    assert ipam_state(c) == (len(ok), True)
    for n in set(names) - ok:
        assert {link["ifname"] for link in ip_json(n, "link", "show")} == {"lo"}, n
    for n in ok:
        conf = c.conf("n1", prevResult=results[n][1])
        code, res, _ = c.plugin("n1", "CHECK", n, conf)
        assert code == 0, (n, res)
        assert c.plugin("n1", "DEL", n, c.conf("n1"))[0] == 0
    c.drained("n1")
    assert pod_veths(c) == set() and ipam_state(c) == (0, True)


NFT_CT = """table ip cttest {
  chain in { type filter hook input priority 0; ct state new counter; }
  chain out { type filter hook output priority 0; ct state new counter; }
}
"""  # a ct expression turns connection tracking on in the namespace


@pytest.mark.parametrize("small_table", [1000, 0], ids=["one-unfiltered-walk", "filtered-walks"])
def test_conntrack_flush_of_several_addresses(monkeypatch, small_table):
    from overlaycni.dataplane.linux import conntrack
    from overlaycni.dataplane.linux.netns import NetnsWorker

    monkeypatch.setattr(conntrack, "SMALL_TABLE", small_table)
    with Topology() as topo:
        r = os.path.basename(topo.add_netns("ctr"))
        h = os.path.basename(topo.add_netns("cth"))
        run("ip", "-n", r, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", h)
        run("ip", "-n", r, "addr", "add", "10.9.0.1/24", "dev", "v0")
        run("ip", "-n", r, "link", "set", "v0", "up")
        for addr in ("10.9.0.2/24", "10.9.0.3/24", "10.9.0.4/24"):
            run("ip", "-n", h, "addr", "add", addr, "dev", "v1")
        run("ip", "-n", h, "link", "set", "v1", "up")
        subprocess.run(["ip", "netns", "exec", r, "nft", "-f", "-"], input=NFT_CT, text=True, check=True)
        for src in ("10.9.0.2", "10.9.0.3", "10.9.0.4"):
            assert topo.exec(h, "ping", "-c1", "-W2", "-I", src, "10.9.0.1", check=False).returncode == 0
        worker = NetnsWorker(r)
        try:
            ct = worker.call(conntrack.LinuxConntrack)

            def listed(ip: str) -> list[str]:
                lines = run("ip", "netns", "exec", r, "conntrack", "-L").stdout.splitlines()
                return [line for line in lines if f"src={ip} " in line or f"dst={ip} " in line]

            assert listed("10.9.0.2") and listed("10.9.0.3") and listed("10.9.0.4")
            assert ct.flush_addresses([IPv4Address("10.9.0.2"), IPv4Address("10.9.0.3")]) == 2
            assert listed("10.9.0.2") == [] and listed("10.9.0.3") == []
            assert listed("10.9.0.4")  # control: another address's flow stays
            assert ct.flush_addresses([IPv4Address("10.9.0.2"), IPv4Address("10.9.0.3")]) == 0
            worker.call(ct.close)
        finally:
            worker.close()


# ----- the DEL quarantine (issue 14, item 3): flushed before reuse, and after a SIGKILL ----------------------


def tracked(c: Cluster, ip: str) -> list[str]:
    """The node's conntrack entries that name ``ip`` (read with ``conntrack -L``)."""
    lines = run("ip", "netns", "exec", c.agents["n1"].node.ns, "conntrack", "-L", check=False).stdout.splitlines()
    return [line for line in lines if f"src={ip} " in line or f"dst={ip} " in line]


def address(res: dict) -> str:
    return res["ips"][0]["address"].split("/")[0]


def test_a_deleted_pods_flows_are_gone_before_its_address_is_reused(c):
    """DEL, then at once an ADD that takes the same address (the ``ips``
    capability), then an ADD of the same attachment: each finds the old
    pod's real conntrack entries flushed, however the requests met the
    quarantine's drain (in the ADD's batch, or before it)."""
    client, _ = c.pod("n1", "qclient")
    kept_ns, kept = c.pod("n1", "qkept")
    old_ns, old = c.pod("n1", "qold")
    ip, kept_ip = address(old), address(kept)
    for dst in (ip, kept_ip):
        assert c.topo.ping(client, dst)
    assert tracked(c, ip) and tracked(c, kept_ip)  # real entries on the node, for the old pod and another
    assert c.plugin("n1", "DEL", old_ns, c.conf("n1"))[0] == 0
    new_ns = os.path.basename(c.topo.add_netns("qnew"))
    code, res, _ = c.plugin("n1", "ADD", new_ns, c.conf("n1", runtimeConfig={"ips": [ip]}))
    assert code == 0 and address(res) == ip, res  # the same address, at once
    assert tracked(c, ip) == [], tracked(c, ip)
    assert tracked(c, kept_ip)  # control: another pod's flows stay
    # the same attachment (container ID and ifname) again, right after its DEL
    assert c.topo.ping(client, ip)
    assert tracked(c, ip)
    assert c.plugin("n1", "DEL", new_ns, c.conf("n1"))[0] == 0
    code, res, _ = c.plugin("n1", "ADD", new_ns, c.conf("n1"))
    assert code == 0, res
    assert tracked(c, ip) == [] and tracked(c, address(res)) == []
    for ns in (client, kept_ns, new_ns):
        assert c.plugin("n1", "DEL", ns, c.conf("n1"))[0] == 0
    c.drained("n1")
    assert pod_veths(c) == set() and ipam_state(c) == (0, True)


def test_addresses_quarantined_at_a_sigkill_are_flushed_and_released_after_restart(c):
    """SIGKILL the agent right after a DEL is answered, while the address waits
    in the (in-memory) quarantine: the allocation stays held and its flows
    stay (the control: nothing flushed or released them); the restarted
    agent's leak reaper (its trigger: an allocation without a veth) flushes
    and releases it; ``ipam check`` is clean."""
    client, _ = c.pod("n1", "kclient")
    caught = None
    for attempt in range(5):  # the kill must land before the drain (it waits for a quiet batcher): retried if not
        ns, res = c.pod("n1", f"kq{attempt}")
        ip = address(res)
        assert c.topo.ping(client, ip) and tracked(c, ip)
        assert c.plugin("n1", "DEL", ns, c.conf("n1"))[0] == 0
        c.kill_agent("n1")
        if (ns, "eth0") in allocated_attachments(c):
            caught = (ns, ip)
            break
        c.start_agent("n1", c.agents["n1"].node, *REAP_FLAGS)
    assert caught is not None, "the drain always ran before the kill"
    ns, ip = caught
    assert host_veth(ns) not in pod_veths(c) and tracked(c, ip)  # quarantined at the kill: veth gone, flows not
    assert parked_veths(c) == {"oz" + host_veth(ns)[2:]}  # parked by the DEL, not yet deleted by a drain
    assert ipam_state(c)[1]  # consistent, and the address held (never handed out)
    c.start_agent("n1", c.agents["n1"].node, *REAP_FLAGS)  # reaper: every 1 s, 2 s of grace
    assert parked_veths(c) == set()  # deleted at start, before the first reconcile
    deadline = time.monotonic() + 30
    while (ns, "eth0") in allocated_attachments(c) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (ns, "eth0") not in allocated_attachments(c)
    assert tracked(c, ip) == []  # flushed before the release
    assert c.plugin("n1", "DEL", ns, c.conf("n1"))[0] == 0  # the runtime's DEL, late: nothing left to do
    assert c.plugin("n1", "DEL", client, c.conf("n1"))[0] == 0
    c.drained("n1")
    assert pod_veths(c) == set() and ipam_state(c) == (0, True)


def test_a_deleted_pod_can_send_nothing_once_its_del_is_answered(c):
    """Right after the DEL's answer (its veth parked, or already deleted by
    the drain) nothing of the pod gets out: a ping from the pod's namespace
    to another pod and to its gateway fails. The control: the same pings
    before the DEL succeed. Then the drain leaves no parked veth."""
    peer_ns, peer = c.pod("n1", "spanswer")
    ns, res = c.pod("n1", "sgone")
    gateway = res["ips"][0]["gateway"]
    for dst in (address(peer), gateway):
        assert c.topo.ping(ns, dst), dst
    assert c.plugin("n1", "DEL", ns, c.conf("n1"))[0] == 0
    for dst in (address(peer), gateway):
        assert not c.topo.ping(ns, dst, attempts=1, wait=1), dst
    assert host_veth(ns) not in pod_veths(c)
    assert c.plugin("n1", "DEL", ns, c.conf("n1"))[0] == 0  # again: nothing to do
    assert c.plugin("n1", "DEL", peer_ns, c.conf("n1"))[0] == 0
    c.drained("n1")
    assert parked_veths(c) == set() and pod_veths(c) == set() and ipam_state(c) == (0, True)
