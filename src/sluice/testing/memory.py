"""In-memory connectors for engine unit tests and for testing pipelines.

* :class:`MemorySource` reads what a test pushed into a :class:`MemoryStream`
  (Arrow tables or raw JSON payloads), with real positions: ``open(resume)``
  starts at ``resume``, else at the last committed position, so a batch read
  and not committed is read again after ``close`` + ``open``.
* :class:`MemoryTarget` keeps rows staged until :meth:`MemoryTarget.flush`,
  optionally upserting on a key (``merge``).
* :class:`FlakyTarget` wraps any target and raises
  :class:`~sluice.errors.TransientError` on chosen calls.

They follow the :mod:`sluice.connectors.api` protocols exactly, and the
conformance suites run over them too (``tests/conformance/test_memory.py``),
so a test written against them holds for the real connectors. They are test
tools: payload decoding is per message, not the sources' bulk path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluice.connectors.api import EVENT_TS, EVENT_TS_TYPE, Ack, Batch, Position, RawRecord, Target
from sluice.errors import ConnectorError, TransientError

_SEQ = "__sluice_memory_seq"


@dataclass(frozen=True, slots=True)
class _Segment:
    """The records of one push: offsets ``start .. start + len(ts_ms) - 1``."""

    start: int
    data: pa.Table  # decoded rows, with _event_ts
    rows: np.ndarray  # record index (within the segment) of each decoded row
    ts_ms: np.ndarray  # timestamp of each record, ms since the epoch
    payloads: tuple[bytes | None, ...] | None  # raw payloads (push_payloads only)
    bad: tuple[tuple[int, str], ...]  # (record index within the segment, reason)

    @property
    def end(self) -> int:
        return self.start + len(self.ts_ms)


class MemoryStream:
    """An append-only log of records in one partition, shared by its readers.

    Offsets count records from 0. Each push is read as one batch (from the
    reader's position to the end of that push). Thread-safe: a test may push
    while a source waits in :meth:`MemorySource.read`.
    """

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.partition = f"{name}:0"
        self._segments: list[_Segment] = []
        self._changed = threading.Condition()

    @property
    def end(self) -> int:
        """The offset the next pushed record gets."""
        with self._changed:
            return self._segments[-1].end if self._segments else 0

    def push(self, data: pa.Table, event_ts_ms: int | Sequence[int] | None = None) -> int:
        """Append the rows of ``data``, one record each; returns the first offset.

        ``_event_ts`` is kept when ``data`` has it (cast to timestamp[us, UTC]),
        else taken from ``event_ts_ms`` (one value, or one per row; default:
        now), as a broker stamps its messages.
        """
        ts = self._stamps(data.num_rows, event_ts_ms)
        table = _with_event_ts(data, ts)
        return self._append(table, np.arange(data.num_rows, dtype=np.int64), ts, None, ())

    def push_payloads(
        self, payloads: Sequence[bytes | None], event_ts_ms: int | Sequence[int] | None = None
    ) -> int:
        """Append raw payloads (a JSON object each); returns the first offset.

        A payload that is not a JSON object is kept as a bad record: the batch
        reading it lists it in :attr:`Batch.bad` with its raw bytes in
        :attr:`Batch.raw`, as a broker source reports an undecodable message.
        """
        ts = self._stamps(len(payloads), event_ts_ms)
        objects: list[dict[str, object]] = []
        rows: list[int] = []
        bad: list[tuple[int, str]] = []
        for i, payload in enumerate(payloads):  # test tool: per message is fine
            try:
                value = msgspec.json.decode(payload or b"")
            except msgspec.DecodeError as exc:
                bad.append((i, f"invalid JSON: {exc}"))
                continue
            if not isinstance(value, dict):
                bad.append((i, f"expected a JSON object, got {type(value).__name__}"))
                continue
            objects.append(value)
            rows.append(i)
        index = np.array(rows, dtype=np.int64)
        table = _with_event_ts(pa.Table.from_pylist(objects), ts[index])
        return self._append(table, index, ts, tuple(payloads), tuple(bad))

    @staticmethod
    def _stamps(n: int, event_ts_ms: int | Sequence[int] | None) -> np.ndarray:
        if event_ts_ms is None:
            event_ts_ms = int(time.time() * 1000)
        if isinstance(event_ts_ms, int):
            return np.full(n, event_ts_ms, dtype=np.int64)
        if len(event_ts_ms) != n:
            raise ValueError(f"{len(event_ts_ms)} timestamps for {n} records")
        return np.asarray(event_ts_ms, dtype=np.int64)

    def _append(
        self,
        data: pa.Table,
        rows: np.ndarray,
        ts_ms: np.ndarray,
        payloads: tuple[bytes | None, ...] | None,
        bad: tuple[tuple[int, str], ...],
    ) -> int:
        with self._changed:
            start = self._segments[-1].end if self._segments else 0
            if len(ts_ms):
                self._segments.append(_Segment(start, data, rows, ts_ms, payloads, bad))
            self._changed.notify_all()
            return start

    def segment_at(self, offset: int, timeout_s: float) -> _Segment | None:
        """The records from ``offset`` to the end of its push, waiting up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for seg in self._segments:
                    if seg.start <= offset < seg.end:
                        return _tail(seg, offset)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)


def _tail(seg: _Segment, offset: int) -> _Segment:
    """``seg`` without its records before ``offset``."""
    skip = offset - seg.start
    if skip == 0:
        return seg
    keep = seg.rows >= skip
    return _Segment(
        offset,
        seg.data.filter(pa.array(keep)),
        seg.rows[keep] - skip,
        seg.ts_ms[skip:],
        None if seg.payloads is None else seg.payloads[skip:],
        tuple((i - skip, why) for i, why in seg.bad if i >= skip),
    )


def _with_event_ts(data: pa.Table, ts_ms: np.ndarray) -> pa.Table:
    if EVENT_TS in data.column_names:
        i = data.column_names.index(EVENT_TS)
        return data.set_column(i, EVENT_TS, pc.cast(data[EVENT_TS], EVENT_TS_TYPE))
    micros = pa.array(ts_ms * 1000, pa.int64()).cast(EVENT_TS_TYPE)
    return data.append_column(pa.field(EVENT_TS, EVENT_TS_TYPE), micros)


class _Records:
    """The raw records of one batch (for dead letters and error messages)."""

    def __init__(self, stream: MemoryStream, seg: _Segment) -> None:
        self._stream = stream
        self._seg = seg

    def __len__(self) -> int:
        return len(self._seg.ts_ms)

    def record(self, index: int) -> RawRecord:
        payload = None if self._seg.payloads is None else self._seg.payloads[index]
        return RawRecord(
            self._stream.partition,
            self._seg.start + index,
            int(self._seg.ts_ms[index]),
            None,
            payload,
        )

    def where(self, index: int) -> str:
        return f"memory stream {self._stream.name} offset {self._seg.start + index}"

    def span(self) -> str:
        return f"memory stream {self._stream.name} offsets {self._seg.start}-{self._seg.end - 1}"


class MemorySource:
    """A :class:`~sluice.connectors.api.Source` over a :class:`MemoryStream`.

    Its position is ``{"<stream>:0": next offset}``. Committed positions
    live in this object (one object = one consumer group): they survive
    ``close`` + ``open``, and every commit is kept in :attr:`commits`.
    Several sources may read one stream, each with its own positions.
    """

    def __init__(self, stream: MemoryStream | None = None, source_id: str | None = None) -> None:
        self.stream = stream if stream is not None else MemoryStream()
        self.id = source_id or self.stream.name
        self.commits: list[Position] = []
        self.opens = 0
        self._committed = 0
        self._cursor: int | None = None  # None: closed

    def push(self, data: pa.Table, event_ts_ms: int | Sequence[int] | None = None) -> int:
        """Shortcut for :meth:`MemoryStream.push` on this source's stream."""
        return self.stream.push(data, event_ts_ms)

    def push_payloads(
        self, payloads: Sequence[bytes | None], event_ts_ms: int | Sequence[int] | None = None
    ) -> int:
        """Shortcut for :meth:`MemoryStream.push_payloads` on this source's stream."""
        return self.stream.push_payloads(payloads, event_ts_ms)

    @property
    def committed(self) -> int:
        """The committed offset: the next record a fresh ``open(None)`` reads."""
        return self._committed

    def open(self, resume: Position | None) -> None:
        """Start at ``resume`` when it names this stream, else at the committed offset."""
        at = (resume or {}).get(self.stream.partition)
        self._cursor = int(at) if at is not None else self._committed
        self.opens += 1

    def read(self, timeout_s: float) -> Batch | None:
        """The rest of the push holding the next record, waiting up to ``timeout_s``."""
        if self._cursor is None:
            raise ConnectorError(f"memory source {self.id} is not open")
        seg = self.stream.segment_at(self._cursor, timeout_s)
        if seg is None:
            return None
        self._cursor = seg.end
        position: Position = {self.stream.partition: seg.end}
        return Batch(
            self.id,
            seg.data,
            position,
            position=position,
            raw_count=len(seg.ts_ms),
            partitions=(self.stream.partition,),
            raw=_Records(self.stream, seg),
            bad=seg.bad,
            rows=None if seg.payloads is None else tuple(int(r) for r in seg.rows),
        )

    def commit(self, ack: Ack) -> None:
        """Record the position ``ack`` (this source's ack token) as committed
        (it never moves back)."""
        position: Position = ack  # our batches' ack is their position
        at = position.get(self.stream.partition)
        if at is None:
            return
        self._committed = max(self._committed, int(at))
        self.commits.append(dict(position))

    def rewind(self, position: Position | None) -> None:
        """Read again from ``position`` (``None``: the committed offset)."""
        self.open(position)
        self.opens -= 1  # a rewind is not a reconnect

    def close(self) -> None:
        """Forget the read cursor; idempotent."""
        self._cursor = None


class MemoryTarget:
    """A :class:`~sluice.connectors.api.Target` keeping its rows in memory.

    Rows written are staged; :meth:`flush` makes them visible in
    :meth:`table`; :meth:`close` discards what was not flushed (as a database
    rolls back). With ``key``, flush upserts: the last row of a key wins. A
    batch with a new column adds it (older rows get nulls).
    """

    def __init__(self, target_id: str = "memory", key: Sequence[str] = ()) -> None:
        self.id = target_id
        self.key = list(key)
        self.flushes = 0
        self._open = False
        self._staged: list[pa.Table] = []
        self._visible: pa.Table | None = None
        self._seq = 0

    def open(self) -> None:
        """Start accepting writes."""
        self._open = True

    def write(self, data: pa.Table) -> None:
        """Stage ``data`` for the next flush."""
        if not self._open:
            raise ConnectorError(f"memory target {self.id} is not open")
        if data.num_rows:
            seq = pa.array(np.arange(self._seq, self._seq + data.num_rows, dtype=np.int64))
            self._seq += data.num_rows
            self._staged.append(data.append_column(_SEQ, seq))

    def flush(self) -> None:
        """Make every staged row visible."""
        if not self._open:
            raise ConnectorError(f"memory target {self.id} is not open")
        parts = ([self._visible] if self._visible is not None else []) + self._staged
        self._staged = []
        self.flushes += 1
        if not parts:
            return
        table = pa.concat_tables(parts, promote_options="permissive")
        if self.key:
            newest = table.group_by(self.key).aggregate([(_SEQ, "max")])
            table = table.filter(pc.is_in(table[_SEQ], value_set=newest[f"{_SEQ}_max"]))
        self._visible = table.sort_by(_SEQ)

    def close(self) -> None:
        """Discard what was not flushed; idempotent."""
        self._staged = []
        self._open = False

    def table(self) -> pa.Table:
        """The flushed rows, in write order (an empty table before any)."""
        if self._visible is None:
            return pa.table({})
        return self._visible.drop_columns([_SEQ])


class FlakyTarget:
    """Wraps a target; the chosen calls raise :class:`TransientError` first.

    ``open``, ``write`` and ``flush`` name the 1-based calls of that method
    that fail, e.g. ``FlakyTarget(t, flush={1})``: the first flush fails, the
    second goes through. A failing call does not reach the wrapped target, so
    what it staged stays staged until the engine closes (rolls back) and
    retries, as after a dropped connection. :attr:`calls` counts every call.
    """

    def __init__(
        self,
        inner: Target,
        *,
        open: Iterable[int] = (),
        write: Iterable[int] = (),
        flush: Iterable[int] = (),
    ) -> None:
        self.inner = inner
        self.id = inner.id
        self.calls = {"open": 0, "write": 0, "flush": 0, "close": 0}
        self.failures = 0
        self._fail = {"open": set(open), "write": set(write), "flush": set(flush)}

    def _call(self, method: str) -> None:
        self.calls[method] += 1
        if self.calls[method] in self._fail[method]:
            self.failures += 1
            raise TransientError(f"{self.id}: injected failure of {method} #{self.calls[method]}")

    def open(self) -> None:
        """Open the wrapped target unless this call is chosen to fail."""
        self._call("open")
        self.inner.open()

    def write(self, data: pa.Table) -> None:
        """Write to the wrapped target unless this call is chosen to fail."""
        self._call("write")
        self.inner.write(data)

    def flush(self) -> None:
        """Flush the wrapped target unless this call is chosen to fail."""
        self._call("flush")
        self.inner.flush()

    def close(self) -> None:
        """Close the wrapped target (never fails)."""
        self.calls["close"] += 1
        self.inner.close()
