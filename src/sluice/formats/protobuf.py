"""Protobuf bodies into Arrow, with message classes built from the registry's schema.

No generated classes: the registry's schema (asked for in its serialized
form, a base64 ``FileDescriptorProto``, which Confluent's registry serves
with ``?format=serialized`` and confluent-kafka's Python serializer
registers) and its references go into a private descriptor pool, and the
message the payload's index array names (``[0]`` the first top-level
message, ``[1, 0]`` the first message nested in the second) gets its class
from it. ``google/protobuf/*`` imports come from the protobuf runtime.

Types, Protobuf → Arrow (every column nullable):

================================  ==================================================
double / float                    float64 / float32
int32, sint32, sfixed32 / uint32  int32 / uint32 (64-bit alike)
bool / string / bytes / enum      bool / string / binary / string (the value's name)
message                           struct (null when the field is not set)
repeated T / map<K, V>            list<T> / map<K, V>
google.protobuf.Timestamp         timestamp[us, UTC]
wrappers (Int64Value, ...)        the wrapped type, null when not set
``optional`` scalar (proto3)      null when not set; plain proto3 scalars are never null
================================  ==================================================

Each body is parsed by the C runtime (upb); columns are then read one field
at a time across the whole batch (a list comprehension per column, numpy for
timestamps), never a Python call per field of a row.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import pyarrow as pa

from sluice.errors import ConnectorError
from sluice.formats.registry import RegisteredSchema, RegistryClient

try:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from google.protobuf.descriptor import Descriptor, FieldDescriptor
    from google.protobuf.message import DecodeError
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
    raise ModuleNotFoundError("google.protobuf", name="google.protobuf") from exc

_TS = "google.protobuf.Timestamp"
_WRAPPERS = {
    "google.protobuf.DoubleValue": pa.float64(),
    "google.protobuf.FloatValue": pa.float32(),
    "google.protobuf.Int64Value": pa.int64(),
    "google.protobuf.UInt64Value": pa.uint64(),
    "google.protobuf.Int32Value": pa.int32(),
    "google.protobuf.UInt32Value": pa.uint32(),
    "google.protobuf.BoolValue": pa.bool_(),
    "google.protobuf.StringValue": pa.string(),
    "google.protobuf.BytesValue": pa.binary(),
}
_F = FieldDescriptor
_SCALAR = {
    _F.TYPE_DOUBLE: pa.float64(),
    _F.TYPE_FLOAT: pa.float32(),
    _F.TYPE_INT64: pa.int64(),
    _F.TYPE_SINT64: pa.int64(),
    _F.TYPE_SFIXED64: pa.int64(),
    _F.TYPE_UINT64: pa.uint64(),
    _F.TYPE_FIXED64: pa.uint64(),
    _F.TYPE_INT32: pa.int32(),
    _F.TYPE_SINT32: pa.int32(),
    _F.TYPE_SFIXED32: pa.int32(),
    _F.TYPE_UINT32: pa.uint32(),
    _F.TYPE_FIXED32: pa.uint32(),
    _F.TYPE_BOOL: pa.bool_(),
    _F.TYPE_STRING: pa.string(),
    _F.TYPE_BYTES: pa.binary(),
    _F.TYPE_ENUM: pa.string(),
}


def _file_proto(schema: RegisteredSchema) -> descriptor_pb2.FileDescriptorProto:
    try:
        raw = base64.b64decode(schema.text, validate=True)
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
    except (binascii.Error, DecodeError, ValueError) as exc:
        raise ConnectorError(
            "the registry returned the schema as .proto text; sluice reads the serialized "
            "form (GET /schemas/ids/ID?format=serialized), which this registry did not give"
        ) from exc
    return proto


def _builtin(name: str) -> descriptor_pb2.FileDescriptorProto | None:
    """A ``google/protobuf/*.proto`` file from the runtime's own pool."""
    import importlib

    module = name.removesuffix(".proto").replace("/", ".") + "_pb2"
    try:
        file = importlib.import_module(module).DESCRIPTOR
    except ModuleNotFoundError:
        return None
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


class ProtobufCodec:
    """The messages of one registered Protobuf schema (a file and its imports)."""

    def __init__(self, schema: RegisteredSchema, client: RegistryClient) -> None:
        self._pool = descriptor_pool.DescriptorPool()
        self._added: set[str] = set()
        main = _file_proto(schema)
        refs = {name: (subject, version) for name, subject, version in schema.references}
        self._add(main, refs, client)
        self._file = main
        self._views: dict[tuple[int, ...], MessageCodec] = {}
        self.schema = self.view((0,)).schema if main.message_type else pa.schema([])

    def _add(
        self,
        proto: descriptor_pb2.FileDescriptorProto,
        refs: dict[str, tuple[str, int]],
        client: RegistryClient,
    ) -> None:
        if proto.name in self._added:
            return
        for dep in proto.dependency:
            if dep in self._added:
                continue
            if dep in refs:
                ref = client.version(*refs[dep])
                sub_refs = {name: (s, v) for name, s, v in ref.references}
                self._add(_file_proto(ref), sub_refs, client)
                continue
            builtin = _builtin(dep) if dep.startswith("google/protobuf/") else None
            if builtin is None:
                raise ConnectorError(f"import {dep!r} is neither a reference nor a well-known type")
            self._add(builtin, {}, client)
        self._pool.Add(proto)
        self._added.add(proto.name)

    def view(self, indexes: tuple[int, ...]) -> MessageCodec:
        """The codec of the message at index path ``indexes``."""
        known = self._views.get(indexes)
        if known is not None:
            return known
        names: list[str] = []
        level: Any = self._file.message_type
        for i in indexes:
            if i >= len(level):
                raise ConnectorError(f"message index {list(indexes)} is not in the schema")
            names.append(level[i].name)
            level = level[i].nested_type
        package = f"{self._file.package}." if self._file.package else ""
        desc = self._pool.FindMessageTypeByName(package + ".".join(names))
        codec = self._views[indexes] = MessageCodec(desc)
        return codec

    def decode(self, bodies: list[bytes]) -> tuple[pa.Table, list[tuple[int, str]]]:
        """The first message's codec decodes ``bodies``."""
        return self.view((0,)).decode(bodies)


class MessageCodec:
    """Decodes bodies of one message type."""

    def __init__(self, desc: Descriptor) -> None:
        self.desc = desc
        self.cls = message_factory.GetMessageClass(desc)
        self.schema = pa.schema([pa.field(f.name, _type(f)) for f in desc.fields])

    def view(self, indexes: tuple[int, ...]) -> MessageCodec:
        """Itself (already one message)."""
        return self

    def decode(self, bodies: list[bytes]) -> tuple[pa.Table, list[tuple[int, str]]]:
        """See :class:`sluice.formats.confluent.Codec`."""
        parse = self.cls.FromString
        bad: list[tuple[int, str]] = []
        msgs: list[Any] = []
        for i, body in enumerate(bodies):
            try:
                msgs.append(parse(body))
            except DecodeError as exc:
                bad.append((i, f"body does not decode: {exc}"))
        if not msgs:
            return self.schema.empty_table(), bad
        arrays = [_column(f, msgs) for f in self.desc.fields]
        return pa.Table.from_arrays(arrays, schema=self.schema), bad


def _type(f: FieldDescriptor) -> pa.DataType:
    if _is_map(f):
        entry = f.message_type
        return pa.map_(_type(entry.fields_by_name["key"]), _type(entry.fields_by_name["value"]))
    inner = _message_type(f.message_type) if f.type == _F.TYPE_MESSAGE else _SCALAR[f.type]
    return pa.list_(inner) if _repeated(f) else inner


def _message_type(desc: Descriptor) -> pa.DataType:
    if desc.full_name == _TS:
        return pa.timestamp("us", tz="UTC")
    if desc.full_name in _WRAPPERS:
        return _WRAPPERS[desc.full_name]
    return pa.struct([pa.field(f.name, _type(f)) for f in desc.fields])


def _repeated(f: FieldDescriptor) -> bool:
    flag = getattr(f, "is_repeated", None)  # protobuf >= 6 (``label`` is gone from upb)
    return bool(f.label == _F.LABEL_REPEATED) if flag is None else bool(flag)


def _is_map(f: FieldDescriptor) -> bool:
    return bool(
        f.type == _F.TYPE_MESSAGE and _repeated(f) and f.message_type.GetOptions().map_entry
    )


def _column(f: FieldDescriptor, msgs: list[Any]) -> pa.Array:
    """Field ``f`` of every message, as one Arrow array."""
    name = f.name
    values = [getattr(m, name) for m in msgs]
    if _is_map(f):
        entry = f.message_type
        value_field = entry.fields_by_name["value"]
        if value_field.type == _F.TYPE_MESSAGE:
            keys = [k for v in values for k in v]
            items = [v[k] for v in values for k in v]
            lengths = [len(v) for v in values]
            offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32())
            key_arr = pa.array(keys, _type(entry.fields_by_name["key"]))
            return pa.MapArray.from_arrays(
                offsets, key_arr, _messages(value_field.message_type, items, None)
            )
        return pa.array([dict(v) for v in values], _type(f))
    if _repeated(f):
        if f.type == _F.TYPE_MESSAGE:
            flat = [x for v in values for x in v]
            lengths = [len(v) for v in values]
            offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32())
            return pa.ListArray.from_arrays(offsets, _messages(f.message_type, flat, None))
        if f.type == _F.TYPE_ENUM:
            names = {v.number: v.name for v in f.enum_type.values}
            return pa.array([[names.get(x) for x in v] for v in values], _type(f))
        return pa.array([list(v) for v in values], _type(f))
    missing = None
    if f.has_presence:
        missing = np.fromiter((not m.HasField(name) for m in msgs), dtype=bool, count=len(msgs))
    if f.type == _F.TYPE_MESSAGE:
        return _messages(f.message_type, values, missing)
    if f.type == _F.TYPE_ENUM:
        names = {v.number: v.name for v in f.enum_type.values}
        values = [names.get(v) for v in values]
    return pa.array(values, _SCALAR[f.type], mask=missing)


def _messages(desc: Descriptor, msgs: list[Any], missing: Any) -> pa.Array:
    """Sub-messages ``msgs`` of type ``desc`` as one array (``missing``: unset ones)."""
    full = desc.full_name
    if full == _TS:
        secs = np.fromiter((m.seconds for m in msgs), dtype=np.int64, count=len(msgs))
        nanos = np.fromiter((m.nanos for m in msgs), dtype=np.int64, count=len(msgs))
        micros = secs * 1_000_000 + nanos // 1000
        return pa.array(micros, pa.int64(), mask=missing).cast(pa.timestamp("us", tz="UTC"))
    if full in _WRAPPERS:
        return pa.array([m.value for m in msgs], _WRAPPERS[full], mask=missing)
    fields = list(desc.fields)
    children = [_column(f, msgs) for f in fields]
    mask = None if missing is None else pa.array(missing, pa.bool_())
    return pa.StructArray.from_arrays(
        children, fields=[pa.field(f.name, _type(f)) for f in fields], mask=mask
    )


def build_codec(schema: RegisteredSchema, client: RegistryClient) -> ProtobufCodec:
    """Registry hook of :class:`~sluice.formats.confluent.RegistryDecoder`."""
    return ProtobufCodec(schema, client)
