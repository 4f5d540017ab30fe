"""Node lifecycle and peer collisions (issue 10, items 3, 6, 12, 14) without
root: IPAM on a real SQLite store, agents in-process with the in-memory data
plane. The kernel versions are tests/kernel/test_node_faults.py.

Each fault has its control: the same step with the conflict removed succeeds."""

from __future__ import annotations

import json
import logging
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlaycni import ipam
from overlaycni.agent.daemon import Agent, AgentOptions
from overlaycni.dataplane import vtep_mac
from overlaycni.dataplane.fake import FakeDataplane
from overlaycni.datastore import open_datastore
from overlaycni.datastore.keys import block_key, node_key, nodeblock_key
from overlaycni.errors import NodeConflict
from tests.unit.test_agent import cluster, cni, wait_for  # noqa: F401 (cluster is a fixture)

IP = IPv4Address


def start(url, tmp_path, name, ip, *, mtu=1500, ttl=5, sock=None):
    dp = FakeDataplane(underlay_ip=IP(ip), underlay_mtu=mtu)
    opts = AgentOptions(cluster="c1", node=name, node_ip=IP(ip), datastore=url, socket=str(tmp_path / f"{sock or name}.sock"),
                        metrics_addr=None, lease_ttl=ttl, resync_interval=60)
    agent = Agent(opts, store=open_datastore(url), dataplane=dp)
    try:
        agent.start()
    except BaseException:
        agent.shutdown()
        raise
    return agent, dp


def sample(agent, name, labels=None):
    return agent.metrics.registry.get_sample_value(name, labels or {}) or 0.0


# ----- IPAM: register and delete refuse live conflicts ---------------------------------------------------------


def test_register_refuses_the_node_ip_of_a_live_node(cluster):  # noqa: F811
    _, store = cluster
    lease = store.grant_lease(30)
    ipam.register_node(store, "c1", "n1", IP("10.224.0.4"), lease=lease)
    with pytest.raises(NodeConflict, match=r"--node-ip 10.224.0.4 is held by live node 'n1'"):
        ipam.register_node(store, "c1", "n2", IP("10.224.0.4"))
    assert ipam.register_node(store, "c1", "n2", IP("10.224.0.5")).name == "n2"  # control: another IP
    store.revoke_lease(lease)  # n1 is no longer live: its IP may be taken over (a replaced VM)
    assert ipam.register_node(store, "c1", "n3", IP("10.224.0.4")).name == "n3"


def test_register_refuses_a_live_name_from_another_node_ip(cluster):  # noqa: F811
    _, store = cluster
    lease = store.grant_lease(30)
    ipam.register_node(store, "c1", "n1", IP("10.224.0.4"), lease=lease)
    with pytest.raises(NodeConflict, match="two machines with one node name"):
        ipam.register_node(store, "c1", "n1", IP("10.224.0.9"), lease=store.grant_lease(30))
    # control: the same machine again (a restarted agent, a new lease) is welcome
    again = ipam.register_node(store, "c1", "n1", IP("10.224.0.4"), lease=store.grant_lease(30))
    assert again.node_ip == IP("10.224.0.4")


def test_delete_refuses_a_live_node_unless_forced(cluster):  # noqa: F811
    _, store = cluster
    ipam.register_node(store, "c1", "n1", IP("10.224.0.4"), lease=store.grant_lease(30))
    with pytest.raises(NodeConflict, match="node 'n1' is live"):
        ipam.delete_node(store, "c1", "n1")
    assert ipam.get_node(store, "c1", "n1")
    ipam.delete_node(store, "c1", "n1", force=True)
    assert ipam.list_nodes(store, "c1") == [] and ipam.cluster_nodes(store, "c1").live == {}


def test_a_deleted_node_reclaims_exactly_its_block_or_names_the_holder(cluster):  # noqa: F811
    _, store = cluster
    a = ipam.register_node(store, "c1", "n1", IP("10.224.0.4"))
    ipam.delete_node(store, "c1", "n1")
    assert ipam.register_node(store, "c1", "n1", IP("10.224.0.4"), block=a.block).block == a.block
    ipam.delete_node(store, "c1", "n1")
    ipam.register_node(store, "c1", "n2", IP("10.224.0.5"), block=a.block)  # someone else takes it meanwhile
    with pytest.raises(NodeConflict, match=f"its block {a.block} was claimed by node 'n2'"):
        ipam.register_node(store, "c1", "n1", IP("10.224.0.4"), block=a.block)
    assert ipam.list_blocks(store, "c1") == {"n2": a.block}  # nothing new was claimed


# ----- agents: one colliding peer never stops the others -------------------------------------------------------


def _inject(store, name, ip, block, *, claim: bool) -> None:
    """A node record written straight into the store (as ``datastore put`` would)."""
    store.put(node_key("c1", name), json.dumps(
        {"name": name, "node_ip": ip, "block": str(block), "vtep_mac": vtep_mac(IP(ip)) if claim else "02:aa:00:00:00:01"}
    ))
    if claim:
        store.put(block_key("c1", block), name)
        store.put(nodeblock_key("c1", name), str(block))


def test_a_duplicate_node_ip_and_an_overlapping_block_disable_only_those_peers(cluster, tmp_path, caplog):  # noqa: F811
    url, store = cluster
    a1, dp1 = start(url, tmp_path, "n1", "10.224.0.4")
    a2, _ = start(url, tmp_path, "n2", "10.224.0.5")
    try:
        n2 = ipam.get_node(store, "c1", "n2")
        assert wait_for(lambda: [p.name for p in a1.state.peers] == ["n2"])
        _inject(store, "dup", "10.224.0.5", IPv4Network("10.244.77.0/24"), claim=True)  # n2's node IP
        _inject(store, "over", "10.224.0.99", n2.block, claim=False)  # n2's block
        a3, _ = start(url, tmp_path, "n3", "10.224.0.6")  # a good node joins after them
        try:
            n3 = ipam.get_node(store, "c1", "n3")
            for agent in (a1, a3):
                # both converge: the peers are selected once per burst of node events, so the
                # selection that disabled dup and over may run before n3's join is folded in
                want = {"n1", "n2", "n3"} - {agent.opts.node}
                assert wait_for(lambda agent=agent, want=want: set(agent.node.disabled) == {"dup", "over"}
                                and {p.name for p in agent.state.peers} == want), (agent.node.disabled, agent.state.peers)
                assert agent.health()["ready"]
            assert n2.block in dp1.kernel.routes and n3.block in dp1.kernel.routes
            assert IPv4Network("10.244.77.0/24") not in dp1.kernel.routes  # dup's block: the catch-all answers
            disabled = a1.health()["peers_disabled"]
            assert "node IP 10.224.0.5 is peer n2's" in disabled["dup"]
            assert f"block {n2.block} is claimed by node n2" in disabled["over"]
            def logged() -> int:  # a1 and a3 say it so (n2's agent: "is this node's"); all run in this process
                return sum("peer dup: node IP 10.224.0.5 is peer n2's" in r.getMessage() for r in caplog.records)

            assert logged() == 2  # once by each agent
            a1.node.resync()  # met again: not logged or counted again
            assert logged() == 2
            assert sample(a1, "overlaycni_peer_conflicts_total") == 2
            assert sample(a1, "overlaycni_peers_disabled") == 2
            # control: with the duplicate gone the peer set is whole again, and nothing is disabled
            ipam.delete_node(store, "c1", "dup", force=True)
            store.delete(node_key("c1", "over"))
            assert wait_for(lambda: a1.node.disabled == {})
            assert sample(a1, "overlaycni_peers_disabled") == 0
        finally:
            a3.shutdown()
    finally:
        a2.shutdown()
        a1.shutdown()


def test_ipam_check_reports_the_duplicate_node_ip(cluster):  # noqa: F811
    _, store = cluster
    ipam.register_node(store, "c1", "n1", IP("10.224.0.4"))
    assert ipam.check(store, "c1").ok
    _inject(store, "dup", "10.224.0.4", IPv4Network("10.244.77.0/24"), claim=True)
    report = ipam.check(store, "c1")
    assert [p.message for p in report.problems] == [
        "node IP 10.224.0.4 is in several node records: dup, n1; peers program one of them"
    ]


# ----- agents: lifecycle --------------------------------------------------------------------------------------


def test_a_second_machine_with_the_same_name_is_refused(cluster, tmp_path):  # noqa: F811
    url, store = cluster
    a1, _ = start(url, tmp_path, "n1", "10.224.0.4")
    try:
        with pytest.raises(NodeConflict, match="live on node IP 10.224.0.4, not 10.224.0.9"):
            start(url, tmp_path, "n1", "10.224.0.9", sock="other-machine")
        assert a1.health()["ready"] and ipam.get_node(store, "c1", "n1").node_ip == IP("10.224.0.4")
        assert cni(a1, "ADD", cid="after")[0] == 0  # the first keeps working
    finally:
        a1.shutdown()
    a2, _ = start(url, tmp_path, "n1", "10.224.0.9", sock="other-machine")  # control: the first stopped (its lease too)
    a2.shutdown()


def test_an_agent_whose_record_vanished_reclaims_its_block_and_pod_addresses(cluster, tmp_path):  # noqa: F811
    url, store = cluster
    a1, _ = start(url, tmp_path, "n1", "10.224.0.4")
    try:
        block = ipam.get_node(store, "c1", "n1").block
        code, res = cni(a1, "ADD", cid="p1")
        assert code == 0, res
        ip = res["ips"][0]["address"]
        ipam.delete_node(store, "c1", "n1", force=True)
        assert wait_for(lambda: ipam.list_blocks(store, "c1").get("n1") == block)  # the same block, not a new one
        assert wait_for(lambda: ipam.get_allocation(store, "c1", "p1", "eth0") is not None)
        assert str(ipam.get_allocation(store, "c1", "p1", "eth0").ip) == ip  # the pod's address is reserved again
        assert a1.health()["ready"] and a1.node.conflicts == {}
    finally:
        a1.shutdown()


def test_an_agent_whose_block_was_taken_reports_the_conflict(cluster, tmp_path):  # noqa: F811
    url, store = cluster
    a1, _ = start(url, tmp_path, "n1", "10.224.0.4")
    try:
        block = ipam.get_node(store, "c1", "n1").block
        assert cni(a1, "ADD", cid="p1")[0] == 0
        a1.stop_event.set()  # the loops end (the resyncs below are ours); the agent object stays
        ipam.delete_node(store, "c1", "n1", force=True)
        ipam.register_node(store, "c1", "thief", IP("10.224.0.8"), block=block)
        a1.node.resync()
        assert ipam.list_blocks(store, "c1") == {"thief": block}  # n1 claimed nothing new
        health = a1.health()
        assert not health["ready"] and "claimed by node 'thief'" in health["conflicts"]["record"]
        assert any("claimed by node 'thief'" in r for r in health["reasons"])
        assert sample(a1, "overlaycni_node_conflict") == 1
        ipam.delete_node(store, "c1", "thief")  # control: the block is free again
        a1.node.resync()
        assert ipam.list_blocks(store, "c1") == {"n1": block} and a1.node.conflicts == {}
    finally:
        a1.shutdown()


def test_nodes_with_different_underlays_agree_on_one_pod_mtu(cluster, tmp_path):  # noqa: F811
    url, store = cluster
    big, dp_big = start(url, tmp_path, "big", "10.224.0.4", mtu=9000)
    try:
        assert big.node.ctx.pod_mtu == 8950  # alone: its own underlay decides
        small, dp_small = start(url, tmp_path, "small", "10.224.0.5", mtu=1500)
        try:
            assert small.node.ctx.pod_mtu == 1450
            assert wait_for(lambda: big.node.ctx.pod_mtu == 1450)
            assert dp_big.kernel.links["ocni.vxlan"].mtu == 1450  # larger pod packets: "fragmentation needed"
            code, res = cni(big, "ADD", cid="p1")  # CNI 1.1.0: the result tells the MTU
            assert code == 0 and res["interfaces"][1]["mtu"] == 1450, res
            assert ipam.get_node(store, "c1", "big").mtu == 9000  # what each node publishes
        finally:
            small.shutdown()
        ipam.delete_node(store, "c1", "small")
        assert wait_for(lambda: big.node.ctx.pod_mtu == 8950)  # control: the small node gone
    finally:
        big.shutdown()


def test_the_clusters_mtu_setting_wins(tmp_path):
    from overlaycni.config import parse_network

    url = f"sqlite://{tmp_path}/s.db"
    store = open_datastore(url)
    ipam.create_cluster(store, "c1", parse_network({"network-plugin": "azure", "network-plugin-mode": "overlay",
                                                    "mtu": 1400}))
    a, dp = start(url, tmp_path, "n1", "10.224.0.4", mtu=9000)
    try:
        assert a.node.ctx.pod_mtu == 1400 and dp.kernel.links["ocni.vxlan"].mtu == 1400
    finally:
        a.shutdown()
        store.close()


def test_not_live_logging_is_quiet(cluster, tmp_path, caplog):  # noqa: F811
    """A peer that is merely not live is no conflict: nothing is logged as disabled."""
    url, store = cluster
    ipam.register_node(store, "c1", "idle", IP("10.224.0.7"), vtep_mac=vtep_mac(IP("10.224.0.7")))
    caplog.set_level(logging.INFO)
    a1, dp1 = start(url, tmp_path, "n1", "10.224.0.4")
    try:
        assert [p.name for p in a1.state.peers] == ["idle"] and a1.node.not_live == ("idle",)
        assert a1.node.disabled == {} and not any("not programmed" in r.getMessage() for r in caplog.records)
    finally:
        a1.shutdown()


# ----- repair (item 5) ----------------------------------------------------------------------------------------


def test_tables_and_routes_removed_behind_the_agents_back_are_restored(cluster, tmp_path):  # noqa: F811
    url, store = cluster
    a1, dp1 = start(url, tmp_path, "n1", "10.224.0.4")
    a2, _ = start(url, tmp_path, "n2", "10.224.0.5")
    try:
        n2 = ipam.get_node(store, "c1", "n2")
        assert wait_for(lambda: n2.block in dp1.kernel.routes)
        assert wait_for(lambda: dp1.kernel.nft_table("inet", "overlaycni") is not None)  # the policy controller's
        k = dp1.kernel
        del k.nft_tables[("ip", "overlaycni")]
        del k.nft_tables[("inet", "overlaycni")]
        k.routes.pop(n2.block)
        k.notify("nftables tables deleted by pid 4242 (nft)")  # what the kernel monitor would say
        assert wait_for(lambda: sample(a1, "overlaycni_repairs_total", {"object": "nftables"}) >= 2)
        assert k.nft is not None and k.nft_table("inet", "overlaycni") is not None
        assert n2.block in k.routes and sample(a1, "overlaycni_repairs_total", {"object": "route"}) >= 1
        assert wait_for(lambda: a1.health()["ready"]), a1.health()
        assert "re-applied (missing)" in a1.health()["last_repair"]
        # a rule deleted from a chain (the table and its fingerprint stay): found and restored too
        chain = next(c for c in k.nft_table("ip", "overlaycni").chains if c == "postrouting")
        k.nft_table("ip", "overlaycni").chains[chain].pop()
        k.notify("rule deleted by pid 4242 (nft)")
        assert wait_for(lambda: sample(a1, "overlaycni_repairs_total", {"object": "nftables"}) >= 3)
        assert "behind our back" in a1.health()["last_repair"]
        # control: an event about nothing that changed repairs nothing
        before = a1.metrics.exposition().decode().count("overlaycni_repairs_total")
        k.notify("route 192.0.2.0/24 changed by pid 4242 (ip)")
        checks = a1.repair.checks
        assert wait_for(lambda: a1.repair.checks > checks)
        assert sample(a1, "overlaycni_repairs_total", {"object": "nftables"}) == 3
        assert a1.metrics.exposition().decode().count("overlaycni_repairs_total") == before
    finally:
        a2.shutdown()
        a1.shutdown()


def test_a_failing_repair_makes_healthz_say_so(cluster, tmp_path):  # noqa: F811
    from overlaycni.errors import DataplaneError

    url, _ = cluster
    from overlaycni.agent.metrics import serve_http

    a1, dp1 = start(url, tmp_path, "n1", "10.224.0.4")
    http = serve_http("127.0.0.1:0", a1.metrics, a1.health)  # /healthz as a kubelet probe reads it
    try:
        assert healthz(http)[0] == 200  # control: a healthy node answers 200
        k = dp1.kernel
        node_table = dp1.p.nft
        works = node_table.apply

        def refused(commands):
            raise DataplaneError("nftables: Operation not supported")

        node_table.apply = refused  # the node table cannot be written for now
        del k.nft_tables[("ip", "overlaycni")]
        k.notify("nftables table ip overlaycni deleted by pid 4242 (nft)")
        assert wait_for(lambda: any("repair incomplete: nft" in r for r in a1.health()["reasons"]))
        assert not a1.health()["ready"]
        assert sample(a1, "overlaycni_enforcement_ok") == 0
        code, body = healthz(http)
        assert code == 503 and any("repair incomplete: nft" in r for r in body["reasons"]), body
        node_table.apply = works  # control: once it can be written, the next check repairs it
        k.notify("again")
        assert wait_for(lambda: a1.health()["ready"]) and k.nft is not None
        code, body = healthz(http)
        assert code == 200 and body["ready"] and body["reasons"] == [], body
    finally:
        http.shutdown()
        http.server_close()
        a1.shutdown()


def healthz(server) -> tuple[int, dict]:
    """GET /healthz from ``server`` (an agent's HTTP server on a random loopback port): (status, body)."""
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{server.server_address[1]}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ----- item 3: the CLI skips bad records too ------------------------------------------------------------------


def test_policy_explain_cluster_skips_and_names_bad_records(cluster):  # noqa: F811
    from typer.testing import CliRunner

    from overlaycni.cli.main import app
    from overlaycni.datastore.keys import ip_key, policy_key

    url, store = cluster
    ipam.register_node(store, "c1", "n1", IP("10.224.0.4"))
    for pod in ("a", "b"):
        ipam.allocate(store, "c1", "n1", f"cid-{pod}", "eth0", pod=("default", pod))
    args = ["--datastore", url, "policy", "explain", "default/a", "default/b", "80/TCP", "--cluster", "c1", "-o", "json"]
    clean = CliRunner().invoke(app, args)
    assert clean.exit_code == 0 and json.loads(clean.stdout)["allowed"] and "skipping" not in clean.stderr
    store.put(policy_key("c1", namespace="default", name="broken"), '{"kind": "NetworkPolicy", "spec": 7}')
    store.put(ip_key("c1", "n1", IP("10.244.0.200")), "not json")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output  # the verdict of the good records, not a traceback
    assert json.loads(res.stdout)["allowed"]
    assert "/overlaycni/clusters/c1/policies/default/broken" in res.stderr
    assert "/overlaycni/clusters/c1/ips/n1/010.244.000.200" in res.stderr
