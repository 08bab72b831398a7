"""The join stage: a keyed, event-time interval join of two streams.

The stage keeps one buffer per side (an Arrow table of the rows that can still
match, with their event times and a "has matched" flag beside it) and joins
every call's new rows against the opposite buffer and the opposite side's new
rows. Everything is vectorised: the matching is Arrow's hash join
(``pyarrow.Table.join``) on narrow tables of the key columns and a row number
(plus a time bucket when the buffer spans many windows, so that a key with many
buffered rows does not pair every one of them), filtered on the time condition
in numpy, and the output is a ``take`` of the matched row numbers. A call costs
O(new rows + buffers + candidate pairs + output). Python loops run per side,
per key column and per buffer chunk, never per row.

Semantics (``wm`` is the watermark in µs since the epoch; ``l`` / ``r`` a left /
right row's event time in µs):

* **Time.** The event time is ``event_time_column`` (``_event_ts``) on both
  sides: a timestamp of any unit (``ns`` is floored to µs), or an integer of µs
  since the epoch; the two sides may use different types. A null event time
  fails the call.
* **Pairs.** A left and a right row match when ``left_keys[i] = right_keys[i]``
  for every ``i`` (SQL equality: a null key matches nothing; the two columns of
  a pair may have different types when Arrow can promote one to the other,
  int32 / int64 or string / large_string, otherwise the call fails) and
  ``lo <= r - l <= hi``: ``lo = -time_window_ms``, ``hi = time_window_ms``
  (symmetric), or ``lo = min_delta_ms``, ``hi = max_delta_ms`` (asymmetric).
  Both bounds are inclusive.
* **Watermarks.** As in the window stage: :meth:`JoinStage.process` judges
  lateness against the stage's own watermark, the largest one it was given
  before the call (``None``: nothing is late), then matches and buffers the
  accepted rows, then raises its watermark to the one passed with the call (a
  smaller one is ignored: watermarks only advance) and evicts against that.
  :meth:`~JoinStage.advance` only raises the watermark and evicts.
* **Lateness.** ``L`` is ``allowed_lateness_ms`` under ``late_data =
  "reopen"`` and 0 under ``drop``. A new row with event time ``t`` is late
  when ``t + L < wm``. Late rows are returned in
  :attr:`JoinOutput.late_left` / :attr:`JoinOutput.late_right` and are never
  matched, buffered or emitted, on an outer side neither (the run loop counts
  or dead-letters them): emitting one with nulls would claim "no partner" when
  a partner may well have been seen. This is exactly the rule under which no
  pair of accepted rows is ever missed (see *Eviction*). The looser "late only
  when its own eviction time has passed" is not: with ``time_window_ms`` = 5,
  a left row at 0 is evicted once ``wm`` = 6, and a right row at 4 would still
  be accepted, miss its partner, and, on a left outer join, sit beside a left
  row already emitted with nulls. ``reopen`` re-emits nothing: it only
  accepts later rows and keeps the buffered ones longer.
* **Matching.** Within one call the new left rows come first: they are matched
  with the right buffer; then the new right rows are matched with the left
  buffer and the new left rows. So every matching pair of accepted rows is
  emitted exactly once, by the call that brings the later of its two rows (a
  pair that arrives in one call: by that call). Then the accepted rows join
  their side's buffer.
* **Eviction.** A row's *reach* is the largest distance past its own event
  time at which a row of the other side can still match it: ``hi`` for a left
  row, ``-lo`` for a right row (either may be negative when the asymmetric
  bounds do not contain 0). A buffered row is evicted at the end of a call
  once ``wm > t + reach + L``, the reference's ``wm > ts + time_window_ms +
  allowed_lateness_ms``. No row accepted after that can match it: an accepted
  partner has ``t' + L >= wm``, and the time condition then puts the evicted
  row's ``t + reach + L`` at or above ``wm`` too. Under ``left_outer`` /
  ``right_outer`` / ``full_outer``, an evicted row of an outer side that never
  matched is emitted then, once, with nulls in the other side's columns. One
  exception: while the other side's schema is unknown (it has not brought a
  row yet, nor a restored snapshot), such rows stay buffered (they can match
  nothing any more) and are emitted by the first eviction after it is known,
  because the output needs its columns. They count against the cap.
* **Result.** Over a whole run that ends with an ``advance`` past every event
  time, the emitted rows are exactly the SQL join ``l [INNER | LEFT | RIGHT |
  FULL OUTER] JOIN r ON <keys> AND r.t - l.t BETWEEN lo AND hi`` over the
  accepted rows, whatever the batch split and arrival order (which rows are
  late does depend on them).
* **Output.** The left columns, each named ``left_column_prefix`` + its name,
  in the order of the left schema, then the right ones with
  ``right_column_prefix``: every column, keys and event time included, except
  ``__partition``. Types are the input types, every field nullable. The rows
  of one call are ordered by left event time, right event time, left arrival,
  right arrival, nulls last (so a left row's null-padded row follows its
  pairs, and the right-only rows come last). Until both schemas are known an
  empty output has no columns.
* **Schemas.** A side's first batch with rows fixes its schema (columns and
  types; ``__partition`` is not part of it). A later batch must have the same
  columns with the same types, in any order; an extra or retyped column, or
  a missing key or event-time column, fails the call, naming it. Another
  column missing or all-null-typed in a batch (JSON leaves out a field no
  message of the batch has) is null there. Batches with no rows are ignored.
* **Cap.** When more than ``max_buffer_rows`` rows (left + right) would stay
  buffered after the call's eviction, the call fails.
* **Partitions.** An input table may carry a string column ``__partition``
  (the source partition the row came from). It is kept in the buffers, never
  output, and lets :meth:`~JoinStage.snapshot_blob` and
  :meth:`~JoinStage.drop_partitions` select rows by partition, so a Kafka
  partition that moves to another process takes its buffered rows along. A
  row without one belongs to no partition.

* **Restart safety.** The buffers hold rows of batches whose offsets were
  committed long ago, so they cannot be rebuilt by replay: the commit policy
  persists :meth:`~JoinStage.snapshot` (one key per partition,
  ``join/<partition>``) with the source positions in one transaction and
  feeds it to :meth:`~JoinStage.restore` on start (before the first batch,
  so the restored watermark judges the replayed rows).
  :meth:`~JoinStage.open_floor_us` says how far back in event time the
  buffered state reaches.

Every failure of :meth:`~JoinStage.process` and :meth:`~JoinStage.restore` is
a :class:`StageError` and leaves the state as it was before the call, so the
run loop may apply ``on_error`` to the batch and go on.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from sluice.config.spec import JoinSpec
from sluice.engine.stages.snapshots import ipc_stream
from sluice.engine.watermark import to_micros
from sluice.errors import StageError

I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]

PARTITION = "__partition"
"""The optional input column naming the source partition of each row."""

_NO_ROW = np.iinfo(np.int64).max  # sorts a null side last
_MAX_CHUNKS = 64  # a buffer gets one chunk per call; past this, one copy makes it one chunk again
# Time buckets join the key once the probed rows span more than this many window
# widths: below it they cut few candidates and cost a duplicated build side
# (≈ 25 % of the time of a ±5 min join on unique ids).
_BUCKET_SPAN_WIDTHS = 4

# Snapshot format 1: this header, then the left and the right buffer, each an
# Arrow IPC stream (empty: the side's schema is not known yet). The header is
# magic, format version, has-watermark, watermark µs, left length, right length.
_MAGIC = b"SJN"
_VERSION = 1
_HEADER = struct.Struct("<3sBBqQQ")
_SIDES = ("left", "right")
_KEY = "join"  # state key of the rows without a partition; "join/<p>/<bucket>" for partition p
#: The smallest event-time bucket of a checkpoint's keys (see JoinStage.snapshot_delta).
_MIN_BUCKET_US = 60_000_000
_HEAD = "/head"  # join/<p>/head: a partition's schemas and watermark, no rows


@dataclass
class JoinOutput:
    """What one :meth:`JoinStage.process` or :meth:`JoinStage.advance` call yields."""

    emitted: pa.Table
    """Rows to write (see the module docstring for columns, types and order).
    Empty, with no columns, until both sides' schemas are known."""
    late_left: npt.NDArray[np.int64]
    """Sorted indices into the left input of the rows rejected as late.
    Always empty from :meth:`JoinStage.advance`."""
    late_right: npt.NDArray[np.int64]
    """The same for the right input."""


@dataclass(frozen=True, slots=True)
class _Buffer:
    """One side's buffered rows, in arrival order. Replaced whole, never mutated.

    ``table`` holds the side's columns in schema order, then ``__partition``
    (string, null when unknown); ``ts`` the event times in µs; ``matched``
    whether the row has been in at least one emitted pair; ``part`` the
    partition as a code of the stage's partition names.
    """

    table: pa.Table
    ts: I64
    matched: Mask
    part: I64  # each row's partition as the stage's code (-1: none), for snapshot keys

    @property
    def rows(self) -> int:
        return len(self.ts)


class JoinStage:
    """Stream-stream interval join for one pipeline's ``[transform.join]``.

    Not thread-safe: the run loop calls it from one task at a time. Call
    :meth:`open` before the first batch; :meth:`close` drops the buffers.
    """

    def __init__(self, spec: JoinSpec, pipeline: str, max_buffer_rows: int = 10_000_000) -> None:
        self.spec = spec
        self.pipeline = pipeline
        self.max_buffer_rows = max_buffer_rows
        if max_buffer_rows <= 0:
            raise StageError(f"join: max_buffer_rows must be positive, got {max_buffer_rows}")
        self._keys = (list(spec.left_keys), list(spec.right_keys))
        if not spec.left_keys or len(spec.left_keys) != len(spec.right_keys):
            raise StageError(
                "join: left_keys and right_keys need the same number of columns, at least one"
            )
        if spec.time_window_ms is not None:
            if spec.min_delta_ms is not None or spec.max_delta_ms is not None:
                raise StageError("join: time_window_ms excludes min_delta_ms / max_delta_ms")
            lo, hi = -spec.time_window_ms, spec.time_window_ms
        elif spec.min_delta_ms is not None and spec.max_delta_ms is not None:
            lo, hi = spec.min_delta_ms, spec.max_delta_ms
        else:
            raise StageError("join: set time_window_ms, or min_delta_ms and max_delta_ms")
        if lo > hi:
            raise StageError(f"join: min_delta_ms ({lo}) is above max_delta_ms ({hi})")
        self._lo, self._hi = lo * 1000, hi * 1000
        self._lateness_us = (
            (spec.allowed_lateness_ms or 0) * 1000 if spec.late_data == "reopen" else 0
        )
        # Rows are kept while wm <= t + reach + L; reach: left hi, right -lo.
        self._keep_us = (self._hi + self._lateness_us, -self._lo + self._lateness_us)
        # Snapshot keys hold a partition's rows of one event-time bucket, so a
        # checkpoint rewrites only the buckets that changed (snapshot_delta).
        self._bucket_us = max(_MIN_BUCKET_US, max(self._keep_us) // 4)
        kind = "inner" if spec.kind == "stream_stream_join" else spec.kind
        self._outer = (
            kind in ("left_outer", "full_outer"),
            kind in ("right_outer", "full_outer"),
        )
        self._open = False
        self._reset()

    def _reset(self) -> None:
        self._wm: int | None = None
        self._schemas: list[pa.Schema | None] = [None, None]
        self._bufs: list[_Buffer | None] = [None, None]
        self._key_types: list[pa.DataType] | None = None
        self._out: tuple[pa.Schema, pa.Schema, pa.Schema] | None = None  # (left, right, output)
        # Snapshot keys changed since the last checkpoint -> the change's number.
        self._dirty: dict[str, int] = {}
        self._changes = 0
        self._part_names: list[str] = []  # partition codes (_Buffer.part) -> names
        self._part_code: dict[str, int] = {}

    # -- lifecycle ------------------------------------------------------------

    def open(self) -> None:
        """Start with empty buffers, no schemas and no watermark."""
        self._reset()
        self._open = True

    def close(self) -> None:
        """Drop the buffers (pairs not made yet and outer rows not emitted yet are
        lost unless a snapshot of them was committed)."""
        self._reset()
        self._open = False

    # -- the contract -----------------------------------------------------------

    def process(
        self, left: pa.Table | None, right: pa.Table | None, watermark_us: int | None
    ) -> JoinOutput:
        """Match the new rows of both sides, buffer them, then evict what
        ``watermark_us`` expired.

        ``left`` / ``right``: the new rows of each side (``None`` or no rows:
        none). Lateness is judged against the stage's watermark before this
        call; ``watermark_us`` is the watermark after it, ``None`` when there
        is none yet. Raises :class:`StageError` (a missing or retyped column,
        a null event time, incompatible key types, the cap) and then leaves
        the state untouched.
        """
        self._require_open()
        try:
            return self._process((left, right), watermark_us)
        except pa.ArrowException as exc:
            raise StageError(f"join: {_first_line(exc)}") from exc

    def advance(self, watermark_us: int) -> JoinOutput:
        """Idle tick: raise the watermark to ``watermark_us``, evict, and emit the
        unmatched outer rows it evicted."""
        self._require_open()
        try:
            return self._process((None, None), watermark_us)
        except pa.ArrowException as exc:
            raise StageError(f"join: {_first_line(exc)}") from exc

    def open_floor_us(self) -> int | None:
        """The smallest event time (µs) still buffered on either side; ``None``
        when both buffers are empty."""
        lows = [int(b.ts.min()) for b in self._bufs if b is not None and b.rows]
        return min(lows) if lows else None

    def buffer_rows(self) -> tuple[int, int]:
        """Buffered rows (left, right), for a gauge."""
        left, right = self._bufs
        return (0 if left is None else left.rows, 0 if right is None else right.rows)

    def partitions(self) -> set[str]:
        """The ``__partition`` values of the buffered rows (rows without one: none)."""
        found: set[str] = set()
        for buf in self._bufs:
            if buf is not None and buf.rows:
                found.update(v for v in pc.unique(buf.table[PARTITION]).to_pylist() if v)
        return found

    @property
    def watermark_us(self) -> int | None:
        """The stage's watermark: the largest one it was given (or restored)."""
        return self._wm

    # -- snapshots --------------------------------------------------------------

    def snapshot(self) -> dict[str, bytes]:
        """The whole state as state-store keys (see
        :meth:`sluice.engine.stages.base.StatefulStage.snapshot`): the rows of
        each buffered partition and event-time bucket (``bucket_us`` wide:
        a quarter of the longest time a row is kept, at least a minute) as a
        :meth:`snapshot_blob` under ``join/<partition>/<bucket>``, and the rows
        without a partition (none when the run loop tags them, as it does with
        a state store) under ``join``.

        A bucket without buffered rows has no key: a checkpoint deletes the
        key it stored for it before. The state is not changed.
        """
        self._require_open()
        rows = self._rows_by_key()
        return self._encode_keys(sorted(rows), rows)

    def snapshot_delta(self) -> tuple[dict[str, bytes], set[str], int]:
        """What a checkpoint writes after the previous one: the :meth:`snapshot`
        keys whose rows changed since (rows buffered, matched or evicted), the
        keys the whole snapshot has (a stored key not among them is deleted),
        and a token for :meth:`checkpointed` once the checkpoint is durable.

        A backlog's rows land in new buckets, and eviction empties the oldest
        ones, so a checkpoint writes about the rows that came since the last
        one, not every buffered row again. Until :meth:`checkpointed`, every
        delta still holds the changes (a checkpoint that failed is not lost).
        """
        self._require_open()
        rows = self._rows_by_key()
        due = [k for k in sorted(rows) if k in self._dirty or k == _KEY or k.endswith(_HEAD)]
        return self._encode_keys(due, rows), set(rows), self._changes

    def checkpointed(self, token: int) -> None:
        """The delta of ``token`` (:meth:`snapshot_delta`) is durable: its keys
        are clean unless they changed again since."""
        self._dirty = {k: n for k, n in self._dirty.items() if n > token}

    def restore(self, state: Mapping[str, bytes]) -> None:
        """Add the rows of a :meth:`snapshot` (possibly merged from several
        stages' partitions) after the rows already buffered, with
        :meth:`restore_blob` per key ``join`` or ``join/...``, in partition
        and bucket order; other keys are ignored. Keys of the format before
        buckets (``join/<partition>``) are restored too, and their rows
        marked changed, so the next checkpoint stores them by bucket. On a
        :class:`StageError` the state is left as it was before the call."""
        self._require_open()
        before = (self._wm, list(self._schemas), list(self._bufs), self._key_types)
        legacy = False
        try:
            for key in sorted((k for k in state if _is_join_key(k)), key=_key_order):
                legacy = legacy or key.count("/") == 1
                self.restore_blob(state[key])
        except StageError:
            self._wm, self._schemas, self._bufs, self._key_types = before
            raise
        if legacy:
            self._changes += 1
            self._dirty.update(dict.fromkeys(self._rows_by_key(), self._changes))

    def _rows_by_key(self) -> dict[str, list[I64 | None]]:
        """Per snapshot key, the buffer rows of each side it holds (``None``: none).

        Beside its buckets, every partition with rows has a head key
        (``join/<partition>/head``, no rows) that every checkpoint rewrites:
        it holds the schemas and the watermark, which a bucket that has not
        changed holds as they were when it was written."""
        out: dict[str, list[I64 | None]] = {}
        for side in (0, 1):
            buf = self._bufs[side]
            if buf is None or not buf.rows:
                continue
            buckets = buf.ts // self._bucket_us
            order = np.lexsort((buckets, buf.part))  # stable: arrival order within a key
            c_sorted, b_sorted = buf.part[order], buckets[order]
            cut = np.flatnonzero((np.diff(c_sorted) != 0) | (np.diff(b_sorted) != 0)) + 1
            starts = np.concatenate([[0], cut]).tolist()
            ends = np.concatenate([cut, [len(order)]]).tolist()
            for start, end in zip(starts, ends, strict=True):
                code = int(c_sorted[start])
                key = self._key_name(code, int(b_sorted[start]))
                if code >= 0:
                    out.setdefault(f"{_KEY}/{self._part_names[code]}{_HEAD}", [None, None])
                rows = out.setdefault(key, [None, None])
                got = order[start:end]
                held = rows[side]
                rows[side] = got if held is None else np.sort(np.concatenate([held, got]))
        return out

    def _key_name(self, code: int, bucket: int) -> str:
        return f"{_KEY}/{self._part_names[code]}/{bucket}" if code >= 0 else _KEY

    def _codes(self, partitions: pa.Array | pa.ChunkedArray) -> I64:
        """Each row's partition as a code of this stage's partition names (-1: none)."""
        if isinstance(partitions, pa.ChunkedArray):
            partitions = partitions.combine_chunks()
        if not len(partitions):
            return np.empty(0, np.int64)
        encoded = pc.dictionary_encode(partitions)
        local = [self._code_of(v) for v in encoded.dictionary.to_pylist()]
        index = np.asarray(_np(encoded.indices.fill_null(-1)), dtype=np.int64)
        return np.asarray([*local, -1], dtype=np.int64)[index]  # index -1: the last, -1

    def _code_of(self, name: str | None) -> int:
        if not name:  # null or "": no partition (the key "join")
            return -1
        code = self._part_code.get(name)
        if code is None:
            code = self._part_code[name] = len(self._part_names)
            self._part_names.append(name)
        return code

    def _touch(self, buf: _Buffer, rows: I64 | Mask) -> None:
        """The snapshot keys of these rows of ``buf`` changed."""
        if rows.dtype == np.bool_:
            rows = np.flatnonzero(rows)
        if not len(rows):
            return
        codes, buckets = buf.part[rows], buf.ts[rows] // self._bucket_us
        low = int(buckets.min())
        span = int(buckets.max()) - low + 1
        pairs = np.unique((codes + 1) * span + (buckets - low))  # codes from -1
        self._changes += 1
        for pair in pairs.tolist():
            code, bucket = divmod(pair, span)
            self._dirty[self._key_name(code - 1, bucket + low)] = self._changes

    def _encode_keys(self, keys: list[str], rows: dict[str, list[I64 | None]]) -> dict[str, bytes]:
        """The blob of each of ``keys`` (rows per side from :meth:`_rows_by_key`):
        one take per side for all of them, then a slice per key."""
        if not keys:
            return {}
        taken: list[tuple[pa.Table, Mask, list[int]] | None] = []
        for side in (0, 1):
            schema, buf = self._schemas[side], self._bufs[side]
            if schema is None:
                taken.append(None)
                continue
            buf = buf or _empty_buffer(schema)
            parts = [rows[k][side] for k in keys]
            sizes = [0 if r is None else len(r) for r in parts]
            index = np.concatenate([r for r in parts if r is not None] or [np.empty(0, np.int64)])
            table = buf.table.take(pa.array(index, pa.int64()))
            taken.append((table, buf.matched[index], np.cumsum([0, *sizes]).tolist()))
        out: dict[str, bytes] = {}
        for i, key in enumerate(keys):
            pieces: list[tuple[pa.Table, Mask] | None] = []
            for got in taken:
                if got is None:
                    pieces.append(None)
                    continue
                table, matched, at = got
                n = at[i + 1] - at[i]
                pieces.append((table.slice(at[i], n), matched[at[i] : at[i] + n]))
            out[key] = self._blob(pieces)
        return out

    def snapshot_blob(self, partitions: Collection[str] | None = None) -> bytes:
        """The buffers, their "matched" flags, the side schemas and the watermark,
        in a versioned binary format (Arrow IPC, zstd-compressed when available).

        ``partitions``: only the rows of these ``__partition`` values (rows
        without one are in no partition); ``None``: every row. The state is
        not changed.
        """
        self._require_open()
        return self._encode(partitions)

    @staticmethod
    def _unpartitioned(table: pa.Table) -> pa.ChunkedArray:
        part = table[PARTITION]
        return pc.or_(pc.is_null(part), pc.equal(part, "")).fill_null(True)

    def _encode(self, partitions: Collection[str] | None, unpartitioned: bool = False) -> bytes:
        """The rows of ``partitions`` (``None``: every row, or with
        ``unpartitioned`` only the rows without a partition) as one blob."""
        parts = None if partitions is None else pa.array(sorted(partitions), pa.string())
        rows: list[I64 | None] = [None, None]
        for side in (0, 1):
            buf = self._bufs[side]
            if buf is None or not buf.rows:
                continue
            keep = None
            if parts is not None:
                keep = pc.is_in(buf.table[PARTITION], value_set=parts).fill_null(False)
            elif unpartitioned:
                keep = self._unpartitioned(buf.table)
            everything = np.arange(buf.rows, dtype=np.int64)
            rows[side] = everything if keep is None else np.flatnonzero(_np(keep).astype(np.bool_))
        return self._encode_keys([_KEY], {_KEY: rows})[_KEY]

    def _blob(self, pieces: list[tuple[pa.Table, Mask] | None]) -> bytes:
        """Each side's rows and their flags (``None``: its schema is unknown),
        with the schemas and the watermark, as one blob."""
        blobs = []
        for side, piece in enumerate(pieces):
            schema = self._schemas[side]
            if piece is None or schema is None:
                blobs.append(b"")
                continue
            table, matched = piece
            table = table.append_column("matched", pa.array(matched, pa.bool_()))
            blobs.append(_ipc(table, schema.names))
        wm = self._wm
        head = _HEADER.pack(
            _MAGIC, _VERSION, wm is not None, 0 if wm is None else wm, len(blobs[0]), len(blobs[1])
        )
        return head + blobs[0] + blobs[1]

    def restore_blob(self, blob: bytes) -> None:
        """Add a :meth:`snapshot_blob`'s rows after the rows already buffered.

        Fixes a side's schema from the snapshot when no batch has; otherwise
        the snapshot's columns must match it. Raises the watermark to the
        snapshot's (never lowers it): rows accepted after the restore must
        not need partners the snapshotting stage had already evicted. Emits
        nothing; the next call evicts against the raised watermark. Raises
        :class:`StageError` (an unknown format version, a damaged blob, a
        schema mismatch, the cap) and then leaves the state untouched.
        """
        self._require_open()
        if len(blob) < _HEADER.size or blob[:3] != _MAGIC:
            raise StageError("join: not a join snapshot")
        if blob[3] != _VERSION:
            raise StageError(
                f"join: snapshot format version {blob[3]} is not supported "
                f"(this sluice reads version {_VERSION}); was it written by a newer sluice?"
            )
        _, _, has_wm, wm, n_left, n_right = _HEADER.unpack_from(blob)
        if _HEADER.size + n_left + n_right != len(blob):
            raise StageError("join: the snapshot is truncated or damaged")
        pieces = (
            blob[_HEADER.size : _HEADER.size + n_left],
            blob[_HEADER.size + n_left :],
        )
        schemas = list(self._schemas)
        adds: list[tuple[pa.Table, I64, Mask] | None] = [None, None]
        try:
            for side, piece in enumerate(pieces):
                if not piece:
                    continue
                stored = pa.ipc.open_stream(piece).read_all()
                meta = stored.schema.metadata or {}
                names = json.loads(meta[b"names"])
                if stored.num_columns != len(names) + 2:
                    raise StageError("join: the snapshot is damaged (column count)")
                matched = _np(stored.column(stored.num_columns - 1)).astype(np.bool_)
                stored = stored.drop_columns([stored.column_names[-1]])
                stored = stored.rename_columns([*names, PARTITION])
                schema, table = self._conform(side, stored, schemas[side], "snapshot")
                schemas[side] = schema
                adds[side] = (table, self._event_us(side, table), matched)
        except (pa.ArrowException, KeyError, ValueError) as exc:
            raise StageError(f"join: the snapshot is damaged: {_first_line(exc)}") from exc
        key_types = self._resolve_keys(schemas)
        bufs = list(self._bufs)
        for side in (0, 1):
            add = adds[side]
            if add is None:
                continue
            schema = schemas[side]
            assert schema is not None  # set with the add
            old = bufs[side] or _empty_buffer(schema)
            bufs[side] = _compact(
                _Buffer(
                    pa.concat_tables([old.table, add[0]]),
                    np.concatenate([old.ts, add[1]]),
                    np.concatenate([old.matched, add[2]]),
                    np.concatenate([old.part, self._codes(add[0][PARTITION])]),
                )
            )
        self._check_cap(sum(b.rows for b in bufs if b is not None), bufs)
        # -- nothing below raises: commit ------------------------------------------
        self._schemas, self._bufs, self._key_types = schemas, bufs, key_types
        if has_wm:
            self._wm = wm if self._wm is None else max(self._wm, wm)

    def drop_partitions(self, partitions: Collection[str]) -> None:
        """Forget the buffered rows of these ``__partition`` values, emitting
        nothing (the process that takes the partitions over restores them from
        a snapshot and emits their outer rows). Rows without a partition stay."""
        self._require_open()
        parts = pa.array(sorted(partitions), pa.string())
        for side in (0, 1):
            buf = self._bufs[side]
            if buf is None or buf.rows == 0:
                continue
            gone = _np(pc.is_in(buf.table[PARTITION], value_set=parts).fill_null(False))
            gone = gone.astype(np.bool_)
            if gone.any():
                self._bufs[side] = _evict(buf, gone)

    # -- the call -----------------------------------------------------------------

    def _require_open(self) -> None:
        if not self._open:
            raise StageError("join: the stage is not open")

    def _process(
        self, inputs: tuple[pa.Table | None, pa.Table | None], wm_new: int | None
    ) -> JoinOutput:
        wm = self._wm
        schemas = list(self._schemas)
        new: list[_Buffer | None] = [None, None]
        late: list[I64] = [np.empty(0, np.int64), np.empty(0, np.int64)]
        for side, data in enumerate(inputs):
            if data is None or data.num_rows == 0:
                continue
            schema, table = self._conform(side, data, schemas[side])
            schemas[side] = schema
            ts = self._event_us(side, table)
            if wm is not None:
                ok = ts + self._lateness_us >= wm
                if not ok.all():
                    late[side] = np.flatnonzero(~ok).astype(np.int64)
                    table, ts = table.filter(pa.array(ok)), ts[ok]
            if len(ts):
                new[side] = _Buffer(
                    table, ts, np.zeros(len(ts), np.bool_), self._codes(table[PARTITION])
                )
        key_types = self._resolve_keys(schemas)
        # every side's buffer (old rows, then the accepted new ones)
        both: list[_Buffer | None] = [None, None]
        n_old = [0, 0]
        for side in (0, 1):
            old, add = self._bufs[side], new[side]
            n_old[side] = 0 if old is None else old.rows
            if add is None:
                both[side] = old
            elif old is None or old.rows == 0:
                both[side] = add
            else:
                both[side] = _Buffer(
                    pa.concat_tables([old.table, add.table]),
                    np.concatenate([old.ts, add.ts]),
                    np.concatenate([old.matched, add.matched]),
                    np.concatenate([old.part, add.part]),
                )
        li, ri = self._match(both, new, n_old, key_types)
        flagged: list[I64] = [np.empty(0, np.int64), np.empty(0, np.int64)]
        if len(li):
            for side, idx in ((0, li), (1, ri)):
                buf = both[side]
                assert buf is not None  # it holds a row of a pair
                flagged[side] = idx[~buf.matched[idx]]
                matched = buf.matched.copy()
                matched[idx] = True
                both[side] = _Buffer(buf.table, buf.ts, matched, buf.part)
        # eviction
        if wm_new is not None:
            wm = wm_new if wm is None else max(wm, wm_new)
        outer_rows: list[I64] = [np.empty(0, np.int64), np.empty(0, np.int64)]
        gone: list[Mask | None] = [None, None]
        for side in (0, 1):
            buf = both[side]
            if buf is None or buf.rows == 0 or wm is None:
                continue
            expired = buf.ts + self._keep_us[side] < wm
            if self._outer[side]:
                unmatched = expired & ~buf.matched
                if schemas[1 - side] is None:
                    expired &= ~unmatched  # kept until the other side's columns are known
                else:
                    outer_rows[side] = np.flatnonzero(unmatched).astype(np.int64)
            gone[side] = expired
        kept = sum(
            (b.rows - (0 if g is None else int(g.sum())))
            for b, g in zip(both, gone, strict=True)
            if b is not None
        )
        self._check_cap(kept, both)
        emitted = self._output(schemas, both, li, ri, outer_rows)
        # -- nothing below raises: commit ------------------------------------------
        for side in (0, 1):
            buf, g = both[side], gone[side]
            if buf is not None:  # the snapshot keys whose rows change
                self._touch(buf, np.arange(n_old[side], buf.rows, dtype=np.int64))
                self._touch(buf, flagged[side])
                if g is not None:
                    self._touch(buf, g)
            if buf is not None and g is not None and g.any():
                buf = _evict(buf, g)
            self._bufs[side] = None if buf is None else _compact(buf)
        self._schemas, self._key_types, self._wm = schemas, key_types, wm
        return JoinOutput(emitted, late[0], late[1])

    # -- input ------------------------------------------------------------------

    def _conform(
        self, side: int, data: pa.Table, schema: pa.Schema | None, source: str = "batch"
    ) -> tuple[pa.Schema, pa.Table]:
        """``data`` in the side's buffer layout (columns in schema order, then
        ``__partition``), and the side's schema (fixed by ``data`` when unset)."""
        name = _SIDES[side]
        cols = data.column_names
        if len(set(cols)) != len(cols):
            dup = sorted({c for c in cols if cols.count(c) > 1})
            raise StageError(f"join: the {name} {source} has duplicate columns {_names(dup)}")
        user = [f for f in data.schema if f.name != PARTITION]
        if schema is None:
            have = {f.name for f in user}
            need = [self.spec.event_time_column, *self._keys[side]]
            missing = [c for c in dict.fromkeys(need) if c not in have]
            if missing:
                raise StageError(f"join: the {name} {source} has no column {_names(missing)}")
            t = data.schema.field(self.spec.event_time_column).type
            if not (pa.types.is_timestamp(t) or pa.types.is_integer(t)):
                raise StageError(
                    f"join: {name} event_time_column '{self.spec.event_time_column}' must be "
                    f"a timestamp or µs integer, got {t}"
                )
            schema = pa.schema([pa.field(f.name, f.type) for f in user])
        else:
            have = {f.name for f in user}
            required = {self.spec.event_time_column, *self._keys[side]}
            absent = [c for c in schema.names if c not in have and c not in required]
            if absent:
                # JSON leaves out a field no message of the batch has: null.
                for c in absent:
                    data = data.append_column(
                        schema.field(c), pa.nulls(data.num_rows, schema.field(c).type)
                    )
                cols = data.column_names
                user = [f for f in data.schema if f.name != PARTITION]
                have = {f.name for f in user}
            missing = [c for c in schema.names if c not in have]
            extra = [f.name for f in user if f.name not in schema.names]
            if missing or extra:
                what = []
                if missing:
                    what.append(f"no column {_names(missing)}")
                if extra:
                    what.append(f"a new column {_names(extra)}")
                raise StageError(
                    f"join: the {name} {source} has {' and '.join(what)}; "
                    f"the {name} schema (fixed by the first {name} rows) has {_names(schema.names)}"
                )
            for f in schema:
                got = data.schema.field(f.name).type
                if pa.types.is_null(got) and f.name not in required:  # all null in this batch
                    data = data.set_column(
                        data.schema.get_field_index(f.name), f, pa.nulls(data.num_rows, f.type)
                    )
                    continue
                if not got.equals(f.type):
                    raise StageError(
                        f"join: {name} column '{f.name}' is {got} in this {source}, "
                        f"but {f.type} in the {name} schema (fixed by the first {name} rows)"
                    )
        part = (
            data[PARTITION]
            if PARTITION in cols
            else pa.chunked_array([pa.nulls(data.num_rows, pa.string())])
        )
        pt = part.type
        if not (
            pa.types.is_string(pt) or pa.types.is_large_string(pt) or pa.types.is_string_view(pt)
        ):
            raise StageError(f"join: the {name} {source}'s {PARTITION} must be a string, got {pt}")
        arrays = [data[n] for n in schema.names] + [part.cast(pa.string())]
        return schema, pa.Table.from_arrays(arrays, schema=_buffer_schema(schema))

    def _event_us(self, side: int, table: pa.Table) -> I64:
        col = table[self.spec.event_time_column]
        if col.null_count:
            raise StageError(
                f"join: {col.null_count} {_SIDES[side]} row(s) without an event time "
                f"('{self.spec.event_time_column}' is null)"
            )
        return to_micros(col)

    def _resolve_keys(self, schemas: list[pa.Schema | None]) -> list[pa.DataType] | None:
        """The type each key pair is compared in, once both schemas are known.

        Also checks that the output column names are distinct.
        """
        left, right = schemas
        if left is None or right is None:
            return None
        if self._key_types is not None:
            return self._key_types
        types = []
        for lk, rk in zip(*self._keys, strict=True):
            lt, rt = _value_type(left.field(lk).type), _value_type(right.field(rk).type)
            try:
                unified = pa.unify_schemas(
                    [pa.schema([("k", lt)]), pa.schema([("k", rt)])], promote_options="permissive"
                )
            except (pa.ArrowException, TypeError) as exc:
                raise StageError(
                    f"join: key columns left '{lk}' ({lt}) and right '{rk}' ({rt}) "
                    "cannot be compared"
                ) from exc
            types.append(unified.field("k").type)
        out = self._output_schema(left, right)
        seen: set[str] = set()
        for n in out.names:
            if n in seen:
                raise StageError(
                    f"join: two output columns are named '{n}'; change left_column_prefix "
                    "or right_column_prefix"
                )
            seen.add(n)
        return types

    # -- matching -----------------------------------------------------------------

    def _match(
        self,
        both: list[_Buffer | None],
        new: list[_Buffer | None],
        n_old: list[int],
        key_types: list[pa.DataType] | None,
    ) -> tuple[I64, I64]:
        """Every new pair, as row numbers into ``both`` (left, right).

        New left rows against the old right rows, then new right rows against
        every left row (old and new): each pair with a new row, once.
        """
        none = np.empty(0, np.int64)
        lbuf, rbuf = both
        if key_types is None or lbuf is None or rbuf is None:
            return none, none
        lis, ris = [], []
        if new[0] is not None and n_old[1]:
            # probe the old right rows, build on the new left ones
            r, l_new = self._pairs(1, rbuf, 0, n_old[1], 0, lbuf, n_old[0], lbuf.rows, key_types)
            lis.append(l_new + n_old[0])
            ris.append(r)
        if new[1] is not None:
            l_all, r_new = self._pairs(
                0, lbuf, 0, lbuf.rows, 1, rbuf, n_old[1], rbuf.rows, key_types
            )
            lis.append(l_all)
            ris.append(r_new + n_old[1])
        if not lis:
            return none, none
        li, ri = np.concatenate(lis), np.concatenate(ris)
        d = rbuf.ts[ri] - lbuf.ts[li]
        ok = (d >= self._lo) & (d <= self._hi)
        return li[ok], ri[ok]

    def _pairs(
        self,
        p_side: int,
        probe: _Buffer,
        p_from: int,
        p_to: int,
        b_side: int,
        build: _Buffer,
        b_from: int,
        b_to: int,
        key_types: list[pa.DataType],
    ) -> tuple[I64, I64]:
        """Candidate pairs: equal, non-null keys and event times in neighbouring
        time buckets, as (probe row - p_from, build row - b_from).

        The equi-join key carries a time bucket of width ``hi - lo + 1`` µs:
        a probe row sits in the bucket of its event time, a build row in the
        one or two buckets its partners' range ``[t + lo, t + hi]`` (build on
        the left) or ``[t - hi, t - lo]`` (build on the right) touches. So a
        key with many buffered rows (long allowed lateness, a held-back
        watermark) yields candidates near the window, not every buffered row
        of the key. Only when the probed rows span more than
        ``_BUCKET_SPAN_WIDTHS`` widths; below that the keys alone. The caller
        still filters on the exact time condition. Arrow's hash join builds
        its hash table on the right-hand table, so ``build`` should be the
        smaller one (the new rows): it is the one duplicated across buckets.
        """
        none = np.empty(0, np.int64)
        if p_to <= p_from or b_to <= b_from:
            return none, none
        width = self._hi - self._lo + 1
        p_ts = probe.ts[p_from:p_to]
        bucketed = int(p_ts.max()) - int(p_ts.min()) > _BUCKET_SPAN_WIDTHS * width
        names = [f"k{i}" for i in range(len(key_types))]

        def keys(side: int, buf: _Buffer, lo: int, hi: int, rows: Any) -> list[Any]:
            t = buf.table.slice(lo, hi - lo)
            cols = []
            for k, kt in zip(self._keys[side], key_types, strict=True):
                c = t[k] if rows is None else t[k].take(rows)
                cols.append(c if c.type.equals(kt) else c.cast(kt))
            return cols

        p_rows = pa.array(np.arange(p_to - p_from, dtype=np.int64))
        b_rows = pa.array(np.arange(b_to - b_from, dtype=np.int64))
        if not bucketed:
            p = pa.table([*keys(p_side, probe, p_from, p_to, None), p_rows], [*names, "p"])
            b = pa.table([*keys(b_side, build, b_from, b_to, None), b_rows], [*names, "b"])
        else:
            names.append("t")
            p = pa.table(
                [*keys(p_side, probe, p_from, p_to, None), pa.array(p_ts // width), p_rows],
                [*names, "p"],
            )
            b_ts = build.ts[b_from:b_to]
            near, far = (self._lo, self._hi) if b_side == 0 else (-self._hi, -self._lo)
            first, second = (b_ts + near) // width, (b_ts + far) // width
            two = np.flatnonzero(second != first)
            rows = pa.array(np.concatenate([np.arange(b_to - b_from, dtype=np.int64), two]))
            b = pa.table(
                [
                    *keys(b_side, build, b_from, b_to, rows),
                    pa.array(np.concatenate([first, second[two]])),
                    rows,
                ],
                [*names, "b"],
            )
        try:
            # no threads: the stage shares a core with the rest of the loop, and
            # one thread already probes tens of millions of rows a second
            j = p.join(b, names, join_type="inner", use_threads=False)
        except pa.ArrowException as exc:
            raise StageError(
                f"join: the key columns cannot be joined ({', '.join(map(str, key_types))}): "
                f"{_first_line(exc)}"
            ) from exc
        return _i64(j["p"]), _i64(j["b"])

    # -- output -------------------------------------------------------------------

    def _output_schema(self, left: pa.Schema, right: pa.Schema) -> pa.Schema:
        lp, rp = self.spec.left_column_prefix, self.spec.right_column_prefix
        return pa.schema(
            [pa.field(lp + f.name, f.type) for f in left]
            + [pa.field(rp + f.name, f.type) for f in right]
        )

    def _output(
        self,
        schemas: list[pa.Schema | None],
        both: list[_Buffer | None],
        li: I64,
        ri: I64,
        outer_rows: list[I64],
    ) -> pa.Table:
        left, right = schemas
        if left is None or right is None:
            return pa.table({})
        if self._out is None or self._out[0] is not left or self._out[1] is not right:
            self._out = (left, right, self._output_schema(left, right))
        out_schema = self._out[2]
        n_l, n_r = len(outer_rows[0]), len(outer_rows[1])
        if len(li) + n_l + n_r == 0:
            return out_schema.empty_table()
        lidx = np.concatenate([li, outer_rows[0], np.full(n_r, -1, np.int64)])
        ridx = np.concatenate([ri, np.full(n_l, -1, np.int64), outer_rows[1]])
        lbuf, rbuf = both
        lts = np.full(len(lidx), _NO_ROW, np.int64)
        rts = np.full(len(ridx), _NO_ROW, np.int64)
        has_l, has_r = lidx >= 0, ridx >= 0
        if lbuf is not None:
            lts[has_l] = lbuf.ts[lidx[has_l]]
        if rbuf is not None:
            rts[has_r] = rbuf.ts[ridx[has_r]]
        order = np.lexsort(
            (np.where(has_r, ridx, _NO_ROW), np.where(has_l, lidx, _NO_ROW), rts, lts)
        )
        lidx, ridx = lidx[order], ridx[order]
        arrays = []
        for side, idx, schema in ((0, lidx, left), (1, ridx, right)):
            buf = both[side]
            if buf is None:  # no row of this side in the output: all nulls
                arrays += [pa.nulls(len(idx), f.type) for f in schema]
                continue
            taken = buf.table.take(pa.array(idx, mask=idx < 0))
            arrays += [taken.column(i) for i in range(len(schema))]
        return pa.Table.from_arrays(arrays, schema=out_schema)

    def _check_cap(self, kept: int, bufs: list[_Buffer | None]) -> None:
        if kept <= self.max_buffer_rows:
            return
        counts = [0 if b is None else b.rows for b in bufs]
        raise StageError(
            f"max_buffer_rows={self.max_buffer_rows} reached: the join buffers would hold "
            f"{kept} rows (of {counts[0]} left + {counts[1]} right before eviction) "
            f"(pipeline '{self.pipeline}'). Rows stay buffered until the watermark passes "
            "their event time + the time window + allowed_lateness_ms: check that no "
            "source lags or idles, shorten time_window_ms / max_delta_ms or "
            "allowed_lateness_ms, or raise max_buffer_rows"
        )


# -- helpers ------------------------------------------------------------------------


def _is_join_key(key: str) -> bool:
    return key == _KEY or key.startswith(f"{_KEY}/")


def _key_order(key: str) -> tuple[str, int, int]:
    """Restore order: by partition, its head, then its buckets by number (not
    as text); ``join`` and ``join/<partition>`` (before buckets) as they are."""
    if key.count("/") < 2:
        return (key, 0, 0)
    partition, _, last = key.rpartition("/")
    try:
        return (partition, 1, int(last))
    except ValueError:  # the head
        return (partition, 0, 0)


def _buffer_schema(schema: pa.Schema) -> pa.Schema:
    return schema.append(pa.field(PARTITION, pa.string()))


def _empty_buffer(schema: pa.Schema) -> _Buffer:
    return _Buffer(
        _buffer_schema(schema).empty_table(),
        np.empty(0, np.int64),
        np.empty(0, np.bool_),
        np.empty(0, np.int64),
    )


def _evict(buf: _Buffer, gone: Mask) -> _Buffer:
    """``buf`` without the rows of ``gone``, copying only the chunks that lose rows
    (eviction mostly takes the oldest chunks, whole)."""
    keep = ~gone
    batches = []
    start = 0
    for batch in buf.table.to_batches():
        n = batch.num_rows
        k = keep[start : start + n]
        start += n
        if k.all():
            batches.append(batch)
        elif k.any():
            batches.append(batch.filter(pa.array(k)))
    table = pa.Table.from_batches(batches, schema=buf.table.schema)
    return _Buffer(table, buf.ts[keep], buf.matched[keep], buf.part[keep])


def _compact(buf: _Buffer) -> _Buffer:
    """One chunk again once calls appended many (takes and joins slow down with chunks)."""
    chunks = buf.table.column(0).num_chunks if buf.table.num_columns else 0
    if chunks <= _MAX_CHUNKS:
        return buf
    return _Buffer(buf.table.combine_chunks(), buf.ts, buf.matched, buf.part)


def _ipc(table: pa.Table, names: list[str]) -> bytes:
    """``table`` as an Arrow IPC stream; columns stored by position (a user column
    may be called ``matched``), their names in the schema metadata."""
    table = table.rename_columns([f"c{i}" for i in range(table.num_columns)])
    return ipc_stream(table.replace_schema_metadata({"names": json.dumps(names)}))


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _np(values: Any) -> Any:
    """An Arrow array / chunked array without nulls as a numpy array."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values.to_numpy(zero_copy_only=False)


def _i64(values: Any) -> I64:
    return np.asarray(_np(values), dtype=np.int64)


def _names(names: Any) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
