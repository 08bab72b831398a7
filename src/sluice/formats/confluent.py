"""Registry-framed payloads (Confluent wire format) into Arrow, in bulk.

Wire format: magic byte ``0``, the schema id (4 bytes, big-endian), then for
Protobuf the message-index array (zigzag varints: a count then the indexes;
a single ``0`` byte means ``[0]``, the first message), then the body. The
schema may name itself in a header instead (``__value_schema_id``; Confluent
writes magic ``1`` + the schema's 16-byte GUID there, or magic ``0`` + the
id; Protobuf indexes follow), and then the payload is the body alone.

:class:`RegistryDecoder` splits a batch by schema, decodes each group with
its format's :class:`Codec` (built once per schema id, from the registry's
schema), and keeps one Arrow schema for the stream by the JSON rule of
:mod:`sluice.formats.json`: the first schema is locked; a later writer
schema's new field becomes a new nullable column (the target adds it), a
new field inside a record a new struct field, and a number may widen
(``int`` -> ``long``, ``float`` -> ``double``: :func:`merge_types`); a
field whose type changed otherwise makes that schema's messages bad
(``on_error``).
Rows keep the order of the payloads.

Bad messages (reported by index, so the source names topic / partition /
offset and dead-letters the raw bytes): no value, a wrong magic byte, a
payload too short for its header, a schema id the registry does not know,
a body that does not decode, a schema incompatible with the stream's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from sluice.errors import ConnectorError
from sluice.formats.json import Decoded
from sluice.formats.registry import RegisteredSchema, RegistryClient, UnknownSchema

#: The headers that may carry the value's schema (Confluent's names).
VALUE_SCHEMA_HEADER = "__value_schema_id"

Headers = Sequence[tuple[str, bytes | None]] | None


class Codec(Protocol):
    """Decodes the bodies of one writer schema (one message type of it)."""

    #: The Arrow schema of what :meth:`decode` returns.
    schema: pa.Schema

    def view(self, indexes: tuple[int, ...]) -> Codec:
        """The codec of the message at Protobuf message index ``indexes``
        (Avro: itself). Raises :class:`ConnectorError` for an index the
        schema does not have."""
        ...

    def decode(self, bodies: list[bytes]) -> tuple[pa.Table, list[tuple[int, str]]]:
        """The decoded rows of ``bodies``, and the bad ones as (index into
        ``bodies``, reason); the table has a row per good body, in order."""
        ...


@dataclass(frozen=True, slots=True)
class Frame:
    """Where one payload's schema is and where its body starts."""

    key: int | str  # schema id, or GUID (from a header)
    start: int  # body offset in the payload
    indexes: tuple[int, ...]  # Protobuf message indexes ((0,) for the first)


class BadFrame(ValueError):
    """A payload whose header cannot be read."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A zigzag varint at ``pos``: (value, next position)."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise BadFrame("payload ends inside the message-index array")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return (value >> 1) ^ -(value & 1), pos
        if shift > 63:
            raise BadFrame("malformed varint in the message-index array")


def _indexes(data: bytes, pos: int) -> tuple[tuple[int, ...], int]:
    count, pos = _varint(data, pos)
    if count == 0:
        return (0,), pos
    if count < 0 or count > 64:
        raise BadFrame(f"message-index array of {count} entries")
    out = []
    for _ in range(count):
        value, pos = _varint(data, pos)
        if value < 0:
            raise BadFrame(f"negative message index {value}")
        out.append(value)
    return tuple(out), pos


def frame(payload: bytes, header: bytes | None, protobuf: bool) -> Frame:
    """Read the schema reference of one payload (``header``: its
    ``__value_schema_id`` header value, if any). Raises :class:`BadFrame`."""
    if header is not None:
        if len(header) >= 17 and header[0] == 1:
            import uuid

            key: int | str = str(uuid.UUID(bytes=bytes(header[1:17])))
            pos = 17
        elif len(header) >= 5 and header[0] == 0:
            key, pos = int.from_bytes(header[1:5], "big"), 5
        else:
            raise BadFrame(
                f"{VALUE_SCHEMA_HEADER} header: unknown format (magic byte {header[:1]!r})"
            )
        indexes = _indexes(header, pos)[0] if protobuf else (0,)
        return Frame(key, 0, indexes)
    if len(payload) < 5:
        raise BadFrame(f"payload of {len(payload)} bytes is shorter than the 5-byte schema header")
    if payload[0] != 0:
        raise BadFrame(f"wrong magic byte {payload[0]} (expected 0: Confluent wire format)")
    schema_id = int.from_bytes(payload[1:5], "big")
    if not protobuf:
        return Frame(schema_id, 5, (0,))
    indexes, pos = _indexes(payload, 5)
    return Frame(schema_id, pos, indexes)


Groups = dict[tuple[int | str, tuple[int, ...]], tuple[list[int], list[bytes]]]


def frame_all(
    payloads: Sequence[bytes | None], headers: Sequence[Headers] | None, protobuf: bool
) -> Groups | None:
    """The bodies of a batch grouped by (schema id, message indexes), their
    headers read with numpy over the joined payloads; ``None`` when some
    payload needs :func:`frame` one by one (no value, a short payload, a
    wrong magic byte, a schema in a header, Protobuf indexes other than the
    single ``0`` of the first message)."""
    n = len(payloads)
    if not n or None in payloads:
        return None
    if headers is not None and any(_schema_header(h) is not None for h in headers if h):
        return None
    skip = 6 if protobuf else 5
    lengths = np.fromiter(map(len, payloads), dtype=np.int64, count=n)  # type: ignore[arg-type]
    if int(lengths.min()) < skip:
        return None
    joined = np.frombuffer(b"".join(payloads), dtype=np.uint8)  # type: ignore[arg-type]
    starts = np.empty(n, dtype=np.int64)
    starts[0] = 0
    np.cumsum(lengths[:-1], out=starts[1:])
    if joined[starts].any() or (protobuf and joined[starts + 5].any()):
        return None
    ids = (
        (joined[starts + 1].astype(np.int64) << 24)
        | (joined[starts + 2].astype(np.int64) << 16)
        | (joined[starts + 3].astype(np.int64) << 8)
        | joined[starts + 4].astype(np.int64)
    )
    first = int(ids[0])
    if (ids == first).all():
        return {(first, (0,)): (list(range(n)), [p[skip:] for p in payloads])}  # type: ignore[index]
    groups: Groups = {}
    keys, first_seen = np.unique(ids, return_index=True)
    for key in keys[np.argsort(first_seen)].tolist():  # in order of appearance, as one by one
        index = np.flatnonzero(ids == key).tolist()
        groups[(key, (0,))] = (index, [payloads[i][skip:] for i in index])  # type: ignore[index]
    return groups


class CodecFactory(Protocol):
    """Builds the codec of one registered schema (once per schema id)."""

    def __call__(self, schema: RegisteredSchema, client: RegistryClient) -> Codec: ...


class RegistryDecoder:
    """``payload_format = "avro" | "protobuf"``: registry-framed payloads, one schema kept.

    :meth:`decode_with_headers` is the source's hook (headers give a schema
    id that is not in the payload). Raises :class:`TransientError` when the
    registry stays down (see :mod:`sluice.formats.registry`).
    """

    def __init__(self, name: str, client: RegistryClient, factory: CodecFactory) -> None:
        self.name = name
        self.client = client
        self._factory = factory
        self._protobuf = name == "protobuf"
        self._codecs: dict[int | str, Codec | str] = {}  # codec, or why the schema is unusable
        self._schema: pa.Schema | None = None

    @property
    def schema(self) -> pa.Schema | None:
        """The locked stream schema (``None`` before the first decoded row)."""
        return self._schema

    def decode(self, payloads: list[bytes | None], offsets: Sequence[int]) -> Decoded:
        """Payloads whose schema is in their prefix."""
        return self.decode_with_headers(payloads, None)

    def decode_with_headers(
        self, payloads: list[bytes | None], headers: Sequence[Headers] | None
    ) -> Decoded:
        """Payloads with their message headers (``None``: no headers)."""
        bad: list[tuple[int, str]] = []
        groups = frame_all(payloads, headers, self._protobuf)
        if groups is None:
            groups = self._frame_each(payloads, headers, bad)
        tables: list[pa.Table] = []
        rows: list[int] = []
        for (key, path), (index, bodies) in groups.items():
            codec = self._codec(key)
            if not isinstance(codec, str):
                try:
                    codec = codec.view(path)
                except ConnectorError as exc:
                    codec = f"{self.name} schema {key}: {exc}"
            if isinstance(codec, str):
                bad.extend((i, codec) for i in index)
                continue
            problem = self._merge(codec.schema, key)
            if problem is not None:
                bad.extend((i, problem) for i in index)
                continue
            try:
                table, group_bad = codec.decode(bodies)
            except ConnectorError as exc:  # values the Arrow types cannot hold (a whole group)
                bad.extend((i, f"{self.name} schema {key}: {exc}") for i in index)
                continue
            bad.extend((index[j], f"{self.name} schema {key}: {why}") for j, why in group_bad)
            if group_bad:
                dropped = {j for j, _ in group_bad}
                index = [x for j, x in enumerate(index) if j not in dropped]
            tables.append(table)
            rows.extend(index)
        bad.sort()
        if not tables:
            return Decoded(pa.table({}), bad, [])
        schema = self._schema
        assert schema is not None  # set by _merge before any table
        table = pa.concat_tables([_conform(t, schema) for t in tables])
        if len(tables) > 1 or bad:
            order = np.argsort(np.asarray(rows, dtype=np.int64), kind="stable")
            if len(tables) > 1:
                table = table.take(pa.array(order))
            rows = [rows[k] for k in order]
        if not bad and len(rows) == len(payloads):
            return Decoded(table)
        return Decoded(table, bad, rows)

    def _frame_each(
        self,
        payloads: list[bytes | None],
        headers: Sequence[Headers] | None,
        bad: list[tuple[int, str]],
    ) -> Groups:
        """:func:`frame_all` one payload at a time (the bad ones into ``bad``)."""
        groups: Groups = {}
        for i, payload in enumerate(payloads):
            if payload is None:
                bad.append((i, "message has no value (tombstone)"))
                continue
            header = _schema_header(headers[i]) if headers is not None else None
            try:
                f = frame(payload, header, self._protobuf)
            except BadFrame as exc:
                bad.append((i, str(exc)))
                continue
            group = groups.get((f.key, f.indexes))
            if group is None:
                group = groups[(f.key, f.indexes)] = ([], [])
            group[0].append(i)
            group[1].append(payload[f.start :] if f.start else payload)
        return groups

    def _codec(self, key: int | str) -> Codec | str:
        codec = self._codecs.get(key)
        if codec is not None:
            return codec
        try:
            registered = (
                self.client.by_guid(key) if isinstance(key, str) else self.client.schema(key)
            )
            if registered.schema_type != self.name.upper():
                raise ConnectorError(
                    f"it is a {registered.schema_type} schema, not {self.name.upper()}"
                )
            built: Codec | str = self._factory(registered, self.client)
        except UnknownSchema:
            built = f"schema id {key} is not in the schema registry"
        except ConnectorError as exc:
            built = f"{self.name} schema {key}: {exc}"
        self._codecs[key] = built
        return built

    def _merge(self, schema: pa.Schema, key: int | str) -> str | None:
        """Adopt ``schema`` into the stream's; why it does not fit, if it does not."""
        if self._schema is None:
            self._schema = schema
            return None
        known = {f.name: f for f in self._schema}
        merged = list(self._schema)
        for field in schema:
            before = known.get(field.name)
            if before is None:
                merged.append(field.with_nullable(True))
                continue
            wider = merge_types(before.type, field.type)
            if wider is None:
                return (
                    f"{self.name} schema {key}: field {field.name!r} is {field.type}, "
                    f"the stream's column is {before.type} (incompatible schema change)"
                )
            if not wider.equals(before.type):
                merged[merged.index(before)] = before.with_type(wider)
        self._schema = pa.schema(merged)
        return None


#: Numeric promotions a writer schema may make (Avro's int -> long, float -> double).
_PROMOTIONS = {
    (pa.int32(), pa.int64()),
    (pa.float32(), pa.float64()),
}


def merge_types(old: pa.DataType, new: pa.DataType) -> pa.DataType | None:
    """The column type that holds values of ``old`` and of ``new``, or ``None``.

    The top-level rule, inside records too: a struct gains the fields it did
    not have (a nested new optional field) and keeps those a writer no longer
    sends (null for it); numbers widen (int32 -> int64, float32 -> float64);
    lists and maps merge their items. Anything else (a string where a number
    was) has no common type.
    """
    if old.equals(new):
        return old
    if (old, new) in _PROMOTIONS:
        return new
    if (new, old) in _PROMOTIONS:
        return old
    if pa.types.is_struct(old) and pa.types.is_struct(new):
        out = [old.field(i) for i in range(old.num_fields)]
        names = [f.name for f in out]
        for i in range(new.num_fields):
            f = new.field(i)
            if f.name not in names:
                out.append(f.with_nullable(True))
                names.append(f.name)
                continue
            at = names.index(f.name)
            wider = merge_types(out[at].type, f.type)
            if wider is None:
                return None
            out[at] = out[at].with_type(wider)
        return pa.struct(out)
    if pa.types.is_list(old) and pa.types.is_list(new):
        item = merge_types(old.value_type, new.value_type)
        return None if item is None else pa.list_(item)
    if pa.types.is_map(old) and pa.types.is_map(new) and old.key_type.equals(new.key_type):
        item = merge_types(old.item_type, new.item_type)
        return None if item is None else pa.map_(old.key_type, item)
    return None


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in order (missing ones null)."""
    if table.schema.equals(schema):
        return table
    columns = [
        _cast(table[f.name].combine_chunks(), f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _cast(arr: pa.Array, to: pa.DataType) -> pa.Array:
    """``arr`` as ``to``, a type :func:`merge_types` made from its own."""
    if arr.type.equals(to):
        return arr
    if pa.types.is_struct(to) and pa.types.is_struct(arr.type):
        have = {arr.type.field(i).name for i in range(arr.type.num_fields)}
        children = [
            _cast(arr.field(f.name), f.type) if f.name in have else pa.nulls(len(arr), f.type)
            for f in to
        ]
        mask = arr.is_null() if arr.null_count else None
        return pa.StructArray.from_arrays(children, fields=list(to), mask=mask)
    if pa.types.is_list(to) and pa.types.is_list(arr.type) and arr.offset == 0:
        values = _cast(arr.values, to.value_type)
        mask = arr.is_null() if arr.null_count else None
        return pa.ListArray.from_arrays(arr.offsets, values, type=to, mask=mask)
    return arr.cast(to)


def _schema_header(headers: Headers) -> bytes | None:
    if not headers:
        return None
    for name, value in headers:
        if name == VALUE_SCHEMA_HEADER:
            return value
    return None
