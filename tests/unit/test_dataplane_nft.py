"""The ``ip overlaycni`` nftables renderer: golden file, fingerprint, set diffs, parsing."""

from __future__ import annotations

import json
import os
from ipaddress import IPv4Address, IPv4Network

from overlaycni.dataplane import nftables, nftmodel
from overlaycni.dataplane.model import NodeState, Peer, PodEndpoint, vtep_mac

GOLDEN = os.path.join(os.path.dirname(__file__), "test_dataplane_nft_golden.json")


def _table(**kw) -> nftmodel.NftTable:
    base = dict(
        pod_cidr=IPv4Network("10.244.0.0/16"),
        vxlan_port=4789,
        node_ips=frozenset({IPv4Address("10.224.0.1"), IPv4Address("10.224.0.2")}),
        pod_endpoints=frozenset({("oc0123456789abc", IPv4Address("10.244.1.5"))}),
        non_masquerade=frozenset({IPv4Network("10.10.0.0/16"), IPv4Network("10.20.0.1/32")}),
        peer_blocks=frozenset({(IPv4Address("10.224.0.2"), IPv4Network("10.244.2.0/24"))}),
        notrack_vxlan=True,
    )
    base.update(kw)
    return nftmodel.NftTable(**base)


def test_render_matches_golden_file():
    rendered = json.dumps({"nftables": nftmodel.render_table(_table())}, indent=1, sort_keys=True)
    if os.environ.get("UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            f.write(rendered + "\n")
    with open(GOLDEN) as f:
        assert json.loads(f.read()) == json.loads(rendered)


def test_render_replaces_the_ip_table_only():
    cmds = nftmodel.render_table(_table())
    tables = [c for c in cmds if "table" in next(iter(c.values()))]
    assert [next(iter(c)) for c in tables] == ["add", "delete", "add"]
    for c in cmds:
        body = next(iter(next(iter(c.values())).values()))
        assert body["family"] == "ip" and body.get("table", body.get("name")) == "overlaycni"


def test_fingerprint_ignores_set_contents_but_not_chains():
    a = _table()
    assert nftmodel.fingerprint(a) == nftmodel.fingerprint(_table(node_ips=frozenset()))
    assert nftmodel.fingerprint(a) != nftmodel.fingerprint(_table(pod_cidr=IPv4Network("10.96.0.0/12")))
    assert nftmodel.fingerprint(a) != nftmodel.fingerprint(_table(vxlan_port=8472))


def test_masquerade_rules_exempt_pod_cidr_mark_and_non_masq():
    chains = dict((c["name"], rules) for c, rules in nftmodel._chains(_table()))
    post = json.dumps(chains["postrouting"])
    assert '"fully-random"' in post and '16384' in post and '"@non_masq"' in post
    assert chains["postrouting"][-1][-1] == {"masquerade": {"flags": ["fully-random"]}}


def test_diff_sets_adds_and_deletes_only_the_difference():
    current = nftmodel.NftState(nftmodel.fingerprint(_table()), {
        **_table().sets(),
        "node_ips": frozenset({IPv4Address("10.224.0.1"), IPv4Address("10.224.0.9")}),
    })
    cmds = nftmodel.diff_sets(current, _table())
    assert cmds == [
        {"delete": {"element": {"family": "ip", "table": "overlaycni", "name": "node_ips", "elem": ["10.224.0.9"]}}},
        {"add": {"element": {"family": "ip", "table": "overlaycni", "name": "node_ips", "elem": ["10.224.0.2"]}}},
    ]
    same = nftmodel.NftState(current.fingerprint, _table().sets())
    assert nftmodel.diff_sets(same, _table()) == []


def test_parse_listing_round_trips_elements():
    t = _table()
    listing = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "ip", "name": "overlaycni"}},
        {"chain": {"family": "ip", "table": "overlaycni", "name": "fp_" + nftmodel.fingerprint(t)}},
        *({"set": {"family": "ip", "table": "overlaycni", "name": name,
                   "elem": [nftables.encode(e) for e in elems]}} for name, elems in t.sets().items()),
    ]}
    state = nftmodel.parse_listing(listing)
    assert state.fingerprint == nftmodel.fingerprint(t)
    assert state.sets == t.sets()


def test_parse_listing_expands_ranges():
    listing = {"nftables": [{"set": {"name": "non_masq", "elem": [{"range": ["10.0.0.0", "10.0.1.127"]}]}}]}
    assert nftmodel.parse_listing(listing).sets["non_masq"] == frozenset(
        {IPv4Network("10.0.0.0/24"), IPv4Network("10.0.1.0/25")})


def test_table_for_collects_node_ips_and_collapses_non_masq():
    me = IPv4Address("10.224.0.1")
    peer = Peer("n2", IPv4Address("10.224.0.2"), IPv4Network("10.244.2.0/24"), vtep_mac(IPv4Address("10.224.0.2")))
    state = NodeState(node_ip=me, block=IPv4Network("10.244.1.0/24"), pod_cidr=IPv4Network("10.244.0.0/16"),
                      peers=(peer,), non_masquerade_cidrs=(IPv4Network("10.10.0.0/25"), IPv4Network("10.10.0.128/25")),
                      pods=(PodEndpoint(IPv4Address("10.244.1.5"), "ocx"),))
    t = nftmodel.table_for(state, pod_endpoints=[("ocx", IPv4Address("10.244.1.5"))])
    assert t.node_ips == {me, peer.node_ip}
    assert t.non_masquerade == {IPv4Network("10.10.0.0/24")}


def test_outer_vxlan_between_node_ips_is_not_tracked_on_the_vxlan_backend_only():
    chains = {c["name"]: (c, rules) for c, rules in nftmodel._chains(_table())}
    notrack = [r for r in chains["prerouting"][1] if {"notrack": None} in r]
    assert len(notrack) == 1 and chains["prerouting"][1][-1] is notrack[0]  # after the drops
    rule = json.dumps(notrack[0])
    assert '"dport"' in rule and "4789" in rule and rule.count('"@node_ips"') == 2  # node IP to node IP only
    out, out_rules = chains["output"]
    assert (out["hook"], out["prio"]) == ("output", -300) and out_rules == [notrack[0]]  # raw: before conntrack (-200)
    untracked = _table(notrack_vxlan=False)
    assert "output" not in {c["name"] for c, _ in nftmodel._chains(untracked)}
    assert "notrack" not in json.dumps(nftmodel.render_table(untracked))
    assert nftmodel.fingerprint(untracked) != nftmodel.fingerprint(_table())


def test_table_for_untracks_the_outer_flow_with_vxlan_only():
    for backend, want in (("vxlan", True), ("direct", False), ("wireguard", False)):
        state = NodeState(node_ip=IPv4Address("10.224.0.1"), block=IPv4Network("10.244.1.0/24"),
                          pod_cidr=IPv4Network("10.244.0.0/16"), backend=backend)
        assert nftmodel.table_for(state, pod_endpoints=()).notrack_vxlan is want, backend
