"""Faults injected into a running lab (issue 10): malformed datastore
records, and `lab down` meeting a recorded pid that is not the lab's.

One etcd lab (TLS, in its own control namespace) for the module: 2 nodes,
1 pod each. It is brought up over a lab's own leftovers (a marked directory
without state file), the control of test_lab_ownership.py's refusal of a
directory that is not a lab. Records are injected with `overlaycni
datastore put --lab`, which reaches the lab's etcd from inside the lab; the
agents' counters are read from inside each node's namespace.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import replace

import pytest

from overlaycni.lab import state as st

from .conftest import OC, Lab, lab_namespaces, pid_alive, unique_name

pytestmark = [pytest.mark.lab, pytest.mark.etcd, pytest.mark.timeout(900)]

# one malformed record of each kind the agents decode, under names no real object has
BAD = {
    "node": ("nodes/zz-bad", "{not json"),
    "allocation": ("ips/node1/010.244.250.250", '{"container_id": 7}'),
    "pod": ("pods/default/zz-bad", '{"labels": "app=web"}'),
    "namespace": ("namespaces/zz-bad", "[1, 2]"),
    "policy": ("policies/default/zz-bad", '{"spec": {"podSelector": 5}}'),
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(unique_name("flt"), tmp_path_factory.mktemp("labs"))
    leftover = st.create_lab_dir(lab.name, str(lab.root))
    (leftover / "agent.log").write_text("from an earlier lab")
    try:
        lab.oc("up", "--nodes", "2", "--pods-per-node", "1", "--store", "etcd", timeout=600)
        yield lab
    finally:
        subprocess.run([OC, "lab", "down", "--name", lab.name], env=lab.env, capture_output=True, timeout=180)


def ds(lab: Lab, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [OC, "datastore", *args, "--lab", lab.name]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**lab.env, "COLUMNS": "1000"}, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def metrics(lab: Lab, node: str) -> dict[str, float]:
    """``overlaycni_bad_records_total`` by kind, from the node's agent, read
    inside the node's namespace (the agent listens on its loopback)."""
    out = (lab.root / lab.name / "nodes" / node / "agent.out").read_text()
    url = next(json.loads(line)["metrics"] for line in out.splitlines() if '"ready"' in line)
    netns = next(n["netns"] for n in lab.status()["nodes"] if n["name"] == node)
    code = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1] + '/metrics', timeout=5).read().decode())"
    text = lab.ns(netns, "python3", "-I", "-S", "-c", code, url).stdout
    return {m[0]: float(m[1]) for m in re.findall(r'^overlaycni_bad_records_total\{kind="(\w+)"\} (\S+)$', text, flags=re.M)}


def test_the_lab_came_up_over_its_own_leftovers(lab: Lab):
    d = lab.root / lab.name
    assert st.is_lab_dir(d) and not (d / "agent.log").exists()


def test_datastore_cli_reaches_the_labs_etcd_from_inside_the_lab(lab: Lab):
    cfg = json.loads(ds(lab, "get", f"/overlaycni/clusters/{lab.name}/config", "-o", "json").stdout)
    assert [c["key"] for c in cfg] == [f"/overlaycni/clusters/{lab.name}/config"]
    assert json.loads(cfg[0]["value"])["pod-cidr"] == "10.244.0.0/16"
    nodes = json.loads(ds(lab, "get", f"/overlaycni/clusters/{lab.name}/nodes/", "--prefix", "-o", "json").stdout)
    assert sorted(n["key"].rsplit("/", 1)[1] for n in nodes) == ["node1", "node2"]
    backup = json.loads(ds(lab, "backup", "-").stdout)
    assert backup["source"].startswith("etcds://10.224.") and backup["revision"] > 0
    leased = {e["key"] for e in backup["keys"] if e["leased"]}
    assert leased >= {n["key"].replace("/nodes/", "/leases/") for n in nodes}  # each agent's liveness record
    assert not leased & {n["key"] for n in nodes}  # node records outlive their agent's lease (issue 10, item 12)


def test_malformed_records_are_skipped_counted_and_nothing_breaks(lab: Lab):
    root = f"/overlaycni/clusters/{lab.name}/"
    before = {n: metrics(lab, n) for n in ("node1", "node2")}
    for _kind, (key, value) in BAD.items():
        ds(lab, "put", root + key, value)
    try:
        added = lab.oc("node", "add").stdout
        assert "node3" in added
        s = lab.status()
        assert [n["name"] for n in s["nodes"]] == ["node1", "node2", "node3"] and all(n["agent_alive"] for n in s["nodes"])
        lab.oc("pod", "add", "late", "--node", "node3")  # a pod on the new node: ADD works there
        rep = lab.json("check")
        assert rep["ok"], rep["failures"]
        assert len(rep["pairs"]) == 3 * 2

        # every agent counts every kind (the node watch/resync: node; the
        # policy controller: allocation, pod, namespace, policy); the new
        # node started with the bad records already there
        def counted() -> bool:
            now = {n: metrics(lab, n) for n in ("node1", "node2", "node3")}
            return all(now[n].get(k, 0) > before.get(n, {}).get(k, 0) for n in now for k in BAD)

        deadline = time.monotonic() + 60
        while not counted() and time.monotonic() < deadline:
            time.sleep(1)
        now = {n: metrics(lab, n) for n in ("node1", "node2", "node3")}
        assert counted(), now
        # control: no kind is counted on a node that has not seen such a record
        assert all(before[n].get(k, 0) == 0 for n in before for k in BAD), before
        # the agents say so in their health too
        health = json.loads(lab.ns(s["nodes"][2]["netns"], OC, "agent", "status", "--socket",
                                   str(lab.root / lab.name / "nodes" / "node3" / "agent.sock"), "-o", "json").stdout)  # fmt: skip
        assert set(health["bad_records"]) >= set(BAD) and health["ready"]
        # the CLI reads the same records and skips them the same way, saying so
        env = {**lab.env, "COLUMNS": "1000"}
        for args in (["explain", "pod-1-1", "pod-2-1", "80/TCP"], ["list"], ["render", "--node", "node1", "-o", "table"]):
            proc = subprocess.run([OC, "policy", *args, "--lab", lab.name], capture_output=True, text=True, env=env, timeout=120)
            assert proc.returncode == 0, (args, proc.stderr)
            assert "skipped bad policy record" in proc.stderr and "Traceback" not in proc.stderr
        assert "ALLOW" in subprocess.run([OC, "policy", "explain", "pod-1-1", "pod-2-1", "80/TCP", "--lab", lab.name],
                                         capture_output=True, text=True, env=env, timeout=120).stdout  # fmt: skip
    finally:
        for key, _ in BAD.values():
            ds(lab, "delete", root + key, check=False)


def test_down_spares_a_recorded_pid_that_is_another_process(lab: Lab):
    """node2's agent record is rewritten to name an unrelated process (its
    true pid and start time, node2's namespace): `lab down` must not kill
    it. Control: node1's agent (a true record) is stopped, node2's real
    agent is found in node2's namespace and stopped, the lab is gone."""
    s = st.load(lab.name, str(lab.root))
    real_agents = [n.agent.pid for n in s.nodes if n.agent]
    unrelated = subprocess.Popen(["sleep", "600"])
    try:
        from overlaycni.lab import procs

        start = procs.start_time(unrelated.pid)
        assert start is not None
        n2 = s.node("node2")
        fake = st.Proc(pid=unrelated.pid, start_time=start, log="", netns=n2.netns)
        st.save(s.with_node(replace(n2, agent=fake)))
        assert all(pid_alive(p) for p in real_agents)
        lab.oc("down")
        assert unrelated.poll() is None and pid_alive(unrelated.pid)
        assert not any(pid_alive(p) for p in real_agents)
        assert lab_namespaces(lab.name) == [] and not (lab.root / lab.name).exists()
    finally:
        unrelated.kill()
        unrelated.wait()
