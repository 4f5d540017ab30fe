"""etcd v3 JSON gateway wire helpers: base64 keys, range operations and the
streaming watch reader (see the design note in ``etcd.py``)."""

from __future__ import annotations

import base64
import json
import queue
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
