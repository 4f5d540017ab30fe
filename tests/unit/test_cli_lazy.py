"""The lazy command line (cli/main.py, cli/coerce.py): ``overlaycni --help``
and ``overlaycni GROUP --help`` import none of the libraries the commands
run on; a light command imports what it uses and not pydantic; the lazy
root lists the commands of the eager tree with the same help, word for
word; a plain coercion gives what typer's own gives."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import typer
import typer.main
from bench.cli import serve_status
from typer.testing import CliRunner

from overlaycni.cli import coerce, main
from overlaycni.cli.main import LAZY_COMMANDS, LazyCommand, build

# What a help page or a light command has no use for: the command modules'
# libraries, and third-party packages the CLI only needs for some commands.
HEAVY = (
    "overlaycni.ipam", "overlaycni.lab", "overlaycni.policy", "overlaycni.dataplane", "overlaycni.agent",
    "overlaycni.config", "overlaycni.plan", "overlaycni.datastore",
    "pydantic", "yaml", "cryptography", "pyroute2", "etcd3gw", "sqlite3",
)  # fmt: skip

# argv, then the heavy modules it may import (the datastore group's help
# quotes the backup format and the key root: overlaycni.datastore)
PROBE = """
import contextlib, io, json, sys
mode, argv, heavy = sys.argv[1], json.loads(sys.argv[2]), tuple(json.loads(sys.argv[3]))
if mode == "typer-coercion":  # control: typer's own coercion, as if cli.coerce were not installed
    from typer.core import _TyperParameter
    original = _TyperParameter.get_runtime_param
from overlaycni.cli import main
if mode == "typer-coercion":
    _TyperParameter.get_runtime_param = original
tree = main.build() if mode == "eager" else main.app
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        tree(argv, prog_name="overlaycni")
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "out": out.getvalue(),
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] in heavy or m.startswith(heavy))}))
"""


def probe(argv: list[str], *, mode: str = "lazy", allowed: tuple[str, ...] = ()) -> dict:
    heavy = [m for m in HEAVY if m not in allowed]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYCNI_")}
    done = subprocess.run([sys.executable, "-c", PROBE, mode, json.dumps(argv), json.dumps(heavy)],
                          capture_output=True, text=True, check=True, env=env)  # fmt: skip
    return json.loads(done.stdout)


HELP_PAGES = [
    ([], ()), (["--help"], ()), *(([name, "--help"], ()) for name in LAZY_COMMANDS if name != "datastore"),
    (["datastore", "--help"], ("overlaycni.datastore",)), (["lab", "pod", "--help"], ()), (["lab", "namespace", "--help"], ()),
    (["ipam", "show", "--help"], ()), (["policy", "apply", "--help"], ()), (["lab", "up", "--help"], ()),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "allowed"), HELP_PAGES, ids=[" ".join(a) or "(none)" for a, _ in HELP_PAGES])
def test_help_pages_import_no_heavy_module(argv, allowed):
    got = probe(argv, allowed=allowed)
    assert got["code"] in ((0, None) if argv else (2,)) and "Usage:" in got["out"]  # no arguments: help, exit 2
    assert got["heavy"] == []


def test_control_the_eager_tree_imports_them():
    assert probe(["--help"], mode="eager")["heavy"] != []
    assert "pydantic" in probe(["ipam", "--help"], mode="typer-coercion")["heavy"]


@pytest.fixture
def agent_socket(tmp_path):
    """A stand-in for the agent's CNI socket: answers AGENT_STATUS (``bench/cli.py``'s)."""
    path = str(tmp_path / "agent.sock")
    srv = serve_status(path, {"ready": True, "node": "n1"})
    yield path
    srv.close()


def test_light_commands_import_what_they_use_only(agent_socket):
    status = probe(["agent", "status", "--socket", agent_socket, "-o", "json"])
    assert status["code"] in (0, None) and json.loads(status["out"]) == {"ready": True, "node": "n1"}
    assert status["heavy"] == []
    plan = probe(["plan", "--output", "json"], allowed=("overlaycni.config", "overlaycni.plan"))
    assert plan["code"] in (0, None) and json.loads(plan["out"])
    assert plan["heavy"] == []
    # the agent's whole argument list is parsed (then --node-ip is refused, before the agent starts)
    agent = probe(["agent", "--cluster", "c", "--node", "n", "--node-ip", "not-an-ip", "--lease-ttl", "20",
                   "--resync-interval", "2.5", "--wireguard-mode", "kernel", "--no-flow-logs", "--flow-log-rate", "50"])
    assert agent["code"] == 2 and agent["heavy"] == []
    # control: typer's own coercion of the same options imports pydantic
    control = probe(["agent", "status", "--socket", agent_socket, "-o", "json"], mode="typer-coercion")
    assert control["code"] in (0, None) and "pydantic" in control["heavy"]


# ----- the table of ``overlaycni --help`` is the eager tree's ------------------------------


def _first_paragraph(command) -> str:
    return inspect.cleandoc(command.short_help or command.help or "").split("\n\n")[0]


def table_mismatches(table: dict[str, LazyCommand]) -> list[str]:
    """How ``table`` differs from the eager tree's top-level commands: names,
    order, help (the paragraph ``--help`` shows), and the modules that define each."""
    eager = typer.main.get_command(build())
    ctx = typer.Context(eager)
    names = eager.list_commands(ctx)
    problems = [f"names {list(table)} != {names}"] if list(table) != names else []
    for name in names:
        command = eager.get_command(ctx, name)
        if name not in table:
            continue
        if _first_paragraph(command) != table[name].help:
            problems.append(f"{name}: help {table[name].help!r} != {_first_paragraph(command)!r}")
        if command.hidden or command.deprecated or getattr(command, "rich_help_panel", None):
            problems.append(f"{name}: hidden, deprecated or in a panel: the table cannot say so")
        sub = typer.Typer()
        for module in table[name].modules:
            main._register(sub, module)
        if name not in typer.main.get_group(sub).commands:
            problems.append(f"{name}: not defined by {table[name].modules}")
    return problems


def test_the_lazy_table_matches_every_real_command():
    assert table_mismatches(LAZY_COMMANDS) == []


def test_control_a_drifted_table_is_caught():
    drifted = dict(LAZY_COMMANDS)
    drifted["ipam"] = LazyCommand(("ipam",), "Pod IP addresses.")
    drifted["node"] = LazyCommand(("ipam",), LAZY_COMMANDS["node"].help)
    del drifted["certs"]
    problems = table_mismatches(drifted)
    assert any(p.startswith("ipam: help") for p in problems)
    assert any(p.startswith("node: not defined") for p in problems)
    assert any(p.startswith("names") for p in problems)


SAME_AS_EAGER = [
    ["--help"], [], ["ipma"], ["ipam"], ["ipam", "--help"], ["lab", "--help"], ["lab", "pod", "--help"], ["policy", "--help"],
    ["plan", "--help"], ["agent", "--help"], ["install-cni", "--help"], ["certs", "--help"], ["datastore", "--help"],
    ["cluster", "--help"], ["node", "--help"], ["flows", "--help"], ["agent", "status", "-o", "yaml"],
    ["agent", "--lease-ttl", "1"], ["--datastore"], ["plan", "--max-pods", "x"],
]  # fmt: skip


@pytest.mark.parametrize("argv", SAME_AS_EAGER, ids=[" ".join(a) or "(none)" for a in SAME_AS_EAGER])
def test_the_lazy_tree_answers_as_the_eager_one(argv):
    runner = CliRunner()
    lazy, eager = runner.invoke(main.lazy_app(), argv, prog_name="overlaycni"), runner.invoke(build(), argv, prog_name="overlaycni")
    assert (lazy.exit_code, lazy.stdout, lazy.stderr) == (eager.exit_code, eager.stdout, eager.stderr)


def test_control_a_different_table_shows(monkeypatch):
    runner = CliRunner()
    monkeypatch.setitem(LAZY_COMMANDS, "ipam", LazyCommand(("ipam",), "Pod IP addresses."))
    lazy, eager = runner.invoke(main.lazy_app(), ["--help"]), runner.invoke(build(), ["--help"])
    assert lazy.stdout != eager.stdout


def test_lab_lease_ttl_default_is_the_labs():
    from overlaycni.cli.lab import LAB_LEASE_TTL
    from overlaycni.lab.lifecycle import DEFAULT_LEASE_TTL

    assert LAB_LEASE_TTL == DEFAULT_LEASE_TTL


# ----- plain coercion gives what typer's gives -------------------------------------------

SAMPLES = [
    "0", "15", "-3", "015", "+4", " 7", "1_000", "1e3", "2.5", "-0.5", ".5", "5.", "nan", "inf", "abc", "", "-",
    "table", "TABLE", "json", "auto", "kernel", "native", "python", "x", "/nonexistent/file", "/etc/hostname", "/tmp",
    "99999999999999999999", "3600", "3601", "65535", "65536", "1000000", "0.4", "0.5",
]  # fmt: skip


def _params():
    tree = typer.main.get_command(build())
    seen = {}

    def walk(command, path):
        for p in command.params:
            if hasattr(p, "type_descriptor"):
                seen.setdefault(repr((p.type_descriptor.annotation, vars(p.type_descriptor.parameter_info))), (path, command, p))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(tree, "overlaycni")
    return list(seen.values())


def _outcome(coercer, value, param, ctx):
    try:
        got = coercer.coerce(value, param=param, ctx=ctx)
    except Exception as exc:  # the message is what the user reads
        return ("error", type(exc).__name__, getattr(exc, "message", str(exc)))
    return ("value", type(got).__name__, repr(got))


def mismatches(plain_of=coerce._plain) -> list[str]:
    """Every (parameter, sample) where the plain coercion decides and
    decides otherwise than typer's; also the plain coercions never tried."""
    found, tried = [], 0
    for path, command, param in _params():
        plain = plain_of(param.type_descriptor)
        if plain is None:
            continue
        ctx = typer.Context(command)
        ours = coerce.PlainCoercion(param.type_descriptor, plain)
        theirs = ours.typer_coercion()
        values = [*SAMPLES, param.default, [*SAMPLES[:3]], ("a", "b")]
        for value in values:
            if value is None or plain(value, ctx) is coerce._MISS:
                continue
            tried += 1
            if _outcome(ours, value, param, ctx) != _outcome(theirs, value, param, ctx):
                found.append(f"{path} {param.name}={value!r}: {_outcome(ours, value, param, ctx)} != {_outcome(theirs, value, param, ctx)}")
    return found if tried else ["no plain coercion was tried"]


def test_plain_coercion_gives_what_typers_gives():
    assert mismatches() == []


def test_control_a_wrong_plain_coercion_is_caught():
    def wrong(descriptor):
        plain = coerce._plain(descriptor)
        if plain is None or descriptor.annotation is not int:
            return plain
        return lambda value, ctx: str(value)  # ints left as strings

    assert mismatches(wrong) != []


def test_typer_still_coerces_through_get_runtime_param():
    """cli.coerce replaces the one method where typer builds a parameter's
    coercer; a typer that stops calling it fails here (a plain value would
    be coerced by typer's own pydantic path again)."""
    calls = []
    original = coerce._get_runtime_param

    def spy(self):
        calls.append(self.name)
        return original(self)

    from typer.core import _TyperParameter

    _TyperParameter.get_runtime_param = spy
    try:
        CliRunner().invoke(main.lazy_app(), ["plan", "--output", "json"])
    finally:
        _TyperParameter.get_runtime_param = original
    assert "output" in calls



def test_the_lazy_console_serves_rich_as_a_console():
    """The consoles are made on first use; rich's own objects (a progress
    bar, a status spinner, ``with console:``) work on them as on a Console."""
    import io

    from rich.progress import Progress

    from overlaycni.cli.common import _LazyConsole, rich_console

    out = io.StringIO()
    lazy = _LazyConsole(file=out, width=60)
    assert lazy._console is None  # nothing made yet
    with lazy:
        lazy.print("one")
    with lazy.status("working"):
        lazy.print("two")
    with Progress(console=rich_console(lazy), transient=False) as bar:
        bar.add_task("three", total=1, completed=1)
    text = out.getvalue()
    assert "one" in text and "two" in text and "three" in text


def test_shell_completion_answers_as_before():
    """The app offers no completion (add_completion=False): the lazy tree
    answers typer's completion variable as the eager one does."""
    runner = CliRunner()
    env = {"_OVERLAYCNI_COMPLETE": "complete_bash", "COMP_WORDS": "overlaycni ip", "COMP_CWORD": "1"}
    lazy = runner.invoke(main.lazy_app(), [], prog_name="overlaycni", env=env)
    eager = runner.invoke(build(), [], prog_name="overlaycni", env=env)
    assert (lazy.exit_code, lazy.output) == (eager.exit_code, eager.output)
    assert "not supported" in eager.output  # control: the variable is read (no completion offered)
