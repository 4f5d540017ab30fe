"""WireGuard value types of the data plane (pure).

A WireGuard key is 32 bytes of Curve25519 (X25519); tools and node records
spell it as base64 of the raw bytes (44 characters), the UAPI protocol as 64
hex digits (https://www.wireguard.com/xplatform/). ``PrivateKey`` keeps the
secret out of ``repr``/``str``, so a logged ``NodeState`` or spec never
shows it; only ``public`` (safe to publish) is printable.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from ..cidr import IPNetwork
from ..errors import ConfigError, FieldError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

WG_IFNAME = "ocni.wg"
WIREGUARD_OVERHEAD = 60  # outer IPv4 20 + UDP 8 + data header 16 + Poly1305 tag 16
DEFAULT_WIREGUARD_PORT = 51820
KEY_LEN = 32


def key_from_base64(text: str, *, field_name: str = "wireguard-public-key") -> bytes:
    """The 32 raw bytes of a base64 WireGuard key; ``ConfigError`` naming the field otherwise."""
    try:
        raw = base64.b64decode(text.strip(), validate=True) if isinstance(text, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_LEN:
        raise ConfigError(FieldError(field_name, f"{text!r} is not a WireGuard key (base64 of 32 bytes, 44 characters)"))
    return raw


def check_public_key(text: str, *, field_name: str = "wireguard-public-key") -> str:
    """A normalised base64 public key (raises ``ConfigError`` naming the field)."""
    return base64.b64encode(key_from_base64(text, field_name=field_name)).decode()


def b64_to_hex(text: str) -> str:
    return key_from_base64(text).hex()


def hex_to_b64(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) != KEY_LEN:
        raise ValueError(f"a WireGuard key is {KEY_LEN} bytes, got {len(raw)}")
    return base64.b64encode(raw).decode()


@dataclass(frozen=True)
class PrivateKey:
    """A node's X25519 private key. ``public`` is derived once, with ``cryptography``."""

    raw: bytes = field(repr=False)
    public: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise ValueError(f"a WireGuard private key is {KEY_LEN} bytes")
        if not self.public:
            object.__setattr__(self, "public", _public_of(self.raw))

    @classmethod
    def generate(cls) -> PrivateKey:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        return cls(_raw_private(X25519PrivateKey.generate()))

    @classmethod
    def from_base64(cls, text: str) -> PrivateKey:
        return cls(key_from_base64(text, field_name="wireguard-key"))

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode()

    def hex(self) -> str:
        return self.raw.hex()

    def __str__(self) -> str:
        return f"PrivateKey(public={self.public})"


def _raw_private(key: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _public_of(raw: bytes) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    pub = X25519PrivateKey.from_private_bytes(raw).public_key()
    return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


# --- what the WireGuard port speaks ----------------------------------------------------


@dataclass(frozen=True)
class WireGuardSpec:
    """The node's WireGuard device: name, UDP port, private key, MTU."""

    name: str
    listen_port: int
    key: PrivateKey = field(repr=False)
    mtu: int


@dataclass(frozen=True)
class WgPeer:
    """One peer of the device: its public key, endpoint and allowed IPs."""

    public_key: str
    endpoint: tuple[IPv4Address, int] | None
    allowed_ips: tuple[IPNetwork, ...]  # the peer's blocks, IPv4 first (IPv6 too in a dual-stack cluster)

    def __str__(self) -> str:
        where = f"{self.endpoint[0]}:{self.endpoint[1]}" if self.endpoint else "(no endpoint)"
        return f"{self.public_key} endpoint {where} allowed-ips {','.join(map(str, self.allowed_ips)) or '(none)'}"


@dataclass(frozen=True)
class WgPeerStatus:
    """A peer as the device reports it (``get=1``)."""

    peer: WgPeer
    last_handshake: float | None = None  # seconds since the epoch; None: never
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True)
class WgDevice:
    """A device as it reports itself. ``public_key`` is derived from its private key."""

    name: str
    public_key: str | None
    listen_port: int | None
    peers: tuple[WgPeerStatus, ...] = ()
    implementation: str = ""  # "kernel" or "wireguard-go"
    pid: int | None = None  # wireguard-go's pid

    def peer(self, public_key: str) -> WgPeerStatus | None:
        return next((p for p in self.peers if p.peer.public_key == public_key), None)
