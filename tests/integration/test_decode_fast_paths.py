"""The registry decoders' bulk paths give exactly what their per-message
paths give (Arrow types and values), against the test registry.

A batch takes the per-message path when one of its payloads is bad (here a
wrong magic byte appended at the end), so decoding the same messages with
and without that payload, each with a fresh decoder, compares the two
paths on real confluent-kafka payloads.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.serialization import MessageField, SerializationContext
from tests import endpoints

from sluice.formats import decoder_for
from sluice.formats.registry import RegistrySettings

pytestmark = pytest.mark.integration

SETTINGS = RegistrySettings(endpoints.SCHEMA_REGISTRY_URL)
JUNK = b"\x03junk"


def both_paths(fmt: str, payloads: list[bytes], **kw: Any) -> None:
    fast = decoder_for(fmt, None, "p", SETTINGS, **kw).decode(payloads, [])
    slow = decoder_for(fmt, None, "p", SETTINGS, **kw).decode([*payloads, JUNK], [])
    assert not fast.bad and fast.rows is None
    assert [i for i, _ in slow.bad] == [len(payloads)]
    assert fast.table.schema == slow.table.schema
    assert fast.table.equals(slow.table), (fast.table.slice(0, 3), slow.table.slice(0, 3))
    assert fast.table.num_rows == len(payloads)


def test_json_schema_bulk_path_matches_per_message_path() -> None:
    from confluent_kafka.schema_registry.json_schema import JSONSerializer

    client = SchemaRegistryClient({"url": endpoints.SCHEMA_REGISTRY_URL})
    topic = f"fastjs_{uuid.uuid4().hex[:8]}"
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Reading",
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "temp": {"type": "number", "maximum": 100},
            "tags": {"type": "array", "items": {"type": "string"}},
            "where": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
        "required": ["id", "temp"],
    }
    other = {**schema, "title": "Reading2"}  # a second schema id in the same batch
    ctx = SerializationContext(topic, MessageField.VALUE)
    rows = [
        {"id": i, "temp": i / 4, "tags": ["a", "b"][: i % 3], "where": {"city": f"c{i % 5}"}}
        for i in range(300)
    ]
    first = JSONSerializer(json.dumps(schema), client)
    payloads = [first(r, ctx) for r in rows]
    two = [
        *payloads,
        *(JSONSerializer(json.dumps(other), client)(r, ctx) for r in rows[:50]),
    ]
    assert len({p[1:5] for p in two}) == 2
    for validate in (False, True):
        for batch in (payloads, two):
            both_paths("json_schema", batch, validate=validate)
            dec = decoder_for("json_schema", None, "p", SETTINGS, validate=validate)
            assert dec._fast(batch, None) is not None  # the bulk path was the one compared
    # A body that fails validation in an otherwise good batch: found, the rest kept.
    hot = payloads[0][:5] + b'{"id": 9, "temp": 250}'
    got = decoder_for("json_schema", None, "p", SETTINGS, validate=True).decode(
        [*payloads[:10], hot], []
    )
    assert [i for i, _ in got.bad] == [10] and got.table.num_rows == 10


def avro_codecs(dec: Any) -> list[Any]:
    return list(dec._codecs.values())


def test_avro_native_path_matches_per_message_path() -> None:
    """Over the tests' and the benchmark's Avro schemas: a schema polars reads
    goes native after its first batch (both paths run on that one), and the
    native table equals the per-message one; a schema it cannot read alike
    (unions of several types, maps) stays on the per-message path."""
    from benchmarks.kafka_avro_to_postgres.decode_cost import UNIONS, WIDE
    from benchmarks.kafka_avro_to_postgres.run import EVENT_SCHEMA
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from tests.integration.test_registry_formats import EVENT_V2, event

    client = SchemaRegistryClient({"url": endpoints.SCHEMA_REGISTRY_URL})
    cases: list[tuple[dict[str, Any], list[dict[str, Any]], bool]] = [
        (EVENT_V2, [event(i, v2=True) for i in range(200)], True),
        (
            EVENT_SCHEMA,
            [
                {
                    f["name"]: {"long": i, "int": i, "string": f"s{i}", "double": i / 3}.get(
                        str(f["type"]), i % 2 == 0
                    )
                    for f in EVENT_SCHEMA["fields"]
                }
                for i in range(200)
            ],
            True,
        ),
        (
            WIDE,
            [{**event(i), "addr": {"city": "c"}, "tags": ["a"] * (i % 3)} for i in range(200)],
            True,
        ),
        (UNIONS, [{"id": i, "value": i, "ref": f"r{i}", "note": "n"} for i in range(50)], False),
        (
            {
                "type": "record",
                "name": "M",
                "fields": [{"name": "m", "type": {"type": "map", "values": "long"}}],
            },
            [{"m": {"a": i}} for i in range(50)],
            False,
        ),
    ]
    for schema, rows, native in cases:
        topic = f"native_{uuid.uuid4().hex[:8]}"
        ser = AvroSerializer(client, json.dumps(schema))
        ctx = SerializationContext(topic, MessageField.VALUE)
        payloads = [ser(r, ctx) for r in rows]
        dec = decoder_for("avro", None, "p", SETTINGS)
        first = dec.decode(payloads, [])
        (codec,) = avro_codecs(dec)
        assert codec.native is native, schema["name"]
        again = dec.decode(payloads, [])  # native now, if it is
        slow = decoder_for("avro", None, "p", SETTINGS).decode([*payloads, JUNK], [])
        assert not first.bad and not again.bad
        assert again.table.schema == slow.table.schema == first.table.schema
        assert again.table.equals(slow.table), schema["name"]
        assert again.table.to_pylist() == slow.table.to_pylist()


def test_avro_native_batch_with_a_bad_body_takes_the_per_message_path() -> None:
    """A body with bytes after its record, or cut short, in a batch already on
    the native path: the markers catch the shift; the per-message path names
    the one bad body and keeps the others."""
    from confluent_kafka.schema_registry.avro import AvroSerializer

    client = SchemaRegistryClient({"url": endpoints.SCHEMA_REGISTRY_URL})
    schema = {
        "type": "record",
        "name": "Flat",
        "fields": [{"name": "a", "type": "long"}, {"name": "b", "type": "long"}],
    }
    ctx = SerializationContext(f"nativebad_{uuid.uuid4().hex[:8]}", MessageField.VALUE)
    ser = AvroSerializer(client, json.dumps(schema))
    payloads = [ser({"a": i, "b": -i}, ctx) for i in range(100)]
    dec = decoder_for("avro", None, "p", SETTINGS)
    dec.decode(payloads, [])
    (codec,) = avro_codecs(dec)
    assert codec.native is True
    for broken in (payloads[40] + b"\x00", payloads[40][:-1]):
        got = dec.decode([*payloads[:40], broken, *payloads[41:]], [])
        assert [i for i, _ in got.bad] == [40]
        assert got.table.column("a").to_pylist() == [i for i in range(100) if i != 40]
        assert got.table.column("b").to_pylist() == [-i for i in range(100) if i != 40]
