"""A watch notices a dead connection within seconds (issue 10, item 13).

The watcher talks to etcd through a TCP proxy this test runs on loopback.
Freezing the proxy makes every connection through it half-open: bytes go
in, nothing comes back, no FIN, no RST (what a frozen etcd or a lost NAT
entry looks like). Writes meanwhile go to etcd directly. The watch must
notice, and after the proxy forwards again (new connections only: the old
ones stay dead, as they would after a NAT entry is lost) deliver the events
written while it was cut off. Control: with the idle probe turned off
(``WATCH_IDLE = None``) the same freeze goes unnoticed and the events
never arrive on the dead stream.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from overlaycni.datastore import etcd as etcd_mod
from overlaycni.datastore import open_datastore
from overlaycni.datastore.watch import watch_loop
from overlaycni.errors import OverlayCNIError

pytestmark = pytest.mark.etcd


class FreezingProxy:
    """127.0.0.1:<random> -> ``target``. ``freeze()`` kills every open
    connection silently (bytes are read and dropped, nothing is closed) and
    so does every connection made before ``thaw()``; later ones forward."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = False
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket, list[bool]]] = []  # (client, upstream, [dead])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            with self._lock:
                dead = [self.frozen]
                self._conns.append((client, upstream, dead))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, dead), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, dead: list[bool]) -> None:
        try:
            while data := src.recv(65536):
                if not dead[0]:
                    dst.sendall(data)
        except OSError:
            pass

    def freeze(self) -> None:
        with self._lock:
            self.frozen = True
            for _, _, dead in self._conns:
                dead[0] = True

    def thaw(self) -> None:
        with self._lock:
            self.frozen = False

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for client, upstream, _ in self._conns:
                for s in (client, upstream):
                    try:
                        s.close()
                    except OSError:
                        pass


@pytest.fixture()
def proxied(etcd_url):
    port = int(etcd_url.rsplit(":", 1)[1])
    proxy = FreezingProxy(("127.0.0.1", port))
    yield proxy, f"etcd://127.0.0.1:{proxy.port}", etcd_url
    proxy.close()


def _run(proxied, *, probe: bool, monkeypatch) -> tuple[list[str], list[OverlayCNIError]]:
    proxy, via_proxy, direct = proxied
    if not probe:
        monkeypatch.setattr(etcd_mod, "WATCH_IDLE", None)
    watcher, writer = open_datastore(via_proxy), open_datastore(direct)
    seen: list[str] = []
    errors: list[OverlayCNIError] = []
    stop = threading.Event()

    def relist() -> None:
        seen.extend(kv.key for kv in watcher.list("/w/") if kv.key not in seen)

    t = threading.Thread(target=watch_loop, args=(watcher, "/w/"), kwargs={
        "stop": stop, "on_event": lambda ev: seen.append(ev.key), "on_relist": relist,
        "start_revision": writer.revision(), "on_error": errors.append, "delay": 0.2, "max_delay": 1.0,
    }, daemon=True)
    t.start()
    try:
        writer.put("/w/before", "1")
        assert _wait(lambda: "/w/before" in seen, 20), "the watch works through the proxy"
        proxy.freeze()
        writer.put("/w/during-1", "1")
        writer.put("/w/during-2", "1")
        _wait(lambda: bool(errors), 30 if probe else 12)
        proxy.thaw()  # new connections forward again; the old stream stays dead
        delivered = _wait(lambda: {"/w/during-1", "/w/during-2"} <= set(seen), 30 if probe else 8)
        return (seen if delivered else []), errors
    finally:
        stop.set()
        t.join(10)
        watcher.close()
        writer.close()


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def test_a_half_open_watch_is_noticed_and_resumes_with_the_missed_events(proxied, monkeypatch):
    seen, errors = _run(proxied, probe=True, monkeypatch=monkeypatch)
    assert errors, "the dead connection was not noticed while the proxy was frozen"
    assert {"/w/during-1", "/w/during-2"} <= set(seen)


def test_control_without_the_probe_the_dead_stream_goes_unnoticed(proxied, monkeypatch):
    seen, errors = _run(proxied, probe=False, monkeypatch=monkeypatch)
    assert errors == [] and seen == []
