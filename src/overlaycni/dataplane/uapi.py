"""The WireGuard cross-platform userspace API (UAPI): encoder and decoder (pure).

The protocol (https://www.wireguard.com/xplatform/) is line-based text over
a unix socket: a request is ``get=1`` or ``set=1`` followed by ``key=value``
lines and ends with an empty line; the answer to ``set`` is ``errno=N`` and
an empty line, the answer to ``get`` the device's ``key=value`` lines, then
``errno=N``. Keys are 64 hex digits. In a ``set``, device keys come first
(``private_key``, ``listen_port``, ``replace_peers``); each ``public_key``
starts a peer section, followed by that peer's ``remove``,
``update_only``, ``endpoint``, ``replace_allowed_ips`` and ``allowed_ip``
lines. A ``get`` answer carries ``private_key`` (never the public key: it is
derived) and per peer ``endpoint``, ``last_handshake_time_sec/_nsec``,
``rx_bytes``, ``tx_bytes`` and the ``allowed_ip`` lines.

Only the socket I/O lives in ``linux/wireguard.py``; this module turns
value objects into request text and answer text into value objects, so
both directions are unit-tested without a device.
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address, ip_network

from ..cidr import IPNetwork
from ..errors import DataplaneError
from .wgmodel import PrivateKey, WgDevice, WgPeer, WgPeerStatus, b64_to_hex, hex_to_b64

GET = "get=1\n\n"


class UapiError(DataplaneError):
    """The device refused a request (``errno`` != 0) or answered nonsense."""

    def __init__(self, message: str, *, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


def encode_set(
    *,
    private_key: PrivateKey | None = None,
    listen_port: int | None = None,
    replace_peers: bool = False,
    peers: Sequence[WgPeer] = (),
    remove: Sequence[str] = (),
) -> str:
    """One ``set=1`` request. Removals come before the peers that are (re)configured."""
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={private_key.hex()}")
    if listen_port is not None:
        if not 0 <= listen_port <= 65535:
            raise ValueError(f"listen_port {listen_port} is outside 0..65535")
        lines.append(f"listen_port={listen_port}")
    if replace_peers:
        lines.append("replace_peers=true")
    for key in remove:
        lines += [f"public_key={b64_to_hex(key)}", "remove=true"]
    for p in peers:
        lines.append(f"public_key={b64_to_hex(p.public_key)}")
        if p.endpoint is not None:
            lines.append(f"endpoint={p.endpoint[0]}:{p.endpoint[1]}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={net}" for net in p.allowed_ips]
    return "\n".join(lines) + "\n\n"


def encode_keepalive(keys: Sequence[str], seconds: int) -> str:
    """Set the persistent keepalive of existing peers (``update_only``: never
    creates one). Switching it on from 0 makes the device send a keepalive at
    once, which starts a handshake when the peer has no session."""
    lines = ["set=1"]
    for key in keys:
        lines += [f"public_key={b64_to_hex(key)}", "update_only=true", f"persistent_keepalive_interval={seconds}"]
    return "\n".join(lines) + "\n\n"


def _pairs(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(f"wireguard UAPI: malformed line {line[:80]!r} (expected key=value)")
        out.append((key, value))
    return out


def check_errno(text: str) -> None:
    """Raise ``UapiError`` unless the answer ends with ``errno=0``."""
    pairs = _pairs(text)
    if not pairs or pairs[-1][0] != "errno":
        raise UapiError(f"wireguard UAPI: answer without errno ({text[:80]!r})")
    try:
        code = abs(int(pairs[-1][1]))  # wireguard-go writes a negative errno, the protocol text a positive one
    except ValueError:
        raise UapiError(f"wireguard UAPI: errno {pairs[-1][1]!r} is not a number") from None
    if code:
        name = errno_mod.errorcode.get(code, str(code))
        raise UapiError(f"wireguard UAPI: the device refused the request ({name}: {os.strerror(code)})", code=code)


@dataclass
class _PeerBuilder:
    public_key: str
    endpoint: tuple[IPv4Address, int] | None = None
    allowed: tuple[IPNetwork, ...] = ()
    hs_sec: int = 0
    hs_nsec: int = 0
    rx: int = 0
    tx: int = 0

    def build(self) -> WgPeerStatus:
        hs = self.hs_sec + self.hs_nsec / 1e9 if self.hs_sec or self.hs_nsec else None
        return WgPeerStatus(WgPeer(self.public_key, self.endpoint, self.allowed), hs, self.rx, self.tx)


def _endpoint(value: str) -> tuple[IPv4Address, int] | None:
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        addr = ip_address(host)
    except ValueError:
        raise UapiError(f"wireguard UAPI: endpoint {value!r} is not ADDRESS:PORT") from None
    if addr.version != 4:
        return None  # IPv6 underlays are not used by this project yet
    return addr, int(port)


def decode_get(text: str, *, name: str) -> WgDevice:
    """The answer to ``get=1`` as a ``WgDevice`` (raises ``UapiError`` on errno != 0)."""
    check_errno(text)
    private: str | None = None
    port: int | None = None
    peers: list[_PeerBuilder] = []
    try:
        for key, value in _pairs(text)[:-1]:
            if key == "public_key":
                peers.append(_PeerBuilder(hex_to_b64(value)))
            elif not peers:
                if key == "private_key":
                    private = value
                elif key == "listen_port":
                    port = int(value)
            else:
                p = peers[-1]
                if key == "endpoint":
                    p.endpoint = _endpoint(value)
                elif key == "allowed_ip":
                    p.allowed += (ip_network(value, strict=False),)
                elif key == "last_handshake_time_sec":
                    p.hs_sec = int(value)
                elif key == "last_handshake_time_nsec":
                    p.hs_nsec = int(value)
                elif key == "rx_bytes":
                    p.rx = int(value)
                elif key == "tx_bytes":
                    p.tx = int(value)
    except ValueError as exc:
        raise UapiError(f"wireguard UAPI: bad value in the device's answer ({exc})") from None
    public = None
    if private and private.strip("0"):
        public = PrivateKey(bytes.fromhex(private)).public
    return WgDevice(name=name, public_key=public, listen_port=port, peers=tuple(p.build() for p in peers))
