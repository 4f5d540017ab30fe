"""The lab's NetworkPolicy plumbing without root: label edits, port flags,
the metadata records, runtimeConfig capabilities, the probe report, and the
CLI errors of ``policy --lab`` / ``explain`` / ``lab probe``."""

from __future__ import annotations

import os
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Interface, IPv6Address

import pytest

from overlaycni.datastore import open_datastore
from overlaycni.errors import ConfigError, UsageError
from overlaycni.lab import policy as lab_policy
from overlaycni.lab import probe as lab_probe
from overlaycni.lab import runtime
from overlaycni.lab.state import LabPod, LabState
from overlaycni.policy import records

OC = os.path.join(os.path.dirname(sys.executable), "overlaycni")


def test_label_edits_set_and_remove():
    sets, removes = lab_policy.parse_label_edits(["a=1", "b-", "c=2,d=3", " "])
    assert sets == {"a": "1", "c": "2", "d": "3"} and removes == {"b"}


@pytest.mark.parametrize("item, words", [("novalue", "neither key=value nor key-"), ("=x", "neither"), ("bad key=1", "LABELS.bad key")])
def test_label_edits_errors_name_the_item(item, words):
    with pytest.raises((UsageError, ConfigError)) as err:
        lab_policy.parse_label_edits([item])
    assert words in str(err.value) or any(words in str(e) for e in getattr(err.value, "errors", []))


def test_ports_are_normalised_and_checked():
    assert lab_policy.parse_ports(["serve-80-tcp=80", "dns=53/udp"]) == ("serve-80-tcp=80/TCP", "dns=53/UDP")
    assert lab_policy.parse_ports(["a=80/TCP", "a=80/UDP"]) == ("a=80/TCP", "a=80/UDP")  # one name per protocol
    for bad in (["http"], ["http=0/TCP"], ["http=80/ICMP"], ["a=80/TCP", "a=81/TCP"]):
        with pytest.raises(UsageError, match="--port"):
            lab_policy.parse_ports(bad)


def test_ip_flag():
    assert lab_policy.parse_ips(()) == ()
    assert lab_policy.parse_ips(["10.244.1.5"]) == (IPv4Address("10.244.1.5"),)
    v6 = IPv6Address("fd12:3456:789a::5")
    assert lab_policy.parse_ips([str(v6), "10.244.1.5"]) == (IPv4Address("10.244.1.5"), v6)  # IPv4 first
    with pytest.raises(UsageError, match="--ip: '10.244.1.999' is not an IP address"):
        lab_policy.parse_ips(["10.244.1.999"])
    with pytest.raises(UsageError, match="--ip: 10.244.1.5, 10.244.1.6: at most one address per family"):
        lab_policy.parse_ips(["10.244.1.5", "10.244.1.6"])


def _state(tmp_path) -> LabState:
    return LabState(
        name="t1", lab_dir=str(tmp_path), backend="vxlan", store="sqlite", datastore=f"sqlite:///{tmp_path}/s.db",
        network={}, vnet_netns="ocl-t1.vnet", external_netns="ocl-t1.ext", external_ip=IPv4Interface("10.224.255.254/16"),
    )  # fmt: skip


def _pod(name="web", **kw) -> LabPod:
    base = dict(
        name=name, namespace="x", node="node1", netns=f"ocl-t1.pod.x.{name}", container_id="c" * 32,
        ip=IPv4Interface("10.244.1.2/24"), labels=(("app", "web"),), ports=("http=80/TCP",),
    )  # fmt: skip
    return LabPod(**{**base, **kw})


def test_meta_records_round_trip_through_the_store(tmp_path):
    """What the lab writes is what the agents' decoders read; sqlite labs
    write in-process, right here (``with_store``)."""
    st = _state(tmp_path)
    change = lab_policy.meta_change(pods=[_pod(), _pod("noip", ip=None)], namespaces={"x": {"ns": "x"}})
    assert [p.name for p in change.pods] == ["web"]  # a pod without an IP has no record yet
    lab_policy.publish(st, change)
    with open_datastore(st.datastore) as store:
        (pod,) = records.load_pods(store, "t1")
        (ns,) = records.load_namespaces(store, "t1")
        assert (pod.key, str(pod.ip), pod.node, dict(pod.labels)) == ("x/web", "10.244.1.2", "node1", {"app": "web"})
        assert [(p.name, p.port, p.protocol) for p in pod.ports] == [("http", 80, "TCP")]
        assert dict(ns.labels) == {"ns": "x", "kubernetes.io/metadata.name": "x"}
        # y/web is another pod: deleting x/web leaves it
        lab_policy.write_meta(store, "t1", lab_policy.meta_change(pods=[_pod(namespace="y")]))
        lab_policy.write_meta(store, "t1", lab_policy.meta_change(delete_pods=[_pod()]))
        assert [p.key for p in records.load_pods(store, "t1")] == ["y/web"]
    assert not lab_policy.meta_change()


def test_a_bad_record_writes_nothing(tmp_path):
    """A record the agents' decoder would skip is refused, naming its field,
    and nothing of the change is written."""
    st = _state(tmp_path)
    from overlaycni.policy.model import NamespaceInfo

    bad = lab_policy.MetaChange(
        namespaces=(NamespaceInfo("x", {}),), pods=(lab_policy.pod_info(_pod(labels=(("app", "not ok!"),))),)
    )
    with open_datastore(st.datastore) as store:
        with pytest.raises(ConfigError) as err:
            lab_policy.write_meta(store, "t1", bad)
        assert any(e.field == "pods[0].labels.app" for e in err.value.errors), err.value.errors
        assert records.load_namespaces(store, "t1") == [] and records.load_pods(store, "t1") == []


def test_runtime_config_only_for_declared_capabilities():
    conf = runtime.ConfList(
        name="n", cni_version="1.0.0",
        plugins=({"type": "overlaycni", "capabilities": {"ips": True}}, {"type": "portmap", "capabilities": {"portMappings": True}}),
    )  # fmt: skip
    args = {"ips": ["10.244.1.50"]}
    assert conf.plugin_config(0, None, args)["runtimeConfig"] == {"ips": ["10.244.1.50"]}
    assert "runtimeConfig" not in conf.plugin_config(1, None, args)
    assert "runtimeConfig" not in conf.plugin_config(0, None, {})


def test_probe_report_json_and_rows():
    rep = lab_probe.ProbeReport(
        lab="t1", port=80, protocol="TCP", pods=("a", "b"), keys=("x/a", "x/b"),
        connected={("a", "a"): True, ("a", "b"): False, ("b", "a"): True, ("b", "b"): True},
    )  # fmt: skip
    assert rep.rows() == [".X", ".."]
    j = rep.to_json()
    assert j["matrix"] == {"a": {"a": True, "b": False}, "b": {"a": True, "b": True}}
    assert (j["connected"], j["blocked"]) == (3, 1)


@pytest.mark.parametrize(
    "args, words",
    [
        (["policy", "list", "--lab", "nope"], "--lab: no lab named 'nope'"),
        (["policy", "list", "--lab", "a", "--cluster", "b"], "--lab: give --lab or --cluster, not both"),
        (["policy", "list"], "--cluster: required"),
        (["policy", "delete", "x/p"], "--cluster: required"),
        (["policy", "explain", "x/a", "x/b", "80"], "--from: required"),
        (["policy", "explain", "x/a", "x/b", "80", "--from", "f.yaml", "--lab", "a"], "not both"),
        (["lab", "probe", "--name", "nope"], "no lab named 'nope'"),
        (["lab", "namespace", "label", "x", "a=b", "--name", "nope"], "no lab named 'nope'"),
    ],
)
def test_cli_errors_name_the_field(tmp_path, args, words):
    """Run as a user does (the console script): a clear message, exit 2, no traceback."""
    env = {**os.environ, "OVERLAYCNI_LAB_DIR": str(tmp_path)}
    proc = subprocess.run([OC, *args], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert words in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr, proc.stderr
