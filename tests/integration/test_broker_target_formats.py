"""Registry formats on the broker targets whose messages are bytes (issue 17, item 5).

RabbitMQ, Pub/Sub and Kinesis targets take the Kafka target's
``payload_format`` and registry keys and encode with the same
:class:`~sluice.formats.encode.PayloadEncoder`; the subject's "topic" is the
queue / the Pub/Sub topic's short name / the stream name. Each test runs a
real ``flow consume`` (Kafka in, the broker out, the test registry) and
reads the raw message bytes back with confluent-kafka's own
``AvroDeserializer``, given that name as the topic: never sluice's decoder.

The encoder's lookup path (``auto_register = false``) is checked for Avro,
Protobuf and JSON Schema against the registry directly, with confluent-kafka's
deserializers on the payloads.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
from tests import amqp, endpoints, kinesis_kit, pubsub_kit
from tests.integration.conftest import Flow, events, produce, unique

from sluice.config.payload import EncodedTargetSpec
from sluice.errors import ConnectorError
from sluice.formats.encode import PayloadEncoder

pytestmark = pytest.mark.integration

N = 200
KINDS = ("click", "view", "purchase")


def config(source: str, name: str, target: str) -> str:
    return f"""
pipeline_name = "{name}"
source_query = "{source}"
idle_pause_ms = 100

[source]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
session_timeout_ms = 2000
max_batch_rows = 80

[target]
{target}
payload_format = "avro"
schema_registry_url = "{endpoints.SCHEMA_REGISTRY_URL}"
auto_register = true
"""


def run(flow: Callable[..., Flow], kafka_topic: Callable[..., str], target: str) -> None:
    """Produce ``N`` JSON events and run a pipeline writing them to ``target`` until idle."""
    source = kafka_topic(partitions=2, prefix="fmt_in")
    produce(source, events(N))
    proc = flow(config(source, unique("fmt"), target), "--stop-after-idle-ms", "1500")
    assert proc.proc.wait(timeout=120) == 0, proc.output()


def check(name: str, bodies: list[bytes]) -> None:
    """Every body is the Avro of one event, framed with the id registered
    under ``<name>-value``: read by confluent-kafka's deserializer."""
    client = SchemaRegistryClient({"url": endpoints.SCHEMA_REGISTRY_URL})
    registered = client.get_latest_version(f"{name}-value")
    assert registered.schema.schema_type == "AVRO"
    deserialize = AvroDeserializer(client)
    ctx = SerializationContext(name, MessageField.VALUE)
    rows: dict[int, dict[str, Any]] = {}
    for body in bodies:
        assert body[:5] == b"\x00" + registered.schema_id.to_bytes(4, "big")
        row = deserialize(body, ctx)
        rows[row["id"]] = row
    assert len(bodies) >= N  # at least once: a redelivered batch may repeat
    assert sorted(rows) == list(range(N))
    for i, row in rows.items():
        # These targets keep _event_ts in the payload (timestamp-micros: a datetime).
        assert row.pop("_event_ts").tzinfo is not None
        assert row == {
            "id": i,
            "user_id": i % 997,
            "event_type": KINDS[i % 3],
            "amount": (i % 1000) / 4,
            "note": f"n{i}",
        }


def test_rabbitmq_target_avro(kafka_topic: Callable[..., str], flow: Callable[..., Flow]) -> None:
    queue = unique("fmt_q")
    try:
        run(
            flow,
            kafka_topic,
            f'kind = "rabbitmq"\namqp_url = "{endpoints.RABBITMQ_URL}"\nqueue = "{queue}"',
        )
        check(queue, [body for body, _headers in amqp.drain(queue)])
    finally:
        amqp.delete(queue)


def test_pubsub_target_avro(kafka_topic: Callable[..., str], flow: Callable[..., Flow]) -> None:
    ps = pubsub_kit.PubSub()
    topic = ps.topic(unique("fmt_t"))
    sub = ps.subscription(unique("fmt_s"), topic, ordered=False)
    run(
        flow,
        kafka_topic,
        f'kind = "pubsub"\nproject_id = "{pubsub_kit.PROJECT}"\ntopic = "{topic}"\n'
        f'endpoint = "{pubsub_kit.HOST}"\nanonymous_auth = true',
    )
    check(topic, [m.data for m in ps.read(sub, N)] + [m.data for m in ps.drain(sub)])


@pytest.fixture
def kinesis() -> Iterator[kinesis_kit.Kinesis]:
    k = kinesis_kit.Kinesis()
    yield k
    k.cleanup()


def test_kinesis_target_avro(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow], kinesis: kinesis_kit.Kinesis
) -> None:
    stream = kinesis.stream(unique("fmt_k"))
    conn = kinesis_kit.connection()
    run(
        flow,
        kafka_topic,
        "\n".join(f'{k} = "{v}"' for k, v in conn.items()) + f'\nstream_name = "{stream}"',
    )
    check(stream, [r["Data"] for _shard, r in kinesis.read_all(stream)])


# -- the encoder's lookup path (no broker) ------------------------------------------


def spec(fmt: str, auto_register: bool) -> EncodedTargetSpec:
    return EncodedTargetSpec(
        payload_format=fmt,  # type: ignore[arg-type]
        schema_registry_url=endpoints.SCHEMA_REGISTRY_URL,
        auto_register=auto_register,
        subject_name_strategy="topic_record_name",
        avro_record_name="Row",
    )


def deserializer(fmt: str, client: SchemaRegistryClient, name: str) -> Callable[[bytes], Any]:
    ctx = SerializationContext(name, MessageField.VALUE)
    if fmt == "avro":
        avro = AvroDeserializer(client)
        return lambda body: avro(body, ctx)
    if fmt == "json_schema":
        from confluent_kafka.schema_registry.json_schema import JSONDeserializer

        js = JSONDeserializer(None, schema_registry_client=client)
        return lambda body: js(body, ctx)
    from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    registered = client.get_latest_version(f"{name}-Row")
    fd = descriptor_pb2.FileDescriptorProto.FromString(
        base64.b64decode(registered.schema.schema_str)
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{fd.package}.Row"))
    pb = ProtobufDeserializer(cls, {"use.deprecated.format": False})

    def read(body: bytes) -> Any:
        msg = pb(body, ctx)
        return {"id": msg.id, "name": msg.name if msg.HasField("name") else None}

    return read


@pytest.mark.parametrize("fmt", ["avro", "protobuf", "json_schema"])
def test_lookup_without_auto_register(fmt: str) -> None:
    """Without ``auto_register`` the schema must already be under the subject
    (``<name>-<record>`` here): refused before, found (the same id) after."""
    name = unique(f"lookup_{fmt}")
    table = pa.table(
        {"id": pa.array([1, 2], pa.int64()), "name": pa.array(["a", None], pa.string())}
    )
    with pytest.raises(ConnectorError, match=rf"not registered under subject '{name}-Row'"):
        PayloadEncoder(spec(fmt, auto_register=False), name, f"test:{name}").payloads(table)
    made = PayloadEncoder(spec(fmt, auto_register=True), name, f"test:{name}").payloads(table)
    found = PayloadEncoder(spec(fmt, auto_register=False), name, f"test:{name}").payloads(table)
    assert found == made
    client = SchemaRegistryClient({"url": endpoints.SCHEMA_REGISTRY_URL})
    read = deserializer(fmt, client, name)
    assert [read(body) for body in found if body is not None] == [
        {"id": 1, "name": "a"},
        {"id": 2, "name": None},
    ]
