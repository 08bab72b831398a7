"""The Confluent wire format, read without a registry (no network)."""

from __future__ import annotations

import uuid

import pytest

from sluice.formats.confluent import BadFrame, Frame, frame


def zigzag(*values: int) -> bytes:
    out = bytearray()
    for v in values:
        n = (v << 1) ^ (v >> 63)
        while n & ~0x7F:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
    return bytes(out)


def test_avro_prefix() -> None:
    assert frame(b"\x00\x00\x00\x01\x02body", None, protobuf=False) == Frame(258, 5, (0,))


def test_protobuf_first_message_is_a_single_zero() -> None:
    assert frame(b"\x00\x00\x00\x00\x07\x00body", None, protobuf=True) == Frame(7, 6, (0,))


def test_protobuf_nested_message_index() -> None:
    payload = b"\x00\x00\x00\x00\x07" + zigzag(2, 1, 0) + b"body"
    assert frame(payload, None, protobuf=True) == Frame(7, 8, (1, 0))
    payload = b"\x00\x00\x00\x00\x07" + zigzag(3, 0, 200, 1) + b"x"
    assert frame(payload, None, protobuf=True).indexes == (0, 200, 1)


def test_schema_in_a_header() -> None:
    guid = uuid.uuid4()
    header = b"\x01" + guid.bytes + zigzag(2, 1, 0)
    assert frame(b"body", header, protobuf=True) == Frame(str(guid), 0, (1, 0))
    assert frame(b"body", b"\x00\x00\x00\x00\x09", protobuf=False) == Frame(9, 0, (0,))


@pytest.mark.parametrize(
    ("payload", "protobuf", "why"),
    [
        (b"\x00\x00\x01", False, "shorter than the 5-byte schema header"),
        (b"\x05\x00\x00\x00\x01body", False, "wrong magic byte 5"),
        (b"\x00\x00\x00\x00\x01", True, "ends inside the message-index array"),
        (b"\x00\x00\x00\x00\x01\x04\x02", True, "ends inside the message-index array"),
        (b"\x00\x00\x00\x00\x01" + zigzag(1, -3), True, "negative message index"),
    ],
)
def test_bad_frames(payload: bytes, protobuf: bool, why: str) -> None:
    with pytest.raises(BadFrame, match=why):
        frame(payload, None, protobuf)
