"""etcd v3 datastore (``etcd://host:port[,host:port...]``) over the JSON gateway.

Design note.
* Transport: etcd3gw's ``Etcd3Client`` (HTTP + JSON to the gRPC gateway);
  ``api_path`` is set to ``/v3/`` explicitly (etcd >= 3.4, Debian 12 ships
  3.4) so no discovery request is made. Keys and values are base64 on the
  wire; revisions are JSON strings (int64).
* Endpoints: tried in turn, starting with the one that last answered. A
  refused connection moves on at once; a timeout or a 503 ("no leader",
  "leader changed") is retried across the endpoints for ``RETRY_WINDOW``
  seconds, so a 3-member cluster keeps serving while one member dies or a
  leader is elected. If every endpoint refuses, the call fails at once with
  ``DatastoreUnavailable`` naming the endpoints (connect timeout 1.5 s each).
* Retries of a write whose answer was lost are safe for IPAM: its writes are
  compare-and-swaps keyed by the caller's identity, so a retry that finds
  its own write reports a failed compare and the caller re-reads.
* Threads: a small pool of ``Etcd3Client`` sets (one ``requests.Session``
  per endpoint each); a call checks one out, so sessions are never shared by
  two threads at once and short-lived threads leave nothing behind.
* Watch: our own streaming reader (etcd3gw's ``Watcher`` hides errors and
  compaction). A daemon thread reads the chunked JSON stream into a queue;
  the generator polls the queue every 0.25 s so ``stop`` is honoured. On a
  broken stream it reconnects (next endpoint) from the last revision seen + 1;
  a compacted start revision raises ``WatchCompacted``; no endpoint for
  ``RETRY_WINDOW`` seconds raises ``DatastoreUnavailable``.
* Limits: etcd allows 128 operations per transaction by default; callers
  (IPAM) chunk bulk deletes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from etcd3gw import exceptions as gw_exc
from etcd3gw.client import Etcd3Client

from ..errors import DatastoreError, DatastoreUnavailable, NotFound, WatchCompacted
from ._etcd_wire import _b64, _close, _kv, _range_op, _range_ops, _read_stream, _unb64
from .base import KV, Event, Snapshot, Store, TransactMixin, TxnResult, check_key

CONNECT_TIMEOUT = 1.5
REQUEST_TIMEOUT = 5.0
RETRY_WINDOW = 6.0
WATCH_POLL = 0.25
MAX_IDLE = 8  # pooled client sets kept between calls


class _Retry(Exception):
    """An endpoint failed in a way another endpoint (or a retry) may fix."""


class _Refused(_Retry):
    pass


class EtcdStore(TransactMixin):
    def __init__(self, endpoints: Sequence[tuple[str, int]], *, url: str | None = None) -> None:
        if not endpoints:
            raise DatastoreError("etcd datastore needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.url = url or "etcd://" + ",".join(f"{h}:{p}" for h, p in self.endpoints)
        self.round_trips = 0  # HTTP requests sent (for benchmarks)
        self._idle: list[dict[int, Etcd3Client]] = []  # pooled clients (one requests.Session each)
        self._lock = threading.Lock()
        self._current = 0
        self._closed = False
        self.revision()  # fail now, clearly, when no endpoint answers

    @property
    def active_endpoint(self) -> tuple[str, int]:
        """The endpoint that answered last (requests start there)."""
        return self.endpoints[self._current]

    # ----- transport --------------------------------------------------------------
    def _new_client(self, index: int) -> Etcd3Client:
        host, port = self.endpoints[index]
        timeout = (CONNECT_TIMEOUT, REQUEST_TIMEOUT)  # etcd3gw hands it to requests, which takes (connect, read)
        return Etcd3Client(host=host, port=port, timeout=timeout, api_path="/v3/")  # type: ignore[arg-type]

    def _checkout(self) -> dict[int, Etcd3Client]:
        with self._lock:
            return self._idle.pop() if self._idle else {}

    def _checkin(self, clients: dict[int, Etcd3Client]) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(clients)
                return
        for client in clients.values():
            client.session.close()

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._current + i) % n for i in range(n)]

    def _post_one(self, clients: dict[int, Etcd3Client], index: int, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        client = clients.get(index)
        if client is None:
            client = clients[index] = self._new_client(index)
        self.round_trips += 1
        try:
            return client.post(client.get_url(path), json=payload)
        except gw_exc.ConnectionTimeoutError as exc:
            text = str(getattr(exc, "detail_text", "") or exc)
            if "connect timeout" in text or "ConnectTimeout" in text:
                raise _Refused("connect timed out") from None
            raise _Retry(f"timed out: {text[:200]}") from None
        except gw_exc.ConnectionFailedError as exc:
            text = str(getattr(exc, "detail_text", "") or exc)
            if "refused" in text or "Max retries" in text or "NewConnectionError" in text:
                raise _Refused("connection refused") from None
            raise _Retry(f"unavailable: {text[:200]}") from None
        except gw_exc.Etcd3Exception as exc:
            text = str(getattr(exc, "detail_text", "") or exc)
            if "lease not found" in text:
                raise NotFound("etcd lease not found (expired or revoked)") from None
            if "compacted" in text:
                raise WatchCompacted(f"etcd: {text[:200]}") from None
            if "leader" in text or "timed out" in text or "unavailable" in text.lower():
                raise _Retry(text[:200]) from None
            raise DatastoreError(f"etcd {self.endpoints[index][0]}:{self.endpoints[index][1]} refused {path}: {text[:300]}") from None
        except ValueError as exc:  # not JSON
            raise _Retry(f"bad response: {exc}") from None

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        if self._closed:
            raise DatastoreError(f"datastore {self.url} is closed")
        clients = self._checkout()
        try:
            return self._post_with(clients, path, payload)
        finally:
            self._checkin(clients)

    def _post_with(self, clients: dict[int, Etcd3Client], path: str, payload: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + RETRY_WINDOW
        last = ""
        while True:
            refused_all = True
            for index in self._order():
                try:
                    result = self._post_one(clients, index, path, payload)
                except _Refused as exc:
                    last = f"{self.endpoints[index][0]}:{self.endpoints[index][1]}: {exc}"
                    continue
                except _Retry as exc:
                    refused_all = False
                    last = f"{self.endpoints[index][0]}:{self.endpoints[index][1]}: {exc}"
                    continue
                self._current = index
                return result
            if refused_all or time.monotonic() >= deadline:
                raise DatastoreUnavailable(
                    f"etcd datastore {self.url} is unreachable ({last})",
                    details="check that etcd runs and listens on the given host:port",
                )
            time.sleep(0.2)

    # ----- key/value ----------------------------------------------------------------
    def get(self, key: str) -> KV | None:
        result = self._post("/kv/range", {"key": _b64(check_key(key))})
        kvs = result.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    def list(self, prefix: str) -> list[KV]:
        payload = {**_range_op(prefix, prefix=True), "sort_order": "ASCEND", "sort_target": "KEY"}
        return [_kv(item) for item in self._post("/kv/range", payload).get("kvs") or []]

    def read(
        self,
        keys: Sequence[str] = (),
        prefixes: Sequence[str] = (),
        *,
        ranges: Sequence[tuple[str, str, int]] = (),
        keys_only: bool = False,
    ) -> Snapshot:
        ops = [{"request_range": _range_op(k, prefix=False)} for k in keys]
        ops += [{"request_range": _range_op(p, prefix=True, keys_only=keys_only)} for p in prefixes]
        ops += _range_ops(ranges, keys_only)
        result = self._post("/kv/txn", {"compare": [], "success": ops, "failure": []})
        return Snapshot(tuple(self._range_results(result)), int(result["header"]["revision"]))

    @staticmethod
    def _range_results(result: dict[str, Any]) -> Sequence[KV]:  # not list[KV]: `list` is a method here
        out: dict[str, KV] = {}
        for resp in result.get("responses") or []:
            for item in (resp.get("response_range") or {}).get("kvs") or []:
                kv = _kv(item)
                out[kv.key] = kv
        return [out[k] for k in sorted(out)]

    def put(self, key: str, value: str, *, lease: int | None = None) -> int:
        payload: dict[str, Any] = {"key": _b64(check_key(key)), "value": _b64(value)}
        if lease:
            payload["lease"] = str(lease)
        return int(self._post("/kv/put", payload)["header"]["revision"])

    def delete(self, key: str) -> bool:
        result = self._post("/kv/deleterange", {"key": _b64(check_key(key))})
        return int(result.get("deleted", 0)) > 0

    def delete_prefix(self, prefix: str) -> int:
        result = self._post("/kv/deleterange", _range_op(prefix, prefix=True))
        return int(result.get("deleted", 0))

    def transact(
        self,
        *,
        compare: Sequence[tuple[str, int]],
        put: Sequence[tuple[str, str, int | None]] = (),
        delete: Sequence[str] = (),
        delete_prefix: Sequence[str] = (),
        read_keys: Sequence[str] = (),
        read_prefixes: Sequence[str] = (),
        read_ranges: Sequence[tuple[str, str, int]] = (),
        keys_only: bool = False,
    ) -> TxnResult:
        cmp = [
            {"key": _b64(check_key(k)), "result": "EQUAL", "target": "MOD", "mod_revision": str(int(rev))}
            for k, rev in compare
        ]
        success: list[dict[str, Any]] = [{"request_delete_range": _range_op(p, prefix=True)} for p in delete_prefix]
        success += [{"request_delete_range": {"key": _b64(check_key(k))}} for k in delete]
        for key, value, lease in put:
            op: dict[str, Any] = {"key": _b64(check_key(key)), "value": _b64(value)}
            if lease:
                op["lease"] = str(lease)
            success.append({"request_put": op})
        failure = [{"request_range": _range_op(k, prefix=False)} for k in read_keys]
        failure += [{"request_range": _range_op(p, prefix=True, keys_only=keys_only)} for p in read_prefixes]
        failure += _range_ops(read_ranges, keys_only)
        result = self._post("/kv/txn", {"compare": cmp, "success": success, "failure": failure})
        revision = int(result["header"]["revision"])
        if result.get("succeeded"):
            return TxnResult(True, revision)
        return TxnResult(False, revision, tuple(self._range_results(result)))

    def revision(self) -> int:
        result = self._post("/kv/range", {"key": _b64("/"), "count_only": True})
        return int(result["header"]["revision"])

    def compact(self, revision: int) -> None:
        try:
            self._post("/kv/compaction", {"revision": str(int(revision)), "physical": True})
        except WatchCompacted:
            pass  # already compacted that far

    # ----- leases -----------------------------------------------------------------
    def grant_lease(self, ttl: int) -> int:
        if int(ttl) < 1:
            raise DatastoreError(f"lease TTL must be at least 1 second, got {ttl}")
        result = self._post("/lease/grant", {"TTL": str(int(ttl)), "ID": "0"})
        if result.get("error"):
            raise DatastoreError(f"etcd refused a lease: {result['error']}")
        return int(result["ID"])

    def refresh_lease(self, lease: int) -> None:
        result = self._post("/lease/keepalive", {"ID": str(lease)})
        if int((result.get("result") or {}).get("TTL", 0) or 0) <= 0:
            raise NotFound(f"lease {lease:x} not found (expired or revoked)")

    def revoke_lease(self, lease: int) -> None:
        try:
            self._post("/lease/revoke", {"ID": str(lease)})
        except NotFound:
            pass

    # ----- watch --------------------------------------------------------------------
    def _open_watch(self, prefix: str, start: int) -> tuple[Any, queue.Queue]:
        request = {"create_request": {**_range_op(prefix, prefix=True), "start_revision": str(start)}}
        deadline = time.monotonic() + RETRY_WINDOW
        last = ""
        while time.monotonic() < deadline:
            for index in self._order():
                client = self._new_client(index)  # its own session: the stream holds the connection
                try:
                    resp = client.session.post(
                        client.get_url("/watch"), json=request, stream=True, timeout=(CONNECT_TIMEOUT, None)
                    )
                except Exception as exc:  # requests' connection errors
                    last = f"{self.endpoints[index][0]}:{self.endpoints[index][1]}: {type(exc).__name__}"
                    continue
                if resp.status_code != 200:
                    last = f"HTTP {resp.status_code}"
                    resp.close()
                    continue
                self._current = index
                q: queue.Queue = queue.Queue()
                threading.Thread(target=_read_stream, args=(resp, q), daemon=True).start()
                return resp, q
            time.sleep(0.2)
        raise DatastoreUnavailable(f"etcd datastore {self.url}: cannot open a watch ({last})")

    def watch(
        self,
        prefix: str,
        *,
        start_revision: int | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[Event]:
        next_rev = self.revision() + 1 if start_revision is None else int(start_revision)
        resp, q = self._open_watch(prefix, next_rev)
        lost_since: float | None = None
        try:
            while stop is None or not stop.is_set():
                try:
                    kind, msg = q.get(timeout=WATCH_POLL)
                except queue.Empty:
                    continue
                if kind == "msg" and "result" in msg:
                    result = msg["result"]
                    if int(result.get("compact_revision", 0) or 0) > 0:
                        raise WatchCompacted(
                            f"watch of {prefix!r} from revision {next_rev} is too old: etcd compacted up to "
                            f"revision {result['compact_revision']}; re-list and watch again",
                            revision=int(result["compact_revision"]),
                        )
                    lost_since = None
                    if result.get("canceled"):
                        kind = "lost"
                    else:
                        for ev in result.get("events") or []:
                            kv = ev["kv"]
                            rev = int(kv.get("mod_revision", 0))
                            if rev < next_rev:
                                continue
                            if ev.get("type") == "DELETE":
                                yield Event("delete", _unb64(kv["key"]), None, rev)
                            else:
                                yield Event("put", _unb64(kv["key"]), _unb64(kv.get("value")), rev)
                        events = result.get("events") or []
                        if events:
                            next_rev = max(next_rev, int(events[-1]["kv"].get("mod_revision", 0)) + 1)
                        continue
                # the stream ended or failed: reconnect from the next revision
                _close(resp)
                if stop is not None and stop.is_set():
                    return
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > RETRY_WINDOW:
                    raise DatastoreUnavailable(f"etcd datastore {self.url}: watch connection lost")
                time.sleep(0.1)
                resp, q = self._open_watch(prefix, next_rev)
        finally:
            _close(resp)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for clients in idle:
            for client in clients.values():
                client.session.close()


if TYPE_CHECKING:  # mypy proves that the backend implements the Store port
    _store: type[Store] = EtcdStore
