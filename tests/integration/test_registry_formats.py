"""Avro and Protobuf through the schema registry, end to end (issue 17's acceptance).

Real broker (tansu), the test registry (``tests/registry_server.py``, proven
against confluent-kafka's client in ``test_registry_server.py``), real
Postgres, real ``flow consume`` processes. Every payload is made by
confluent-kafka's own serializers (``AvroSerializer``,
``ProtobufSerializer``), never by sluice's encoder, so a bug cannot hide on
both sides.
"""

from __future__ import annotations

import datetime
import decimal
import json
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient, header_schema_id_serializer
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from tests import endpoints
from tests.conformance.test_kafka_target import read_topic
from tests.integration.conftest import (
    Flow,
    committed,
    free_port,
    kafka_pg_config,
    pg_count,
    unique,
    wait_for_count,
    wait_until,
)
from tests.protos import Inner, Order

pytestmark = pytest.mark.integration

UTC = datetime.UTC
BASE = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

EVENT_V1: dict[str, Any] = {
    "type": "record",
    "name": "Event",
    "namespace": "sluice.test",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "user_id", "type": "int"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "ts_ms", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {
            "name": "amount",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2},
        },
        {"name": "uid", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "note", "type": ["null", "string"], "default": None},
        {
            "name": "addr",
            "type": {
                "type": "record",
                "name": "Addr",
                "fields": [
                    {"name": "city", "type": "string"},
                    {"name": "zip", "type": ["null", "int"], "default": None},
                ],
            },
        },
        {"name": "tags", "type": {"type": "array", "items": "string"}},
    ],
}
EVENT_V2 = {
    **EVENT_V1,
    "fields": [
        *EVENT_V1["fields"],
        {"name": "channel", "type": ["null", "string"], "default": None},
    ],
}


def event(i: int, v2: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": i,
        "user_id": i % 7,
        "ts": BASE + datetime.timedelta(seconds=i, microseconds=i % 1000),
        "ts_ms": BASE + datetime.timedelta(milliseconds=i),
        "day": datetime.date(2026, 1, 1) + datetime.timedelta(days=i % 30),
        "amount": decimal.Decimal(i) / 4,
        "uid": uuid.UUID(int=i),
        "note": None if i % 3 == 0 else f"n{i}",
        "addr": {"city": f"c{i % 5}", "zip": None if i % 2 else i},
        "tags": [f"t{j}" for j in range(i % 3)],
    }
    if v2:
        row["channel"] = f"ch{i % 4}"
    return row


def registry() -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": endpoints.SCHEMA_REGISTRY_URL})


def fetches() -> dict[int, int]:
    """How often each schema id was fetched by id from the test registry."""
    with urllib.request.urlopen(f"{endpoints.SCHEMA_REGISTRY_URL}/_stats", timeout=5) as r:
        return {int(k): v for k, v in json.load(r)["fetches"].items()}


def send(
    topic: str,
    serialize: Callable[[Any, SerializationContext], bytes],
    values: list[Any],
    partitions: int = 2,
    raw: list[bytes] | None = None,
    headers: bool = False,
) -> None:
    """Serialize ``values`` with a confluent-kafka serializer and produce them
    (round robin over ``partitions``); ``raw`` payloads are produced as they are."""
    producer = Producer({"bootstrap.servers": endpoints.KAFKA_BOOTSTRAP, "linger.ms": 5})
    errors: list[Any] = []

    def report(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err)

    for i, value in enumerate(values):
        ctx = SerializationContext(topic, MessageField.VALUE, [] if headers else None)
        payload = serialize(value, ctx)
        producer.produce(
            topic, payload, partition=i % partitions, headers=ctx.headers, on_delivery=report
        )
    for payload in raw or []:
        producer.produce(topic, payload, partition=0, on_delivery=report)
    assert producer.flush(30) == 0 and not errors, errors


def avro(schema: dict[str, Any], **conf: Any) -> AvroSerializer:
    return AvroSerializer(registry(), json.dumps(schema), conf=conf or None)


def columns(table: str) -> dict[str, str]:
    with psycopg.connect(endpoints.POSTGRES_URL) as conn:
        rows = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = %s",
            (table,),
        ).fetchall()
    return {name: kind for name, kind in rows}


def select(sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(endpoints.POSTGRES_URL) as conn:
        return conn.execute(sql.encode()).fetchall()


def registry_source(fmt: str, url: str = endpoints.SCHEMA_REGISTRY_URL, extra: str = "") -> str:
    return f'payload_format = "{fmt}"\nschema_registry_url = "{url}"\n{extra}'


# -- Avro ----------------------------------------------------------------------------


def test_avro_into_postgres_types_evolution_and_one_fetch_per_id(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    """Avro v1 then v2 (a new optional field) mid-stream into Postgres: right
    column types, the new column appears, nothing lost, one fetch per schema id."""
    topic, table = kafka_topic(2, "avro_e2e"), unique("avro_e2e")
    v1, v2 = avro(EVENT_V1), avro(EVENT_V2)
    send(topic, v1, [event(i) for i in range(600)])
    before = fetches()
    f = flow(
        kafka_pg_config(topic, table, batch_rows=100, extra_source=registry_source("avro")),
    )
    wait_for_count(table, lambda c: c == 600, 60, "the v1 events")
    assert "channel" not in columns(table)
    send(topic, v2, [event(i, v2=True) for i in range(600, 900)])
    wait_for_count(table, lambda c: c == 900, 60, "the v2 events")
    assert f.stop() == 0, f.output()

    assert columns(table) == {
        "id": "bigint",
        "user_id": "integer",
        "ts": "timestamp with time zone",
        "ts_ms": "timestamp with time zone",
        "day": "date",
        "amount": "numeric",
        "uid": "text",
        "note": "text",
        "addr": "jsonb",
        "tags": "jsonb",
        "channel": "text",
        "_event_ts": "timestamp with time zone",
    }
    rows = select(
        f"SELECT id, user_id, ts, ts_ms, day, amount, uid, note, addr, tags, channel "
        f"FROM {table} ORDER BY id"
    )
    assert [r[0] for r in rows] == list(range(900))
    for r in rows:
        want = event(r[0], v2=r[0] >= 600)
        assert r[1:8] == (
            want["user_id"],
            want["ts"],
            want["ts_ms"],
            want["day"],
            want["amount"],
            str(want["uid"]),
            want["note"],
        )
        assert r[8] == want["addr"] and r[9] == want["tags"]
        assert r[10] == want.get("channel")
    after = fetches()
    client = registry()
    ids = [client.get_version(f"{topic}-value", v).schema_id for v in (1, 2)]
    new = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k) != before.get(k)}
    assert new == {ids[0]: 1, ids[1]: 1}, f"schema fetches by id during the run: {new}"


def test_timestamp_micros_is_the_event_time_of_a_join(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    orders_t, payments_t = kafka_topic(2, "avro_orders"), kafka_topic(2, "avro_pay")
    table = unique("avro_join")
    order_schema = {
        "type": "record",
        "name": "Order",
        "fields": [
            {"name": "order_id", "type": "long"},
            {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "amount", "type": "double"},
        ],
    }
    pay_schema = {
        "type": "record",
        "name": "Payment",
        "fields": [
            {"name": "order_id", "type": "long"},
            {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "paid", "type": "double"},
        ],
    }
    n = 200
    # Payment i is 30 s after its order (inside the 60 s window) except every
    # 10th, 5 min after (outside): the join is on the Avro ts, not the broker's
    # timestamps (all produced within a second).
    orders = [
        {"order_id": i, "ts": BASE + datetime.timedelta(seconds=10 * i), "amount": i * 1.0}
        for i in range(n)
    ]
    payments = [
        {
            "order_id": i,
            "ts": BASE + datetime.timedelta(seconds=10 * i + (300 if i % 10 == 0 else 30)),
            "paid": i * 1.0,
        }
        for i in range(n)
    ]
    send(orders_t, avro(order_schema), orders)
    send(payments_t, avro(pay_schema), payments)
    sources = "".join(
        f"""
[[sources]]
query = "{t}"
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{table}"
session_timeout_ms = 6000
max_batch_rows = 100
{registry_source("avro")}
"""
        for t in (orders_t, payments_t)
    )
    f = flow(
        f"""
pipeline_name = "{table}"
idle_pause_ms = 100
{sources}
[target]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"

[target.table]
schema = "public"
name = "{table}"

[watermark]
lateness_ms = 3600000

[state_store]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
schema = "{table}_state"

[transform.join]
kind = "inner"
left_source = "{orders_t}"
right_source = "{payments_t}"
left_keys = ["order_id"]
right_keys = ["order_id"]
time_window_ms = 60000
event_time_column = "ts"
"""
    )
    want = {i for i in range(n) if i % 10}
    wait_for_count(table, lambda c: c == len(want), 90, "the joined pairs")
    assert f.stop() == 0, f.output()
    got = select(f"SELECT left_order_id, left_ts, right_ts FROM {table}")
    assert {r[0] for r in got} == want and len(got) == len(want)
    for order_id, left_ts, right_ts in got:
        assert left_ts == orders[order_id]["ts"] and right_ts == payments[order_id]["ts"]
    kinds = columns(table)
    assert kinds["left_ts"] == kinds["right_ts"] == "timestamp with time zone"


# -- Protobuf --------------------------------------------------------------------------


def order(i: int) -> Any:
    o = Order(id=i, name=f"o{i}", status=i % 2, tags=[f"t{j}" for j in range(i % 3)])
    o.ts.FromDatetime(BASE + datetime.timedelta(seconds=i, microseconds=7))
    if i % 2:
        o.qty.value = i * 10
    if i % 5 == 0:
        o.note = f"note{i}"
    o.addr.city = f"c{i % 4}"
    return o


def test_protobuf_into_postgres_with_well_known_types(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    topic, table = kafka_topic(2, "pb_e2e"), unique("pb_e2e")
    ser = ProtobufSerializer(Order, registry(), {"use.deprecated.format": False})
    n = 400
    send(topic, ser, [order(i) for i in range(n)])
    f = flow(
        kafka_pg_config(topic, table, batch_rows=150, extra_source=registry_source("protobuf"))
    )
    wait_for_count(table, lambda c: c == n, 60, "the Protobuf events")
    assert f.stop() == 0, f.output()
    kinds = columns(table)
    assert {k: kinds[k] for k in ("id", "name", "ts", "qty", "status", "tags", "addr", "note")} == {
        "id": "bigint",
        "name": "text",
        "ts": "timestamp with time zone",
        "qty": "bigint",
        "status": "text",
        "tags": "jsonb",
        "addr": "jsonb",
        "note": "text",
    }
    rows = select(f"SELECT id, name, ts, qty, status, tags, addr, note FROM {table} ORDER BY id")
    assert [r[0] for r in rows] == list(range(n))
    for i, name, ts, qty, status, tags, addr, note in rows:
        assert name == f"o{i}"
        assert ts == BASE + datetime.timedelta(seconds=i, microseconds=7)
        assert qty == (i * 10 if i % 2 else None)  # an unset wrapper is null, not 0
        assert status == ("PAID" if i % 2 else "NEW")
        assert tags == [f"t{j}" for j in range(i % 3)]
        assert addr == {"city": f"c{i % 4}"}
        assert note == (f"note{i}" if i % 5 == 0 else None)  # proto3 optional: null when unset


def test_nested_protobuf_message_and_schema_id_in_a_header(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    """``Envelope.Inner`` is message index [1, 0]; half the messages carry
    their schema in the ``__value_schema_id`` header (Confluent's header
    serializer: magic 1 + GUID + indexes), half in the payload prefix."""
    topic, table = kafka_topic(1, "pb_nested"), unique("pb_nested")
    prefixed = ProtobufSerializer(Inner, registry(), {"use.deprecated.format": False})
    in_header = ProtobufSerializer(
        Inner,
        registry(),
        {"use.deprecated.format": False, "schema.id.serializer": header_schema_id_serializer},
    )
    send(topic, prefixed, [Inner(id=i, what=f"w{i}") for i in range(100)], partitions=1)
    sample = prefixed(Inner(id=1), SerializationContext(topic, MessageField.VALUE))
    assert sample[5:8] == b"\x04\x02\x00", "expected the index array [1, 0] after the schema id"
    send(
        topic,
        in_header,
        [Inner(id=i, what=f"w{i}") for i in range(100, 200)],
        partitions=1,
        headers=True,
    )
    f = flow(kafka_pg_config(topic, table, extra_source=registry_source("protobuf")))
    wait_for_count(table, lambda c: c == 200, 60, "the nested messages")
    assert f.stop() == 0, f.output()
    assert select(f"SELECT id, what FROM {table} ORDER BY id") == [(i, f"w{i}") for i in range(200)]


# -- bad messages ------------------------------------------------------------------------

SMALL = {
    "type": "record",
    "name": "Small",
    "fields": [{"name": "id", "type": "long"}, {"name": "name", "type": "string"}],
}


def _bad_payloads(good: bytes) -> list[bytes]:
    """An unknown schema id, a truncated body, a wrong magic byte (in that order)."""
    unknown = b"\x00" + (9_999_999).to_bytes(4, "big") + good[5:]
    return [unknown, good[:-3], b"\x07" + good[1:]]


@pytest.fixture(scope="module")
def bad_topic() -> Iterator[tuple[str, list[bytes]]]:
    """One partition: ids 0-49, the three bad payloads (offsets 50-52), ids 53-99."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = unique("avro_bad")
    admin = AdminClient({"bootstrap.servers": endpoints.KAFKA_BOOTSTRAP})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)
    ser = avro(SMALL)
    good = ser({"id": 0, "name": "aaaa"}, SerializationContext(topic, MessageField.VALUE))
    bad = _bad_payloads(good)
    send(topic, ser, [{"id": i, "name": f"n{i}"} for i in range(50)], partitions=1, raw=bad)
    send(topic, ser, [{"id": i, "name": f"n{i}"} for i in range(53, 100)], partitions=1)
    yield topic, bad


@pytest.mark.parametrize("policy", ["fail", "drop", "dlq"])
def test_bad_payloads_follow_on_error(
    policy: str, bad_topic: tuple[str, list[bytes]], flow: Callable[..., Flow]
) -> None:
    topic, bad = bad_topic
    table = unique(f"avro_bad_{policy}")
    dead = unique("avro_dead")
    extra = registry_source("avro") + (f'dead_letter_topic = "{dead}"\n' if policy == "dlq" else "")
    config = kafka_pg_config(topic, table, batch_rows=500, extra_source=extra)
    config += f'\n[transform]\non_error = "{policy}"\n'
    f = flow(config)
    if policy == "fail":
        assert f.proc.wait(timeout=60) == 1, f.output()
        out = f.output()
        assert f"topic {topic} partition 0 offset 50" in out, out
        assert "schema id 9999999 is not in the schema registry" in out, out
        assert committed(table, topic, 1) == 0
        return
    wait_until(lambda: committed(table, topic, 1) == 100, 60, "every offset committed")
    assert pg_count(table) == 97
    assert {r[0] for r in select(f"SELECT id FROM {table}")} == set(range(100)) - {50, 51, 52}
    if policy == "drop":
        assert f.metric("sluice_rows_dropped_total") == 3
    else:
        letters = read_topic(dead)
        assert letters is not None
        letters.sort(key=lambda m: int(dict(m.headers())["sluice.offset"]))
        assert [m.value() for m in letters] == bad  # the raw bytes
        errors = [dict(m.headers())["sluice.error"].decode() for m in letters]
        assert "not in the schema registry" in errors[0]
        assert "does not decode" in errors[1]
        assert "wrong magic byte 7" in errors[2]
        assert [dict(m.headers())["sluice.offset"] for m in letters] == [b"50", b"51", b"52"]
    assert f.stop() == 0


# -- the registry down, basic auth -----------------------------------------------------------


class PrivateRegistry:
    """A registry process of this test's own (so it can be stopped), with basic auth."""

    def __init__(self, port: int, tmp: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = tmp / f"registry-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        script = Path(__file__).resolve().parents[1] / "registry_server.py"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(script),
                    "--port",
                    str(self.port),
                    "--user",
                    "sr",
                    "--password",
                    "s3cret-pw",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def up() -> bool:
            try:
                self.client().get_subjects()
            except Exception:
                return False
            return True

        wait_until(up, 20, "the private registry")

    def client(self) -> SchemaRegistryClient:
        return SchemaRegistryClient({"url": self.url, "basic.auth.user.info": "sr:s3cret-pw"})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)


def outage(url: str, down: bool) -> None:
    req = urllib.request.Request(
        f"{url}/_outage?down={'true' if down else 'false'}", method="POST", data=b""
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.load(r) == {"down": down}


def test_registry_down_holds_the_batch_and_auth_stays_secret(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow], tmp_path: Path
) -> None:
    """The registry refusing connections, then answering 503: the batch is
    held (nothing written, nothing committed) and goes through once it is
    back. Basic auth is required by this registry; its password never shows."""
    reg = PrivateRegistry(free_port(), tmp_path)
    reg.start()
    try:
        topic, table = kafka_topic(1, "avro_down"), unique("avro_down")
        ser = AvroSerializer(reg.client(), json.dumps(SMALL))
        send(topic, ser, [{"id": i, "name": f"n{i}"} for i in range(50)], partitions=1)
        outage(reg.url, down=True)
        auth = (
            'schema_registry_basic_auth_user = "sr"\n'
            'schema_registry_basic_auth_password = "s3cret-pw"'
        )
        f = flow(kafka_pg_config(topic, table, extra_source=registry_source("avro", reg.url, auth)))
        wait_until(lambda: "HTTP 503" in f.output(), 30, "a registry retry in the log")
        wait_until(lambda: f.output().count("retrying in") >= 3, 30, "more retries")
        assert f.proc.poll() is None, f.output()
        assert committed(table, topic, 1) == 0
        assert pg_count_or_none(table) in (None, 0)
        outage(reg.url, down=False)
        wait_for_count(table, lambda c: c == 50, 60, "the rows once the registry is back")
        wait_until(lambda: committed(table, topic, 1) == 50, 30, "the offsets")
        assert f.stop() == 0
        assert "s3cret-pw" not in f.output()
    finally:
        reg.stop()


def pg_count_or_none(table: str) -> int | None:
    try:
        return pg_count(table)
    except psycopg.errors.UndefinedTable:
        return None


def test_registry_server_speaks_confluents_client() -> None:
    """The test registry works with confluent-kafka's client of record:
    register, look up, versions, compatibility, get by id, serializers."""
    from confluent_kafka.schema_registry import Schema
    from confluent_kafka.schema_registry.avro import AvroDeserializer

    client = registry()
    subject = unique("sr_check") + "-value"
    s1 = Schema(json.dumps(SMALL), "AVRO")
    sid = client.register_schema(subject, s1)
    assert client.register_schema(subject, s1) == sid  # idempotent
    assert client.lookup_schema(subject, s1).schema_id == sid
    assert client.get_schema(sid).schema_type == "AVRO"
    compatible = {
        **SMALL,
        "fields": [*SMALL["fields"], {"name": "x", "type": ["null", "int"], "default": None}],
    }
    incompatible = {**SMALL, "fields": [*SMALL["fields"], {"name": "y", "type": "int"}]}
    assert client.test_compatibility(subject, Schema(json.dumps(compatible), "AVRO"))
    assert not client.test_compatibility(subject, Schema(json.dumps(incompatible), "AVRO"))
    sid2 = client.register_schema(subject, Schema(json.dumps(compatible), "AVRO"))
    assert client.get_versions(subject) == [1, 2]
    assert client.get_latest_version(subject).schema_id == sid2
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    with pytest.raises(SchemaRegistryError):
        client.register_schema(subject, Schema(json.dumps(incompatible), "AVRO"))
    topic = subject.removesuffix("-value")
    ctx = SerializationContext(topic, MessageField.VALUE)
    payload = AvroSerializer(client, json.dumps(SMALL), conf={"auto.register.schemas": False})(
        {"id": 3, "name": "x"}, ctx
    )
    assert AvroDeserializer(client)(payload, ctx) == {"id": 3, "name": "x"}
    pb = ProtobufSerializer(Order, client, {"use.deprecated.format": False})(order(1), ctx)
    assert pb[0] == 0
    assert msgspec.json.decode(msgspec.json.encode({"ok": True}))
