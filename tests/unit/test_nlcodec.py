"""The one netlink attribute codec (``dataplane.nlcodec``) that the raw
rtnetlink, nfnetlink and monitor paths share."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from overlaycni.dataplane.nlcodec import HDR, NLA_F_NESTED, attr, attributes, error_code, iter_messages, nested

attrs_st = st.dictionaries(st.integers(1, 0x3FFF), st.binary(max_size=40), max_size=8)


@given(attrs_st)
def test_attributes_round_trip_padded_to_four_bytes(want):
    buf = b"".join(attr(k, v) for k, v in want.items())
    assert len(buf) % 4 == 0 and attributes(buf, 0) == want


def test_an_end_offset_bounds_one_message_and_flags_are_masked():
    one, two = attr(1, b"abc"), attr(2 | NLA_F_NESTED, attr(3, b"x"))
    buf = one + two + attr(9, b"next message")
    assert attributes(buf, 0, len(one) + len(two)) == {1: b"abc", 2: attr(3, b"x")}
    assert attributes(nested(2, attr(3, b"x")), 0) == {2: attr(3, b"x")}


def test_a_truncated_attribute_ends_the_walk():
    buf = attr(1, b"ok") + attr(2, b"cut short")[:-6]
    assert attributes(buf, 0) == {1: b"ok"}
    assert attributes(b"\x02\x00\x01\x00", 0) == {}  # a length below the head itself


def test_messages_of_one_datagram_and_an_error_code():
    ack = HDR.pack(HDR.size + 4, 2, 0, 7, 0) + (-17).to_bytes(4, "little", signed=True)
    other = HDR.pack(HDR.size, 3, 0, 8, 0)
    assert [(k, s) for k, s, _ in iter_messages(ack + other)] == [(2, 7), (3, 8)]
    assert error_code(ack) == 17
    assert list(iter_messages(ack[:-2])) == []  # truncated
