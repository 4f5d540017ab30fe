"""Agents with backend wireguard, in-process on the fake data plane and a real
SQLite store: key files, published records, key rotation, peer removal."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from overlaycni import ipam
from overlaycni.agent.daemon import Agent
from overlaycni.agent.node import AgentOptions
from overlaycni.agent.wireguard import NodeKey, read_key
from overlaycni.config import parse_network
from overlaycni.dataplane.fake import FakeDataplane
from overlaycni.dataplane.wgmodel import WG_IFNAME, PrivateKey
from overlaycni.datastore import open_datastore
from overlaycni.errors import ConfigError, NotFound
from overlaycni.ipam.rotation import pending_key_rotation, request_key_rotation

from .test_agent import wait_for

OC = str(Path(sys.executable).parent / "overlaycni")


@pytest.fixture()
def cluster(tmp_path):
    url = f"sqlite://{tmp_path}/state.db"
    store = open_datastore(url)
    ipam.create_cluster(store, "c1", parse_network({"network-plugin": "azure", "network-plugin-mode": "overlay",
                                                     "backend": "wireguard", "wireguard-port": "51900"}))  # fmt: skip
    yield url, store
    store.close()


def start(url, tmp_path, name, ip, **kw):
    dp = FakeDataplane(underlay_ip=IPv4Address(ip))
    opts = AgentOptions(
        cluster="c1", node=name, node_ip=IPv4Address(ip), datastore=url, socket=str(tmp_path / f"{name}.sock"),
        metrics_addr=None, lease_ttl=5, resync_interval=kw.get("resync", 60),
        wireguard_key=str(tmp_path / name / "wireguard.key"),
    )  # fmt: skip
    agent = Agent(opts, store=open_datastore(url), dataplane=dp)
    ready = agent.start()
    return agent, dp, ready


def wg_peer_keys(dp: FakeDataplane) -> set[str]:
    return set(dp.kernel.wireguard[WG_IFNAME].peers)


def test_first_start_generates_a_0600_key_and_publishes_only_the_public_key(cluster, tmp_path):
    url, store = cluster
    agent, dp, ready = start(url, tmp_path, "n1", "10.224.0.4")
    try:
        path = tmp_path / "n1" / "wireguard.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        key = read_key(path)
        rec = ipam.get_node(store, "c1", "n1")
        assert rec.wireguard_public_key == key.public == ready["wireguard_public_key"]
        assert rec.wireguard_endpoint == "10.224.0.4:51900"
        assert dp.kernel.wireguard[WG_IFNAME].spec.key == key and dp.kernel.wireguard[WG_IFNAME].spec.listen_port == 51900
        dump = "".join(kv.value for kv in store.list("/overlaycni/"))
        assert key.to_base64() not in dump and key.hex() not in dump
        health = agent.health()
        assert health["wireguard"]["public_key"] == key.public and health["wireguard"]["peers"] == 0
        assert key.to_base64() not in str(health)
    finally:
        agent.shutdown()
    again, _, ready2 = start(url, tmp_path, "n1", "10.224.0.4")  # a restart keeps the key
    try:
        assert ready2["wireguard_public_key"] == key.public
    finally:
        again.shutdown()


def test_loose_key_file_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "wg.key"
    path.write_text(PrivateKey.generate().to_base64() + "\n")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="0644.*owner only"):
        NodeKey(path)
    os.chmod(path, 0o600)
    path.write_text("garbage\n")
    with pytest.raises(ConfigError, match="does not hold a WireGuard private key"):
        NodeKey(path)


def test_peers_get_each_others_keys_and_node_delete_removes_the_peer(cluster, tmp_path):
    url, store = cluster
    a1, dp1, r1 = start(url, tmp_path, "n1", "10.224.0.4")
    a2, dp2, r2 = start(url, tmp_path, "n2", "10.224.0.5")
    try:
        assert wait_for(lambda: wg_peer_keys(dp1) == {r2["wireguard_public_key"]})
        assert wait_for(lambda: wg_peer_keys(dp2) == {r1["wireguard_public_key"]})
        peer = dp1.kernel.wireguard[WG_IFNAME].peers[r2["wireguard_public_key"]]
        assert peer.endpoint == (IPv4Address("10.224.0.5"), 51900) and str(peer.allowed_ips[0]) == r2["block"]
        a2.shutdown()
        ipam.delete_node(store, "c1", "n2")
        assert wait_for(lambda: wg_peer_keys(dp1) == set())
        assert IPv4Network(r2["block"]) not in dp1.kernel.routes
    finally:
        a2.shutdown()
        a1.shutdown()


def test_rotation_request_is_acted_on_by_the_node_and_picked_up_by_peers(cluster, tmp_path):
    url, store = cluster
    a1, dp1, r1 = start(url, tmp_path, "n1", "10.224.0.4")
    a2, dp2, r2 = start(url, tmp_path, "n2", "10.224.0.5")
    try:
        old = r2["wireguard_public_key"]
        assert wait_for(lambda: wg_peer_keys(dp1) == {old})
        deleted: list = []
        real = dp1.p.routes.apply_routes

        def recording(*, replace=(), delete=()):
            deleted.extend(r.dst for r in delete)
            return real(replace=replace, delete=delete)

        dp1.p.routes.apply_routes = recording  # type: ignore[method-assign]
        req = request_key_rotation(store, "c1", "n2")
        assert wait_for(lambda: ipam.get_node(store, "c1", "n2").wireguard_public_key != old)
        new = ipam.get_node(store, "c1", "n2").wireguard_public_key
        assert read_key(tmp_path / "n2" / "wireguard.key").public == new
        assert not (tmp_path / "n2" / "wireguard.key.new").exists()
        assert dp2.kernel.wireguard[WG_IFNAME].spec.key.public == new
        assert wait_for(lambda: wg_peer_keys(dp1) == {new})
        assert IPv4Network(r2["block"]) not in deleted  # the route into the tunnel never went away
        assert wait_for(lambda: pending_key_rotation(store, "c1", "n2") is None)
        assert a2.health()["wireguard"]["rotations"] == 1 and req.node == "n2"
    finally:
        a2.shutdown()
        a1.shutdown()


def test_a_pending_request_is_acted_on_at_the_next_start(cluster, tmp_path):
    url, store = cluster
    a1, _, r1 = start(url, tmp_path, "n1", "10.224.0.4")
    a1.shutdown()  # the record stays until its lease runs out
    request_key_rotation(store, "c1", "n1")
    again, dp, _ = start(url, tmp_path, "n1", "10.224.0.4")
    try:
        assert wait_for(lambda: pending_key_rotation(store, "c1", "n1") is None)
        new = ipam.get_node(store, "c1", "n1").wireguard_public_key
        assert new != r1["wireguard_public_key"] and dp.kernel.wireguard[WG_IFNAME].spec.key.public == new
    finally:
        again.shutdown()


def test_rotation_requests_are_refused_for_other_backends_and_unknown_nodes(cluster, tmp_path):
    url, store = cluster
    with pytest.raises(NotFound, match="ghost"):
        request_key_rotation(store, "c1", "ghost")
    ipam.create_cluster(store, "vx", parse_network({}))
    ipam.register_node(store, "vx", "n1", IPv4Address("10.224.0.4"))
    with pytest.raises(ConfigError, match="backend vxlan"):
        request_key_rotation(store, "vx", "n1")


def test_cli_rotate_key_waits_for_the_new_key(cluster, tmp_path):
    url, store = cluster
    a1, _, r1 = start(url, tmp_path, "n1", "10.224.0.4")
    env = {**os.environ, "OVERLAYCNI_DATASTORE": url}
    try:
        out = subprocess.run([OC, "node", "rotate-key", "n1", "--cluster", "c1", "-o", "json"],
                             env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        doc = __import__("json").loads(out.stdout)
        assert doc["rotated"] and doc["old_public_key"] == r1["wireguard_public_key"]
        assert doc["new_public_key"] == ipam.get_node(store, "c1", "n1").wireguard_public_key != doc["old_public_key"]
        bad = subprocess.run([OC, "node", "rotate-key", "ghost", "--cluster", "c1"], env=env, capture_output=True, text=True)
        assert bad.returncode == 2 and "ghost" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        a1.shutdown()
    # nobody acts: exit 1, the request stays pending
    out = subprocess.run([OC, "node", "rotate-key", "n1", "--cluster", "c1", "--wait", "0.5"],
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1 and "not published" in out.stdout
    assert pending_key_rotation(store, "c1", "n1") is not None


def test_unusable_key_path_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="wireguard-key"):
        NodeKey(tmp_path / "file" / "wg.key")  # a parent that is a file
