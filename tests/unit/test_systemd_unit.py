"""deploy/overlaycni-agent.service works as written (issue 10 item 11).

The unit is parsed here and its command lines are run through the real CLI
the way systemd would run them: Environment= lines with their specifiers
expanded, then /etc/default/overlaycni (deploy/overlaycni.default) read as
plain KEY=VALUE pairs overriding them, ``${VAR}`` words replaced; the agent
and install-cni themselves are stubbed at their entry points, so what is
checked is the options they would get. Every path the unit names must be
one the agent really uses (its defaults, read from the code), and
``systemd-analyze verify`` must accept the unit (when it is installed).
systemd is not PID 1 on the machines the tests run on: the sandbox itself
(ProtectSystem=, the capability bounding set) is not exercised here; the
capability set was found by running the agent under ``setpriv
--bounding-set`` in a lab (README, "Running the agent under systemd").
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from overlaycni.cli import agent as cli_agent
from overlaycni.cli.common import _DATASTORE_OPTIONS
from overlaycni.cli.main import app
from overlaycni.dataplane.linux.wireguard import DEFAULT_SOCKET_DIR
from overlaycni.datastore.base import DEFAULT_SQLITE_PATH

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "overlaycni-agent.service"
DEFAULTS = DEPLOY / "overlaycni.default"
INSTALL_DIR = "/opt/overlaycni"  # where the README installs overlaycni


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> [(key, value)] in order (systemd allows a key twice)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a unit line: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def one(section: list[tuple[str, str]], key: str) -> str:
    (v,) = values(section, key)
    return v


def parse_env_file(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, line
            env[key] = value
    return env


def expand_specifiers(value: str) -> str:
    """The specifiers systemd expands on Environment=/Exec lines; the unit
    may use only %H (host name) and %% here."""
    def sub(m: re.Match[str]) -> str:
        if m.group(1) == "H":
            return socket.gethostname()
        if m.group(1) == "%":
            return "%"
        raise AssertionError(f"specifier %{m.group(1)} is not one this test knows")

    return re.sub(r"%(.)", sub, value)


def service_env(service: list[tuple[str, str]], env_file: str) -> dict[str, str]:
    """The environment systemd gives the service: Environment= first, the
    EnvironmentFile= values override (systemd.exec(5))."""
    env: dict[str, str] = {}
    for assignment in values(service, "Environment"):
        key, _, value = expand_specifiers(assignment).partition("=")
        env[key] = value
    env.update(parse_env_file(env_file))
    return env


def command(line: str, env: dict[str, str]) -> list[str]:
    """An Exec line as argv: prefix characters off, ``${VAR}`` words replaced."""
    line = line.lstrip("-+!@:")
    assert '"' not in line and "'" not in line, "keep Exec lines free of quoting (this parser does not do it)"
    argv = []
    for word in expand_specifiers(line).split():
        m = re.fullmatch(r"\$\{(\w+)\}", word)
        if m:
            assert m.group(1) in env, f"{m.group(1)} is set neither by Environment= nor in {DEFAULTS.name}"
            word = env[m.group(1)]
        assert "$" not in word, word
        argv.append(word)
    return argv


@pytest.fixture
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT.read_text())


def _run_agent(monkeypatch, argv: list[str], env: dict[str, str]):
    import overlaycni.agent.daemon as daemon

    seen = []
    monkeypatch.setattr(daemon, "run_agent", lambda opts: seen.append(opts) or 0)
    for k in list(os.environ):
        if k.startswith("OVERLAYCNI_"):
            monkeypatch.delenv(k)
    assert argv[0] == f"{INSTALL_DIR}/.venv/bin/overlaycni"
    result = CliRunner().invoke(app, argv[1:], env=env)
    assert result.exit_code == 0, result.output
    (opts,) = seen
    return opts


def test_the_node_name_is_the_host_name_unless_the_file_sets_one(unit, monkeypatch):
    service = unit["Service"]
    env_text = DEFAULTS.read_text()
    # systemd would not expand a specifier there: the "%H" node name this replaces
    assert not [v for v in parse_env_file(env_text).values() if "%" in v]
    assert not [v for v in parse_env_file(env_text + "#X=%H\n").values() if "%" in v]
    assert [v for v in parse_env_file("OVERLAYCNI_NODE=%H\n").values() if "%" in v]  # control: the old file's line is caught
    env = service_env(service, env_text)
    opts = _run_agent(monkeypatch, command(one(service, "ExecStart"), env), env)
    assert opts.node == socket.gethostname() and opts.node != "%H"
    assert (opts.cluster, str(opts.node_ip)) == ("prod", "10.224.0.10")
    assert opts.datastore == env["OVERLAYCNI_DATASTORE"] and opts.etcd.cert == "/etc/overlaycni/pki/node.crt"
    assert opts.socket == cli_agent.DEFAULT_SOCKET and opts.metrics_addr == "127.0.0.1:9161"
    # an OVERLAYCNI_NODE in the file wins over the host name
    env = service_env(service, env_text + "OVERLAYCNI_NODE=node-7\n")
    assert _run_agent(monkeypatch, command(one(service, "ExecStart"), env), env).node == "node-7"


def test_install_cni_runs_with_the_agents_socket(unit, monkeypatch):
    service = unit["Service"]
    env = service_env(service, DEFAULTS.read_text())
    (pre,) = values(service, "ExecStartPre")
    seen = []

    def fake_install(**kw):
        seen.append(kw)
        return SimpleNamespace(plugin="p", conflist="c", config={}, shim="python", shim_reason="test")

    monkeypatch.setattr(cli_agent, "install_cni", fake_install)
    result = CliRunner().invoke(app, command(pre, env)[1:], env=env)
    assert result.exit_code == 0, result.output
    (kw,) = seen
    assert kw["cluster"] == "prod" and kw["socket"] == cli_agent.DEFAULT_SOCKET
    assert (kw["bin_dir"], kw["conf_dir"]) == _install_defaults()


def _install_defaults() -> tuple[str, str]:
    params = inspect.signature(cli_agent.install_cni_cmd).parameters
    return params["bin_dir"].default, params["conf_dir"].default


def _run(path: str) -> str:
    return "/run/" + path.removeprefix("/var/run/").removeprefix("/run/")


def _agent_default(name: str) -> str:
    return inspect.signature(cli_agent.agent).parameters[name].default


def test_every_path_the_unit_names_is_one_the_agent_uses(unit):
    service = unit["Service"]
    state_dir = os.path.dirname(DEFAULT_SQLITE_PATH)
    assert os.path.dirname(_agent_default("wireguard_key")) == state_dir
    used = {
        f"{INSTALL_DIR}/.venv/bin/overlaycni", f"{INSTALL_DIR}/README.md", "/etc/default/overlaycni",
        cli_agent.DEFAULT_SOCKET, os.path.dirname(cli_agent.DEFAULT_SOCKET), state_dir,
        _run(DEFAULT_SOCKET_DIR), *_install_defaults(),
    }  # fmt: skip
    named = {
        p for section in unit.values() for _, v in section for p in re.findall(r"(?<![\w./])/[\w./-]+", v.replace("file://", ""))
    }
    assert named <= used, named - used
    assert {"/run/" + d for d in one(service, "RuntimeDirectory").split()} == {
        os.path.dirname(cli_agent.DEFAULT_SOCKET), _run(DEFAULT_SOCKET_DIR)
    }
    assert "/var/lib/" + one(service, "StateDirectory") == state_dir
    assert set(one(service, "ReadWritePaths").split()) == {state_dir, "/run/overlaycni", _run(DEFAULT_SOCKET_DIR)}
    # every variable the unit or the example file names is one overlaycni reads
    exec_vars = set(re.findall(r"\$\{(\w+)\}", UNIT.read_text()))
    env_keys = set(re.findall(r"^#?(OVERLAYCNI_\w+)=", DEFAULTS.read_text(), flags=re.M))
    read_by_cli = {env for _, _, env, _ in _DATASTORE_OPTIONS}
    assert exec_vars <= env_keys | {k.partition("=")[0] for k in values(service, "Environment")}
    assert env_keys - exec_vars <= read_by_cli, env_keys - exec_vars - read_by_cli


def test_hardening(unit):
    service = unit["Service"]
    expected = {
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
        "LockPersonality": "yes", "RestrictRealtime": "yes", "SystemCallArchitectures": "native",
        "KillMode": "process", "StateDirectoryMode": "0700", "RuntimeDirectoryMode": "0700",
    }  # fmt: skip
    assert {k: one(service, k) for k in expected} == expected
    assert set(one(service, "CapabilityBoundingSet").split()) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"}
    assert set(one(service, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"}
    for key in ("EnvironmentFile",):  # systemd reads these files verbatim: no specifier may hide in them
        assert "%" not in one(service, key)


def test_systemd_waits_for_the_agents_own_stop_bound(unit):
    from overlaycni.agent import stopping

    bound = stopping.STOP_SECONDS + stopping.REVOKE_SECONDS  # the agent's stop, before it closes its handles
    assert 2 * bound <= int(one(unit["Service"], "TimeoutStopSec")) <= 30  # margin for load; a hung agent is killed


def _verify(unit_text: str, tmp_path: Path) -> str:
    """``systemd-analyze verify`` in a throwaway root holding the unit, a
    stand-in for the overlaycni executable and the system's own units;
    returns what it printed (nothing when the unit is clean)."""
    root = tmp_path / "root"
    exe = root / INSTALL_DIR.lstrip("/") / ".venv/bin/overlaycni"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    target = root / "etc/systemd/system" / UNIT.name
    target.parent.mkdir(parents=True)
    target.write_text(unit_text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "--man=no", str(target)], capture_output=True, text=True, timeout=60
    )
    return (proc.stdout + proc.stderr).strip() + ("" if proc.returncode == 0 else f"\nexit {proc.returncode}")


@pytest.mark.skipif(
    not shutil.which("systemd-analyze") or not Path("/usr/lib/systemd/system").is_dir(), reason="systemd-analyze not installed"
)
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    assert _verify(UNIT.read_text(), tmp_path / "good") == ""
    # control: the same check notices a broken directive
    broken = UNIT.read_text().replace("KillMode=process", "KillMode=bogus")
    assert "kill mode" in _verify(broken, tmp_path / "bad")
