#!/usr/bin/env python3
"""overlaycni CNI plugin shim (CNI spec 1.1.0). Standard library only.

A container runtime runs this once per operation: ``CNI_*`` variables in the
environment, the network config on stdin, the result (or an error) on
stdout. Importing pyroute2 would cost ~200 ms per pod, so this shim only
validates the request and forwards it to the node agent over a unix socket;
the agent (warm, with open netlink sockets and datastore connections) does
the work and answers with the result already in the requested cniVersion.

``install-cni`` copies this file verbatim to ``<bin-dir>/overlaycni`` with a
``#!<python> -IS`` line, so it must stay self-contained: no imports from the
overlaycni package, nothing outside the standard library. ``shim.c`` is the
same program in C (it starts in ~1 ms instead of 6-9): the two make the same
checks in the same order and give the same codes and messages; a change to
one is a change to both (tests/unit/test_cni_shim.py runs against both).

JSON is RFC 8259's, strictly: stdin must be UTF-8 (at most ``MAX_CONFIG``
bytes) and holds no NaN or Infinity.

Wire protocol (one request per connection, newline-terminated JSON both
ways): request ``{"command", "container_id", "netns", "ifname", "args",
"path", "config"}``; answer ``{"result": {...}}``, ``{"ok": true}`` (success
with no output) or ``{"error": {"code", "msg", "details"}}``.
"""

import os
import sys
import time

# Start-up time is the plugin's latency floor: ``json``, ``socket`` and ``re``
# pull in ``enum`` and the regex compiler and cost ~10 ms on every pod ADD,
# more than the agent's whole ADD. Their C cores (``_json``, ``_socket``) are
# the same codecs and sockets without the Python layers; the plain modules
# stay as a fallback for interpreters that lack them.
try:
    import _json
    import _socket as socket
except ImportError:  # pragma: no cover - not CPython
    _json = None  # type: ignore[assignment]  # the fallback: json and socket below
    import socket  # type: ignore[no-redef]  # the same API as _socket

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
DEFAULT_SOCKET = "/run/overlaycni/agent.sock"
MAX_CONFIG = 1 << 20  # bytes of stdin; a CNI config is a few KiB
MAX_REQUEST = 1 << 20  # bytes of the request line; the agent refuses longer ones with the same code (7)
MAX_ANSWER = 16 << 20  # bytes of the agent's answer
CONNECT_TIMEOUT = 2.0
REPLY_TIMEOUT = 4.5  # the agent answers TRY_AGAIN_LATER before this; never a hang
# Spec codes.
INCOMPATIBLE_VERSION, INVALID_ENV, DECODE_FAILURE, INVALID_CONFIG = 1, 4, 6, 7
TRY_AGAIN_LATER, NOT_AVAILABLE = 11, 50
PLUGIN_INTERNAL = 999  # a bug (a broken agent answer, an unexpected exception), not a state to retry
ID_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
ID_REST = ID_FIRST | frozenset("_.-")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON (RFC 8259)")


class _DecodeContext:
    """What ``_json.make_scanner`` reads off ``json.JSONDecoder``."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_reject_constant)  # NaN, Infinity, -Infinity
    memo: dict = {}


WHITESPACE = " \t\n\r"


def json_loads(text):
    """Decode one JSON document (raises ValueError)."""
    if _json is None:
        import json

        return json.loads(text, parse_constant=_reject_constant)
    _DecodeContext.memo = {}
    start = len(text) - len(text.lstrip(WHITESPACE))
    try:
        value, end = _json.make_scanner(_DecodeContext)(text, start)  # type: ignore[arg-type]  # reads only these attributes
    except StopIteration as exc:
        raise ValueError(f"expecting a JSON value at char {exc.value}") from None
    except Exception as exc:  # _json raises json.JSONDecodeError (a ValueError) or RecursionError
        raise ValueError(str(exc)) from exc
    if text[end:].strip(WHITESPACE):
        raise ValueError(f"extra data at char {end}")
    return value


def _not_serialisable(obj):
    raise TypeError(f"{obj!r} is not JSON serialisable")


def json_dumps(obj):
    if _json is None:
        import json

        return json.dumps(obj)
    encode = _json.make_encoder(
        None, _not_serialisable, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
    return "".join(encode(obj, 0))


def _valid_container_id(cid):
    return cid[0] in ID_FIRST and all(c in ID_REST for c in cid)


class PluginError(Exception):
    def __init__(self, code, msg, details=""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def _write(doc):
    sys.stdout.write(json_dumps(doc) + "\n")
    sys.stdout.flush()


def _error_doc(version, err):
    doc = {"cniVersion": version, "code": err.code, "msg": err.msg}
    if err.details:
        doc["details"] = err.details
    return doc


def parse_cni_args(raw):
    """``K=V;K2=V2`` -> dict. A malformed pair is an invalid-env error."""
    out = {}
    for part in (raw or "").split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise PluginError(INVALID_ENV, f"CNI_ARGS: {part!r} is not KEY=VALUE")
        out[key] = value
    return out


def _require(env, name, command):
    value = env.get(name, "")
    if not value:
        raise PluginError(INVALID_ENV, f"{name} is required for {command}")
    return value


def build_request(env, stdin_text):
    """Validate env + config; return (cniVersion, request dict or None for
    VERSION). Raises PluginError with the spec's code."""
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise PluginError(INVALID_ENV, f"CNI_COMMAND must be one of {', '.join(COMMANDS)}, got {command!r}")
    try:
        config = json_loads(stdin_text) if stdin_text.strip() else None
    except ValueError as exc:
        raise PluginError(DECODE_FAILURE, "network config on stdin is not valid JSON", str(exc)) from exc
    if command == "VERSION" and config is None:
        return "1.1.0", None
    if not isinstance(config, dict):
        raise PluginError(DECODE_FAILURE, "network config on stdin must be a JSON object")
    version = config.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise PluginError(INVALID_CONFIG, "network config: cniVersion is required")
    if version not in SUPPORTED_VERSIONS:
        raise PluginError(
            INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported",
            "supported: " + ", ".join(SUPPORTED_VERSIONS),
        )
    if command == "VERSION":
        return version, None
    name = config.get("name")
    if command != "STATUS" and command != "GC" and (not isinstance(name, str) or not name):
        raise PluginError(INVALID_CONFIG, "network config: name is required")
    socket_path = config.get("socket", DEFAULT_SOCKET)
    if not isinstance(socket_path, str) or not socket_path:
        raise PluginError(INVALID_CONFIG, "network config: socket must be a path string")
    request = {"command": command, "config": config, "path": env.get("CNI_PATH", "")}
    if command in ("ADD", "DEL", "CHECK"):
        cid = _require(env, "CNI_CONTAINERID", command)
        if not _valid_container_id(cid):
            raise PluginError(INVALID_ENV, f"CNI_CONTAINERID {cid!r} must be alphanumeric plus '_', '.', '-'")
        ifname = _require(env, "CNI_IFNAME", command)
        # the kernel's rule (dev_valid_name): at most 15 bytes, no '/', ':' or whitespace
        if len(os.fsencode(ifname)) > 15 or ifname in (".", "..") or any(c in "/:" or c.isspace() for c in ifname):
            raise PluginError(INVALID_ENV, f"CNI_IFNAME {ifname!r} is not a valid interface name (<= 15 bytes, no '/', ':' or spaces)")
        netns = env.get("CNI_NETNS", "")
        if command != "DEL" and not netns:
            raise PluginError(INVALID_ENV, f"CNI_NETNS is required for {command}")
        request.update(
            container_id=cid, ifname=ifname, netns=netns, args=parse_cni_args(env.get("CNI_ARGS", ""))
        )
    return version, request


def call_agent(socket_path, request, *, connect_timeout=None, reply_timeout=None):
    """Send one request; return the decoded answer. Unreachable: TRY_AGAIN_LATER."""
    connect_timeout = CONNECT_TIMEOUT if connect_timeout is None else connect_timeout  # read at call time
    reply_timeout = REPLY_TIMEOUT if reply_timeout is None else reply_timeout
    line = json_dumps(request).encode() + b"\n"
    if len(line) > MAX_REQUEST:  # the agent would refuse it the same way
        raise PluginError(INVALID_CONFIG, f"request is {len(line)} bytes; the limit is {MAX_REQUEST}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(connect_timeout)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                sock.connect(socket_path)
                break
            except BlockingIOError:  # the agent's accept queue is full: a burst; retry briefly
                if time.monotonic() > deadline:
                    raise PluginError(TRY_AGAIN_LATER, f"overlaycni agent at {socket_path} is overloaded") from None
                time.sleep(0.005)
            except OSError as exc:
                raise PluginError(
                    TRY_AGAIN_LATER,
                    f"overlaycni agent is not reachable at {socket_path}",
                    f"{exc.strerror or exc}; is the agent running on this node?",
                ) from exc
        sock.settimeout(reply_timeout)
        try:
            try:
                sock.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the agent answered early (a refusal) and closed: its answer is still to be read
            chunks: list = []
            size = 0
            while True:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    if not chunks:
                        raise
                    break  # the agent closed before reading all we sent: its answer came first
                if not data:
                    break
                size += len(data)
                if size > MAX_ANSWER:
                    raise PluginError(PLUGIN_INTERNAL, f"overlaycni agent answer is larger than {MAX_ANSWER} bytes")
                chunks.append(data)
        except TimeoutError:
            raise PluginError(TRY_AGAIN_LATER, f"overlaycni agent did not answer within {reply_timeout:.1f} s") from None
        except OSError as exc:
            raise PluginError(TRY_AGAIN_LATER, "overlaycni agent connection failed", str(exc)) from exc
    finally:
        sock.close()
    try:
        return json_loads(b"".join(chunks).decode())
    except ValueError:
        raise PluginError(TRY_AGAIN_LATER, "overlaycni agent closed the connection without an answer") from None


def _as_text(value):
    return value if isinstance(value, str) else json_dumps(value)


def agent_outcome(answer):
    """The document to print for the agent's answer (None: nothing); an
    error answer raises it as ours."""
    if not isinstance(answer, dict):
        raise PluginError(PLUGIN_INTERNAL, "overlaycni agent answer is not a JSON object")
    if "error" in answer:
        e = answer["error"]
        if not isinstance(e, dict):
            raise PluginError(PLUGIN_INTERNAL, "overlaycni agent error is not a JSON object")
        code = e.get("code", PLUGIN_INTERNAL)
        if type(code) is not int or not 0 <= code <= 0xFFFFFFFF:  # the spec's code is an unsigned integer
            raise PluginError(PLUGIN_INTERNAL, "overlaycni agent error code is not an integer 0..4294967295")
        details = e.get("details")
        raise PluginError(code, _as_text(e.get("msg", "agent error")), "" if details is None else _as_text(details))
    return answer.get("result")


def run(env, stdin_text):
    """Return (exit code, document to print or None)."""
    version = "1.1.0"
    try:
        version, request = build_request(env, stdin_text)
        if request is None:  # VERSION
            return 0, {"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}
        socket_path = request["config"].get("socket", DEFAULT_SOCKET)
        try:
            answer = call_agent(socket_path, request)
        except PluginError as err:
            if request["command"] == "STATUS":
                err.code = NOT_AVAILABLE
            raise
        return 0, agent_outcome(answer)
    except PluginError as err:
        return 1, _error_doc(version, err)
    except Exception as exc:  # last resort: never a traceback on stdout
        return 1, _error_doc(version, PluginError(PLUGIN_INTERNAL, "overlaycni plugin internal error", repr(exc)))


def read_stdin(stream):
    """The config text: at most MAX_CONFIG bytes of UTF-8 ("" without stdin)."""
    if stream is None or stream.isatty():
        return ""
    try:
        raw = stream.buffer.read(MAX_CONFIG + 1)
    except OSError as exc:
        raise PluginError(DECODE_FAILURE, "cannot read stdin", str(exc)) from None
    if len(raw) > MAX_CONFIG:
        raise PluginError(INVALID_CONFIG, f"network config on stdin is larger than {MAX_CONFIG} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PluginError(DECODE_FAILURE, "network config on stdin is not valid UTF-8", str(exc)) from None


def main():
    try:
        stdin_text = read_stdin(sys.stdin)
    except PluginError as err:
        code, doc = 1, _error_doc("1.1.0", err)
    else:
        code, doc = run(os.environ, stdin_text)
    if doc is not None:
        _write(doc)
    return code


if __name__ == "__main__":
    sys.exit(main())
