"""etcd v3 JSON gateway wire helpers: base64 keys, range operations, the
streaming watch reader and TLS/auth refusals in words (see the design note
in ``etcd.py``)."""

from __future__ import annotations

import base64
import json
import queue
import re
import socket
from collections.abc import Sequence
from typing import Any

from .base import KV, prefix_end


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(data: str | None) -> str:
    return base64.b64decode(data).decode() if data else ""


def _kv(item: dict[str, Any]) -> KV:
    lease = int(item.get("lease", 0) or 0)
    return KV(_unb64(item["key"]), _unb64(item.get("value")), int(item.get("mod_revision", 0)), lease or None)


def _range_op(key: str, *, prefix: bool, keys_only: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"key": _b64(key)}
    if prefix:
        op["range_end"] = _b64(prefix_end(key)) if prefix_end(key) else base64.b64encode(b"\0").decode()
    if keys_only:
        op["keys_only"] = True
    return op


def _range_ops(ranges: Sequence[tuple[str, str, int]], keys_only: bool) -> list[dict[str, Any]]:
    ops = []
    for start, end, limit in ranges:
        op: dict[str, Any] = {"key": _b64(start), "range_end": _b64(end)}
        if limit:
            op["limit"] = str(int(limit))
        if keys_only:
            op["keys_only"] = True
        ops.append({"request_range": op})
    return ops


def _read_stream(resp: Any, q: queue.Queue) -> None:
    buf = b""
    try:
        for chunk in resp.iter_content(chunk_size=None):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    msg = json.loads(line)
                    q.put(("msg", msg) if "result" in msg else ("error", msg))
        if buf.strip():
            msg = json.loads(buf)
            q.put(("msg", msg) if "result" in msg else ("error", msg))
        q.put(("eof", None))
    except Exception as exc:  # the connection broke, or we closed it
        q.put(("error", exc))


def stream_socket(resp: Any) -> socket.socket | None:
    """The socket under a streamed ``requests`` response (plain or TLS), or
    None when the libraries' insides are not what we expect."""
    try:
        sock = resp.raw._fp.fp.raw._sock
    except AttributeError:
        return None
    return sock if isinstance(sock, socket.socket) else None


def keep_stream(resp: Any, *, idle: int, interval: int, count: int) -> bool:
    """Once the response headers are in: no read timeout on the stream (an idle
    watch is silent for as long as nothing changes; the caller probes instead),
    and TCP keepalive, so a peer that vanished without a FIN is found by the
    kernel. False when the socket could not be reached."""
    sock = stream_socket(resp)
    if sock is None:
        return False
    try:
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    except OSError:
        return False
    return True


def _close(resp: Any) -> None:
    try:
        fp = resp.raw._fp
        sock = socket.fromfd(fp.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()
    except Exception:
        pass
    try:
        resp.close()
    except Exception:
        pass


# ----- refusals, in words -----------------------------------------------------------

# OpenSSL reasons (as Python's ssl module prints them) -> what they mean here.
_TLS_REASONS = (
    ("CERTIFICATE_VERIFY_FAILED", "server"),
    ("WRONG_VERSION_NUMBER", "plain"),
    ("RECORD_LAYER_FAILURE", "plain"),
    ("PACKET_LENGTH_TOO_LONG", "plain"),
    ("CERTIFICATE_REQUIRED", "client"),
    ("BAD_CERTIFICATE", "client"),
    ("UNKNOWN_CA", "client"),
    ("CERTIFICATE_EXPIRED", "client"),
    ("CERTIFICATE_REVOKED", "client"),
    ("UNSUPPORTED_CERTIFICATE", "client"),
    ("EOF OCCURRED IN VIOLATION OF PROTOCOL", "eof"),
    ("UNEXPECTED_EOF", "eof"),
)


def tls_problem(text: str, *, credentials: Any, host: str) -> str | None:
    """What a TLS failure in ``text`` (a requests/urllib3 error message)
    means, in words that name the setting to fix; None if it is not one."""
    upper = text.upper()
    if "SSL" not in upper and "CERTIFICATE" not in upper:
        return None
    kind = next((k for reason, k in _TLS_REASONS if reason in upper), "other")
    detail = re.search(r"certificate verify failed: ([^(')\"]+)", text)
    if kind == "server":
        why = detail.group(1).strip() if detail else "not trusted"
        return (
            f"etcd's server certificate was refused ({why}): it must be signed by the CA in --etcd-ca "
            f"{credentials.ca} and name {host} in its subject alternative names"
        )
    if kind == "plain":
        return "the server does not speak TLS on this port (a plain-HTTP etcd is etcd://, for loopback only)"
    if kind == "client":
        if not credentials.cert:
            return "etcd requires a client certificate (give --etcd-cert and --etcd-key)"
        return (
            f"etcd refused our client certificate --etcd-cert {credentials.cert} (not signed by a CA etcd trusts "
            "in --trusted-ca-file, expired or revoked)"
        )
    if kind == "eof":
        if not credentials.cert:
            why = "it requires a client certificate (give --etcd-cert and --etcd-key)"
        else:
            why = f"it refused our client certificate --etcd-cert {credentials.cert} (not signed by a CA in its --trusted-ca-file, or revoked)"
        return f"etcd closed the connection during the TLS handshake: {why}, or it does not speak TLS on this port"
    return f"TLS handshake failed: {text[-300:]}"


def auth_problem(text: str, *, credentials: Any, url: str) -> str | None:
    """``"expired"`` for a stale etcd auth token, a sentence for another
    refusal of who we are (or of plain HTTP by a TLS port), else None."""
    if "invalid auth token" in text or "invalid auth management" in text:
        return "expired"
    if "user name is empty" in text:
        if credentials.user:
            return "expired"
        return (
            f"etcd at {url} has authentication enabled: give --etcd-user and --etcd-password-file "
            "(or OVERLAYCNI_ETCD_USER / OVERLAYCNI_ETCD_PASSWORD_FILE)"
        )
    if "authentication failed" in text:
        return f"etcd refused --etcd-user {credentials.user!r}: wrong user name or password"
    if "permission denied" in text:
        return f"etcd denied --etcd-user {credentials.user!r} this request (its roles do not allow it)"
    if "HTTP request to an HTTPS server" in text:
        return f"etcd at {url} speaks only HTTPS: use etcds:// with --etcd-ca, --etcd-cert and --etcd-key"
    return None
