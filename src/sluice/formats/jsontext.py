"""Arrow -> JSON text, column at a time (no Python loop over rows).

:func:`to_json_text` turns any Arrow array into a string array holding one
JSON document per slot. It is built from Arrow compute kernels (cast to
string, ``binary_join_element_wise`` to concatenate, ``binary_join`` over a
``list<string>`` rebuilt from the list offsets, ``replace_substring`` to
escape) and a little numpy (hex digits, byte scans, offsets); Python loops
only over columns, struct fields and nesting levels.

The JSON written, by Arrow type:

=========================  ===================================================
null, null slot            ``null`` (a null top-level slot stays a null string)
boolean                    ``true`` / ``false``
integers                   JSON number (uint64 in full: parse it as a big int)
float16/32/64              shortest round-trip number (``0.1``, ``1e+16``);
                           NaN, +Inf, -Inf -> ``null``
decimal                    JSON number with the column's scale (``1.50``);
                           Arrow's scientific form (``1.2E-9``, ``1.20E+5``)
                           for a scale past the digits or below zero
string, large/view         JSON string; ``"`` ``\\`` escaped, control
                           characters < 0x20 as ``\\b \\t \\n \\f \\r`` or
                           ``\\u00XX``; everything else (non-ASCII too) as is
binary, large/fixed/view   ``"\\\\x0a0b"``: the string ``\\x`` + lowercase
                           hex, what Postgres ``to_jsonb(bytea)`` gives
timestamp (any unit)       ``"2026-01-02T03:04:05.123456Z"``: UTC, ``T``,
                           ``Z``; fraction digits fixed by the unit (s: none,
                           ms: 3, us: 6, ns: 9); tz-naive taken as UTC; years
                           outside 0000-9999 print as Arrow prints them
date32/64                  ``"2026-01-02"``
time32/64                  ``"03:04:05.123"`` (fraction digits by unit)
duration (any unit)        JSON number of microseconds: s/ms/us exact
                           integers, ns with exactly three decimals
                           (``1.500`` for 1500 ns)
list, large/fixed/view     JSON array, ``[]`` when empty
struct                     JSON object in field order (``{}`` with no fields);
                           a null field -> ``null``
map                        JSON object; string-like keys (string, binary,
                           timestamp, date, time) as encoded, other keys as
                           the JSON string of their encoding (``1`` ->
                           ``"1"``); a repeated key written again, in order
dictionary                 the decoded values
union                      the value of the selected child
run-end encoded            the decoded values
extension                  its storage
=========================  ===================================================

No whitespace is written. Intervals (month/day/nano) are not supported
(:class:`TypeError`). A string holding U+0000 is written as ``\\u0000``,
which is valid JSON that Postgres ``jsonb`` (not ``json``) refuses.

Measured (2 shared CPUs, pyarrow 26, Python 3.11, best of 5): 100k rows
of ``list<struct<strike int64, bid float64, ask float64, ts timestamp[us,
UTC], tag string>>``, 10 elements per list on average (1M structs, a quarter
of the tags holding quotes): the per-row ``json.dumps(to_pylist())`` it
replaces 8.9-9.3 s; this module 0.42-0.48 s (about 20x). DuckDB's
``to_json`` takes 0.35 s but breaks the rules above (``NaN`` literals,
uppercase ``\\x0A`` per byte, ``+00`` timestamps); rewritten in SQL to meet them
for this one type (``isfinite``, ``strftime``) it takes 0.42 s: not enough
to make the Postgres target depend on DuckDB and keep a type-to-SQL
rewriter in step with these rules.
"""

from __future__ import annotations

import json

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["to_json_text"]

_STR = pa.string()
_NULL_STR = pa.scalar(None, _STR)

#: JSON escape of each control character < 0x20 (what json.dumps writes).
_CONTROL = {
    c: {8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r"}.get(c, f"\\u{c:04x}")
    for c in range(0x20)
}

#: Two lowercase hex digits per byte value, as a (256, 2) uint8 table.
_HEX = np.frombuffer("".join(f"{b:02x}" for b in range(256)).encode(), np.uint8).reshape(256, 2)

_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
#: 0000-01-01T00:00:00Z and 10000-01-01T00:00:00Z in Unix seconds.
_YEAR_0 = -62_167_219_200
_YEAR_10000 = 253_402_300_800

_Offsets = npt.NDArray[np.int64]

#: The JSON text of an array as pieces to concatenate slot by slot: literal
#: strings and string arrays of equal length. A slot is null (JSON ``null``)
#: where any array piece is. Kept apart so a struct concatenates all its
#: fields, their quotes and the fields of nested structs in one kernel call.
_Parts = list[pa.Array | str]


def to_json_text(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One JSON document per slot of ``array``, as a ``string`` array.

    A null slot gives a null string (a SQL NULL, not the text ``null``); a
    valid slot whose value has no JSON form (NaN, +-Inf) gives the text
    ``null``. Values nested inside follow the table in the module docstring.
    A chunked array is encoded chunk by chunk and concatenated.

    Raises :class:`TypeError` for a type without a JSON form (intervals), and
    ``pyarrow.ArrowInvalid`` / ``ArrowCapacityError`` if the text of one
    array passes 2 GiB (write smaller batches).
    """
    if isinstance(array, pa.ChunkedArray):
        chunks = [to_json_text(c) for c in array.chunks]
        return pa.concat_arrays(chunks) if chunks else pa.array([], _STR)
    text = _concat(_parts(array))
    if text.null_count > array.null_count:
        text = pc.if_else(array.is_null(), _NULL_STR, pc.fill_null(text, "null"))
    return text


def _parts(arr: pa.Array) -> _Parts:
    """The JSON text of every slot of ``arr``; null where it is JSON ``null``."""
    t = arr.type
    if pa.types.is_null(t):
        return [pa.nulls(len(arr), _STR)]
    if pa.types.is_boolean(t):
        return [pc.if_else(arr, "true", "false")]
    if pa.types.is_integer(t) or pa.types.is_decimal(t):
        return [pc.cast(arr, _STR)]
    if pa.types.is_floating(t):
        if pa.types.is_float16(t):
            arr = pc.cast(arr, pa.float32())
        return [pc.if_else(pc.is_finite(arr), pc.cast(arr, _STR), _NULL_STR)]
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return ['"', _escape(arr if t == _STR else pc.cast(arr, _STR)), '"']
    if (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
    ):
        return ['"\\\\x', _hex(arr), '"']
    if pa.types.is_timestamp(t):
        return ['"', _timestamp(arr), 'Z"']
    if pa.types.is_date(t) or pa.types.is_time(t):
        return ['"', pc.cast(arr, _STR), '"']
    if pa.types.is_duration(t):
        return [_duration(arr)]
    if pa.types.is_map(t):
        return _map(arr)
    if (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    ):
        offsets, values = _elements(arr)
        return ["[", _masked(_join(offsets, _text(values)), arr), "]"]
    if pa.types.is_struct(t):
        return _struct(arr)
    if pa.types.is_dictionary(t):
        # Encode each distinct value once, then pick by index.
        return [pc.take(_concat(_parts(arr.dictionary)), arr.indices)]
    if pa.types.is_union(t):
        return [_union(arr)]
    if pa.types.is_run_end_encoded(t):
        return _parts(pc.run_end_decode(arr))
    if isinstance(t, pa.BaseExtensionType):
        return _parts(arr.storage)
    raise TypeError(f"no JSON form for Arrow type {t}")


def _concat(parts: _Parts) -> pa.Array:
    """The slot-wise concatenation of ``parts`` (null where any array piece is)."""
    if len(parts) == 1 and isinstance(parts[0], pa.Array):
        return parts[0]
    return pc.binary_join_element_wise(*parts, "")


def _filled(parts: _Parts) -> _Parts:
    """``parts`` with no null slot: JSON ``null`` written out (what a container embeds)."""
    if any(isinstance(p, pa.Array) and p.null_count for p in parts):
        return [pc.fill_null(_concat(parts), "null")]
    return parts


def _text(arr: pa.Array) -> pa.Array:
    """The JSON text of every slot of ``arr``, ``null`` written out."""
    return _concat(_filled(_parts(arr)))


def _masked(text: pa.Array, arr: pa.Array) -> pa.Array:
    """``text`` with null where ``arr`` is null."""
    if arr.null_count:
        return pc.if_else(arr.is_valid(), text, _NULL_STR)
    return text


def _escape(text: pa.Array) -> pa.Array:
    """``text`` (a string array) escaped for a JSON string, quotes not added.

    The data bytes are scanned with numpy first (UTF-8 continuation bytes are
    >= 0x80, so a byte < 0x20, ``"`` or ``\\`` is that character): a
    replacement pass runs only for a character that occurs.
    """
    _, offsets_buf, data_buf = text.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32, len(text) + 1, text.offset * 4)
    start, end = int(offsets[0]), int(offsets[-1])
    if end == start:
        return text
    data = np.frombuffer(data_buf, np.uint8, end - start, start)
    if (data == 0x5C).any():  # first, or the backslashes of the escapes get doubled
        text = pc.replace_substring(text, "\\", "\\\\")
    if (data == 0x22).any():
        text = pc.replace_substring(text, '"', '\\"')
    controls = data < 0x20
    if controls.any():
        for c in np.unique(data[controls]).tolist():
            text = pc.replace_substring(text, chr(c), _CONTROL[c])
    return text


def _hex(arr: pa.Array) -> pa.Array:
    """Binary values as lowercase hex strings."""
    if not pa.types.is_large_binary(arr.type):
        arr = pc.cast(arr, pa.large_binary())
    n = len(arr)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64, n + 1, arr.offset * 8)
    start, end = int(offsets[0]), int(offsets[-1])
    data = (
        np.frombuffer(data_buf, np.uint8, end - start, start)
        if end > start
        else np.empty(0, np.uint8)
    )
    digits = _HEX[data]  # (bytes, 2): both hex digits of each byte, in order
    text = pa.Array.from_buffers(
        pa.large_string(), n, [None, pa.py_buffer((offsets - start) * 2), pa.py_buffer(digits)]
    )
    return _masked(pc.cast(text, _STR), arr)


def _timestamp(arr: pa.Array) -> pa.Array:
    """``YYYY-MM-DDTHH:MM:SS[.f…]`` of the UTC instant (quotes and ``Z`` not added)."""
    # A tz-aware timestamp stores UTC instants: read them as naive (zero
    # copy), because Arrow formats naive timestamps ~20x faster than zoned
    # ones, even UTC. Arrow writes "YYYY-MM-DD HH:MM:SS.f…".
    naive = arr.view(pa.timestamp(arr.type.unit))
    text = pc.cast(naive, _STR)
    lo, hi = pc.min_max(arr.view(pa.int64())).values()
    per_second = _PER_SECOND[arr.type.unit]
    if lo.is_valid and _YEAR_0 * per_second <= lo.as_py() and hi.as_py() < _YEAR_10000 * per_second:
        # Four-digit years: the space is byte 10 of every value (3x faster).
        return pc.binary_replace_slice(text, 10, 11, "T")
    return pc.replace_substring(text, " ", "T", max_replacements=1)


def _duration(arr: pa.Array) -> pa.Array:
    """A JSON number of microseconds."""
    unit = arr.type.unit
    ticks = arr.view(pa.int64())
    if unit == "ns":
        # ns as a decimal with scale 3 is exactly the microseconds.
        micros = pc.cast(ticks, pa.decimal128(19, 0)).view(pa.decimal128(19, 3))
        return pc.cast(micros, _STR)
    text = pc.cast(ticks, _STR)
    if unit == "us":
        return text
    # Append the zeros as text: exact where multiplying could overflow int64.
    zeros = {"s": "000000", "ms": "000"}[unit]
    return pc.if_else(pc.equal(ticks, 0), "0", pc.binary_join_element_wise(text, zeros, ""))


def _elements(arr: pa.Array) -> tuple[_Offsets, pa.Array]:
    """The element offsets of list-like ``arr`` (from 0) and the elements they index.

    Handles slices (``arr.offset != 0``: ``arr.values`` ignores it) and list
    views, whose elements need not be contiguous nor in order.
    """
    n = len(arr)
    t = arr.type
    if pa.types.is_fixed_size_list(t):
        size = t.list_size
        values = arr.values.slice(arr.offset * size, n * size)
        return np.arange(n + 1, dtype=np.int64) * size, values
    if pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        starts = arr.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        sizes = arr.sizes.to_numpy(zero_copy_only=False).astype(np.int64)
        sizes[arr.is_null().to_numpy(zero_copy_only=False)] = 0
        offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(sizes)])
        index = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1] - starts, sizes)
        return offsets, arr.values.take(pa.array(index))
    offsets = arr.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    return offsets - start, arr.values.slice(start, end - start)


def _join(offsets: _Offsets, items: pa.Array) -> pa.Array:
    """Per slot ``i``: ``items[offsets[i]:offsets[i+1]]`` joined by ``,``."""
    if offsets[-1] < 2**31:
        lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), items)
    else:  # pragma: no cover - more than 2**31 elements in one array
        lists = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), items)
    return pc.binary_join(lists, ",")


def _map(arr: pa.Array) -> _Parts:
    offsets, entries = _elements(arr)
    keys, items = entries.field(0), entries.field(1)
    key_parts = _filled(_parts(keys))
    if not _is_json_string(keys.type):
        key_parts = ['"', _escape(_concat(key_parts)), '"']
    pairs = _concat([*key_parts, ":", *_filled(_parts(items))])
    return ["{", _masked(_join(offsets, pairs), arr), "}"]


def _struct(arr: pa.Array) -> _Parts:
    t = arr.type
    parts: _Parts = []
    for i in range(t.num_fields):
        name = json.dumps(t.field(i).name, ensure_ascii=False)
        parts.append(("{" if i == 0 else ",") + name + ":")
        parts.extend(_filled(_parts(arr.field(i))))  # field(i) applies arr.offset
    parts.append("}" if parts else "{}")
    merged: _Parts = []
    for p in parts:  # adjacent literals as one
        if isinstance(p, str) and merged and isinstance(merged[-1], str):
            merged[-1] += p
        else:
            merged.append(p)
    if len(merged) == 1:  # no fields
        merged = [pa.repeat(merged[0], len(arr))]
    if arr.null_count:
        return [_masked(_concat(merged), arr)]
    return merged


def _union(arr: pa.Array) -> pa.Array:
    """Each slot's selected child's text, picked from all children's text at once."""
    t = arr.type
    n = len(arr)
    children = [_text(arr.field(i)) for i in range(t.num_fields)]
    bases = np.cumsum([0] + [len(c) for c in children[:-1]], dtype=np.int64)
    child_of = np.zeros(128, np.int64)
    child_of[list(t.type_codes)] = np.arange(t.num_fields)
    # From the buffers: .type_codes and .offsets ignore a slice's offset.
    buffers = arr.buffers()
    codes = np.frombuffer(buffers[1], np.int8, n, arr.offset)
    if t.mode == "dense":
        within = np.frombuffer(buffers[2], np.int32, n, arr.offset * 4).astype(np.int64)
    else:  # a sparse union's field(i) is already sliced like arr
        within = np.arange(n, dtype=np.int64)
    return pc.take(pa.concat_arrays(children), pa.array(bases[child_of[codes]] + within))


def _is_json_string(t: pa.DataType) -> bool:
    """Whether :func:`_parts` writes values of ``t`` as JSON strings."""
    while pa.types.is_dictionary(t) or pa.types.is_run_end_encoded(t):
        t = t.value_type
    if isinstance(t, pa.BaseExtensionType):
        return _is_json_string(t.storage_type)
    return bool(
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
        or pa.types.is_timestamp(t)
        or pa.types.is_date(t)
        or pa.types.is_time(t)
    )
