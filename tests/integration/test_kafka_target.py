"""The Kafka target through real `flow consume` processes (tansu, the test registry).

* Kafka → Kafka, at least once: a run SIGKILLed mid-stream and restarted
  loses no input record (checked with a consumer of the output topic; a
  redelivered batch may appear twice, which is the documented guarantee).
* Avro on the target: rows encoded with a schema registered by sluice
  (``auto_register``) are read back by confluent-kafka's own
  ``AvroDeserializer``, every row, with the right values and types; the same
  for Protobuf (``ProtobufDeserializer``) and JSON Schema
  (``JSONDeserializer``, which validates each payload against the schema
  sluice derived and registered).
"""

from __future__ import annotations

import collections
import decimal
import random
from collections.abc import Callable

import msgspec
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
from tests import endpoints
from tests.conformance.test_kafka_target import read_topic
from tests.integration.conftest import Flow, events, kill_after_reading, produce, unique

pytestmark = pytest.mark.integration


def kafka_kafka_config(
    source_topic: str, target_topic: str, name: str, batch_rows: int, target: str = ""
) -> str:
    return f"""
pipeline_name = "{name}"
source_query = "{source_topic}"
idle_pause_ms = 100

[source]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
session_timeout_ms = 2000
max_batch_rows = {batch_rows}

[target]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
topic = "{target_topic}"
message_key_column = "id"
{target}
"""


def test_kafka_to_kafka_sigkill_loses_nothing(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    # Enough rows that the kill lands mid-stream: a batch of 100 takes ~5 ms.
    n = 20_000
    source = kafka_topic(partitions=3, prefix="k2k_in")
    target = unique("k2k_out")
    name = unique("k2k")
    produce(source, events(n), keys=[str(i).encode() for i in range(n)])
    config = kafka_kafka_config(source, target, name, batch_rows=100)

    first = flow(config)
    kill_after_reading(first, rows=n / 10, delay_s=random.uniform(0, 0.05))
    out = read_topic(target) or []
    assert len(out) < n, "the first run wrote everything before the kill: the test proves nothing"

    second = flow(config, "--stop-after-idle-ms", "1500")
    assert second.proc.wait(timeout=120) == 0, second.output()

    msgs = read_topic(target)
    assert msgs is not None
    ids = collections.Counter(msgspec.json.decode(m.value())["id"] for m in msgs)
    missing = set(range(n)) - set(ids)
    assert not missing, f"{len(missing)} input records never reached the output topic"
    assert set(ids) == set(range(n))
    for m in msgs:
        row = msgspec.json.decode(m.value())
        assert m.key() == str(row["id"]).encode()
        assert "_event_ts" not in row  # it is the message timestamp instead
        assert row["event_type"] in ("click", "view", "purchase")


def test_avro_target_read_back_by_confluent_deserializer(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    n = 500
    source = kafka_topic(partitions=2, prefix="avro_t_in")
    target = unique("avro_t_out")
    name = unique("avro_t")
    base_ms = 1_700_000_000_000
    produce(source, events(n), timestamps_ms=[base_ms + i for i in range(n)])
    config = kafka_kafka_config(
        source,
        target,
        name,
        batch_rows=200,
        target=f"""payload_format = "avro"
schema_registry_url = "{endpoints.SCHEMA_REGISTRY_URL}"
auto_register = true
""",
    )
    run = flow(config, "--stop-after-idle-ms", "1500")
    assert run.proc.wait(timeout=120) == 0, run.output()

    client = SchemaRegistryClient({"url": endpoints.SCHEMA_REGISTRY_URL})
    registered = client.get_latest_version(f"{target}-value")
    assert registered.schema.schema_type == "AVRO"
    deserialize = AvroDeserializer(client)
    ctx = SerializationContext(target, MessageField.VALUE)
    msgs = read_topic(target)
    assert msgs is not None and len(msgs) == n
    rows = {}
    for m in msgs:
        row = deserialize(m.value(), ctx)
        assert m.value()[:5] == b"\x00" + registered.schema_id.to_bytes(4, "big")
        rows[row["id"]] = (row, m.timestamp()[1])
    assert sorted(rows) == list(range(n))
    for i, (row, ts_ms) in rows.items():
        assert row == {
            "id": i,
            "user_id": i % 997,
            "event_type": ("click", "view", "purchase")[i % 3],
            "amount": (i % 1000) / 4,
            "note": f"n{i}",
        }
        assert ts_ms == base_ms + i  # _event_ts became the message timestamp


def test_protobuf_target_read_back_by_confluent_deserializer(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    """Avro in (every logical type), Protobuf out: confluent-kafka's
    ``ProtobufDeserializer``, with a message class built from the registry's
    schema by the test, reads back every row."""
    import base64

    from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2
    from tests.integration.test_registry_formats import EVENT_V1, avro, event, send

    n = 300
    source = kafka_topic(partitions=2, prefix="pb_t_in")
    target = unique("pb_t_out")
    send(source, avro(EVENT_V1), [event(i) for i in range(n)])
    config = kafka_kafka_config(
        source,
        target,
        unique("pb_t"),
        batch_rows=100,
        target=f"""
payload_format = "protobuf"
schema_registry_url = "{endpoints.SCHEMA_REGISTRY_URL}"
auto_register = true
""",
    )
    config = config.replace(
        "max_batch_rows = 100\n",
        f'max_batch_rows = 100\npayload_format = "avro"\n'
        f'schema_registry_url = "{endpoints.SCHEMA_REGISTRY_URL}"\n',
        1,
    )
    run = flow(config, "--stop-after-idle-ms", "1500")
    assert run.proc.wait(timeout=120) == 0, run.output()

    client = SchemaRegistryClient({"url": endpoints.SCHEMA_REGISTRY_URL})
    registered = client.get_latest_version(f"{target}-value")
    assert registered.schema.schema_type == "PROTOBUF"
    fd = descriptor_pb2.FileDescriptorProto.FromString(
        base64.b64decode(registered.schema.schema_str)
    )
    pool = descriptor_pool.DescriptorPool()
    ts_file = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(ts_file)
    pool.Add(ts_file)
    pool.Add(fd)
    cls = message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{fd.package}.{fd.message_type[0].name}")
    )
    deserialize = ProtobufDeserializer(cls, {"use.deprecated.format": False})
    ctx = SerializationContext(target, MessageField.VALUE)
    msgs = read_topic(target)
    assert msgs is not None and len(msgs) == n
    seen = set()
    for m in msgs:
        got = deserialize(m.value(), ctx)
        want = event(got.id)
        seen.add(got.id)
        assert got.user_id == want["user_id"]
        assert got.ts.ToDatetime(tzinfo=want["ts"].tzinfo) == want["ts"]
        assert got.day == want["day"].isoformat()
        assert got.amount == str(want["amount"].quantize(decimal.Decimal("0.01")))
        assert got.uid == str(want["uid"])
        assert got.HasField("note") == (want["note"] is not None)
        assert got.note == (want["note"] or "")
        assert got.addr.city == want["addr"]["city"]
        assert got.addr.HasField("zip") == (want["addr"]["zip"] is not None)
        assert list(got.tags) == want["tags"]
        assert m.key() == str(got.id).encode()
    assert seen == set(range(n))


def test_json_schema_target_read_back_by_confluent_deserializer(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    """Avro in (logical types, a record, an array), JSON Schema out:
    confluent-kafka's ``JSONDeserializer`` validates every payload against
    the schema sluice derived and registered, and reads back every row."""
    from confluent_kafka.schema_registry.json_schema import JSONDeserializer
    from tests.integration.test_registry_formats import EVENT_V1, avro, event, send

    n = 300
    source = kafka_topic(partitions=2, prefix="js_t_in")
    target = unique("js_t_out")
    send(source, avro(EVENT_V1), [event(i) for i in range(n)])
    config = kafka_kafka_config(
        source,
        target,
        unique("js_t"),
        batch_rows=100,
        target=f"""
payload_format = "json_schema"
schema_registry_url = "{endpoints.SCHEMA_REGISTRY_URL}"
auto_register = true
""",
    )
    config = config.replace(
        "max_batch_rows = 100\n",
        f'max_batch_rows = 100\npayload_format = "avro"\n'
        f'schema_registry_url = "{endpoints.SCHEMA_REGISTRY_URL}"\n',
        1,
    )
    run = flow(config, "--stop-after-idle-ms", "1500")
    assert run.proc.wait(timeout=120) == 0, run.output()

    client = SchemaRegistryClient({"url": endpoints.SCHEMA_REGISTRY_URL})
    registered = client.get_latest_version(f"{target}-value")
    assert registered.schema.schema_type == "JSON"
    schema = msgspec.json.decode(registered.schema.schema_str)
    assert schema["properties"]["ts"] == {"type": ["string", "null"], "format": "date-time"}
    assert schema["properties"]["addr"]["properties"]["zip"] == {"type": ["integer", "null"]}
    deserialize = JSONDeserializer(None, schema_registry_client=client)  # validates
    ctx = SerializationContext(target, MessageField.VALUE)
    msgs = read_topic(target)
    assert msgs is not None and len(msgs) == n
    seen = set()
    for m in msgs:
        assert m.value()[:5] == b"\x00" + registered.schema_id.to_bytes(4, "big")
        got = deserialize(m.value(), ctx)
        want = event(got["id"])
        seen.add(got["id"])
        assert m.key() == str(got["id"]).encode()
        assert got["user_id"] == want["user_id"]
        assert got["ts"] == want["ts"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert got["day"] == want["day"].isoformat()
        assert decimal.Decimal(str(got["amount"])) == want["amount"].quantize(
            decimal.Decimal("0.01")
        )
        assert got["uid"] == str(want["uid"])
        assert got["note"] == want["note"]
        assert got["addr"] == want["addr"]
        assert got["tags"] == want["tags"]
    assert seen == set(range(n))
