"""The keyed store of open windows: one row per open (window, group) with its
partial aggregates, the aggregates' side state, merging a batch in, the
group caps, and eviction.

A batch is merged by one hash aggregation over the state rows and the batch's
rows (each a single-row partial state) with the aggregates' merge functions,
so a batch costs O(batch + open state).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluice.engine.stages.window.aggregates import Aggregate, Fold, SideAggregate
from sluice.engine.stages.window.columns import (
    DIRTY,
    EMS,
    FSEQ,
    FTS,
    I64,
    ID,
    LAST,
    LSEQ,
    LTS,
    ORD,
    RF,
    RL,
    SESS,
    WE,
    WS,
    concat_cast,
    iso,
    to_np,
)
from sluice.errors import StageError


@dataclass(frozen=True, slots=True)
class Union:
    """Rows that each unite the side state of several state rows (a session of several items)."""

    rows: pa.Table
    """The united rows (for error messages)."""
    ids: I64
    """The id of each united row: the smallest id of its members."""
    members: I64
    """The ids of every member."""
    remap: dict[int, int]
    """Member id → its united row's id, for the members whose id differs."""


class WindowState:
    """The open (window, group) table and the side state of its aggregates.

    Columns, in order: ``__ws``, ``__we``, ``__last`` and ``__ems``
    (sessions), the group keys ``__k<j>``, ``__dirty`` (to be emitted),
    ``__id`` (stable while the row is open; side state is keyed by it), the
    first / last event time and arrival when an aggregate is ``ordered``, then
    each aggregate's state columns. Every method that can fail does before it
    mutates anything.

    Sessions: a row is an *item*, a part of one open session: either a whole
    session whose start is settled (folded into one row) or a single row of a
    session whose start is not settled yet (kept apart, because a later row
    may still move that session's start and with it where the cap splits it).
    ``__we`` is the end of the item's session, ``__ems`` the start of the
    session the item was last emitted in.
    """

    def __init__(self, aggs: list[Aggregate], keys: list[str], session: bool) -> None:
        self.aggs = aggs
        self.keys = keys
        self.kcols = [f"__k{j}" for j in range(len(keys))]
        self.session = session
        self.ordered = any(a.ordered for a in aggs)
        self.side_aggs: list[SideAggregate[Any]] = sorted(
            (a for a in aggs if isinstance(a, SideAggregate)), key=lambda a: a.rank
        )
        self.names = self._names()
        self.reset()

    def reset(self) -> None:
        """Nothing open."""
        self.table: pa.Table | None = None
        """``None`` until the first fold fixes the schema."""
        self.sides: dict[int, Any] = {a.index: a.empty() for a in self.side_aggs}
        self.next_id = 0
        self.open_sessions: int | None = 0
        """Sessions: the open sessions, ``None`` when not counted yet (after a restore)."""

    def _names(self) -> list[str]:
        names = [WS, WE]
        if self.session:
            names += [LAST, EMS]
        names += [*self.kcols, DIRTY, ID]
        if self.ordered:
            names += [FTS, FSEQ, LTS, LSEQ]
        for a in self.aggs:
            names += a.state_columns()
        return names

    # -- a batch in -----------------------------------------------------------------

    def row_items(
        self, data: pa.Table, sel: I64 | None, ts: I64, seq: I64, ws: I64, we: I64
    ) -> pa.Table:
        """The accepted (row, window) pairs (rows ``sel`` of ``data``, ``None``:
        all) as single-row partial states, then the side aggregates' input
        values (``__x<i>``)."""
        taken: dict[str, Any] = {}
        picks = None if sel is None else pa.array(sel)

        def col(name: str) -> Any:
            if name not in taken:
                taken[name] = data[name] if picks is None else data[name].take(picks)
            return taken[name]

        m = len(ws)
        t = ts if sel is None else ts[sel]
        s = seq if sel is None else seq[sel]
        cols: dict[str, Any] = {WS: pa.array(ws), WE: pa.array(we)}
        if self.session:
            cols[LAST] = pa.array(t)
            cols[EMS] = pa.nulls(m, pa.int64())
        for k, name in zip(self.kcols, self.keys, strict=True):
            cols[k] = col(name)
        cols[DIRTY] = pa.array(np.ones(m, dtype=bool))
        cols[ID] = pa.nulls(m, pa.int64())
        if self.ordered:
            cols[FTS], cols[FSEQ] = pa.array(t), pa.array(s)
            cols[LTS], cols[LSEQ] = cols[FTS], cols[FSEQ]
        for a in self.aggs:
            cols.update(a.items(col, m))
        table = pa.table(cols)
        for a in self.aggs:
            if isinstance(a, SideAggregate):
                table = table.append_column(a.beside, col(a.input))
        return table

    def with_state(self, rows_t: pa.Table) -> tuple[pa.Table, int]:
        """State rows first, then the new items, in one table of one schema;
        and the number of state rows."""
        items = rows_t.drop_columns([c for c in rows_t.column_names if c.startswith("__x")])
        state = self.table
        if state is None or state.num_rows == 0:
            return items, 0
        what = "the batch's column types changed while windows are open"
        return concat_cast(state, items, what), state.num_rows

    def merge(self, items: pa.Table, by: list[str], n_state: int) -> tuple[pa.Table, I64]:
        """Aggregate ``items`` by ``by`` with the merge functions.

        Returns the merged rows (with ``__id`` = the smallest old id, else a
        fresh one) and, with side aggregates, the index of each new item's
        (past the first ``n_state``) merged row.
        """
        n = items.num_rows
        specs: list[tuple[str, str]] = [(DIRTY, "any"), (ID, "min")]
        if not self.session:
            specs.append((WE, "min"))
        else:
            specs += [(WS, "min"), (LAST, "max"), (EMS, "min")]
        if self.ordered:
            fo = np.lexsort((to_np(items[FSEQ]), to_np(items[FTS])))
            lo = np.lexsort((to_np(items[LSEQ]), to_np(items[LTS])))
            rf = np.empty(n, np.int64)
            rf[fo] = np.arange(n)
            rl = np.empty(n, np.int64)
            rl[lo] = np.arange(n)
            items = items.append_column(RF, pa.array(rf)).append_column(RL, pa.array(rl))
            specs += [(RF, "min"), (RL, "max")]
        for a in self.aggs:
            specs += a.merge_functions()
        want_groups = bool(self.side_aggs)
        if want_groups:
            items = items.append_column(ORD, pa.array(np.arange(n, dtype=np.int64)))
            specs.append((ORD, "list"))
        g = items.group_by(by, use_threads=not want_groups).aggregate(specs)
        out: dict[str, Any] = {}
        for c in by:
            out[c] = g[c]
        names = {f"{c}_{f}": c for c, f in specs}
        for src, dst in names.items():
            if dst not in (RF, RL, ORD):
                out[dst] = g[src]
        old_ids = g[f"{ID}_min"]
        fresh = to_np(pc.is_null(old_ids)).astype(bool)
        new_ids = np.array(to_np(old_ids.fill_null(0)), dtype=np.int64)  # a writable copy
        fresh_at = np.flatnonzero(fresh)
        if self.session:
            # Threads make the group order vary: number new sessions in session
            # order, so ids, and with them which id a bridge keeps and the order of
            # an HLL union, are the same on every run.
            fresh_at = fresh_at[np.argsort(to_np(g[SESS])[fresh_at], kind="stable")]
        new_ids[fresh_at] = np.arange(self.next_id, self.next_id + len(fresh_at))
        out[ID] = pa.array(new_ids)
        if self.ordered:
            fi = pa.array(fo[to_np(g[f"{RF}_min"])])
            li = pa.array(lo[to_np(g[f"{RL}_max"])])
            out[FTS], out[FSEQ] = items[FTS].take(fi), items[FSEQ].take(fi)
            out[LTS], out[LSEQ] = items[LTS].take(li), items[LSEQ].take(li)
            for a in self.aggs:
                out.update(a.pick(items, fi, li))
        merged = pa.table(out)
        row_group = np.empty(0, np.int64)
        if want_groups:
            lists = g[f"{ORD}_list"].combine_chunks()
            pos = to_np(pc.list_flatten(lists))
            parent = to_np(pc.list_parent_indices(lists))
            group_of = np.empty(n, np.int64)
            group_of[pos] = parent
            row_group = group_of[n_state:]
        return merged, row_group

    def check_groups(self, merged: pa.Table, cap: int, pipeline: str) -> None:
        """Raise :class:`StageError` when a fixed window of ``merged`` has more
        than ``cap`` groups."""
        if merged.num_rows <= cap:
            return
        per = merged.group_by(WS).aggregate([(WS, "count"), (WE, "min")])
        counts = to_np(per[f"{WS}_count"])
        worst = int(np.argmax(counts))
        if counts[worst] > cap:
            start, end = int(per[WS][worst].as_py()), int(per[f"{WE}_min"][worst].as_py())
            raise StageError(
                f"max_groups_per_window={cap} reached: window [{iso(start)}, {iso(end)}) "
                f"has {int(counts[worst])} groups (pipeline '{pipeline}')"
            )

    def commit(
        self,
        merged: pa.Table,
        row_group: I64,
        rows_t: pa.Table,
        remap: dict[int, int],
        union: Union | None = None,
    ) -> dict[int, tuple[Any, pa.Array | None]]:
        """Fold the side state in, check its caps, then replace the state.

        With ``union``, also each side aggregate's state of the rows
        ``union`` describes (sessions to emit, each the union of its items'
        side states), as (side state, ``acc`` column or ``None``), without
        changing the stage's side state. Everything that can fail runs
        before the first mutation (the in-place side aggregates come last),
        so a failure leaves the state whole.
        """
        ids = np.asarray(merged[ID].to_numpy(), dtype=np.int64)
        row_ids = ids[row_group] if len(row_group) else np.empty(0, np.int64)
        sides: dict[int, Any] = {}
        unions: dict[int, tuple[Any, pa.Array | None]] = {}
        describe = partial(self._describe, merged)  # keys and windows: the same in every step
        for a in self.side_aggs:
            values = (
                rows_t[a.beside]
                if a.beside in rows_t.column_names
                else pa.chunked_array([], pa.null())  # no new rows
            )
            step = Fold(ids, row_ids, values, remap, describe)
            sides[a.index], acc = a.fold(self.sides[a.index], step)
            if acc is not None:
                merged = merged.set_column(merged.schema.get_field_index(a.acc), a.acc, acc)
            if union is not None:
                u = Fold(
                    union.ids,
                    np.empty(0, np.int64),
                    pa.chunked_array([], pa.null()),
                    union.remap,
                    partial(self._describe, union.rows),
                )
                unions[a.index] = a.fold(a.subset(sides[a.index], union.members), u)
        self.sides.update(sides)
        self.next_id = max(self.next_id, int(ids.max()) + 1) if len(ids) else self.next_id
        self.table = merged
        return unions

    def _describe(self, merged: pa.Table, j: int) -> str:
        keys = ", ".join(
            f"{name}={merged[k][j].as_py()!r}"
            for name, k in zip(self.keys, self.kcols, strict=True)
        )
        start, end = int(merged[WS][j].as_py()), int(merged[WE][j].as_py())
        return f"{keys or '(no group_by)'} in window [{iso(start)}, {iso(end)})"

    # -- emission -------------------------------------------------------------------

    def take_due(self, wm: int) -> pa.Table | None:
        """The dirty rows the watermark ``wm`` closed (``end <= wm``), now marked
        clean; ``None`` when nothing is due."""
        state = self.table
        assert state is not None
        dirty = to_np(state[DIRTY]).astype(bool)
        due = (to_np(state[WE]) <= wm) & dirty
        if not due.any():
            return None
        out = state.filter(pa.array(due))
        self.table = state.set_column(
            state.schema.get_field_index(DIRTY), DIRTY, pa.array(dirty & ~due)
        )
        return out

    def evict(self, wm: int, lateness_us: int) -> None:
        """Drop the rows, and their side state, past the lateness (``end +
        lateness_us <= wm``): no accepted row can reach them any more."""
        state = self.table
        assert state is not None
        gone = to_np(state[WE]) + lateness_us <= wm
        if gone.any():
            evicted = to_np(state[ID])[gone]
            self.table = state.filter(pa.array(~gone))
            for a in self.side_aggs:
                self.sides[a.index] = a.evict(self.sides[a.index], evicted)

    # -- gauges ---------------------------------------------------------------------

    def size(self) -> int:
        """Open (window, group) rows; sessions: open sessions."""
        if self.table is None:
            return 0
        if not self.session:
            return int(self.table.num_rows)
        if self.open_sessions is None:
            # the items of one session share its end, and one key's sessions never do
            self.open_sessions = self.table.group_by([WE, *self.kcols]).aggregate([]).num_rows
        return self.open_sessions

    def open_floor_us(self) -> int | None:
        """The smallest open window start (µs); ``None`` when nothing is open."""
        if self.table is None or self.table.num_rows == 0:
            return None
        return int(pc.min(self.table[WS]).as_py())

    def windows(self) -> int:
        """Distinct open windows (sessions: open sessions)."""
        if self.table is None or self.table.num_rows == 0:
            return 0
        if self.session:
            return self.size()
        return int(pc.count_distinct(self.table[WS]).as_py())
