"""Avro bodies of one writer schema into Arrow (fastavro, then one Arrow build).

Types, Avro → Arrow (every column nullable):

=====================================  =======================================
null / boolean / int / long            null / bool / int32 / int64
float / double                         float32 / float64
bytes, fixed / string, enum            binary / string
record / array / map                   struct / list / map<string, …>
union of null and one type             that type (null → null)
``timestamp-millis`` / ``-micros``     timestamp[ms / us, UTC]
``local-timestamp-millis`` / ``-micros``  timestamp[ms / us] (no zone)
``date``                               date32
``time-millis`` / ``time-micros``      time32[ms] / time64[us]
``decimal`` (bytes or fixed)           decimal128(precision, scale) (256 past 38 digits)
``uuid``                               string
=====================================  =======================================

**Unions of several non-null types** (``["null", "string", "long"]``)
become a struct with one field per branch, named by the branch (the
primitive's name, a named type's short name, the logical type's, ``array`` /
``map``), of which exactly the field of the written branch is set (the
whole struct is null for null): ``struct<string: string, long: int64>``.
Branches whose values read back alike merge into one field, the wider:
``int`` and ``long`` (int64, named ``long``), ``float`` and ``double``,
``string`` and an ``enum`` (``string``), ``bytes`` and a ``fixed``
(``bytes``); when only one field is left the column is that type, not a
struct (``["int", "long"]`` → int64). Branches that merge into no one type
(two records, a record and a map, ``long`` and ``timestamp-micros``) are
refused (the schema's messages follow ``on_error``). This is the one place
the decoder runs Python per value, and only for union columns.
A top-level schema that is not a record decodes into one column, ``value``.

Cost: a batch is decoded natively when it can be: the bodies are joined
into one block of an Avro object container (the writer schema in its
header) and read by ``polars.read_avro`` (Rust, straight into Arrow), about
10x faster than the per-message path. Each body is followed in the block
by a 16-byte marker, random per process, read back as a last column: a
body longer or shorter than its record shifts the reading and the markers
no longer match, so the batch takes the per-message path, which finds the
bad body. Whether a schema goes native is decided once per schema id, on
its first batch: both paths decode it and must give equal tables (types and
values), else the schema stays on the per-message path (a union of several
types, a map, a schema with references, a type polars reads differently).
The per-message path: fastavro's compiled reader turns each body into
Python values (the logical types other than ``decimal`` are read as their
raw numbers, so no ``datetime`` is built), and
:meth:`pyarrow.Table.from_pylist` builds the columns in C++. See the README
for the measured cost per 1M messages.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from sluice.errors import ConnectorError
from sluice.formats.registry import RegisteredSchema, RegistryClient

try:
    import fastavro
    from fastavro import schemaless_reader
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
    raise ModuleNotFoundError("fastavro", name="fastavro") from exc

UTC = "UTC"
# Logical types read as their underlying number (the Arrow type gives the meaning).
_RAW_LOGICAL = {
    "timestamp-millis": pa.timestamp("ms", tz=UTC),
    "timestamp-micros": pa.timestamp("us", tz=UTC),
    "local-timestamp-millis": pa.timestamp("ms"),
    "local-timestamp-micros": pa.timestamp("us"),
    "date": pa.date32(),
    "time-millis": pa.time32("ms"),
    "time-micros": pa.time64("us"),
    "uuid": pa.string(),
}
_PRIMITIVE = {
    "null": pa.null(),
    "boolean": pa.bool_(),
    "int": pa.int32(),
    "long": pa.int64(),
    "float": pa.float32(),
    "double": pa.float64(),
    "bytes": pa.binary(),
    "string": pa.string(),
}


class AvroCodec:
    """Decodes the bodies written with one Avro schema."""

    def __init__(
        self, text: str, named: dict[str, Any] | None = None, references: Sequence[Any] = ()
    ) -> None:
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConnectorError(f"schema is not JSON: {exc}") from exc
        self._named_types: dict[str, pa.DataType] = {}
        # Per-value fixes of the parts that hold a union of several types (None: none).
        self._named_fixes: dict[str, _Fix | None] = {}
        for ref in references:  # named types the schema uses by name, registered elsewhere
            self._arrow(ref)
        arrow = self._arrow(raw)
        for ref in references:
            self._fixer(ref)
        self._fix = self._fixer(raw)
        self.record = pa.types.is_struct(arrow)
        self.schema = (
            pa.schema([arrow.field(i).with_nullable(True) for i in range(arrow.num_fields)])
            if self.record
            else pa.schema([pa.field("value", arrow)])
        )
        try:
            self._parsed = fastavro.parse_schema(
                _strip_logical(raw), named_schemas=dict(named or {})
            )
        except Exception as exc:  # fastavro raises several types for a bad schema
            raise ConnectorError(f"invalid Avro schema: {exc}") from exc
        # The native reader: None = not decided yet (first batch), False = not for this schema.
        self._native: _Native | bool | None = (
            None if self.record and not references and _plain(raw) and _polars() else False
        )
        self._raw = raw

    def view(self, indexes: tuple[int, ...]) -> AvroCodec:
        """Avro has no message indexes: itself."""
        return self

    @property
    def native(self) -> bool | None:
        """Whether batches are read natively (``None``: not decided yet)."""
        return None if self._native is None else self._native is not False

    def decode(self, bodies: list[bytes]) -> tuple[pa.Table, list[tuple[int, str]]]:
        """See :class:`sluice.formats.confluent.Codec`."""
        native = self._native
        if native is False or not bodies:
            return self._decode_each(bodies)
        if isinstance(native, _Native):
            table = native.read(bodies, self.schema)
            return (table, []) if table is not None else self._decode_each(bodies)
        # First batch of this schema: both paths, the native one kept only if equal.
        try:
            candidate: _Native | None = _Native(self._raw)
        except Exception:  # a schema the container header cannot carry
            candidate = None
        table = candidate.read(bodies, self.schema) if candidate is not None else None
        reference, bad = self._decode_each(bodies)
        if table is not None and not bad:
            self._native = candidate if table.equals(reference) else False
        elif not bad:
            self._native = False  # good bodies the native reader cannot read
        return reference, bad

    def _decode_each(self, bodies: list[bytes]) -> tuple[pa.Table, list[tuple[int, str]]]:
        """The per-message path (fastavro, then one Arrow build)."""
        records: list[Any] = []
        bad: list[tuple[int, str]] = []
        parsed = self._parsed
        for i, body in enumerate(bodies):
            buf = io.BytesIO(body)
            try:
                record = schemaless_reader(buf, parsed, None)
            except Exception as exc:  # EOFError, StopIteration, ValueError ... on a bad body
                bad.append((i, f"body does not decode: {type(exc).__name__}: {exc}"))
                continue
            if buf.tell() != len(body):
                bad.append((i, f"{len(body) - buf.tell()} byte(s) left after the record"))
                continue
            records.append(record)
        fix = self._fix
        if fix is not None:
            try:
                records = [fix(r) for r in records]
            except KeyError as exc:  # cannot happen with fastavro's reader: a value it read
                raise ConnectorError(f"a union value of unexpected type {exc}") from exc
        if not self.record:
            records = [{"value": r} for r in records]
        try:
            table = pa.Table.from_pylist(records, schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise ConnectorError(f"Avro values do not fit their Arrow types: {exc}") from exc
        return table, bad

    # -- Avro type -> Arrow type -------------------------------------------------

    def _arrow(self, t: Any) -> pa.DataType:
        if isinstance(t, str):
            if t in _PRIMITIVE:
                return _PRIMITIVE[t]
            named = self._named_types.get(t) or self._named_types.get(t.rpartition(".")[2])
            if named is None:
                raise ConnectorError(f"unknown Avro type {t!r}")
            return named
        if isinstance(t, list):
            branches = [b for b in t if b != "null"]
            if len(branches) == 1:
                return self._arrow(branches[0])
            if not branches:
                return pa.null()
            fields = self._union_fields(branches)
            if len(fields) == 1:
                return fields[0][1]
            return pa.struct([pa.field(name, arrow) for name, arrow, _ in fields])
        if not isinstance(t, dict):
            raise ConnectorError(f"unexpected Avro type {t!r}")
        logical = t.get("logicalType")
        kind = t.get("type")
        if logical in _RAW_LOGICAL:
            return _RAW_LOGICAL[logical]
        if logical == "decimal":
            precision, scale = int(t["precision"]), int(t.get("scale", 0))
            return (
                pa.decimal128(precision, scale)
                if precision <= 38
                else pa.decimal256(precision, scale)
            )
        if kind == "record":
            out = pa.struct(
                [pa.field(f["name"], self._arrow(f["type"]), nullable=True) for f in t["fields"]]
            )
        elif kind == "enum":
            out = pa.string()
        elif kind == "fixed":
            out = pa.binary()
        elif kind == "array":
            return pa.list_(self._arrow(t["items"]))
        elif kind == "map":
            return pa.map_(pa.string(), self._arrow(t["values"]))
        else:
            return self._arrow(kind)
        name = t.get("name")
        if isinstance(name, str):
            namespace = t.get("namespace")
            self._named_types[name] = out
            if namespace:
                self._named_types[f"{namespace}.{name}"] = out
        return out

    def _union_fields(self, branches: list[Any]) -> list[tuple[str, pa.DataType, type]]:
        """The struct fields of a union's non-null branches: (name, Arrow type,
        the Python type fastavro reads its values as), alike branches merged."""
        fields: list[tuple[str, pa.DataType, type]] = []
        for branch in branches:
            arrow = self._arrow(branch)
            kind = _python_type(arrow)
            name = _branch_name(branch)
            at = next((i for i, f in enumerate(fields) if f[2] is kind), None)
            if at is None:
                fields.append((name, arrow, kind))
                continue
            before = fields[at]
            if (before[1], arrow) in _UNION_WIDER:
                fields[at] = (name, arrow, kind)
            elif not (arrow.equals(before[1]) or (arrow, before[1]) in _UNION_WIDER):
                raise ConnectorError(
                    f"a union of {before[0]} and {name} has no column type "
                    "(their values read back alike)"
                )
        return fields

    def _fixer(self, t: Any) -> _Fix | None:
        """The per-value fix of values of ``t`` that hold a union of several types."""
        if isinstance(t, str):
            return self._named_fixes.get(t) or self._named_fixes.get(t.rpartition(".")[2])
        if isinstance(t, list):
            branches = [b for b in t if b != "null"]
            if len(branches) == 1:
                return self._fixer(branches[0])
            if not branches:
                return None
            fields = self._union_fields(branches)
            if len(fields) == 1:
                return None  # alike scalars merged into one plain column
            names = {read_as: name for name, _, read_as in fields}
            by_type: dict[type, tuple[str, _Fix | None]] = {}
            for branch in branches:
                read_as = _python_type(self._arrow(branch))
                by_type[read_as] = (names[read_as], self._fixer(branch))
            return _union_fix(by_type)
        if not isinstance(t, dict):
            return None
        kind = t.get("type")
        out: _Fix | None = None
        if kind == "record":
            fixes = {f["name"]: self._fixer(f["type"]) for f in t["fields"]}
            some = {k: v for k, v in fixes.items() if v is not None}
            out = _record_fix(some) if some else None
            name = t.get("name")
            if isinstance(name, str):
                self._named_fixes[name] = out
                if t.get("namespace"):
                    self._named_fixes[f"{t['namespace']}.{name}"] = out
        elif kind == "array":
            sub = self._fixer(t["items"])
            out = None if sub is None else _array_fix(sub)
        elif kind == "map":
            sub = self._fixer(t["values"])
            out = None if sub is None else _map_fix(sub)
        elif isinstance(kind, (list, dict)):
            out = self._fixer(kind)
        return out


#: A function that rewrites one decoded value (union values into their struct).
_Fix = Any

_SYNC = b"sluice-avro-sync"  # 16 bytes: the container's sync marker


def _polars() -> bool:
    try:
        import polars  # noqa: F401
    except ImportError:
        return False
    return True


def _plain(t: Any) -> bool:
    """Whether ``t`` has only what polars reads (no map, no union of several
    types; polars panics on those): the first batch then checks the rest."""
    if isinstance(t, list):
        return len([b for b in t if b != "null"]) <= 1 and all(_plain(b) for b in t)
    if not isinstance(t, dict):
        return True
    kind = t.get("type")
    if kind == "map":
        return False
    if kind == "record":
        return all(_plain(f.get("type")) for f in t.get("fields", ()))
    if kind == "array":
        return _plain(t.get("items"))
    return _plain(kind)


def _varint(n: int) -> bytes:
    """``n`` as an Avro long (zigzag varint)."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class _Native:
    """Reads a batch of bodies of one record schema as one Avro container block."""

    def __init__(self, raw: dict[str, Any]) -> None:
        tag = os.urandom(8).hex()
        self.marker = os.urandom(16)
        self.column = f"sluice_end_{tag}"
        end = {
            "name": self.column,
            "type": {"type": "fixed", "name": f"SluiceEnd{tag}", "size": 16},
        }
        schema = json.dumps({**raw, "fields": [*raw["fields"], end]}).encode()
        self.header = (
            b"Obj\x01"
            + _varint(1)
            + _varint(len(b"avro.schema"))
            + b"avro.schema"
            + _varint(len(schema))
            + schema
            + _varint(0)
            + _SYNC
        )

    def read(self, bodies: list[bytes], schema: pa.Schema) -> pa.Table | None:
        """The rows of ``bodies`` as ``schema``, or ``None`` when the block does
        not read back body by body (a bad body: the per-message path finds it)."""
        import polars as pl
        import pyarrow.compute as pc

        marker = self.marker
        data = marker.join(bodies) + marker
        block = b"".join((self.header, _varint(len(bodies)), _varint(len(data)), data, _SYNC))
        try:
            table = pl.read_avro(io.BytesIO(block)).to_arrow()
            ends = table.column(self.column)
            same = pc.equal(ends, pa.scalar(marker, ends.type))
            if same.null_count or not pc.all(same).as_py() or table.num_rows != len(bodies):
                return None
            return table.drop_columns([self.column]).cast(schema)
        except BaseException as exc:  # polars' errors and panics, a value the cast cannot hold
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return None


#: (narrower, wider) Arrow types whose union branches merge into the wider.
_UNION_WIDER = {(pa.int32(), pa.int64()), (pa.float32(), pa.float64())}


def _python_type(arrow: pa.DataType) -> type:
    """The Python type fastavro reads values of ``arrow`` as (logical types raw)."""
    import decimal

    if pa.types.is_boolean(arrow):
        return bool
    if pa.types.is_integer(arrow) or pa.types.is_temporal(arrow):
        return int
    if pa.types.is_floating(arrow):
        return float
    if pa.types.is_string(arrow):
        return str
    if pa.types.is_binary(arrow):
        return bytes
    if pa.types.is_decimal(arrow):
        return decimal.Decimal
    if pa.types.is_list(arrow):
        return list
    if pa.types.is_struct(arrow) or pa.types.is_map(arrow):
        return dict
    return type(None)


def _branch_name(t: Any) -> str:
    if isinstance(t, str):
        return t.rpartition(".")[2]
    if isinstance(t, dict):
        logical = t.get("logicalType")
        if isinstance(logical, str):
            return logical
        name = t.get("name")
        if isinstance(name, str) and t.get("type") in ("record", "enum", "fixed"):
            return name
        kind = t.get("type")
        return kind if isinstance(kind, str) else _branch_name(kind)
    return "union"


def _union_fix(by_type: dict[type, tuple[str, _Fix | None]]) -> _Fix:
    def fix(value: Any) -> Any:
        if value is None:
            return None
        name, sub = by_type[type(value)]
        return {name: value if sub is None else sub(value)}

    return fix


def _record_fix(fixes: dict[str, _Fix]) -> _Fix:
    def fix(record: Any) -> Any:
        if record is None:
            return None
        for name, sub in fixes.items():
            value = record.get(name)
            if value is not None:
                record[name] = sub(value)
        return record

    return fix


def _array_fix(sub: _Fix) -> _Fix:
    return lambda items: None if items is None else [sub(v) for v in items]


def _map_fix(sub: _Fix) -> _Fix:
    return lambda m: None if m is None else {k: sub(v) for k, v in m.items()}


def _name(t: Any) -> str:
    if isinstance(t, dict):
        return str(t.get("name") or t.get("type"))
    return str(t)


def _strip_logical(t: Any) -> Any:
    """``t`` without the logical types read as raw numbers (decimal stays)."""
    if isinstance(t, list):
        return [_strip_logical(b) for b in t]
    if not isinstance(t, dict):
        return t
    out = {k: v for k, v in t.items() if not (k == "logicalType" and v in _RAW_LOGICAL)}
    if "fields" in out:
        out["fields"] = [{**f, "type": _strip_logical(f["type"])} for f in out["fields"]]
    for key in ("items", "values"):
        if key in out:
            out[key] = _strip_logical(out[key])
    if isinstance(out.get("type"), (dict, list)):
        out["type"] = _strip_logical(out["type"])
    return out


def build_codec(schema: RegisteredSchema, client: RegistryClient) -> AvroCodec:
    """A codec for ``schema``; Avro references (named types registered under
    other subjects) are fetched and parsed first."""
    named: dict[str, Any] = {}
    refs: list[Any] = []
    for _, subject, version in schema.references:
        ref = json.loads(client.version(subject, version).text)
        fastavro.parse_schema(_strip_logical(ref), named_schemas=named)
        refs.append(ref)
    return AvroCodec(schema.text, named, refs)
