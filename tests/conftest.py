"""Shared test configuration. Kernel and lab tests need root (CI runs as
root); without it they are skipped with a clear reason."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces); CI runs as root")
    for item in items:
        if "kernel" in item.keywords or "lab" in item.keywords:
            item.add_marker(skip)


# etcd fixtures (etcd_server, etcd_url, etcd_cluster3) for every test package.
pytest_plugins = ["tests.fixtures_etcd"]


def _root_namespace_footprint() -> tuple[str, str]:
    """What of ours could leak into the host's root namespace."""
    import subprocess

    def out(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    tables = "\n".join(line for line in out("nft", "list", "tables").splitlines() if "overlaycni" in line)
    routes = "\n".join(
        line for line in out("ip", "-4", "route", "show").splitlines() if line.startswith(("10.244.", "10.224.", "203.0.113."))
    )
    return tables, routes


@pytest.fixture(scope="session", autouse=True)
def root_namespace_stays_clean():
    """Network safety net: nothing a test does may configure the root
    namespace. Fails the run if an overlaycni table or a lab route appears."""
    if os.geteuid() != 0:
        yield
        return
    before = _root_namespace_footprint()
    yield
    after = _root_namespace_footprint()
    assert after == before, f"tests left state in the root namespace: {after}"
