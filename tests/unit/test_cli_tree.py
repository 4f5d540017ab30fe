"""The console script builds the agent's commands alone for ``overlaycni
agent`` / ``install-cni`` (what the other groups import stays out of a
long-running agent), and the whole tree for everything else."""

from __future__ import annotations

import subprocess
import sys

import pytest

from overlaycni.cli.main import AGENT_COMMANDS, command_of

PROBE = """
import sys
from overlaycni.cli import main
tree = main.build({groups})
heavy = sorted(m for m in ("overlaycni.cli.lab", "overlaycni.cli.policy", "overlaycni.lab", "cryptography", "yaml")
               if m in sys.modules)
print(",".join(heavy) or "-")
"""


@pytest.mark.parametrize(("argv", "command"), [
    (["agent", "--cluster", "c"], "agent"),
    (["--datastore", "sqlite:///x.db", "agent", "--node", "n"], "agent"),
    (["--datastore=sqlite:///x.db", "--etcd-ca", "/ca.pem", "install-cni", "--cluster", "c"], "install-cni"),
    (["--", "agent"], "agent"),
    (["--datastore", "agent"], None),  # "agent" is the option's value here
    (["lab", "up"], "lab"),
    (["--help"], None),
    ([], None),
])
def test_command_of(argv, command):
    assert command_of(argv) == command


def _heavy(groups: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE.format(groups=groups)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_agents_tree_leaves_the_other_groups_out():
    assert _heavy("('agent',)") == "-"
    assert _heavy("") != "-"  # control: the whole tree imports them


def test_the_agent_commands_keep_their_help():
    for command in AGENT_COMMANDS:
        out = subprocess.run([sys.executable, "-m", "overlaycni.cli.main", command, "--help"], capture_output=True,
                             text=True, check=True)
        assert "Usage:" in out.stdout and command in out.stdout
    out = subprocess.run([sys.executable, "-m", "overlaycni.cli.main", "--help"], capture_output=True, text=True, check=True)
    assert "lab" in out.stdout and "agent" in out.stdout  # the whole tree
