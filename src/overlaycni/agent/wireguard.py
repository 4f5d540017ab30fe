"""The node's WireGuard identity: its private key file, and key rotation.

The key pair is generated on the node the first time the agent starts with
the wireguard backend (X25519 from ``cryptography``); the private key is
written to ``--wireguard-key`` (default ``/var/lib/overlaycni/wireguard.key``,
mode 0600, the base64 form ``wg genkey`` writes) and never leaves the node:
only the public key goes into the node record, and nothing logs the private
key (``PrivateKey`` has no printable secret). A key file readable by group
or others is refused, like ssh refuses a loose private key.

Rotation (``overlaycni node rotate-key``) is a request in the datastore
(``ipam.rotation``) because the CLI runs anywhere and cannot see the key.
The agent acts on it in this order, each step safe to crash after:

1. write the new key to ``<file>.new`` (0600); a crash leaves the old key
   in force and the request pending;
2. put the new key into the desired state and reconcile: the device now
   uses it (peers still have the old public key, so the node's next
   handshakes fail until step 4 reaches them);
3. rename ``<file>.new`` over the key file: a restart from here on uses the
   new key, and the agent publishes the public key of whatever key it
   loads at start;
4. write the node record with the new public key: peers replace the peer
   in one UAPI transaction (same allowed IPs, route untouched) and the next
   packet starts a handshake with the new key;
5. delete the request (compared on its revision).

The loss is what steps 2-4 take plus one handshake round trip: a watch
event's latency, not a handshake timeout, because the peers initiate as
soon as they hold the new key.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..dataplane.wgmodel import PrivateKey
from ..datastore import Store
from ..datastore.keys import wgrotate_key
from ..errors import ConfigError, FieldError, OverlayCNIError
from ..ipam.rotation import RotationRequest, finish_key_rotation, pending_key_rotation

log = logging.getLogger("overlaycni.agent")
DEFAULT_KEY_FILE = "/var/lib/overlaycni/wireguard.key"


def write_key(path: Path, key: PrivateKey) -> None:
    """Atomically write ``key`` to ``path`` with mode 0600 (never wider, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (key.to_base64() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_key(path: Path) -> PrivateKey:
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(FieldError(
            "wireguard-key", f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; a private key must be readable by its "
            "owner only (chmod 600 it, or delete it and rotate: the agent then generates a new one)",
        ))  # fmt: skip
    try:
        return PrivateKey.from_base64(path.read_text().strip())
    except ConfigError:
        raise ConfigError(FieldError("wireguard-key", f"{path} does not hold a WireGuard private key (base64 of 32 bytes)")) from None


class NodeKey:
    """The key file of this node; ``key`` is the one in force."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.created = not self.path.exists()
            if self.created:
                write_key(self.path, PrivateKey.generate())
                log.info("wireguard: generated a key pair in %s", self.path)
            self.key = read_key(self.path)
        except OSError as exc:
            raise ConfigError(FieldError("wireguard-key", f"{path}: {exc.strerror or exc}")) from None

    @property
    def staged(self) -> Path:
        return self.path.with_name(self.path.name + ".new")

    def stage(self) -> PrivateKey:
        new = PrivateKey.generate()
        write_key(self.staged, new)
        return new

    def commit(self) -> None:
        os.replace(self.staged, self.path)


def record_identity(key: NodeKey | None, port: int) -> dict[str, Any]:
    """The WireGuard part of this node's record, as ``register_node`` takes it
    (nothing for other backends)."""
    if key is None:
        return {}
    return {"wireguard_public_key": key.key.public, "wireguard_port": port}


class KeyRotator:
    """Acts on this node's rotation requests (``ipam.rotation``).

    ``reconcile()`` programs the current desired state (which reads
    ``node_key.key``); ``publish()`` writes the node record with it."""

    def __init__(
        self, store: Store, *, cluster: str, node: str, node_key: NodeKey,
        reconcile: Callable[[], None], publish: Callable[[], None], stop: threading.Event,
    ) -> None:  # fmt: skip
        self.store, self.cluster, self.node = store, cluster, node
        self.node_key = node_key
        self._reconcile, self._publish, self._stop = reconcile, publish, stop
        self._lock = threading.Lock()
        self.rotations = 0
        self.last_error: str | None = None

    def check(self) -> bool:
        """Act on a pending request, if any. True if a key was rotated."""
        with self._lock:
            req = pending_key_rotation(self.store, self.cluster, self.node)
            if req is None:
                return False
            self._rotate(req)
            return True

    def _rotate(self, req: RotationRequest) -> None:
        old = self.node_key.key
        new = self.node_key.stage()
        self.node_key.key = new
        try:
            self._reconcile()
        except BaseException:
            self.node_key.key = old
            raise
        self.node_key.commit()
        self._publish()
        finish_key_rotation(self.store, self.cluster, req)
        self.rotations += 1
        log.info("wireguard key rotated (request %s): public key %s -> %s", req.id, old.public, new.public)

    def run(self) -> None:
        """Watch for requests until ``stop``; a failure is logged and retried."""
        key = wgrotate_key(self.cluster, self.node)
        while not self._stop.is_set():
            try:
                rev = self.store.revision()
                self.check()
                for ev in self.store.watch(key, start_revision=rev + 1, stop=self._stop):
                    if self._stop.is_set():
                        return  # no rotation after the stop: the agent is closing its kernel handles
                    if ev.key == key and ev.kind == "put":
                        self.check()
            except OverlayCNIError as exc:
                self.last_error = f"key rotation: {exc}"
                log.warning("wireguard key rotation: %s; retrying", exc)
                self._stop.wait(2.0)
