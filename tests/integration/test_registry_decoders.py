"""The registry decoders in process, against the test registry (no broker).

Payloads come from confluent-kafka's serializers. What is checked here is
below the pipeline: the schema-evolution rule, an incompatible change, the
one-fetch-per-id cache shared by every decoder of a process.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from confluent_kafka.schema_registry import (
    ConfigCompatibilityLevel,
    SchemaRegistryClient,
    ServerConfig,
)
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from tests import endpoints

from sluice.formats import decoder_for
from sluice.formats.registry import RegistrySettings, client_for

pytestmark = pytest.mark.integration

SETTINGS = RegistrySettings(endpoints.SCHEMA_REGISTRY_URL)


def record(*fields: tuple[str, Any]) -> str:
    return json.dumps(
        {"type": "record", "name": "R", "fields": [{"name": n, "type": t} for n, t in fields]}
    )


def serialize(topic: str, schema: str, rows: list[dict[str, Any]]) -> list[bytes]:
    client = SchemaRegistryClient({"url": endpoints.SCHEMA_REGISTRY_URL})
    ser = AvroSerializer(client, schema)
    ctx = SerializationContext(topic, MessageField.VALUE)
    return [ser(r, ctx) for r in rows]


def test_new_optional_field_is_a_new_column_and_a_type_change_is_bad() -> None:
    topic = f"evo_{uuid.uuid4().hex[:8]}"
    v1 = serialize(topic, record(("id", "long"), ("name", "string")), [{"id": 1, "name": "a"}])
    v2_schema = json.dumps(
        {
            "type": "record",
            "name": "R",
            "fields": [
                {"name": "id", "type": "long"},
                {"name": "name", "type": "string"},
                {"name": "extra", "type": ["null", "double"], "default": None},
            ],
        }
    )
    v2 = serialize(topic, v2_schema, [{"id": 2, "name": "b", "extra": 1.5}])
    client = SchemaRegistryClient({"url": endpoints.SCHEMA_REGISTRY_URL})
    client.set_config(f"{topic}-value", ServerConfig(compatibility=ConfigCompatibilityLevel.NONE))
    changed = serialize(
        topic, record(("id", "string"), ("name", "string")), [{"id": "x", "name": "c"}]
    )
    assert changed[0][1:5] not in (v1[0][1:5], v2[0][1:5])

    dec = decoder_for("avro", None, "p", SETTINGS)
    first = dec.decode(v1, [0])
    assert first.table.column_names == ["id", "name"] and not first.bad
    mixed = dec.decode([v2[0], changed[0], v1[0]], [1, 2, 3])
    assert mixed.table.column_names == ["id", "name", "extra"]
    assert mixed.table.to_pylist() == [
        {"id": 2, "name": "b", "extra": 1.5},
        {"id": 1, "name": "a", "extra": None},
    ]
    assert mixed.rows == [0, 2]  # in payload order, the bad one left out
    ((index, why),) = mixed.bad
    assert index == 1 and "field 'id' is string, the stream's column is int64" in why


def test_one_fetch_per_schema_id_per_process() -> None:
    topic = f"once_{uuid.uuid4().hex[:8]}"
    payloads = serialize(topic, record(("id", "long")), [{"id": i} for i in range(10)])
    schema_id = int.from_bytes(payloads[0][1:5], "big")
    client = client_for(SETTINGS)
    before = client.fetches
    for _ in range(3):  # three decoders (three sources of one process), many batches
        dec = decoder_for("avro", None, "p", SETTINGS)
        for _ in range(5):
            assert dec.decode(payloads, list(range(10))).table.num_rows == 10
    assert client.fetches == before + 1
    assert client.schema(schema_id).schema_type == "AVRO"
    assert client.fetches == before + 1


def test_a_protobuf_schema_is_not_read_as_avro() -> None:
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
    from tests.protos import Address

    topic = f"kind_{uuid.uuid4().hex[:8]}"
    client = SchemaRegistryClient({"url": endpoints.SCHEMA_REGISTRY_URL})
    ser = ProtobufSerializer(Address, client, {"use.deprecated.format": False})
    payload = ser(Address(city="x"), SerializationContext(topic, MessageField.VALUE))
    decoded = decoder_for("avro", None, "p", SETTINGS).decode([payload], [0])
    ((_, why),) = decoded.bad
    assert "PROTOBUF schema, not AVRO" in why


def test_json_schema_payloads_validated_on_request() -> None:
    from confluent_kafka.schema_registry.json_schema import JSONSerializer

    topic = f"js_{uuid.uuid4().hex[:8]}"
    schema = json.dumps(
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "title": "Reading",
            "type": "object",
            "properties": {"id": {"type": "integer"}, "temp": {"type": "number", "maximum": 100}},
            "required": ["id", "temp"],
        }
    )
    client = SchemaRegistryClient({"url": endpoints.SCHEMA_REGISTRY_URL})
    ser = JSONSerializer(schema, client)
    ctx = SerializationContext(topic, MessageField.VALUE)
    good = [ser({"id": i, "temp": 20.5 + i}, ctx) for i in range(3)]
    prefix = good[0][:5]
    too_hot = prefix + b'{"id": 9, "temp": 250}'  # valid JSON, against the schema
    no_temp = prefix + b'{"id": 10}'
    payloads = [good[0], too_hot, good[1], no_temp, good[2], b"\x03junk"]

    checked = decoder_for("json_schema", None, "p", SETTINGS, validate=True).decode(payloads, [])
    assert checked.table.to_pylist() == [{"id": i, "temp": 20.5 + i} for i in range(3)]
    assert checked.rows == [0, 2, 4]
    reasons = dict(checked.bad)
    assert set(reasons) == {1, 3, 5}
    assert "at temp: 250 is greater than the maximum of 100" in reasons[1]
    assert "'temp' is a required property" in reasons[3]
    assert "wrong magic byte 3" in reasons[5]

    # Not asked for: the schema only frames the payloads; all decode as JSON.
    loose = decoder_for("json_schema", None, "p", SETTINGS).decode(payloads[:5], [])
    assert not loose.bad and loose.table.num_rows == 5


def test_avro_schema_with_a_reference() -> None:
    """A record that uses a named type registered under another subject."""
    from confluent_kafka.schema_registry import Schema, SchemaReference

    client = SchemaRegistryClient({"url": endpoints.SCHEMA_REGISTRY_URL})
    suffix = uuid.uuid4().hex[:8]
    addr = {
        "type": "record",
        "name": "Addr",
        "namespace": "ref",
        "fields": [{"name": "city", "type": "string"}],
    }
    client.register_schema(f"addr_{suffix}", Schema(json.dumps(addr), "AVRO"))
    person = {
        "type": "record",
        "name": "Person",
        "namespace": "ref",
        "fields": [{"name": "id", "type": "long"}, {"name": "home", "type": "ref.Addr"}],
    }
    topic = f"ref_{suffix}"
    schema = Schema(json.dumps(person), "AVRO", [SchemaReference("ref.Addr", f"addr_{suffix}", 1)])
    client.register_schema(f"{topic}-value", schema)
    ser = AvroSerializer(
        client, schema, conf={"auto.register.schemas": False, "use.latest.version": True}
    )
    payload = ser({"id": 1, "home": {"city": "x"}}, SerializationContext(topic, MessageField.VALUE))
    decoded = decoder_for("avro", None, "p", SETTINGS).decode([payload], [0])
    assert not decoded.bad, decoded.bad
    assert decoded.table.to_pylist() == [{"id": 1, "home": {"city": "x"}}]


def test_nested_field_added_and_int_widened_to_long() -> None:
    topic = f"nest_{uuid.uuid4().hex[:8]}"
    client = SchemaRegistryClient({"url": endpoints.SCHEMA_REGISTRY_URL})
    client.set_config(f"{topic}-value", ServerConfig(compatibility=ConfigCompatibilityLevel.NONE))

    def schema(count: str, extra: bool) -> str:
        inner = [{"name": "city", "type": "string"}]
        if extra:
            inner.append({"name": "zip", "type": ["null", "string"], "default": None})
        return json.dumps(
            {
                "type": "record",
                "name": "R",
                "fields": [
                    {"name": "n", "type": count},
                    {"name": "addr", "type": {"type": "record", "name": "A", "fields": inner}},
                    {"name": "tags", "type": {"type": "array", "items": "int"}},
                ],
            }
        )

    v1 = serialize(topic, schema("int", False), [{"n": 1, "addr": {"city": "a"}, "tags": [1]}])
    big = {"n": 2**40, "addr": {"city": "b", "zip": "z"}, "tags": [2, 3]}
    v2 = serialize(topic, schema("long", True), [big])
    dec = decoder_for("avro", None, "p", SETTINGS)
    assert dec.decode(v1, [0]).table.schema.field("n").type == "int32"
    both = dec.decode([v1[0], v2[0]], [1, 2])
    assert not both.bad, both.bad
    assert both.table.schema.field("n").type == "int64"
    assert both.table.to_pylist() == [
        {"n": 1, "addr": {"city": "a", "zip": None}, "tags": [1]},
        {"n": 2**40, "addr": {"city": "b", "zip": "z"}, "tags": [2, 3]},
    ]


def test_union_of_several_types_is_a_struct_of_its_branches() -> None:
    """``["null", "string", "long"]`` and friends (written by confluent-kafka's
    serializer): one struct field per branch, the written one set; alike
    branches merge (``["int", "long"]`` is int64); an ambiguous union
    (a record and a map) makes its messages bad, naming the branches."""
    import pyarrow as pa

    topic = f"union_{uuid.uuid4().hex[:8]}"
    point = {"type": "record", "name": "Point", "fields": [{"name": "x", "type": "int"}]}
    schema = record(
        ("id", "long"),
        ("u", ["null", "string", "long"]),
        ("n", ["int", "long"]),
        ("shape", ["null", point, {"type": "array", "items": ["int", "string"]}]),
        ("m", {"type": "map", "values": ["null", "double", "boolean"]}),
    )
    rows = [
        {"id": 1, "u": "a", "n": 1, "shape": {"x": 3}, "m": {"k": 1.5}},
        {"id": 2, "u": 7, "n": 2**40, "shape": [1, "two"], "m": {"k": True, "z": None}},
        {"id": 3, "u": None, "n": 3, "shape": None, "m": {}},
    ]
    dec = decoder_for("avro", None, "p", SETTINGS)
    got = dec.decode(serialize(topic, schema, rows), [0, 1, 2])
    assert not got.bad
    types = {f.name: f.type for f in got.table.schema}
    assert types["u"] == pa.struct([("string", pa.string()), ("long", pa.int64())])
    assert types["n"] == pa.int64()
    assert types["shape"] == pa.struct(
        [
            ("Point", pa.struct([("x", pa.int32())])),
            ("array", pa.list_(pa.struct([("int", pa.int32()), ("string", pa.string())]))),
        ]
    )
    assert types["m"] == pa.map_(
        pa.string(), pa.struct([("double", pa.float64()), ("boolean", pa.bool_())])
    )
    out = got.table.to_pylist()
    assert [r["u"] for r in out] == [
        {"string": "a", "long": None},
        {"string": None, "long": 7},
        None,
    ]
    assert [r["n"] for r in out] == [1, 2**40, 3]
    assert out[0]["shape"] == {"Point": {"x": 3}, "array": None}
    assert out[1]["shape"] == {
        "Point": None,
        "array": [{"int": 1, "string": None}, {"int": None, "string": "two"}],
    }
    assert out[2]["shape"] is None
    assert out[1]["m"] == [("k", {"double": None, "boolean": True}), ("z", None)]

    ambiguous = record(("f", ["null", point, {"type": "map", "values": "int"}]))
    bad = dec.decode(serialize(f"{topic}_x", ambiguous, [{"f": {"x": 1}}]), [3])
    ((index, why),) = bad.bad
    assert index == 0 and "a union of Point and map has no column type" in why
