"""The nfnetlink_log codec (``dataplane.nflog``): config requests byte for
byte against the UAPI layout, logged packets decoded, bad input refused,
sequence gaps counted."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlaycni.dataplane import nflog
from overlaycni.dataplane.nflog import LoggedPacket, SeqTracker
from overlaycni.dataplane.nlcodec import attributes, iter_messages


def ipv4(src: str, dst: str, proto: int, *, sport: int = 40000, dport: int = 80, ihl: int = 5, frag: int = 0) -> bytes:
    head = struct.pack(">BBHHHBBH4s4s", 0x40 | ihl, 0, 20, 0, frag, 64, proto, 0,
                       IPv4Address(src).packed, IPv4Address(dst).packed)  # fmt: skip
    head += b"\x01" * (ihl * 4 - 20)  # options (NOPs)
    return head + struct.pack(">HH", sport, dport) + b"\0" * 16


def test_bind_request_matches_the_uapi_layout():
    msg = nflog.config_request(161, seq=7, command=nflog.NFULNL_CFG_CMD_BIND)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq, pid) == (len(msg), (4 << 8) | 1, 0x1 | 0x4, 7, 0)
    family, version, res_id = struct.unpack_from("=BBH", msg, 16)
    assert (family, version, socket.ntohs(res_id)) == (socket.AF_UNSPEC, 0, 161)
    # one attribute: NFULA_CFG_CMD (1), 1 byte, padded to 4
    assert msg[20:] == struct.pack("=HHB", 5, 1, nflog.NFULNL_CFG_CMD_BIND) + b"\0\0\0"


def test_mode_and_batching_attributes_are_big_endian():
    msg = nflog.config_request(5, seq=1, copy_range=128, qthresh=64, timeout_cs=10, nlbufsiz=65536, flags=1)
    attrs = attributes(msg, 20)
    assert attrs[nflog.NFULA_CFG_MODE] == struct.pack(">IBx", 128, nflog.NFULNL_COPY_PACKET)
    assert attrs[nflog.NFULA_CFG_QTHRESH] == struct.pack(">I", 64)
    assert attrs[nflog.NFULA_CFG_TIMEOUT] == struct.pack(">I", 10)
    assert attrs[nflog.NFULA_CFG_NLBUFSIZ] == struct.pack(">I", 65536)
    assert attrs[nflog.NFULA_CFG_FLAGS] == struct.pack(">H", 1)
    with pytest.raises(ValueError, match="65535"):
        nflog.config_request(70000, seq=1)


def test_packet_decodes():
    raw = nflog.packet_message(161, prefix="ocni:deny:in", payload=ipv4("10.244.1.2", "10.244.0.2", 6, dport=8080),
                               seq=41, timestamp=1700000000.25)  # fmt: skip
    ((kind, _, msg),) = list(iter_messages(raw))
    assert kind == nflog.MSG_PACKET
    assert nflog.decode_packet(msg) == LoggedPacket(
        "ocni:deny:in", IPv4Address("10.244.1.2"), IPv4Address("10.244.0.2"), "TCP", 8080, 1700000000.25, 41
    )


def test_protocols_options_fragments_and_ipv6():
    udp_with_options = ipv4("10.0.0.1", "10.0.0.2", 17, dport=53, ihl=7)
    assert nflog.decode_ip(udp_with_options)[2:] == ("UDP", 53)
    assert nflog.decode_ip(ipv4("10.0.0.1", "10.0.0.2", 132, dport=9))[2:] == ("SCTP", 9)
    assert nflog.decode_ip(ipv4("10.0.0.1", "10.0.0.2", 1))[2:] == ("ICMP", None)  # no ports
    assert nflog.decode_ip(ipv4("10.0.0.1", "10.0.0.2", 6, frag=5))[2:] == ("TCP", None)  # a later fragment
    assert nflog.decode_ip(ipv4("10.0.0.1", "10.0.0.2", 47))[2:] == ("47", None)
    assert nflog.decode_ip(ipv4("10.0.0.1", "10.0.0.2", 6)[:22])[2:] == ("TCP", None)  # cut before the ports
    v6 = bytes([0x60, 0, 0, 0, 0, 8, 17, 64]) + IPv6Address("fd00::1").packed + IPv6Address("fd00::2").packed
    v6 += struct.pack(">HHHH", 1, 443, 8, 0)
    assert nflog.decode_ip(v6) == (IPv6Address("fd00::1"), IPv6Address("fd00::2"), "UDP", 443)


@pytest.mark.parametrize("payload", [b"", b"\x45" * 10, b"\x20" + b"\0" * 40, b"\x41" + b"\0" * 30])
def test_bad_payloads_are_refused(payload):
    assert nflog.decode_ip(payload) is None
    raw = nflog.packet_message(1, prefix="x", payload=payload)
    assert nflog.decode_packet(next(iter_messages(raw))[2]) is None


@given(st.binary(max_size=400))
def test_garbage_never_raises(data):
    for _kind, _seq, msg in iter_messages(data):
        nflog.decode_packet(msg)


def test_batches_hold_several_messages():
    a = nflog.packet_message(1, prefix="ocni:deny:in", payload=ipv4("10.0.0.1", "10.0.0.2", 6), seq=1)
    b = nflog.packet_message(1, prefix="ocni:deny:eg", payload=ipv4("10.0.0.3", "10.0.0.4", 17), seq=2)
    got = [nflog.decode_packet(m) for _, _, m in iter_messages(a + b)]
    assert [(p.prefix, p.seq) for p in got if p] == [("ocni:deny:in", 1), ("ocni:deny:eg", 2)]
    assert list(iter_messages((a + b)[: len(a) + 10])) == list(iter_messages(a))  # a cut message is dropped


def test_sequence_gaps_count_lost_messages():
    t = SeqTracker()
    for seq in (0, 1, 2, 5, 6, None, 10):
        t.see(seq)
    assert t.lost == 2 + 3
    t.see(3)  # backwards (a re-bound group starting over): not a loss
    assert t.lost == 5
    t.see(100)
    assert t.lost == 5 + 96
    w = SeqTracker()
    w.see(0xFFFFFFFE)
    w.see(0xFFFFFFFF)
    w.see(0)  # wraps: the next number, no loss
    w.see(2)
    assert w.lost == 1
