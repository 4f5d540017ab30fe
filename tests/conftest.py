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
