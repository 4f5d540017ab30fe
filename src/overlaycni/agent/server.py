"""The agent's unix socket: one JSON request per connection (see cni/shim.py).

The socket is created mode 0600 (root only): whoever can talk to it can
create and delete pod interfaces on this node. It is still read as hostile
input, with limits (``SocketLimits``):

* One thread accepts and reads every connection (``selectors``, non-blocking
  sockets): a client that connects and sends nothing, or sends slowly, holds
  a file descriptor, never a thread, and never delays the accept loop.
* A request must arrive whole (one line) within ``read_timeout`` of the
  connection; an idle connection is then closed (a partial request is
  answered 6 first).
* At most ``max_connections`` connections are open at once; one more is
  answered 11 ("try again later") at once and closed.
* A request longer than ``max_request`` bytes is answered 7 (invalid
  network config: a permanent error, retrying cannot help) as soon as that
  many bytes have arrived; the rest is read and dropped until the client
  closes (or ``read_timeout`` passes), so that the client sees the answer
  and a clean end of file, not a reset. The shim checks the same limit
  before it sends.
* JSON nested deeper than ``max_depth`` (or too deep for the decoder) is
  answered 6 (decode failure).
* Complete requests are served by a pool of ``workers`` threads; the
  answers of requests the pool has not reached yet wait in its queue (the
  connection cap bounds it). A pool thread checks its request and hands
  ADD and DEL to the node's batcher (``agent.batch``), which applies the
  requests that wait together in one batch: the pool is as large as a
  burst a node should commit at once.
* Each request's trace (``overlaycni.trace``) starts when its connection is
  accepted; ``on_trace`` hears of it once the answer is written.

Stop (``shutdown``): the accept loop is woken at once (a socket pair in its
selector, not its poll timeout), the listening socket is closed and its file
removed, connections not yet read whole are closed; requests already read
and waiting for a pool thread are answered 11 ("the agent is stopping; try
again"), and those in flight finish (``wait_idle``: the node's batcher
answers the batch it is applying).

Startup never removes what it does not own: a ``--socket`` path that exists
and is not a socket (a file, a directory, a symlink) is refused; a socket
that a live agent still answers on is refused; a stale socket (nobody
listening: an agent that was killed) is replaced.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..cni.protocol import parse_request
from ..errors import (
    CNI_DECODE_FAILURE,
    CNI_INTERNAL,
    CNI_INVALID_CONFIG,
    CNI_TRY_AGAIN_LATER,
    OverlayCNIError,
    UsageError,
    cni_code,
)
from ..trace import RequestTrace, serving

log = logging.getLogger("overlaycni.agent")
MAX_REQUEST = 1 << 20  # bytes; a network config is a few KiB (the shim has the same limit)

Handler = Callable[[Any], "dict[str, Any] | None"]
Observer = Callable[[str, str, float], None]
TraceSink = Callable[[RequestTrace], None]


@dataclass(frozen=True)
class SocketLimits:
    max_request: int = MAX_REQUEST
    max_depth: int = 64  # JSON nesting (a chained netconf with prevResult is < 10 deep)
    read_timeout: float = 2.0  # seconds from connect to a complete request
    max_connections: int = 256
    workers: int = 128  # requests in flight at once (a burst waits in the batcher, not in the pool's queue)
    write_timeout: float = 5.0


def _error(code: int, msg: str, details: str = "") -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "msg": msg}
    if details:
        err["details"] = details
    return {"error": err}


def json_depth(doc: Any, limit: int) -> int:
    """Nesting depth of a decoded document, counted up to ``limit`` + 1 (iterative)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def decode(line: bytes, limits: SocketLimits) -> tuple[Any, dict[str, Any] | None]:
    """(document, None), or (None, the error answer)."""
    try:
        doc = json.loads(line)
    except RecursionError:
        return None, _error(CNI_DECODE_FAILURE, "request is not valid JSON: nested too deeply")
    except ValueError as exc:
        return None, _error(CNI_DECODE_FAILURE, "request is not valid JSON", str(exc))
    if json_depth(doc, limits.max_depth) > limits.max_depth:
        return None, _error(CNI_DECODE_FAILURE, f"request is not valid JSON: nested deeper than {limits.max_depth} levels")
    return doc, None


def answer_for(doc: Any, handle: Handler, observe: Observer) -> dict[str, Any]:
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
        answer = _error(exc.cni_code, exc.message, exc.details)
    except Exception as exc:  # a bug: report it as the spec's error, keep serving
        log.exception("internal error serving %s", command)
        outcome = "error"
        answer = _error(cni_code(exc) or CNI_INTERNAL, "internal agent error", repr(exc))
    observe(str(command), outcome, time.perf_counter() - start)
    return answer


def claim_socket_path(path: str) -> None:
    """Make ``path`` free for a new listening socket, removing only a stale
    socket; anything else there is refused (``UsageError`` naming --socket)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a socket"
        raise UsageError(f"{path} exists and is {kind}; refusing to replace it (remove it, or choose another path)",
                         field="socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # stale: nobody listens there any more
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise UsageError(f"{path}: cannot tell whether an agent still serves it ({exc.strerror})", field="socket") from None
    else:
        raise UsageError(f"{path}: another agent is serving this socket; stop it first", field="socket")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Conn:
    __slots__ = ("sock", "buf", "deadline", "draining", "accepted")

    def __init__(self, sock: socket.socket, deadline: float, accepted: float) -> None:
        self.sock, self.buf, self.deadline = sock, bytearray(), deadline
        self.draining = False  # answered already; what still arrives is dropped
        self.accepted = accepted  # monotonic (the request's trace starts here)


class CNISocketServer:
    """Accepts and reads on one thread; serves complete requests on a pool."""

    def __init__(
        self, path: str, handle: Handler, observe: Observer, limits: SocketLimits | None = None,
        *, on_trace: TraceSink | None = None,
    ) -> None:
        """``on_trace`` hears of every served request's ``RequestTrace`` once it is answered."""
        self.path = path
        self.handle, self.observe = handle, observe
        self.on_trace = on_trace
        self.limits = limits or SocketLimits()
        self._conns: dict[int, _Conn] = {}
        self._serving = 0  # connections handed to the pool, not yet answered
        self._count_lock = threading.Lock()
        self._idle = threading.Condition(self._count_lock)  # notified when ``_serving`` drops to 0
        self._stop = threading.Event()
        self._closed = False
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()  # ``shutdown`` wakes the accept loop through it
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._pool = ThreadPoolExecutor(max_workers=self.limits.workers, thread_name_prefix="cni-request")
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
        claim_socket_path(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._listener.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._listener.listen(512)  # a burst of pod starts must not see EAGAIN
        self._listener.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._loop, name="cni-socket", daemon=True)
        self._thread.start()

    # ----- the accept/read loop ----------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for key, _ in self._sel.select(timeout=0.2):
                    if key.fileobj is self._wake_r:
                        continue  # ``shutdown``: the loop's condition ends it
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fd in self._conns:
                        self._read(self._conns[key.fd])
                self._expire()
            except Exception:  # a bug must not end the accept loop: the node would stop serving
                log.exception("CNI socket loop")
                self._stop.wait(0.1)

    def _open(self) -> int:
        with self._count_lock:
            return len(self._conns) + self._serving

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("CNI socket accept failed: %s", exc)
                return
            sock.setblocking(False)
            if self._open() >= self.limits.max_connections:
                self._reply_now(sock, _error(CNI_TRY_AGAIN_LATER,
                                             f"the agent has {self.limits.max_connections} connections open; try again"))
                continue
            now = time.monotonic()
            conn = _Conn(sock, now + self.limits.read_timeout, now)
            with self._count_lock:
                self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
            conn.buf.clear()
        if conn.draining:
            if not data:
                self._drop(conn, None)
            return
        if data:
            conn.buf += data
        newline = conn.buf.find(b"\n")
        line_len = newline if newline >= 0 else len(conn.buf)
        if line_len > self.limits.max_request:
            self._refuse(conn, _error(CNI_INVALID_CONFIG, f"request is larger than {self.limits.max_request} bytes",
                                      "a network config is a few KiB; this one cannot be a valid request"))
            return
        if newline < 0 and data:
            return  # more to come
        if not conn.buf.strip():
            self._drop(conn, None)  # closed without a request
            return
        line = bytes(conn.buf[:line_len])
        self._detach(conn)
        with self._count_lock:
            self._serving += 1
        self._pool.submit(self._serve, conn.sock, line, RequestTrace(conn.accepted, time.monotonic()))

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            answer = None
            if conn.buf.strip() and not conn.draining:
                answer = _error(CNI_DECODE_FAILURE, f"request incomplete after {self.limits.read_timeout:.1f} s")
            self._drop(conn, answer)

    def _detach(self, conn: _Conn) -> None:
        self._sel.unregister(conn.sock)
        with self._count_lock:
            self._conns.pop(conn.sock.fileno(), None)

    def _drop(self, conn: _Conn, answer: dict[str, Any] | None) -> None:
        self._detach(conn)
        if answer is not None:
            self._reply_now(conn.sock, answer)
        else:
            conn.sock.close()

    def _refuse(self, conn: _Conn, answer: dict[str, Any]) -> None:
        """Answer now, then drop whatever else the client sends until it closes."""
        try:
            conn.sock.send(json.dumps(answer).encode() + b"\n")
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(conn, None)
            return
        conn.buf = bytearray()
        conn.draining = True
        conn.deadline = time.monotonic() + self.limits.read_timeout

    @staticmethod
    def _reply_now(sock: socket.socket, answer: dict[str, Any]) -> None:
        """A short answer on a non-blocking socket (it fits any socket buffer), then close."""
        try:
            sock.send(json.dumps(answer).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()

    # ----- the pool ----------------------------------------------------------------
    def _serve(self, sock: socket.socket, line: bytes, trace: RequestTrace) -> None:
        try:
            doc, answer = decode(line, self.limits)
            if answer is None and self._stop.is_set():  # queued before the stop: not started, so not taken
                answer = _error(CNI_TRY_AGAIN_LATER, "the agent is stopping; try again")
            elif answer is None:
                trace.command = str(doc.get("command", "?")) if isinstance(doc, dict) else "?"
                with serving(trace):
                    answer = answer_for(doc, self.handle, self.observe)
            sock.setblocking(True)
            sock.settimeout(self.limits.write_timeout)
            sock.sendall(json.dumps(answer).encode() + b"\n")
            trace.sent = time.monotonic()
            if self.on_trace is not None and trace.served:
                self.on_trace(trace)
        except OSError:
            pass  # the shim gave up waiting; nothing to tell
        except Exception:  # never lose the pool thread's connection count
            log.exception("CNI socket: answering a request failed")
        finally:
            sock.close()
            with self._count_lock:
                self._serving -= 1
                if not self._serving:
                    self._idle.notify_all()

    # ----- stop --------------------------------------------------------------------
    def shutdown(self, timeout: float = 2.0) -> None:
        """Stop taking requests at once: the socket file is gone when this
        returns (idempotent). Requests already read are still answered
        (``wait_idle``). ``timeout``: for the accept loop to end."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout=timeout)
        for conn in list(self._conns.values()):
            self._drop(conn, None)
        self._sel.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._pool.shutdown(wait=False)  # queued requests are answered 11 (``_serve``), in-flight ones finish
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def wait_idle(self, timeout: float) -> bool:
        """After ``shutdown``: wait until every request read is answered (at
        most ``timeout`` seconds), then for the pool's threads to end. False
        when some are still being served."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._serving == 0, timeout):
                return False
        self._pool.shutdown(wait=True)  # idle workers: each ends as soon as it sees the pool closed
        return True

    def server_close(self) -> None:
        """socketserver's name, for callers written against it: ``shutdown`` already closed everything."""


def serve_unix(
    path: str, handle: Handler, observe: Observer, limits: SocketLimits | None = None,
    *, on_trace: TraceSink | None = None,
) -> CNISocketServer:
    """Bind ``path`` (refusing anything but a stale socket there) and serve in a thread."""
    return CNISocketServer(path, handle, observe, limits, on_trace=on_trace)
