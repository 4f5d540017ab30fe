"""``overlaycni plan`` from the outside: typer's CliRunner for options and
output, a few runs of the installed ``overlaycni`` binary for exit codes and
the absence of tracebacks, and golden files of the JSON and table output.

Regenerate the golden files with ``UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from overlaycni.cli import plan as plan_cmd

GOLDEN = Path(__file__).parent / "golden" / "plan"
BINARY = Path(sys.executable).parent / "overlaycni"
WIDTH = 100

OVERLAY = ["--network-plugin", "azure", "--network-plugin-mode", "overlay"]
SEED = [*OVERLAY, "--pod-cidr", "10.244.0.0/16", "--service-cidr", "10.0.0.0/24", "--dns-service-ip", "10.0.0.10"]

# name -> arguments after ``plan``; each has a .json golden and a .txt golden
CASES = {
    "seed": SEED,
    "nodes-300": [*OVERLAY, "--nodes", "300"],
    "nodes-300-fits": [*OVERLAY, "--pod-cidr", "10.244.0.0/15", "--nodes", "300"],
    "kubenet-large-vnet": [
        "--network-plugin", "kubenet", "--vnet-cidr", "10.0.0.0/8", "--node-subnet-cidr", "10.0.0.0/9",
        "--pod-cidr", "100.64.0.0/10", "--service-cidr", "192.168.0.0/16", "--dns-service-ip", "192.168.0.10",
        "--nodes", "5000",
    ],
    "small-subnet": [*OVERLAY, "--node-subnet-cidr", "10.224.0.0/28", "--max-pods", "30", "--node-cidr-size", "26"],
    "public-pod-cidr": [*OVERLAY, "--pod-cidr", "20.0.0.0/16"],
    "wireguard-jumbo": [*OVERLAY, "--backend", "wireguard", "--underlay-mtu", "9000"],
    "invalid": [
        *OVERLAY, "--pod-cidr", "10.224.128.0/17", "--service-cidr", "10.0.0.0/16", "--dns-service-ip", "10.0.0.1",
        "--max-pods", "300", "--nodes", "10",
    ],
    # dual-stack (--ip-families ipv4,ipv6)
    "dual-stack": [*OVERLAY, "--ip-families", "ipv4,ipv6"],
    "dual-stack-ipv6-limited": [
        *OVERLAY, "--ip-families", "ipv4,ipv6", "--pod-cidrs", "10.240.0.0/12,fd12:3456:789a::/72", "--nodes", "3000",
    ],
    "dual-stack-kubenet": [
        "--network-plugin", "kubenet", "--ip-families", "ipv4,ipv6", "--pod-cidr", "10.240.0.0/12",
        "--service-cidrs", "10.0.0.0/16,fd12:3456:789a:1::/112", "--dns-service-ip", "10.0.0.10", "--nodes", "250",
    ],
    "invalid-dual-stack": [
        *OVERLAY, "--ip-families", "ipv4,ipv6", "--pod-cidrs", "10.244.0.0/16,fe80::/64",
        "--service-cidrs", "10.0.0.0/16,fd12:3456:789a:1::/100", "--dns-service-ip", "fd12:3456:789a:1::a",
        "--node-cidr-size-v6", "124",
    ],
}


def make_app() -> typer.Typer:
    """The plan command wired as cli.main wires it, without the other layers."""
    app = typer.Typer(pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})

    @app.callback()
    def root() -> None:
        pass

    app.command("plan", epilog=plan_cmd.EPILOG)(plan_cmd.plan)
    return app


@pytest.fixture
def run(monkeypatch):
    """Invoke ``plan`` in-process with consoles of a fixed width and no colour."""
    monkeypatch.setattr(plan_cmd, "console", Console(width=WIDTH, color_system=None, force_terminal=False))
    monkeypatch.setattr(
        plan_cmd, "err_console", Console(width=WIDTH, color_system=None, force_terminal=False, stderr=True)
    )
    app = make_app()
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, ["plan", *args])

    return invoke


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
COLOUR_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CLICOLOR_FORCE", "PY_COLORS", "COLUMNS", "LINES")


def flat(text: str) -> str:
    """Whitespace-normalised text without colour codes (rich wraps long
    lines; FORCE_COLOR in the environment colours usage errors)."""
    return " ".join(ANSI.sub("", text).split())


def normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    text = normalise(text)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing; run with UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{name} differs from its golden file (UPDATE_GOLDEN=1 regenerates)"


# ----- golden files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_json(run, name):
    result = run(*CASES[name], "--output", "json")
    assert result.exit_code == (2 if name.startswith("invalid") else 0), result.output
    check_golden(f"{name}.json", result.stdout)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_table(run, name):
    result = run(*CASES[name])
    assert result.exit_code == (2 if name.startswith("invalid") else 0), result.output
    check_golden(f"{name}.txt", result.stdout + ("--- stderr ---\n" + result.stderr if result.stderr else ""))


def test_table_fits_in_100_columns(run):
    for name, args in CASES.items():
        out = run(*args).stdout
        assert max((len(line.rstrip()) for line in out.splitlines()), default=0) <= WIDTH, name
        # a table cell that wrapped would leave a row without its model name
        rows = [line for line in out.splitlines() if line.startswith("│")]
        assert all(line.split("│")[1].strip() for line in rows), name


# ----- JSON contract through the CLI ----------------------------------------------------------------


def test_seed_example_reports_256_overlay_nodes(run):
    result = run(*SEED, "-o", "json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 0 and doc["valid"] is True and doc["overlay"]["max_nodes"] == 256
    assert set(doc) == {"valid", "errors", "warnings", "overlay", "flat", "kubenet"}


def test_json_fits_only_with_nodes(run):
    with_nodes = json.loads(run(*OVERLAY, "--nodes", "100", "-o", "json").stdout)
    without = json.loads(run(*OVERLAY, "-o", "json").stdout)
    assert with_nodes["fits"] == {"overlay": True, "flat": True, "kubenet": True}
    assert "fits" not in without


def test_json_errors_name_the_field_without_dashes(run):
    result = run("--pod-cidr", "abc", "--dns-service-ip", "fd00::1", "--service-cidr", "10.0.0.0/16", "-o", "json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 2 and doc["valid"] is False
    assert {e["field"] for e in doc["errors"]} == {"network-plugin", "pod-cidr", "dns-service-ip"}
    assert result.stderr == ""


# ----- errors on the terminal ---------------------------------------------------------------------------


def test_overlap_error_names_both_flags_and_ranges(run):
    result = run(*OVERLAY, "--pod-cidr", "10.224.128.0/17")
    assert result.exit_code == 2 and result.stdout == ""
    assert "error: --pod-cidr 10.224.128.0/17 overlaps --vnet-cidr 10.224.0.0/12" in flat(result.stderr)


def test_every_error_is_printed_once(run):
    result = run(*OVERLAY, "--pod-cidr", "10.244.1.0/16", "--max-pods", "5", "--vni", "0")
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 3 and result.exit_code == 2
    assert "did you mean 10.244.0.0/16?" in flat(result.stderr)
    assert "--pod-cidr: --pod-cidr" not in result.stderr


def test_warning_is_printed_and_exit_is_zero(run):
    result = run(*OVERLAY, "--pod-cidr", "20.0.0.0/16")
    assert result.exit_code == 0 and "warning: --pod-cidr 20.0.0.0/16" in flat(result.stderr)


def test_markup_in_input_is_printed_literally(run):
    result = run(*OVERLAY, "--pod-cidr", "[red]x")
    assert result.exit_code == 2 and "'[red]x'" in result.stderr


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--nodes", "0"], "--nodes"),
        (["--nodes", "many"], "--nodes"),
        (["--output", "yaml"], "--output"),
        (["--bogus"], "--bogus"),
    ],
)
def test_usage_errors_exit_2(run, args, fragment):
    result = run(*args)
    assert result.exit_code == 2
    assert fragment in flat(result.output)


def test_short_output_option(run):
    assert json.loads(run("-o", "json").stdout)["valid"] is True


NETWORK_FLAGS = [
    "--network-plugin", "--network-plugin-mode", "--vnet-cidr", "--node-subnet-cidr", "--pod-cidr",
    "--service-cidr", "--dns-service-ip", "--max-pods", "--node-cidr-size", "--backend", "--vni",
    "--vxlan-port", "--mtu", "--non-masquerade-cidrs",
    "--ip-families", "--vnet-cidrs", "--node-subnet-cidrs", "--pod-cidrs", "--service-cidrs", "--node-cidr-size-v6",
]
FLAG_VALUES = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=20),
    st.from_regex(r"\A[0-9]{1,3}(\.[0-9]{1,3}){3}(/[0-9]{1,2})?\Z"),
    st.sampled_from(["azure", "kubenet", "overlay", "vxlan", "auto", "250", "24", "fd00::/64", "ipv4,ipv6", "80",
                     "10.244.0.0/16,fd12:3456:789a::/64", "10.0.0.0/16,fd12:3456:789a:1::/108"]),
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(NETWORK_FLAGS), FLAG_VALUES, max_size=6), st.sampled_from(["table", "json"]))
def test_any_flag_values_exit_0_or_2_without_exception(flags, output):
    args = [x for flag, value in flags.items() for x in (flag, value)]
    result = CliRunner().invoke(make_app(), ["plan", *args, "--output", output])
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if output == "json" and (result.exit_code == 0 or result.stdout):  # a usage error prints no JSON
        doc = json.loads(result.stdout)
        assert doc["valid"] == (result.exit_code == 0)


# ----- --file ---------------------------------------------------------------------------------------------


def test_file_values_are_used(run, tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text("network-plugin: azure\nnetwork-plugin-mode: overlay\npod-cidr: 10.244.0.0/15\n")
    doc = json.loads(run("--file", str(path), "-o", "json").stdout)
    assert doc["overlay"]["max_nodes"] == 512


def test_flags_override_the_file(run, tmp_path):
    path = tmp_path / "net.json"
    path.write_text(json.dumps({"network_plugin": "azure", "network_plugin_mode": "overlay", "pod_cidr": "10.244.0.0/15"}))
    doc = json.loads(run("-f", str(path), "--pod-cidr", "10.244.0.0/17", "-o", "json").stdout)
    assert doc["overlay"]["max_nodes"] == 128


def test_file_errors_are_configuration_errors(run, tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text("pod-cidr: [\n")
    result = run("--file", str(path), "-o", "json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 2 and doc["errors"][0]["field"] == "file"
    missing = run("--file", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 2 and "cannot read it" in flat(missing.stderr)


def test_invalid_values_in_the_file_name_their_field(run, tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text("network-plugin: azure\nnetwork-plugin-mode: overlay\nmax-pods: 400\ncolour: blue\n")
    doc = json.loads(run("--file", str(path), "-o", "json").stdout)
    assert {e["field"] for e in doc["errors"]} == {"max-pods", "colour"}


# ----- the installed binary ----------------------------------------------------------------------------------


def run_binary(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in COLOUR_ENV}
    env.update(COLUMNS=str(WIDTH), NO_COLOR="1")
    return subprocess.run([str(BINARY), *args], capture_output=True, text=True, env=env, timeout=60)


def test_binary_seed_example_matches_the_golden_table():
    proc = run_binary("plan", *SEED)
    assert proc.returncode == 0, proc.stderr
    check_golden("seed.txt", proc.stdout)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["plan", "--pod-cidr", "abc"], "--pod-cidr 'abc' is not a valid CIDR"),
        (["plan", *OVERLAY, "--pod-cidr", "10.244.0.0/33"], "IPv4 allows /0 to /32"),
        (["plan", *OVERLAY, "--dns-service-ip", "fd00::a", "--service-cidr", "10.0.0.0/16"], "is IPv6"),
        (["plan", "--nodes", "x"], "--nodes"),
        (["plan", "--no-such-flag"], "--no-such-flag"),
        (["plan", "--file", "/nonexistent/net.yaml"], "cannot read it"),
    ],
)
def test_binary_bad_input_exits_2_without_traceback(args, fragment):
    proc = run_binary(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert fragment in flat(proc.stderr)


def test_binary_json_on_invalid_input():
    proc = run_binary("plan", "--pod-cidr", "abc", "--output", "json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 2 and doc["valid"] is False and "Traceback" not in proc.stderr
