"""The cluster / node / ipam commands, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from overlaycni.cli.main import app
from overlaycni.errors import OverlayCNIError

NET = ["--network-plugin", "azure", "--network-plugin-mode", "overlay"]


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


def js(result):
    return json.loads(result.stdout)


def test_cluster_lifecycle(cli):
    out = js(cli("cluster", "create", "--name", "dev", *NET, "--pod-cidr", "10.244.0.0/16", "-o", "json"))
    assert out["name"] == "dev" and out["pod-cidr"] == "10.244.0.0/16"
    cli("cluster", "create", "--name", "dev", *NET)  # same settings again: fine
    res = cli("cluster", "create", "--name", "dev", *NET, "--pod-cidr", "10.245.0.0/16", code=2)
    assert "already exists with different settings" in said(res)
    assert [c["name"] for c in js(cli("cluster", "list", "-o", "json"))] == ["dev"]
    assert js(cli("cluster", "show", "--name", "dev", "-o", "json"))["node-cidr-size"] == 24
    out = js(cli("cluster", "expand-pod-cidr", "--name", "dev", "--pod-cidr", "10.244.0.0/15", "-o", "json"))
    assert out["pod-cidr"] == "10.244.0.0/15"
    cli("cluster", "delete", "--name", "dev")
    assert js(cli("cluster", "list", "-o", "json")) == []


def test_invalid_network_flags_are_rejected(cli):
    res = cli("cluster", "create", "--name", "dev", *NET, "--pod-cidr", "10.224.0.0/16", code=2)
    assert "NetworkProfileCIDROverlapVNET" in said(res)


def test_nodes_and_addresses(cli, tmp_path):
    cli("cluster", "create", "--name", "dev", *NET)
    node = js(cli("node", "register", "--cluster", "dev", "--name", "n1", "--node-ip", "10.224.0.4", "-o", "json"))
    assert node == {"name": "n1", "node_ip": "10.224.0.4", "block": "10.244.0.0/24", "block_v6": None}
    listed = js(cli("node", "list", "--cluster", "dev", "-o", "json"))[0]
    assert listed["block"] == "10.244.0.0/24" and listed["block_v6"] is None
    args = ["ipam", "allocate", "--cluster", "dev", "--node", "n1", "--ifname", "eth0", "-o", "json"]
    assert js(cli(*args, "--container-id", "abc", "--pod", "default/web-0")) == {
        "ip": "10.244.0.2/24",
        "gateway": "10.244.0.1",
        "ip_v6": None,
        "gateway_v6": None,
    }
    assert js(cli(*args, "--container-id", "abc"))["ip"] == "10.244.0.2/24"
    assert js(cli(*args, "--container-id", "def"))["ip"] == "10.244.0.3/24"
    show = js(cli("ipam", "show", "--cluster", "dev", "-o", "json"))
    # registered by hand, no agent holds its lease: not live
    assert show["nodes"] == [{"node": "n1", "block": "10.244.0.0/24", "live": False, "used": 2, "free": 251,
                              "block_v6": None, "used_v6": None, "free_v6": None}]
    assert js(cli("ipam", "check", "--cluster", "dev", "-o", "json"))["ok"] is True
    valid = tmp_path / "valid.json"
    valid.write_text(json.dumps({"cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0"}]}))
    cli("ipam", "check", "--cluster", "dev", "--valid", str(valid), code=1)
    released = js(cli("ipam", "gc", "--cluster", "dev", "--valid", str(valid), "-o", "json"))["released"]
    assert [r["container_id"] for r in released] == ["def"]
    cli("ipam", "check", "--cluster", "dev", "--valid", str(valid))
    res = js(cli("ipam", "release", "--cluster", "dev", "--container-id", "abc", "--ifname", "eth0", "-o", "json"))
    assert res == {"released": "10.244.0.2/24", "released_v6": None}
    cli("ipam", "release", "--cluster", "dev", "--container-id", "abc", "--ifname", "eth0")
    cli("node", "delete", "--cluster", "dev", "--name", "n1")
    assert js(cli("node", "list", "--cluster", "dev", "-o", "json")) == []


def test_dual_stack_nodes_and_addresses(cli, tmp_path):
    cli("cluster", "create", "--name", "ds", *NET, "--ip-families", "ipv4,ipv6")
    node = js(cli("node", "register", "--cluster", "ds", "--name", "n1", "--node-ip", "10.224.0.4", "-o", "json"))
    assert node == {"name": "n1", "node_ip": "10.224.0.4", "block": "10.244.0.0/24", "block_v6": "fd12:3456:789a::/80"}
    assert js(cli("node", "list", "--cluster", "ds", "-o", "json"))[0]["block_v6"] == "fd12:3456:789a::/80"
    assert "IPv6 block" in cli("node", "list", "--cluster", "ds").output
    args = ["ipam", "allocate", "--cluster", "ds", "--node", "n1", "-o", "json"]
    assert js(cli(*args, "--container-id", "abc")) == {
        "ip": "10.244.0.2/24", "gateway": "10.244.0.1", "ip_v6": "fd12:3456:789a::2/80", "gateway_v6": "fe80::1"}
    got = js(cli(*args, "--container-id", "def", "--ip", "fd12:3456:789a::99", "--ip", "10.244.0.99"))
    assert (got["ip"], got["ip_v6"]) == ("10.244.0.99/24", "fd12:3456:789a::99/80")
    res = cli(*args, "--container-id", "x", "--ip", "10.244.0.5", "--ip", "10.244.0.6", code=2)
    assert "one address per family" in said(res)
    show = js(cli("ipam", "show", "--cluster", "ds", "-o", "json"))["nodes"][0]
    assert (show["used"], show["free"], show["block_v6"], show["used_v6"]) == (2, 251, "fd12:3456:789a::/80", 2)
    assert show["free_v6"] == 2**48 - 2 - 2
    assert js(cli("ipam", "check", "--cluster", "ds", "-o", "json"))["allocations"] == 2
    res = js(cli("ipam", "release", "--cluster", "ds", "--container-id", "abc", "--ifname", "eth0", "-o", "json"))
    assert res == {"released": "10.244.0.2/24", "released_v6": "fd12:3456:789a::2/80"}
    valid = tmp_path / "valid.txt"
    valid.write_text("")
    released = js(cli("ipam", "gc", "--cluster", "ds", "--valid", str(valid), "-o", "json"))["released"]
    assert [(r["ip"], r["ip_v6"]) for r in released] == [("10.244.0.99/24", "fd12:3456:789a::99/80")]


def test_listings_skip_a_malformed_node_record_and_say_so(cli, tmp_path):
    """`node list` and `ipam show` with one bad record: the others are listed,
    the bad one is named on stderr (and under "skipped" in `ipam show -o json`)."""
    from overlaycni.datastore import open_datastore
    from overlaycni.datastore.keys import ip_key, lease_key, node_key

    cli("cluster", "create", "--name", "dev", *NET)
    for name, ip in (("n1", "10.224.0.4"), ("n2", "10.224.0.5")):
        cli("node", "register", "--cluster", "dev", "--name", name, "--node-ip", ip)
    cli("ipam", "allocate", "--cluster", "dev", "--node", "n1", "--container-id", "abc")
    # control: every record decodes, nothing is skipped or warned about
    res = cli("node", "list", "--cluster", "dev", "-o", "json")
    assert [n["name"] for n in js(res)] == ["n1", "n2"] and "warning" not in res.stderr
    res = cli("ipam", "show", "--cluster", "dev", "-o", "json")
    assert js(res)["skipped"] == [] and "warning" not in res.stderr
    rows = js(res)["nodes"]

    store = open_datastore(f"sqlite://{tmp_path}/state.db")
    try:
        store.put(node_key("dev", "n2"), '{"name": "n2", "node_ip": "not-an-ip", "block": "10.244.1.0/24"}')
        store.put(lease_key("dev", "n1"), "{not json")
        store.put(ip_key("dev", "n1", 0x0AF40009), '{"ifname": "eth0"}')  # 10.244.0.9 without a container ID
    finally:
        store.close()
    # the fault: each listing goes on without the bad records and names them
    res = cli("node", "list", "--cluster", "dev", "-o", "json")
    assert [(n["name"], n["live"]) for n in js(res)] == [("n1", False)]
    assert f"skipped bad node record {node_key('dev', 'n2')}: node_ip:" in said_err(res)
    assert f"skipped bad node record {lease_key('dev', 'n1')}" in said_err(res)
    table = cli("node", "list", "--cluster", "dev")
    assert "n1" in table.stdout and "n2" not in table.stdout and "warning" in table.stderr

    res = cli("ipam", "show", "--cluster", "dev", "-o", "json")
    out = js(res)
    assert out["cluster"] == "dev" and out["nodes"] == rows  # the existing keys are unchanged
    assert {(s["key"], s["kind"]) for s in out["skipped"]} == {
        (node_key("dev", "n2"), "node"),
        (lease_key("dev", "n1"), "node"),
        (ip_key("dev", "n1", 0x0AF40009), "allocation"),
    }
    assert all(s["reason"] for s in out["skipped"])
    assert said_err(res).count("warning: skipped") == 3
    table = cli("ipam", "show", "--cluster", "dev")
    assert "n1" in table.stdout and "n2" in table.stdout and said_err(table).count("warning: skipped") == 3
    # ipam check lists the same records as problems (keys relative to the cluster's root)
    bad = {p["key"] for p in js(cli("ipam", "check", "--cluster", "dev", "-o", "json", code=1))["problems"] if p["kind"] == "bad-record"}
    assert len(bad) == 3 and all(any(s["key"].endswith(k) for s in out["skipped"]) for k in bad), bad


def said_err(result) -> str:
    return " ".join(result.stderr.split())


def test_unknown_cluster_and_node(cli):
    res = cli("node", "list", "--cluster", "nope", code=2)
    assert "cluster 'nope' not found" in said(res)
    cli("cluster", "create", "--name", "dev", *NET)
    res = cli("ipam", "allocate", "--cluster", "dev", "--node", "ghost", "--container-id", "a", code=2)
    assert "node 'ghost' has no block" in said(res)


def test_bad_valid_file_names_the_option(cli, tmp_path):
    cli("cluster", "create", "--name", "dev", *NET)
    bad = tmp_path / "bad.txt"
    bad.write_text("only-one-field\n")
    res = cli("ipam", "gc", "--cluster", "dev", "--valid", str(bad), code=2)
    assert "--valid" in said(res) and "line 1" in said(res)


@pytest.mark.parametrize(
    "datastore, words",
    [("etcd://127.0.0.1:1", "unreachable"), ("bogus", "not a datastore URL")],
)
def test_entry_point_prints_errors_without_traceback(datastore, words):
    proc = subprocess.run(
        [sys.executable, "-m", "overlaycni.cli.main", "--datastore", datastore, "cluster", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr
