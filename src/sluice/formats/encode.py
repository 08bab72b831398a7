"""Rows as message payloads for broker targets: JSON, raw bytes, or Avro through a registry.

:class:`Encoder` turns a batch into one payload per row, column at a time
where Arrow can (JSON text via :mod:`sluice.formats.jsontext`, a binary
column as is). Avro goes through the registry: the Avro schema is derived
from the batch's Arrow schema (every field a union with null, default null,
so a later batch's new column is a BACKWARD-compatible new version), its id
comes from registering it under the subject (``auto_register``, ours) or
looking it up (the subject must then hold exactly that schema), and each
payload is magic byte 0 + the 4-byte id + the Avro body (fastavro, one
compiled call per row).

Arrow → Avro: int8..int32 / uint8..uint16 → int; int64 / uint32 / uint64 →
long; float32 → float; float64 → double; bool → boolean; string → string;
binary → bytes; timestamp with a zone → long ``timestamp-micros``, without
→ ``local-timestamp-micros``; date32 → int ``date``; decimal → bytes
``decimal``; list → array; struct → record; map with string keys → map.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from sluice.errors import ConnectorError
from sluice.formats.jsontext import to_json_text
from sluice.formats.registry import RegistryClient, UnknownSchema

Strategy = Literal["topic_name", "record_name", "topic_record_name"]


def json_payloads(table: pa.Table) -> list[Any]:
    """One JSON object (``str``) per row."""
    if table.num_columns == 0:
        return ["{}"] * table.num_rows
    rows = pa.StructArray.from_arrays(
        [c.combine_chunks() for c in table.columns], names=table.column_names
    )
    return list(to_json_text(rows).to_pylist())


def raw_payloads(table: pa.Table, column: str) -> list[Any]:
    """The bytes of ``column`` (binary or string) per row."""
    if column not in table.column_names:
        raise ConnectorError(
            f"payload_format 'raw_bytes' writes column {column!r}, which the batch does not have "
            f"(columns: {', '.join(table.column_names)})"
        )
    values = table[column]
    if not (pa.types.is_binary(values.type) or pa.types.is_string(values.type)):
        values = pc.cast(values, pa.string())
    return list(values.to_pylist())


class AvroEncoder:
    """Avro payloads with their schema registered (or looked up) in the registry."""

    def __init__(
        self,
        client: RegistryClient,
        topic: str,
        *,
        auto_register: bool,
        strategy: Strategy,
        record_name: str | None,
    ) -> None:
        self.client = client
        self.topic = topic
        self.auto_register = auto_register
        self.strategy = strategy
        self.record_name = record_name or _avro_name(topic)
        self._schemas: dict[pa.Schema, tuple[bytes, Any]] = {}

    def subject(self) -> str:
        """The subject the value schema lives under (Confluent's strategies)."""
        if self.strategy == "record_name":
            return self.record_name
        if self.strategy == "topic_record_name":
            return f"{self.topic}-{self.record_name}"
        return f"{self.topic}-value"

    def payloads(self, table: pa.Table) -> list[bytes]:
        """One framed Avro payload per row."""
        import fastavro

        prefix, parsed = self._schema(table.schema)
        write = fastavro.schemaless_writer
        out: list[bytes] = []
        for row in table.to_pylist():
            buf = io.BytesIO()
            buf.write(prefix)
            write(buf, parsed, row)
            out.append(buf.getvalue())
        return out

    def _schema(self, schema: pa.Schema) -> tuple[bytes, Any]:
        known = self._schemas.get(schema)
        if known is not None:
            return known
        import fastavro

        names: set[str] = set()
        avro = {
            "type": "record",
            "name": self.record_name,
            "fields": [_avro_field(f, names) for f in schema],
        }
        text = json.dumps(avro, separators=(",", ":"))
        subject = self.subject()
        if self.auto_register:
            schema_id = self.client.register(subject, text, "AVRO")
        else:
            try:
                schema_id = self.client.lookup(subject, text, "AVRO")
            except UnknownSchema as exc:
                raise ConnectorError(
                    f"the batch's Avro schema is not registered under subject {subject!r} "
                    f"(register it, or set auto_register = true): {text}"
                ) from exc
        prefix = b"\x00" + schema_id.to_bytes(4, "big")
        known = self._schemas[schema] = (prefix, fastavro.parse_schema(avro))
        return known


def _avro_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", text)
    return name if re.match(r"[A-Za-z_]", name) else f"_{name}"


def _avro_field(field: pa.Field, names: set[str]) -> dict[str, Any]:
    return {
        "name": _avro_name(field.name),
        "type": ["null", _avro_type(field.type, field.name, names)],
        "default": None,
    }


def _avro_type(t: pa.DataType, name: str, names: set[str]) -> Any:
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_int32(t):
        return "int"
    if pa.types.is_uint8(t) or pa.types.is_uint16(t):
        return "int"
    if pa.types.is_integer(t):
        return "long"
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return "float"
    if pa.types.is_float64(t):
        return "double"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return "bytes"
    if pa.types.is_timestamp(t):
        logical = "timestamp-micros" if t.tz else "local-timestamp-micros"
        return {"type": "long", "logicalType": logical}
    if pa.types.is_date(t):
        return {"type": "int", "logicalType": "date"}
    if pa.types.is_decimal(t):
        return {
            "type": "bytes",
            "logicalType": "decimal",
            "precision": t.precision,
            "scale": t.scale,
        }
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return {"type": "array", "items": ["null", _avro_type(t.value_type, name, names)]}
    if pa.types.is_map(t) and pa.types.is_string(t.key_type):
        return {"type": "map", "values": ["null", _avro_type(t.item_type, name, names)]}
    if pa.types.is_struct(t):
        record = _avro_name(name)
        while record in names:
            record += "_"
        names.add(record)
        return {
            "type": "record",
            "name": record,
            "fields": [_avro_field(t.field(i), names) for i in range(t.num_fields)],
        }
    raise ConnectorError(f"column {name!r} of type {t} has no Avro encoding in sluice")
