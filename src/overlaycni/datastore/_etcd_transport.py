"""The etcd transport: endpoints, pooled etcd3gw clients, TLS generations,
etcd user tokens and retries (the design note is in ``etcd.py``)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from etcd3gw import exceptions as gw_exc
from etcd3gw.client import Etcd3Client

from .. import deadline
from ..errors import DatastoreAuthError, DatastoreError, DatastoreUnavailable, NotFound, WatchCompacted
from ._etcd_wire import _b64, _read_stream, auth_problem, keep_stream, tls_problem
from .tls import EtcdCredentials, TLSFiles, TLSGeneration

CONNECT_TIMEOUT = 1.5
REQUEST_TIMEOUT = 5.0
RETRY_WINDOW = 6.0
STREAM_HEADERS_TIMEOUT = 3.0  # etcd answers a watch request at once; then the stream has no read timeout
MAX_IDLE = 8  # pooled client sets kept between calls

# Debug lines name endpoints as host:port and the failure only: never a
# password, a token, a request body or key material.
log = logging.getLogger(__name__)


class _Retry(Exception):
    """An endpoint failed in a way another endpoint (or a retry) may fix."""


class _Refused(_Retry):
    pass


class _TLSRefused(_Refused):
    """The TLS handshake with this endpoint failed (the message says why)."""


class _TokenExpired(Exception):
    pass


class _Clients:
    """One etcd3gw client (one ``requests.Session``) per endpoint, all of one TLS generation."""

    def __init__(self, gen: TLSGeneration | None) -> None:
        self.gen = gen
        self.by_index: dict[int, Etcd3Client] = {}

    def close(self) -> None:
        for client in self.by_index.values():
            client.session.close()


class Transport:
    """Sends one JSON request to the first endpoint that takes it, as the
    configured client (TLS generation, auth token); opens watch streams."""

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        *,
        url: str | None = None,
        tls: bool = False,
        credentials: EtcdCredentials | None = None,
    ) -> None:
        if not endpoints:
            raise DatastoreError("etcd datastore needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.url = url or ("etcds://" if tls else "etcd://") + ",".join(f"{h}:{p}" for h, p in self.endpoints)
        self.credentials = credentials or EtcdCredentials()
        self.round_trips = 0  # HTTP requests sent (for benchmarks)
        self._idle: list[_Clients] = []  # pooled clients
        self._lock = threading.Lock()
        self._current = 0
        self._closed = False
        self._password = self.credentials.read_password() if self.credentials.user else None
        self._token: str | None = None
        self._token_lock = threading.Lock()
        self.tls = TLSFiles(self.credentials) if tls else None

    @property
    def active_endpoint(self) -> tuple[str, int]:
        """The endpoint that answered last (requests start there)."""
        return self.endpoints[self._current]

    # ----- clients ----------------------------------------------------------------
    def generation(self) -> TLSGeneration | None:
        return self.tls.current() if self.tls is not None else None

    def _new_client(self, index: int, gen: TLSGeneration | None) -> Etcd3Client:
        host, port = self.endpoints[index]
        timeout = (CONNECT_TIMEOUT, REQUEST_TIMEOUT)
        if gen is None:
            client = Etcd3Client(host=host, port=port, timeout=timeout, api_path="/v3/")  # type: ignore[arg-type]
        else:
            client = Etcd3Client(
                host=host,
                port=port,
                protocol="https",
                ca_cert=gen.ca,
                cert_cert=gen.cert,
                cert_key=gen.key,
                timeout=timeout,  # type: ignore[arg-type]  # requests takes (connect, read)
                api_path="/v3/",
            )
        # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace the session's
        # CA per request, and routes through HTTP(S)_PROXY: neither may decide
        # whom we trust with the cluster's state.
        client.session.trust_env = False
        return client

    def _checkout(self) -> _Clients:
        gen = self.generation()
        stale: list[_Clients] = []
        found = None
        with self._lock:
            while self._idle and found is None:
                clients = self._idle.pop()
                if clients.gen is gen:
                    found = clients
                else:
                    stale.append(clients)  # connections made with rotated-out files
        for clients in stale:
            clients.close()
        return found or _Clients(gen)

    def _checkin(self, clients: _Clients) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE and clients.gen is self.generation():
                self._idle.append(clients)
                return
        clients.close()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    def _authenticate(self, clients: _Clients) -> None:
        """Get a token for --etcd-user (once per expiry, shared by threads)."""
        with self._token_lock:
            if self._token is not None:
                return
            result = self._post_with(
                clients, "/auth/authenticate", {"name": self.credentials.user, "password": self._password}, auth=False
            )
            self._token = result.get("token") or None

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._current + i) % n for i in range(n)]

    def _post_one(
        self, clients: _Clients, index: int, path: str, payload: dict[str, Any], *, auth: bool = True
    ) -> dict[str, Any]:
        client = clients.by_index.get(index)
        if client is None:
            client = clients.by_index[index] = self._new_client(index, clients.gen)
        left = deadline.remaining(REQUEST_TIMEOUT) or 0.0  # a request's deadline (CNI ADD) cuts the timeouts
        if left <= 0:
            raise _Retry("the request's deadline passed")
        client.timeout = (min(CONNECT_TIMEOUT, left), left)  # type: ignore[assignment]  # requests takes (connect, read)
        self.round_trips += 1
        try:
            return client.post(client.get_url(path), json=payload, headers=self._headers() if auth else {})
        except gw_exc.ConnectionTimeoutError as exc:
            text = str(getattr(exc, "detail_text", "") or exc)
            if "connect timeout" in text or "ConnectTimeout" in text:
                raise _Refused("connect timed out") from None
            raise _Retry(f"timed out: {text[:200]}") from None
        except gw_exc.ConnectionFailedError as exc:
            text = str(getattr(exc, "detail_text", "") or exc)
            problem = tls_problem(text, credentials=self.credentials, host=self.endpoints[index][0])
            if problem:
                raise _TLSRefused(problem) from None
            if "refused" in text or "Max retries" in text or "NewConnectionError" in text:
                raise _Refused("connection refused") from None
            raise _Retry(f"unavailable: {text[:200]}") from None
        except gw_exc.Etcd3Exception as exc:
            text = str(getattr(exc, "detail_text", "") or exc)
            problem = auth_problem(text, credentials=self.credentials, url=self.url)
            if problem == "expired":
                raise _TokenExpired() from None
            if problem:
                raise DatastoreAuthError(problem) from None
            if "lease not found" in text:
                raise NotFound("etcd lease not found (expired or revoked)") from None
            if "compacted" in text:
                raise WatchCompacted(f"etcd: {text[:200]}") from None
            if "leader" in text or "timed out" in text or "unavailable" in text.lower():
                raise _Retry(text[:200]) from None
            raise DatastoreError(f"etcd {self.endpoints[index][0]}:{self.endpoints[index][1]} refused {path}: {text[:300]}") from None
        except ValueError as exc:  # not JSON
            raise _Retry(f"bad response: {exc}") from None

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        if self._closed:
            raise DatastoreError(f"datastore {self.url} is closed")
        clients = self._checkout()
        try:
            for attempt in (1, 2):
                if self._password is not None and self._token is None:
                    self._authenticate(clients)
                try:
                    return self._post_with(clients, path, payload)
                except _TokenExpired:
                    with self._token_lock:
                        self._token = None
                    if attempt == 2 or self._password is None:
                        raise DatastoreAuthError(f"etcd datastore {self.url} keeps refusing our auth token") from None
            raise AssertionError("unreachable")
        finally:
            self._checkin(clients)

    def _post_with(self, clients: _Clients, path: str, payload: dict[str, Any], *, auth: bool = True) -> dict[str, Any]:
        until = time.monotonic() + (deadline.remaining(RETRY_WINDOW) or 0.0)
        last = ""
        tls_failure = ""
        while True:
            refused_all = True
            for index in self._order():
                try:
                    result = self._post_one(clients, index, path, payload, auth=auth)
                except _TLSRefused as exc:
                    tls_failure = last = f"{self.endpoints[index][0]}:{self.endpoints[index][1]}: {exc}"
                    log.debug("etcd %s (%s); trying the next endpoint", last, path)
                    continue
                except _Refused as exc:
                    last = f"{self.endpoints[index][0]}:{self.endpoints[index][1]}: {exc}"
                    log.debug("etcd %s (%s); trying the next endpoint", last, path)
                    continue
                except _Retry as exc:
                    refused_all = False
                    last = f"{self.endpoints[index][0]}:{self.endpoints[index][1]}: {exc}"
                    log.debug("etcd %s (%s); trying the next endpoint", last, path)
                    continue
                if index != self._current:
                    log.debug("etcd: failed over to %s:%d", *self.endpoints[index])
                self._current = index
                return result
            if refused_all and tls_failure:
                raise DatastoreAuthError(f"etcd datastore {self.url}: TLS handshake failed ({tls_failure})")
            if refused_all or time.monotonic() >= until:
                raise DatastoreUnavailable(
                    f"etcd datastore {self.url} is unreachable ({last})",
                    details="check that etcd runs and listens on the given host:port"
                    + ("; an etcd that speaks only HTTPS closes plain connections: use etcds://" if not self.tls else ""),
                )
            time.sleep(0.2)

    def probe(self, index: int, *, timeout: float) -> bool:
        """Does endpoint ``index`` answer a trivial request within ``timeout``
        seconds (one try, no fail-over)? Any HTTP answer counts: the server
        is alive. Used on an idle watch stream, whose silence alone says
        nothing."""
        clients = self._checkout()
        try:
            client = clients.by_index.get(index)
            if client is None:
                client = clients.by_index[index] = self._new_client(index, clients.gen)
            self.round_trips += 1
            client.session.post(
                client.get_url("/kv/range"),
                json={"key": _b64("/overlaycni/"), "count_only": True},
                timeout=(CONNECT_TIMEOUT, timeout),
                headers=self._headers(),
            )
            return True
        except Exception as exc:  # requests' connection errors and timeouts
            log.debug("etcd %s:%d did not answer a probe: %s", *self.endpoints[index], type(exc).__name__)
            return False
        finally:
            self._checkin(clients)

    # ----- streams (watch) ---------------------------------------------------------
    def open_stream(self, path: str, request: dict[str, Any]) -> tuple[Any, queue.Queue, TLSGeneration | None, int]:
        """POST ``request`` to a streaming endpoint (``/watch``); a daemon
        thread reads its JSON lines into the returned queue. Also returns the
        endpoint's index (probe it when the stream is idle)."""
        deadline = time.monotonic() + RETRY_WINDOW
        last = ""
        while time.monotonic() < deadline:
            refused_all, tls_failure = True, ""
            if self._password is not None and self._token is None:
                clients = self._checkout()
                try:
                    self._authenticate(clients)
                finally:
                    self._checkin(clients)
            gen = self.generation()
            for index in self._order():
                where = f"{self.endpoints[index][0]}:{self.endpoints[index][1]}"
                client = self._new_client(index, gen)  # its own session: the stream holds the connection
                try:
                    resp = client.session.post(
                        client.get_url(path),
                        json=request,
                        stream=True,
                        timeout=(CONNECT_TIMEOUT, STREAM_HEADERS_TIMEOUT),  # a frozen server: on to the next
                        headers=self._headers(),
                    )
                except Exception as exc:  # requests' connection errors
                    problem = tls_problem(str(exc), credentials=self.credentials, host=self.endpoints[index][0])
                    if problem:
                        tls_failure = f"{where}: {problem}"
                    last = tls_failure or f"{where}: {type(exc).__name__}"
                    log.debug("etcd watch: %s; trying the next endpoint", last)
                    continue
                if resp.status_code != 200:
                    refused_all = False
                    self.refusal(resp.text)
                    last = f"{where}: HTTP {resp.status_code}"
                    log.debug("etcd watch: %s; trying the next endpoint", last)
                    resp.close()
                    continue
                self._current = index
                if not keep_stream(resp, idle=10, interval=3, count=3):
                    log.debug("etcd watch: stream socket not reachable; it keeps a %.0f s read timeout", STREAM_HEADERS_TIMEOUT)
                q: queue.Queue = queue.Queue()
                threading.Thread(target=_read_stream, args=(resp, q), daemon=True).start()
                return resp, q, gen, index
            if refused_all and tls_failure:
                raise DatastoreAuthError(f"etcd datastore {self.url}: cannot open a watch: TLS handshake failed ({tls_failure})")
            time.sleep(0.2)
        raise DatastoreUnavailable(f"etcd datastore {self.url}: cannot open a watch ({last})")

    def refusal(self, text: str) -> None:
        """Raise for an auth refusal in ``text``; forget an expired token."""
        problem = auth_problem(text, credentials=self.credentials, url=self.url)
        if problem == "expired":
            with self._token_lock:
                self._token = None
        elif problem:
            raise DatastoreAuthError(problem)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for clients in idle:
            clients.close()
        if self.tls is not None:
            self.tls.close()
