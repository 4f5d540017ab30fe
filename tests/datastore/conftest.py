"""The ``store_url`` / ``store`` fixtures: every datastore test runs on every
backend: sqlite in a temp dir, etcd over HTTP and etcd over TLS with a
client certificate (tests/fixtures_etcd.py). For ``etcds`` the client
certificate comes from the ``OVERLAYCNI_ETCD_*`` environment, as an agent
started by systemd would take it."""

from __future__ import annotations

import pytest

from overlaycni.datastore import open_datastore
from overlaycni.datastore.tls import ENV_CA, ENV_CERT, ENV_KEY


@pytest.fixture(
    params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd), pytest.param("etcds", marks=pytest.mark.etcd)]
)
def store_url(request, tmp_path, monkeypatch) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/state.db"
    if request.param == "etcds":
        server = request.getfixturevalue("etcd_tls_server")
        creds = server.credentials
        monkeypatch.setenv(ENV_CA, creds.ca)
        monkeypatch.setenv(ENV_CERT, creds.cert)
        monkeypatch.setenv(ENV_KEY, creds.key)
        return request.getfixturevalue("etcd_tls_url")
    return request.getfixturevalue("etcd_url")


@pytest.fixture
def store(store_url):
    s = open_datastore(store_url)
    yield s
    s.close()
