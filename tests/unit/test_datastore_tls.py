"""etcd client settings (no etcd needed): which settings each URL needs, the
plain-HTTP warning, and ``TLSFiles`` (checking, rotation, half-written files)."""

from __future__ import annotations

import os
import shutil
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from overlaycni.datastore import parse_url, pki, plain_etcd_warning
from overlaycni.datastore.tls import EtcdCredentials, TLSFiles
from overlaycni.errors import DatastoreCredentialsError

ENV = ("OVERLAYCNI_ETCD_CA", "OVERLAYCNI_ETCD_CERT", "OVERLAYCNI_ETCD_KEY", "OVERLAYCNI_ETCD_USER", "OVERLAYCNI_ETCD_PASSWORD_FILE", "OVERLAYCNI_ETCD_PASSWORD")


@pytest.fixture(scope="module")
def pkidir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki") / "pki"
    pki.init_pki(d, etcd_addresses=["127.0.0.1"], nodes=["node1", "node2"])
    return pki.Layout(d)


def test_etcds_url():
    assert parse_url("etcds://10.224.0.4:2379,10.224.0.5:2379") == ("etcds", [("10.224.0.4", 2379), ("10.224.0.5", 2379)])


def test_etcds_names_every_missing_flag_and_variable():
    with pytest.raises(DatastoreCredentialsError) as info:
        EtcdCredentials().check_for("etcds", "etcds://10.0.0.1:2379")
    text = str(info.value)
    for word in ("--etcd-ca", "--etcd-cert", "--etcd-key", "OVERLAYCNI_ETCD_CA", "OVERLAYCNI_ETCD_CERT", "OVERLAYCNI_ETCD_KEY"):
        assert word in text
    with pytest.raises(DatastoreCredentialsError) as info:
        EtcdCredentials(ca="/ca", cert="/c").check_for("etcds", "etcds://h:1")
    assert "--etcd-key" in str(info.value) and "--etcd-cert" not in str(info.value).split("missing")[1].split(":")[0]
    EtcdCredentials(ca="/ca", cert="/c", key="/k").check_for("etcds", "etcds://h:1")  # control: complete
    EtcdCredentials(ca="/ca", user="u", password="p").check_for("etcds", "etcds://h:1")  # a user instead of a cert


@pytest.mark.parametrize(
    "creds, words",
    [
        (EtcdCredentials(cert="/c", key="/k"), "plain HTTP: use etcds://"),
        (EtcdCredentials(user="u"), "needs a password"),
        (EtcdCredentials(password_file="/pw"), "without --etcd-user"),
    ],
)
def test_contradictions_are_named(creds, words):
    with pytest.raises(DatastoreCredentialsError, match=words):
        creds.check_for("etcd", "etcd://127.0.0.1:2379")


def test_sqlite_ignores_etcd_settings():
    EtcdCredentials(cert="/c").check_for("sqlite", "sqlite:///x.db")


def test_flags_win_over_the_environment(monkeypatch):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OVERLAYCNI_ETCD_CA", "/env/ca")
    monkeypatch.setenv("OVERLAYCNI_ETCD_CERT", "/env/cert")
    monkeypatch.setenv("OVERLAYCNI_ETCD_PASSWORD", "pw")
    merged = EtcdCredentials(cert="/flag/cert").or_env()
    assert (merged.ca, merged.cert, merged.key, merged.password) == ("/env/ca", "/flag/cert", None, "pw")
    assert "pw" not in repr(merged)  # the password never shows in logs


def test_password_file(tmp_path):
    f = tmp_path / "pw"
    f.write_text("secret\n")
    assert EtcdCredentials(user="u", password_file=str(f)).read_password() == "secret"
    f.write_text("")
    with pytest.raises(DatastoreCredentialsError, match="is empty"):
        EtcdCredentials(user="u", password_file=str(f)).read_password()
    with pytest.raises(DatastoreCredentialsError, match="--etcd-password-file"):
        EtcdCredentials(user="u", password_file=str(tmp_path / "missing")).read_password()


@pytest.mark.parametrize(
    "url, remote",
    [
        ("etcd://127.0.0.1:2379", None),
        ("etcd://localhost:2379,[::1]:2379", None),
        ("etcd://127.0.0.1:2379,10.224.0.4:2379", "10.224.0.4:2379"),
        ("etcds://10.224.0.4:2379", None),
        ("sqlite:///x.db", None),
        ("nonsense", None),
    ],
)
def test_plain_http_warning_only_off_loopback(url, remote):
    warning = plain_etcd_warning(url)
    if remote is None:
        assert warning is None
    else:
        assert remote in warning and "etcds://" in warning


def _files(pkidir, node="node1", tmp=None) -> EtcdCredentials:
    cert, key = pkidir.node(node)
    if tmp is not None:
        cert, key = shutil.copy2(cert, tmp / "c.crt"), shutil.copy2(key, tmp / "c.key")
    return EtcdCredentials(ca=str(pkidir.ca[0]), cert=str(cert), key=str(key))


def test_tls_files_are_private_copies(pkidir):
    files = TLSFiles(_files(pkidir))
    gen = files.current()
    try:
        assert gen.number == 1 and gen.subject == "CN=node1,O=overlaycni nodes"
        for path, original in ((gen.ca, pkidir.ca[0]), (gen.cert, pkidir.node("node1")[0]), (gen.key, pkidir.node("node1")[1])):
            assert path.startswith("/proc/self/fd/")
            with open(path, "rb") as f:
                assert f.read() == original.read_bytes()
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        files.close()


def test_rotation_and_half_written_files(pkidir, tmp_path):
    creds = _files(pkidir, tmp=tmp_path)
    files = TLSFiles(creds, check_interval=0)
    try:
        first = files.current()
        assert files.current() is first  # nothing changed: the same generation
        shutil.copy2(pkidir.node("node2")[0], creds.cert)  # new certificate, old key
        assert files.current() is first  # refused: keeps the previous one
        shutil.copy2(pkidir.node("node2")[1], creds.key)
        second = files.current()
        assert second.number == 2 and second.subject == "CN=node2,O=overlaycni nodes"
        os.unlink(creds.cert)  # mid-rename
        assert files.current() is second
    finally:
        files.close()


@pytest.mark.parametrize("problem", ["mismatch", "encrypted", "garbage", "expired", "missing"])
def test_bad_files_are_named(pkidir, tmp_path, problem):
    creds = _files(pkidir, tmp=tmp_path)
    if problem == "mismatch":
        shutil.copy2(pkidir.node("node2")[1], creds.key)
        words = "does not belong to the certificate"
    elif problem == "encrypted":
        from cryptography.hazmat.primitives import serialization

        path = Path(creds.key)
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        enc = serialization.BestAvailableEncryption(b"pw")
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
        words = "is encrypted"
    elif problem == "garbage":
        Path(creds.cert).write_text("not a certificate\n")
        words = "--etcd-cert .*no PEM certificate"
    elif problem == "expired":
        old = tmp_path / "old"
        pki.init_pki(old, etcd_addresses=["127.0.0.1"], nodes=["n"], days=1, now=datetime.now(UTC) - timedelta(days=3))
        creds = EtcdCredentials(ca=str(old / "ca.crt"), cert=str(old / "nodes/n.crt"), key=str(old / "nodes/n.key"))
        words = "expired on"
    else:
        os.unlink(creds.cert)
        words = "--etcd-cert .*No such file"
    with pytest.raises(DatastoreCredentialsError, match=words):
        TLSFiles(creds)


def test_loose_key_mode_is_warned(pkidir, tmp_path, caplog):
    creds = _files(pkidir, tmp=tmp_path)
    os.chmod(creds.key, 0o644)
    TLSFiles(creds).close()
    assert "readable by group or others" in caplog.text


def test_stat_interval_limits_rereads(pkidir, tmp_path):
    creds = _files(pkidir, tmp=tmp_path)
    files = TLSFiles(creds, check_interval=3600)
    try:
        first = files.current()
        shutil.copy2(pkidir.node("node2")[0], creds.cert)
        shutil.copy2(pkidir.node("node2")[1], creds.key)
        assert files.current() is first  # not looked at yet
        files.check_interval = 0
        time.sleep(0.01)
        assert files.current().number == 2
    finally:
        files.close()
