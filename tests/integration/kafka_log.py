"""A raw reader of one Kafka partition's log, transaction markers included.

The test broker (tansu 0.6) writes commit and abort markers but does not
filter aborted records out for ``read_committed`` consumers (its fetch
response lists no aborted transactions). The exactly-once test therefore
reads the log itself: a Fetch request (v4) over a plain socket, record
batches (format v2) parsed here, and each transactional data batch resolved
by the marker its producer wrote next. What this yields is what a
``read_committed`` consumer of a conforming broker would see, and the
markers themselves (which transactions committed, which aborted) are the
coordinator's answers the test checks.
"""

from __future__ import annotations

import bisect
import socket
import struct
from dataclasses import dataclass

_FETCH, _FETCH_VERSION = 1, 4
_CONTROL = 0x20
_TRANSACTIONAL = 0x10
ABORT, COMMIT = 0, 1


@dataclass(frozen=True)
class Record:
    """One data record: where it is, who wrote it, and how its transaction ended."""

    offset: int
    producer_id: int
    producer_epoch: int
    transactional: bool
    value: bytes | None
    outcome: int | None = None  # COMMIT / ABORT marker of its transaction; None: still open


@dataclass(frozen=True)
class Marker:
    """A transaction marker (control record)."""

    offset: int
    producer_id: int
    producer_epoch: int
    kind: int  # COMMIT / ABORT


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
    return (value >> 1) ^ -(value & 1), pos  # zigzag


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack(">h", len(raw)) + raw


def _fetch(host: str, port: int, topic: str, partition: int, offset: int) -> bytes:
    body = struct.pack(">iiiib", -1, 100, 1, 50 << 20, 0)  # read_uncommitted: everything
    body += struct.pack(">i", 1) + _string(topic) + struct.pack(">i", 1)
    body += struct.pack(">iqi", partition, offset, 50 << 20)
    header = struct.pack(">hhi", _FETCH, _FETCH_VERSION, 1) + _string("sluice-test")
    request = header + body
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(struct.pack(">i", len(request)) + request)
        size = struct.unpack(">i", _exactly(s, 4))[0]
        response = _exactly(s, size)
    pos = 4 + 4  # correlation id, throttle time
    (topics,) = struct.unpack_from(">i", response, pos)
    pos += 4
    assert topics == 1, topics
    (name_len,) = struct.unpack_from(">h", response, pos)
    pos += 2 + name_len + 4  # name, partition count (1)
    _part, error, _hw, _lso = struct.unpack_from(">ihqq", response, pos)
    pos += 4 + 2 + 8 + 8
    if error:
        raise AssertionError(f"fetch {topic}:{partition} at {offset}: error code {error}")
    (aborted,) = struct.unpack_from(">i", response, pos)
    pos += 4 + max(aborted, 0) * 16
    (size,) = struct.unpack_from(">i", response, pos)
    pos += 4
    return response[pos : pos + max(size, 0)]


def _exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        out += chunk
    return out


def read_log(
    bootstrap: str, topic: str, partition: int = 0, start: int = 0
) -> tuple[list[Record], list[Marker]]:
    """Every data record and marker of ``topic``/``partition`` from offset
    ``start``, in log order, each transactional record with its
    transaction's outcome (``None``: no marker after it yet)."""
    host, _, port = bootstrap.split(",", maxsplit=1)[0].rpartition(":")
    records: list[Record] = []
    markers: list[Marker] = []
    offset = start
    while True:
        data = _fetch(host, int(port), topic, partition, offset)
        if not data:
            break
        pos, advanced = 0, False
        while pos + 61 <= len(data):
            base, length = struct.unpack_from(">qi", data, pos)
            end = pos + 12 + length
            if end > len(data):
                break  # a partial batch at the end of the response
            attrs = struct.unpack_from(">h", data, pos + 21)[0]
            last_delta = struct.unpack_from(">i", data, pos + 23)[0]
            pid, epoch = struct.unpack_from(">qh", data, pos + 43)
            count = struct.unpack_from(">i", data, pos + 57)[0]
            if attrs & 0x07:
                raise AssertionError("compressed batches are not parsed here")
            rpos = pos + 61
            for _ in range(count):
                _len, rpos = _varint(data, rpos)
                rpos += 1  # attributes
                _ts, rpos = _varint(data, rpos)
                delta, rpos = _varint(data, rpos)
                klen, rpos = _varint(data, rpos)
                key = data[rpos : rpos + klen] if klen >= 0 else b""
                rpos += max(klen, 0)
                vlen, rpos = _varint(data, rpos)
                value = data[rpos : rpos + vlen] if vlen >= 0 else None
                rpos += max(vlen, 0)
                headers, rpos = _varint(data, rpos)
                for _h in range(headers):
                    hk, rpos = _varint(data, rpos)
                    rpos += hk
                    hv, rpos = _varint(data, rpos)
                    rpos += max(hv, 0)
                if base + delta < offset:
                    continue
                if attrs & _CONTROL:
                    kind = struct.unpack_from(">hh", key)[1]
                    markers.append(Marker(base + delta, pid, epoch, kind))
                else:
                    records.append(
                        Record(base + delta, pid, epoch, bool(attrs & _TRANSACTIONAL), value)
                    )
            offset = max(offset, base + last_delta + 1)
            advanced = True
            pos = end
        if not advanced:
            break
    return _resolve(records, markers), markers


def _resolve(records: list[Record], markers: list[Marker]) -> list[Record]:
    """Each transactional record with the outcome of the first marker its
    producer (id) wrote after it (a commit of a later epoch, which would
    mean the broker never ended the earlier one, settles nothing)."""
    by_producer: dict[int, list[Marker]] = {}
    for m in sorted(markers, key=lambda m: m.offset):
        by_producer.setdefault(m.producer_id, []).append(m)
    offsets = {pid: [m.offset for m in ms] for pid, ms in by_producer.items()}
    out: list[Record] = []
    for r in records:
        outcome = None
        if r.transactional and r.producer_id in by_producer:
            i = bisect.bisect_right(offsets[r.producer_id], r.offset)
            if i < len(offsets[r.producer_id]):
                marker = by_producer[r.producer_id][i]
                if marker.kind == ABORT or marker.producer_epoch == r.producer_epoch:
                    outcome = marker.kind
        out.append(
            Record(r.offset, r.producer_id, r.producer_epoch, r.transactional, r.value, outcome)
        )
    return out
