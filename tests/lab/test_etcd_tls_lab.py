"""The lab's etcd over TLS, end to end, with one lab for the module
(``lab up --store etcd``: HTTPS only, client certificates by default).

The attacker is the lab's external host (a VM on the VNet): it reaches
etcd's address but holds no certificate of the lab's CA. Every refusal has
its control: the same read with a client certificate succeeds.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overlaycni.datastore import pki

from .conftest import OC, Lab

pytestmark = [pytest.mark.lab, pytest.mark.kernel, pytest.mark.etcd]

# Read every key of the cluster from etcd's JSON gateway, the way an attacker
# on the VNet would; prints the number of keys, exits 1 on any failure.
READ = """
import json, ssl, sys, urllib.request
url, ca, cert, key = sys.argv[1], *(sys.argv[2:5] + [None] * 3)[:3]
ctx = None
if url.startswith("https"):
    ctx = ssl.create_default_context(cafile=ca) if ca else ssl._create_unverified_context()
    if cert:
        ctx.load_cert_chain(cert, key)
body = json.dumps({"key": "Lw==", "range_end": "AA==", "keys_only": True}).encode()
try:
    out = json.loads(urllib.request.urlopen(urllib.request.Request(url + "/v3/kv/range", data=body), timeout=5, context=ctx).read())
except Exception as exc:
    print(type(exc).__name__, exc)
    sys.exit(1)
print(len(out.get("kvs", [])))
"""


@pytest.fixture(scope="module")
def tls_lab(make_lab) -> Lab:
    return make_lab("tls", "--nodes", "2", "--pods-per-node", "1", "--store", "etcd")


def _state(lab: Lab) -> dict:
    return json.loads((lab.root / lab.name / "lab.json").read_text())


def _etcd_address(lab: Lab) -> str:
    return _state(lab)["datastore"].split("://", 1)[1]


def _pki(lab: Lab) -> pki.Layout:
    return pki.Layout(lab.root / lab.name / "pki")


def _read(lab: Lab, netns: str, url: str, *creds: str) -> subprocess.CompletedProcess[str]:
    return lab.ns(netns, sys.executable, "-c", READ, url, *creds, check=False)


def _agent_status(lab: Lab, node: str) -> dict:
    socket = next(n["socket"] for n in _state(lab)["nodes"] if n["name"] == node)
    out = subprocess.run([OC, "agent", "status", "--socket", socket, "-o", "json"], capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout)


def test_tls_lab_up_and_check(tls_lab: Lab):
    s = tls_lab.status()
    assert s["datastore"].startswith("etcds://")
    rep = tls_lab.json("check")
    assert rep["ok"], rep["failures"]
    etcd_argv = Path(f"/proc/{_state(tls_lab)['etcd']['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"--client-cert-auth" in etcd_argv and b"--client-crl-file" in etcd_argv
    assert not any(a.startswith(b"http://") for a in etcd_argv)  # no plain listener, clients or peers
    lay = _pki(tls_lab)
    assert stat.S_IMODE(os.stat(lay.dir).st_mode) == 0o700
    for f in lay.dir.rglob("*"):
        if f.is_file():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    tls_lab.oc("node", "add")  # a node that joins later gets its certificate too
    for node in ("node1", "node2", "node3"):
        tls = _agent_status(tls_lab, node)["datastore_tls"]
        assert tls["subject"] == f"CN={node},O=overlaycni nodes"  # each agent has its own certificate


def test_external_host_cannot_read_etcd(tls_lab: Lab, tmp_path):
    ext = f"ocl-{tls_lab.name}.ext"
    where = _etcd_address(tls_lab)
    lay = _pki(tls_lab)
    # plain HTTP: etcd has no plain listener
    assert _read(tls_lab, ext, f"http://{where}").returncode == 1
    # HTTPS without a client certificate (the server not even verified)
    assert _read(tls_lab, ext, f"https://{where}").returncode == 1
    assert _read(tls_lab, ext, f"https://{where}", str(lay.ca[0])).returncode == 1
    # a certificate of another CA
    pki.init_pki(tmp_path / "rogue", etcd_addresses=["10.224.255.253"], nodes=["node1"])
    rogue = pki.Layout(tmp_path / "rogue").node("node1")
    assert _read(tls_lab, ext, f"https://{where}", str(lay.ca[0]), str(rogue[0]), str(rogue[1])).returncode == 1
    # control: the same read, from the same host, with a client certificate of the lab's CA
    ok = _read(tls_lab, ext, f"https://{where}", str(lay.ca[0]), str(lay.operator[0]), str(lay.operator[1]))
    assert ok.returncode == 0 and int(ok.stdout) > 0, ok.stdout


def test_cli_without_certificates_names_the_missing_flags(tls_lab: Lab):
    ctl = f"ocl-{tls_lab.name}.ctl"
    url = _state(tls_lab)["datastore"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYCNI_")}
    env["COLUMNS"] = "200"
    argv = ["ip", "netns", "exec", ctl, OC, "--datastore", url, "cluster", "list", "-o", "json"]
    bare = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert bare.returncode == 2
    for flag in ("--etcd-ca", "--etcd-cert", "--etcd-key"):
        assert flag in bare.stderr
    assert "Traceback" not in bare.stderr
    lay = _pki(tls_lab)
    creds = ["--etcd-ca", str(lay.ca[0]), "--etcd-cert", str(lay.operator[0]), "--etcd-key", str(lay.operator[1])]
    good = subprocess.run(argv[:5] + creds + argv[5:], capture_output=True, text=True, env=env, timeout=60)  # control
    assert good.returncode == 0, good.stderr
    assert tls_lab.name in good.stdout


def test_rotated_client_certificates_of_running_agents(tls_lab: Lab, tmp_path):
    """Re-issue both nodes' certificates and revoke the old ones: the running
    agents pick the new files up (no restart) and keep working; a client
    with an old certificate is refused (the control); a restarted agent
    starts with the new one."""
    lay = _pki(tls_lab)
    old = {n: _agent_status(tls_lab, n)["datastore_tls"]["serial"] for n in ("node1", "node2")}
    kept = [shutil.copy2(p, tmp_path) for p in lay.node("node1")]
    out = subprocess.run(
        [OC, "certs", "renew", "--dir", str(lay.dir), "--node", "node1,node2", "--revoke-old", "-o", "json"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    new = {f["name"]: f["serial"] for f in json.loads(out.stdout)["files"]}
    assert set(new) == {"node1", "node2"} and all(new[n] != old[n] for n in new)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        serials = {n: _agent_status(tls_lab, n)["datastore_tls"]["serial"] for n in new}
        if serials == new:
            break
        time.sleep(0.5)
    assert serials == new
    # control: the old certificate is now refused by etcd
    ctl = f"ocl-{tls_lab.name}.ctl"
    where = _etcd_address(tls_lab)
    refused = _read(tls_lab, ctl, f"https://{where}", str(lay.ca[0]), str(kept[0]), str(kept[1]))
    assert refused.returncode == 1
    for node in new:
        health = _agent_status(tls_lab, node)
        assert health["ready"] and health["datastore_ok"]
    tls_lab.oc("pod", "add", "late", "--node", "node1")  # IPAM through etcd with the new certificate
    rep = tls_lab.json("check")
    assert rep["ok"], rep["failures"]
    tls_lab.oc("agent", "restart", "node2")
    restarted = _agent_status(tls_lab, "node2")
    assert restarted["datastore_tls"]["serial"] == new["node2"] and restarted["datastore_tls"]["generation"] == 1
