"""Micro-benchmark: what sluice's registry decoders cost per 1M messages.

    python -m benchmarks.kafka_avro_to_postgres.decode_cost [--messages 200000] [--out FILE.md]

Payloads are made by confluent-kafka's serializers against the schema
registry (``--schema-registry-url``, default the test registry of
``scripts/services.sh``), then decoded in batches of 10,000 (the engine's
batch size order) by :func:`sluice.formats.decoder_for`, as the Kafka source
does; the wall and CPU time of the decode calls alone are scaled to 1M
messages.
Schemas: the benchmark's flat event (7 fields, as ``run.py`` produces), and
a wide one with logical types (timestamp-micros, date, decimal, uuid,
nullable union, nested record, array) for Avro; ``tests/protos.py``'s
``Order`` (Timestamp, wrapper, enum, repeated, nested, optional, map) for
Protobuf; the flat event again as JSON Schema (``JSONSerializer``), decoded
without and with ``json_schema_validation``, beside the same events as plain
JSON (``payload_format = "json"``, the floor); and an Avro record with two
unions of several types (the one decoder path with Python per value).
``--out`` also writes the figures as a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import decimal
import json
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from benchmarks.kafka_avro_to_postgres.run import DEFAULT_REGISTRY, EVENT_SCHEMA
from sluice.formats import decoder_for
from sluice.formats.registry import RegistrySettings

BATCH = 10_000
WIDE = {
    "type": "record",
    "name": "Wide",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {
            "name": "amount",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2},
        },
        {"name": "uid", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "note", "type": ["null", "string"], "default": None},
        {
            "name": "addr",
            "type": {"type": "record", "name": "A", "fields": [{"name": "city", "type": "string"}]},
        },
        {"name": "tags", "type": {"type": "array", "items": "string"}},
    ],
}


UNIONS = {
    "type": "record",
    "name": "Unions",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "value", "type": ["null", "string", "long", "double"]},
        {"name": "ref", "type": ["null", "long", "string"]},
        {"name": "note", "type": "string"},
    ],
}


def measure(
    fmt: str, url: str, payloads: list[bytes], n: int, validate: bool = False
) -> tuple[float, float]:
    """Seconds per 1M messages to decode ``n`` messages cycling over ``payloads``:
    wall time, and CPU time of the process (every thread; on a loaded
    machine the steadier of the two)."""
    dec = decoder_for(fmt, None, "bench", RegistrySettings(url), validate=validate)
    batch = (payloads * (BATCH // len(payloads) + 1))[:BATCH]
    dec.decode(batch, [])  # the one registry fetch, outside the timing
    spent = cpu = 0.0
    done = 0
    while done < n:
        started, cpu_started = time.perf_counter(), time.process_time()
        out = dec.decode(batch, [])
        spent += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
        assert not out.bad and out.table.num_rows == BATCH
        done += BATCH
    return spent * 1_000_000 / done, cpu * 1_000_000 / done


def serialize(ser: Callable[[Any, SerializationContext], bytes], values: list[Any]) -> list[bytes]:
    ctx = SerializationContext(f"decode-cost-{uuid.uuid4().hex[:8]}", MessageField.VALUE)
    return [ser(v, ctx) for v in values]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--schema-registry-url", default=DEFAULT_REGISTRY)
    p.add_argument("--out", help="also write the figures to this Markdown file")
    a = p.parse_args(argv)
    client = SchemaRegistryClient({"url": a.schema_registry_url})
    from benchmarks.common import events

    flat = serialize(
        AvroSerializer(client, json.dumps(EVENT_SCHEMA)),
        [json.loads(e) for _, e in events(1000, 42)],
    )
    base = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    wide = serialize(
        AvroSerializer(client, json.dumps(WIDE)),
        [
            {
                "id": i,
                "ts": base + datetime.timedelta(seconds=i),
                "day": datetime.date(2026, 1, 1),
                "amount": decimal.Decimal(i) / 4,
                "uid": uuid.UUID(int=i),
                "note": None if i % 2 else f"n{i}",
                "addr": {"city": f"c{i % 7}"},
                "tags": ["a", "b"][: i % 3],
            }
            for i in range(1000)
        ],
    )
    from tests.protos import Order

    def order(i: int) -> Any:
        o = Order(id=i, name=f"o{i}", status=i % 2, tags=["a", "b"][: i % 3])
        o.ts.FromSeconds(1_700_000_000 + i)
        if i % 2:
            o.qty.value = i
        o.addr.city = "c"
        o.attrs["k"] = i
        return o

    proto = serialize(
        ProtobufSerializer(Order, client, {"use.deprecated.format": False}),
        [order(i) for i in range(1000)],
    )
    from confluent_kafka.schema_registry.json_schema import JSONSerializer

    event_json = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Event",
        "type": "object",
        "properties": {
            f["name"]: {"type": _JSON_TYPES[str(f["type"])]} for f in EVENT_SCHEMA["fields"]
        },
    }
    json_schema = serialize(
        JSONSerializer(json.dumps(event_json), client),
        [json.loads(e) for _, e in events(1000, 42)],
    )
    plain = [e.encode() if isinstance(e, str) else e for _, e in events(1000, 42)]
    unions = serialize(
        AvroSerializer(client, json.dumps(UNIONS)),
        [
            {
                "id": i,
                "value": (f"v{i}", i, i / 3, None)[i % 4],
                "ref": i if i % 2 else f"r{i}",
                "note": f"n{i}",
            }
            for i in range(1000)
        ],
    )
    rows = []
    for name, fmt, payloads, validate in (
        ("avro, flat event (7 fields)", "avro", flat, False),
        ("avro, logical types + nested (8 fields)", "avro", wide, False),
        ("avro, 2 unions of several types (4 fields)", "avro", unions, False),
        ("protobuf, Order (9 fields, WKT, map)", "protobuf", proto, False),
        ("json (plain, no registry), flat event", "json", plain, False),
        ("json_schema, flat event (7 fields)", "json_schema", json_schema, False),
        ("json_schema, validated", "json_schema", json_schema, True),
    ):
        per_million, cpu = measure(fmt, a.schema_registry_url, payloads, a.messages, validate)
        rows.append((name, per_million, cpu))
        print(
            f"{name:44s} {per_million:6.1f} s per 1M messages ({1e6 / per_million:,.0f} msgs/s),"
            f" CPU {cpu:.1f} s"
        )
    if a.out:
        import platform

        lines = [
            "# Registry decoders: cost per 1M messages",
            "",
            f"`python -m benchmarks.kafka_avro_to_postgres.decode_cost --messages {a.messages}`"
            f" (decode calls only, batches of {BATCH:,}; Python {platform.python_version()};"
            " CPU time counts every thread of the process).",
            "",
            "| payloads | s per 1M messages | messages/s | CPU s per 1M |",
            "|---|---:|---:|---:|",
            *(f"| {name} | {pm:.1f} | {1e6 / pm:,.0f} | {cpu:.1f} |" for name, pm, cpu in rows),
            "",
        ]
        with open(a.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
    return 0


#: The flat event's Avro types as JSON Schema types.
_JSON_TYPES = {
    "long": "integer",
    "int": "integer",
    "string": "string",
    "double": "number",
    "float": "number",
    "boolean": "boolean",
}


if __name__ == "__main__":
    sys.exit(main())
