"""The dual-stack flags from the outside: ``plan`` and ``cluster create``
take them (``--help`` teaches them), exit codes, the JSON contract (single-
stack output unchanged, ``ipv6`` added for dual-stack), and the installed
binary never printing a traceback. The golden files of dual-stack plans are
in test_plan_cli.py (``dual-stack*`` cases)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from overlaycni.cli.main import app as main_app
from tests.unit.test_plan_cli import flat, make_app, run_binary

OVERLAY = ["--network-plugin", "azure", "--network-plugin-mode", "overlay"]
DUAL = [*OVERLAY, "--ip-families", "ipv4,ipv6"]
DUAL_FLAGS = ["--ip-families", "--vnet-cidrs", "--node-subnet-cidrs", "--pod-cidrs", "--service-cidrs",
              "--node-cidr-size-v6"]


def plan(*args: str):
    return CliRunner().invoke(make_app(), ["plan", *args])


def help_text(*command: str) -> str:
    result = CliRunner().invoke(main_app, [*command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return flat(result.stdout)


@pytest.mark.parametrize("command", [("plan",), ("cluster", "create"), ("lab", "up")])
def test_help_teaches_the_dual_stack_flags(command):
    text = help_text(*command)
    assert "Dual-stack (AKS flags)" in text
    for flag in DUAL_FLAGS:
        assert flag in text, flag
    assert "ipv4 (default) or ipv4,ipv6" in text and "fd12:3456:789a::/64" in text and "IPv6 /108 or smaller" in text


def test_dual_stack_plan_exits_0_with_ipv6_capacity():
    result = plan(*DUAL, "-o", "json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 0 and doc["valid"] is True
    assert set(doc) == {"valid", "errors", "warnings", "overlay", "flat", "kubenet", "ipv6"}
    assert doc["ipv6"] == {
        "pod_cidr": "fd12:3456:789a::/64", "service_cidr": "fd12:3456:789a:1::/108", "node_cidr_size": 80,
        "blocks": 65536, "addresses_per_block": 2**48, "max_nodes": 256, "max_pods": 256 * 250,
        "limited_by": "IPv4 pod CIDR blocks",
    }
    assert doc["kubenet"]["max_nodes"] == 200  # 400 routes, one per family per node


def test_single_stack_plan_json_has_no_ipv6_key():
    doc = json.loads(plan(*OVERLAY, "--ip-families", "ipv4", "-o", "json").stdout)
    assert set(doc) == {"valid", "errors", "warnings", "overlay", "flat", "kubenet"}
    assert plan(*OVERLAY, "--ip-families", "ipv4").stdout == plan(*OVERLAY).stdout


def test_ipv6_capacity_is_limited_by_the_ipv6_pod_cidr():
    doc = json.loads(plan(*DUAL, "--pod-cidrs", "10.240.0.0/12,fd12:3456:789a::/72", "--nodes", "300", "-o", "json").stdout)
    assert doc["overlay"]["max_nodes"] == doc["ipv6"]["max_nodes"] == 256
    assert doc["overlay"]["limited_by"] == doc["ipv6"]["limited_by"] == "IPv6 pod CIDR blocks"
    assert doc["fits"]["overlay"] is False


@pytest.mark.parametrize(
    "args,field",
    [
        (["--ip-families", "ipv6"], "ip-families"),
        (["--ip-families", "ipv4,ipv6", "--pod-cidrs", "fd12:3456:789a::/64,10.244.0.0/16"], "pod-cidrs"),
        (["--ip-families", "ipv4,ipv6", "--service-cidrs", "10.0.0.0/16,fd12:3456:789a:1::/104",
          "--dns-service-ip", "10.0.0.10"], "service-cidrs"),
        (["--ip-families", "ipv4,ipv6", "--pod-cidrs", "10.244.0.0/16,fe80::/64"], "pod-cidrs"),
        (["--ip-families", "ipv4,ipv6", "--pod-cidrs", "10.244.0.0/16,fd00:10:224::/64"], "pod-cidrs"),
        (["--ip-families", "ipv4,ipv6", "--node-cidr-size-v6", "121"], "node-cidr-size-v6"),
        (["--ip-families", "ipv4,ipv6", "--pod-cidr", "10.1.0.0/16", "--pod-cidrs", "10.2.0.0/16,fd12::/64"], "pod-cidrs"),
        (["--ip-families", "ipv4,ipv6", "--dns-service-ip", "fd00::a", "--service-cidr", "10.0.0.0/16"], "dns-service-ip"),
        (["--node-cidr-size-v6", "80"], "node-cidr-size-v6"),
    ],
)
def test_invalid_dual_stack_settings_exit_2_naming_the_flag(args, field):
    result = plan(*OVERLAY, *args, "-o", "json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 2 and doc["valid"] is False and "ipv6" not in doc
    assert field in {e["field"] for e in doc["errors"]}
    table = plan(*OVERLAY, *args)
    assert table.exit_code == 2 and f"error: --{field}" in flat(table.stderr)


def test_usage_errors_of_the_dual_stack_flags_exit_2():
    result = plan("--ip-families")  # the option needs a value
    assert result.exit_code == 2 and "--ip-families" in flat(result.output)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["plan", *OVERLAY, "--ip-families", "ipv6"], "IPv6-only clusters are not offered"),
        (["plan", *DUAL, "--pod-cidrs", "10.244.0.0/16,fd12::/200"], "IPv6 allows /0 to /128"),
        (["plan", *DUAL, "--service-cidrs", "[red]x", "--dns-service-ip", "10.0.0.10"], "'[red]x'"),
    ],
)
def test_binary_rejects_bad_dual_stack_input_without_traceback(args, fragment):
    proc = run_binary(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert fragment in flat(proc.stderr)


def test_binary_dual_stack_cluster_create_and_conflict(tmp_path):
    store = ["--datastore", f"sqlite://{tmp_path}/state.db"]
    ok = run_binary(*store, "cluster", "create", "--name", "d", *DUAL, "-o", "json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["pod-cidrs"] == ["10.244.0.0/16", "fd12:3456:789a::/64"]
    again = run_binary(*store, "cluster", "create", "--name", "d", *DUAL)
    assert again.returncode == 0, again.stderr
    conflict = run_binary(*store, "cluster", "create", "--name", "d", *OVERLAY)
    assert conflict.returncode == 2 and "Traceback" not in conflict.stderr
    assert "--ip-families ipv4,ipv6 (asked ipv4)" in flat(conflict.stderr)


def test_dual_stack_settings_from_a_file_and_flags_over_it(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text(
        "network:\n  network-plugin: azure\n  network-plugin-mode: overlay\n  ip-families: [ipv4, ipv6]\n"
        "  pod-cidrs: [10.240.0.0/16, 'fd12:3456:789b::/64']\n  node-cidr-size-v6: 96\n"
    )
    doc = json.loads(plan("--file", str(path), "-o", "json").stdout)
    assert doc["ipv6"]["pod_cidr"] == "fd12:3456:789b::/64" and doc["ipv6"]["node_cidr_size"] == 96
    doc = json.loads(plan("--file", str(path), "--pod-cidr", "10.240.0.0/15", "-o", "json").stdout)
    assert doc["valid"] is True and doc["overlay"]["max_nodes"] == 512 and doc["ipv6"]["pod_cidr"] == "fd12:3456:789b::/64"
