"""The source conformance suite: every source connector, against its real system.

Each check takes a :class:`~sluice.testing.harness.SourceHarness`, works on a
fresh stream and fresh consumer groups, and raises ``AssertionError`` naming
what the connector got wrong. Input rows are ``{"id": i, "name": "n<i>"}``;
checks compare the ids read with the ids expected (an independent record of
what was produced), never with what the connector happened to return before.

Positions are committed the engine's way (:func:`~sluice.testing.checks.commit`,
once per batch, in read order).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

import pyarrow as pa

from sluice.connectors.api import EVENT_TS, EVENT_TS_TYPE, Batch, Position, Seekable, Source
from sluice.testing.checks import Check, bounded, commit
from sluice.testing.harness import Row, SourceHarness, unique

#: Timeout handed to ``read`` when the stream is empty, seconds.
READ_TIMEOUT_S = 0.5
#: What ``read`` may take beyond its timeout: one network round trip, seconds.
READ_MARGIN_S = 0.5
#: Longest wait for produced rows to be read, seconds (a consumer group join
#: on a real broker takes ~1 s).
RECEIVE_TIMEOUT_S = 30.0
#: After the expected rows arrived, how long more reads must bring nothing
#: unexpected, seconds.
QUIET_S = 1.0


def rows(start: int, count: int) -> list[Row]:
    """Input rows with ids ``start .. start + count - 1``."""
    return [{"id": i, "name": f"n{i}"} for i in range(start, start + count)]


def ids_of(batches: Sequence[Batch]) -> list[int]:
    """The ``id`` of every decoded row, in read order."""
    out: list[int] = []
    for b in batches:
        if b.num_rows:
            out.extend(int(v) for v in b.data["id"].to_pylist())
    return out


def read_until(source: Source, want: set[int], timeout_s: float = RECEIVE_TIMEOUT_S) -> list[Batch]:
    """Read until every id in ``want`` arrived, then for :data:`QUIET_S` more.

    Returns every batch read. Fails when ``want`` is not complete in time.
    """
    batches: list[Batch] = []
    deadline = time.monotonic() + timeout_s
    while not want <= set(ids_of(batches)):
        if time.monotonic() > deadline:
            missing = sorted(want - set(ids_of(batches)))
            raise AssertionError(f"ids {missing} not read within {timeout_s} s")
        batch = source.read(READ_TIMEOUT_S)
        if batch is not None:
            batches.append(batch)
    quiet = time.monotonic() + QUIET_S
    while time.monotonic() < quiet:
        batch = source.read(READ_TIMEOUT_S)
        if batch is not None:
            batches.append(batch)
    return batches


def close(source: Source) -> None:
    """``close()``, which must return promptly."""
    bounded(f"close() of source {source.id}", source.close)


def consume(
    source: Source, want: set[int], resume: Position | None = None, *, keep_open: bool = False
) -> list[Batch]:
    """Open ``source`` (at ``resume``), read until every id of ``want`` came,
    commit each batch, and close it (unless ``keep_open``)."""
    source.open(resume)
    try:
        batches = read_until(source, want)
        for batch in batches:
            commit(source, batch)
    finally:
        if not keep_open:
            close(source)
    return batches


def _exactly(got: list[int], want: range, what: str) -> None:
    dupes = sorted(i for i, n in Counter(got).items() if n > 1)
    assert not dupes, f"{what}: ids read twice: {dupes}"
    assert sorted(got) == list(want), f"{what}: read ids {sorted(got)}, expected {list(want)}"


def open_close_twice(h: SourceHarness) -> None:
    """A source opens, closes (twice: close is idempotent), and opens again."""
    stream = h.new_stream()
    source = h.build(stream, unique("g"))
    for _ in range(2):
        source.open(None)
        close(source)
        close(source)


def read_honours_timeout(h: SourceHarness) -> None:
    """On an empty stream ``read`` returns ``None`` within its timeout."""
    stream = h.new_stream()
    source = h.build(stream, unique("g"))
    source.open(None)
    try:
        for _ in range(3):
            started = time.monotonic()
            batch = source.read(READ_TIMEOUT_S)
            took = time.monotonic() - started
            assert batch is None or batch.num_rows == 0, f"read {batch} from an empty stream"
            assert took <= READ_TIMEOUT_S + READ_MARGIN_S, (
                f"read({READ_TIMEOUT_S}) took {took:.2f} s on an empty stream"
            )
    finally:
        close(source)


def resumes_after_commit(h: SourceHarness) -> None:
    """After a commit, a new source of the same group reads strictly after it."""
    stream, group = h.new_stream(), unique("g")
    h.produce(stream, rows(0, 5))
    first = consume(h.build(stream, group), set(range(5)))
    _exactly(ids_of(first), range(5), "first read")

    h.produce(stream, rows(5, 3))
    # A restarted process: a new connector object of the same group.
    later = consume(h.build(stream, group), set(range(5, 8)))
    _exactly(ids_of(later), range(5, 8), "after commit + reopen")


def redelivers_uncommitted(h: SourceHarness) -> None:
    """A batch read and not committed is read again after ``close`` + ``open``."""
    stream = h.new_stream()
    h.produce(stream, rows(0, 4))
    source = h.build(stream, unique("g"))
    consume(source, set(range(4)), keep_open=True)
    h.produce(stream, rows(4, 3))
    pending = read_until(source, set(range(4, 7)))
    _exactly(ids_of(pending), range(4, 7), "second read")
    close(source)  # no commit: as if the write of these rows had failed

    again = consume(source, set(range(4, 7)))
    _exactly(ids_of(again), range(4, 7), "after close + open without a commit")


def resume_honoured(h: SourceHarness) -> None:
    """``open(resume)`` starts at the given positions, not at the group's own."""
    stream = h.new_stream()
    h.produce(stream, rows(0, 5))
    source = h.build(stream, unique("g"))
    position = consume(source, set(range(5)))[-1].position
    assert position, f"the batches of {source.id} carry no position"

    h.produce(stream, rows(5, 3))
    # A new group: its own start is the beginning.
    later = consume(h.build(stream, unique("g")), set(range(5, 8)), position)
    _exactly(ids_of(later), range(5, 8), f"open(resume={position})")


def bad_payload_reported(h: SourceHarness) -> None:
    """An undecodable record is reported, with its raw bytes and where it sits.

    ``Batch.bad`` names it by index into ``Batch.raw``, whose record carries
    the raw payload and an offset inside the batch's position keys (an
    ack-only source: its message id and queue / subscription), so the
    engine's ``on_error`` can fail naming it, drop it, or dead-letter it.
    The good records around it still decode.
    """
    stream = h.new_stream()
    h.produce(stream, rows(0, 2))
    raw = h.produce_bad(stream)
    h.produce(stream, rows(2, 2))
    source = h.build(stream, unique("g"))
    batches = consume(source, set(range(4)))
    _exactly(ids_of(batches), range(4), "good records around a bad one")
    reported = [(b, index, why) for b in batches for index, why in b.bad]
    assert len(reported) == 1, f"expected one bad record reported, got {len(reported)}"
    batch, index, why = reported[0]
    assert why, "a bad record must come with a reason"
    assert batch.raw is not None, "a batch with bad records must keep them raw (Batch.raw)"
    record = batch.raw.record(index)
    assert record.payload == raw, f"raw bytes {record.payload!r}, produced {raw!r}"
    assert record.offset is not None, "a bad record must say where it sits (its offset)"
    if isinstance(source, Seekable):
        assert batch.position is not None, "the batches of a seekable source carry a position"
        assert record.partition in batch.position, (
            f"bad record's partition {record.partition!r} is not a key of {batch.position}"
        )
    else:  # ack-only: the record names its queue / subscription instead
        assert record.partition, "a bad record of an ack-only source must name where it sits"
    assert batch.raw.where(index), "a bad record must be locatable for the error message"


def event_ts_typed_and_right(h: SourceHarness) -> None:
    """``_event_ts`` is timestamp[us, UTC] and follows the system's rule."""
    stream = h.new_stream()
    expected = dict(zip(range(6), h.produce(stream, rows(0, 6)), strict=True))
    batches = consume(h.build(stream, unique("g")), set(range(6)))
    got: dict[int, int] = {}
    for batch in batches:
        field = batch.data.schema.field(EVENT_TS)
        assert field.type == EVENT_TS_TYPE, f"{EVENT_TS} is {field.type}, not {EVENT_TS_TYPE}"
        micros = batch.data[EVENT_TS].cast(pa.int64()).to_pylist()
        got.update(zip(ids_of([batch]), micros, strict=True))
    assert got == expected, f"{EVENT_TS} (µs) by id: {got}, expected {expected}"


SOURCE_CHECKS: tuple[Check[SourceHarness], ...] = (
    Check("open_close_twice", open_close_twice),
    Check("read_honours_timeout", read_honours_timeout),
    Check("resumes_after_commit", resumes_after_commit),
    Check("redelivers_uncommitted", redelivers_uncommitted),
    Check("resume_honoured", resume_honoured),
    Check("bad_payload_reported", bad_payload_reported),
    Check("event_ts_typed_and_right", event_ts_typed_and_right),
)
"""Every source check, in the order a failure is easiest to read."""

ACK_ONLY_SOURCE_CHECKS: tuple[Check[SourceHarness], ...] = tuple(
    c for c in SOURCE_CHECKS if c.name != "resume_honoured"
)
"""The checks of a source that is not :class:`~sluice.connectors.api.Seekable`
(a queue, a subscription): it acknowledges, it cannot be opened at a position."""
