"""Attacks on the wire, from a lab's external host, against that lab's pods.

One 3-node VXLAN lab (one pod per node) for the module: real agents, the
real plugin. The external host (a VM on the VNet) forges packets with
``forge.py`` (raw sockets inside its own lab namespace); a capture inside
the target pod tells what was delivered, and the target node's agent's
``/metrics`` what its filters dropped. Each attack has its control (the
same packet with a legitimate source arrives), so each test can fail.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import Lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]

FORGE = str(Path(__file__).with_name("forge.py"))


@pytest.fixture(scope="module")
def wire(make_lab) -> Lab:
    return make_lab("wire", "--nodes", "3", "--pods-per-node", "1", "--backend", "vxlan", "--store", "sqlite")


def forge(netns: str, *args: object) -> None:
    subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-I", "-S", FORGE, *map(str, args)],
                   check=True, capture_output=True, timeout=30)  # fmt: skip


class Capture:
    """tcpdump inside a lab namespace, started before the action (bounded by ``timeout``)."""

    def __init__(self, netns: str, bpf: str) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, "timeout", "60", "tcpdump", "-i", "eth0", "-n", "-l",
                                      "--immediate-mode", bpf], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stderr is not None
        while "listening on" not in (line := self.proc.stderr.readline()):  # ready (not a timing assertion)
            assert line, "tcpdump did not start"

    def stop(self) -> str:
        time.sleep(1.0)  # the last forged packets reach the capture, if they pass at all
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=20)
        return out


def metrics(lab: Lab, node: dict) -> str:
    """The node agent's /metrics (it listens on 127.0.0.1 inside the node's namespace)."""
    ss = lab.ns(node["netns"], "ss", "-Hltnp").stdout
    port = next(m.group(1) for line in ss.splitlines() if f"pid={node['agent_pid']}," in line
                if (m := re.search(r"127\.0\.0\.1:(\d+)", line)))
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
    return lab.ns(node["netns"], sys.executable, "-I", "-S", "-c", code).stdout


def dropped(lab: Lab, node: dict, rule: str) -> float:
    m = re.search(rf'^overlaycni_dropped_packets_total\{{rule="{rule}"\}} (\S+)$', metrics(lab, node), re.M)
    assert m, f"no overlaycni_dropped_packets_total for {rule}"
    return float(m.group(1))


def cluster(lab: Lab) -> tuple[dict, dict, dict]:
    s = lab.status()
    nodes = {n["name"]: n for n in s["nodes"]}
    pods = {p["node"]: p for p in s["pods"]}
    return nodes, pods, s["external"]


def test_check_is_green_with_the_filters(wire: Lab):
    rep = wire.json("check")
    assert rep["ok"], rep["failures"]
    for n in wire.status()["nodes"]:
        assert dropped(wire, n, "underlay_pod_source") == 0 and dropped(wire, n, "vxlan_inner_source") == 0


def test_plain_pod_source_from_the_external_host_is_not_delivered(wire: Lab):
    nodes, pods, ext = cluster(wire)
    n1, n2, target = nodes["node1"], nodes["node2"], pods["node1"]
    spoofed = str(n2["block"]).split("/")[0].rsplit(".", 1)[0] + ".77"  # an address of node2's block
    wire.ns(ext["netns"], "ip", "route", "add", n1["block"], "via", n1["ip"])
    try:
        before = dropped(wire, n1, "underlay_pod_source")
        cap = Capture(target["netns"], f"icmp and src host {spoofed}")
        forge(ext["netns"], "plain", spoofed, target["ip"], 401)
        out = cap.stop()
        assert spoofed not in out, out
        assert dropped(wire, n1, "underlay_pod_source") >= before + 3
        # Control: the same packet from an address outside the pod CIDR is delivered.
        cap = Capture(target["netns"], f"icmp and src host {ext['ip']}")
        forge(ext["netns"], "plain", ext["ip"], target["ip"], 402)
        out = cap.stop()
        assert f"{ext['ip']} > {target['ip']}: ICMP echo request, id 402" in out, out
    finally:
        wire.ns(ext["netns"], "ip", "route", "del", n1["block"], "via", n1["ip"])


def test_forged_vxlan_speaks_for_the_outer_nodes_block_only(wire: Lab):
    nodes, pods, ext = cluster(wire)
    n1, n2, n3, target = nodes["node1"], nodes["node2"], nodes["node3"], pods["node1"]
    vtep = wire.ip_j(n1["netns"], "link", "show", "ocni.vxlan")[0]["address"]
    from_n3 = str(n3["block"]).split("/")[0].rsplit(".", 1)[0] + ".7"
    from_n2 = str(n2["block"]).split("/")[0].rsplit(".", 1)[0] + ".7"
    before = dropped(wire, n1, "vxlan_inner_source")
    cap = Capture(target["netns"], f"icmp and src host {from_n3}")
    forge(ext["netns"], "vxlan", n1["ip"], from_n3, target["ip"], 501, n2["ip"], vtep)  # outer source: node2
    out = cap.stop()
    assert from_n3 not in out, out
    assert dropped(wire, n1, "vxlan_inner_source") >= before + 3
    # Control: the same forgery with an inner source in node2's own block is decapsulated and delivered.
    cap = Capture(target["netns"], f"icmp and src host {from_n2}")
    forge(ext["netns"], "vxlan", n1["ip"], from_n2, target["ip"], 502, n2["ip"], vtep)
    out = cap.stop()
    assert f"{from_n2} > {target['ip']}: ICMP echo request, id 502" in out, out
