"""End-to-end lab tests: real agents, the real plugin, real packets.

One vxlan+sqlite lab is shared by the checks that only read it, then put
through node add/delete, agent crash/restart and a permanent agent death;
the other store/backend combinations get their own lab each (up, check,
trace, down). Everything asserts through independent tools: ``ip -j``,
ping and tcpdump. No timing is asserted; waits poll with generous bounds.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import OC, Lab, lab_namespaces, pid_alive, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]

POD_CIDR = ipaddress.ip_network("10.244.0.0/16")


@pytest.fixture(scope="module")
def vx(make_lab) -> Lab:
    return make_lab("vx", "--nodes", "3", "--pods-per-node", "2", "--backend", "vxlan", "--store", "sqlite")


# --- the shared vxlan lab: read-only checks first -------------------------------------------------


def test_status_shape_and_addresses(vx: Lab):
    s = vx.status()
    assert s["name"] == vx.name and s["backend"] == "vxlan" and s["pod_cidr"] == "10.244.0.0/16"
    assert [n["ip"] for n in s["nodes"]] == ["10.224.0.4", "10.224.0.5", "10.224.0.6"]
    blocks = [ipaddress.ip_network(n["block"]) for n in s["nodes"]]
    assert len(set(blocks)) == 3 and all(b.subnet_of(POD_CIDR) and b.prefixlen == 24 for b in blocks)
    assert all(pid_alive(n["agent_pid"]) for n in s["nodes"])
    assert len(s["pods"]) == 6 and s["external"]["ipv6"] is None and set(s["external"]) == {"netns", "ip", "ipv6"}
    assert all(n["ipv6"] is None and n["block_v6"] is None for n in s["nodes"]) and all(p["ipv6"] is None for p in s["pods"])
    # every namespace the status names exists
    for ns in [n["netns"] for n in s["nodes"]] + [p["netns"] for p in s["pods"]] + [s["external"]["netns"]]:
        assert ns in lab_namespaces(vx.name)


def test_pod_sees_ip_slash24_and_default_via_block_gateway(vx: Lab):
    s = vx.status()
    blocks = {n["name"]: ipaddress.ip_network(n["block"]) for n in s["nodes"]}
    for p in s["pods"]:
        addrs = vx.ip_j(p["netns"], "addr", "show", "eth0")[0]["addr_info"]
        v4 = [a for a in addrs if a["family"] == "inet"]
        assert [(a["local"], a["prefixlen"]) for a in v4] == [(p["ip"], 24)]
        assert ipaddress.ip_address(p["ip"]) in blocks[p["node"]]
        default = [r for r in vx.ip_j(p["netns"], "route", "show", "default")]
        assert default and default[0]["gateway"] == str(blocks[p["node"]].network_address + 1)


def test_underlay_is_only_inside_the_lab(vx: Lab):
    s = vx.status()
    root_addrs = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    for n in s["nodes"]:
        assert f'"{n["ip"]}"' not in root_addrs
        eth0 = vx.ip_j(n["netns"], "addr", "show", "eth0")[0]["addr_info"]
        assert any(a["local"] == n["ip"] and a["prefixlen"] == 16 for a in eth0)


def test_check_matrix_green(vx: Lab):
    rep = vx.json("check")
    assert rep["ok"], rep["failures"]
    assert len(rep["pairs"]) == 6 * 5
    cross = [p for p in rep["pairs"] if not p["same_node"]]
    assert len(cross) == 24 and all(p["path_ok"] for p in cross)
    assert all(e["seen_source"] == e["expected_source"] for e in rep["external"])
    table = vx.oc("check")
    assert "✓" in table.stdout


def test_vxlan_on_the_wire_independent_capture(vx: Lab):
    """Our own tcpdump on node1's underlay while pod-1-1 pings pod-2-1."""
    s = vx.status()
    pods = {p["name"]: p for p in s["pods"]}
    a, b = pods["pod-1-1"], pods["pod-2-1"]
    n1, n2 = s["nodes"][0], s["nodes"][1]
    cap = subprocess.Popen(
        ["ip", "netns", "exec", n1["netns"], "timeout", "20", "tcpdump", "-i", "eth0", "-n", "-l", "-c", "4", "udp", "port", "4789"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.0)  # tcpdump needs a moment to attach; not a timing assertion
    assert vx.pings(a["netns"], b["ip"])
    out, _ = cap.communicate(timeout=30)
    assert f"{n1['ip']}." in out and f"> {n2['ip']}.4789: VXLAN" in out and "vni 4096" in out
    assert f"IP {a['ip']} > {b['ip']}: ICMP echo request" in out


def test_trace_vxlan_and_snat(vx: Lab):
    t = vx.json("trace", "pod-1-1", "pod-2-2")
    assert t["replied"]
    wire = [h for h in t["hops"] if h["vni"] is not None]
    assert wire and wire[0]["outer_src"] == "10.224.0.4" and wire[0]["outer_dst"] == "10.224.0.5" and wire[0]["vni"] == 4096
    ext = vx.json("trace", "pod-1-1", "external")
    pod_ip = next(p["ip"] for p in vx.status()["pods"] if p["name"] == "pod-1-1")
    assert ext["replied"] and ext["snat"] == {"before": pod_ip, "after": "10.224.0.4"}
    assert ext["hops"][-1]["src"] == "10.224.0.4"  # what the external host saw


def test_exec_like_kubectl(vx: Lab):
    out = vx.oc("exec", "pod-2-1", "--", "ip", "-4", "-o", "addr", "show", "eth0").stdout
    pod = next(p for p in vx.status()["pods"] if p["name"] == "pod-2-1")
    assert f"inet {pod['ip']}/24" in out
    bad = vx.oc("exec", "nosuchpod", "--", "true", check=False)
    assert bad.returncode != 0 and "nosuchpod" in bad.stderr and "Traceback" not in bad.stderr


def test_tour_prints_real_output(vx: Lab):
    out = vx.oc("tour").stdout
    assert "eth0" in out and "default via 10.244." in out and "VXLAN" in out and "SNAT" in out


def test_list_shows_lab(vx: Lab):
    out = subprocess.run([OC, "lab", "list", "-o", "json"], env=vx.env, capture_output=True, text=True, check=True).stdout
    rows = __import__("json").loads(out)
    assert any(r["name"] == vx.name and r["nodes"] == 3 and r["pods"] == 6 for r in rows)


# --- the shared vxlan lab: changes ---------------------------------------------------------------------


def test_pod_add_delete(vx: Lab):
    p = vx.json("pod", "add", "web", "--node", "node3", "--namespace", "shop", "--labels", "app=web")
    assert p["node"] == "node3" and ipaddress.ip_address(p["ip"]) in POD_CIDR
    s = vx.status()
    src = next(q for q in s["pods"] if q["name"] == "pod-1-1")
    assert vx.pings(src["netns"], p["ip"])
    dup = vx.oc("pod", "add", "web", "--namespace", "shop", check=False)
    assert dup.returncode != 0 and "pod shop/web already exists" in dup.stderr
    vx.oc("pod", "delete", "web")
    assert p["netns"] not in lab_namespaces(vx.name)
    assert not vx.pings(src["netns"], p["ip"])


def test_same_pod_name_in_two_namespaces(vx: Lab):
    """Pod names are unique per namespace (the upstream model has x/a, y/a):
    both pods exist side by side, with their own netns and address; a bare
    name that both have is refused listing them; NAMESPACE/NAME always works."""
    a = vx.json("pod", "add", "a", "--namespace", "x", "--node", "node1", "--labels", "app=a")
    b = vx.json("pod", "add", "y/a", "--node", "node2")
    try:
        assert (a["namespace"], b["namespace"]) == ("x", "y") and a["name"] == b["name"] == "a"
        assert a["netns"] == f"ocl-{vx.name}.pod.x.a" and b["netns"] == f"ocl-{vx.name}.pod.y.a"
        assert a["ip"] != b["ip"] and {a["netns"], b["netns"]} <= set(lab_namespaces(vx.name))
        mine = [(p["namespace"], p["name"], p["ip"]) for p in vx.status()["pods"] if p["name"] == "a"]
        assert sorted(mine) == [("x", "a", a["ip"]), ("y", "a", b["ip"])]
        assert vx.pings(a["netns"], b["ip"]) and vx.pings(b["netns"], a["ip"])
        for args in (["exec", "a", "--", "true"], ["pod", "label", "a", "k=v"], ["trace", "a", "pod-1-1"], ["pod", "delete", "a"]):
            proc = vx.oc(*args, check=False)
            said = " ".join(proc.stderr.split())
            assert proc.returncode == 2 and "'a' is ambiguous" in said and "x/a, y/a" in said, (args, proc.stderr)
            assert "Traceback" not in proc.stderr
        out = vx.oc("exec", "y/a", "--", "ip", "-4", "-o", "addr", "show", "eth0").stdout
        assert f"inet {b['ip']}/24" in out
        t = vx.json("trace", "x/a", "y/a")
        assert t["replied"] and t["src"] == "x/a" and t["dst_ip"] == b["ip"]
        assert vx.json("pod", "label", "x/a", "tier=web")["labels"] == {"app": "a", "tier": "web"}
        vx.oc("pod", "delete", "x/a")
        assert a["netns"] not in lab_namespaces(vx.name) and b["netns"] in lab_namespaces(vx.name)
        # the name is unambiguous again: the bare name reaches y/a
        assert vx.json("pod", "label", "a", "k=v")["namespace"] == "y"
        assert vx.pings(b["netns"], next(p["ip"] for p in vx.status()["pods"] if p["name"] == "pod-1-1"))
    finally:
        for ref in ("x/a", "y/a"):
            vx.oc("pod", "delete", ref, check=False)
    assert not [n for n in lab_namespaces(vx.name) if ".pod.x." in n or ".pod.y." in n]


def test_agent_sigkill_then_restart_keeps_pods(vx: Lab):
    s = vx.status()
    n2 = s["nodes"][1]
    pods = {p["name"]: p for p in s["pods"]}
    os.kill(n2["agent_pid"], signal.SIGKILL)
    assert wait_for(lambda: not pid_alive(n2["agent_pid"]), 10)
    # the data plane outlives the agent
    assert vx.pings(pods["pod-1-1"]["netns"], pods["pod-2-1"]["ip"])
    assert vx.status()["nodes"][1]["agent_alive"] is False
    vx.oc("agent", "restart", "node2")
    after = vx.status()["nodes"][1]
    assert after["agent_alive"] is True
    assert after["agent_pid"] != n2["agent_pid"] and pid_alive(after["agent_pid"])
    assert after["block"] == n2["block"]  # re-claimed its block
    assert vx.pings(pods["pod-2-2"]["netns"], pods["pod-3-1"]["ip"])
    rep = vx.json("check")
    assert rep["ok"], rep["failures"]


def _routes_to(lab: Lab, netns: str, block: str) -> list:
    return [r for r in lab.ip_j(netns, "route", "show") if r.get("dst") == block]


def test_node_add_and_delete_converge(vx: Lab):
    n = vx.json("node", "add", "node4")
    assert n["ip"] == "10.224.0.7"
    s = vx.status()
    for peer in s["nodes"][:3]:
        assert wait_for(lambda peer=peer: _routes_to(vx, peer["netns"], n["block"]), 30), f"{peer['name']} has no route to {n['block']}"
    vx.oc("pod", "add", "late", "--node", "node4")
    rep = vx.json("check")
    assert rep["ok"], rep["failures"]
    assert "late" in rep["pods"]

    vx.oc("node", "delete", "node4")
    s = vx.status()
    assert [x["name"] for x in s["nodes"]] == ["node1", "node2", "node3"]
    assert "late" not in [p["name"] for p in s["pods"]]
    assert not [x for x in lab_namespaces(vx.name) if x.endswith(".node4") or x.endswith(".late")]
    for peer in s["nodes"]:
        assert wait_for(lambda peer=peer: not _routes_to(vx, peer["netns"], n["block"]), 30), f"{peer['name']} still routes {n['block']}"
    rep = vx.json("check")
    assert rep["ok"], rep["failures"]


def _live(lab: Lab, node: str) -> bool:
    s = lab.status()
    out = subprocess.run([OC, "--datastore", s["datastore"], "node", "list", "--cluster", s["name"], "-o", "json"],
                         capture_output=True, text=True, check=True)
    return {n["name"]: n["live"] for n in json.loads(out.stdout)}[node]


def test_dead_agent_is_not_live_but_its_peers_keep_its_routes(vx: Lab):
    s = vx.status()
    n3 = s["nodes"][2]
    os.kill(n3["agent_pid"], signal.SIGKILL)
    # lease TTL is 6 s in the lab: after it the node shows as not live, and nothing else changes
    assert wait_for(lambda: not _live(vx, "node3"), 40)
    time.sleep(6)  # a resync period of the peers: they keep the route anyway
    for peer in s["nodes"][:2]:
        assert _routes_to(vx, peer["netns"], n3["block"]), f"{peer['name']} dropped {n3['block']}"
    pods = {p["name"]: p for p in s["pods"]}
    assert vx.pings(pods["pod-1-1"]["netns"], pods["pod-3-1"]["ip"])  # its data path never depended on its agent
    assert vx.pings(pods["pod-3-1"]["netns"], pods["pod-2-1"]["ip"])


def test_down_leaves_nothing(vx: Lab):
    s = vx.status()
    pids = [n["agent_pid"] for n in s["nodes"]]
    vx.oc("down")
    assert lab_namespaces(vx.name) == []
    assert not any(pid_alive(p) for p in pids)
    assert not (vx.root / vx.name).exists()
    again = vx.oc("down")
    assert "nothing to remove" in again.stdout


# --- the other backend/store combinations ----------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, store",
    [("direct", "sqlite"), pytest.param("vxlan", "etcd", marks=pytest.mark.etcd), pytest.param("direct", "etcd", marks=pytest.mark.etcd)],
)
def test_combination_up_check_down(new_lab, backend, store):
    lab = new_lab(backend[0] + store[0], "--nodes", "3", "--pods-per-node", "2", "--backend", backend, "--store", store)
    try:
        s = lab.status()
        assert s["backend"] == backend and len(s["pods"]) == 6
        rep = lab.json("check")
        assert rep["ok"], rep["failures"]
        t = lab.json("trace", "pod-1-1", "pod-3-1")
        assert t["replied"]
        wire = [h for h in t["hops"] if "underlay" in h["where"] and h["seen"]]
        assert wire
        if backend == "direct":
            assert all(h["vni"] is None and h["src"] == t["hops"][0]["src"] for h in wire)
        else:
            assert all(h["vni"] == 4096 for h in wire)
        pids = [n["agent_pid"] for n in s["nodes"]]
        if store == "etcd":
            assert any(x.endswith(".ctl") for x in lab_namespaces(lab.name))
            etcd = __import__("json").loads((lab.root / lab.name / "lab.json").read_text())["etcd"]
            pids.append(etcd["pid"])
            assert pid_alive(etcd["pid"])
    finally:
        lab.oc("down", check=False)
    assert lab_namespaces(lab.name) == []
    assert not any(pid_alive(p) for p in pids)
    assert not (lab.root / lab.name).exists()


def test_failed_up_cleans_up(tmp_path, monkeypatch):
    """A failure half-way through `up` leaves no namespace, process or file."""
    from overlaycni.errors import OverlayCNIError
    from overlaycni.lab import control, lifecycle

    name = f"tf{os.getpid() % 10000}"
    started: list[int] = []
    real_start = control.start_agent

    def start_then_fail(state, node):
        if node.index == 2:
            raise OverlayCNIError("injected failure")
        n = real_start(state, node)
        started.append(n.agent.pid)
        return n

    monkeypatch.setattr(control, "start_agent", start_then_fail)
    with pytest.raises(OverlayCNIError, match="injected"):
        lifecycle.up(lifecycle.UpRequest(name=name, nodes=3, pods_per_node=1, root=str(tmp_path)))
    assert lab_namespaces(name) == []
    assert started and not any(pid_alive(p) for p in started)
    assert not (tmp_path / name).exists()


def test_up_refuses_existing_and_bad_flags(tmp_path):
    env = {**os.environ, "OVERLAYCNI_LAB_DIR": str(tmp_path)}
    bad = subprocess.run([OC, "lab", "up", "--name", "x1", "--backend", "geneve"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--backend" in bad.stderr and "Traceback" not in bad.stderr
    assert lab_namespaces("x1") == []


def test_without_cap_net_admin_a_clear_error():
    # a short lab dir: up checks the longest agent socket path first (node102's, at most 107
    # bytes), and xdist's temp dirs (popen-gwN/) are 10 characters longer than pytest's
    short = Path(tempfile.mkdtemp(prefix="ocl-nocap-"))
    try:
        env = {**os.environ, "OVERLAYCNI_LAB_DIR": str(short / "labs")}
        for cmd in (["up", "--name", "nocap"], ["down", "--name", "nocap"]):
            proc = subprocess.run(
                ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", OC, "lab", *cmd],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            assert proc.returncode == 2 and "CAP_NET_ADMIN" in proc.stderr and "Traceback" not in proc.stderr
        assert not (short / "labs").exists() and lab_namespaces("nocap") == []
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_down_without_state_file_finds_the_lab_by_prefix(tmp_path):
    """The state file is lost: down still finds the namespaces by the lab's
    prefix and stops the agents running inside them."""
    lab = Lab(f"tl{os.getpid() % 10000}", tmp_path)
    try:
        lab.oc("up", "--nodes", "2", "--pods-per-node", "1")
        s = lab.status()
        pids = [n["agent_pid"] for n in s["nodes"]]
        assert all(pid_alive(p) for p in pids)
        (tmp_path / lab.name / "lab.json").unlink()
        listed = subprocess.run([OC, "lab", "list", "-o", "json"], env=lab.env, capture_output=True, text=True, check=True)
        assert any(r["name"] == lab.name and not r["state_file"] for r in __import__("json").loads(listed.stdout))
        lab.oc("down")
        assert lab_namespaces(lab.name) == []
        assert wait_for(lambda: not any(pid_alive(p) for p in pids), 10)
        assert not (tmp_path / lab.name).exists()
    finally:
        lab.oc("down", check=False)


# serial (tests/conftest.py): 200 pods and a 39,800-pair check load the kernel's neighbour
# tables, which every namespace on the machine shares (gc_thresh3, 1024 entries, settable only
# in the root namespace; see Topology.ping), and take most of the CPU for a minute or more:
# the packet tests next to it in a parallel run failed (drop counters stayed at 0).
@pytest.mark.serial
@pytest.mark.timeout(900)  # 20 nodes on a loaded 2-core runner can pass the default 300 s watchdog
def test_twenty_nodes_ten_pods_each(tmp_path):
    """The size the issue asks for on this 2-core machine: up, full check, down."""
    lab = Lab(f"tb{os.getpid() % 10000}", tmp_path)
    try:
        lab.oc("up", "--nodes", "20", "--pods-per-node", "10", timeout=600)
        s = lab.status()
        assert len(s["nodes"]) == 20 and len(s["pods"]) == 200
        assert len({p["ip"] for p in s["pods"]}) == 200 and len({n["block"] for n in s["nodes"]}) == 20
        rep = lab.json("check")
        assert rep["ok"], rep["failures"][:20]
        assert len(rep["pairs"]) == 200 * 199
        summary = lab.oc("check").stdout
        assert "node20" in summary and "39800 pod pairs" in summary
    finally:
        lab.oc("down", check=False)
    assert lab_namespaces(lab.name) == []
