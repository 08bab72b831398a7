"""Window assignment: which windows a row joins (tumbling, hopping), which rows
are late, which session an item belongs to, and a session's stable id.

All of it is numpy over whole batches; the only Python loop is per distinct
string / binary group key value when hashing session ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluice.config.spec import HoppingWindow, SessionWindow, TumblingWindow
from sluice.engine.stages.window.columns import I64, LAST, ORD, U64, WS, int64_bits, to_np


@dataclass(frozen=True, slots=True)
class Assigned:
    """The accepted (row, window) pairs of a batch and its late rows."""

    rows: I64 | None
    """The input row of every pair; ``None``: every row once, in order."""
    starts: I64
    """The window start of every pair (µs)."""
    late: I64
    """Sorted indices of the rows that joined no window."""


def assign_fixed(spec: TumblingWindow | HoppingWindow, ts: I64, ref: int | None) -> Assigned:
    """Tumbling / hopping windows of the rows with event times ``ts`` (µs).

    A (row, window) pair is late when ``end <= ref`` (``ref`` is the
    watermark minus the allowed lateness, ``None``: nothing is late). A row is
    late when its only window (tumbling) or its newest one (hopping) is; the
    older late windows of a hopping row are skipped silently.
    """
    d = spec.duration_ms * 1000
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
        return Assigned(rows[keep], starts[keep], late)
    ws = ts // d * d
    if ref is not None:
        ok = ws + d > ref
        if not ok.all():
            sel = np.flatnonzero(ok).astype(np.int64)
            return Assigned(sel, ws[sel], np.flatnonzero(~ok).astype(np.int64))
    return Assigned(None, ws, np.empty(0, np.int64))


def assign_late_sessions(ts: I64, ref: int | None) -> Assigned:
    """Sessions: a row is late when ``ts <= ref``; ``starts`` are the accepted
    rows' event times (each row starts as a session of its own)."""
    if ref is not None:
        ok = ts > ref
        if not ok.all():
            sel = np.flatnonzero(ok).astype(np.int64)
            return Assigned(sel, ts[sel], np.flatnonzero(~ok).astype(np.int64))
    return Assigned(None, ts, np.empty(0, np.int64))


def group_ids(table: pa.Table, keys: list[str]) -> I64:
    """A dense group number for every row of ``table`` by ``keys`` (nulls group together)."""
    n = table.num_rows
    t = table.select(keys).append_column(ORD, pa.array(np.arange(n, dtype=np.int64)))
    lists = t.group_by(keys, use_threads=False).aggregate([(ORD, "list")])[f"{ORD}_list"]
    lists = lists.combine_chunks()
    out = np.empty(n, np.int64)
    out[to_np(pc.list_flatten(lists))] = to_np(pc.list_parent_indices(lists))
    return out


def sessionise(spec: SessionWindow, items: pa.Table, kcols: list[str]) -> tuple[I64, I64]:
    """Assign every item (open session or new row) to a session.

    Per group key (``kcols``), items whose spans are at most ``gap_ms`` apart
    are one session, never across a multiple of ``max_session_duration_ms``.
    Returns the session number of each item and the index of each session's
    first item (by start).
    """
    gap = spec.gap_ms * 1000
    n = items.num_rows
    start = to_np(items[WS])
    last = to_np(items[LAST])
    cell = start // (spec.max_session_duration_ms * 1000)
    key = group_ids(items, kcols)
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


def session_ends(spec: SessionWindow, start: I64, last: I64) -> I64:
    """A session's end: the earliest event time that can no longer join it."""
    cap = spec.max_session_duration_ms * 1000
    return np.minimum(last + spec.gap_ms * 1000, (start // cap + 1) * cap)


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
        h = _mix(int64_bits(col).view(np.uint64))
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
        h = np.where(to_np(pc.is_valid(col)), h, np.uint64(_GOLD))
    return np.asarray(h, dtype=np.uint64)


def session_ids(keys: list[Any], start: I64) -> U64:
    """``hash(group key values, session start)`` as ``uint64``, the same in every process."""
    h = _mix(np.asarray(start, dtype=np.int64).view(np.uint64) ^ np.uint64(_GOLD))
    for col in keys:
        h = _mix(h ^ _hash_column(col))
    return h
