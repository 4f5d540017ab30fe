"""The agent's unix socket: one JSON request per connection (see cni/shim.py).

The socket is created mode 0600 (root only): whoever can talk to it can
create and delete pod interfaces on this node.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any

from ..cni.protocol import parse_request
from ..errors import CNI_DECODE_FAILURE, CNI_INTERNAL, OverlayCNIError, cni_code

log = logging.getLogger("overlaycni.agent")
MAX_REQUEST = 4 * 1024 * 1024

Handler = Callable[[Any], "dict[str, Any] | None"]


def answer_for(doc: Any, handle: Handler, observe: Callable[[str, str, float], None]) -> dict[str, Any]:
    """Run one request; never raises. Returns the wire answer."""
    start = time.perf_counter()
    command = doc.get("command", "?") if isinstance(doc, dict) else "?"
    try:
        req = parse_request(doc)
        result = handle(req)
        outcome = "ok"
        answer: dict[str, Any] = {"result": result} if result is not None else {"ok": True}
    except OverlayCNIError as exc:
        outcome = "error"
        answer = {"error": {"code": exc.cni_code, "msg": exc.message, "details": exc.details}}
    except Exception as exc:  # a bug: report it as the spec's error, keep serving
        log.exception("internal error serving %s", command)
        outcome = "error"
        answer = {"error": {"code": cni_code(exc) or CNI_INTERNAL, "msg": "internal agent error", "details": repr(exc)}}
    observe(str(command), outcome, time.perf_counter() - start)
    return answer


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512  # a burst of pod starts must not see EAGAIN


def serve_unix(path: str, handle: Handler, observe: Callable[[str, str, float], None]) -> _Server:
    """Bind ``path`` (replacing a stale socket file) and serve in a thread."""

    class RequestHandler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline(MAX_REQUEST)
            try:
                doc = json.loads(line)
            except ValueError:
                answer = {"error": {"code": CNI_DECODE_FAILURE, "msg": "request is not valid JSON"}}
            else:
                answer = answer_for(doc, handle, observe)
            try:
                self.wfile.write(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass  # the shim gave up waiting; nothing to tell

    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old = os.umask(0o177)
    try:
        server = _Server(path, RequestHandler)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    threading.Thread(target=server.serve_forever, name="cni-socket", daemon=True).start()
    return server
