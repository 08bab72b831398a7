"""The window stage: event-time tumbling, hopping and session aggregation.

The stage folds Arrow batches into open windows and hands back the windows the
watermark closed. Everything is vectorised: a batch is aggregated with
``pyarrow.Table.group_by`` together with the open-window state (an Arrow table
with one row per open (window, group), holding partial aggregates), so merging
a batch into the state is one hash aggregation with merge functions (sum of
sums, sum of counts, min of mins, first = value at the smallest event time).
A batch costs O(batch + open state). Python loops run per emitted group (HLL
estimates), per distinct string key value (session ids) and per bridged
session, never per row, with one exception: approximate ``count_distinct``.
The ``datasketches`` HLL sketch has no bulk update in Python, so each batch's
*distinct* (group, value) pairs are fed to it one call each (≈0.1 µs a value).

Semantics (``wm`` is the watermark in µs since the epoch):

* **Time.** The event time is ``event_time_column`` (``_event_ts``): a
  timestamp of any unit, or an integer of µs since the epoch. A null event
  time fails the batch. Windows are half-open ``[start, end)`` in µs.
* **Assignment.** Tumbling: ``start = floor(ts / duration) * duration``.
  Hopping: windows start at multiples of ``hop_ms``; a row joins every window
  ``[start, start + duration)`` that contains it. Session: below.
* **Watermarks.** :meth:`WindowStage.process` judges lateness against the
  stage's own watermark, the largest one it was given before the call
  (``None``: nothing is late), then folds the accepted rows in, then raises
  its watermark to the one passed with the batch (a smaller one is ignored:
  watermarks only advance) and emits against that. :meth:`~WindowStage.advance`
  only raises the watermark and emits.
* **Lateness.** ``L`` is ``allowed_lateness_ms`` under ``late_data = "reopen"``
  and 0 under ``drop`` / ``dlq``. A (row, window) pair is late when
  ``end + L <= wm``. A row is returned in :attr:`WindowOutput.late` when it
  joins no window: tumbling, its window is late; hopping, its newest window
  (the one with the largest start) is late; the older windows it falls in are
  silently skipped when they are late and the newest is not. Session: a row
  is late when ``ts + L <= wm``. (Stricter than "its own session would be
  closed", on purpose: no accepted row can then touch a session that was
  already emitted and dropped from state, so emitted sessions are final.)
* **Emission.** A window is emitted when ``end <= wm``, exactly once under
  ``drop`` / ``dlq``, after which its state is dropped. Under ``reopen`` the
  state is kept until ``end + L <= wm``; a row accepted into an emitted
  window marks it dirty and the window is emitted again, full and corrected,
  at the end of the same call (same start and group keys, so a merge target
  keyed by group + ``window_start`` replaces the earlier row).
* **Sessions.** Per group key, rows whose consecutive event times are at
  most ``gap_ms`` apart form one session, except that a session never
  crosses a multiple of ``max_session_duration_ms`` (``M``) since the Unix
  epoch: rows on either side of such an instant are in different sessions
  however close they are. So no session is longer than ``M`` (a hard
  ceiling, under ``reopen`` too), and sessions depend only on the set of
  accepted rows, not on their arrival order or batch split: a replay after a
  crash rebuilds the same sessions and ids, and the result equals the same
  rule applied to all rows at once. (A cut anchored at each session's own
  start cannot promise that with mergeable state: a late row that bridges two
  sessions moves the anchor, and rows already folded into aggregates would
  have to be split again.) ``window_start`` is the session's first event
  time, ``window_end`` is ``min(last event time + gap_ms, the next multiple
  of M)``: the earliest event time that can no longer join it. A row that
  closes the gap between two open (or, under ``reopen``, retained) sessions
  bridges them into one. ``session_id`` is a stable 64-bit hash (``uint64``)
  of the group key values and the session start; a reopened session whose
  start moved, or that was bridged into an earlier one, is re-emitted under
  the new id and its old row is not retracted.
* **Aggregates** (SQL null semantics): ``count`` counts rows, ``count_col``
  non-null values, ``sum`` / ``avg`` / ``min`` / ``max`` skip nulls and are
  null when every value is; ``first`` / ``last`` are the value (null or not)
  of the row with the smallest / largest event time, ties broken by arrival
  order (``first`` takes the earliest-arriving, ``last`` the latest);
  ``count_distinct`` counts distinct non-null values, exactly (state bounded
  by ``max_distinct_values_per_group``, exceeding it fails) or with an HLL
  sketch (``lg_k`` 12: relative standard error ≈ 1.6 %).
* **Output.** ``window_start``, ``window_end`` (``timestamp[us]`` in the event
  time's time zone, UTC for an integer event time), ``session_id``
  (``uint64``, sessions only), the group keys (input types), then the
  aggregates in configuration order: ``count`` / ``count_col`` /
  ``count_distinct`` ``int64``; ``sum`` ``int64`` for signed integers,
  ``uint64`` for unsigned ones, ``float64`` for floats, Arrow's decimal sum
  type for decimals; ``avg`` ``float64``;
  ``min`` / ``max`` / ``first`` / ``last`` the input type. Rows are ordered by
  window start, window end, then group keys. A null group key is a key.
* **Caps.** More than ``max_groups_per_window`` groups in one tumbling or
  hopping window, or more open sessions than that, fails the batch.

* **Restart safety** is the caller's: commit a batch only once its largest
  event time is below :meth:`WindowStage.open_floor_us`, store the watermark
  with the commit, and after a restart call :meth:`WindowStage.advance` with
  it before the first batch, so replayed rows of windows that were already
  emitted are late instead of re-emitting those windows without their
  committed rows.
* **Snapshots.** Alternatively the caller stores :meth:`WindowStage.snapshot`
  (the whole state and the watermark) with the source positions in one
  transaction and feeds it to :meth:`WindowStage.restore` on start, before the
  first batch: the restored stage then emits exactly what the snapshotting one
  would have for the rows read after it, and nothing needs replaying.

Every failure of :meth:`~WindowStage.process` and :meth:`~WindowStage.restore`
is a :class:`StageError` and leaves the state as it was before the call, so
the run loop may apply ``on_error`` to the batch and go on (or, for a
snapshot it cannot restore, stop with the message).
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from sluice.config.spec import Aggregation, HoppingWindow, SessionWindow, Window
from sluice.engine.stages.snapshots import ipc_stream
from sluice.engine.watermark import to_micros
from sluice.errors import MissingDependencyError, StageError

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

# Internal state columns. Group keys are stored as __k0, __k1, ... so no user
# column name can collide with these.
_WS, _WE, _LAST = "__ws", "__we", "__last"
_DIRTY, _ID = "__dirty", "__id"
_FTS, _FSEQ, _LTS, _LSEQ = "__fts", "__fseq", "__lts", "__lseq"
_RF, _RL, _ORD, _SESS, _VAL = "__rf", "__rl", "__ord", "__sess", "__v"
_SKETCH = "__sketch"

_HLL_LG_K = 12  # 4096 registers: relative standard error ≈ 1.04 / 64 ≈ 1.6 %, ≤ 4 KiB a group

# Snapshot format 1: this header, then ``meta`` (UTF-8 JSON), then the pieces
# it lists, each an Arrow IPC stream. The header is magic, format version,
# the length of ``meta`` and a CRC-32 of everything after the header. ``meta``
# holds "config" (what the state's meaning depends on, see _config_facts),
# "watermark_us", "seq", "next_id", "tz" and "pieces": [name, length] in blob
# order. The pieces: "state" (the open (window, group) table, absent before
# the first fold), "distinct<i>" (the (__id, __v) pairs of exact count_distinct
# aggregation i, absent until its first fold) and "hll<i>" (__id, __sketch:
# the compact HLL sketch of each group of approximate aggregation i, by id).
_MAGIC = b"SWN"
_VERSION = 1
_HEADER = struct.Struct("<3sBII")


@dataclass
class WindowOutput:
    """What one :meth:`WindowStage.process` or :meth:`WindowStage.advance` call yields."""

    emitted: pa.Table
    """Rows to write (see the module docstring for columns, types and order).
    Empty, with no columns, until a batch fixed the output schema."""
    late: npt.NDArray[np.int64]
    """Sorted indices into the input table of the rows rejected as late
    (policy ``drop`` or ``dlq``; under ``reopen``, rows later than the allowed
    lateness). Always empty from :meth:`WindowStage.advance`."""


@dataclass(frozen=True, slots=True)
class _Agg:
    """One aggregation, compiled: ``kind`` is the agg, or ``distinct`` / ``hll``."""

    index: int
    kind: str
    column: str | None
    name: str
    cap: int

    @property
    def acc(self) -> str:
        return f"__a{self.index}"

    @property
    def acc_n(self) -> str:  # avg: the non-null count beside the sum
        return f"__a{self.index}n"


def _compile(aggs: list[Aggregation]) -> list[_Agg]:
    out = []
    for i, a in enumerate(aggs):
        kind: str = a.agg
        if kind == "count_distinct":
            kind = "distinct" if a.mode == "exact" else "hll"
        if kind != "count" and a.column is None:
            raise StageError(f"window: aggregation '{a.as_}' ({a.agg}) needs a column")
        cap = a.max_distinct_values_per_group or 0
        if kind == "distinct" and cap <= 0:
            raise StageError(
                f"window: aggregation '{a.as_}': exact count_distinct needs max_distinct_values_per_group"
            )
        out.append(_Agg(i, kind, a.column, a.as_, cap))
    return out


class WindowStage:
    """Event-time window aggregation for one pipeline's ``[transform.window]``.

    Not thread-safe: the run loop calls it from one task at a time. Call
    :meth:`open` before the first batch; :meth:`close` drops the state.
    """

    def __init__(self, spec: Window, pipeline: str) -> None:
        self.spec = spec
        self.pipeline = pipeline
        self._aggs = _compile(spec.aggregations)
        self._keys = list(spec.group_by)
        self._kcols = [f"__k{j}" for j in range(len(self._keys))]
        self._session = isinstance(spec, SessionWindow)
        if self._session and not self._keys:
            raise StageError("window: a session window needs at least one group_by column")
        self._lateness_us = (
            (spec.allowed_lateness_ms or 0) * 1000 if spec.late_data == "reopen" else 0
        )
        self._firstlast = any(a.kind in ("first", "last") for a in self._aggs)
        self._distinct = [a for a in self._aggs if a.kind == "distinct"]
        self._hll_aggs = [a for a in self._aggs if a.kind == "hll"]
        self._open = False
        self._reset()

    def _reset(self) -> None:
        self._state: pa.Table | None = None
        self._wm: int | None = None
        self._seq = 0  # arrival counter: ties on event time are broken by it
        self._next_id = 0
        self._sides: dict[int, pa.Table] = {}  # exact distinct: (__id, __v) pairs
        self._hll: dict[int, dict[int, Any]] = {a.index: {} for a in self._hll_aggs}
        self._checked: pa.Schema | None = None
        self._tz: str | None = "UTC"
        # the output schema, cached for the state schema and time zone it was made for
        self._out_schema: tuple[pa.Schema, str | None, pa.Schema] | None = None

    # -- lifecycle ------------------------------------------------------------

    def open(self) -> None:
        """Start with empty state and no watermark.

        Raises :class:`MissingDependencyError` when approximate
        ``count_distinct`` is configured and ``datasketches`` is missing.
        """
        if self._hll_aggs:
            try:
                import datasketches  # noqa: F401
            except ImportError as exc:
                raise MissingDependencyError(
                    "approximate count_distinct needs the datasketches package: "
                    "pip install 'sluice[sketches]'"
                ) from exc
        self._reset()
        self._open = True

    def close(self) -> None:
        """Drop every open window (unemitted results are lost; the run loop's
        commit holdback makes the source replay their rows)."""
        self._reset()
        self._open = False

    # -- the contract -----------------------------------------------------------

    def process(self, data: pa.Table, watermark_us: int | None) -> WindowOutput:
        """Fold ``data`` into the open windows, then emit what ``watermark_us`` closed.

        Lateness is judged against the stage's watermark before this call
        (the largest passed to earlier calls); ``watermark_us`` is the
        watermark after this batch, ``None`` when there is none yet. Raises
        :class:`StageError` (a missing or mistyped column, a null event time,
        a cap exceeded) and then leaves the state untouched.
        """
        if not self._open:
            raise StageError("window: the stage is not open")
        n = data.num_rows
        late: I64 = np.empty(0, np.int64)
        if n:
            self._check(data)
            ts = self._event_us(data)
            seq = np.arange(self._seq, self._seq + n, dtype=np.int64)
            try:
                if self._session:
                    late = self._fold_sessions(data, ts, seq)
                else:
                    late = self._fold_fixed(data, ts, seq)
            except pa.ArrowException as exc:  # e.g. min over a type Arrow cannot order
                raise StageError(f"window: {_first_line(exc)}") from exc
            self._seq += n
        if watermark_us is not None:
            self._wm = watermark_us if self._wm is None else max(self._wm, watermark_us)
        return WindowOutput(self._emit(), late)

    def advance(self, watermark_us: int) -> WindowOutput:
        """Idle tick: raise the watermark to ``watermark_us`` and emit what it closed.

        Also how a restarted pipeline restores the watermark it had committed
        with before replaying: rows of windows it closed are then late.
        """
        if not self._open:
            raise StageError("window: the stage is not open")
        self._wm = watermark_us if self._wm is None else max(self._wm, watermark_us)
        return WindowOutput(self._emit(), np.empty(0, np.int64))

    @property
    def watermark_us(self) -> int | None:
        """The stage's watermark: the largest one it was given (µs), ``None`` before any."""
        return self._wm

    def open_floor_us(self) -> int | None:
        """The smallest event time (µs) an open or reopen-retained window can contain.

        Every row with an earlier event time belongs only to windows that were
        emitted for the last time, so the run loop may commit a batch once its
        largest event time is below this floor. ``None`` when nothing is open.
        """
        if self._state is None or self._state.num_rows == 0:
            return None
        return int(pc.min(self._state[_WS]).as_py())

    def state_size(self) -> int:
        """Open (window, group) entries (sessions: open sessions), for a gauge."""
        return 0 if self._state is None else int(self._state.num_rows)

    def active_windows(self) -> int:
        """Distinct open windows (sessions: open sessions), for the windows-active gauge."""
        if self._state is None or self._state.num_rows == 0:
            return 0
        if self._session:
            return int(self._state.num_rows)
        return int(pc.count_distinct(self._state[_WS]).as_py())

    # -- snapshots --------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Everything :meth:`restore` needs to go on where this stage is: the open
        (window, group) table, the exact count_distinct values, the HLL sketches,
        the watermark, the arrival counter, the next group id and the event
        time's time zone, with the window configuration they depend on. A
        versioned binary format (see ``_HEADER``), the tables as Arrow IPC,
        zstd-compressed when available.

        Does not change the state. Vectorised but for one ``serialize_compact``
        call per HLL sketch (one per open group of each approximate
        ``count_distinct``). Raises :class:`StageError` when the stage is not open.
        """
        if not self._open:
            raise StageError("window: the stage is not open")
        pieces: list[tuple[str, bytes]] = []
        if self._state is not None:
            pieces.append(("state", ipc_stream(self._state)))
        for a in self._distinct:
            side = self._sides.get(a.index)
            if side is not None:
                pieces.append((f"distinct{a.index}", ipc_stream(side)))
        for a in self._hll_aggs:
            sketches = self._hll[a.index]
            ids = np.fromiter(sketches, np.int64, len(sketches))
            blobs = pa.array([s.serialize_compact() for s in sketches.values()], pa.large_binary())
            order = np.argsort(ids, kind="stable")  # by id: equal states, equal snapshots
            table = pa.table({_ID: pa.array(ids[order]), _SKETCH: blobs.take(pa.array(order))})
            pieces.append((f"hll{a.index}", ipc_stream(table)))
        meta = {
            "config": self._config_facts(),
            "watermark_us": self._wm,
            "seq": self._seq,
            "next_id": self._next_id,
            "tz": self._tz,
            "pieces": [[name, len(piece)] for name, piece in pieces],
        }
        text = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        crc = zlib.crc32(text)
        for _, piece in pieces:
            crc = zlib.crc32(piece, crc)
        head = _HEADER.pack(_MAGIC, _VERSION, len(text), crc)
        return b"".join([head, text, *(piece for _, piece in pieces)])  # one copy

    def restore(self, blob: bytes) -> None:
        """Load a :meth:`snapshot` into this open stage, which must not have
        folded a row yet (a watermark alone is fine: the stage keeps the larger
        of its own and the snapshot's, as watermarks only advance).

        After it the stage behaves as the snapshotting stage did right after
        :meth:`snapshot`: the same rows in, the same rows and late indices out.
        Emits nothing; a raised watermark emits on the next call. Raises
        :class:`StageError` for a stage that is not open or has folded rows,
        a blob that is no window snapshot, an unknown format version, a
        truncated or damaged blob, or a snapshot of another window
        configuration (kind, durations, group_by, aggregations), and then
        leaves the state untouched.
        """
        if not self._open:
            raise StageError("window: the stage is not open")
        if self._seq or self._state is not None:
            raise StageError(
                "window: restore needs a stage that has not folded any rows yet; "
                "restore a snapshot before the first batch"
            )
        if len(blob) < 4 or blob[:3] != _MAGIC:
            raise StageError("window: not a window snapshot")
        if blob[3] != _VERSION:
            raise StageError(
                f"window: snapshot format version {blob[3]} is not supported "
                f"(this sluice reads version {_VERSION}); was it written by a newer sluice?"
            )
        if len(blob) < _HEADER.size:
            raise StageError("window: the snapshot is truncated or damaged")
        _, _, n_meta, crc = _HEADER.unpack_from(blob)
        body = memoryview(blob)[_HEADER.size :]
        if zlib.crc32(body) != crc or n_meta > len(body):
            raise StageError("window: the snapshot is truncated or damaged (checksum mismatch)")
        try:
            meta = json.loads(bytes(body[:n_meta]))
            config, tz = meta["config"], meta["tz"]
            wm, seq, next_id = meta["watermark_us"], meta["seq"], meta["next_id"]
            lengths = [(str(name), int(size)) for name, size in meta["pieces"]]
            if not (
                isinstance(config, dict)
                and (tz is None or isinstance(tz, str))
                and (wm is None or isinstance(wm, int))
                and isinstance(seq, int)
                and isinstance(next_id, int)
            ):
                raise ValueError("a field has the wrong type")
        except (ValueError, KeyError, TypeError) as exc:
            raise StageError(f"window: the snapshot is damaged: {_first_line(exc)}") from exc
        self._check_config(config)
        if n_meta + sum(size for _, size in lengths) != len(body):
            raise StageError("window: the snapshot is truncated or damaged (piece lengths)")
        pieces: dict[str, memoryview] = {}
        at = n_meta
        for name, size in lengths:
            pieces[name], at = body[at : at + size], at + size
        try:
            state, sides, hll = self._read_pieces(pieces)
        except (pa.ArrowException, OSError, ValueError, IndexError, RuntimeError) as exc:
            raise StageError(f"window: the snapshot is damaged: {_first_line(exc)}") from exc
        # -- nothing below raises: commit ------------------------------------------
        self._state, self._sides, self._hll = state, sides, hll
        self._seq, self._next_id, self._tz = seq, next_id, tz
        self._checked = self._out_schema = None  # caches: the next batch checks its schema again
        if wm is not None:
            self._wm = wm if self._wm is None else max(self._wm, wm)

    def _config_facts(self) -> dict[str, Any]:
        """What the meaning of the state depends on. Not the caps, lateness or
        column names: a restart may change those (raise a cap that was hit)."""
        spec = self.spec
        facts: dict[str, Any]
        if isinstance(spec, SessionWindow):
            facts = {
                "kind": "session",
                "gap_ms": spec.gap_ms,
                "max_session_duration_ms": spec.max_session_duration_ms,
            }
        elif isinstance(spec, HoppingWindow):
            facts = {"kind": "hopping", "duration_ms": spec.duration_ms, "hop_ms": spec.hop_ms}
        else:
            facts = {"kind": "tumbling", "duration_ms": spec.duration_ms}
        facts["group_by"] = self._keys
        modes = {"distinct": "count_distinct exact", "hll": "count_distinct approximate"}
        facts["aggregations"] = [
            f"{modes.get(a.kind, a.kind)}({a.column or ''})" for a in self._aggs
        ]
        return facts

    def _check_config(self, stored: dict[str, Any]) -> None:
        mine = self._config_facts()
        diffs = [
            f"{key} {json.dumps(stored.get(key))} in the snapshot, {json.dumps(mine.get(key))} here"
            for key in sorted(mine.keys() | stored.keys())
            if stored.get(key) != mine.get(key)
        ]
        if diffs:
            raise StageError(
                "window: the snapshot was taken with another window configuration "
                f"({'; '.join(diffs)}); it cannot be restored into this one"
            )

    def _read_pieces(
        self, pieces: dict[str, memoryview]
    ) -> tuple[pa.Table | None, dict[int, pa.Table], dict[int, dict[int, Any]]]:
        """The snapshot's tables, checked against this stage's layout."""
        known = {"state", *(f"distinct{a.index}" for a in self._distinct)}
        known |= {f"hll{a.index}" for a in self._hll_aggs}
        unknown = sorted(set(pieces) - known)
        if unknown:
            raise ValueError(f"unknown piece(s) {', '.join(unknown)}")
        state = None
        if "state" in pieces:
            state = _read_ipc(pieces["state"])
            _expect(state, "state", self._state_names(), {_WS, _WE, _ID})
        sides = {}
        for a in self._distinct:
            if (piece := pieces.get(f"distinct{a.index}")) is not None:
                sides[a.index] = _expect(_read_ipc(piece), a.name, [_ID, _VAL], {_ID})
        hll: dict[int, dict[int, Any]] = {a.index: {} for a in self._hll_aggs}
        for a in self._hll_aggs:
            if (piece := pieces.get(f"hll{a.index}")) is None:
                continue
            import datasketches as ds

            table = _expect(_read_ipc(piece), a.name, [_ID, _SKETCH], {_ID})
            sketches = hll[a.index]
            for gid, raw in zip(_np(table[_ID]).tolist(), table[_SKETCH].to_pylist(), strict=True):
                sketch = ds.hll_sketch.deserialize(raw)
                if sketch.lg_config_k != _HLL_LG_K:
                    raise ValueError(f"'{a.name}' has a sketch of lg_k {sketch.lg_config_k}")
                sketches[gid] = sketch
        return state, sides, hll

    # -- input ------------------------------------------------------------------

    def _check(self, data: pa.Table) -> None:
        """Check the columns once per input schema."""
        if self._checked is not None and self._checked.equals(data.schema):
            return
        names = set(data.column_names)
        spec = self.spec
        need = [spec.event_time_column, *self._keys, *(a.column for a in self._aggs if a.column)]
        missing = sorted({c for c in need if c not in names})
        if missing:
            raise StageError(f"window: the batch has no column {', '.join(map(repr, missing))}")
        t = data.schema.field(spec.event_time_column).type
        if pa.types.is_timestamp(t):
            tz = t.tz
        elif pa.types.is_integer(t):
            tz = "UTC"
        else:
            raise StageError(
                f"window: event_time_column '{spec.event_time_column}' must be a timestamp or µs integer, got {t}"
            )
        for a in self._aggs:
            if a.column is None:
                continue
            vt = data.schema.field(a.column).type
            if a.kind in ("sum", "avg") and not _summable(vt):
                raise StageError(f"window: {a.kind} '{a.name}': column '{a.column}' is {vt}")
            if a.kind == "hll" and _hll_values(pa.array([], vt)) is None:
                raise StageError(
                    f"window: count_distinct '{a.name}': column '{a.column}' of type {vt} cannot be sketched"
                )
        self._tz = tz  # set with the check, not before: a failed check changes nothing
        self._checked = data.schema

    def _event_us(self, data: pa.Table) -> I64:
        col = data[self.spec.event_time_column]
        if col.null_count:
            raise StageError(
                f"window: {col.null_count} row(s) without an event time ('{self.spec.event_time_column}' is null)"
            )
        return to_micros(col)

    # -- folding ------------------------------------------------------------------

    def _lateness_ref(self) -> int | None:
        return None if self._wm is None else self._wm - self._lateness_us

    def _fold_fixed(self, data: pa.Table, ts: I64, seq: I64) -> I64:
        """Tumbling / hopping: assign, filter late pairs, merge into the state."""
        spec = self.spec
        assert not isinstance(spec, SessionWindow)
        d = spec.duration_ms * 1000
        ref = self._lateness_ref()
        n = len(ts)
        if isinstance(spec, HoppingWindow):
            h = spec.hop_ms * 1000
            reps = -(-d // h)
            newest = ts // h * h
            starts = (newest[None, :] - (np.arange(reps, dtype=np.int64) * h)[:, None]).ravel()
            rows = np.tile(np.arange(n, dtype=np.int64), reps)
            keep = starts + d > np.tile(ts, reps)
            if ref is not None:
                keep &= starts + d > ref
                late = np.flatnonzero(newest + d <= ref).astype(np.int64)
            else:
                late = np.empty(0, np.int64)
            sel: I64 | None = rows[keep]
            ws = starts[keep]
        else:
            ws = ts // d * d
            sel = None
            late = np.empty(0, np.int64)
            if ref is not None:
                ok = ws + d > ref
                if not ok.all():
                    late = np.flatnonzero(~ok).astype(np.int64)
                    sel = np.flatnonzero(ok).astype(np.int64)
                    ws = ws[sel]
        if sel is not None and len(sel) == 0:
            return late
        rows_t = self._row_items(data, sel, ts, seq, ws, ws + d)
        items = self._with_state(rows_t)
        n_state = items.num_rows - rows_t.num_rows
        merged, row_group = self._merge(items, [_WS, *self._kcols], n_state)
        merged = merged.select(self._state_names())
        self._check_groups(merged)
        self._commit(merged, row_group, rows_t, {})
        return late

    def _fold_sessions(self, data: pa.Table, ts: I64, seq: I64) -> I64:
        """Session: filter late rows, sessionise rows with the open sessions, merge."""
        spec = self.spec
        assert isinstance(spec, SessionWindow)
        ref = self._lateness_ref()
        sel: I64 | None = None
        late = np.empty(0, np.int64)
        if ref is not None:
            ok = ts > ref
            if not ok.all():
                late = np.flatnonzero(~ok).astype(np.int64)
                sel = np.flatnonzero(ok).astype(np.int64)
                if len(sel) == 0:
                    return late
        t_sel = ts if sel is None else ts[sel]
        rows_t = self._row_items(data, sel, ts, seq, t_sel, t_sel)
        items = self._with_state(rows_t)
        n_state = items.num_rows - rows_t.num_rows
        sess, first_item = self._sessionise(items)
        items = items.append_column(_SESS, pa.array(sess))
        merged, _ = self._merge(items, [_SESS], n_state)
        # one row per session, in session order; keys from the session's first item
        merged = merged.take(pa.array(np.argsort(_np(merged[_SESS]), kind="stable")))
        for k in self._kcols:
            merged = merged.append_column(k, items[k].take(pa.array(first_item)))
        start, last = _np(merged[_WS]), _np(merged[_LAST])
        cap = spec.max_session_duration_ms * 1000
        end = np.minimum(last + spec.gap_ms * 1000, (start // cap + 1) * cap)
        merged = merged.append_column(_WE, pa.array(end, pa.int64()))
        merged = merged.select(self._state_names())
        if merged.num_rows > spec.max_groups_per_window:
            raise StageError(
                f"max_groups_per_window={spec.max_groups_per_window} reached: "
                f"{merged.num_rows} open sessions (pipeline '{self.pipeline}')"
            )
        # old state ids → the id their session keeps (bridged sessions fold into one)
        remap: dict[int, int] = {}
        if n_state:
            old = np.asarray(items[_ID].slice(0, n_state).to_numpy(), dtype=np.int64)
            new = _np(merged[_ID])
            kept = new[sess[:n_state]]
            moved = old != kept
            remap = dict(zip(old[moved].tolist(), kept[moved].tolist(), strict=True))
        row_group = sess[n_state:]
        self._commit(merged, row_group, rows_t, remap)
        return late

    def _row_items(
        self, data: pa.Table, sel: I64 | None, ts: I64, seq: I64, ws: I64, we: I64
    ) -> pa.Table:
        """The accepted (row, window) pairs as single-row partial aggregates."""

        taken: dict[str, Any] = {}
        picks = None if sel is None else pa.array(sel)

        def col(name: str) -> Any:
            if name not in taken:
                taken[name] = data[name] if picks is None else data[name].take(picks)
            return taken[name]

        m = len(ws)
        t = ts if sel is None else ts[sel]
        s = seq if sel is None else seq[sel]
        cols: dict[str, Any] = {_WS: pa.array(ws), _WE: pa.array(we)}
        if self._session:
            cols[_LAST] = pa.array(t)
        for k, name in zip(self._kcols, self._keys, strict=True):
            cols[k] = col(name)
        cols[_DIRTY] = pa.array(np.ones(m, dtype=bool))
        cols[_ID] = pa.nulls(m, pa.int64())
        if self._firstlast:
            cols[_FTS], cols[_FSEQ] = pa.array(t), pa.array(s)
            cols[_LTS], cols[_LSEQ] = cols[_FTS], cols[_FSEQ]
        for a in self._aggs:
            if a.kind == "count":
                cols[a.acc] = pa.array(np.ones(m, dtype=np.int64))
            elif a.kind == "count_col":
                cols[a.acc] = pc.is_valid(col(_req(a.column))).cast(pa.int64())
            elif a.kind == "sum":
                v = col(_req(a.column))
                cols[a.acc] = v.cast(_sum_type(v.type))
            elif a.kind == "avg":
                v = col(_req(a.column))
                cols[a.acc] = v.cast(_avg_type(v.type))
                cols[a.acc_n] = pc.is_valid(v).cast(pa.int64())
            elif a.kind in ("min", "max", "first", "last"):
                cols[a.acc] = col(_req(a.column))
            elif a.kind == "distinct":
                cols[a.acc] = pa.array(np.zeros(m, dtype=np.int64))
        table = pa.table(cols)
        # The distinct and HLL values travel beside the items, not in the state.
        extra = {}
        for a in self._aggs:
            if a.kind in ("distinct", "hll"):
                extra[f"__x{a.index}"] = col(_req(a.column))
        for name, values in extra.items():
            table = table.append_column(name, values)
        return table

    def _with_state(self, rows_t: pa.Table) -> pa.Table:
        """State rows first, then the new items, in one table of one schema."""
        items = rows_t.drop_columns([c for c in rows_t.column_names if c.startswith("__x")])
        state = self._state
        if state is None or state.num_rows == 0:
            return items
        if not items.schema.equals(state.schema):
            try:
                items = items.cast(state.schema)
            except (pa.ArrowException, ValueError) as exc:
                raise StageError(
                    f"window: the batch's column types changed while windows are open: {exc}"
                ) from exc
        return pa.concat_tables([state, items])

    def _merge(self, items: pa.Table, by: list[str], n_state: int) -> tuple[pa.Table, I64]:
        """Aggregate ``items`` by ``by`` with the merge functions.

        Returns the merged rows (with ``__id`` = the smallest old id, else a
        fresh one) and, for every new item (past the first ``n_state``), the
        index of its merged row.
        """
        n = items.num_rows
        specs: list[tuple[str, str]] = [(_DIRTY, "any"), (_ID, "min")]
        if not self._session:
            specs.append((_WE, "min"))
        else:
            specs += [(_WS, "min"), (_LAST, "max")]
        if self._firstlast:
            fo = np.lexsort((_np(items[_FSEQ]), _np(items[_FTS])))
            lo = np.lexsort((_np(items[_LSEQ]), _np(items[_LTS])))
            rf = np.empty(n, np.int64)
            rf[fo] = np.arange(n)
            rl = np.empty(n, np.int64)
            rl[lo] = np.arange(n)
            items = items.append_column(_RF, pa.array(rf)).append_column(_RL, pa.array(rl))
            specs += [(_RF, "min"), (_RL, "max")]
        for a in self._aggs:
            if a.kind in ("count", "count_col", "sum", "distinct"):
                specs.append((a.acc, "sum"))
            elif a.kind == "avg":
                specs += [(a.acc, "sum"), (a.acc_n, "sum")]
            elif a.kind in ("min", "max"):
                specs.append((a.acc, a.kind))
        want_groups = bool(self._distinct or self._hll_aggs) and not self._session
        if want_groups:
            items = items.append_column(_ORD, pa.array(np.arange(n, dtype=np.int64)))
            specs.append((_ORD, "list"))
        g = items.group_by(by, use_threads=not want_groups).aggregate(specs)
        out: dict[str, Any] = {}
        for c in by:
            out[c] = g[c]
        names = {f"{c}_{f}": c for c, f in specs}
        for src, dst in names.items():
            if dst not in (_RF, _RL, _ORD):
                out[dst] = g[src]
        old_ids = g[f"{_ID}_min"]
        fresh = _np(pc.is_null(old_ids)).astype(bool)
        new_ids = np.array(_np(old_ids.fill_null(0)), dtype=np.int64)  # a writable copy
        fresh_at = np.flatnonzero(fresh)
        if self._session:
            # Threads make the group order vary: number new sessions in session
            # order, so ids, and with them which id a bridge keeps and the order of
            # an HLL union, are the same on every run.
            fresh_at = fresh_at[np.argsort(_np(g[_SESS])[fresh_at], kind="stable")]
        new_ids[fresh_at] = np.arange(self._next_id, self._next_id + len(fresh_at))
        out[_ID] = pa.array(new_ids)
        if self._firstlast:
            fi = pa.array(fo[_np(g[f"{_RF}_min"])])
            li = pa.array(lo[_np(g[f"{_RL}_max"])])
            out[_FTS], out[_FSEQ] = items[_FTS].take(fi), items[_FSEQ].take(fi)
            out[_LTS], out[_LSEQ] = items[_LTS].take(li), items[_LSEQ].take(li)
            for a in self._aggs:
                if a.kind == "first":
                    out[a.acc] = items[a.acc].take(fi)
                elif a.kind == "last":
                    out[a.acc] = items[a.acc].take(li)
        merged = pa.table(out)
        row_group = np.empty(0, np.int64)
        if want_groups:
            lists = g[f"{_ORD}_list"].combine_chunks()
            pos = _np(pc.list_flatten(lists))
            parent = _np(pc.list_parent_indices(lists))
            group_of = np.empty(n, np.int64)
            group_of[pos] = parent
            row_group = group_of[n_state:]
        return merged, row_group

    def _state_names(self) -> list[str]:
        names = [_WS, _WE]
        if self._session:
            names.append(_LAST)
        names += [*self._kcols, _DIRTY, _ID]
        if self._firstlast:
            names += [_FTS, _FSEQ, _LTS, _LSEQ]
        for a in self._aggs:
            if a.kind in ("count", "count_col", "sum", "min", "max", "first", "last", "distinct"):
                names.append(a.acc)
            elif a.kind == "avg":
                names += [a.acc, a.acc_n]
        return names

    def _check_groups(self, merged: pa.Table) -> None:
        cap = self.spec.max_groups_per_window
        if merged.num_rows <= cap:
            return
        per = merged.group_by(_WS).aggregate([(_WS, "count"), (_WE, "min")])
        counts = _np(per[f"{_WS}_count"])
        worst = int(np.argmax(counts))
        if counts[worst] > cap:
            start, end = int(per[_WS][worst].as_py()), int(per[f"{_WE}_min"][worst].as_py())
            raise StageError(
                f"max_groups_per_window={cap} reached: window [{_iso(start)}, {_iso(end)}) "
                f"has {int(counts[worst])} groups (pipeline '{self.pipeline}')"
            )

    def _commit(
        self,
        merged: pa.Table,
        row_group: I64,
        rows_t: pa.Table,
        remap: dict[int, int],
    ) -> None:
        """Fold the distinct values in, check their caps, then replace the state.

        Everything that can fail runs before the first mutation (the HLL
        sketches are updated in place), so a failure leaves the state whole.
        """
        ids = np.asarray(merged[_ID].to_numpy(), dtype=np.int64)
        row_ids = ids[row_group] if len(row_group) else np.empty(0, np.int64)
        sides: dict[int, pa.Table] = {}
        for a in self._distinct:
            side = self._sides.get(a.index)
            if side is not None and remap:
                side = _remap_ids(side, remap)
            values = rows_t[f"__x{a.index}"]
            fresh = pa.table({_ID: pa.array(row_ids), _VAL: values}).filter(pc.is_valid(values))
            if side is not None and side.num_rows:
                if not fresh.schema.equals(side.schema):
                    try:
                        fresh = fresh.cast(side.schema)
                    except (pa.ArrowException, ValueError) as exc:
                        raise StageError(
                            f"window: count_distinct '{a.name}': the column type changed: {exc}"
                        ) from exc
                fresh = pa.concat_tables([side, fresh])
            side = fresh.group_by([_ID, _VAL]).aggregate([])
            per = side.group_by(_ID).aggregate([(_VAL, "count")])
            counts = np.zeros(len(ids), np.int64)
            where = _np(pc.index_in(per[_ID], pa.array(ids)))
            counts[where] = _np(per[f"{_VAL}_count"])
            over = np.flatnonzero(counts > a.cap)
            if len(over):
                j = int(over[0])
                raise StageError(
                    f"window: count_distinct '{a.name}' exceeds max_distinct_values_per_group={a.cap} "
                    f"({int(counts[j])} values) for group {self._describe(merged, j)}"
                )
            merged = merged.set_column(
                merged.schema.get_field_index(a.acc), a.acc, pa.array(counts)
            )
            sides[a.index] = side.select([_ID, _VAL])
        # -- nothing below raises a StageError: mutate -----------------------------
        for a in self._hll_aggs:
            self._hll_update(a, remap, row_ids, rows_t[f"__x{a.index}"])
        self._sides.update(sides)
        self._next_id = max(self._next_id, int(ids.max()) + 1) if len(ids) else self._next_id
        self._state = merged

    def _hll_update(self, a: _Agg, remap: dict[int, int], row_ids: I64, values: Any) -> None:
        import datasketches as ds

        sketches = self._hll[a.index]
        for old, new in remap.items():
            src = sketches.pop(old, None)
            if src is None:
                continue
            dst = sketches.get(new)
            if dst is None:
                sketches[new] = src
                continue
            union = ds.hll_union(_HLL_LG_K)
            union.update(dst)
            union.update(src)
            sketches[new] = union.get_result(ds.HLL_8)
        pairs = pa.table({_ID: pa.array(row_ids), _VAL: values}).filter(pc.is_valid(values))
        if pairs.num_rows == 0:
            return
        # One thread: the pairs come out in first-seen order, so the sketches see the
        # same updates in the same order on every run (the HIP estimate depends on it).
        pairs = pairs.group_by([_ID, _VAL], use_threads=False).aggregate([])
        pyvals = _hll_values(pairs[_VAL].combine_chunks())
        assert pyvals is not None  # checked per schema in _check
        sketch = None
        current = -1
        for gid, v in zip(_np(pairs[_ID]).tolist(), pyvals, strict=True):
            if gid != current:
                current = gid
                sketch = sketches.get(gid)
                if sketch is None:
                    sketch = sketches[gid] = ds.hll_sketch(_HLL_LG_K, ds.HLL_8)
            sketch.update(v)  # type: ignore[union-attr]  # set on the first pair of each id

    def _describe(self, merged: pa.Table, j: int) -> str:
        keys = ", ".join(
            f"{name}={merged[k][j].as_py()!r}"
            for name, k in zip(self._keys, self._kcols, strict=True)
        )
        start, end = int(merged[_WS][j].as_py()), int(merged[_WE][j].as_py())
        return f"{keys or '(no group_by)'} in window [{_iso(start)}, {_iso(end)})"

    # -- sessions -----------------------------------------------------------------

    def _sessionise(self, items: pa.Table) -> tuple[I64, I64]:
        """Assign every item (open session or new row) to a session.

        Returns the session number of each item and the index of each
        session's first item (by start).
        """
        spec = self.spec
        assert isinstance(spec, SessionWindow)
        gap = spec.gap_ms * 1000
        n = items.num_rows
        start = _np(items[_WS])
        last = _np(items[_LAST])
        cell = start // (spec.max_session_duration_ms * 1000)
        key = _group_ids(items, self._kcols)
        order = np.lexsort((last, start, cell, key))
        ck, cc, st, la = key[order], cell[order], start[order], last[order]
        # a segment: one group key within one max_session_duration_ms cell
        new_seg = np.empty(n, bool)
        new_seg[0] = True
        new_seg[1:] = (ck[1:] != ck[:-1]) | (cc[1:] != cc[:-1])
        seg = np.cumsum(new_seg) - 1
        # running max of `last` within each segment; rank-encoded so segments cannot mix
        uniq, rank = np.unique(la, return_inverse=True)
        u = len(uniq)
        enc = rank.astype(np.int64) + seg * u
        run_last = uniq[np.maximum.accumulate(enc) - seg * u]
        brk = new_seg.copy()
        brk[1:] |= st[1:] > run_last[:-1] + gap
        chunk = np.cumsum(brk) - 1
        sess = np.empty(n, np.int64)
        sess[order] = chunk
        return sess, order[np.flatnonzero(brk)]

    # -- emission -----------------------------------------------------------------

    def _emit(self) -> pa.Table:
        state = self._state
        if state is None or self._wm is None or state.num_rows == 0:
            return self._empty()
        wm = self._wm
        we = _np(state[_WE])
        due = (we <= wm) & _np(state[_DIRTY]).astype(bool)
        out = self._finalise(state.filter(pa.array(due))) if due.any() else self._empty()
        if due.any():
            dirty = _np(state[_DIRTY]).astype(bool) & ~due
            state = state.set_column(state.schema.get_field_index(_DIRTY), _DIRTY, pa.array(dirty))
        gone = we + self._lateness_us <= wm
        if gone.any():
            evicted = _np(state[_ID])[gone]
            state = state.filter(pa.array(~gone))
            drop = pa.array(evicted)
            for i, side in self._sides.items():
                self._sides[i] = side.filter(pc.invert(pc.is_in(side[_ID], drop)))
            for sketches in self._hll.values():
                for gid in evicted.tolist():
                    sketches.pop(gid, None)
        self._state = state
        return out

    def _empty(self) -> pa.Table:
        """No rows, in the output schema once a batch fixed it."""
        state = self._state
        if state is None:
            return pa.table({})
        cached = self._out_schema
        if cached is None or cached[1] != self._tz or not cached[0].equals(state.schema):
            cached = (state.schema, self._tz, self._finalise(state.slice(0, 0)).schema)
            self._out_schema = cached
        return cached[2].empty_table()

    def _finalise(self, rows: pa.Table) -> pa.Table:
        """State rows → output rows (names, types, order)."""
        spec = self.spec
        sort = [(_WS, "ascending"), (_WE, "ascending")] + [(k, "ascending") for k in self._kcols]
        try:
            rows = rows.take(pc.sort_indices(rows, sort_keys=sort))
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            rows = rows.take(pc.sort_indices(rows, sort_keys=sort[:2]))
        ts_type = pa.timestamp("us", tz=self._tz)
        cols: dict[str, Any] = {
            spec.window_start_column: rows[_WS].cast(ts_type),
            spec.window_end_column: rows[_WE].cast(ts_type),
        }
        if isinstance(spec, SessionWindow):
            keys = [rows[k] for k in self._kcols]
            cols[spec.session_id_column] = pa.array(_session_ids(keys, _np(rows[_WS])), pa.uint64())
        for name, k in zip(self._keys, self._kcols, strict=True):
            cols[name] = rows[k]
        for a in self._aggs:
            if a.kind == "avg":
                total = rows[a.acc].cast(pa.float64())
                count = rows[a.acc_n]
                cols[a.name] = pc.if_else(
                    pc.greater(count, 0),
                    pc.divide(total, pc.max_element_wise(count, 1).cast(pa.float64())),
                    pa.scalar(None, pa.float64()),
                )
            elif a.kind == "hll":
                sketches = self._hll[a.index]
                est = [
                    0 if (s := sketches.get(gid)) is None else round(s.get_estimate())
                    for gid in _np(rows[_ID]).tolist()
                ]
                cols[a.name] = pa.array(est, pa.int64())
            else:
                cols[a.name] = rows[a.acc]
        return pa.table(cols)


# -- helpers ------------------------------------------------------------------------


def _req(column: str | None) -> str:
    assert column is not None  # _compile requires a column for every agg but count
    return column


def _np(values: Any) -> Any:
    """An Arrow array / chunked array without nulls as a numpy array."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values.to_numpy(zero_copy_only=False)


def _summable(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t))


def _sum_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_unsigned_integer(t):
        return pa.uint64()
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    return t  # decimal: Arrow sums decimals in their own type


def _avg_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_integer(t):
        return _sum_type(t)  # exact integer sum, divided once at emission
    return pa.float64()


def _hll_values(values: pa.Array) -> list[Any] | None:
    """Values as the Python ints / floats / strs the sketch takes; ``None``: unsupported."""
    t = values.type
    if (
        pa.types.is_integer(t)
        or pa.types.is_boolean(t)
        or (pa.types.is_temporal(t) and not pa.types.is_interval(t))
    ):
        return list(_int64_bits(values).tolist())
    if pa.types.is_floating(t):
        return list(values.cast(pa.float64()).to_numpy(zero_copy_only=False).tolist())
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return list(values.to_pylist())
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return [b.hex() for b in values.to_pylist()]
    if pa.types.is_decimal(t):
        return list(values.cast(pa.string()).to_pylist())
    return None


def _int64_bits(values: pa.Array) -> I64:
    """Integer-like values (ints, bools, dates, times, timestamps, durations) as int64,
    uint64 by its bits, nulls as 0."""
    t = values.type
    if pa.types.is_uint64(t):
        raw = values.fill_null(0).to_numpy(zero_copy_only=False)
        return np.asarray(raw, dtype=np.uint64).view(np.int64)
    if pa.types.is_date32(t) or pa.types.is_time32(t):
        values = values.cast(pa.int32())
    raw = values.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
    return np.asarray(raw, dtype=np.int64)


def _group_ids(table: pa.Table, keys: list[str]) -> I64:
    """A dense group number for every row of ``table`` by ``keys`` (nulls group together)."""
    n = table.num_rows
    t = table.select(keys).append_column(_ORD, pa.array(np.arange(n, dtype=np.int64)))
    lists = t.group_by(keys, use_threads=False).aggregate([(_ORD, "list")])[f"{_ORD}_list"]
    lists = lists.combine_chunks()
    out = np.empty(n, np.int64)
    out[_np(pc.list_flatten(lists))] = _np(pc.list_parent_indices(lists))
    return out


def _remap_ids(side: pa.Table, remap: dict[int, int]) -> pa.Table:
    old = pa.array(list(remap), pa.int64())
    new = pa.array(list(remap.values()), pa.int64())
    where = pc.index_in(side[_ID], old)
    ids = pc.coalesce(pc.take(new, where), side[_ID])
    return side.set_column(side.schema.get_field_index(_ID), _ID, ids)


# SplitMix64 finaliser: a fixed, well-mixed 64-bit permutation (stable forever).
_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), 0x9E3779B97F4A7C15


def _mix(x: U64) -> U64:
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _hash_column(col: Any) -> U64:
    """A stable 64-bit hash of each value; nulls hash to a constant."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    n = len(col)
    if pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_temporal(t):
        h = _mix(_int64_bits(col).view(np.uint64))
    elif pa.types.is_floating(t):
        f = np.asarray(col.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False))
        f = np.where(f == 0.0, 0.0, f)  # -0.0 and 0.0 are one key
        h = _mix(f.astype(np.float64).view(np.uint64))
    else:
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
            col = col.cast(pa.string())
        enc = pc.dictionary_encode(col)
        words = [
            int.from_bytes(
                hashlib.blake2b(v if isinstance(v, bytes) else v.encode(), digest_size=8).digest(),
                "little",
            )
            for v in enc.dictionary.to_pylist()
        ]
        table = np.asarray(words, dtype=np.uint64)
        codes = np.asarray(enc.indices.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        h = table[codes] if len(table) else np.zeros(n, np.uint64)
    if col.null_count:
        h = np.where(_np(pc.is_valid(col)), h, np.uint64(_GOLD))
    return np.asarray(h, dtype=np.uint64)


def _session_ids(keys: list[Any], start: I64) -> U64:
    """``hash(group key values, session start)`` as ``uint64``, the same in every process."""
    h = _mix(np.asarray(start, dtype=np.int64).view(np.uint64) ^ np.uint64(_GOLD))
    for col in keys:
        h = _mix(h ^ _hash_column(col))
    return h


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1_000_000, UTC).isoformat()


def _read_ipc(piece: memoryview) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(piece)).read_all()


def _expect(table: pa.Table, what: str, names: list[str], ints: set[str]) -> pa.Table:
    """``table`` when it has these columns, ``ints`` of them int64; else ValueError."""
    if table.column_names != names:
        raise ValueError(f"'{what}' has columns {table.column_names}, expected {names}")
    for name in ints:
        if table.schema.field(name).type != pa.int64():
            raise ValueError(f"'{what}' column {name} is {table.schema.field(name).type}")
    return table


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
