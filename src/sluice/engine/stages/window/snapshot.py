"""The window snapshot blob, format 2.

A header, then ``meta`` (UTF-8 JSON), then the pieces it lists, each an Arrow
IPC stream. The header is magic, format version, the length of ``meta`` and a
CRC-32 of everything after the header. ``meta`` holds "config" (what the
state's meaning depends on, see :func:`config_facts`), "watermark_us", "seq",
"next_id", "tz" and "pieces": [name, length] in blob order. The pieces:
"state" (the open (window, group) table, absent before the first fold), then
each side aggregate's piece (exact count_distinct "distinct<i>": the
(__id, __v) pairs, absent until its first fold; approximate "hll<i>": __id,
__sketch, the compact HLL sketch of each group by id).

Format 2 differs from format 1 in the sessions' "state" table only: it has
an ``__ems`` column after ``__last``, and its rows are the items of open
sessions (see :class:`~.state.WindowState`). A format 1 blob still restores
(:func:`decode` reports its version); for sessions, the stage turns each
stored session, cut under format 1's rule at multiples of
``max_session_duration_ms`` since the epoch, into one settled item (see
:meth:`~.stage.WindowStage.restore`).

Blobs written by earlier releases of this format must keep restoring: change
the layout only with a new version number and a reader for the old one.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from sluice.config.spec import HoppingWindow, SessionWindow, Window
from sluice.engine.stages.window.columns import first_line
from sluice.errors import StageError

if TYPE_CHECKING:  # aggregates read their pieces with expect(): no import cycle at run time
    from sluice.engine.stages.window.aggregates import Aggregate

_MAGIC = b"SWN"
_VERSION = 2
_READS = (1, 2)
_HEADER = struct.Struct("<3sBII")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A decoded blob: the scalar fields of ``meta`` and the raw pieces."""

    config: dict[str, Any]
    watermark_us: int | None
    seq: int
    next_id: int
    tz: str | None
    pieces: dict[str, memoryview]
    version: int


def config_facts(spec: Window, keys: list[str], aggs: list[Aggregate]) -> dict[str, Any]:
    """What the meaning of the state depends on. Not the caps, lateness or
    column names: a restart may change those (raise a cap that was hit)."""
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
    facts["group_by"] = keys
    facts["aggregations"] = [a.describe() for a in aggs]
    return facts


def check_config(stored: dict[str, Any], mine: dict[str, Any]) -> None:
    """Raise :class:`StageError` naming every fact where ``stored`` differs from ``mine``."""
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


def encode(meta: dict[str, Any], pieces: list[tuple[str, bytes]]) -> bytes:
    """The format 2 blob of ``meta`` (without "pieces", which this adds) and ``pieces``."""
    meta = {**meta, "pieces": [[name, len(piece)] for name, piece in pieces]}
    text = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    crc = zlib.crc32(text)
    for _, piece in pieces:
        crc = zlib.crc32(piece, crc)
    head = _HEADER.pack(_MAGIC, _VERSION, len(text), crc)
    return b"".join([head, text, *(piece for _, piece in pieces)])  # one copy


def decode(blob: bytes, mine: dict[str, Any]) -> Snapshot:
    """The fields and pieces of ``blob``, whose configuration must be ``mine``.

    Raises :class:`StageError` for a blob that is no window snapshot, an
    unknown format version, a truncated or damaged blob, or another
    configuration.
    """
    if len(blob) < 4 or blob[:3] != _MAGIC:
        raise StageError("window: not a window snapshot")
    if blob[3] not in _READS:
        raise StageError(
            f"window: snapshot format version {blob[3]} is not supported "
            f"(this sluice reads versions {', '.join(map(str, _READS))}); "
            "was it written by a newer sluice?"
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
        raise StageError(f"window: the snapshot is damaged: {first_line(exc)}") from exc
    check_config(config, mine)
    if n_meta + sum(size for _, size in lengths) != len(body):
        raise StageError("window: the snapshot is truncated or damaged (piece lengths)")
    pieces: dict[str, memoryview] = {}
    at = n_meta
    for name, size in lengths:
        pieces[name], at = body[at : at + size], at + size
    return Snapshot(config, wm, seq, next_id, tz, pieces, blob[3])


def read_ipc(piece: memoryview) -> pa.Table:
    """One piece as the table it holds."""
    return pa.ipc.open_stream(pa.py_buffer(piece)).read_all()


def expect(table: pa.Table, what: str, names: list[str], ints: list[str]) -> pa.Table:
    """``table`` when it has these columns, ``ints`` of them int64; else ValueError."""
    if table.column_names != names:
        raise ValueError(f"'{what}' has columns {table.column_names}, expected {names}")
    for name in ints:
        if table.schema.field(name).type != pa.int64():
            raise ValueError(f"'{what}' column {name} is {table.schema.field(name).type}")
    return table
