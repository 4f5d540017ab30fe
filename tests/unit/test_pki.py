"""``overlaycni certs`` and ``datastore.pki``: what is written, with which
modes, names and usages (checked with openssl, an independent tool), and
the rules of re-running it."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess

import pytest
from cryptography import x509
from typer.testing import CliRunner

from overlaycni.cli.main import app
from overlaycni.datastore import pki
from overlaycni.errors import OverlayCNIError, UsageError

OPENSSL = shutil.which("openssl")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _cli(*args: str, code: int = 0):
    result = CliRunner().invoke(app, list(args))
    exit_code = 2 if isinstance(result.exception, OverlayCNIError) else result.exit_code
    assert exit_code == code, (result.output, result.exception)
    return result


def test_init_writes_a_private_pki(tmp_path):
    d = tmp_path / "pki"
    args = ["--etcd-address", "10.224.0.4,10.224.0.5", "--node", "node1", "--node", "node2"]
    out = json.loads(_cli("certs", "init", "--dir", str(d), *args, "-o", "json").stdout)
    kinds = [(f["kind"], f["name"], f["action"]) for f in out["files"]]
    assert kinds == [
        ("ca", "ca", "written"),
        ("server", "etcd", "written"),
        ("operator", "operator", "written"),
        ("node", "node1", "written"),
        ("node", "node2", "written"),
    ]
    assert _mode(d) == 0o700 and _mode(d / "nodes") == 0o700
    for f in out["files"]:
        assert _mode(f["cert"]) == 0o600 and _mode(f["key"]) == 0o600
    assert _mode(d / "crl.pem") == 0o600
    server = next(f for f in out["files"] if f["kind"] == "server")
    assert server["sans"] == ["10.224.0.4", "10.224.0.5", "127.0.0.1", "localhost"]


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
def test_openssl_agrees_on_chain_and_usage(tmp_path):
    pki.init_pki(tmp_path, etcd_addresses=["10.224.0.4"], nodes=["node1"])

    def verify(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([OPENSSL, "verify", "-CAfile", str(tmp_path / "ca.crt"), *args], capture_output=True, text=True)

    assert verify("-purpose", "sslserver", "-verify_ip", "10.224.0.4", str(tmp_path / "etcd-server.crt")).returncode == 0
    assert verify("-purpose", "sslserver", "-verify_ip", "10.224.0.9", str(tmp_path / "etcd-server.crt")).returncode != 0  # control
    assert verify("-purpose", "sslclient", str(tmp_path / "nodes/node1.crt")).returncode == 0
    assert verify("-purpose", "sslserver", str(tmp_path / "nodes/node1.crt")).returncode != 0  # a node cannot pose as etcd
    assert verify("-crl_check", "-CRLfile", str(tmp_path / "crl.pem"), str(tmp_path / "nodes/node1.crt")).returncode == 0
    serial = pki.show(tmp_path)[-1].serial
    pki.revoke(tmp_path, [serial])
    revoked = verify("-crl_check", "-CRLfile", str(tmp_path / "crl.pem"), str(tmp_path / "nodes/node1.crt"))
    assert revoked.returncode != 0 and "revoked" in revoked.stdout + revoked.stderr


def test_rerun_keeps_files_and_adds_nodes(tmp_path):
    pki.init_pki(tmp_path, etcd_addresses=["10.224.0.4"], nodes=["node1"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    files = pki.init_pki(tmp_path, nodes=["node1", "node2"])
    assert [(f.name, f.action) for f in files] == [("ca", "kept"), ("etcd", "kept"), ("operator", "kept"), ("node1", "kept"), ("node2", "written")]
    assert all(p.read_bytes() == data for p, data in before.items())


def test_conflicts_write_nothing_and_force_reissues_from_the_same_ca(tmp_path):
    pki.init_pki(tmp_path, etcd_addresses=["10.224.0.4"], nodes=["node1"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match="etcd-server.crt names 10.224.0.4.*--force"):
        pki.init_pki(tmp_path, etcd_addresses=["10.224.0.9"], nodes=["node1", "node3"])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # node3 not written either
    files = pki.init_pki(tmp_path, etcd_addresses=["10.224.0.9"], nodes=["node1"], force=True)
    assert [f.action for f in files] == ["kept", "reissued", "reissued", "reissued"]
    assert (tmp_path / "ca.key").read_bytes() == before[tmp_path / "ca.key"]
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    x509.load_pem_x509_certificate((tmp_path / "nodes/node1.crt").read_bytes()).verify_directly_issued_by(ca)


def test_first_run_needs_the_etcd_addresses(tmp_path):
    _cli("certs", "init", "--dir", str(tmp_path / "p"), "--node", "n1", code=2)
    assert not (tmp_path / "p" / "ca.crt").exists()


@pytest.mark.parametrize("name", ["Bad_Name", "../x", "a/b", ""])
def test_bad_node_names(name):
    if not name:
        assert pki.parse_names([name]) == []
        return
    with pytest.raises(UsageError, match="not a valid node name"):
        pki.parse_names([name])


def test_bad_addresses():
    assert pki.parse_addresses(["10.0.0.1, etcd-1.example", "10.0.0.1"]) == ["10.0.0.1", "etcd-1.example"]
    with pytest.raises(UsageError, match="neither an IP address nor a DNS name"):
        pki.parse_addresses(["a b"])


def test_renew_gives_new_keys_and_can_revoke_the_old(tmp_path):
    pki.init_pki(tmp_path, etcd_addresses=["10.224.0.4"], nodes=["node1", "node2"])
    old = {f.name: f.serial for f in pki.show(tmp_path)}
    old_key = (tmp_path / "nodes/node1.key").read_bytes()
    out = json.loads(_cli("certs", "renew", "--dir", str(tmp_path), "--node", "node1", "--revoke-old", "-o", "json").stdout)
    assert [f["name"] for f in out["files"]] == ["node1"]
    assert out["files"][0]["serial"] != old["node1"]
    assert (tmp_path / "nodes/node1.key").read_bytes() != old_key
    crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    assert {format(r.serial_number, "x") for r in crl} == {old["node1"]}
    assert pki.show(tmp_path)[-1].serial == old["node2"]  # untouched
    with pytest.raises(UsageError, match="does not exist"):
        pki.renew(tmp_path, nodes=["node9"])


def test_show_lists_what_is_there(tmp_path):
    pki.init_pki(tmp_path, etcd_addresses=["10.224.0.4"], nodes=["node1"])
    out = json.loads(_cli("certs", "show", "--dir", str(tmp_path), "-o", "json").stdout)
    assert [f["kind"] for f in out["files"]] == ["ca", "server", "operator", "node"]
