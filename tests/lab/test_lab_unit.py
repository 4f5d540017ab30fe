"""Unit tests of the lab's pure parts: topology, state file, tcpdump parsing,
the runtime's conflist chain (with stand-in plugins), CLI validation.
No root needed."""

from __future__ import annotations

import json
import stat
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address
from pathlib import Path

import pytest
from typer.testing import CliRunner

from overlaycni.cli.main import app
from overlaycni.config import parse_network
from overlaycni.errors import CNIError, UsageError
from overlaycni.lab import lifecycle, runtime, topology
from overlaycni.lab import state as st
from overlaycni.lab.capture import parse_tcpdump

# --- topology -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo", "a", "lab-1", "x" * 12, "0abc"])
def test_lab_name_ok(name):
    assert topology.validate_lab_name(name) == name


@pytest.mark.parametrize(
    "name, problem",
    [("", "empty"), ("x" * 13, "13 characters"), ("Demo", "lowercase"), ("a.b", "lowercase"), ("-a", "lowercase"), ("a_b", "lowercase")],
)
def test_lab_name_bad(name, problem):
    with pytest.raises(UsageError) as e:
        topology.validate_lab_name(name)
    assert "--name" in str(e.value) and problem in str(e.value)


def test_names_are_prefixed_and_unambiguous():
    # a lab name never holds a dot, so one lab's prefix never matches another's namespaces
    assert topology.node_netns("demo", "node1") == "ocl-demo.node1"
    assert topology.pod_netns("demo", "default", "web") == "ocl-demo.pod.default.web"
    assert not topology.node_netns("demo-x", "node1").startswith(topology.netns_prefix("demo"))
    for node in ("node1", "x" * topology.MAX_NODE_NAME):
        assert len(topology.node_port(node)) <= 15
    assert len(topology.EXT_PORT) <= 15 and len(topology.CTL_PORT) <= 15


def test_node_ips_skip_azure_reserved_and_stay_apart_from_ext_and_ctl():
    a = topology.addressing(parse_network({}))
    assert a.node_ip(1) == IPv4Interface("10.224.0.4/16")
    assert a.node_ip(2) == IPv4Interface("10.224.0.5/16")
    assert a.external_ip == IPv4Interface("10.224.255.254/16")
    assert a.control_ip == IPv4Interface("10.224.255.253/16")
    small = topology.Addressing(IPv4Network("10.224.0.0/28"))
    ips = {small.node_ip(i).ip for i in range(1, small.max_nodes + 1)}
    assert small.max_nodes == 16 - 4 - 1 - 2
    assert IPv4Address("10.224.0.3") not in ips and small.external_ip.ip not in ips and small.control_ip.ip not in ips
    assert max(ips) < small.control_ip.ip
    with pytest.raises(UsageError, match="--nodes"):
        small.node_ip(small.max_nodes + 1)


def test_capacity_errors_name_the_flag():
    net = parse_network({"node-subnet-cidr": "10.224.0.0/28"})
    with pytest.raises(UsageError, match="--nodes: 10 nodes do not fit"):
        topology.check_capacity(net, nodes=10, pods_per_node=1)
    with pytest.raises(UsageError, match="--pods-per-node"):
        topology.check_capacity(parse_network({"max-pods": 10}), nodes=1, pods_per_node=11)
    with pytest.raises(UsageError, match="--nodes"):
        topology.check_capacity(parse_network({}), nodes=0, pods_per_node=1)
    topology.check_capacity(parse_network({}), nodes=20, pods_per_node=0)


def test_labels():
    assert topology.parse_labels("b=2,a=1") == (("a", "1"), ("b", "2"))
    with pytest.raises(UsageError, match="--labels"):
        topology.parse_labels("novalue")


def test_container_id_stable_and_distinct():
    assert topology.container_id("a", "x", "p") == topology.container_id("a", "x", "p")
    assert topology.container_id("a", "x", "p") != topology.container_id("b", "x", "p")
    assert topology.container_id("a", "x", "p") != topology.container_id("a", "y", "p")


def test_same_pod_name_in_two_namespaces_gets_two_netns():
    """x/a and y/a (the upstream conformance model) never share a netns name,
    nor with a node, and stay under the lab's prefix; the longest fits."""
    lab = "x" * topology.MAX_LAB_NAME
    names = {topology.pod_netns(lab, ns, "a") for ns in ("x", "y", "z")}
    assert len(names) == 3 and all(n.startswith(topology.netns_prefix(lab) + "pod.") for n in names)
    # (namespace, name) -> netns is one-to-one: the separator cannot occur in a name
    assert topology.pod_netns(lab, "a-b", "c") != topology.pod_netns(lab, "a", "b-c")
    longest = topology.pod_netns(lab, "n" * topology.MAX_POD_NAME, "p" * topology.MAX_POD_NAME)
    assert len(longest.encode()) == 102 <= 255
    with pytest.raises(UsageError, match="NODE"):
        topology.validate_node_name("pod")


def test_validate_rejects_long_lab_dir(tmp_path):
    root = tmp_path / ("d" * 90)
    with pytest.raises(UsageError, match="unix socket"):
        lifecycle.validate(lifecycle.UpRequest(name="x", root=str(root)))


def test_validate_store_and_network(tmp_path):
    with pytest.raises(UsageError, match="--store"):
        lifecycle.validate(lifecycle.UpRequest(name="x", store="redis", root=str(tmp_path)))
    from overlaycni.errors import ConfigError

    with pytest.raises(ConfigError, match="pod-cidr"):
        lifecycle.validate(lifecycle.UpRequest(name="x", network={"pod-cidr": "10.224.0.0/16"}, root=str(tmp_path)))


# --- state file -----------------------------------------------------------------------------


def _state(tmp_path: Path) -> st.LabState:
    node = st.LabNode(
        name="node1", index=1, netns="ocl-t.node1", ip=IPv4Interface("10.224.0.4/16"), block=IPv4Network("10.244.0.0/24"),
        agent=st.Proc(pid=42, start_time=7, log="x"), socket="/s", conf_dir="/c",
    )  # fmt: skip
    pod = st.LabPod("p1", "default", "node1", "ocl-t.pod.default.p1", "cid", IPv4Interface("10.244.0.2/24"), (("app", "web"),))
    return st.LabState(
        name="t", lab_dir=str(tmp_path / "t"), backend="vxlan", store="sqlite", datastore="sqlite:///x",
        network=parse_network({}).to_dict(), vnet_netns="ocl-t.vnet", external_netns="ocl-t.ext",
        external_ip=IPv4Interface("10.224.255.253/16"), nodes=(node,), pods=(pod,), namespaces=("ocl-t.vnet",),
    )  # fmt: skip


def test_state_round_trip_and_status_json(tmp_path):
    s = _state(tmp_path)
    assert st.from_json(st.to_json(s)) == s
    j = s.status_json()
    assert set(j) >= {"name", "backend", "pod_cidr", "nodes", "pods", "external"}
    # single-stack: the dual-stack keys (issue 12) are there, null
    assert j["nodes"][0] == {"name": "node1", "netns": "ocl-t.node1", "ip": "10.224.0.4", "block": "10.244.0.0/24",
                             "ipv6": None, "block_v6": None, "agent_pid": 42}  # fmt: skip
    assert j["pods"][0] == {
        "name": "p1", "namespace": "default", "node": "node1", "netns": "ocl-t.pod.default.p1", "ip": "10.244.0.2",
        "ipv6": None, "labels": {"app": "web"}, "ports": [],
    }  # fmt: skip
    assert j["external"] == {"netns": "ocl-t.ext", "ip": "10.224.255.253", "ipv6": None}
    assert j["pod_cidr"] == "10.244.0.0/16"


def test_state_save_load_list(tmp_path):
    s = _state(tmp_path)
    st.create_lab_dir("t", str(tmp_path))
    st.save(s)
    assert st.load("t", str(tmp_path)) == s
    assert st.list_labs(str(tmp_path)) == ["t"]
    from overlaycni.errors import NotFound

    with pytest.raises(NotFound, match="lab up --name nope"):
        st.load("nope", str(tmp_path))


def test_state_updates():
    s = _state(Path("/x"))
    s2 = s.without_pod(s.pod("p1")).with_namespace("ocl-t.ext").with_namespace("ocl-t.ext")
    assert s2.pods == () and s2.namespaces == ("ocl-t.vnet", "ocl-t.ext")
    assert [p.name for p in s.pods_on("node1")] == ["p1"]


def _pod(namespace: str, name: str) -> st.LabPod:
    return st.LabPod(name, namespace, "node1", f"ocl-t.pod.{namespace}.{name}", f"c-{namespace}-{name}")


def test_pods_are_named_per_namespace():
    s = _state(Path("/x"))
    s = s.with_pod(_pod("x", "a")).with_pod(_pod("y", "a")).with_pod(_pod("x", "b"))
    assert [p.key for p in s.pods] == ["default/p1", "x/a", "y/a", "x/b"]
    # NAMESPACE/NAME always; a bare NAME when one namespace has it
    assert s.pod("y/a").namespace == "y" and s.pod("b").key == "x/b" and s.pod("p1").key == "default/p1"
    with pytest.raises(UsageError) as e:
        s.pod("a")
    assert str(e.value).startswith("POD: pod 'a' is ambiguous") and "x/a, y/a" in str(e.value)
    with pytest.raises(UsageError, match="^SRC: pod 'a' is ambiguous"):
        s.pod("a", field="SRC")
    from overlaycni.errors import NotFound

    for missing in ("z/a", "c", "x/", "/a"):
        with pytest.raises(NotFound, match=f"POD: lab t has no pod '{missing}'.*x/a, y/a, b"):
            s.pod(missing)
    # output names a pod by its bare name unless that is ambiguous
    assert s.refs() == {"default/p1": "p1", "x/a": "x/a", "y/a": "y/a", "x/b": "b"}
    assert s.ref(s.pod("x/b")) == "b" and s.ref(s.pod("x/a")) == "x/a"
    # replacing and removing go by (namespace, name): y/a is untouched
    s2 = s.with_pod(st.LabPod("a", "x", "node2", "n", "c")).without_pod(s.pod("x/b"))
    assert [(p.key, p.node) for p in s2.pods] == [("default/p1", "node1"), ("y/a", "node1"), ("x/a", "node2")]
    assert s2.without_pod(s2.pod("x/a")).refs() == {"default/p1": "p1", "y/a": "a"}


def test_state_file_from_before_namespaced_pods_is_refused(tmp_path):
    s = _state(tmp_path)
    st.create_lab_dir("t", str(tmp_path))
    old = json.loads(st.to_json(s))
    del old["version"]
    (Path(s.lab_dir) / st.STATE_FILE).write_text(json.dumps(old))
    from overlaycni.errors import OverlayCNIError

    with pytest.raises(OverlayCNIError, match="another overlaycni version.*lab down --name t"):
        st.load("t", str(tmp_path))
    assert st.try_load("t", str(tmp_path)) is None  # what `lab down` uses: it cleans up by prefix


# --- tcpdump parsing ---------------------------------------------------------------------------

VXLAN_TEXT = """\
10:13:44.622660 IP 10.224.0.4.52138 > 10.224.0.5.4789: VXLAN, flags [I] (0x08), vni 4096
ARP, Request who-has 10.244.5.1 tell 10.244.4.1, length 28
10:13:44.622698 IP 10.224.0.4.44879 > 10.224.0.5.4789: VXLAN, flags [I] (0x08), vni 4096
IP 10.244.4.2 > 10.244.5.2: ICMP echo request, id 7399, seq 1, length 85
10:13:44.622837 IP 10.224.0.5.44879 > 10.224.0.4.4789: VXLAN, flags [I] (0x08), vni 4096
IP 10.244.5.2 > 10.244.4.2: ICMP echo reply, id 7399, seq 1, length 85
10:13:44.8 IP6 :: > ff02::16: HBH ICMP6, multicast listener report v2, 1 group record(s), length 28
10:13:45.000001 IP 10.224.0.4 > 10.224.255.253: ICMP echo request, id 3, seq 1, length 108
"""


def test_parse_tcpdump_vxlan_and_plain():
    pk = parse_tcpdump(VXLAN_TEXT)
    assert len(pk) == 4
    req, rep, mld, plain = pk
    assert mld.version == 6 and mld.dst == ip_address("ff02::16") and not (mld.icmp_request or mld.icmp_reply)
    assert (req.outer_src, req.outer_dst, req.vni) == (IPv4Address("10.224.0.4"), IPv4Address("10.224.0.5"), 4096)
    assert (req.src, req.dst, req.icmp_request, req.length) == (IPv4Address("10.244.4.2"), IPv4Address("10.244.5.2"), True, 85)
    assert rep.icmp_reply and rep.outer_src == IPv4Address("10.224.0.5")
    assert plain.vni is None and plain.src == IPv4Address("10.224.0.4") and plain.length == 108


VXLAN_TEXT_V6 = """\
10:13:44.622698 IP 10.224.0.4.44879 > 10.224.0.5.4789: VXLAN, flags [I] (0x08), vni 4096
IP6 fd12:3456:789a::2 > fd12:3456:789a:0:1::2: ICMP6, echo request, id 4431, seq 1, length 568
10:13:44.622837 IP 10.224.0.5.44879 > 10.224.0.4.4789: VXLAN, flags [I] (0x08), vni 4096
IP6 fd12:3456:789a:0:1::2 > fd12:3456:789a::2: ICMP6, echo reply, id 4431, seq 1, length 568
10:13:44.9 IP6 fd00:10:224::4 > fd00:10:224::fffe: ICMP6, echo request, id 89, seq 1, length 453
10:13:45.1 IP6 fd00:10:224::4.40000 > fd00:10:224::5.80: Flags [S], seq 1, win 64800, length 0
"""


def test_parse_tcpdump_ipv6_inside_vxlan_and_plain():
    req, rep, plain, tcp = parse_tcpdump(VXLAN_TEXT_V6)
    assert (req.outer_src, req.outer_dst, req.vni) == (IPv4Address("10.224.0.4"), IPv4Address("10.224.0.5"), 4096)
    assert (req.src, req.dst, req.icmp_request, req.length, req.version) == (
        ip_address("fd12:3456:789a::2"), ip_address("fd12:3456:789a:0:1::2"), True, 568, 6)  # fmt: skip
    assert rep.icmp_reply and not rep.icmp_request and rep.outer_src == IPv4Address("10.224.0.5")
    assert plain.vni is None and plain.src == ip_address("fd00:10:224::4") and plain.icmp_request and plain.length == 453
    assert (tcp.src, tcp.dst, tcp.icmp_request) == (ip_address("fd00:10:224::4"), ip_address("fd00:10:224::5"), False)


# --- the runtime (libcni emulation) with stand-in plugins ----------------------------------------


def _plugin(bin_dir: Path, name: str, body: str) -> None:
    p = bin_dir / name
    p.write_text("#!/usr/bin/env python3\nimport json, os, sys\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


RECORDER = """
conf = json.load(sys.stdin)
log = os.path.join(os.path.dirname(sys.argv[0]), "calls.jsonl")
with open(log, "a") as fh:
    fh.write(json.dumps({"type": conf["type"], "cmd": os.environ["CNI_COMMAND"], "prev": "prevResult" in conf,
        "name": conf.get("name"), "ver": conf.get("cniVersion"), "args": os.environ["CNI_ARGS"],
        "ifname": os.environ["CNI_IFNAME"]}) + "\\n")
if os.environ["CNI_COMMAND"] == "DEL" and conf.get("fail_del"):
    print(json.dumps({"cniVersion": "1.0.0", "code": 11, "msg": "agent gone"})); sys.exit(1)
if os.environ["CNI_COMMAND"] == "ADD":
    res = conf.get("prevResult") or {"cniVersion": conf["cniVersion"], "ips": [{"address": "10.244.1.7/24", "gateway": "10.244.1.1"}]}
    failures = os.path.join(os.path.dirname(sys.argv[0]), "failures")
    if conf.get("fail") and (conf.get("fail_times") is None or os.path.getsize(failures) < conf["fail_times"]):
        open(failures, "a").write("x")
        print(json.dumps({"cniVersion": "1.0.0", "code": conf["fail"], "msg": "try later"})); sys.exit(1)
    print(json.dumps(res))
"""


def _conflist(tmp_path: Path, *, fail_code: int = 0, fail_times: int | None = None, fail_del: bool = False) -> runtime.ConfList:
    d = tmp_path / "net.d"
    d.mkdir()
    second = {"type": "second", "fail": fail_code, "fail_times": fail_times, "fail_del": fail_del}
    doc = {"cniVersion": "1.0.0", "name": "testnet", "plugins": [{"type": "first"}, second]}
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin" / "failures").write_text("")
    (d / "10-test.conflist").write_text(json.dumps(doc))
    return runtime.load_conflist(d)


def _calls(bin_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (bin_dir / "calls.jsonl").read_text().splitlines()]


def test_runtime_chain_add_and_del(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for n in ("first", "second"):
        _plugin(bin_dir, n, RECORDER)
    conf = _conflist(tmp_path)
    att = runtime.Attachment(container_id="c1", netns=str(tmp_path), pod_namespace="ns1", pod_name="p1")
    res = runtime.add(conf, att, cni_path=[str(bin_dir)])
    assert res.ip == IPv4Interface("10.244.1.7/24") and res.gateway == IPv4Address("10.244.1.1")
    runtime.delete(conf, att, cni_path=[str(bin_dir)], prev_result=res.raw)
    calls = _calls(bin_dir)
    assert [(c["type"], c["cmd"], c["prev"]) for c in calls] == [
        ("first", "ADD", False), ("second", "ADD", True), ("second", "DEL", True), ("first", "DEL", True),
    ]  # fmt: skip
    assert all(c["name"] == "testnet" and c["ver"] == "1.0.0" and c["ifname"] == "eth0" for c in calls)
    assert "K8S_POD_NAMESPACE=ns1" in calls[0]["args"] and "K8S_POD_NAME=p1" in calls[0]["args"]


ONE_TRY = [("first", "ADD"), ("second", "ADD"), ("second", "DEL"), ("first", "DEL")]


def test_runtime_failure_undoes_and_carries_code(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for n in ("first", "second"):
        _plugin(bin_dir, n, RECORDER)
    conf = _conflist(tmp_path, fail_code=7)
    att = runtime.Attachment(container_id="c1", netns=str(tmp_path))
    with pytest.raises(CNIError) as e:
        runtime.add(conf, att, cni_path=[str(bin_dir)])
    assert e.value.cni_code == 7 and "try later" in e.value.message
    assert [(c["type"], c["cmd"]) for c in _calls(bin_dir)] == ONE_TRY  # a permanent error: no retry


def test_runtime_retries_try_again_later(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.time, "sleep", lambda _s: None)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for n in ("first", "second"):
        _plugin(bin_dir, n, RECORDER)
    conf = _conflist(tmp_path, fail_code=11, fail_times=2)
    att = runtime.Attachment(container_id="c1", netns=str(tmp_path))
    res = runtime.add(conf, att, cni_path=[str(bin_dir)])  # two "try again later", then success
    assert res.ip == IPv4Interface("10.244.1.7/24")
    assert [(c["type"], c["cmd"]) for c in _calls(bin_dir)] == ONE_TRY * 2 + [("first", "ADD"), ("second", "ADD")]


@pytest.mark.parametrize("del_fails", [True, False], ids=["teardown-failed", "control-teardown-worked"])
def test_runtime_retries_an_add_only_once_its_del_worked(tmp_path, monkeypatch, del_fails):
    """A "try again later" whose DEL failed too (the agent died between them)
    is final: an ADD over the half-made attachment would meet "eth0 already
    exists" (soak2). Control: the same failure with a DEL that works is retried."""
    monkeypatch.setattr(runtime.time, "sleep", lambda _s: None)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for n in ("first", "second"):
        _plugin(bin_dir, n, RECORDER)
    conf = _conflist(tmp_path, fail_code=11, fail_times=1, fail_del=del_fails)
    att = runtime.Attachment(container_id="c1", netns=str(tmp_path))
    if del_fails:
        with pytest.raises(CNIError) as e:
            runtime.add(conf, att, cni_path=[str(bin_dir)])
        assert e.value.cni_code == 11 and "try later" in e.value.message  # the ADD's error, not the DEL's
        assert [(c["type"], c["cmd"]) for c in _calls(bin_dir)] == ONE_TRY  # no second ADD
    else:
        assert runtime.add(conf, att, cni_path=[str(bin_dir)]).ip == IPv4Interface("10.244.1.7/24")
        assert [(c["type"], c["cmd"]) for c in _calls(bin_dir)] == ONE_TRY + [("first", "ADD"), ("second", "ADD")]


def test_runtime_gives_up_after_its_attempts(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.time, "sleep", lambda _s: None)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for n in ("first", "second"):
        _plugin(bin_dir, n, RECORDER)
    conf = _conflist(tmp_path, fail_code=11)
    with pytest.raises(CNIError) as e:
        runtime.add(conf, runtime.Attachment(container_id="c1", netns=str(tmp_path)), cni_path=[str(bin_dir)])
    assert e.value.cni_code == 11
    assert [(c["type"], c["cmd"]) for c in _calls(bin_dir)] == ONE_TRY * runtime.ADD_ATTEMPTS


def test_runtime_missing_plugin_and_netns(tmp_path):
    conf = _conflist(tmp_path)
    with pytest.raises(CNIError, match="not found on CNI_PATH"):
        runtime.add(conf, runtime.Attachment("c", str(tmp_path)), cni_path=[str(tmp_path)])
    from overlaycni.errors import NetnsNotFound

    with pytest.raises(NetnsNotFound):
        runtime.add(conf, runtime.Attachment("c", str(tmp_path / "gone")), cni_path=[str(tmp_path)])


# --- CLI: bad input is a clear error, never a traceback ---------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["lab", "up", "--name", "Bad_Name"], "--name"),
        (["lab", "up", "--name", "x", "--store", "mongo"], "--store"),
        (["lab", "up", "--name", "x", "--nodes", "0"], "--nodes"),
        (["lab", "up", "--name", "x", "--network-plugin", "azure", "--network-plugin-mode", "overlay",
          "--pod-cidr", "192.0.2.0/24"], "--pod-cidr"),  # fmt: skip
        (["lab", "status", "--name", "nosuchlab"], "no lab named"),
        (["lab", "down", "--name", "UPPER"], "--name"),
    ],
)
def test_cli_errors_are_clear(tmp_path, args, needle):
    res = CliRunner().invoke(app, args, env={"OVERLAYCNI_LAB_DIR": str(tmp_path)})
    out = res.output + (str(res.exception) if res.exception and not isinstance(res.exception, SystemExit) else "")
    assert res.exit_code != 0
    assert needle in out
    assert not list(tmp_path.iterdir())  # nothing made


def test_lab_list_empty(tmp_path):
    res = CliRunner().invoke(app, ["lab", "list", "-o", "json"], env={"OVERLAYCNI_LAB_DIR": str(tmp_path)})
    assert res.exit_code == 0
    assert all(not r["name"].startswith("nonexistent") for r in json.loads(res.output))


@pytest.mark.parametrize(
    "pod, namespace, want",
    [("a", None, ("default", "a")), ("a", "x", ("x", "a")), ("x/a", None, ("x", "a")), ("x/a", "x", ("x", "a"))],
)
def test_pod_add_takes_name_or_namespace_slash_name(pod, namespace, want):
    from overlaycni.lab.members import split_pod_ref

    assert split_pod_ref(pod, namespace) == want


@pytest.mark.parametrize(
    "pod, namespace, words",
    [("x/a", "y", "names namespace 'x' but --namespace is 'y'"), ("X/a", None, "POD: 'X'"),
     ("a", "Bad_NS", "--namespace: 'Bad_NS'"), ("x/a/b", None, "POD: 'x/a'"), ("x/", None, "POD: ''")],
)  # fmt: skip
def test_pod_add_bad_pod_or_namespace(pod, namespace, words):
    from overlaycni.lab.members import split_pod_ref

    with pytest.raises(UsageError, match=words.replace("(", r"\(")):
        split_pod_ref(pod, namespace)


def test_help_shows_the_allowed_characters():
    """rich reads help text as markup; '[a-z0-9-]' must survive it."""
    for args, words in ((["lab", "up", "--help"], "up to 12 of [a-z0-9-]"), (["lab", "namespace", "add", "--help"], "([a-z0-9-])")):
        res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert res.exit_code == 0 and words in res.output, res.output


def test_errors_print_user_input_literally(tmp_path):
    """A name that looks like rich markup is printed as typed, once, without a traceback."""
    res = CliRunner().invoke(app, ["lab", "status", "--name", "[bold]x"], env={"OVERLAYCNI_LAB_DIR": str(tmp_path), "COLUMNS": "200"})
    assert res.exit_code == 2, res.output
    assert "error: --name: '[bold]x' may only hold" in res.output and "Traceback" not in res.output


# --- concurrent `lab pod add` (found by bench/soak.py, seed 1: a burst lost pods) -------------


def test_concurrent_pod_adds_keep_each_others_records(tmp_path, monkeypatch):
    """Two `lab pod add`s at once: the slower one's ADD finishing last must not
    write back a state file that drops the faster one's pod (it did: its pod
    then leaked, with an allocation, a veth and a namespace the lab no longer
    knew). Control: the adds really overlapped, and the same pod added twice
    at once is refused, not recorded twice."""
    import threading
    from dataclasses import replace

    from overlaycni.errors import AlreadyExists
    from overlaycni.lab import members

    st.create_lab_dir("t", str(tmp_path))
    st.save(_state(tmp_path))
    slow_in, fast_done = threading.Event(), threading.Event()
    ips = iter(range(10, 20))

    def fake_add(state, node, pod, *, ips_=(), **_kw):
        if pod.name == "slow":
            slow_in.set()
            assert fast_done.wait(10)
        return replace(pod, ip=IPv4Interface(f"10.244.0.{next(ips)}/24"))

    monkeypatch.setattr(members.control, "cni_add", fake_add)
    monkeypatch.setattr(members.lab_policy, "publish_pod", lambda *_a: None)
    monkeypatch.setattr(members.netns, "require_privileges", lambda: None)
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            members.add_pod("t", "slow", node="node1", root=str(tmp_path))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=slow)
    t.start()
    assert slow_in.wait(10)  # control: "slow" is inside its ADD while "fast" runs
    members.add_pod("t", "fast", node="node1", root=str(tmp_path))
    with pytest.raises(AlreadyExists, match="default/slow already exists"):  # claimed, under the lock, before its ADD
        members.add_pod("t", "slow", node="node1", root=str(tmp_path))
    fast_done.set()
    t.join(10)
    assert not errors
    pods = {p.key: p for p in st.load("t", str(tmp_path)).pods}
    assert sorted(pods) == ["default/fast", "default/p1", "default/slow"]
    assert all(p.ip is not None for p in pods.values()), pods
    assert {"ocl-t.pod.default.fast", "ocl-t.pod.default.slow"} <= set(st.load("t", str(tmp_path)).namespaces)
