"""Decoding a chunk of a text file (JSON lines, CSV) into Arrow, one record per line.

A chunk is a run of whole lines. :func:`split_lines` finds them with numpy
(no Python per line): their start and end byte inside the chunk, without
empty lines and comment lines. The decoders parse the record lines in one
``pyarrow`` call (the fast path); only a chunk with a bad line goes line by
line (bisection) to find the bad ones. Both keep the stream's schema locked
by the Kafka source's rule (:mod:`sluice.formats.json`): new fields add
nullable columns, an integer column that meets a fraction widens to float64,
any other misfit makes that line a bad record.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pacsv

from sluice.connectors.object_store.spec import CsvReadOptions
from sluice.errors import ConnectorError
from sluice.formats.json import JsonDecoder

I64 = npt.NDArray[np.int64]


@dataclass(slots=True)
class Lines:
    """The record lines of a chunk: ``starts[i]`` .. ``ends[i]`` (end excluded,
    without the line break)."""

    chunk: bytes
    starts: I64
    ends: I64
    #: Every line of the chunk is a record line ending in a bare ``\n``.
    plain: bool = False

    def __len__(self) -> int:
        return len(self.starts)

    def line(self, i: int) -> bytes:
        """The bytes of record line ``i``."""
        return self.chunk[int(self.starts[i]) : int(self.ends[i])]

    def joined(self) -> bytes:
        """The record lines, each ending in ``\\n``: what the fast path parses."""
        if self.plain:
            return self.chunk if self.chunk.endswith(b"\n") else self.chunk + b"\n"
        arr = np.frombuffer(self.chunk, np.uint8)
        keep = np.zeros(len(arr) + 1, np.int8)
        np.add.at(keep, self.starts, 1)
        np.add.at(keep, self.ends, -1)
        mask = np.cumsum(keep[:-1]).astype(bool)
        if len(self.starts) == 0:
            return b""
        body = arr[mask]
        # Re-insert one "\n" after each line: positions in the kept bytes.
        lengths = self.ends - self.starts
        cut = np.cumsum(lengths)
        return np.insert(body, cut, np.uint8(10)).tobytes()


def decode_inferring(decoder: Any, lines: Lines, infer: int | None) -> Decoded:
    """``decoder.decode(lines)``; before the stream's schema is locked, with
    ``infer`` (``schema_infer_max_records``), the types come from the first
    ``infer`` record lines only: those are decoded first (locking the schema),
    the rest after, against it."""
    if infer is None or decoder.locked or len(lines) <= infer:
        return decoder.decode(lines)  # type: ignore[no-any-return]
    head = decoder.decode(Lines(lines.chunk, lines.starts[:infer], lines.ends[:infer]))
    tail = decoder.decode(Lines(lines.chunk, lines.starts[infer:], lines.ends[infer:]))
    tables = [t for t in (head.table, tail.table) if t.num_columns]
    table = pa.concat_tables(tables, promote_options="permissive") if tables else head.table
    bad = head.bad + [(infer + i, why) for i, why in tail.bad]
    if head.rows is None and tail.rows is None:
        return Decoded(table, bad)
    first = head.rows if head.rows is not None else list(range(head.table.num_rows))
    rest = tail.rows if tail.rows is not None else list(range(tail.table.num_rows))
    return Decoded(table, bad, [*first, *(infer + r for r in rest)])


def split_lines(chunk: bytes, comment: int | None = None) -> Lines:
    """The non-empty lines of ``chunk`` (``\\r\\n`` and ``\\n`` endings; a last
    line without a break counts), without those starting with ``comment``."""
    arr = np.frombuffer(chunk, np.uint8)
    breaks = np.flatnonzero(arr == 10).astype(np.int64)
    starts = np.concatenate(([0], breaks + 1)).astype(np.int64)
    ends = np.concatenate((breaks, [len(arr)])).astype(np.int64)
    if len(starts) and starts[-1] == len(arr):  # the chunk ends with a break
        starts, ends = starts[:-1], ends[:-1]
    if len(arr):
        cr = (ends > starts) & (arr[np.maximum(ends - 1, 0)] == 13)
        ends = ends - cr.astype(np.int64)
        plain = not cr.any()
    else:
        plain = True
    keep = ends > starts
    if comment is not None and len(arr):
        keep &= arr[np.minimum(starts, len(arr) - 1)] != comment
    plain = plain and bool(keep.all())
    return Lines(chunk, starts[keep], ends[keep], plain)


@dataclass(slots=True)
class Decoded:
    """Rows of a chunk: ``rows[j]`` is the record line of table row ``j``
    (``None``: one row per line, in order); ``bad`` lists (line, reason)."""

    table: pa.Table
    bad: list[tuple[int, str]] = field(default_factory=list)
    rows: list[int] | None = None


class JsonLines:
    """JSON lines: one object per line (:class:`~sluice.formats.json.JsonDecoder`)."""

    def __init__(self) -> None:
        self._decoder = JsonDecoder()

    def header(self, line: bytes | None) -> None:
        """JSON lines have no header."""

    @property
    def has_header(self) -> bool:
        return False

    @property
    def locked(self) -> bool:
        """Whether the stream's schema is set (by the first lines decoded)."""
        return self._decoder.schema is not None

    def decode(self, lines: Lines) -> Decoded:
        """Every record line of ``lines``; the bad ones by index with a reason."""
        table = self._decoder.parse_lines(lines.joined(), len(lines))
        if table is not None:
            return Decoded(table)
        payloads: list[bytes | None] = []
        index: list[int] = []
        for i in range(len(lines)):
            line = lines.line(i)
            if line.strip():  # a blank line (spaces) is not a record
                payloads.append(line)
                index.append(i)
        d = self._decoder.decode(payloads)
        rows = [index[r] for r in (d.rows if d.rows is not None else range(d.table.num_rows))]
        return Decoded(d.table, [(index[i], why) for i, why in d.bad], rows)


def _char(value: str | int | None, default: str | None, what: str) -> str | None:
    if value is None:
        return default
    if isinstance(value, int):
        if not 0 <= value < 128:
            raise ConnectorError(f"read_options.csv.{what}: expected an ASCII code, got {value}")
        return chr(value)
    if len(value) != 1:
        raise ConnectorError(f"read_options.csv.{what}: expected one character, got {value!r}")
    return value


def null_values(regex: str) -> list[str]:
    """The literal cells a ``null_regex`` matches: ``NA``, ``^NA$``, ``^(NA|null|)$``.
    Raises :class:`ConnectorError` for a pattern that is not such a list."""
    body = regex
    if body.startswith("^") and body.endswith("$"):
        body = body[1:-1]
    if body.startswith("(") and body.endswith(")"):
        body = body[1:-1]
    words = body.split("|")
    # Literal characters, or a special one escaped ("\\N" is the cell \N).
    literal = re.compile(r"(?:[^\\.^$*+?{}\[\]|()]|\\[^A-Za-z0-9])*")
    if not all(literal.fullmatch(w) for w in words):
        raise ConnectorError(
            f"read_options.csv.null_regex = {regex!r}: only a list of literal cells "
            "(e.g. '^(NA|null|)$') is supported"
        )
    return [re.sub(r"\\(.)", r"\1", w) for w in words]


class Csv:
    """CSV: one record per line (a quoted line break is not supported, as
    ``pyarrow``'s default), header from the first line unless ``has_header = false``."""

    def __init__(self, options: CsvReadOptions | None) -> None:
        o = options or CsvReadOptions()
        self.has_header = o.has_header is not False
        delimiter = _char(o.delimiter, ",", "delimiter") or ","
        quote = _char(o.quote, '"', "quote")
        escape = _char(o.escape, None, "escape")
        comment = _char(o.comment, None, "comment")
        self.comment = None if comment is None else ord(comment)
        self._delimiter = delimiter.encode()
        self._parse = pacsv.ParseOptions(
            delimiter=delimiter,
            quote_char=quote if quote else False,
            escape_char=escape if escape else False,
        )
        self._nulls = None if o.null_regex is None else null_values(o.null_regex)
        # pyarrow matches null cells after unescaping (an unquoted \N with
        # escape \ reads as "N"): match the unescaped marker, unquoted only,
        # so the quoted string "N" stays a string.
        self._quoted_nulls = True
        if escape and self._nulls is not None:
            unescaped = [re.sub(re.escape(escape) + "(.)", r"\1", w) for w in self._nulls]
            if unescaped != self._nulls:
                self._nulls, self._quoted_nulls = unescaped, False
        self._truncated_ok = bool(o.truncated_rows_ok)
        self._names: list[str] | None = None
        self._schema: pa.Schema | None = None  # locked: name -> type

    @property
    def locked(self) -> bool:
        """Whether the stream's schema is set (by the first lines decoded)."""
        return self._schema is not None

    def header(self, line: bytes | None) -> None:
        """The file's header line (``None``: the file is empty)."""
        if not self.has_header or line is None:
            return
        table = pacsv.read_csv(io.BytesIO(line + b"\n"), parse_options=self._parse)
        self._names = table.column_names

    def _convert(self, names: list[str]) -> pacsv.ConvertOptions:
        types = {}
        if self._schema is not None:
            types = {f.name: f.type for f in self._schema if f.name in names}
        if self._nulls is None:
            return pacsv.ConvertOptions(column_types=types)
        return pacsv.ConvertOptions(
            column_types=types,
            null_values=self._nulls,
            strings_can_be_null=True,
            quoted_strings_can_be_null=self._quoted_nulls,
        )

    def _read(self, buf: bytes) -> pa.Table:
        names = self._names
        read = pacsv.ReadOptions(
            column_names=names,
            autogenerate_column_names=names is None,
            block_size=max(len(buf) + 1, 1 << 16),
        )
        while True:
            try:
                table = pacsv.read_csv(
                    io.BytesIO(buf),
                    read_options=read,
                    parse_options=self._parse,
                    convert_options=self._convert(names or []),
                )
            except pa.ArrowInvalid as exc:
                if not self._widen(str(exc), names):
                    raise
                continue
            if names is None:
                self._names = names = table.column_names
            return self._conform(table)

    def _widen(self, message: str, names: list[str] | None) -> bool:
        """int64 -> float64 for the column a conversion error names, when the
        value it could not convert is a number (a fraction)."""
        found = re.search(
            r"CSV column #(\d+): CSV conversion error to int64: invalid value '(.*)'", message
        )
        if found is None or self._schema is None or names is None:
            return False
        try:
            float(found.group(2))
        except ValueError:
            return False  # not a number at all: a bad record, the column stays int64
        name = names[int(found.group(1))]
        i = self._schema.get_field_index(name)
        if i < 0 or self._schema.field(i).type != pa.int64():
            return False
        self._schema = self._schema.set(i, pa.field(name, pa.float64()))
        return True

    def _conform(self, table: pa.Table) -> pa.Table:
        """Lock the schema (first chunk), add new columns, order as locked."""
        if self._schema is None:
            self._schema = pa.schema([f for f in table.schema if f.type != pa.null()])
        else:
            known = set(self._schema.names)
            extra = [f for f in table.schema if f.name not in known and f.type != pa.null()]
            if extra:
                self._schema = pa.schema([*self._schema, *extra])
        columns = []
        for f in self._schema:
            if f.name in table.column_names:
                col = table[f.name]
                columns.append(col if col.type == f.type else col.cast(f.type))
            else:
                columns.append(pa.nulls(table.num_rows, f.type))
        return pa.Table.from_arrays(columns, schema=self._schema)

    def decode(self, lines: Lines) -> Decoded:
        """Every record line of ``lines``; the bad ones by index with a reason."""
        if not len(lines):
            return Decoded(pa.table({}))
        try:
            table = self._read(lines.joined())
        except pa.ArrowInvalid:
            pass
        else:
            if table.num_rows == len(lines):
                return Decoded(table)
        tables: list[pa.Table] = []
        rows: list[int] = []
        bad: list[tuple[int, str]] = []
        self._bisect(
            [lines.line(i) for i in range(len(lines))], list(range(len(lines))), tables, rows, bad
        )
        bad.sort()
        if not tables:
            return Decoded(pa.table({}), bad, rows)
        return Decoded(pa.concat_tables(tables, promote_options="permissive"), bad, rows)

    def _bisect(
        self,
        lines: list[bytes],
        index: list[int],
        tables: list[pa.Table],
        rows: list[int],
        bad: list[tuple[int, str]],
    ) -> None:
        if not lines:
            return
        try:
            table = self._read(b"\n".join(lines) + b"\n")
            if table.num_rows != len(lines):
                raise pa.ArrowInvalid(f"{len(lines)} line(s) read as {table.num_rows} row(s)")
        except pa.ArrowInvalid as exc:
            if len(lines) == 1:
                padded = self._padded(lines[0], str(exc))
                if padded is not None:
                    self._bisect([padded], index, tables, rows, bad)
                    return
                bad.append((index[0], f"value does not fit the stream's schema: {exc}"))
                return
            mid = len(lines) // 2
            self._bisect(lines[:mid], index[:mid], tables, rows, bad)
            self._bisect(lines[mid:], index[mid:], tables, rows, bad)
            return
        tables.append(table)
        rows.extend(index)

    def _padded(self, line: bytes, message: str) -> bytes | None:
        """``truncated_rows_ok``: a line with too few cells, padded with empty ones."""
        found = re.search(r"Expected (\d+) columns, got (\d+)", message)
        if not self._truncated_ok or found is None:
            return None
        want, got = int(found.group(1)), int(found.group(2))
        return line + self._delimiter * (want - got) if got < want else None
