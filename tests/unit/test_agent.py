"""The agent in-process with the in-memory data plane and a real SQLite
store, driven through the real shim over its unix socket. No root needed;
tests/kernel/test_cni_agent.py runs the same flows on the kernel."""

from __future__ import annotations

import json
import threading
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlaycni import ipam
from overlaycni.agent.daemon import Agent, AgentOptions
from overlaycni.cni import shim
from overlaycni.config import parse_network
from overlaycni.dataplane import host_veth_name, vtep_mac
from overlaycni.dataplane.fake import FakeDataplane
from overlaycni.datastore import open_datastore


@pytest.fixture()
def cluster(tmp_path):
    url = f"sqlite://{tmp_path}/state.db"
    store = open_datastore(url)
    ipam.create_cluster(store, "c1", parse_network({"pod-cidr": "10.244.0.0/16", "network-plugin": "azure",
                                                     "network-plugin-mode": "overlay"}))
    yield url, store
    store.close()


def start_agent(url, tmp_path, name, ip, **kw):
    dp = FakeDataplane(underlay_ip=IPv4Address(ip)) if _fake_takes_ip() else FakeDataplane()
    opts = AgentOptions(
        cluster="c1", node=name, node_ip=IPv4Address(ip), datastore=url,
        socket=str(tmp_path / f"{name}.sock"), metrics_addr=kw.get("metrics_addr"), lease_ttl=kw.get("ttl", 5),
        resync_interval=kw.get("resync", 60), flow_log=kw.get("flow_log"),
    )
    agent = Agent(opts, store=open_datastore(url), dataplane=dp)
    agent.start()
    return agent, dp


def _fake_takes_ip() -> bool:
    import inspect

    return "underlay_ip" in inspect.signature(FakeDataplane).parameters


def cni(agent, command, cid="cid1", ifname="eth0", version="1.1.0", **conf):
    env = {
        "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname,
        "CNI_NETNS": f"/var/run/netns/{cid}", "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=" + cid,
    }
    config = {"cniVersion": version, "name": "overlaycni", "type": "overlaycni", "socket": agent.opts.socket, **conf}
    return shim.run(env, json.dumps(config))


def drained(agent, timeout=10.0):
    """Wait until the node's DEL quarantine is empty: every DELeted address
    flushed and released (the batcher does it once it is idle)."""
    return wait_for(lambda: len(agent.node.ops.quarantine) == 0, timeout)


def wait_for(pred, timeout=10.0):
    ev = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if pred():
            return True
        ev.wait(0.05)
    return pred()


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_check_del_every_version(cluster, tmp_path, version):
    url, store = cluster
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    try:
        code, res = cni(agent, "ADD", version=version)
        assert code == 0, res
        assert res["cniVersion"] == version
        ip = res["ips"][0]
        block = ipam.get_node(store, "c1", "n1").block
        assert IPv4Network(ip["address"], strict=False) == block
        assert ip["gateway"] == str(block.network_address + 1)
        assert ("version" in ip) == (not version.startswith("1."))
        assert res["interfaces"][1]["sandbox"] == "/var/run/netns/cid1"
        assert res["interfaces"][0]["name"] == host_veth_name("cid1", "eth0")
        assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": ip["gateway"]}]
        alloc = ipam.get_allocation(store, "c1", "cid1", "eth0")
        assert (alloc.pod_namespace, alloc.pod_name) == ("default", "cid1")

        code, out = cni(agent, "CHECK", version=version, prevResult=res)
        assert (code, out) == (0, None)
        code, out = cni(agent, "DEL", version=version)
        assert (code, out) == (0, None)
        code, out = cni(agent, "DEL", version=version)  # repeated DEL succeeds
        assert (code, out) == (0, None)
        assert drained(agent)  # released once its conntrack entries are flushed (the quarantine)
        assert ipam.get_allocation(store, "c1", "cid1", "eth0") is None
        assert dp.list_pod_veths() == []
    finally:
        agent.shutdown()


def test_add_failure_releases_the_ip(cluster, tmp_path):
    url, store = cluster
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    try:
        code, _ = cni(agent, "ADD", cid="a")
        assert code == 0
        code, err = cni(agent, "ADD", cid="a")  # the interface exists now: error
        assert code != 0 and err["code"] in (7, 102), err
        assert ipam.get_allocation(store, "c1", "a", "eth0") is not None  # the first ADD's IP stays
        code, err = cni(agent, "CHECK", cid="b", prevResult={"ips": []})
        assert code != 0 and err["code"] == 3
    finally:
        agent.shutdown()


def test_gc_releases_what_is_not_valid(cluster, tmp_path):
    url, store = cluster
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    try:
        for cid in ("p1", "p2", "p3"):
            assert cni(agent, "ADD", cid=cid)[0] == 0
        code, out = cni(agent, "GC", **{"cni.dev/valid-attachments": [{"containerID": "p2", "ifname": "eth0"}]})
        assert code == 0, out
        left = {a.container_id for a in ipam.list_allocations(store, "c1", node="n1")}
        assert left == {"p2"}
        assert dp.list_pod_veths() == [host_veth_name("p2", "eth0")]
    finally:
        agent.shutdown()


def test_peers_follow_node_records(cluster, tmp_path):
    url, store = cluster
    a1, dp1 = start_agent(url, tmp_path, "n1", "10.224.0.4")
    a2, dp2 = start_agent(url, tmp_path, "n2", "10.224.0.5")
    try:
        assert wait_for(lambda: any(p.name == "n2" for p in a1.state.peers))
        peer = next(p for p in a1.state.peers if p.name == "n2")
        assert peer.vtep_mac == vtep_mac(IPv4Address("10.224.0.5"))
        assert peer.block == ipam.get_node(store, "c1", "n2").block
        a2.shutdown()  # a running agent would re-register its deleted record (like a kubelet)
        ipam.delete_node(store, "c1", "n2")
        assert wait_for(lambda: not any(p.name == "n2" for p in a1.state.peers))
    finally:
        a2.shutdown()
        a1.shutdown()


def test_a_silent_node_is_not_live_but_keeps_its_routes_until_deleted(cluster, tmp_path):
    url, store = cluster
    a1, dp1 = start_agent(url, tmp_path, "n1", "10.224.0.4")
    a2, _ = start_agent(url, tmp_path, "n2", "10.224.0.5", ttl=2)
    try:
        assert wait_for(lambda: any(p.name == "n2" for p in a1.state.peers))
        block = ipam.get_node(store, "c1", "n2").block
        a2.node.datastore_ok = False  # as if cut off: the lease is neither refreshed nor revoked
        a2.shutdown()
        assert wait_for(lambda: "n2" not in ipam.cluster_nodes(store, "c1").live, timeout=15)  # the TTL lapses
        a1.node.resync()
        assert [p.name for p in a1.state.peers] == ["n2"] and block in dp1.kernel.routes  # the data path stays
        assert a1.health()["peers_not_live"] == ["n2"]
        assert a1.metrics.registry.get_sample_value("overlaycni_peers_not_live") == 1
        ipam.delete_node(store, "c1", "n2")  # not live: no --force needed
        assert wait_for(lambda: not a1.state.peers)
        assert block not in dp1.kernel.routes
    finally:
        a1.shutdown()


def test_restart_keeps_block_and_status(cluster, tmp_path):
    url, store = cluster
    agent, _ = start_agent(url, tmp_path, "n1", "10.224.0.4")
    block = ipam.get_node(store, "c1", "n1").block
    assert cni(agent, "STATUS")[0] == 0
    agent.shutdown()
    agent, _ = start_agent(url, tmp_path, "n1", "10.224.0.4")
    try:
        assert ipam.get_node(store, "c1", "n1").block == block
        assert agent.health()["ready"] is True
    finally:
        agent.shutdown()


def add_web_pod(agent, store):
    """ADD pod default/web and publish its labels (app=web); its IP."""
    from overlaycni.datastore.keys import pod_key
    from overlaycni.policy import records

    assert cni(agent, "ADD", cid="web")[0] == 0
    ip = ipam.get_allocation(store, "c1", "web", "eth0").ip.ip
    store.put(pod_key("c1", namespace="default", name="web"),
              records.encode({"namespace": "default", "name": "web", "ip": str(ip), "node": "n1",
                              "labels": {"app": "web"}, "ports": []}))
    return ip


def deny_web(store) -> None:
    """Store a policy isolating app=web for ingress (allowing nothing)."""
    from overlaycni.policy import parse_policies, records

    (pol,) = parse_policies(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: default}\n"
        "spec: {podSelector: {matchLabels: {app: web}}}\n"
    )
    records.save_policies(store, "c1", policies=[pol])


def isolated(dp, ip) -> bool:
    """The fake kernel's inet overlaycni holds the pod in its ingress verdict map."""
    table = dp.kernel.nft_table("inet", "overlaycni")
    # its element jumps to its namespace's chain (with flow logs on, a pod that
    # is not isolated has an element too, jumping to the flow log's default chain)
    return table is not None and any(
        e.key == ip and e.value.target.startswith("in-ns-") for e in table.sets.get("ingress-pods", ())
    )


def test_policy_inputs_reach_the_policy_table(cluster, tmp_path):
    url, store = cluster
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    try:
        ip = add_web_pod(agent, store)
        deny_web(store)
        assert wait_for(lambda: isolated(dp, ip))
        table = dp.kernel.nft_table("inet", "overlaycni")
        (entry,) = [e for e in table.sets["ingress-pods"] if e.key == ip]
        assert entry.value.target == "in-ns-default" and table.chains["in-ns-default"][-1]["expr"] == [{"drop": None}]
    finally:
        agent.shutdown()
