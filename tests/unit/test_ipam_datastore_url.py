"""Datastore URL parsing and the default."""

from __future__ import annotations

import pytest

from overlaycni.datastore import DEFAULT_URL, open_datastore, parse_url
from overlaycni.datastore.sqlite import SQLiteStore
from overlaycni.errors import DatastoreURLError


def test_sqlite_url():
    assert parse_url("sqlite:///var/lib/overlaycni/state.db") == ("sqlite", "/var/lib/overlaycni/state.db")
    assert DEFAULT_URL == "sqlite:///var/lib/overlaycni/state.db"


def test_etcd_urls():
    assert parse_url("etcd://127.0.0.1:2379") == ("etcd", [("127.0.0.1", 2379)])
    assert parse_url("etcd://a:1,b:2, c:3") == ("etcd", [("a", 1), ("b", 2), ("c", 3)])
    assert parse_url("etcd://[::1]:2379") == ("etcd", [("::1", 2379)])


@pytest.mark.parametrize(
    "url, words",
    [
        ("", "not a datastore URL"),
        ("/var/lib/state.db", "not a datastore URL"),
        ("mysql://x", "unknown scheme"),
        ("sqlite://relative.db", "must be absolute"),
        ("sqlite:///var/lib/", "directory"),
        ("etcd://127.0.0.1", "not host:port"),
        ("etcd://127.0.0.1:notaport", "invalid port"),
        ("etcd://127.0.0.1:70000", "invalid port"),
        ("etcd://a:1,,b:2", "empty endpoint"),
        ("etcd://a:1/path", "only host:port"),
    ],
)
def test_malformed_urls_name_the_problem(url, words):
    with pytest.raises(DatastoreURLError) as info:
        parse_url(url)
    assert words in str(info.value)
    assert "--datastore" in str(info.value)


def test_env_var_chooses_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERLAYCNI_DATASTORE", f"sqlite://{tmp_path}/env.db")
    store = open_datastore(None)
    try:
        assert isinstance(store, SQLiteStore) and store.path == f"{tmp_path}/env.db"
    finally:
        store.close()


def test_a_file_that_is_not_sqlite_is_a_clear_error_without_side_effects(tmp_path):
    from overlaycni.errors import DatastoreError

    text = tmp_path / "notes.txt"
    text.write_text("not a database, just some words that are long enough\n" * 10)
    with pytest.raises(DatastoreError, match="not a database"):
        open_datastore(f"sqlite://{text}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
