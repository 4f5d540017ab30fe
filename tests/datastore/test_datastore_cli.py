"""``overlaycni datastore`` on every backend (issue 10 item 15): SQLite, etcd
over HTTP and etcd over TLS (tests/fixtures_etcd.py, on loopback). Results
are read back through a separate ``open_datastore``, not through the CLI.
``--lab`` is tested on a running lab in tests/lab/test_lab_faults.py."""

from __future__ import annotations

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from overlaycni.cli.main import app
from overlaycni.datastore import backup as bk
from overlaycni.datastore import open_datastore

ROOT = "/overlaycni/"
CFG = "/overlaycni/clusters/c1/config"


def oc(url: str, *args: str, input: str | None = None):
    return CliRunner().invoke(app, ["--datastore", url, "datastore", *args], input=input, env={"COLUMNS": "1000"})


def contents(url: str, prefix: str = "/") -> dict[str, str]:
    with open_datastore(url) as store:
        return {kv.key: kv.value for kv in store.read(prefixes=[prefix]).kvs}


def test_put_get_delete_round_trip(store_url):
    r = oc(store_url, "put", CFG, '{"a": 1}')
    assert r.exit_code == 0 and "put " + CFG in r.output, r.output
    r = oc(store_url, "put", "/overlaycni/clusters/c1/pods/x/a", "-", input='{"labels": {"app": "web"}}\n')
    assert r.exit_code == 0, r.output
    assert contents(store_url) == {CFG: '{"a": 1}', "/overlaycni/clusters/c1/pods/x/a": '{"labels": {"app": "web"}}\n'}
    # get: a list of {key, value}, exactly
    r = oc(store_url, "get", CFG, "-o", "json")
    assert r.exit_code == 0 and json.loads(r.output) == [{"key": CFG, "value": '{"a": 1}'}]
    r = oc(store_url, "get", "/overlaycni/clusters/c1/", "--prefix", "-o", "json")
    assert [d["key"] for d in json.loads(r.output)] == [CFG, "/overlaycni/clusters/c1/pods/x/a"]
    assert set(json.loads(r.output)[0]) == {"key", "value"}
    r = oc(store_url, "get", "/overlaycni/clusters/c1/", "--prefix")
    assert r.exit_code == 0 and "2 key(s)" in r.output and CFG in r.output
    assert json.loads(oc(store_url, "get", "/nothing/", "--prefix", "-o", "json").output) == []
    r = oc(store_url, "get", "/overlaycni/clusters/c1/nope")
    assert r.exit_code == 2 and "/overlaycni/clusters/c1/nope does not exist" in r.output
    # delete one key, then a prefix
    r = oc(store_url, "delete", CFG)
    assert r.exit_code == 0 and "deleted 1 key(s)" in r.output
    r = oc(store_url, "delete", CFG)
    assert r.exit_code == 2 and "does not exist; nothing deleted" in r.output
    r = oc(store_url, "delete", "/overlaycni/clusters/c1/pods/", "--prefix")
    assert r.exit_code == 0 and "deleted 1 key(s)" in r.output
    assert contents(store_url) == {}


@pytest.mark.parametrize("prefix", ["/", "/overlaycni", "/overlaycni/", "/overlaycni/clusters/"])
def test_deleting_everything_needs_force(store_url, prefix):
    oc(store_url, "put", CFG, "{}")
    r = oc(store_url, "delete", prefix, "--prefix")
    assert r.exit_code == 2 and "takes in every cluster's keys; give --force" in r.output
    assert contents(store_url) == {CFG: "{}"}
    # control: a narrower prefix needs nothing, and --force does what it says
    assert oc(store_url, "delete", "/overlaycni/clusters/c2/", "--prefix").exit_code == 0
    r = oc(store_url, "delete", prefix, "--prefix", "--force")
    assert r.exit_code == 0 and "deleted 1 key(s)" in r.output and contents(store_url) == {}


def test_empty_key_is_refused(store_url):
    for args in (["get", ""], ["put", "", "v"], ["delete", "", "--prefix", "--force"]):
        r = oc(store_url, *args)
        assert r.exit_code == 2 and "KEY: must not be empty" in r.output and "Traceback" not in r.output


def _populate(url: str) -> int:
    """A cluster's worth of keys, one of them under a lease (a node record)."""
    with open_datastore(url) as store:
        store.put(CFG, '{"pod-cidr": "10.244.0.0/16"}')
        store.put("/overlaycni/index/clusters/c1", "")
        for i in range(150):  # more than one restore chunk and than etcd's 128 operations per txn
            store.put(f"/overlaycni/clusters/c1/handles/c{i:03d}/eth0", json.dumps({"ip": f"10.244.0.{i + 2}"}))
        lease = store.grant_lease(60)
        store.put("/overlaycni/clusters/c1/nodes/node1", '{"ip": "10.224.0.4"}', lease=lease)
        return lease


def test_backup_then_restore_gives_the_same_keys(store_url, tmp_path):
    _populate(store_url)
    before = contents(store_url, ROOT)
    with open_datastore(store_url) as store:
        rev = store.revision()
    f = tmp_path / "b.json"
    r = oc(store_url, "backup", str(f))
    assert r.exit_code == 0 and f"backed up 153 key(s) at revision {rev}" in r.output and "1 under a lease" in r.output
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    doc = json.loads(f.read_text())
    assert (doc["format"], doc["version"], doc["revision"], doc["prefix"]) == (bk.FORMAT, 1, rev, ROOT)
    assert {e["key"]: e["value"] for e in doc["keys"]} == before
    assert [e["key"] for e in doc["keys"] if e["leased"]] == ["/overlaycni/clusters/c1/nodes/node1"]
    # into an empty store
    with open_datastore(store_url) as store:
        store.delete_prefix(ROOT)
    r = oc(store_url, "restore", str(f), "-o", "json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert (rep["from_revision"], rep["written"], rep["deleted"], rep["skipped_leased"]) == (rev, 152, 0, 1)
    after = contents(store_url, ROOT)
    del before["/overlaycni/clusters/c1/nodes/node1"]  # leases are not restored: the agent re-registers
    assert after == before
    with open_datastore(store_url) as store:
        assert all(kv.lease is None for kv in store.read(prefixes=[ROOT]).kvs)
    # a backup of the restored store holds the same keys and values
    g = tmp_path / "g.json"
    assert oc(store_url, "backup", str(g)).exit_code == 0
    assert {e["key"]: e["value"] for e in json.loads(g.read_text())["keys"]} == before


def test_restore_into_a_store_with_keys_needs_force(store_url, tmp_path):
    _populate(store_url)
    f = tmp_path / "b.json"
    assert oc(store_url, "backup", str(f)).exit_code == 0
    with open_datastore(store_url) as store:
        store.put(CFG, '{"changed": true}')
        store.put("/overlaycni/clusters/c1/handles/zzz/eth0", "{}")  # not in the backup
        store.delete("/overlaycni/clusters/c1/handles/c007/eth0")
    changed = contents(store_url, ROOT)
    r = oc(store_url, "restore", str(f))
    assert r.exit_code == 2 and "already holds 153 key(s)" in r.output and "--force" in r.output
    assert contents(store_url, ROOT) == changed  # nothing written
    r = oc(store_url, "restore", str(f), "--force", "-o", "json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert (rep["written"], rep["unchanged"], rep["deleted"], rep["skipped_leased"]) == (2, 150, 1, 1)
    after = contents(store_url, ROOT)
    saved = {e["key"]: e["value"] for e in json.loads(f.read_text())["keys"]}
    assert after == saved  # the live node record (under its lease) stayed as it was
    assert oc(store_url, "restore", str(f), "--force", "-o", "json").exit_code == 0  # idempotent


def test_backup_refuses_to_overwrite_and_restore_refuses_bad_files(store_url, tmp_path):
    f = tmp_path / "b.json"
    f.write_text("precious")
    r = oc(store_url, "backup", str(f))
    assert r.exit_code == 2 and "exists; give --force" in r.output and f.read_text() == "precious"
    assert oc(store_url, "backup", str(f), "--force").exit_code == 0 and json.loads(f.read_text())["format"] == bk.FORMAT
    good = json.loads(f.read_text())
    cases = [
        ("not json", "is not JSON"),
        (json.dumps({**good, "format": "x"}), "format: expected 'overlaycni-datastore-backup'"),
        (json.dumps({**good, "version": 9}), "version: 9: this overlaycni reads version 1"),
        (json.dumps({**good, "keys": [{"key": "/etc/passwd", "value": "x"}]}), "keys[0].key: '/etc/passwd' is not a key under /overlaycni/"),
        (json.dumps({**good, "keys": [{"key": CFG, "value": 1}]}), "keys[0].value: expected a string"),
        (json.dumps({**good, "keys": [{"key": CFG, "value": "a"}, {"key": CFG, "value": "b"}]}), "appears twice"),
    ]
    for text, words in cases:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        r = oc(store_url, "restore", str(bad))
        assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, (words, r.output)
    assert contents(store_url) == {}
    r = oc(store_url, "restore", str(tmp_path / "missing.json"))
    assert r.exit_code == 2 and "cannot read" in r.output
