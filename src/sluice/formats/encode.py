"""Rows as message payloads for broker targets: JSON, raw bytes, or Avro /
Protobuf / JSON Schema through a schema registry.

:class:`PayloadEncoder` is the one encoder of every broker target whose
messages are bytes (Kafka, RabbitMQ, Pub/Sub, Kinesis), built from the
keys of :class:`sluice.config.payload.EncodedTargetSpec` and the target's
destination name (the "topic" of the subject naming strategies: the Kafka
topic, the RabbitMQ queue, the Pub/Sub topic's short name, the Kinesis
stream).

:class:`Encoder` turns a batch into one payload per row, column at a time
where Arrow can (JSON text via :mod:`sluice.formats.jsontext`, a binary
column as is). Avro goes through the registry: the Avro schema is derived
from the batch's Arrow schema (every field a union with null, default null,
so a later batch's new column is a BACKWARD-compatible new version), its id
comes from registering it under the subject (``auto_register``, ours) or
looking it up (the subject must then hold exactly that schema), and each
payload is magic byte 0 + the 4-byte id + the Avro body (fastavro, one
compiled call per row).

Protobuf is the same with a proto3 message derived from the Arrow schema
(registered as its base64 ``FileDescriptorProto``, as confluent-kafka's
serializer does), every scalar field ``optional`` so that null stays null,
and payloads magic byte 0 + id + the message index ``[0]`` + the body.
Arrow → Protobuf: ints → int32 / int64 / uint32 / uint64, floats → float /
double, bool, string, binary → bytes, timestamp → google.protobuf.Timestamp,
struct → a nested message, list → repeated, map with string keys → map;
date, time and decimal columns are written as their text.

JSON Schema (``payload_format = "json_schema"``): the JSON text of
:mod:`sluice.formats.jsontext` framed by magic byte 0 + the 4-byte id of a
draft-07 schema derived from the Arrow schema (registered as schemaType
``JSON``): an ``object`` titled by the record name, one property per column,
each ``[<type>, "null"]``: integers ``integer``; floats, decimals and
durations ``number``; bool ``boolean``; strings and binary (``"\\x…"`` hex)
``string``; timestamps ``string`` ``format: date-time``, dates ``date``,
times plain; lists ``array`` with ``items``; structs ``object`` with
``properties``; maps ``object`` with ``additionalProperties``. Objects stay
open (no ``additionalProperties: false``), so a later batch's new column is
a compatible new version.

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

from sluice.errors import ConnectorError, TransientError
from sluice.formats.jsontext import to_json_text
from sluice.formats.registry import RegistryClient, UnknownSchema

Strategy = Literal["topic_name", "record_name", "topic_record_name"]
PayloadFormat = Literal["json", "raw_bytes", "avro", "protobuf", "json_schema"]


def json_payloads(table: pa.Table) -> list[bytes]:
    """One JSON object per row (column at a time, no Python per field)."""
    if table.num_columns == 0:
        return [b"{}"] * table.num_rows
    rows = pa.StructArray.from_arrays(
        [c.combine_chunks() for c in table.columns], names=table.column_names
    )
    return list(to_json_text(rows).cast(pa.binary()).to_pylist())


def raw_payloads(table: pa.Table, column: str) -> list[bytes | None]:
    """The bytes of ``column`` (binary, or any other type as its text) per row
    (a null stays ``None``)."""
    if column not in table.column_names:
        raise ConnectorError(
            f"payload_format 'raw_bytes' writes column {column!r}, which the batch does not have "
            f"(columns: {', '.join(table.column_names)})"
        )
    values = table[column]
    if not pa.types.is_binary(values.type):
        if not pa.types.is_string(values.type):
            values = pc.cast(values, pa.string())
        values = pc.cast(values, pa.binary())
    return list(values.to_pylist())


class PayloadEncoder:
    """One payload (bytes) per row in the target's ``payload_format``.

    ``spec`` has the keys of :class:`sluice.config.payload.EncodedTargetSpec`;
    ``name`` is the destination (topic / queue / stream) the subject
    strategies name; ``what`` names the target in errors. The registry is
    reached on the first batch (a schema is registered or looked up once per
    Arrow schema).
    """

    def __init__(self, spec: Any, name: str, what: str) -> None:
        self.format: PayloadFormat = spec.payload_format
        self.value_column: str = spec.value_column
        self.what = what
        self._registry: AvroEncoder | ProtobufEncoder | JsonSchemaEncoder | None = None
        if self.format in ("avro", "protobuf", "json_schema"):
            if not spec.schema_registry_url:
                raise ConnectorError(
                    f"{what}: payload_format '{self.format}' needs schema_registry_url"
                )
            from sluice.formats.registry import RegistrySettings, client_for

            settings = RegistrySettings(
                spec.schema_registry_url,
                spec.schema_registry_basic_auth_user,
                spec.schema_registry_basic_auth_password,
            )
            cls = {
                "avro": AvroEncoder,
                "protobuf": ProtobufEncoder,
                "json_schema": JsonSchemaEncoder,
            }[self.format]
            self._registry = cls(
                client_for(settings),
                name,
                auto_register=spec.auto_register,
                strategy=spec.subject_name_strategy,
                record_name=spec.avro_record_name,
            )

    @property
    def content_type(self) -> str:
        """The MIME type of the payloads (for brokers with message properties)."""
        return "application/json" if self.format == "json" else "application/octet-stream"

    def payloads(self, table: pa.Table) -> list[bytes | None]:
        """One payload per row of ``table``, in order (``None``: a null
        ``raw_bytes`` value, a Kafka tombstone)."""
        if self._registry is not None:
            try:
                return list[bytes | None](self._registry.payloads(table))
            except TransientError:
                raise  # the registry did not answer: names its URL already
            except ConnectorError as exc:
                raise ConnectorError(f"{self.what}: {exc}") from exc
        if self.format == "raw_bytes":
            return raw_payloads(table, self.value_column)
        return list(json_payloads(table))

    def bodies(self, table: pa.Table) -> list[bytes]:
        """:meth:`payloads` for brokers without tombstones: a null is an empty body."""
        return [b"" if p is None else p for p in self.payloads(table)]


class _Subject:
    """Where a derived schema is registered, and how its id is found."""

    kind = ""  # AVRO, PROTOBUF or JSON

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

    def schema_id(self, text: str) -> int:
        """The id of ``text`` under :meth:`subject`: registered (``auto_register``)
        or looked up. Raises :class:`ConnectorError` when it is not registered."""
        subject = self.subject()
        if self.auto_register:
            return self.client.register(subject, text, self.kind)
        try:
            return self.client.lookup(subject, text, self.kind)
        except UnknownSchema as exc:
            raise ConnectorError(
                f"the batch's {self.kind} schema is not registered under subject {subject!r} "
                f"(register it, or set auto_register = true): {text}"
            ) from exc


class AvroEncoder(_Subject):
    """Avro payloads with their schema registered (or looked up) in the registry."""

    kind = "AVRO"

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
        schema_id = self.schema_id(json.dumps(avro, separators=(",", ":")))
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


class JsonSchemaEncoder(_Subject):
    """JSON payloads framed with the id of a JSON schema derived from the batch."""

    kind = "JSON"

    def payloads(self, table: pa.Table) -> list[bytes]:
        """One framed JSON object per row (the JSON built column at a time)."""
        prefix = self._prefix(table.schema)
        return [prefix + body for body in json_payloads(table)]

    def _prefix(self, schema: pa.Schema) -> bytes:
        known = self._schemas.get(schema)
        if known is not None:
            return known[0]
        document = {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "title": self.record_name,
            "type": "object",
            "properties": {f.name: _json_schema(f.type, f.name) for f in schema},
        }
        schema_id = self.schema_id(json.dumps(document, separators=(",", ":")))
        prefix = b"\x00" + schema_id.to_bytes(4, "big")
        self._schemas[schema] = (prefix, document)
        return prefix


def _json_schema(t: pa.DataType, name: str) -> dict[str, Any]:
    """The JSON schema of the JSON :func:`to_json_text` writes for ``t`` (null allowed)."""
    out: dict[str, Any]
    if pa.types.is_dictionary(t):
        return _json_schema(t.value_type, name)
    if pa.types.is_boolean(t):
        out = {"type": "boolean"}
    elif pa.types.is_integer(t):
        out = {"type": "integer"}
    elif pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_duration(t):
        out = {"type": "number"}
    elif (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
    ):
        out = {"type": "string"}
    elif pa.types.is_timestamp(t):
        out = {"type": "string", "format": "date-time"}
    elif pa.types.is_date(t):
        out = {"type": "string", "format": "date"}
    elif pa.types.is_time(t):
        out = {"type": "string"}  # no zone, so not RFC 3339's "time"
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        out = {"type": "array", "items": _json_schema(t.value_type, name)}
    elif pa.types.is_map(t):
        out = {"type": "object", "additionalProperties": _json_schema(t.item_type, name)}
    elif pa.types.is_struct(t):
        out = {
            "type": "object",
            "properties": {
                t.field(i).name: _json_schema(t.field(i).type, t.field(i).name)
                for i in range(t.num_fields)
            },
        }
    elif pa.types.is_null(t):
        return {"type": "null"}
    else:
        raise ConnectorError(f"column {name!r} of type {t} has no JSON Schema encoding in sluice")
    out["type"] = [out["type"], "null"]
    return out


class ProtobufEncoder(_Subject):
    """Protobuf payloads of a proto3 message derived from the batch's Arrow schema."""

    kind = "PROTOBUF"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._messages: dict[pa.Schema, tuple[bytes, Any, dict[str, str]]] = {}

    def payloads(self, table: pa.Table) -> list[bytes]:
        """One framed Protobuf payload per row (one constructor call per row)."""
        prefix, cls, names = self._message(table.schema)
        columns = []
        for name in table.column_names:
            column = table[name]
            t = column.type
            if pa.types.is_date(t) or pa.types.is_time(t) or pa.types.is_decimal(t):
                column = pc.cast(column, pa.string())
            columns.append(column)
        rows = pa.Table.from_arrays(columns, names=[names[n] for n in table.column_names])
        return [prefix + cls(**row).SerializeToString() for row in rows.to_pylist()]

    def _message(self, schema: pa.Schema) -> tuple[bytes, Any, dict[str, str]]:
        known = self._messages.get(schema)
        if known is not None:
            return known
        import base64

        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

        name = self.record_name
        fd = descriptor_pb2.FileDescriptorProto(
            name=f"sluice_{name}.proto", package="sluice", syntax="proto3"
        )
        message = fd.message_type.add(name=name)
        names = {f.name: _avro_name(f.name) for f in schema}
        uses_ts = _proto_fields(
            message, [(names[f.name], f.type) for f in schema], f".sluice.{name}"
        )
        if uses_ts:
            fd.dependency.append("google/protobuf/timestamp.proto")
        pool = descriptor_pool.DescriptorPool()
        if uses_ts:
            ts = descriptor_pb2.FileDescriptorProto()
            timestamp_pb2.DESCRIPTOR.CopyToProto(ts)
            pool.Add(ts)
        pool.Add(fd)
        cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"sluice.{name}"))
        text = base64.standard_b64encode(fd.SerializeToString()).decode("ascii")
        prefix = b"\x00" + self.schema_id(text).to_bytes(4, "big") + b"\x00"  # index [0]
        known = self._messages[schema] = (prefix, cls, names)
        return known


def _proto_scalar(t: pa.DataType) -> int | None:
    from google.protobuf.descriptor_pb2 import FieldDescriptorProto as F

    if pa.types.is_boolean(t):
        return int(F.TYPE_BOOL)
    if pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_int32(t):
        return int(F.TYPE_INT32)
    if pa.types.is_int64(t):
        return int(F.TYPE_INT64)
    if pa.types.is_uint8(t) or pa.types.is_uint16(t) or pa.types.is_uint32(t):
        return int(F.TYPE_UINT32)
    if pa.types.is_uint64(t):
        return int(F.TYPE_UINT64)
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return int(F.TYPE_FLOAT)
    if pa.types.is_float64(t):
        return int(F.TYPE_DOUBLE)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return int(F.TYPE_STRING)
    if pa.types.is_date(t) or pa.types.is_time(t) or pa.types.is_decimal(t):
        return int(F.TYPE_STRING)  # written as text (see the module docstring)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return int(F.TYPE_BYTES)
    return None


def _proto_fields(message: Any, fields: list[tuple[str, pa.DataType]], path: str) -> bool:
    """Add ``fields`` to the ``DescriptorProto`` ``message`` (full name ``path``);
    whether a Timestamp is used."""
    from google.protobuf.descriptor_pb2 import FieldDescriptorProto as F

    uses_ts = False
    for number, (name, t) in enumerate(fields, start=1):
        field = message.field.add(name=name, number=number)
        field.label = F.LABEL_OPTIONAL
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            field.label = F.LABEL_REPEATED
            t = t.value_type
            if pa.types.is_list(t) or pa.types.is_map(t):
                raise ConnectorError(
                    f"column {name!r}: a list of lists / maps has no Protobuf field"
                )
        elif pa.types.is_map(t):
            if not pa.types.is_string(t.key_type):
                raise ConnectorError(f"column {name!r}: only maps with string keys encode")
            entry = message.nested_type.add(name=f"{name.capitalize()}Entry")
            entry.options.map_entry = True
            uses_ts |= _proto_fields(
                entry, [("key", t.key_type), ("value", t.item_type)], f"{path}.{entry.name}"
            )
            for sub in entry.field:  # map entries have no optional fields
                sub.ClearField("proto3_optional")
                sub.ClearField("oneof_index")
            entry.ClearField("oneof_decl")
            field.label = F.LABEL_REPEATED
            field.type = F.TYPE_MESSAGE
            field.type_name = f"{path}.{entry.name}"
            continue
        scalar = _proto_scalar(t)
        if scalar is not None:
            field.type = scalar
            if field.label != F.LABEL_REPEATED:
                field.proto3_optional = True  # null stays null: presence
                field.oneof_index = len(message.oneof_decl)
                message.oneof_decl.add(name=f"_{name}")
        elif pa.types.is_timestamp(t):
            field.type = F.TYPE_MESSAGE
            field.type_name = ".google.protobuf.Timestamp"
            uses_ts = True
        elif pa.types.is_struct(t):
            nested = message.nested_type.add(name=f"{name.capitalize()}Message")
            sub = [(t.field(i).name, t.field(i).type) for i in range(t.num_fields)]
            uses_ts |= _proto_fields(nested, sub, f"{path}.{nested.name}")
            field.type = F.TYPE_MESSAGE
            field.type_name = f"{path}.{nested.name}"
        else:
            raise ConnectorError(f"column {name!r} of type {t} has no Protobuf encoding in sluice")
    return uses_ts
