"""A small PKI for etcd: one CA, etcd's server certificate, client certificates.

Layout of the directory (0700; every file 0600):

    ca.crt, ca.key                  the cluster's etcd CA (keep ca.key off the nodes)
    etcd-server.crt, .key           etcd's serving (and peer) certificate; SANs are
                                    the etcd addresses plus 127.0.0.1 and localhost
    operator.crt, .key              the operator's CLI client certificate
    nodes/NAME.crt, nodes/NAME.key  one client certificate per node (its agent)
    crl.pem                         revoked client certificates (etcd's --client-crl-file,
                                    read by etcd at every new connection)

Keys are ECDSA P-256, signatures SHA-256 (what etcd's own docs generate with
cfssl). The CA is valid for ten years, the others for ``days``. One server
certificate serves every member, as its client and peer certificate (EKU
serverAuth + clientAuth): members are equally trusted, so per-member keys
would add files without adding a boundary.

``init_pki`` writes what is missing and keeps what is there (checking that
kept certificates still match the request and the CA); ``force`` re-issues
the leaf certificates it names from the existing CA. The CA is never
replaced: new leaves stay trusted by every etcd and node already deployed. To
start over, remove ``ca.crt`` and ``ca.key`` and re-run with ``force``.
``renew`` re-issues named leaves with fresh keys (client rotation) and, with
``revoke_old``, adds the replaced serials to ``crl.pem``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import UsageError
from ._x509 import SKEW, issue, load_pair, new_ca, sans_of, signed_by

DEFAULT_DAYS = 365
LOOPBACK = ("127.0.0.1", "localhost")
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


@dataclass(frozen=True)
class CertFile:
    """One certificate this module wrote or found (its key sits beside it)."""

    kind: str  # ca | server | operator | node
    name: str
    cert: str
    key: str
    action: str  # written | reissued | kept | found
    subject: str
    sans: tuple[str, ...]
    serial: str
    not_after: datetime

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "name": self.name,
            "cert": self.cert,
            "key": self.key,
            "action": self.action,
            "subject": self.subject,
            "sans": list(self.sans),
            "serial": self.serial,
            "not_after": self.not_after.isoformat(),
        }


@dataclass(frozen=True)
class Layout:
    dir: Path

    @property
    def ca(self) -> tuple[Path, Path]:
        return self.dir / "ca.crt", self.dir / "ca.key"

    @property
    def server(self) -> tuple[Path, Path]:
        return self.dir / "etcd-server.crt", self.dir / "etcd-server.key"

    @property
    def operator(self) -> tuple[Path, Path]:
        return self.dir / "operator.crt", self.dir / "operator.key"

    @property
    def crl(self) -> Path:
        return self.dir / "crl.pem"

    def node(self, name: str) -> tuple[Path, Path]:
        return self.dir / "nodes" / f"{name}.crt", self.dir / "nodes" / f"{name}.key"


# ----- inputs -------------------------------------------------------------------------


def parse_addresses(values: Sequence[str]) -> list[str]:
    """etcd addresses (IPs or DNS names), deduplicated, in order."""
    out: list[str] = []
    for raw in values:
        for item in (x.strip() for x in raw.split(",")):
            if not item:
                continue
            try:
                item = str(ipaddress.ip_address(item))
            except ValueError:
                if not _NAME_RE.match(item.lower()):
                    raise UsageError(f"--etcd-address {item!r} is neither an IP address nor a DNS name") from None
                item = item.lower()
            if item not in out:
                out.append(item)
    return out


def parse_names(values: Sequence[str], *, flag: str = "--node") -> list[str]:
    out: list[str] = []
    for raw in values:
        for item in (x.strip() for x in raw.split(",")):
            if not item:
                continue
            if len(item) > 253 or not _NAME_RE.match(item):
                raise UsageError(
                    f"{flag} {item!r} is not a valid node name (lowercase DNS name: [a-z0-9-] labels separated by dots)"
                )
            if item not in out:
                out.append(item)
    return out


def server_sans(addresses: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*addresses, *LOOPBACK]))


# ----- files --------------------------------------------------------------------------


def _write(path: Path, data: bytes, *, replace: bool) -> None:
    """Write ``data`` to ``path`` (0600) atomically; without ``replace`` an
    existing file is never touched (the link fails instead)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except FileExistsError:
        raise UsageError(f"{path} appeared while writing; not overwritten (use --force)") from None
    finally:
        tmp.unlink(missing_ok=True)


def _save(paths: tuple[Path, Path], cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, *, replace: bool) -> None:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write(paths[1], key_pem, replace=replace)
    _write(paths[0], cert.public_bytes(serialization.Encoding.PEM), replace=replace)


def _record(kind: str, name: str, paths: tuple[Path, Path], cert: x509.Certificate, action: str) -> CertFile:
    return CertFile(
        kind=kind,
        name=name,
        cert=str(paths[0]),
        key=str(paths[1]),
        action=action,
        subject=cert.subject.rfc4514_string(),
        sans=sans_of(cert),
        serial=format(cert.serial_number, "x"),
        not_after=cert.not_valid_after_utc,
    )


def write_crl(layout: Layout, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], *, add: Sequence[int] = (), now: datetime) -> int:
    """(Re)write ``crl.pem``: the serials already in it plus ``add``. Returns
    how many certificates it revokes."""
    serials: dict[int, datetime] = {}
    if layout.crl.exists():
        old = x509.load_pem_x509_crl(layout.crl.read_bytes())
        serials = {r.serial_number: r.revocation_date_utc for r in old}
    for serial in add:
        serials.setdefault(serial, now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca[0].subject)
        .last_update(now - SKEW)
        .next_update(ca[0].not_valid_after_utc)
    )
    for serial, when in sorted(serials.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca[1], hashes.SHA256())
    _write(layout.crl, crl.public_bytes(serialization.Encoding.PEM), replace=True)
    return len(serials)


# ----- the operations -------------------------------------------------------------------


def _open_dir(directory: str | os.PathLike[str]) -> Layout:
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise UsageError(f"--dir {d} exists and is not a directory")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return Layout(d)


def _leaf_plan(layout: Layout, addresses: Sequence[str], nodes: Sequence[str]) -> list[tuple[str, str, tuple[Path, Path]]]:
    plan = [("operator", "operator", layout.operator)] + [("node", n, layout.node(n)) for n in nodes]
    if addresses or layout.server[0].exists() or layout.server[1].exists():
        plan.insert(0, ("server", "etcd", layout.server))
    return plan


def init_pki(
    directory: str | os.PathLike[str],
    *,
    etcd_addresses: Sequence[str] = (),
    nodes: Sequence[str] = (),
    force: bool = False,
    days: int = DEFAULT_DAYS,
    now: datetime | None = None,
) -> list[CertFile]:
    """Create (or complete) the PKI in ``directory``; see the module note.
    Raises ``UsageError`` naming the file and the conflict, having written
    nothing, when a kept file does not fit the request."""
    if days < 1:
        raise UsageError(f"--days {days}: must be at least 1")
    now = now or datetime.now(UTC)
    layout = _open_dir(directory)
    if not etcd_addresses and not layout.server[0].exists():
        raise UsageError("--etcd-address is required to create etcd's server certificate (the IPs clients dial)")
    wanted_sans = server_sans(etcd_addresses) if etcd_addresses else ()
    ca = load_pair(layout.ca)
    plan = _leaf_plan(layout, etcd_addresses, nodes)
    # check everything first: a conflict writes nothing
    existing: dict[Path, x509.Certificate] = {}
    for kind, _, paths in plan:
        found = load_pair(paths)
        if found is None or force:
            continue
        cert = found[0]
        if ca is None or not signed_by(cert, ca[0]):
            raise UsageError(f"{paths[0]} exists but is not signed by {layout.ca[0]}; --force re-issues it from that CA")
        if kind == "server" and wanted_sans and set(sans_of(cert)) != set(wanted_sans):
            raise UsageError(
                f"{paths[0]} names {', '.join(sans_of(cert))}, not {', '.join(wanted_sans)}; "
                "--force re-issues it for the new --etcd-address list"
            )
        existing[paths[0]] = cert
    out: list[CertFile] = []
    if ca is None:
        ca = new_ca(now)
        _save(layout.ca, *ca, replace=False)
        out.append(_record("ca", "ca", layout.ca, ca[0], "written"))
    else:
        out.append(_record("ca", "ca", layout.ca, ca[0], "kept"))
    if not layout.crl.exists():
        write_crl(layout, ca, now=now)  # etcd's --client-crl-file must exist, even empty
    for kind, name, paths in plan:
        if paths[0] in existing:
            out.append(_record(kind, name, paths, existing[paths[0]], "kept"))
            continue
        had = paths[0].exists()
        sans = wanted_sans or (sans_of(x509.load_pem_x509_certificate(paths[0].read_bytes())) if had else ())
        cert, key = _issue_kind(ca, kind=kind, name=name, sans=sans, days=days, now=now)
        _save(paths, cert, key, replace=had)
        out.append(_record(kind, name, paths, cert, "reissued" if had else "written"))
    return out


def _issue_kind(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], *, kind: str, name: str, sans: Sequence[str], days: int, now: datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if kind == "server":
        return issue(ca, common="etcd", org="overlaycni etcd", sans=sans, server=True, days=days, now=now)
    if kind == "operator":
        return issue(ca, common="operator", org="overlaycni operators", sans=(), server=False, days=days, now=now)
    return issue(ca, common=name, org="overlaycni nodes", sans=(name,), server=False, days=days, now=now)


def renew(
    directory: str | os.PathLike[str],
    *,
    nodes: Sequence[str] = (),
    operator: bool = False,
    server: bool = False,
    revoke_old: bool = False,
    days: int = DEFAULT_DAYS,
    now: datetime | None = None,
) -> list[CertFile]:
    """Re-issue the named certificates with new keys from the existing CA
    (the server keeps its SANs). Each must exist already. ``revoke_old``
    adds the replaced certificates to ``crl.pem``."""
    now = now or datetime.now(UTC)
    layout = Layout(Path(directory))
    ca = load_pair(layout.ca)
    if ca is None:
        raise UsageError(f"no CA in {layout.dir} (ca.crt, ca.key): run `overlaycni certs init` first")
    plan = ([("server", "etcd", layout.server)] if server else []) + ([("operator", "operator", layout.operator)] if operator else [])
    plan += [("node", n, layout.node(n)) for n in nodes]
    if not plan:
        raise UsageError("name what to renew: --node NAME[,NAME...], --operator and/or --server")
    olds: list[x509.Certificate] = []
    for _kind, name, paths in plan:
        pair = load_pair(paths)
        if pair is None:
            raise UsageError(f"{paths[0]} does not exist; `overlaycni certs init --node {name}` creates it")
        olds.append(pair[0])
    out = []
    for (kind, name, paths), old in zip(plan, olds, strict=True):
        cert, key = _issue_kind(ca, kind=kind, name=name, sans=sans_of(old), days=days, now=now)
        _save(paths, cert, key, replace=True)
        out.append(_record(kind, name, paths, cert, "reissued"))
    if revoke_old:
        write_crl(layout, ca, add=[old.serial_number for old in olds], now=now)
    return out


def revoke(directory: str | os.PathLike[str], serials: Sequence[str], *, now: datetime | None = None) -> int:
    """Add certificates (hex serials, as ``show`` prints them) to ``crl.pem``;
    returns how many it revokes in all. etcd reads the file at each new
    connection: copy it to every member's --client-crl-file."""
    layout = Layout(Path(directory))
    ca = load_pair(layout.ca)
    if ca is None:
        raise UsageError(f"no CA in {layout.dir} (ca.crt, ca.key): run `overlaycni certs init` first")
    numbers = []
    for text in serials:
        try:
            numbers.append(int(text.replace(":", ""), 16))
        except ValueError:
            raise UsageError(f"--serial {text!r} is not a hexadecimal serial number") from None
    return write_crl(layout, ca, add=numbers, now=now or datetime.now(UTC))


def show(directory: str | os.PathLike[str]) -> list[CertFile]:
    """Every certificate of the layout in ``directory`` (action "found")."""
    layout = Layout(Path(directory))
    if not layout.dir.is_dir():
        raise UsageError(f"--dir {layout.dir} is not a directory")
    found: list[tuple[str, str, tuple[Path, Path]]] = [("ca", "ca", layout.ca), ("server", "etcd", layout.server)]
    found.append(("operator", "operator", layout.operator))
    found += [("node", p.stem, layout.node(p.stem)) for p in sorted((layout.dir / "nodes").glob("*.crt"))]
    out = []
    for kind, name, paths in found:
        pair = load_pair(paths)
        if pair is not None:
            out.append(_record(kind, name, paths, pair[0], "found"))
    return out
