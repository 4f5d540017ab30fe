"""The agent's unix socket under hostile clients (issue 10, item 9), with a
trivial handler: no root, no kernel. The kernel test with a real agent is
tests/kernel/test_cni_limits.py."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from overlaycni.agent.server import SocketLimits, claim_socket_path, serve_unix
from overlaycni.cni import shim
from overlaycni.errors import UsageError


def ok_handler(req):
    return {"echo": req.command}


@pytest.fixture()
def server(tmp_path):
    srv = serve_unix(str(tmp_path / "a.sock"), ok_handler, lambda *a: None,
                     SocketLimits(read_timeout=0.5, max_connections=16, max_request=4096, max_depth=8))
    yield srv
    srv.shutdown()


def ask(path, payload: bytes, timeout=5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    try:
        s.sendall(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:  # refused before the request was read: the answer came first
            assert data
            break
        if not chunk:
            break
        data += chunk
    s.close()
    return json.loads(data)


def wait_open(server, n: int, timeout: float = 10.0) -> None:
    """Until the server counts ``n`` open connections (accepted or being served)."""
    end = time.monotonic() + timeout
    while server._open() != n:  # noqa: SLF001 - the count the cap is checked against
        assert time.monotonic() < end, f"server counts {server._open()} open connections, not {n}"  # noqa: SLF001
        time.sleep(0.01)


STATUS = json.dumps({"command": "STATUS", "config": {}}).encode() + b"\n"


@pytest.fixture()
def patient_server(tmp_path):
    """The same limits with a read timeout long enough that the idle connections
    of a test on a loaded machine are still open when the cap is checked."""
    srv = serve_unix(str(tmp_path / "p.sock"), ok_handler, lambda *a: None,
                     SocketLimits(read_timeout=60.0, max_connections=16, max_request=4096, max_depth=8))
    yield srv
    srv.shutdown()


def test_idle_connections_do_not_block_a_request_and_the_cap_answers_11(patient_server):
    server = patient_server
    idle = []
    for _ in range(15):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(server.path)
        idle.append(s)
    try:
        assert ask(server.path, STATUS) == {"result": {"echo": "STATUS"}}  # 16th connection: served
        # The client sees EOF a moment before the server stops counting the
        # served connection; and accepting is asynchronous: wait for both.
        wait_open(server, 15)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(server.path)
        idle.append(s)  # the cap is reached: the next one is turned away at once
        wait_open(server, 16)
        assert ask(server.path, STATUS)["error"]["code"] == 11
    finally:
        for s in idle:
            s.close()


def test_an_idle_connection_is_closed_after_the_read_timeout(server):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(server.path)
    assert s.recv(100) == b""  # closed by the agent, nothing said
    s.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(server.path)
    s.sendall(b'{"command": "ST')
    assert json.loads(s.recv(1000))["error"]["code"] == 6  # a partial request is answered
    s.close()


def test_oversized_and_deeply_nested_requests(server):
    big = json.dumps({"command": "ADD", "config": {"x": "y" * 100_000}}).encode() + b"\n"
    assert ask(server.path, big)["error"]["code"] == 7
    deep = b'{"command": "ADD", "config": ' + b"[" * 10_000 + b"]" * 10_000 + b"}\n"
    assert ask(server.path, b"[" * 4000 + b"]" * 4000 + b"\n")["error"]["code"] in (6, 7)
    nested = b'{"command": "STATUS", "config": {"a": ' + b"[" * 20 + b"]" * 20 + b"}}\n"
    answer = ask(server.path, nested)
    assert answer["error"]["code"] == 6 and "nested deeper than 8" in answer["error"]["msg"]
    assert ask(server.path, deep)["error"]["code"] == 7  # longer than this server's 4 KiB
    assert ask(server.path, STATUS) == {"result": {"echo": "STATUS"}}  # control


def test_decoder_recursion_is_a_decode_failure(tmp_path):
    srv = serve_unix(str(tmp_path / "b.sock"), ok_handler, lambda *a: None)
    try:
        deep = b'{"command": "ADD", "config": ' + b"[" * 10_000 + b"]" * 10_000 + b"}\n"
        assert ask(srv.path, deep)["error"]["code"] == 6
    finally:
        srv.shutdown()


def test_shim_refuses_an_oversized_config_itself_and_reads_an_early_answer(server, tmp_path):
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_NETNS": "/var/run/netns/c"}
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "overlaycni", "socket": server.path, "pad": "x" * (9 << 20)}
    code, err = shim.run(env, json.dumps(conf))
    assert code == 1 and err["code"] == 7, err
    # a request under the shim's limit but over this server's: the agent's early answer reaches the runtime
    conf["pad"] = "x" * 200_000
    code, err = shim.run(env, json.dumps(conf))
    assert code == 1 and err["code"] == 7 and "larger than 4096 bytes" in err["msg"], err


def test_socket_path_is_replaced_only_when_it_is_a_stale_socket(tmp_path):
    f = tmp_path / "file"
    f.write_text("user data\n")
    with pytest.raises(UsageError, match="not a socket"):
        claim_socket_path(str(f))
    assert f.read_text() == "user data\n"
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(UsageError, match="directory"):
        claim_socket_path(str(d))
    link = tmp_path / "link"
    os.symlink(f, link)
    with pytest.raises(UsageError, match="symbolic link"):
        claim_socket_path(str(link))
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on
    srv = serve_unix(str(stale), ok_handler, lambda *a: None)
    try:
        assert ask(srv.path, STATUS) == {"result": {"echo": "STATUS"}}
        with pytest.raises(UsageError, match="another agent"):
            claim_socket_path(srv.path)  # a live agent's socket is never taken over
    finally:
        srv.shutdown()


def test_concurrent_requests_are_all_answered(server):
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(ask(server.path, STATUS))) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert answers == [{"result": {"echo": "STATUS"}}] * 12
