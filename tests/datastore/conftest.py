"""The ``store_url`` / ``store`` fixtures: every datastore test runs on both
backends (sqlite in a temp dir; etcd from tests/fixtures_etcd.py)."""

from __future__ import annotations

import pytest

from overlaycni.datastore import open_datastore


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/state.db"
    return request.getfixturevalue("etcd_url")


@pytest.fixture
def store(store_url):
    s = open_datastore(store_url)
    yield s
    s.close()
