"""Shared test configuration. Kernel and lab tests need root (CI runs as
root); without it they are skipped with a clear reason.

Parallel runs (pytest-xdist, ``make test`` runs ``-n 4 --dist loadgroup``; the
groups reach xdist's scheduler through ``pytest_xdist_make_scheduler`` below,
as xdist 3.8's own way does not work with pytest 9):

* A test that uses a module-scoped fixture (a shared lab, a shared set of
  namespaces) is put in its module's xdist group, so the module's shared
  fixture is built once, on one worker. Every other test is scheduled alone.
  A module whose shared-fixture tests are long and independent of each
  other can set ``XDIST_SHARDS = N``: its tests are dealt round-robin (each
  shard keeps the module's order) into N groups, and each group's worker
  builds its own copy of the fixture.
* Work is handed out longest first: tests marked ``heavy`` (one long test,
  or a module whose shared lab holds a minute or more of tests), then by
  directory (lab, kernel, datastore, unit), so the long lab work starts at
  once and the many short unit tests fill the workers at the end. ``--no-loadscope-reorder`` (Makefile) keeps this
  order; xdist's own reorder sorts by test count, not by cost.
* ``@pytest.mark.serial`` marks a test that must not share the machine with
  other tests (it measures a rate, or its assertion depends on the machine
  keeping up). Under xdist those are deselected (``--serial skip``) and
  ``make test`` runs them afterwards in a second, serial pytest
  (``--serial only``); a plain ``pytest`` runs everything.
* The root-namespace guard runs in every worker (the session fixture below)
  and once more in the xdist controller around the whole run.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import pytest

# etcd fixtures (etcd_server, etcd_url, etcd_cluster3) for every test package.
pytest_plugins = ["tests.fixtures_etcd"]

# rich wraps the CLI's messages at the console width, which it takes from COLUMNS or else
# from whichever of stdin/stdout/stderr is a terminal: 80 in an xdist worker (pipes), wider
# in a serial run from a terminal. Tests assert on whole messages (with paths that are longer
# under xdist's popen-gwN/ temp dirs), so every run gets the same, wide console.
os.environ["COLUMNS"] = "200"

_DIR_RANK = {"lab": 0, "kernel": 1, "datastore": 2, "unit": 3}
_SHARED_SCOPES = ("module", "class", "package")


def pytest_addoption(parser):
    parser.addoption(
        "--serial",
        choices=("all", "skip", "only"),
        default="all",
        help="tests marked serial: run them with the rest (all), deselect them (skip: the parallel pass), "
        "or run only them (only: the serial pass after it)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "serial: must not run next to other tests (see tests/conftest.py)")
    config.addinivalue_line("markers", "heavy: a minute or more of work in one test or xdist group: handed out first")
    if _is_xdist_controller(config):
        if os.geteuid() == 0:
            config._ocni_root_before = _root_namespace_footprint()  # type: ignore[attr-defined]
        # where the workers leave their test -> group map (see _GroupMapScheduling); the
        # workers inherit the environment when the controller starts them, after this hook
        fd, path = tempfile.mkstemp(prefix="ocni-xdist-groups-", suffix=".json")
        os.close(fd)
        os.environ[_GROUP_MAP_ENV] = config._ocni_group_map = path  # type: ignore[attr-defined]


def _is_xdist_controller(config) -> bool:
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))


def _rank(item) -> int:
    parts = item.nodeid.split("/")
    return _DIR_RANK.get(parts[1], 4) if len(parts) > 2 and parts[0] == "tests" else 4


# tryfirst: xdist's own hook (--dist loadgroup) reads the xdist_group markers to name each
# test's group; it must see the markers added here.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    mode = config.getoption("--serial")
    if mode != "all":
        keep = [i for i in items if ("serial" in i.keywords) == (mode == "only")]
        if len(keep) != len(items):
            kept = {id(i) for i in keep}
            config.hook.pytest_deselected(items=[i for i in items if id(i) not in kept])
            items[:] = keep
    # Tests marked heavy first, then the heaviest directory first; sorted() is stable,
    # so each directory keeps its order.
    items[:] = sorted(items, key=lambda i: ("heavy" not in i.keywords, _rank(i)))
    shared: dict[str, int] = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info is not None else ()
        if any(fd and fd[-1].scope in _SHARED_SCOPES for fd in defs):
            module = item.nodeid.split("::", 1)[0]
            n = shared[module] = shared.get(module, -1) + 1
            shards = getattr(item.module, "XDIST_SHARDS", 1)
            item.add_marker(pytest.mark.xdist_group(module if shards == 1 else f"{module}#{n % shards}"))
    _write_group_map(config, items)
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces); CI runs as root")
    for item in items:
        if "kernel" in item.keywords or "lab" in item.keywords:
            item.add_marker(skip)


_GROUP_MAP_ENV = "OVERLAYCNI_TEST_XDIST_GROUPS"


def _write_group_map(config, items) -> None:
    """In an xdist worker: write {test id: group} for the controller's scheduler.

    xdist 3.8's own loadgroup appends "@group" to ``item._nodeid``, which pytest 9
    no longer reads (``nodeid`` comes from ``item._id``), so its groups never reach
    the controller and ``--dist loadgroup`` degrades to ``--dist load`` (a shared
    lab built once per worker). Every worker collects the same tests; the last
    writer wins, atomically."""
    path = os.environ.get(_GROUP_MAP_ENV)
    if not path or not hasattr(config, "workerinput"):
        return
    groups = {}
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")})
        if names:
            groups[item.nodeid] = "_".join(names)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(groups, fh)
    os.replace(tmp, path)


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` with the groups the workers wrote (_write_group_map)."""
    if config.getvalue("dist") != "loadgroup" or not getattr(config, "_ocni_group_map", None):
        return None
    from xdist.scheduler import LoadGroupScheduling

    class _GroupMapScheduling(LoadGroupScheduling):
        _groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:  # read once, after every worker has collected
                with open(config._ocni_group_map) as fh:
                    self._groups = json.load(fh)
            group = self._groups.get(nodeid)
            return group if group is not None else super()._split_scope(nodeid)  # an xdist that works alone

    return _GroupMapScheduling(config, log)


# Routes a lab or kernel test could leak: the default pod CIDR, the VNet, the
# "internet" host's range, and the IPv6 ranges of the dual-stack labs and tests
# (the host's own fd00::/64 is not one of them).
_V4_PREFIXES = ("10.244.", "10.224.", "203.0.113.")
_V6_PREFIXES = ("fd12:", "fd00:10:")
_ROOT_SYSCTLS = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding")


def _root_namespace_footprint() -> tuple[str, str, str]:
    """What of ours could leak into the host's root namespace."""
    import subprocess

    def out(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    def sysctl(key: str) -> str:
        try:
            with open(f"/proc/sys/{key}") as fh:
                return f"{key}={fh.read().strip()}"
        except OSError:
            return f"{key}=?"

    tables = "\n".join(line for line in out("nft", "list", "tables").splitlines() if "overlaycni" in line)
    routes = [line for line in out("ip", "-4", "route", "show").splitlines() if line.startswith(_V4_PREFIXES)]
    routes += [line for line in out("ip", "-6", "route", "show").splitlines() if line.startswith(_V6_PREFIXES)]
    return tables, "\n".join(routes), " ".join(sysctl(k) for k in _ROOT_SYSCTLS)


@pytest.fixture(scope="session", autouse=True)
def root_namespace_stays_clean():
    """Network safety net: nothing a test does may configure the root
    namespace. Fails the run if an overlaycni table, a lab route or a
    changed forwarding sysctl appears (in every xdist worker: each checks
    around its own share of the tests)."""
    if os.geteuid() != 0:
        yield
        return
    before = _root_namespace_footprint()
    yield
    after = _root_namespace_footprint()
    assert after == before, f"tests left state in the root namespace: {after}"


def pytest_sessionfinish(session, exitstatus):
    """The xdist controller's own check around the whole run (its workers
    have stopped by now)."""
    group_map = getattr(session.config, "_ocni_group_map", None)
    if group_map:
        with contextlib.suppress(OSError):
            os.unlink(group_map)
    before = getattr(session.config, "_ocni_root_before", None)
    if before is None:
        return
    after = _root_namespace_footprint()
    if after != before:
        session.config.get_terminal_writer().line(f"FAILED: tests left state in the root namespace: {after}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
