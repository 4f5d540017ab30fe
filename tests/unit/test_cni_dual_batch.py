"""Dual-stack through the agent's group commit (``agent.batch`` /
``agent.commit``) on the in-memory kernel: the ``ips`` capability of both
families, concurrent ADDs of one batch each getting a pair, and DEL
flushing the conntrack entries of both addresses."""

from __future__ import annotations

import threading
from ipaddress import IPv4Address, IPv6Address, ip_interface

from overlaycni import ipam

from .test_agent import cni, drained, start_agent
from .test_cni_dual import dual  # noqa: F401 - the dual-stack cluster fixture


def test_requested_addresses_of_both_families(dual, tmp_path):  # noqa: F811
    url, store = dual
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    try:
        node = ipam.get_node(store, "c1", "n1")
        want4, want6 = node.block.network_address + 9, node.block_v6.network_address + 0x99
        code, res = cni(agent, "ADD", runtimeConfig={"ips": [f"{want6}/80", str(want4)]})
        assert code == 0, res
        assert [ip_interface(e["address"]).ip for e in res["ips"]] == [want4, want6]
        code, out = cni(agent, "ADD", cid="other", runtimeConfig={"ips": [str(want6)]})  # taken: this one fails alone
        assert code != 0 and "already in use" in out["msg"], out
        assert [a.container_id for a in ipam.list_allocations(store, "c1")] == ["cid1"]
        assert len(dp.list_pod_veths()) == 1
    finally:
        agent.shutdown()


def test_concurrent_adds_get_distinct_pairs_and_del_flushes_both_families(dual, tmp_path):  # noqa: F811
    url, store = dual
    agent, dp = start_agent(url, tmp_path, "n1", "10.224.0.4")
    n = 8
    results: dict[str, tuple] = {}
    try:
        threads = [threading.Thread(target=lambda c=f"p{i}": results.__setitem__(c, cni(agent, "ADD", cid=c)))
                   for i in range(n)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(code == 0 for code, _ in results.values()), results
        pairs = {c: tuple(ip_interface(e["address"]).ip for e in res["ips"]) for c, (_, res) in results.items()}
        assert all(len(p) == 2 and p[0].version == 4 and p[1].version == 6 for p in pairs.values())
        assert len({p[0] for p in pairs.values()}) == n and len({p[1] for p in pairs.values()}) == n
        assert ipam.check(store, "c1").ok and len(dp.list_pod_veths()) == n
        v4, v6 = pairs["p0"]
        other4, other6 = IPv4Address("10.224.9.9"), IPv6Address("fd00:9::9")
        keep = {(other4, pairs["p1"][0]), (other6, pairs["p1"][1])}  # control: another pod's flows
        dp.kernel.conntrack |= {(v4, other4), (other4, v4), (v6, other6), (other6, v6)} | keep
        assert cni(agent, "DEL", cid="p0") == (0, None)
        assert drained(agent)  # the quarantine: flushed before the address is released
        assert dp.kernel.conntrack == keep
        for i in range(1, n):
            assert cni(agent, "DEL", cid=f"p{i}") == (0, None)
        assert drained(agent)
        assert ipam.list_allocations(store, "c1") == [] and dp.list_pod_veths() == [] and ipam.check(store, "c1").ok
    finally:
        agent.shutdown()
