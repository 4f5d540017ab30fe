"""etcd's own authentication (``--etcd-user`` + password file), on a fresh
etcd whose auth this test enables: a root user, and an ``ocni`` user whose
role may read and write only under ``/overlaycni/``. Tokens live one second
(``--auth-token-ttl 1``), so expiry and re-authentication happen for real."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.request

import pytest

from overlaycni.datastore import open_datastore, prefix_end
from overlaycni.datastore.tls import EtcdCredentials
from overlaycni.errors import DatastoreAuthError, DatastoreCredentialsError
from tests.fixtures_etcd import _need_etcd, start_etcd

pytestmark = pytest.mark.etcd


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory):
    _need_etcd()
    cluster = start_etcd(tmp_path_factory.mktemp("etcd-auth"), extra_args=("--auth-token", "simple", "--auth-token-ttl", "1"))
    base = f"http://127.0.0.1:{cluster.client_ports[0]}/v3"

    def call(path: str, body: dict, token: str | None = None) -> dict:
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST")
        if token:
            req.add_header("Authorization", token)
        return json.loads(urllib.request.urlopen(req, timeout=5).read())

    call("/auth/user/add", {"name": "root", "password": "root-pw"})
    call("/auth/role/add", {"name": "root"})
    call("/auth/user/grant", {"user": "root", "role": "root"})
    call("/auth/user/add", {"name": "ocni", "password": "s3cret"})
    call("/auth/role/add", {"name": "ocni"})
    perm = {"permType": "READWRITE", "key": _b64("/overlaycni/"), "range_end": _b64(prefix_end("/overlaycni/"))}
    call("/auth/role/grant", {"name": "ocni", "perm": perm})
    call("/auth/user/grant", {"user": "ocni", "role": "ocni"})
    call("/auth/enable", {})
    yield cluster
    cluster.stop()


@pytest.fixture
def password_file(tmp_path):
    f = tmp_path / "etcd-password"
    f.write_text("s3cret\n")
    f.chmod(0o600)
    return str(f)


def test_user_and_password_file(auth_etcd, password_file, monkeypatch):
    from overlaycni.datastore._etcd_transport import Transport

    logins: list[str] = []
    original = Transport._authenticate

    def counted(self, clients):
        if self._token is None:
            logins.append("login")
        return original(self, clients)

    monkeypatch.setattr(Transport, "_authenticate", counted)
    store = open_datastore(auth_etcd.url, credentials=EtcdCredentials(user="ocni", password_file=password_file))
    stop = threading.Event()
    seen: list[str] = []
    start = store.revision() + 1  # a watch from "now" could miss the first put on a loaded machine

    def watch() -> None:
        for ev in store.watch("/overlaycni/t/", start_revision=start, stop=stop):
            seen.append(ev.value or "")

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        store.put("/overlaycni/t/a", "1")
        time.sleep(2.5)  # the 1 s token has expired: the store authenticates again
        store.put("/overlaycni/t/a", "2")
        assert store.get("/overlaycni/t/a").value == "2"
        assert len(logins) >= 2  # the expired token was replaced
        deadline = time.monotonic() + 15
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert seen == ["1", "2"]
        with pytest.raises(DatastoreAuthError, match="denied --etcd-user 'ocni'"):
            store.put("/elsewhere", "x")  # outside the role's prefix
    finally:
        stop.set()
        t.join(5)
        store.close()


def test_password_from_the_environment(auth_etcd, monkeypatch):
    monkeypatch.setenv("OVERLAYCNI_ETCD_USER", "ocni")
    monkeypatch.setenv("OVERLAYCNI_ETCD_PASSWORD", "s3cret")
    store = open_datastore(auth_etcd.url)
    store.put("/overlaycni/t/env", "1")
    store.close()


def test_no_user_is_refused_with_the_flags_to_give(auth_etcd, monkeypatch):
    monkeypatch.delenv("OVERLAYCNI_ETCD_USER", raising=False)
    with pytest.raises(DatastoreAuthError, match="--etcd-user and --etcd-password-file"):
        open_datastore(auth_etcd.url)


def test_wrong_password_is_refused(auth_etcd, tmp_path):
    f = tmp_path / "pw"
    f.write_text("wrong")
    with pytest.raises(DatastoreAuthError, match="wrong user name or password"):
        open_datastore(auth_etcd.url, credentials=EtcdCredentials(user="ocni", password_file=str(f)))


def test_user_without_password_is_a_settings_error(auth_etcd, monkeypatch):
    monkeypatch.delenv("OVERLAYCNI_ETCD_PASSWORD", raising=False)
    with pytest.raises(DatastoreCredentialsError, match="--etcd-user 'ocni' needs a password"):
        open_datastore(auth_etcd.url, credentials=EtcdCredentials(user="ocni"))
