"""Client-side security settings for etcd: TLS files, etcd user auth, rotation.

Design note.
* Settings: ``EtcdCredentials`` holds the paths given by ``--etcd-ca``,
  ``--etcd-cert``, ``--etcd-key`` (or ``OVERLAYCNI_ETCD_CA/CERT/KEY``) and
  etcd's own user auth (``--etcd-user`` and a password from
  ``--etcd-password-file`` or ``OVERLAYCNI_ETCD_PASSWORD``: never on argv,
  where every user of the machine can read it in ``/proc/*/cmdline``).
  ``check_for(scheme)`` names every missing or contradictory setting at once.
* Rotation: ``TLSFiles`` reads the three files, checks them (PEM, the key
  matches the certificate, not expired) and hands the transport a
  *generation*: copies of exactly the bytes it checked, in anonymous memory
  files (``memfd_create(2)``) opened by path as ``/proc/self/fd/N``. Before a
  connection is made the store asks for the current generation; at most once
  a second that stats the files (device, inode, mtime, size: a rename, a
  rewrite in place and a Kubernetes-style symlink swap all show), and a change
  makes a new generation. Files caught half-written (the key no longer
  matches the certificate) are refused with a warning and the previous
  generation stays in use until the files agree again: a rotation never
  leaves the agent without credentials, and it never needs a restart.
* Why memory files and not the paths: requests (under etcd3gw) opens the
  certificate files again for every new TLS connection, so a connection made
  in the middle of a rotation would read a new certificate with an old key.
  Rejected: a copy on disk (a private key left behind when the process is
  killed); an ``ssl.SSLContext`` mounted on requests' adapter (requests
  overrides the context's verify mode and CA bundle per request).
* etcd checks a client certificate only during the TLS handshake, so the
  store also drops its pooled keep-alive connections and re-opens its watch
  stream when the generation changes (see ``etcd.py``).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from ..errors import DatastoreCredentialsError

log = logging.getLogger("overlaycni.datastore")

ENV_CA = "OVERLAYCNI_ETCD_CA"
ENV_CERT = "OVERLAYCNI_ETCD_CERT"
ENV_KEY = "OVERLAYCNI_ETCD_KEY"
ENV_USER = "OVERLAYCNI_ETCD_USER"
ENV_PASSWORD_FILE = "OVERLAYCNI_ETCD_PASSWORD_FILE"
ENV_PASSWORD = "OVERLAYCNI_ETCD_PASSWORD"
CHECK_INTERVAL = 1.0  # seconds between stats of the TLS files

# (attribute, flag, environment variable)
_SETTINGS = (
    ("ca", "--etcd-ca", ENV_CA),
    ("cert", "--etcd-cert", ENV_CERT),
    ("key", "--etcd-key", ENV_KEY),
    ("user", "--etcd-user", ENV_USER),
    ("password_file", "--etcd-password-file", ENV_PASSWORD_FILE),
)


def _flag(attr: str) -> str:
    return next(f"{flag} ({env})" for a, flag, env in _SETTINGS if a == attr)


@dataclass(frozen=True)
class EtcdCredentials:
    """How to prove who we are to etcd, and how to know it is etcd."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password_file: str | None = None
    password: str | None = field(default=None, repr=False)  # from the environment only

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EtcdCredentials:
        env = os.environ if environ is None else environ
        values = {attr: env.get(var) or None for attr, _, var in _SETTINGS}
        return cls(**values, password=env.get(ENV_PASSWORD) or None)

    def or_env(self, environ: Mapping[str, str] | None = None) -> EtcdCredentials:
        """These settings, with the environment filling the ones not given."""
        env = EtcdCredentials.from_env(environ)
        return replace(self, **{a: getattr(self, a) or getattr(env, a) for a in (*(s[0] for s in _SETTINGS), "password")})

    @property
    def tls_files(self) -> bool:
        return bool(self.ca or self.cert or self.key)

    def check_for(self, scheme: str, url: str) -> None:
        """Raise ``DatastoreCredentialsError`` naming every missing or
        contradictory setting for a datastore URL of ``scheme``."""
        problems: list[str] = []
        if scheme == "etcds":
            missing = [a for a in ("ca",) if not getattr(self, a)]
            if not self.user or self.cert or self.key:  # a client certificate is the default proof
                missing += [a for a in ("cert", "key") if not getattr(self, a)]
            if missing:
                problems.append(
                    f"missing {', '.join(_flag(a) for a in missing)}: etcd over TLS needs the CA that signed its "
                    "server certificate and this client's certificate and key (`overlaycni certs init` makes them)"
                )
        elif scheme == "etcd" and self.tls_files:
            given = ", ".join(_flag(a).split()[0] for a in ("ca", "cert", "key") if getattr(self, a))
            problems.append(f"{given} given, but {url} is plain HTTP: use etcds://host:port for TLS")
        if scheme in ("etcd", "etcds"):
            if self.user and not (self.password_file or self.password):
                problems.append(f"--etcd-user {self.user!r} needs a password: {_flag('password_file')} or {ENV_PASSWORD}")
            if (self.password_file or self.password) and not self.user:
                problems.append(f"a password was given without {_flag('user')}")
        if problems:
            raise DatastoreCredentialsError(f"--datastore {url}: " + "; ".join(problems))

    def read_password(self) -> str | None:
        if self.password:
            return self.password
        if not self.password_file:
            return None
        try:
            with open(self.password_file, encoding="utf-8") as f:
                text = f.read().rstrip("\r\n")
        except OSError as exc:
            raise DatastoreCredentialsError(f"--etcd-password-file {self.password_file}: {exc.strerror or exc}") from None
        if not text:
            raise DatastoreCredentialsError(f"--etcd-password-file {self.password_file} is empty")
        return text


# ----- TLS files and their rotation ------------------------------------------------


@dataclass(frozen=True)
class TLSGeneration:
    """One checked set of TLS files. The paths are this process's private
    copies (``/proc/self/fd/N``); ``number`` grows with each rotation."""

    number: int
    ca: str
    cert: str | None
    key: str | None
    subject: str | None = None
    serial: str | None = None  # hex, as `overlaycni certs show` prints it
    not_after: datetime | None = None


Fingerprint = tuple[tuple[int, int, int, int] | None, ...]


class TLSFiles:
    """The current ``TLSGeneration`` of a set of CA/cert/key files."""

    def __init__(self, credentials: EtcdCredentials, *, check_interval: float = CHECK_INTERVAL) -> None:
        if not credentials.ca:
            raise DatastoreCredentialsError(f"etcd over TLS needs {_flag('ca')}")
        self.ca_path = credentials.ca
        self.cert_path = credentials.cert
        self.key_path = credentials.key
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._fds: list[list[int]] = []  # memfds of the current and the previous generation
        self._checked = time.monotonic()
        self._seen = self._fingerprint()
        self._refused: Fingerprint | None = None
        self._current = self._load(1)  # raises: the first files must be right
        self.rotations = 0

    def _paths(self) -> tuple[tuple[str, str | None], ...]:
        return (("--etcd-ca", self.ca_path), ("--etcd-cert", self.cert_path), ("--etcd-key", self.key_path))

    def _fingerprint(self) -> Fingerprint:
        out = []
        for _, path in self._paths():
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size) if st else None)
        return tuple(out)

    def current(self) -> TLSGeneration:
        """The generation to use for a new connection (re-reads changed files)."""
        now = time.monotonic()
        if now - self._checked < self.check_interval:
            return self._current
        with self._lock:
            self._checked = now
            seen = self._fingerprint()
            if seen == self._seen or seen == self._refused:
                return self._current
            try:
                gen = self._load(self._current.number + 1)
            except DatastoreCredentialsError as exc:
                self._refused = seen
                log.warning("etcd TLS files changed but are not usable (%s); keeping generation %d", exc, self._current.number)
                return self._current
            self._seen, self._refused, self._current = seen, None, gen
            self.rotations += 1
            log.info("etcd TLS files re-read: generation %d (%s, valid until %s)", gen.number, gen.subject, gen.not_after)
            return gen

    def _load(self, number: int) -> TLSGeneration:
        data = {flag: _read(flag, path) for flag, path in self._paths() if path}
        _pem_certs("--etcd-ca", self.ca_path, data["--etcd-ca"])
        subject = serial = not_after = None
        if self.cert_path or self.key_path:
            if not (self.cert_path and self.key_path):
                raise DatastoreCredentialsError("give both --etcd-cert and --etcd-key, or neither")
            subject, serial, not_after = _check_pair(self.cert_path, data["--etcd-cert"], self.key_path, data["--etcd-key"])
            _warn_mode(self.key_path)
        fds = [_memfd(f"overlaycni{flag}", blob) for flag, blob in data.items()]
        paths = [f"/proc/self/fd/{fd}" for fd in fds]
        self._fds.append(fds)
        while len(self._fds) > 2:  # connections of the generation before last are gone by now
            for fd in self._fds.pop(0):
                os.close(fd)
        cert, key = (paths[1], paths[2]) if len(paths) == 3 else (None, None)
        return TLSGeneration(number, paths[0], cert, key, subject=subject, serial=serial, not_after=not_after)

    def close(self) -> None:
        with self._lock:
            for fds in self._fds:
                for fd in fds:
                    os.close(fd)
            self._fds = []


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DatastoreCredentialsError(f"{flag} {path}: {exc.strerror or exc}") from None


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    os.fchmod(fd, 0o600)
    return fd


def _pem_certs(flag: str, path: str, data: bytes) -> list:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise DatastoreCredentialsError(f"{flag} {path}: no PEM certificate in it")
    return certs


def _check_pair(cert_path: str, cert_data: bytes, key_path: str, key_data: bytes) -> tuple[str, str, datetime]:
    """The certificate's subject, serial and expiry, once it is checked to be a PEM
    certificate whose public key matches the unencrypted private key."""
    from cryptography.hazmat.primitives import serialization

    leaf = _pem_certs("--etcd-cert", cert_path, cert_data)[0]
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise DatastoreCredentialsError(f"--etcd-key {key_path} is encrypted; give an unencrypted key (mode 0600)") from None
    except ValueError:
        raise DatastoreCredentialsError(f"--etcd-key {key_path}: not a PEM private key") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if leaf.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise DatastoreCredentialsError(f"--etcd-key {key_path} does not belong to the certificate in --etcd-cert {cert_path}")
    not_after = leaf.not_valid_after_utc
    if not_after < datetime.now(UTC):
        raise DatastoreCredentialsError(f"--etcd-cert {cert_path} expired on {not_after:%Y-%m-%d %H:%M} UTC")
    return leaf.subject.rfc4514_string(), format(leaf.serial_number, "x"), not_after


def _warn_mode(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("--etcd-key %s is readable by group or others (mode %o); chmod 600 it", path, stat.S_IMODE(mode))
