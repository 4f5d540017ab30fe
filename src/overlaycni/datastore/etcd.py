"""etcd v3 datastore (``etcds://`` or ``etcd://host:port[,host:port...]``) over the JSON gateway.

Design note.
* Transport: etcd3gw's ``Etcd3Client`` (HTTP + JSON to the gRPC gateway);
  ``api_path`` is set to ``/v3/`` explicitly (etcd >= 3.4, Debian 12 ships
  3.4) so no discovery request is made. Keys and values are base64 on the
  wire; revisions are JSON strings (int64).
* TLS (``etcds://``): etcd3gw's ``protocol="https"``, ``ca_cert``,
  ``cert_cert`` and ``cert_key``, fed from ``tls.TLSFiles``: the server must
  present a certificate signed by ``--etcd-ca`` that names the host we dialled
  (IP SANs for IP endpoints), and we present ``--etcd-cert``. Every client set
  and the watch stream belong to one TLS generation; when the files rotate,
  pooled clients of the old generation are closed instead of reused and the
  watch re-opens from its next revision. A failed handshake is reported as
  ``DatastoreAuthError`` saying which side refused which certificate.
  Sessions ignore the environment (``trust_env = False``): requests would
  otherwise let ``REQUESTS_CA_BUNDLE`` replace ``--etcd-ca`` and send the
  traffic through ``HTTPS_PROXY``.
* etcd user auth (``--etcd-user``): a token from ``/v3/auth/authenticate``
  travels in the ``Authorization`` header; an expired or revoked token is
  replaced once per request. etcd maps a certificate's CN to a user only on
  its gRPC port, not through the JSON gateway, so the token is the way.
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
  the generator polls the queue every 0.25 s so ``stop`` is honoured (and
  ``wake_watches``, the agent's stop, wakes it at once). On a
  broken stream it reconnects (next endpoint) from the last revision seen + 1;
  a compacted start revision raises ``WatchCompacted``; no endpoint for
  ``RETRY_WINDOW`` seconds raises ``DatastoreUnavailable``.
* A dead stream is found in seconds, not at the next periodic pass: the
  watch asks for ``progress_notify`` (etcd then sends empty progress
  responses, every ``--experimental-watch-progress-notify-interval``, 10
  minutes by default: too rare to rely on); the response headers must come
  within ``STREAM_HEADERS_TIMEOUT``; the stream's socket has TCP keepalive
  (a vanished peer); and after ``WATCH_IDLE`` seconds of silence the stream's
  endpoint is probed with a trivial request (a frozen or partitioned etcd
  still completes TCP handshakes and keepalives, so only a request tells).
  A stream silent for ``WATCH_REWATCH`` seconds is re-opened from its next
  revision. Rejected: a read timeout that re-watches every few idle seconds
  (a TLS handshake per watcher each time) and etcd's ``progress_request``
  (it needs a bidirectional stream, which the JSON gateway over HTTP/1.1
  with ``requests`` cannot give).
* Limits: etcd allows 128 operations per transaction by default; callers
  (IPAM) chunk bulk deletes.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import DatastoreError, DatastoreUnavailable, NotFound, WatchCompacted
from ._etcd_transport import RETRY_WINDOW, Transport
from ._etcd_wire import _b64, _close, _kv, _range_op, _range_ops, _unb64
from .base import KV, ClosingMixin, Event, Snapshot, Store, TransactMixin, TxnResult, check_key
from .tls import EtcdCredentials

WATCH_POLL = 0.25
# An idle watch stream is silent: after WATCH_IDLE seconds without a message
# its endpoint is probed (a trivial request, WATCH_PROBE_TIMEOUT to answer);
# no answer means the stream is dead too (a frozen etcd, a partition), and it
# is re-opened elsewhere. A stream silent for WATCH_REWATCH seconds is
# re-opened anyway (from its next revision: nothing is lost), which bounds a
# half-open stream behind an endpoint that still answers. None: no probes.
WATCH_IDLE: float | None = 3.0
WATCH_PROBE_TIMEOUT = 2.0
WATCH_REWATCH = 60.0
log = logging.getLogger(__name__)


class EtcdStore(TransactMixin, ClosingMixin):
    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        *,
        url: str | None = None,
        tls: bool = False,
        credentials: EtcdCredentials | None = None,
    ) -> None:
        self._t = Transport(endpoints, url=url, tls=tls, credentials=credentials)
        self._watches: list[list[queue.Queue]] = []  # each open watch's current queue (``wake_watches``)
        self._watches_lock = threading.Lock()
        self.url = self._t.url
        self._post = self._t.post
        try:
            self.revision()  # fail now, clearly, when no endpoint answers or accepts us
        except BaseException:
            self._t.close()
            raise

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return self._t.endpoints

    @property
    def active_endpoint(self) -> tuple[str, int]:
        """The endpoint that answered last (requests start there)."""
        return self._t.active_endpoint

    @property
    def round_trips(self) -> int:
        """HTTP requests sent (for benchmarks)."""
        return self._t.round_trips

    def tls_status(self) -> dict[str, Any] | None:
        """The client certificate in use and how often the TLS files were
        re-read (None without TLS)."""
        tls = self._t.tls
        if tls is None:
            return None
        gen = tls.current()
        return {
            "generation": gen.number,
            "rotations": tls.rotations,
            "subject": gen.subject,
            "serial": gen.serial,
            "not_after": gen.not_after.isoformat() if gen.not_after else None,
        }

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
        # one key under overlaycni's prefix: an etcd user granted only that prefix may read it
        result = self._post("/kv/range", {"key": _b64("/overlaycni/"), "count_only": True})
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
    def watch(
        self,
        prefix: str,
        *,
        start_revision: int | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[Event]:
        next_rev = self.revision() + 1 if start_revision is None else int(start_revision)
        request = {
            "create_request": {
                **_range_op(prefix, prefix=True), "start_revision": str(next_rev), "progress_notify": True,
            }
        }
        resp, q, gen, where = self._t.open_stream("/watch", request)
        mine = [q]
        with self._watches_lock:
            self._watches.append(mine)
        lost_since: float | None = None
        heard = probed = time.monotonic()  # the stream's last message; the last probe of its endpoint
        try:
            while stop is None or not stop.is_set():
                mine[0] = q
                try:
                    kind, msg = q.get(timeout=WATCH_POLL)
                    if kind == "wake":
                        continue  # ``wake_watches``: the loop's condition looks at ``stop`` now
                except queue.Empty:
                    now = time.monotonic()
                    if gen is not None and self._t.generation() is not gen:
                        why = "rotated TLS files: present the new certificate"
                    elif WATCH_IDLE is None or now - max(heard, probed) < WATCH_IDLE:
                        continue
                    elif not self._t.probe(where, timeout=WATCH_PROBE_TIMEOUT):
                        kind, msg = "lost", None  # the server is gone or frozen: the stream is dead too
                        log.info("etcd watch of %s: %s:%d does not answer; reconnecting", prefix, *self.endpoints[where])
                        why = ""
                    elif now - heard >= WATCH_REWATCH:
                        why = f"silent for {WATCH_REWATCH:.0f} s"
                    else:
                        probed = now
                        continue
                    if why:  # the stream may be fine: open the next one before dropping it
                        log.debug("etcd watch of %s: re-watching from revision %d (%s)", prefix, next_rev, why)
                        request["create_request"]["start_revision"] = str(next_rev)
                        old = resp
                        resp, q, gen, where = self._t.open_stream("/watch", request)
                        _close(old)
                        heard = probed = time.monotonic()
                        continue
                if kind == "error" and isinstance(msg, dict):
                    self._t.refusal(json.dumps(msg))
                if kind == "msg" and "result" in msg:
                    heard = time.monotonic()
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
                log.debug("etcd watch of %s lost; reconnecting from revision %d", prefix, next_rev)
                if time.monotonic() - lost_since > RETRY_WINDOW:
                    raise DatastoreUnavailable(f"etcd datastore {self.url}: watch connection lost")
                time.sleep(0.1)
                request["create_request"]["start_revision"] = str(next_rev)
                resp, q, gen, where = self._t.open_stream("/watch", request)
                heard = probed = time.monotonic()
        finally:
            with self._watches_lock:
                self._watches.remove(mine)
            _close(resp)

    def wake_watches(self) -> None:
        """Wake every open watch now: one whose ``stop`` is set returns at
        once instead of at its next poll (``WATCH_POLL``); the others go on."""
        with self._watches_lock:
            queues = [w[0] for w in self._watches]
        for q in queues:
            q.put(("wake", None))

    def close(self) -> None:
        self._t.close()


if TYPE_CHECKING:  # mypy proves that the backend implements the Store port
    _store: type[Store] = EtcdStore
