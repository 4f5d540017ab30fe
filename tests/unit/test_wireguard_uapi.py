"""WireGuard keys and the UAPI text protocol (pure): encoder, decoder, errors."""

from __future__ import annotations

import base64
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlaycni.dataplane.uapi import UapiError, check_errno, decode_get, encode_set
from overlaycni.dataplane.wgmodel import (
    PrivateKey,
    WgPeer,
    WireGuardSpec,
    b64_to_hex,
    check_public_key,
    hex_to_b64,
)
from overlaycni.errors import ConfigError

# RFC 7748 section 6.1: Alice's X25519 private key and the public key it yields.
RFC7748_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC7748_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def test_public_key_is_x25519_of_the_private_key():
    key = PrivateKey(RFC7748_PRIVATE)
    assert base64.b64decode(key.public) == RFC7748_PUBLIC
    assert PrivateKey.from_base64(key.to_base64()) == key


def test_generated_keys_differ_and_never_print_the_secret():
    a, b = PrivateKey.generate(), PrivateKey.generate()
    assert a != b and len(base64.b64decode(a.public)) == 32
    for text in (repr(a), str(a), repr(WireGuardSpec("ocni.wg", 51820, a, 1440))):
        assert a.to_base64() not in text and a.hex() not in text
    assert a.public in str(a)


@pytest.mark.parametrize("bad", ["", "abc", "A" * 43, base64.b64encode(b"x" * 31).decode(), "not base64 at all!!"])
def test_bad_public_keys_name_the_field(bad):
    with pytest.raises(ConfigError) as exc:
        check_public_key(bad, field_name="wireguard-public-key")
    assert "wireguard-public-key" in str(exc.value.errors[0]) and "32 bytes" in str(exc.value.errors[0])


@given(st.binary(min_size=32, max_size=32))
@settings(max_examples=50)
def test_base64_hex_round_trip(raw):
    b64 = base64.b64encode(raw).decode()
    assert hex_to_b64(b64_to_hex(b64)) == b64 and b64_to_hex(b64) == raw.hex()


def _peer(i: int) -> WgPeer:
    key = base64.b64encode(bytes([i]) * 32).decode()
    return WgPeer(key, (IPv4Address(f"10.224.0.{i}"), 51820), (IPv4Network(f"10.244.{i}.0/24"),))


def test_encode_set_device_then_removals_then_peers():
    key = PrivateKey(RFC7748_PRIVATE)
    gone = base64.b64encode(b"\x09" * 32).decode()
    text = encode_set(private_key=key, listen_port=51820, peers=[_peer(2)], remove=[gone])
    assert text == (
        "set=1\n"
        f"private_key={RFC7748_PRIVATE.hex()}\n"
        "listen_port=51820\n"
        f"public_key={'09' * 32}\n"
        "remove=true\n"
        f"public_key={'02' * 32}\n"
        "endpoint=10.224.0.2:51820\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=10.244.2.0/24\n"
        "\n"
    )
    assert encode_set() == "set=1\n\n"
    with pytest.raises(ValueError):
        encode_set(listen_port=70000)


def test_decode_get_answer_of_wireguard_go():
    key = PrivateKey(RFC7748_PRIVATE)
    answer = (
        f"private_key={RFC7748_PRIVATE.hex()}\nlisten_port=51820\n"
        f"public_key={'02' * 32}\npreshared_key={'00' * 32}\nprotocol_version=1\nendpoint=10.224.0.2:51820\n"
        "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500000000\ntx_bytes=532\nrx_bytes=476\n"
        "persistent_keepalive_interval=0\nallowed_ip=10.244.2.0/24\n"
        f"public_key={'03' * 32}\nendpoint=[fd00::3]:51820\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"
        "allowed_ip=10.244.3.0/24\nallowed_ip=fd00:3::/64\n"
        "errno=0\n\n"
    )
    dev = decode_get(answer, name="ocni.wg")
    assert dev.public_key == key.public and dev.listen_port == 51820
    p2, p3 = dev.peers
    assert p2.peer == _peer(2) and p2.last_handshake == 1700000000.5 and (p2.rx_bytes, p2.tx_bytes) == (476, 532)
    # an IPv6 endpoint is not ours (the tunnel runs over IPv4); IPv6 allowed IPs are (dual-stack blocks)
    assert p3.peer.endpoint is None and p3.last_handshake is None
    assert p3.peer.allowed_ips == (IPv4Network("10.244.3.0/24"), IPv6Network("fd00:3::/64"))
    assert dev.peer(_peer(2).public_key) == p2 and dev.peer("nope") is None


def test_decode_a_fresh_device_without_key():
    dev = decode_get("listen_port=34658\nerrno=0\n\n", name="ocni.wg")
    assert dev.public_key is None and dev.listen_port == 34658 and dev.peers == ()


@pytest.mark.parametrize("answer, code", [("errno=-98\n\n", 98), ("errno=22\n\n", 22)])
def test_errno_answers_raise_with_the_code(answer, code):
    with pytest.raises(UapiError) as exc:
        check_errno(answer)
    assert exc.value.code == code and "refused" in exc.value.message


@pytest.mark.parametrize("answer", ["", "\n\n", "listen_port=1\n\n", "garbage\n\n", "errno=x\n\n"])
def test_malformed_answers_are_errors_not_tracebacks(answer):
    with pytest.raises(UapiError):
        decode_get(answer, name="ocni.wg")


def test_encode_keepalive_never_creates_a_peer():
    from overlaycni.dataplane.uapi import encode_keepalive

    key = _peer(2).public_key
    assert encode_keepalive([key], 25) == (
        f"set=1\npublic_key={'02' * 32}\nupdate_only=true\npersistent_keepalive_interval=25\n\n"
    )
    assert encode_keepalive([], 0) == "set=1\n\n"
