"""The agent loads only the pyroute2 modules it uses (``agent.imports``); each case in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("pyroute2")


def run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_lean_package_gives_the_same_classes_without_the_rest():
    out = run(
        "import sys\n"
        "from overlaycni.agent.imports import lean_pyroute2\n"
        "assert lean_pyroute2()\n"
        "from pyroute2 import IPRoute, NetNS, WireGuard\n"
        "from pyroute2.netlink.exceptions import NetlinkError\n"
        "import pyroute2, pyroute2.iproute, pyroute2.netlink.generic.wireguard as wg\n"
        "assert IPRoute is pyroute2.iproute.IPRoute and NetNS is pyroute2.iproute.NetNS and WireGuard is wg.WireGuard\n"
        "assert pyroute2.NetlinkError is NetlinkError\n"
        "import overlaycni.dataplane.linux\n"
        "print('pyroute2.ndb' in sys.modules, 'pyroute2.ipdb' in sys.modules)\n"
    )
    assert out == "False False"


def test_control_a_plain_import_loads_everything():
    assert run("import sys, pyroute2\nprint('pyroute2.ndb' in sys.modules)") == "True"


def test_any_other_name_loads_the_whole_package():
    out = run(
        "import sys\n"
        "from overlaycni.agent.imports import lean_pyroute2\n"
        "assert lean_pyroute2()\n"
        "import pyroute2\n"
        "from pyroute2 import IPSet\n"  # not in the lean set: the package's own __init__ runs
        "print(IPSet.__module__, 'pyroute2.ndb' in sys.modules)\n"
        "try:\n"
        "    pyroute2.NoSuchThing\n"
        "except AttributeError as exc:\n"
        "    print('AttributeError', exc)\n"
    )
    first, second = out.splitlines()
    assert first.endswith(" True") and first.startswith("pyroute2.ipset")
    assert second == "AttributeError module 'pyroute2' has no attribute 'NoSuchThing'"


def test_nothing_changes_when_pyroute2_is_already_imported():
    assert run("import pyroute2\nfrom overlaycni.agent.imports import lean_pyroute2\nprint(lean_pyroute2())") == "False"
