"""etcd for tests: Debian's /usr/bin/etcd on 127.0.0.1, random ports, a temp
data dir; started and stopped by the fixture.

Fixtures (loaded for every test through ``pytest_plugins`` in conftest.py):

* ``etcd_server`` (session): one single-member etcd; ``.url`` is its
  ``etcd://127.0.0.1:PORT``.
* ``etcd_url`` (function): the session server, emptied for this test.
* ``etcd_cluster3`` (function): a fresh 3-member cluster on loopback, with
  ``.kill(i)`` to SIGKILL member ``i``.
* ``etcd_tls_server`` (session): one member that speaks only HTTPS and
  requires a client certificate (``--client-cert-auth``), with a PKI made by
  ``overlaycni.datastore.pki`` in ``.pki``; ``.url`` is ``etcds://...`` and
  ``.credentials`` the operator's client certificate.
* ``etcd_tls_url`` (function): that server, emptied for this test.

``start_etcd(data_dir, members=1, tls=False)`` is a plain function too
(bench/ uses it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from overlaycni.datastore import pki
from overlaycni.datastore.tls import EtcdCredentials

ETCD_BIN = os.environ.get("OVERLAYCNI_ETCD_BIN", "/usr/bin/etcd")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EtcdCluster:
    data_dir: Path
    client_ports: list[int]
    peer_ports: list[int]
    procs: list[subprocess.Popen | None] = field(default_factory=list)
    own_dir: bool = False
    pki: Path | None = None  # TLS: the directory of pki.init_pki

    @property
    def scheme(self) -> str:
        return "https" if self.pki else "http"

    @property
    def url(self) -> str:
        return ("etcds://" if self.pki else "etcd://") + ",".join(f"127.0.0.1:{p}" for p in self.client_ports)

    def member_url(self, i: int) -> str:
        return ("etcds://" if self.pki else "etcd://") + f"127.0.0.1:{self.client_ports[i]}"

    @property
    def credentials(self) -> EtcdCredentials:
        """The operator's client certificate (TLS clusters only)."""
        assert self.pki is not None
        layout = pki.Layout(self.pki)
        return EtcdCredentials(ca=str(layout.ca[0]), cert=str(layout.operator[0]), key=str(layout.operator[1]))

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.pki is None:
            return None
        layout = pki.Layout(self.pki)
        ctx = ssl.create_default_context(cafile=str(layout.ca[0]))
        ctx.load_cert_chain(str(layout.operator[0]), str(layout.operator[1]))
        return ctx

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def wipe(self) -> None:
        """Delete every key (the whole key space)."""
        import base64
        import json

        body = json.dumps({"key": base64.b64encode(b"\0").decode(), "range_end": base64.b64encode(b"\0").decode()})
        req = urllib.request.Request(
            f"{self.scheme}://127.0.0.1:{self.client_ports[0]}/v3/kv/deleterange", data=body.encode(), method="POST"
        )
        urllib.request.urlopen(req, timeout=5, context=self.ssl_context()).read()


def _healthy(cluster: EtcdCluster, port: int) -> bool:
    try:
        url = f"{cluster.scheme}://127.0.0.1:{port}/health"
        with urllib.request.urlopen(url, timeout=1, context=cluster.ssl_context()) as resp:
            return b'"true"' in resp.read()
    except OSError:
        return False


def _tls_flags(layout: pki.Layout) -> list[str]:
    ca, (cert, key) = str(layout.ca[0]), map(str, layout.server)
    return [
        "--cert-file", cert, "--key-file", key, "--client-cert-auth", "--trusted-ca-file", ca,
        "--client-crl-file", str(layout.crl),
        "--peer-cert-file", cert, "--peer-key-file", key, "--peer-client-cert-auth", "--peer-trusted-ca-file", ca,
    ]  # fmt: skip


def start_etcd(
    data_dir: str | Path | None = None,
    *,
    members: int = 1,
    tls: bool = False,
    extra_args: tuple[str, ...] = (),
    timeout: float = 20.0,
) -> EtcdCluster:
    """Start an etcd cluster of ``members`` on 127.0.0.1 and wait until it is
    healthy. With ``tls`` it speaks only HTTPS (clients and peers) and wants
    client certificates, from a PKI made in ``DATA_DIR/pki``. Raises
    RuntimeError (with the log tail) when it does not start."""
    if not os.access(ETCD_BIN, os.X_OK):
        raise FileNotFoundError(f"{ETCD_BIN} not found (apt-get install etcd-server)")
    own = data_dir is None
    base = Path(data_dir or tempfile.mkdtemp(prefix="ocni-etcd-"))
    cluster = EtcdCluster(base, [_free_port() for _ in range(members)], [_free_port() for _ in range(members)])
    cluster.own_dir = own
    scheme = "http"
    extra: list[str] = []
    if tls:
        cluster.pki = base / "pki"
        pki.init_pki(cluster.pki, etcd_addresses=["127.0.0.1"], nodes=["node1", "node2"])
        scheme, extra = "https", _tls_flags(pki.Layout(cluster.pki))
    initial = ",".join(f"m{i}={scheme}://127.0.0.1:{cluster.peer_ports[i]}" for i in range(members))
    for i in range(members):
        member_dir = base / f"m{i}"
        member_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            ETCD_BIN,
            "--name", f"m{i}",
            "--data-dir", str(member_dir / "data"),
            "--listen-client-urls", f"{scheme}://127.0.0.1:{cluster.client_ports[i]}",
            "--advertise-client-urls", f"{scheme}://127.0.0.1:{cluster.client_ports[i]}",
            "--listen-peer-urls", f"{scheme}://127.0.0.1:{cluster.peer_ports[i]}",
            "--initial-advertise-peer-urls", f"{scheme}://127.0.0.1:{cluster.peer_ports[i]}",
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"ocni-{os.getpid()}-{cluster.client_ports[0]}",
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-level", "error",
            *extra,
            *extra_args,
        ]
        with open(member_dir / "etcd.log", "wb") as log:
            cluster.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_healthy(cluster, p) for p in cluster.client_ports):
            return cluster
        if any(p.poll() is not None for p in cluster.procs if p is not None):
            break
        time.sleep(0.1)
    tail = ""
    for i in range(members):
        try:
            tail += (base / f"m{i}" / "etcd.log").read_text()[-1500:]
        except OSError:
            pass
    cluster.stop()
    raise RuntimeError(f"etcd did not become healthy: {tail}")


def _need_etcd() -> None:
    if not os.access(ETCD_BIN, os.X_OK):
        pytest.skip(f"{ETCD_BIN} not installed (apt-get install etcd-server)")


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    _need_etcd()
    cluster = start_etcd(tmp_path_factory.mktemp("etcd"))
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd_url(etcd_server) -> str:
    etcd_server.wipe()
    return etcd_server.url


@pytest.fixture
def etcd_cluster3(tmp_path):
    _need_etcd()
    cluster = start_etcd(tmp_path / "etcd3", members=3)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def etcd_tls_server(tmp_path_factory):
    _need_etcd()
    cluster = start_etcd(tmp_path_factory.mktemp("etcd-tls"), tls=True)
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd_tls_url(etcd_tls_server) -> str:
    etcd_tls_server.wipe()
    return etcd_tls_server.url
