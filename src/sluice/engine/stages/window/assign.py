"""Window assignment: which windows a row joins (tumbling, hopping), which rows
are late, which session an item belongs to, and a session's stable id.

All of it is numpy over whole batches; the only Python loops are per distinct
string / binary group key value when hashing session ids, and one step per
cap split of the longest gap run in :func:`sessionise` (each step over all
runs at once).
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
    rows' event times (each row is an item of its own until :func:`sessionise`)."""
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


@dataclass(frozen=True, slots=True)
class Sessions:
    """Items (open sessions' parts and new rows) assigned to sessions.

    Sessions are numbered in (group key, start) order and their items are
    contiguous in ``order``.
    """

    order: I64
    """The items sorted by (group key, start): ``order[p]`` is the item at position ``p``."""
    sess: I64
    """The session number of each item (by item index)."""
    first: I64
    """Each session's first position in ``order``."""
    start: I64
    """Each session's start: its first item's start (µs)."""
    last: I64
    """Each session's last event time (µs)."""
    end: I64
    """Each session's close boundary ``min(last + gap, start + cap)`` (µs)."""


def sessionise(spec: SessionWindow, items: pa.Table, kcols: list[str]) -> Sessions:
    """Assign every item to a session, as a scan of its key's items in start order.

    An item is a part of a session already folded (``__ws`` its start,
    ``__last`` its last event time) or one row (both its event time). Per
    group key (``kcols``) the scan opens a session at the first item; an item
    joins the current session when its start is at most ``gap_ms`` after the
    largest event time before it and before the session's start +
    ``max_session_duration_ms``; otherwise it opens the next session. The
    result depends only on the set of items, not on their order.

    Vectorised: the gap runs are one pass; the cap splits inside a run are
    found by a loop whose every step handles all runs at once and whose
    count is the largest number of sessions one gap run splits into.
    """
    gap = spec.gap_ms * 1000
    cap = spec.max_session_duration_ms * 1000
    n = items.num_rows
    start = to_np(items[WS])
    last = to_np(items[LAST])
    key = group_ids(items, kcols)
    order = _by_key_and_start(key, start)
    ck, st, la = key[order], start[order], last[order]
    new_key = np.empty(n, bool)
    new_key[0] = True
    new_key[1:] = ck[1:] != ck[:-1]
    seg = np.cumsum(new_key) - 1
    run_last = _running_max(la, seg)  # the largest `last` so far within each key
    opens = new_key.copy()
    opens[1:] |= st[1:] > run_last[:-1] + gap
    # cap splits: from each session's first item, the next session opens at the
    # run's first item starting at or after start + cap (a row exactly there too)
    run = np.cumsum(opens) - 1
    run_first = np.flatnonzero(opens)
    run_stop = np.append(run_first[1:], n)
    # a run's items are in start order: none splits unless its last item starts
    # at or after its first one + cap (the common case skips the search)
    if (st[run_stop - 1] >= st[run_first] + cap).any():
        s_uniq, s_rank = np.unique(st, return_inverse=True)
        width = len(s_uniq) + 1
        pos_key = run * width + s_rank.astype(np.int64).ravel()  # non-decreasing along `order`
        cur = run_first
        while len(cur):
            r = run[cur]
            at = np.searchsorted(s_uniq, st[cur] + cap)
            nxt = np.searchsorted(pos_key, r * width + at, "left")
            cur = nxt[nxt < run_stop[r]]
            opens[cur] = True
    first = np.flatnonzero(opens)
    sess_sorted = np.cumsum(opens) - 1
    sess = np.empty(n, np.int64)
    sess[order] = sess_sorted
    s_start = st[first]
    s_last = np.maximum.reduceat(la, first)
    s_end = np.minimum(s_last + gap, s_start + cap)
    return Sessions(order, sess, first, s_start, s_last, s_end)


def _by_key_and_start(key: I64, start: I64) -> I64:
    """The item positions sorted by group key, then start; items of one key
    with the same start in any order. That order changes nothing: such an
    item never opens a session (its start is at most the last event time
    before it), every later item of the key comes after all of them, and a
    session's start, last time and items are the same whatever their order.

    One sort of a combined key; two when the combination could overflow."""
    if not len(key):
        return np.empty(0, np.int64)
    k_low, low = int(key.min()), int(start.min())
    keys, span = int(key.max()) - k_low + 1, int(start.max()) - low + 1
    if keys * span < 2**62:
        order: I64 = np.argsort((key - k_low) * span + (start - low))
        return order
    pairs: I64 = np.lexsort((start, key))
    return pairs


def _running_max(values: I64, seg: I64) -> I64:
    """The running maximum of ``values`` within each segment (``seg``: the
    segment of each position, non-decreasing from 0), restarting at each.

    Each segment is offset above the ones before it so that one accumulate
    cannot carry a maximum across; when those offsets could overflow int64,
    the values are rank-encoded first (a sort)."""
    if not len(values):
        return values
    low = int(values.min())
    span = int(values.max()) - low + 1
    if span * (int(seg[-1]) + 1) < 2**62:
        shift = seg * span
        out: I64 = np.maximum.accumulate(values - low + shift) - shift + low
        return out
    uniq, rank = np.unique(values, return_inverse=True)
    u = len(uniq)
    enc = rank.astype(np.int64).ravel() + seg * u
    ranked: I64 = uniq[np.maximum.accumulate(enc) - seg * u]
    return ranked


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
