"""Bulk payload decoding into Arrow, with a schema that stays stable.

JSON payloads of a whole batch are joined with newlines and parsed by
``pyarrow.json`` in one call (C++, multi-threaded): no Python per field.

Schema rule (documented in the README):

* The first batch's inferred schema is locked for the life of the process.
* A field never seen before is added as a new nullable column at the end.
* An integer field that receives a fractional number is widened to float64.
* Any other value that does not fit its column (a string in an integer
  column, a payload that is not a JSON object, an empty payload) makes that
  one message bad: it is reported with its index so the caller can name the
  partition and offset, and the rest of the batch decodes normally.

Only a batch that contains a bad or multi-line message leaves the fast path
(per-message work, then bisection to isolate the bad messages).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import msgspec
import pyarrow as pa
import pyarrow.json as pajson

_BLOCK_BYTES = 4 << 20  # pyarrow parses blocks in parallel; 4 MiB keeps both cores busy


@dataclass(slots=True)
class Decoded:
    """The decoded rows, and the messages that could not be decoded.

    ``rows`` maps each output row to its input index (``None`` when every
    message decoded, in order).
    """

    table: pa.Table
    bad: list[tuple[int, str]] = field(default_factory=list)
    rows: list[int] | None = None


class JsonDecoder:
    """Decode JSON object payloads in bulk, keeping one schema across batches."""

    def __init__(self) -> None:
        self._schema: pa.Schema | None = None

    @property
    def schema(self) -> pa.Schema | None:
        """The locked schema (``None`` before the first batch)."""
        return self._schema

    def decode(self, payloads: list[bytes | None]) -> Decoded:
        """Decode ``payloads`` (one JSON object each) into one table."""
        if not payloads:
            return Decoded(pa.table({}))
        if None not in payloads:
            buf = b"\n".join(payloads)  # type: ignore[arg-type]  # None excluded just above
            try:
                table = self._parse(buf)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass
            else:
                if table.num_rows == len(payloads):
                    return Decoded(table)
        return self._slow(payloads)

    def parse_lines(self, buf: bytes, count: int) -> pa.Table | None:
        """Parse ``buf``, ``count`` JSON objects one per line, on the fast path
        only (no Python per line): the table, or ``None`` when some line does
        not decode or fit the schema (then :meth:`decode` them one by one)."""
        if not count:
            return pa.table({})
        try:
            table = self._parse(buf)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
        return table if table.num_rows == count else None

    def _parse(self, buf: bytes) -> pa.Table:
        block = _BLOCK_BYTES if len(buf) > _BLOCK_BYTES else max(len(buf) + 1, 1 << 16)
        read = pajson.ReadOptions(use_threads=True, block_size=block)
        parse = pajson.ParseOptions(explicit_schema=self._schema, unexpected_field_behavior="infer")
        try:
            table = pajson.read_json(io.BytesIO(buf), read_options=read, parse_options=parse)
        except pa.ArrowInvalid as exc:
            widened = self._widen(str(exc))
            if widened is None:
                if "straddling" in str(exc) and block < len(buf) + 1:
                    # One message longer than a block: parse as a single block.
                    read = pajson.ReadOptions(use_threads=False, block_size=len(buf) + 1)
                    table = pajson.read_json(
                        io.BytesIO(buf), read_options=read, parse_options=parse
                    )
                else:
                    raise
            else:
                self._schema = widened
                return self._parse(buf)
        self._adopt(table.schema)
        return table

    def _widen(self, message: str) -> pa.Schema | None:
        """int64 -> float64 for the column a conversion error names, if any."""
        if self._schema is None or "JSON to int64" not in message:
            return None
        # pyarrow does not name the column; widen every int64 field that is a
        # candidate, which is what a user of a dynamic JSON stream expects.
        fields = [
            pa.field(f.name, pa.float64(), nullable=True) if f.type == pa.int64() else f
            for f in self._schema
        ]
        widened = pa.schema(fields)
        return None if widened.equals(self._schema) else widened

    def _adopt(self, schema: pa.Schema) -> None:
        if self._schema is None:
            # Columns that were null in every row of the first batch have no
            # type yet; leave them out so a later batch can type them.
            self._schema = pa.schema([f for f in schema if f.type != pa.null()])
            return
        known = set(self._schema.names)
        extra = [f for f in schema if f.name not in known and f.type != pa.null()]
        if extra:
            self._schema = pa.schema([*self._schema, *extra])

    def _slow(self, payloads: list[bytes | None]) -> Decoded:
        lines: list[bytes] = []
        index: list[int] = []
        bad: list[tuple[int, str]] = []
        for i, payload in enumerate(payloads):
            if payload is None:
                bad.append((i, "message has no value (tombstone)"))
                continue
            try:
                obj = msgspec.json.decode(payload)
            except msgspec.DecodeError as exc:
                bad.append((i, f"invalid JSON: {exc}"))
                continue
            if not isinstance(obj, dict):
                bad.append((i, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            lines.append(msgspec.json.encode(obj) if b"\n" in payload else payload)
            index.append(i)
        tables: list[pa.Table] = []
        rows: list[int] = []
        self._bisect(lines, index, tables, rows, bad)
        bad.sort()
        if not tables:
            return Decoded(pa.table({}), bad, rows)
        table = pa.concat_tables(tables, promote_options="permissive")
        return Decoded(table, bad, rows)

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
            table = self._parse(b"\n".join(lines))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            if len(lines) == 1:
                bad.append((index[0], f"value does not fit the stream's schema: {exc}"))
                return
            mid = len(lines) // 2
            self._bisect(lines[:mid], index[:mid], tables, rows, bad)
            self._bisect(lines[mid:], index[mid:], tables, rows, bad)
            return
        tables.append(table)
        rows.extend(index)
