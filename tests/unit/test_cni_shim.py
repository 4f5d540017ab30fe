"""The plugin, run exactly as a runtime runs it (a subprocess with CNI_* env
and the config on stdin), against a stand-in agent on a unix socket. Every
test runs against both builds: ``python`` (cni/shim.py) and ``native``
(build/overlaycni-shim, compiled from cni/shim.c by ``make``). The real
agent is exercised by tests/kernel/test_cni_agent.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlaycni.agent.server import serve_unix
from overlaycni.cni import shim
from overlaycni.cni.install import NATIVE_SHIM, Shim, install_cni, native_shim_problem
from overlaycni.errors import UsageError

PYTHON_SHIM = Path(shim.__file__)
KINDS = ["python", "native"]
MAX_DEPTH = 128  # shim.c's MAX_DEPTH


class StandInAgent:
    """Answers every request with a canned answer and records the requests."""

    def __init__(self, path: str, answer: dict | list | str | None = None, *, silent: bool = False) -> None:
        self.path, self.silent = path, silent
        self.answer = (answer if isinstance(answer, str) else json.dumps(answer)) if answer is not None else '{"ok": true}'
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
                try:
                    conn.sendall(self.answer.encode() + b"\n")
                except OSError:
                    pass  # the plugin stopped reading (an oversized answer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="session")
def native_shim() -> Path:
    problem = native_shim_problem(NATIVE_SHIM)
    if problem:
        pytest.fail(f"the native plugin cannot run: {problem}")
    return NATIVE_SHIM


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    if request.param == "native":
        request.getfixturevalue("native_shim")
    return request.param


@pytest.fixture()
def sockpath(tmp_path):
    return str(tmp_path / "agent.sock")


def plugin_argv(plugin: str | Path) -> list[str]:
    if plugin == "python":
        return [sys.executable, "-IS", str(PYTHON_SHIM)]
    return [str(NATIVE_SHIM if plugin == "native" else plugin)]


def run_plugin(env: dict, config: dict | str | bytes | None, *, plugin: str | Path) -> tuple[int, dict | None, str]:
    """Run the plugin; whatever the input, it must exit 0 or 1 (never by a
    signal), print at most one line of JSON and nothing on stderr."""
    stdin = config if isinstance(config, str | bytes) else (json.dumps(config) if config is not None else "")
    full_env = {"PATH": os.environ.get("PATH", ""), **env}
    data = stdin if isinstance(stdin, bytes) else stdin.encode()
    p = subprocess.run(plugin_argv(plugin), input=data, env=full_env, capture_output=True, timeout=20)
    out, err = p.stdout.decode(), p.stderr.decode(errors="replace")
    assert p.returncode in (0, 1), (p.returncode, out, err)
    assert err == "", err
    assert out == "" or (out.endswith("\n") and out.count("\n") == 1), out
    doc = json.loads(out) if out else None
    return p.returncode, doc, err


def run_doc(kind: str, env: dict, stdin: str) -> tuple[int, dict | None]:
    """(exit code, document): shim.run in-process for python (fast), the binary for native."""
    if kind == "python":
        return shim.run(env, stdin)
    code, doc, _ = run_plugin(env, stdin, plugin="native")
    return code, doc


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


def test_version_needs_no_agent(kind):
    code, doc, err = run_plugin({"CNI_COMMAND": "VERSION"}, {"cniVersion": "1.0.0"}, plugin=kind)
    assert code == 0, err
    assert doc == {"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    code, doc, _ = run_plugin({"CNI_COMMAND": "VERSION"}, None, plugin=kind)
    assert code == 0 and doc["cniVersion"] == "1.1.0"


def test_add_forwards_env_and_config_and_prints_the_agent_result(kind, sockpath):
    result = {"cniVersion": "1.1.0", "interfaces": [], "ips": [{"address": "10.244.1.2/24"}]}
    agent = StandInAgent(sockpath, {"result": result})
    try:
        config = conf(sockpath, runtimeConfig={"ips": ["10.244.1.9"]}, extra={"x": 1, "é": "\u2028\U0001f600"})
        code, doc, err = run_plugin(base_env(), json.dumps(config, indent=2, ensure_ascii=False), plugin=kind)
    finally:
        agent.close()
    assert code == 0, err
    assert doc == result
    (req,) = agent.requests
    assert req["command"] == "ADD"
    assert req["container_id"] == "c0ffee01" and req["ifname"] == "eth0"
    assert req["netns"] == "/var/run/netns/nope" and req["path"] == "/opt/cni/bin"
    assert req["args"] == {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web-1"}
    assert req["config"] == config  # unknown keys pass through, as they were


def test_agent_error_becomes_spec_error_json(kind, sockpath):
    agent = StandInAgent(sockpath, {"error": {"code": 100, "msg": "block 10.244.1.0/24 of node n1 is full"}})
    try:
        code, doc, _ = run_plugin(base_env(), conf(sockpath, "0.4.0"), plugin=kind)
    finally:
        agent.close()
    assert code != 0
    assert doc == {"cniVersion": "0.4.0", "code": 100, "msg": "block 10.244.1.0/24 of node n1 is full"}


@pytest.mark.parametrize(
    "answer, code, doc",
    [
        ({"ok": True}, 0, None),
        ({"result": None}, 0, None),
        ({"result": {"cniVersion": "1.0.0", "é": "ü"}}, 0, {"cniVersion": "1.0.0", "é": "ü"}),
        ({"error": {"code": 7, "msg": "m", "details": "d"}}, 1, {"cniVersion": "1.1.0", "code": 7, "msg": "m", "details": "d"}),
        ({"error": {"code": 7, "msg": "m", "details": None}}, 1, {"cniVersion": "1.1.0", "code": 7, "msg": "m"}),
        ({"error": {"code": 7, "msg": 5}}, 1, {"cniVersion": "1.1.0", "code": 7, "msg": "5"}),
        ({"error": {"code": 7}}, 1, {"cniVersion": "1.1.0", "code": 7, "msg": "agent error"}),
        ({"error": {"msg": "m"}}, 1, {"cniVersion": "1.1.0", "code": 999, "msg": "m"}),
        ({"error": {"code": 4294967295, "msg": "m"}}, 1, {"cniVersion": "1.1.0", "code": 4294967295, "msg": "m"}),
        ({"error": {"code": 4294967296}}, 1, {"cniVersion": "1.1.0", "code": 999, "msg": "overlaycni agent error code is not an integer 0..4294967295"}),
        ({"error": {"code": 7.0}}, 1, {"cniVersion": "1.1.0", "code": 999, "msg": "overlaycni agent error code is not an integer 0..4294967295"}),
        ({"error": {"code": "7"}}, 1, {"cniVersion": "1.1.0", "code": 999, "msg": "overlaycni agent error code is not an integer 0..4294967295"}),
        ({"error": {"code": -1}}, 1, {"cniVersion": "1.1.0", "code": 999, "msg": "overlaycni agent error code is not an integer 0..4294967295"}),
        ({"error": "boom"}, 1, {"cniVersion": "1.1.0", "code": 999, "msg": "overlaycni agent error is not a JSON object"}),
        (["error"], 1, {"cniVersion": "1.1.0", "code": 999, "msg": "overlaycni agent answer is not a JSON object"}),
        ("not json", 1, {"cniVersion": "1.1.0", "code": 11, "msg": "overlaycni agent closed the connection without an answer"}),
        ("", 1, {"cniVersion": "1.1.0", "code": 11, "msg": "overlaycni agent closed the connection without an answer"}),
    ],
)
def test_agent_answers_are_mapped_alike(kind, sockpath, answer, code, doc):
    agent = StandInAgent(sockpath, answer)
    try:
        got, out, err = run_plugin(base_env(), conf(sockpath), plugin=kind)
    finally:
        agent.close()
    assert (got, out) == (code, doc), err


def test_oversized_agent_answer_is_an_error(kind, sockpath):
    agent = StandInAgent(sockpath, '{"result": "' + "x" * shim.MAX_ANSWER + '"}')
    try:
        code, doc, _ = run_plugin(base_env(), conf(sockpath), plugin=kind)
    finally:
        agent.close()
    assert (code, doc["code"]) == (1, 999)
    assert doc["msg"] == "overlaycni agent answer is larger than 16777216 bytes"


def test_del_success_prints_nothing(kind, sockpath):
    agent = StandInAgent(sockpath)
    try:
        code, doc, err = run_plugin({**base_env("DEL"), "CNI_NETNS": ""}, conf(sockpath), plugin=kind)
    finally:
        agent.close()
    assert code == 0, err
    assert doc is None
    assert agent.requests[0]["netns"] == ""


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC"])
def test_unreachable_agent_is_try_again_later(kind, command, sockpath):
    code, doc, _ = run_plugin(base_env(command), conf(sockpath), plugin=kind)
    assert code != 0
    assert doc == {
        "cniVersion": "1.1.0", "code": 11, "msg": f"overlaycni agent is not reachable at {sockpath}",
        "details": "No such file or directory; is the agent running on this node?",
    }  # fmt: skip


def test_too_long_socket_path_is_try_again_later(kind, tmp_path):
    code, doc, _ = run_plugin(base_env(), conf(str(tmp_path / ("s" * 120))), plugin=kind)
    assert code == 1 and doc["code"] == 11
    assert doc["details"] == "AF_UNIX path too long; is the agent running on this node?"


def test_status_without_agent_is_not_available(kind, sockpath):
    code, doc, _ = run_plugin(base_env("STATUS"), conf(sockpath), plugin=kind)
    assert code != 0 and doc["code"] == 50


def test_silent_agent_answers_11_within_the_timeout(kind, sockpath, monkeypatch):
    agent = StandInAgent(sockpath, silent=True)
    try:
        if kind == "python":
            monkeypatch.setattr(shim, "REPLY_TIMEOUT", 0.3)
            code, doc = shim.run(base_env(), json.dumps(conf(sockpath)))
        else:  # its 4.5 s are compiled in
            code, doc, _ = run_plugin(base_env(), conf(sockpath), plugin=kind)
    finally:
        agent.close()
    assert code == 1 and doc["code"] == 11
    assert doc["msg"].startswith("overlaycni agent did not answer within")


@pytest.mark.parametrize(
    "env_change, code",
    [
        ({"CNI_COMMAND": "BOGUS"}, 4),
        ({"CNI_COMMAND": "add"}, 4),
        ({"CNI_CONTAINERID": ""}, 4),
        ({"CNI_CONTAINERID": "../etc"}, 4),
        ({"CNI_CONTAINERID": "_abc"}, 4),
        ({"CNI_IFNAME": ""}, 4),
        ({"CNI_IFNAME": "."}, 4),
        ({"CNI_IFNAME": "a-very-long-interface-name"}, 4),
        ({"CNI_IFNAME": "é" * 8}, 4),  # 8 characters, 16 bytes: too long for the kernel
        ({"CNI_IFNAME": "eth/0"}, 4),
        ({"CNI_IFNAME": "eth:0"}, 4),
        ({"CNI_IFNAME": "eth\u00a00"}, 4),  # a no-break space is whitespace too
        ({"CNI_IFNAME": "eth\r0"}, 4),
        ({"CNI_NETNS": ""}, 4),
        ({"CNI_ARGS": "novalue"}, 4),
        ({"CNI_ARGS": "=value"}, 4),
    ],
)
def test_bad_env_is_code_4(kind, env_change, code, sockpath):
    got, doc, _ = run_plugin({**base_env(), **env_change}, conf(sockpath), plugin=kind)
    assert got != 0 and doc["code"] == code, doc
    assert doc["cniVersion"] == "1.1.0"


def test_whitespace_is_pythons_isspace(kind, sockpath):
    """Every character str.isspace() knows (shim.c keeps a table of them):
    refused in CNI_IFNAME, and stdin of only these is no config at all."""
    spaces = "".join(c for c in map(chr, range(0x110000)) if c.isspace())
    assert len(spaces) == 29
    for c in spaces:
        code, doc, _ = run_plugin({**base_env(), "CNI_IFNAME": f"e{c}0"}, conf(sockpath), plugin=kind)
        assert code == 1 and doc["code"] == 4 and "CNI_IFNAME" in doc["msg"], repr(c)
    code, doc, _ = run_plugin({"CNI_COMMAND": "VERSION"}, spaces, plugin=kind)
    assert code == 0 and doc["cniVersion"] == "1.1.0"
    code, doc, _ = run_plugin({"CNI_COMMAND": "VERSION"}, spaces + "\u200b", plugin=kind)  # not whitespace: a config
    assert code == 1 and doc["code"] == 6


def test_good_env_edges_reach_the_agent(kind, sockpath):
    """The control for the table above: the edges that are valid pass."""
    agent = StandInAgent(sockpath)
    try:
        env = {**base_env(), "CNI_IFNAME": "é" * 7, "CNI_CONTAINERID": "a_b.c-1", "CNI_ARGS": ";A=1;;B=x=y;A=2;"}
        code, doc, err = run_plugin(env, conf(sockpath), plugin=kind)
    finally:
        agent.close()
    assert code == 0, (doc, err)
    (req,) = agent.requests
    assert req["ifname"] == "é" * 7 and req["container_id"] == "a_b.c-1"
    assert req["args"] == {"A": "2", "B": "x=y"}


@pytest.mark.parametrize(
    "stdin, code",
    [
        ("{not json", 6),
        ("[1, 2]", 6),
        ('{"cniVersion": NaN, "name": "x"}', 6),  # RFC 8259 has no NaN
        ('{"cniVersion": "1.0.0", "name": "x"} {}', 6),
        ('{"cniVersion": "1.0.0", "name": "x\u0001"}', 6),  # a raw control character in a string
        ('{"cniVersion": "1.0.0", "name": "\\x"}', 6),
        ('{"cniVersion": "1.0.0", "name": 01}', 6),
        (b'{"cniVersion": "1.0.0", "name": "\xff"}', 6),  # not UTF-8
        (json.dumps({"name": "x", "type": "overlaycni"}), 7),
        (json.dumps({"cniVersion": "", "name": "x"}), 7),
        (json.dumps({"cniVersion": "9.9.9", "name": "x"}), 1),
        (json.dumps({"cniVersion": "1.0.0", "type": "overlaycni"}), 7),
        (json.dumps({"cniVersion": "1.0.0", "name": ""}), 7),
        (json.dumps({"cniVersion": "1.0.0", "name": "x", "socket": 5}), 7),
        (json.dumps({"cniVersion": "1.0.0", "name": "x", "socket": ""}), 7),
    ],
)
def test_bad_config(kind, stdin, code):
    got, doc, _ = run_plugin(base_env(), stdin, plugin=kind)
    assert got != 0 and doc["code"] == code, doc
    assert set(doc) <= {"cniVersion", "code", "msg", "details"}


def test_config_is_read_as_python_reads_a_dict(kind, sockpath):
    """Escaped member names match, and the last of duplicate members wins."""
    agent = StandInAgent(sockpath)
    stdin = '{"cniVersion": "0.1.0", "cni\\u0056ersion": "1.0.\\u0030", "name": "x", "socket": "/nowhere", "socket": "%s"}'
    try:
        code, doc, err = run_plugin(base_env(), stdin % sockpath, plugin=kind)
    finally:
        agent.close()
    assert code == 0, (doc, err)
    assert agent.requests[0]["config"]["cniVersion"] == "1.0.0"


def test_deep_nesting_and_oversized_stdin_are_permanent_errors(kind, sockpath):
    deep = json.dumps(conf(sockpath))[:-1] + ', "a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    code, doc, _ = run_plugin(base_env(), deep, plugin=kind)
    assert code == 1 and doc["code"] == 6 and doc["msg"] == "network config on stdin is not valid JSON"
    big = json.dumps(conf(sockpath))
    code, doc, _ = run_plugin(base_env(), big + " " * (shim.MAX_CONFIG + 1 - len(big)), plugin=kind)
    assert code == 1 and doc == {"cniVersion": "1.1.0", "code": 7, "msg": "network config on stdin is larger than 1048576 bytes"}
    # the controls: modest nesting, and exactly MAX_CONFIG bytes, reach the agent
    agent = StandInAgent(sockpath)
    try:
        nested = json.dumps(conf(sockpath, a=json.loads("[" * 100 + "]" * 100)))
        code, doc, err = run_plugin(base_env(), nested + " " * (shim.MAX_CONFIG - len(nested)), plugin=kind)
    finally:
        agent.close()
    assert code == 0, (doc, err)
    assert len(agent.requests) == 1


def test_native_nesting_limit_is_exact(native_shim):
    """shim.c takes MAX_DEPTH levels of nesting and refuses one more."""
    for depth, code in ((MAX_DEPTH, 7), (MAX_DEPTH + 1, 6)):
        stdin = '{"a": %s}' % ("[" * (depth - 1) + "]" * (depth - 1))
        got, doc, _ = run_plugin(base_env(), stdin, plugin=native_shim)
        assert got == 1 and doc["code"] == code, (depth, doc)  # 7: parsed, then cniVersion is missing


@pytest.mark.parametrize("shim_kind", [Shim.python, Shim.native])
def test_installed_plugin_runs_standalone(shim_kind, tmp_path, sockpath, native_shim):
    """install-cni writes a self-contained executable: the binary, or
    shim.py behind a #!python -IS line (standard library only)."""
    inst = install_cni(
        cluster="c1", bin_dir=str(tmp_path / "bin"), conf_dir=str(tmp_path / "net.d"), socket=sockpath, shim=shim_kind
    )
    assert inst.shim is shim_kind
    assert os.access(inst.plugin, os.X_OK)
    assert (inst.plugin.read_bytes()[:4] == b"\x7fELF") == (shim_kind is Shim.native)
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


def test_auto_takes_the_native_plugin_only_when_it_fits_this_machine(tmp_path, native_shim):
    def install(binary: Path, shim_kind: Shim = Shim.auto):
        return install_cni(cluster="c1", bin_dir=str(tmp_path / "bin"), conf_dir=str(tmp_path / "net.d"),
                           socket="/s", shim=shim_kind, native_binary=binary)  # fmt: skip

    assert install(native_shim).shim is Shim.native  # the control
    missing = install(tmp_path / "absent")
    assert missing.shim is Shim.python and "is not built" in missing.shim_reason
    foreign = tmp_path / "foreign"
    data = bytearray(native_shim.read_bytes())
    other = 183 if int.from_bytes(data[18:20], "little") != 183 else 62  # aarch64, or x86-64 on an aarch64 machine
    data[18:20] = other.to_bytes(2, "little")
    foreign.write_bytes(bytes(data))
    foreign.chmod(0o755)
    assert "built for another machine" in (native_shim_problem(foreign) or "")
    assert install(foreign).shim is Shim.python
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hello\n")
    assert "not an ELF executable" in (native_shim_problem(script) or "")
    copy = tmp_path / "copy"
    shutil.copy2(native_shim, copy)
    source = tmp_path / "shim.c"
    source.write_text("/* newer */\n")
    os.utime(copy, (source.stat().st_mtime - 10,) * 2)
    assert "is older than shim.c" in (native_shim_problem(copy, source=source) or "")
    assert native_shim_problem(copy, source=copy) is None
    with pytest.raises(UsageError, match="cannot install the native plugin"):
        install(tmp_path / "absent", Shim.native)
    with pytest.raises(UsageError, match="is not a shim"):
        install(native_shim, "rust")  # type: ignore[arg-type]
    assert install(native_shim, Shim.python).shim is Shim.python


def test_both_shims_speak_to_the_real_agent_socket_alike(native_shim, tmp_path):
    """The agent's own socket server and request parser (no kernel): the
    native shim's verbatim config parses to the same request as shim.py's."""
    seen: list = []
    path = str(tmp_path / "agent.sock")
    server = serve_unix(path, lambda req: seen.append(req) or {"cniVersion": req.version, "ips": []}, lambda *a: None)
    try:
        stdin = json.dumps(conf(path, "0.4.0", runtimeConfig={"ips": ["10.244.0.9/24"]}, x=[1.5, "é"]), indent=1)
        answers = [run_plugin(base_env(), stdin, plugin=k)[:2] for k in KINDS]
    finally:
        server.shutdown()
        server.server_close()
    assert answers[0] == answers[1] == (0, {"cniVersion": "0.4.0", "ips": []})
    assert seen[0] == seen[1]
    assert seen[0].config["x"] == [1.5, "é"] and seen[0].requested_ip is not None


# ----- fuzzing: any env and config ends in a valid CNI answer, never a crash ----

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
    stdin = draw(st.sampled_from([json.dumps({**extra, **base}), "", "{", "null", "[" * 300]) | text)
    return env, stdin


def assert_valid_answer(env: dict, code: int, doc: dict | None) -> None:
    if code == 0:
        # only VERSION can succeed without an agent
        assert env["CNI_COMMAND"] == "VERSION" and doc is not None and "supportedVersions" in doc
        return
    assert isinstance(doc, dict)
    assert isinstance(doc["code"], int) and doc["code"] in (1, 4, 6, 7, 11, 50)
    assert isinstance(doc["msg"], str) and doc["msg"]
    assert set(doc) <= {"cniVersion", "code", "msg", "details"}
    json.dumps(doc)  # printable


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(req=requests())
def test_fuzzed_requests_always_get_a_valid_answer(kind, req):
    env, stdin = req
    code, doc = run_doc(kind, env, stdin)
    assert_valid_answer(env, code, doc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(req=requests())
def test_fuzzed_requests_get_the_same_answer_from_both(native_shim, req):
    """Differential: same code, version and message from shim.c as from
    shim.py (details of a JSON syntax error differ: two parsers; repr() of
    exotic characters only approximated in C)."""
    env, stdin = req
    py, native = shim.run(env, stdin), run_doc("native", env, stdin)
    assert py[0] == native[0]
    if py[1] is None or native[1] is None or "code" not in py[1]:
        assert py[1] == native[1]
        return
    assert {k: py[1][k] for k in ("cniVersion", "code")} == {k: native[1][k] for k in ("cniVersion", "code")}
    if py[1]["code"] != 6 and all(v.isascii() and v.isprintable() for v in env.values()):
        assert py[1]["msg"] == native[1]["msg"]
        assert py[1].get("details") == native[1].get("details")


def test_fuzz_subprocess_never_prints_a_traceback(kind, sockpath):
    for stdin in ["", "{", "\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), json.dumps([None]), b"\xff\xfe"]:
        code, doc, err = run_plugin(base_env(), stdin, plugin=kind)
        assert code != 0 and "Traceback" not in err and doc["code"] in (4, 6, 7, 11)


def json_verdict(s: str) -> bool:
    """Is s one JSON text (RFC 8259: no NaN/Infinity)?"""

    def reject(name: str) -> None:
        raise ValueError(name)

    try:
        json.loads(s, parse_constant=reject)
    except (ValueError, RecursionError):
        return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=text | st.sampled_from(["NaN", "[Infinity]", "-0", "1e5", "[1,]", '"\\ud800"', '{"a":1,}', "01", "1.", "[]"]))
def test_decoder_rejects_what_json_rejects(kind, s):
    """Seen from outside: VERSION with s on stdin says "not valid JSON"
    exactly when Python's json (strict, RFC 8259) rejects s."""
    code, doc = run_doc(kind, {"CNI_COMMAND": "VERSION"}, s)
    says_invalid = code == 1 and doc is not None and doc["msg"] == "network config on stdin is not valid JSON"
    assert says_invalid == (bool(s.strip()) and not json_verdict(s))


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_shim_codec_agrees_with_json(value):
    text = json.dumps(value)
    assert shim.json_loads(text) == json.loads(text)
    assert json.loads(shim.json_dumps(value)) == value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
def test_forwarded_config_decodes_to_what_the_runtime_sent(kind, value):
    with tempfile.TemporaryDirectory(prefix="ocshim") as d:
        agent = StandInAgent(f"{d}/a.sock")
        try:
            config = conf(agent.path, v=value)
            if kind == "python":
                code, _ = shim.run(base_env(), json.dumps(config))
            else:
                code, _, _ = run_plugin(base_env(), json.dumps(config, ensure_ascii=False), plugin=kind)
        finally:
            agent.close()
    assert code == 0
    assert agent.requests == [{**agent.requests[0], "config": config}]


def test_shim_does_not_import_the_slow_modules():
    code = (
        f"import sys; src = open({str(PYTHON_SHIM)!r}).read(); exec(compile(src, 'shim', 'exec'), {{'__name__': 'not_main'}}); "
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
    with pytest.raises(ValueError):
        shim.json_loads("[NaN]")
