"""etcd over TLS (``etcds://``) against a real etcd that speaks only HTTPS and
requires client certificates (``etcd_tls_server`` in tests/fixtures_etcd.py):
who is refused and why, and client certificate rotation under a live store.

Each refusal has its control: the same call with the right settings works."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time

import pytest

from overlaycni.datastore import open_datastore, pki
from overlaycni.datastore.tls import EtcdCredentials
from overlaycni.errors import DatastoreAuthError, DatastoreCredentialsError, DatastoreUnavailable

pytestmark = pytest.mark.etcd


def _node_creds(pki_dir, node: str) -> EtcdCredentials:
    layout = pki.Layout(pki_dir)
    cert, key = layout.node(node)
    return EtcdCredentials(ca=str(layout.ca[0]), cert=str(cert), key=str(key))


def test_client_certificate_reads_and_writes(etcd_tls_server, etcd_tls_url):
    store = open_datastore(etcd_tls_url, credentials=_node_creds(etcd_tls_server.pki, "node1"))
    try:
        rev = store.put("/t/a", "x")
        assert store.get("/t/a").revision == rev
        status = store.tls_status()
        assert status["subject"] == "CN=node1,O=overlaycni nodes" and status["generation"] == 1
    finally:
        store.close()


def test_without_a_client_certificate_etcd_refuses(etcd_tls_server, etcd_tls_url, monkeypatch):
    monkeypatch.setenv("OVERLAYCNI_ETCD_PASSWORD", "unused")
    # TLS with only a CA (and an etcd user, which makes the certificate optional on our side)
    creds = EtcdCredentials(ca=etcd_tls_server.credentials.ca, user="root")
    with pytest.raises(DatastoreAuthError, match=r"requires a client certificate \(give --etcd-cert and --etcd-key\)"):
        open_datastore(etcd_tls_url, credentials=creds)


def test_missing_settings_are_named_before_any_connection(etcd_tls_url, monkeypatch):
    for var in ("OVERLAYCNI_ETCD_CA", "OVERLAYCNI_ETCD_CERT", "OVERLAYCNI_ETCD_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DatastoreCredentialsError) as info:
        open_datastore(etcd_tls_url)
    for flag in ("--etcd-ca", "--etcd-cert", "--etcd-key", "OVERLAYCNI_ETCD_CERT"):
        assert flag in str(info.value)


def test_certificate_of_another_ca_is_refused(etcd_tls_server, etcd_tls_url, tmp_path):
    pki.init_pki(tmp_path / "other", etcd_addresses=["127.0.0.1"], nodes=["node1"])
    foreign = _node_creds(tmp_path / "other", "node1")
    mine = etcd_tls_server.credentials
    with pytest.raises(DatastoreAuthError, match="refused our client certificate --etcd-cert"):
        open_datastore(etcd_tls_url, credentials=dataclasses.replace(foreign, ca=mine.ca))
    # the other way round: a server certificate our CA did not sign
    with pytest.raises(DatastoreAuthError, match="server certificate was refused"):
        open_datastore(etcd_tls_url, credentials=dataclasses.replace(mine, ca=foreign.ca))
    open_datastore(etcd_tls_url, credentials=mine).close()  # control


def test_the_environment_cannot_replace_the_ca(etcd_tls_server, etcd_tls_url, monkeypatch):
    """requests lets REQUESTS_CA_BUNDLE override a session's CA; ours ignore it."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # would fail if used
    store = open_datastore(etcd_tls_url, credentials=etcd_tls_server.credentials)
    store.put("/t/env", "ok")
    store.close()


def test_plain_http_to_a_tls_etcd_fails_with_a_hint(etcd_tls_server, monkeypatch):
    plain = etcd_tls_server.url.replace("etcds://", "etcd://")
    for var in ("OVERLAYCNI_ETCD_CA", "OVERLAYCNI_ETCD_CERT", "OVERLAYCNI_ETCD_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("overlaycni.datastore._etcd_transport.RETRY_WINDOW", 0.5)
    with pytest.raises(DatastoreUnavailable) as info:
        open_datastore(plain)
    assert "use etcds://" in info.value.details


def test_tls_to_a_plain_etcd_fails_clearly(etcd_server, etcd_tls_server):
    url = etcd_server.url.replace("etcd://", "etcds://")
    with pytest.raises(DatastoreAuthError, match="does not speak TLS"):
        open_datastore(url, credentials=etcd_tls_server.credentials)


def test_rotated_client_certificate_is_used_without_reopening(etcd_tls_server, etcd_tls_url, tmp_path):
    """A store (with a live watch) keeps working when its certificate is
    re-issued and the old one revoked; a new client with the old certificate
    is refused (the control: revocation bites, so only rotation explains
    the store still working)."""
    shared = pki.Layout(etcd_tls_server.pki)
    mine = pki.Layout(tmp_path / "pki")
    mine.dir.mkdir(mode=0o700)
    for src, dst in zip(shared.ca, mine.ca, strict=True):
        shutil.copy2(src, dst)  # the etcd's CA, so that it trusts what we issue
    pki.init_pki(mine.dir, etcd_addresses=["127.0.0.1"], nodes=["rot"])
    old = tmp_path / "old"
    old.mkdir()
    old_cert, old_key = shutil.copy2(mine.node("rot")[0], old), shutil.copy2(mine.node("rot")[1], old)
    creds = _node_creds(mine.dir, "rot")
    store = open_datastore(etcd_tls_url, credentials=creds)
    seen: list[str] = []
    stop = threading.Event()
    start = store.revision() + 1  # a watch from "now" could miss the first put on a loaded machine

    def watch() -> None:
        for ev in store.watch("/t/rot/", start_revision=start, stop=stop):
            seen.append(ev.key)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        store.put("/t/rot/1", "before")
        # the watch is live (it delivered the first event) before the rotation: on a loaded machine the
        # thread could otherwise open its first stream only after the revocation, with the revoked certificate
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == ["/t/rot/1"]
        serial = store.tls_status()["serial"]
        renewed = pki.renew(mine.dir, nodes=["rot"])
        # the etcd's CRL (in the shared PKI) now revokes the old certificate
        pki.revoke(shared.dir, [serial])
        with pytest.raises(DatastoreAuthError):
            open_datastore(etcd_tls_url, credentials=dataclasses.replace(creds, cert=old_cert, key=old_key))
        deadline = time.monotonic() + 20
        while store.tls_status()["serial"] == serial and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.tls_status()["serial"] == renewed[0].serial
        assert store.tls_status()["rotations"] == 1
        store.put("/t/rot/2", "after")
        fresh = open_datastore(etcd_tls_url, credentials=creds)  # the new files work for anyone
        fresh.put("/t/rot/3", "fresh")
        fresh.close()
        deadline = time.monotonic() + 20
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert seen == ["/t/rot/1", "/t/rot/2", "/t/rot/3"]  # the watch re-opened with the new certificate, losing nothing
    finally:
        stop.set()
        watcher.join(5)
        store.close()


def test_half_written_rotation_keeps_the_previous_certificate(etcd_tls_server, etcd_tls_url, tmp_path, caplog):
    shared = pki.Layout(etcd_tls_server.pki)
    cert, key = tmp_path / "c.crt", tmp_path / "c.key"
    shutil.copy2(shared.node("node1")[0], cert)
    shutil.copy2(shared.node("node1")[1], key)
    creds = EtcdCredentials(ca=str(shared.ca[0]), cert=str(cert), key=str(key))
    store = open_datastore(etcd_tls_url, credentials=creds)
    try:
        shutil.copy2(shared.node("node2")[0], cert)  # the new certificate, but still the old key
        time.sleep(1.1)  # past the stat interval: the next request looks at the files
        store.put("/t/half", "1")
        assert store.tls_status()["generation"] == 1
        assert "not usable" in caplog.text
        shutil.copy2(shared.node("node2")[1], key)  # now they agree
        deadline = time.monotonic() + 20
        while store.tls_status()["generation"] == 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.tls_status()["subject"] == "CN=node2,O=overlaycni nodes"
        store.put("/t/half", "2")
    finally:
        store.close()
