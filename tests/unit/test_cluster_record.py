"""The cluster record with dual-stack fields, over a real (sqlite) store:
round trips of dual-stack and single-stack records, a record written before
dual-stack existed, idempotent create and its conflict messages, and
``cluster create/show/list`` as a user runs them."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from overlaycni import ipam
from overlaycni.cli.main import app
from overlaycni.config import IPFamily, parse_network
from overlaycni.datastore import open_datastore
from overlaycni.errors import AlreadyExists, OverlayCNIError

OVERLAY = {"network-plugin": "azure", "network-plugin-mode": "overlay"}
DUAL = {**OVERLAY, "ip-families": "ipv4,ipv6"}

# A record as overlaycni stored it before dual-stack (every key, in its order).
LEGACY_RECORD = {
    "network-plugin": "azure", "network-plugin-mode": "overlay", "vnet-cidr": "10.224.0.0/12",
    "node-subnet-cidr": "10.224.0.0/16", "pod-cidr": "10.244.0.0/16", "service-cidr": "10.0.0.0/16",
    "dns-service-ip": "10.0.0.10", "max-pods": 250, "node-cidr-size": 24, "backend": "vxlan", "vni": 4096,
    "vxlan-port": 4789, "mtu": None, "non-masquerade-cidrs": [],
}


@pytest.fixture
def store(tmp_path):
    s = open_datastore(f"sqlite://{tmp_path}/state.db")
    yield s
    s.close()


def record_of(store, name: str):
    """The stored cluster record (found by content, whatever the key layout)."""
    hits = [kv for kv in store.list("/") if f"/{name}/" in kv.key and kv.value.startswith("{") and "pod-cidr" in kv.value]
    assert len(hits) == 1, hits
    return hits[0]


def test_dual_stack_record_round_trip(store):
    net = parse_network({**DUAL, "pod-cidrs": "10.240.0.0/16,fd12:3456:789b::/64", "node-cidr-size-v6": 96})
    assert ipam.create_cluster(store, "dual", net) == net
    got = ipam.get_cluster(store, "dual")
    assert got == net and got.is_dual_stack
    assert [str(f.pod_cidr) for f in got.families] == ["10.240.0.0/16", "fd12:3456:789b::/64"]
    assert got.families[1].node_cidr_size == 96
    stored = json.loads(record_of(store, "dual").value)
    assert stored["ip-families"] == ["ipv4", "ipv6"]
    assert stored["pod-cidrs"] == ["10.240.0.0/16", "fd12:3456:789b::/64"]
    assert stored["service-cidrs"] == ["10.0.0.0/16", "fd12:3456:789a:1::/108"]
    assert stored["node-cidr-size-v6"] == 96
    assert dict(ipam.list_clusters(store))["dual"] == net


def test_single_stack_record_keeps_its_keys(store):
    ipam.create_cluster(store, "one", parse_network(OVERLAY))
    assert json.loads(record_of(store, "one").value) == LEGACY_RECORD


def test_a_record_from_before_dual_stack_reads_as_single_stack(store):
    ipam.create_cluster(store, "old", parse_network(OVERLAY))
    kv = record_of(store, "old")
    store.put(kv.key, json.dumps(LEGACY_RECORD))  # the old record, as an old version wrote it
    got = ipam.get_cluster(store, "old")
    assert got.ip_families == (IPFamily.ipv4,) and not got.is_dual_stack and got.pod_cidr_v6 is None
    # creating it again with the same settings is still a no-op ...
    assert ipam.create_cluster(store, "old", parse_network(OVERLAY)) == got
    # ... and asking for dual-stack names the difference
    with pytest.raises(AlreadyExists) as info:
        ipam.create_cluster(store, "old", parse_network(DUAL))
    assert "--ip-families ipv4 (asked ipv4,ipv6)" in str(info.value)


def test_create_dual_stack_is_idempotent_and_names_what_differs(store):
    net = parse_network(DUAL)
    ipam.create_cluster(store, "dual", net)
    assert ipam.create_cluster(store, "dual", parse_network(DUAL)) == net
    with pytest.raises(AlreadyExists) as info:
        ipam.create_cluster(store, "dual", parse_network({**DUAL, "node-cidr-size-v6": 96}))
    assert str(info.value).endswith("--node-cidr-size-v6 80 (asked 96)")
    with pytest.raises(AlreadyExists) as info:
        ipam.create_cluster(store, "dual", parse_network({**DUAL, "pod-cidrs": "10.244.0.0/16,fd12:3456:789b::/64"}))
    assert "--pod-cidrs 10.244.0.0/16,fd12:3456:789a::/64 (asked 10.244.0.0/16,fd12:3456:789b::/64)" in str(info.value)
    with pytest.raises(AlreadyExists) as info:
        ipam.create_cluster(store, "dual", parse_network(OVERLAY))
    assert "--ip-families ipv4,ipv6 (asked ipv4)" in str(info.value)
    assert ipam.get_cluster(store, "dual") == net


def test_expand_a_dual_stack_pod_cidr(store):
    ipam.create_cluster(store, "dual", parse_network(DUAL))
    new = ipam.expand_pod_cidr(store, "dual", "10.244.0.0/15")
    assert [str(f.pod_cidr) for f in new.families] == ["10.244.0.0/15", "fd12:3456:789a::/64"]
    assert ipam.get_cluster(store, "dual") == new


# ----- the commands ------------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.delenv("OVERLAYCNI_DATASTORE", raising=False)
    url = f"sqlite://{tmp_path}/state.db"
    runner = CliRunner()

    def run(*args: str, code: int = 0):
        result = runner.invoke(app, ["--datastore", url, *args])
        assert not isinstance(result.exception, OverlayCNIError), "the app prints its errors itself"
        assert result.exit_code == code, (result.output, result.exception)
        return result

    return run


def said(result) -> str:
    """What the command printed, with rich's line wrapping undone."""
    return " ".join(result.output.split())


NET = ["--network-plugin", "azure", "--network-plugin-mode", "overlay"]


def test_cluster_create_and_show_dual_stack(cli):
    out = json.loads(cli("cluster", "create", "--name", "dual", *NET, "--ip-families", "ipv4,ipv6", "-o", "json").stdout)
    assert out["name"] == "dual" and out["ip-families"] == ["ipv4", "ipv6"]
    assert out["pod-cidrs"] == ["10.244.0.0/16", "fd12:3456:789a::/64"] and out["pod-cidr"] == "10.244.0.0/16"
    assert out["service-cidrs"] == ["10.0.0.0/16", "fd12:3456:789a:1::/108"] and out["node-cidr-size-v6"] == 80
    assert json.loads(cli("cluster", "show", "--name", "dual", "-o", "json").stdout) == out
    cli("cluster", "create", "--name", "dual", *NET, "--ip-families", "ipv4,ipv6")  # again: a no-op
    res = cli("cluster", "create", "--name", "dual", *NET, "--ip-families", "ipv4,ipv6", "--node-cidr-size-v6", "96", code=2)
    assert "--node-cidr-size-v6 80 (asked 96)" in said(res)
    table = " ".join(cli("cluster", "show", "--name", "dual").stdout.split())
    assert "ip-families │ ipv4, ipv6" in table and "pod-cidrs │ 10.244.0.0/16, fd12:3456:789a::/64" in table
    assert "256 x /24 and 65,536 x /80 (max nodes 256)" in table
    listed = json.loads(cli("cluster", "list", "-o", "json").stdout)
    assert [c["ip-families"] for c in listed] == [["ipv4", "ipv6"]]


def test_cluster_show_names_the_family_of_a_single_stack_cluster(cli):
    out = json.loads(cli("cluster", "create", "--name", "one", *NET, "-o", "json").stdout)
    assert out["ip-families"] == ["ipv4"] and "pod-cidrs" not in out
    assert list(out) == ["name", "ip-families", *LEGACY_RECORD]
    assert "ip-families │ ipv4" in " ".join(cli("cluster", "show", "--name", "one").stdout.split())


@pytest.mark.parametrize(
    "args,field",
    [
        (["--ip-families", "ipv6"], "--ip-families"),
        (["--ip-families", "ipv4,ipv6", "--pod-cidrs", "10.244.0.0/16"], "--pod-cidrs"),
        (["--ip-families", "ipv4,ipv6", "--service-cidrs", "10.0.0.0/16,fd12:3456:789a:1::/100",
          "--dns-service-ip", "10.0.0.10"], "--service-cidrs"),
        (["--node-cidr-size-v6", "80"], "--node-cidr-size-v6"),
    ],
)
def test_cluster_create_rejects_bad_dual_stack_settings(cli, args, field):
    res = cli("cluster", "create", "--name", "bad", *NET, *args, code=2)
    assert field in said(res)
    assert json.loads(cli("cluster", "list", "-o", "json").stdout) == []  # nothing was written
