"""The window stage: folds batches into open windows, emits what the watermark
closed, returns late rows, and snapshots / restores its state (semantics in the
package docstring)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from sluice.config.spec import SessionWindow, Window
from sluice.engine.stages.snapshots import ipc_stream
from sluice.engine.stages.window import snapshot
from sluice.engine.stages.window.aggregates import compile_aggregates
from sluice.engine.stages.window.assign import (
    Sessions,
    assign_fixed,
    assign_late_sessions,
    session_ids,
    sessionise,
)
from sluice.engine.stages.window.columns import (
    DIRTY,
    EMS,
    I64,
    ID,
    SESS,
    WE,
    WS,
    first_line,
    to_np,
)
from sluice.engine.stages.window.state import Union, WindowState
from sluice.engine.watermark import to_micros
from sluice.errors import StageError


@dataclass
class WindowOutput:
    """What one :meth:`WindowStage.process` or :meth:`WindowStage.advance` call yields."""

    emitted: pa.Table
    """Rows to write (see the package docstring for columns, types and order).
    Empty, with no columns, until a batch fixed the output schema."""
    late: npt.NDArray[np.int64]
    """Sorted indices into the input table of the rows rejected as late
    (policy ``drop`` or ``dlq``; under ``reopen``, rows later than the allowed
    lateness). Always empty from :meth:`WindowStage.advance`."""


class WindowStage:
    """Event-time window aggregation for one pipeline's ``[transform.window]``.

    Not thread-safe: the run loop calls it from one task at a time. Call
    :meth:`open` before the first batch; :meth:`close` drops the state.
    """

    STATE_KEY: ClassVar[str] = "window"
    """The one key of :meth:`snapshot`'s mapping."""

    def __init__(self, spec: Window, pipeline: str) -> None:
        self.spec = spec
        self.pipeline = pipeline
        self._aggs = compile_aggregates(spec.aggregations)
        self._keys = list(spec.group_by)
        self._session = isinstance(spec, SessionWindow)
        if self._session and not self._keys:
            raise StageError("window: a session window needs at least one group_by column")
        self._lateness_us = (
            (spec.allowed_lateness_ms or 0) * 1000 if spec.late_data == "reopen" else 0
        )
        self._store = WindowState(self._aggs, self._keys, self._session)
        self._open = False
        self._reset()

    def _reset(self) -> None:
        self._store.reset()
        self._wm: int | None = None
        self._seq = 0  # arrival counter: ties on event time are broken by it
        self._checked: pa.Schema | None = None
        self._tz: str | None = "UTC"
        # the output schema, cached for the state schema and time zone it was made for
        self._out_schema: tuple[pa.Schema, str | None, pa.Schema] | None = None

    # -- lifecycle ------------------------------------------------------------

    def open(self) -> None:
        """Start with empty state and no watermark.

        Raises :class:`MissingDependencyError` when an aggregate needs an
        optional package that is missing (approximate ``count_distinct``:
        ``datasketches``).
        """
        for a in self._aggs:
            a.require()
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
        wm = self._raised(watermark_us)
        if self._session:
            rows_t = None
            if n:
                self._check(data)
                ts = self._event_us(data)
                seq = np.arange(self._seq, self._seq + n, dtype=np.int64)
                got = assign_late_sessions(ts, self._lateness_ref())
                late = got.late
                if got.rows is None or len(got.rows):
                    rows_t = self._store.row_items(data, got.rows, ts, seq, got.starts, got.starts)
            try:
                emitted = self._step_sessions(rows_t, wm)
            except pa.ArrowException as exc:  # e.g. min over a type Arrow cannot order
                raise StageError(f"window: {first_line(exc)}") from exc
            self._seq += n
            self._wm = wm
            return WindowOutput(emitted, late)
        if n:
            self._check(data)
            ts = self._event_us(data)
            seq = np.arange(self._seq, self._seq + n, dtype=np.int64)
            try:
                late = self._fold_fixed(data, ts, seq)
            except pa.ArrowException as exc:  # e.g. min over a type Arrow cannot order
                raise StageError(f"window: {first_line(exc)}") from exc
            self._seq += n
        self._wm = wm
        return WindowOutput(self._emit(), late)

    def _raised(self, watermark_us: int | None) -> int | None:
        """The stage's watermark raised to ``watermark_us`` (watermarks only advance)."""
        if watermark_us is None:
            return self._wm
        return watermark_us if self._wm is None else max(self._wm, watermark_us)

    def advance(self, watermark_us: int) -> WindowOutput:
        """Idle tick: raise the watermark to ``watermark_us`` and emit what it closed.

        Also how a restarted pipeline restores the watermark it had committed
        with before replaying: rows of windows it closed are then late.
        """
        if not self._open:
            raise StageError("window: the stage is not open")
        wm = self._raised(watermark_us)
        if self._session:
            # the same watermark again settles and emits nothing new
            emitted = self._empty() if wm == self._wm else self._step_sessions(None, wm)
        else:
            self._wm = wm
            emitted = self._emit()
        self._wm = wm
        return WindowOutput(emitted, np.empty(0, np.int64))

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
        return self._store.open_floor_us()

    def state_size(self) -> int:
        """Open (window, group) entries (sessions: open sessions), for a gauge."""
        return self._store.size()

    def active_windows(self) -> int:
        """Distinct open windows (sessions: open sessions), for the windows-active gauge."""
        return self._store.windows()

    # -- snapshots --------------------------------------------------------------

    def snapshot(self) -> dict[str, bytes]:
        """Everything :meth:`restore` needs to go on where this stage is, as
        state key → blob: ``{"window": blob}``.

        The blob (format in :mod:`.snapshot`) holds the open (window, group)
        table, the aggregates' side state (exact count_distinct values, HLL
        sketches), the watermark, the arrival counter, the next group id and
        the event time's time zone, with the window configuration they depend
        on; the tables as Arrow IPC, zstd-compressed when available.

        Does not change the state. Vectorised but for one ``serialize_compact``
        call per HLL sketch (one per open group of each approximate
        ``count_distinct``). Raises :class:`StageError` when the stage is not open.
        """
        if not self._open:
            raise StageError("window: the stage is not open")
        store = self._store
        pieces: list[tuple[str, bytes]] = []
        if store.table is not None:
            pieces.append(("state", ipc_stream(store.table)))
        for a in store.side_aggs:
            table = a.to_table(store.sides[a.index])
            if table is not None:
                pieces.append((a.piece, ipc_stream(table)))
        meta = {
            "config": self._config_facts(),
            "watermark_us": self._wm,
            "seq": self._seq,
            "next_id": store.next_id,
            "tz": self._tz,
        }
        return {self.STATE_KEY: snapshot.encode(meta, pieces)}

    def snapshot_delta(self) -> tuple[dict[str, bytes], set[str], None]:
        """The whole :meth:`snapshot` every time (one key, rewritten whole)."""
        state = self.snapshot()
        return state, set(state), None

    def checkpointed(self, token: None) -> None:
        """Nothing is tracked between checkpoints."""

    def restore(self, state: Mapping[str, bytes]) -> None:
        """Load a :meth:`snapshot` into this open stage, which must not have
        folded a row yet (a watermark alone is fine: the stage keeps the larger
        of its own and the snapshot's, as watermarks only advance).

        Reads ``state["window"]`` and ignores every other key; without that
        key the stage stays as it is. After it the stage behaves as the
        snapshotting stage did right after :meth:`snapshot`: the same rows in,
        the same rows and late indices out. Emits nothing; a raised watermark
        emits on the next call. Raises :class:`StageError` for a stage that is
        not open or has folded rows, a blob that is no window snapshot, an
        unknown format version, a truncated or damaged blob, or a snapshot of
        another window configuration (kind, durations, group_by,
        aggregations), and then leaves the state untouched.
        """
        if not self._open:
            raise StageError("window: the stage is not open")
        blob = state.get(self.STATE_KEY)
        if blob is None:
            return
        store = self._store
        if self._seq or store.table is not None:
            raise StageError(
                "window: restore needs a stage that has not folded any rows yet; "
                "restore a snapshot before the first batch"
            )
        snap = snapshot.decode(blob, self._config_facts())
        try:
            table, sides = self._read_pieces(snap.pieces, snap.version)
        except (pa.ArrowException, OSError, ValueError, IndexError, RuntimeError) as exc:
            raise StageError(f"window: the snapshot is damaged: {first_line(exc)}") from exc
        # -- nothing below raises: commit ------------------------------------------
        store.table, store.sides, store.next_id = table, sides, snap.next_id
        store.open_sessions = None  # counted when asked
        self._seq, self._tz = snap.seq, snap.tz
        self._checked = self._out_schema = None  # caches: the next batch checks its schema again
        if snap.watermark_us is not None:
            wm = snap.watermark_us
            self._wm = wm if self._wm is None else max(self._wm, wm)

    def _config_facts(self) -> dict[str, Any]:
        return snapshot.config_facts(self.spec, self._keys, self._aggs)

    def _read_pieces(
        self, pieces: dict[str, memoryview], version: int
    ) -> tuple[pa.Table | None, dict[int, Any]]:
        """The snapshot's tables, checked against this stage's layout (a format 1
        session table gains ``__ems``: its sessions become settled items)."""
        store = self._store
        known = {"state", *(a.piece for a in store.side_aggs)}
        unknown = sorted(set(pieces) - known)
        if unknown:
            raise ValueError(f"unknown piece(s) {', '.join(unknown)}")
        table = None
        if "state" in pieces:
            table = snapshot.read_ipc(pieces["state"])
            if version == 1 and self._session and EMS not in table.column_names:
                # an emitted clean session was emitted under its own start
                clean = pc.invert(table[DIRTY])
                ems = pc.if_else(clean, table[WS], pa.scalar(None, pa.int64()))
                table = table.add_column(table.schema.get_field_index(WE) + 2, EMS, ems)
            snapshot.expect(table, "state", store.names, [WS, WE, ID])
        sides: dict[int, Any] = {}
        for a in store.side_aggs:
            piece = pieces.get(a.piece)
            sides[a.index] = a.empty() if piece is None else a.from_table(snapshot.read_ipc(piece))
        return table, sides

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
            if a.column is not None:
                a.check(data.schema.field(a.column).type)
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
        got = assign_fixed(spec, ts, self._lateness_ref())
        if got.rows is not None and len(got.rows) == 0:
            return got.late
        store = self._store
        ws = got.starts
        rows_t = store.row_items(data, got.rows, ts, seq, ws, ws + spec.duration_ms * 1000)
        items, n_state = store.with_state(rows_t)
        merged, row_group = store.merge(items, [WS, *store.kcols], n_state)
        merged = merged.select(store.names)
        store.check_groups(merged, spec.max_groups_per_window, self.pipeline)
        store.commit(merged, row_group, rows_t, {})
        return got.late

    def _step_sessions(self, rows_t: pa.Table | None, wm: int | None) -> pa.Table:
        """Sessions: fold the accepted rows ``rows_t`` (``None``: none) in, settle,
        emit and evict against the watermark ``wm``; return the emitted rows.

        Every step re-derives the sessions of the open items and the new rows
        (:func:`sessionise`), so a session's boundaries follow from the rows
        alone. A session whose start is at most ``ref = wm - L`` is *settled*:
        every later accepted row has an event time above ``ref``, so nothing
        can come before its start or split it any more, and its items fold
        into one row. The items of a session starting after ``ref`` stay one
        row each: a later row may still bridge it into an earlier session and
        move where the cap splits it. A session is emitted when ``end <= wm``
        and it changed since it was last emitted (a new item, or an item last
        emitted under another start), and dropped when ``end + L <= wm``
        (then it is settled). Raises :class:`StageError` (more open sessions
        than the cap, an exact count_distinct over its cap) before any change.
        """
        spec = self.spec
        assert isinstance(spec, SessionWindow)
        store = self._store
        n_new = 0 if rows_t is None else rows_t.num_rows
        if rows_t is not None and n_new:
            ids = np.arange(store.next_id, store.next_id + n_new, dtype=np.int64)
            rows_t = rows_t.set_column(rows_t.schema.get_field_index(ID), ID, pa.array(ids))
            items, n_state = store.with_state(rows_t)
        elif store.table is None or store.table.num_rows == 0:
            return self._empty()
        else:
            items, n_state = store.table, store.table.num_rows
            rows_t = items.slice(0, 0)
        s = sessionise(spec, items, store.kcols)
        n, n_sess = items.num_rows, len(s.start)
        ref = None if wm is None else wm - self._lateness_us
        settled = np.zeros(n_sess, bool) if ref is None else s.start <= ref
        gone = np.zeros(n_sess, bool) if ref is None else s.end <= ref
        if n_sess - int(gone.sum()) > spec.max_groups_per_window:
            raise StageError(
                f"max_groups_per_window={spec.max_groups_per_window} reached: "
                f"{n_sess - int(gone.sum())} open sessions (pipeline '{self.pipeline}')"
            )
        # changed since last emitted: a new item, or one last emitted under another start
        ems = items[EMS]
        item_start = s.start[s.sess]
        changed = to_np(items[DIRTY]).astype(bool) | ~to_np(pc.is_valid(ems)).astype(bool)
        changed |= np.asarray(to_np(ems.fill_null(0)), np.int64) != item_start
        dirty = np.logical_or.reduceat(changed[s.order], s.first)
        due = np.zeros(n_sess, bool) if wm is None else (s.end <= wm) & dirty
        # a settled session folds into one row; an unsettled one keeps an item per row
        group = np.where(settled[s.sess], s.sess, n_sess + np.arange(n, dtype=np.int64))
        by = [SESS, *store.kcols]  # a session has one key: the keys only carry through
        merged, group_of = store.merge(items.append_column(SESS, pa.array(group)), by, 0)
        g_num = np.asarray(to_np(merged[SESS]), np.int64)
        g_sess = np.where(g_num < n_sess, g_num, s.sess[np.maximum(g_num - n_sess, 0)])
        # state order: by session, then group (the merge runs on threads: fix the order)
        g_order = np.lexsort((g_num, g_sess))
        merged, g_num, g_sess = merged.take(pa.array(g_order)), g_num[g_order], g_sess[g_order]
        g_settled = settled[g_sess]
        start = np.where(g_settled, s.start[g_sess], to_np(merged[WS]))
        ems = np.where(g_settled, s.start[g_sess], to_np(merged[EMS].fill_null(0)))
        ems_ok = g_settled | to_np(pc.is_valid(merged[EMS])).astype(bool)
        g_dirty = np.where(g_settled, dirty[g_sess], to_np(merged[DIRTY]).astype(bool))
        merged = self._set(merged, WS, pa.array(start, pa.int64()))
        merged = self._set(merged, EMS, pa.array(ems, pa.int64(), mask=~ems_ok))
        merged = self._set(merged, DIRTY, pa.array(g_dirty))
        merged = merged.append_column(WE, pa.array(s.end[g_sess], pa.int64()))
        merged = merged.select(store.names)
        row_group = np.empty(0, np.int64)
        remap: dict[int, int] = {}
        if store.side_aggs:
            position = np.empty(len(g_order), np.int64)
            position[g_order] = np.arange(len(g_order))
            group_of = position[group_of]
            row_group = group_of[n_state:]
            if n_state:  # old ids -> the id their row keeps (items folded into one)
                old = np.asarray(to_np(items[ID].slice(0, n_state)), np.int64)
                kept = np.asarray(to_np(merged[ID]), np.int64)[group_of[:n_state]]
                moved = old != kept
                remap = dict(zip(old[moved].tolist(), kept[moved].tolist(), strict=True))
        g_due = due[g_sess]
        out_rows, union = self._due_rows(merged, g_sess[g_due], g_due, s)
        unions = store.commit(merged, row_group, rows_t, remap, union)
        # -- nothing below raises ----------------------------------------------------
        store.next_id += n_new  # the new rows' ids, also those folded into an older one
        emitted = self._empty()
        if out_rows is not None:
            for agg in store.side_aggs:
                acc = unions[agg.index][1]
                if acc is not None:
                    out_rows = self._set(out_rows, agg.acc, acc)
            emitted = self._finalise(out_rows, {i: u[0] for i, u in unions.items()})
        g_gone = gone[g_sess]
        if g_due.any() or g_gone.any():
            table = store.table
            assert table is not None
            table = self._set(table, DIRTY, pa.array(g_dirty & ~g_due))
            ems_now = np.where(g_due, s.start[g_sess], ems)
            table = self._set(table, EMS, pa.array(ems_now, pa.int64(), mask=~(ems_ok | g_due)))
            if g_gone.any():
                evicted = np.asarray(to_np(table[ID]), np.int64)[g_gone]
                table = table.filter(pa.array(~g_gone))
                for agg in store.side_aggs:
                    store.sides[agg.index] = agg.evict(store.sides[agg.index], evicted)
            store.table = table
        store.open_sessions = n_sess - int(gone.sum())
        return emitted

    @staticmethod
    def _set(table: pa.Table, name: str, values: Any) -> pa.Table:
        return table.set_column(table.schema.get_field_index(name), name, values)

    def _due_rows(
        self, merged: pa.Table, sess: I64, due: npt.NDArray[np.bool_], s: Sessions
    ) -> tuple[pa.Table | None, Union | None]:
        """The state rows of the due sessions (``due``: a mask over ``merged``,
        whose due rows belong to sessions ``sess``), one row per session, and
        the union their side aggregates need; ``(None, None)`` when none is due."""
        if not due.any():
            return None, None
        store = self._store
        rows = merged.filter(pa.array(due))
        members = np.asarray(to_np(rows[ID]), np.int64)
        if len(np.unique(sess)) < len(sess):  # a session of several items: merge them
            by = [SESS, *store.kcols]
            rows, _ = store.merge(rows.append_column(SESS, pa.array(sess)), by, 0)
            one = np.asarray(to_np(rows[SESS]), np.int64)
            rows = rows.take(pa.array(np.argsort(one, kind="stable")))
            one = np.sort(one)
            rows = rows.append_column(WE, pa.array(s.end[one], pa.int64()))
            rows = self._set(rows, WS, pa.array(s.start[one], pa.int64()))
            ids = np.asarray(to_np(rows[ID]), np.int64)
            kept = ids[np.searchsorted(one, sess)]
        else:
            ids = kept = members
        if not store.side_aggs:
            return rows, None
        moved = members != kept
        remap = dict(zip(members[moved].tolist(), kept[moved].tolist(), strict=True))
        return rows, Union(rows, ids, members, remap)

    # -- emission -----------------------------------------------------------------

    def _emit(self) -> pa.Table:
        store = self._store
        if store.table is None or self._wm is None or store.table.num_rows == 0:
            return self._empty()
        due = store.take_due(self._wm)
        # finalise before evicting: the side state of a due row may go with it
        out = self._empty() if due is None else self._finalise(due)
        store.evict(self._wm, self._lateness_us)
        return out

    def _empty(self) -> pa.Table:
        """No rows, in the output schema once a batch fixed it."""
        state = self._store.table
        if state is None:
            return pa.table({})
        cached = self._out_schema
        if cached is None or cached[1] != self._tz or not cached[0].equals(state.schema):
            cached = (state.schema, self._tz, self._finalise(state.slice(0, 0)).schema)
            self._out_schema = cached
        return cached[2].empty_table()

    def _finalise(self, rows: pa.Table, sides: dict[int, Any] | None = None) -> pa.Table:
        """State rows → output rows (names, types, order); ``sides``: the side
        state to read instead of the stage's (the union of a session's items)."""
        spec = self.spec
        store = self._store
        sides = store.sides if sides is None else sides
        sort = [(WS, "ascending"), (WE, "ascending")] + [(k, "ascending") for k in store.kcols]
        try:
            rows = rows.take(pc.sort_indices(rows, sort_keys=sort))
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            rows = rows.take(pc.sort_indices(rows, sort_keys=sort[:2]))
        ts_type = pa.timestamp("us", tz=self._tz)
        cols: dict[str, Any] = {
            spec.window_start_column: rows[WS].cast(ts_type),
            spec.window_end_column: rows[WE].cast(ts_type),
        }
        if isinstance(spec, SessionWindow):
            keys = [rows[k] for k in store.kcols]
            cols[spec.session_id_column] = pa.array(session_ids(keys, to_np(rows[WS])), pa.uint64())
        for name, k in zip(self._keys, store.kcols, strict=True):
            cols[name] = rows[k]
        for a in self._aggs:
            cols[a.name] = a.finalise(rows, sides.get(a.index))
        return pa.table(cols)
