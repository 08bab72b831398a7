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
