"""The window state's internal column names and the Arrow / numpy helpers the
window modules share."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from sluice.errors import StageError

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

# Internal state columns. Group keys are stored as __k0, __k1, ... and an
# aggregation's partial state as __a<i>, so no user column name can collide
# with these.
WS, WE, LAST = "__ws", "__we", "__last"  # window start, end; session: last event time
DIRTY, ID = "__dirty", "__id"  # emit at the next chance; the (window, group) id
EMS = "__ems"  # session item: the start of the session it was last emitted in (null: never)
FTS, FSEQ, LTS, LSEQ = "__fts", "__fseq", "__lts", "__lseq"  # first / last event time, arrival
RF, RL, ORD, SESS, VAL = "__rf", "__rl", "__ord", "__sess", "__v"
SKETCH = "__sketch"


def to_np(values: Any) -> Any:
    """An Arrow array / chunked array without nulls as a numpy array."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values.to_numpy(zero_copy_only=False)


def int64_bits(values: pa.Array) -> I64:
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


def iso(us: int) -> str:
    """µs since the epoch as an ISO 8601 UTC instant, for error messages."""
    return datetime.fromtimestamp(us / 1_000_000, UTC).isoformat()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (Arrow's run on), for a StageError."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def concat_cast(base: pa.Table, more: pa.Table, what: str) -> pa.Table:
    """``base`` then ``more``, cast to ``base``'s schema; a :class:`StageError`
    ``window: <what>: <why>`` when it cannot be."""
    if not more.schema.equals(base.schema):
        try:
            more = more.cast(base.schema)
        except (pa.ArrowException, ValueError) as exc:
            raise StageError(f"window: {what}: {exc}") from exc
    return pa.concat_tables([base, more])
