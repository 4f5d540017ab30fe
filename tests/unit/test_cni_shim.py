"""The plugin shim, run exactly as a runtime runs it (a subprocess with CNI_*
env and the config on stdin), against a stand-in agent on a unix socket.
The real agent is exercised by tests/kernel/test_cni_agent.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlaycni.cni import shim
from overlaycni.cni.install import install_cni

SHIM = Path(shim.__file__)


class StandInAgent:
    """Answers every request with a canned answer and records the requests."""

    def __init__(self, path: str, answer: dict | None = None, *, silent: bool = False) -> None:
        self.path, self.answer, self.silent = path, answer or {"ok": True}, silent
        self.requests: list[dict] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = conn.makefile("rb").readline()
                self.requests.append(json.loads(data))
                if self.silent:
                    threading.Event().wait(10)
                    continue
                conn.sendall(json.dumps(self.answer).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def sockpath(tmp_path):
    return str(tmp_path / "agent.sock")


def run_plugin(env: dict, config: dict | str | None, *, plugin: Path = SHIM) -> tuple[int, dict | None, str]:
    stdin = config if isinstance(config, str) else (json.dumps(config) if config is not None else "")
    full_env = {"PATH": os.environ.get("PATH", "")}
    full_env.update(env)
    cmd = [str(plugin)] if plugin != SHIM else [sys.executable, "-IS", str(plugin)]
    p = subprocess.run(cmd, input=stdin, env=full_env, capture_output=True, text=True, timeout=20)
    doc = json.loads(p.stdout) if p.stdout.strip() else None
    return p.returncode, doc, p.stderr


def base_env(command: str = "ADD") -> dict:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee01",
        "CNI_NETNS": "/var/run/netns/nope",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1",
    }


def conf(sockpath: str, version: str = "1.1.0", **extra) -> dict:
    return {"cniVersion": version, "name": "overlaycni", "type": "overlaycni", "socket": sockpath, **extra}


def test_version_needs_no_agent():
    code, doc, err = run_plugin({"CNI_COMMAND": "VERSION"}, {"cniVersion": "1.1.0"})
    assert code == 0, err
    assert doc["cniVersion"] == "1.1.0"
    assert set(doc["supportedVersions"]) >= {"0.3.1", "0.4.0", "1.0.0", "1.1.0"}


def test_add_forwards_env_and_config_and_prints_the_agent_result(sockpath):
    result = {"cniVersion": "1.1.0", "interfaces": [], "ips": [{"address": "10.244.1.2/24"}]}
    agent = StandInAgent(sockpath, {"result": result})
    try:
        code, doc, err = run_plugin(base_env(), conf(sockpath, runtimeConfig={"ips": ["10.244.1.9"]}, extra={"x": 1}))
    finally:
        agent.close()
    assert code == 0, err
    assert doc == result
    (req,) = agent.requests
    assert req["command"] == "ADD"
    assert req["container_id"] == "c0ffee01" and req["ifname"] == "eth0"
    assert req["netns"] == "/var/run/netns/nope"
    assert req["args"]["K8S_POD_NAME"] == "web-1"
    assert req["config"]["runtimeConfig"] == {"ips": ["10.244.1.9"]}  # unknown keys pass through


def test_agent_error_becomes_spec_error_json(sockpath):
    agent = StandInAgent(sockpath, {"error": {"code": 100, "msg": "block 10.244.1.0/24 of node n1 is full"}})
    try:
        code, doc, _ = run_plugin(base_env(), conf(sockpath, "0.4.0"))
    finally:
        agent.close()
    assert code != 0
    assert doc == {"cniVersion": "0.4.0", "code": 100, "msg": "block 10.244.1.0/24 of node n1 is full"}


def test_del_success_prints_nothing(sockpath):
    agent = StandInAgent(sockpath)
    try:
        code, doc, err = run_plugin({**base_env("DEL"), "CNI_NETNS": ""}, conf(sockpath))
    finally:
        agent.close()
    assert code == 0, err
    assert doc is None


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC"])
def test_unreachable_agent_is_try_again_later(command, sockpath):
    code, doc, _ = run_plugin(base_env(command), conf(sockpath))
    assert code != 0
    assert doc["code"] == 11
    assert sockpath in doc["msg"]


def test_status_without_agent_is_not_available(sockpath):
    code, doc, _ = run_plugin(base_env("STATUS"), conf(sockpath))
    assert code != 0 and doc["code"] == 50


def test_silent_agent_answers_11_within_the_timeout(sockpath, monkeypatch):
    agent = StandInAgent(sockpath, silent=True)
    try:
        monkeypatch.setattr(shim, "REPLY_TIMEOUT", 0.3)
        code, doc = shim.run(base_env(), json.dumps(conf(sockpath)))
    finally:
        agent.close()
    assert code == 1 and doc["code"] == 11


@pytest.mark.parametrize(
    "env_change, code",
    [
        ({"CNI_COMMAND": "BOGUS"}, 4),
        ({"CNI_CONTAINERID": ""}, 4),
        ({"CNI_CONTAINERID": "../etc"}, 4),
        ({"CNI_IFNAME": ""}, 4),
        ({"CNI_IFNAME": "a-very-long-interface-name"}, 4),
        ({"CNI_IFNAME": "eth/0"}, 4),
        ({"CNI_NETNS": ""}, 4),
        ({"CNI_ARGS": "novalue"}, 4),
    ],
)
def test_bad_env_is_code_4(env_change, code, sockpath):
    got, doc, _ = run_plugin({**base_env(), **env_change}, conf(sockpath))
    assert got != 0 and doc["code"] == code, doc


@pytest.mark.parametrize(
    "stdin, code",
    [
        ("{not json", 6),
        ("[1, 2]", 6),
        (json.dumps({"name": "x", "type": "overlaycni"}), 7),
        (json.dumps({"cniVersion": "9.9.9", "name": "x"}), 1),
        (json.dumps({"cniVersion": "1.0.0", "type": "overlaycni"}), 7),
        (json.dumps({"cniVersion": "1.0.0", "name": "x", "socket": 5}), 7),
    ],
)
def test_bad_config(stdin, code):
    got, doc, _ = run_plugin(base_env(), stdin)
    assert got != 0 and doc["code"] == code, doc
    assert set(doc) <= {"cniVersion", "code", "msg", "details"}


def test_installed_plugin_runs_standalone(tmp_path, sockpath):
    """install-cni writes a self-contained executable (shebang -IS, stdlib only)."""
    inst = install_cni(cluster="c1", bin_dir=str(tmp_path / "bin"), conf_dir=str(tmp_path / "net.d"), socket=sockpath)
    assert os.access(inst.plugin, os.X_OK)
    conflist = json.loads(inst.conflist.read_text())
    assert conflist["plugins"][0] == {"type": "overlaycni", "cluster": "c1", "socket": sockpath, "capabilities": {"ips": True}}
    net = {**conflist["plugins"][0], "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
    agent = StandInAgent(sockpath, {"result": {"cniVersion": "1.0.0", "ips": []}})
    try:
        code, doc, err = run_plugin(base_env(), net, plugin=inst.plugin)
    finally:
        agent.close()
    assert code == 0, err
    assert doc == {"cniVersion": "1.0.0", "ips": []}


# ----- fuzzing: any env and config ends in a valid CNI answer, never a traceback ----

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=4),
    max_leaves=10,
)


@st.composite
def requests(draw):
    env = {
        "CNI_COMMAND": draw(st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "", "add"]) | text),
        "CNI_CONTAINERID": draw(st.sampled_from(["abc123", ""]) | text),
        "CNI_NETNS": draw(st.sampled_from(["/var/run/netns/x", ""]) | text),
        "CNI_IFNAME": draw(st.sampled_from(["eth0", ""]) | text),
        "CNI_ARGS": draw(st.sampled_from(["", "K8S_POD_NAME=a;K8S_POD_NAMESPACE=b"]) | text),
    }
    base = {
        "cniVersion": draw(st.sampled_from(["0.3.1", "0.4.0", "1.0.0", "1.1.0", "2.0", ""]) | json_values),
        "name": draw(st.sampled_from(["overlaycni", ""]) | json_values),
        "type": "overlaycni",
        "socket": "/nonexistent/overlaycni-fuzz.sock",
    }
    extra = draw(st.dictionaries(text, json_values, max_size=3))
    stdin = draw(st.sampled_from([json.dumps({**extra, **base}), "", "{", "null"]) | text)
    return env, stdin


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_fuzzed_requests_always_get_a_valid_answer(req):
    env, stdin = req
    code, doc = shim.run(env, stdin)
    if code == 0:
        # only VERSION can succeed without an agent
        assert env["CNI_COMMAND"] == "VERSION" and "supportedVersions" in doc
        return
    assert isinstance(doc, dict)
    assert isinstance(doc["code"], int) and doc["code"] in (1, 4, 6, 7, 11, 50)
    assert isinstance(doc["msg"], str) and doc["msg"]
    assert set(doc) <= {"cniVersion", "code", "msg", "details"}
    json.dumps(doc)  # printable


def test_fuzz_subprocess_never_prints_a_traceback(sockpath):
    for stdin in ["", "{", "\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), json.dumps([None])]:
        code, doc, err = run_plugin(base_env(), stdin)
        assert code != 0 and "Traceback" not in err and doc["code"] in (4, 6, 7, 11)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_shim_codec_agrees_with_json(value):
    text = json.dumps(value)
    assert shim.json_loads(text) == json.loads(text)
    assert json.loads(shim.json_dumps(value)) == value


@given(text)
def test_shim_decoder_rejects_what_json_rejects(s):
    try:
        expected = json.loads(s)
    except ValueError:
        with pytest.raises(ValueError):
            shim.json_loads(s)
    else:
        got = shim.json_loads(s)
        assert got == expected or (got != got and expected != expected)  # NaN


def test_shim_does_not_import_the_slow_modules():
    code = (
        f"import sys; src = open({str(SHIM)!r}).read(); exec(compile(src, 'shim', 'exec'), {{'__name__': 'not_main'}}); "
        "print(sorted(m for m in ('json', 're', 'socket', 'enum') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-IS", "-c", code], capture_output=True, text=True).stdout.strip()
    assert out == "[]"


def test_shim_codec_falls_back_to_json_without_the_c_core(monkeypatch):
    monkeypatch.setattr(shim, "_json", None)
    assert shim.json_loads('{"a": [1, null]}') == {"a": [1, None]}
    assert json.loads(shim.json_dumps({"b": "é"})) == {"b": "é"}
    with pytest.raises(ValueError):
        shim.json_loads("{")
