"""``build(groups)``, the eager tree, holds only the groups asked for (what
the other groups import stays out); the console script's lazy tree is
tested in test_cli_lazy.py."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from overlaycni.cli import main
tree = main.build({groups})
heavy = sorted(m for m in ("overlaycni.cli.lab", "overlaycni.cli.policy", "overlaycni.lab", "cryptography", "yaml")
               if m in sys.modules)
print(",".join(heavy) or "-")
"""


def _heavy(groups: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE.format(groups=groups)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_agents_tree_leaves_the_other_groups_out():
    assert _heavy("('agent',)") == "-"
    assert _heavy("") != "-"  # control: the whole tree imports them


def test_the_agent_commands_keep_their_help():
    for command in ("agent", "install-cni"):
        out = subprocess.run([sys.executable, "-m", "overlaycni.cli.main", command, "--help"], capture_output=True,
                             text=True, check=True)
        assert "Usage:" in out.stdout and command in out.stdout
    out = subprocess.run([sys.executable, "-m", "overlaycni.cli.main", "--help"], capture_output=True, text=True, check=True)
    assert "lab" in out.stdout and "agent" in out.stdout  # the whole tree
