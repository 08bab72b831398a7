"""CSV writing with any quote and escape character, column-wise.

``pyarrow``'s CSV writer quotes with ``"`` and escapes a quote by doubling
it, nothing else. :func:`csv_bytes` writes the same CSV (every string
value quoted, other values quoted only when their text needs it, nulls as
``null_value`` unquoted and as is, a header of quoted names) with another quote
character and / or an escape character, using Arrow compute kernels over
whole columns (no Python per row): each column cast to text, the escape and
quote characters inside values prefixed with the escape character (or the
quote doubled, without one), the values wrapped in quotes, the cells joined
by the delimiter, the lines by ``\\n``.

:func:`csv_chars_problem` is the config rule both the target and this
writer rely on.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def csv_chars_problem(
    delimiter: str | None, quote: str | None, escape: str | None, null_value: str | None
) -> tuple[str, str] | None:
    """(key, message) when the CSV write options cannot make a readable file."""
    chars = {"csv_delimiter": delimiter, "csv_quote": quote, "csv_escape": escape}
    for key, char in chars.items():
        if char is None:
            continue
        if len(char) != 1 or not char.isascii() or char in "\r\n":
            return key, f"expected one ASCII character other than a line break, got {char!r}"
    used = {k: v for k, v in chars.items() if v is not None}
    effective = {"csv_delimiter": delimiter or ",", "csv_quote": quote or '"'}
    if escape is not None:
        effective["csv_escape"] = escape
    seen: dict[str, str] = {}
    for key, char in effective.items():
        if char in seen:
            at = key if key in used else seen[char]
            return at, f"{char!r} is already the {seen[char]}: they must differ"
        seen[char] = key
    if null_value is not None:
        # The escape character may appear (MySQL's \N with escape \): it is
        # written as is, unquoted, and a reader that unescapes outside quotes
        # reads it as the character after the escape.
        clash = [c for c in (delimiter or ",", quote or '"', "\r", "\n") if c in null_value]
        if clash:
            return (
                "csv_null_value",
                f"{null_value!r} holds {clash[0]!r} (the delimiter, the quote or a line "
                "break): a reader would split it",
            )
    return None


def _join(cells: list[pa.Array], separator: str) -> pa.Array:
    out = pc.binary_join_element_wise(*cells, pa.scalar(separator, pa.large_string()))
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


#: Every character a number or boolean renders with.
_NUMERIC_CHARS = set("0123456789.+-eEinfatrulsINFA")


def _numeric(t: pa.DataType) -> bool:
    return bool(
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_decimal(t)
    )


def _stringy(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _stringy(t.value_type)
    return bool(
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
    )


def csv_bytes(
    data: pa.Table,
    *,
    delimiter: str,
    quote: str,
    escape: str | None,
    null_value: str,
    header: bool,
) -> bytes:
    """``data`` as CSV text (see the module docstring)."""
    text_type = pa.large_string()
    specials = [delimiter, quote, "\n", "\r"] + ([escape] if escape else [])
    needs = "[" + "".join(re.escape(c) for c in specials) + "]"

    def escaped(values: pa.Array, char: str, by: str) -> pa.Array:
        # Scan first: most columns hold no such character, and a scan is cheaper.
        if pc.any(pc.match_substring(values, char)).as_py():
            return pc.replace_substring(values, char, by)
        return values

    def quoted(values: pa.Array) -> pa.Array:
        if escape is not None:
            values = escaped(values, escape, escape + escape)
            values = escaped(values, quote, escape + quote)
        else:
            values = escaped(values, quote, quote + quote)
        q = pa.scalar(quote, text_type)
        return pc.binary_join_element_wise(q, values, q, pa.scalar("", text_type))

    lines: list[bytes] = []
    if header:
        names = quoted(pa.array(data.column_names, text_type))
        lines.append((delimiter.join(names.to_pylist()) + "\n").encode())
    if data.num_rows and data.num_columns:
        cells = []
        for column in data.columns:
            values = column.combine_chunks()
            if pa.types.is_dictionary(values.type):
                values = values.dictionary_decode()
            text = values.cast(text_type)
            if _stringy(column.type):
                cell = quoted(text)
            elif _numeric(column.type) and not set(specials) & _NUMERIC_CHARS:
                cell = text
            else:
                cell = pc.if_else(pc.match_substring_regex(text, needs), quoted(text), text)
            cells.append(pc.fill_null(cell, pa.scalar(null_value, text_type)))
        rows = _join(cells, delimiter)
        ended = pc.binary_join_element_wise(
            rows, pa.scalar("\n", text_type), pa.scalar("", text_type)
        )
        ended = ended.combine_chunks() if isinstance(ended, pa.ChunkedArray) else ended
        offsets = np.frombuffer(ended.buffers()[1], np.int64, len(ended) + 1, ended.offset * 8)
        body = ended.buffers()[2]
        lines.append(body[int(offsets[0]) : int(offsets[-1])].to_pybytes())
    return b"".join(lines)
