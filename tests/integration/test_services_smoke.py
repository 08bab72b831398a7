"""Each real service that ``scripts/services.sh start`` runs answers its real client.

One test per service, with the same client library the connectors use. A
service that is down makes its test fail (never skip): start them with
``bash scripts/services.sh start``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
import pika
import psycopg
import pymysql
import pytest
from botocore.config import Config
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from google.cloud import pubsub_v1
from psycopg import sql
from tests import endpoints

pytestmark = pytest.mark.integration

DEADLINE_S = 30.0


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def test_kafka_topic_produce_and_consume_in_a_group() -> None:
    topic = _name("sluice-smoke")
    admin = AdminClient({"bootstrap.servers": endpoints.KAFKA_BOOTSTRAP})
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=3, replication_factor=1)], operation_timeout=10
    )
    futures[topic].result(timeout=15)
    try:
        metadata = admin.list_topics(topic, timeout=10)
        assert len(metadata.topics[topic].partitions) == 3

        delivered: list[Message] = []

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                raise KafkaException(err)
            delivered.append(msg)

        payload = uuid.uuid4().bytes
        producer = Producer({"bootstrap.servers": endpoints.KAFKA_BOOTSTRAP, "acks": "all"})
        producer.produce(topic, key=b"smoke", value=payload, on_delivery=on_delivery)
        assert producer.flush(15) == 0
        assert len(delivered) == 1

        consumer = Consumer(
            {
                "bootstrap.servers": endpoints.KAFKA_BOOTSTRAP,
                "group.id": _name("sluice-smoke-group"),
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "session.timeout.ms": 2000,
                "heartbeat.interval.ms": 500,
            }
        )
        try:
            consumer.subscribe([topic])
            received: Message | None = None
            deadline = time.monotonic() + DEADLINE_S
            while received is None and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                if msg.error() is not None:
                    raise KafkaException(msg.error())
                received = msg
            assert received is not None, "no message consumed within the deadline"
            assert received.value() == payload
            assert received.key() == b"smoke"
            assert received.partition() == delivered[0].partition()
            assert received.offset() == delivered[0].offset()
            consumer.commit(message=received, asynchronous=False)
        finally:
            consumer.close()
    finally:
        admin.delete_topics([topic], operation_timeout=10)[topic].result(timeout=15)


def test_postgres_select_and_temp_table() -> None:
    table = sql.Identifier(f"smoke_{uuid.uuid4().hex}")
    with psycopg.connect(endpoints.POSTGRES_URL, connect_timeout=5, autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.execute("show wal_level").fetchone() == ("logical",)
        conn.execute(sql.SQL("create temp table {} (id int primary key, v text)").format(table))
        conn.execute(
            sql.SQL("insert into {} values (%s, %s), (%s, %s)").format(table),
            (1, "a", 2, "b"),
        )
        rows = conn.execute(sql.SQL("select id, v from {} order by id").format(table)).fetchall()
        assert rows == [(1, "a"), (2, "b")]
        conn.execute(sql.SQL("drop table {}").format(table))


def test_mariadb_select_and_temp_table() -> None:
    url = urlsplit(endpoints.MYSQL_URL)
    conn = pymysql.connect(
        host=url.hostname or "127.0.0.1",
        port=url.port or 3306,
        user=unquote(url.username or "root"),
        password=unquote(url.password or ""),
        database=url.path.lstrip("/"),
        connect_timeout=5,
        autocommit=True,
    )
    table = f"smoke_{uuid.uuid4().hex}"
    try:
        with conn.cursor() as cur:
            cur.execute("select 1, database(), version()")
            one, database, version = cur.fetchone()
            assert (one, database) == (1, "sluice")
            assert "MariaDB" in version
            cur.execute(f"create temporary table `{table}` (id int primary key, v text)")
            cur.executemany(f"insert into `{table}` values (%s, %s)", [(1, "a"), (2, "b")])
            cur.execute(f"select id, v from `{table}` order by id")
            assert cur.fetchall() == ((1, "a"), (2, "b"))
            cur.execute(f"drop temporary table `{table}`")
    finally:
        conn.close()


def test_rabbitmq_publish_and_get() -> None:
    params = pika.URLParameters(endpoints.RABBITMQ_URL)
    params.socket_timeout = 5
    params.connection_attempts = 1
    queue = _name("sluice-smoke")
    body = uuid.uuid4().bytes
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(queue=queue, durable=False, auto_delete=False)
        try:
            channel.basic_publish(
                exchange="",
                routing_key=queue,
                body=body,
                properties=pika.BasicProperties(content_type="application/octet-stream"),
                mandatory=True,
            )
            method, properties, got = channel.basic_get(queue=queue, auto_ack=False)
            assert method is not None, "queue is empty after a confirmed publish"
            assert got == body
            assert properties.content_type == "application/octet-stream"
            channel.basic_ack(delivery_tag=method.delivery_tag)
        finally:
            channel.queue_delete(queue=queue)
    finally:
        connection.close()


def test_pubsub_emulator_publish_and_pull(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", endpoints.PUBSUB_EMULATOR_HOST)
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(endpoints.PUBSUB_PROJECT, _name("smoke-topic"))
    subscription = subscriber.subscription_path(endpoints.PUBSUB_PROJECT, _name("smoke-sub"))
    try:
        publisher.create_topic(name=topic, timeout=15)
        try:
            subscriber.create_subscription(name=subscription, topic=topic, timeout=15)
            try:
                data = uuid.uuid4().bytes
                publisher.publish(topic, data, origin="smoke").result(timeout=15)
                received: list[Any] = []
                deadline = time.monotonic() + DEADLINE_S
                while not received and time.monotonic() < deadline:
                    response = subscriber.pull(
                        subscription=subscription, max_messages=10, timeout=10
                    )
                    received.extend(response.received_messages)
                assert len(received) == 1
                assert received[0].message.data == data
                assert received[0].message.attributes["origin"] == "smoke"
                subscriber.acknowledge(
                    subscription=subscription, ack_ids=[m.ack_id for m in received]
                )
            finally:
                subscriber.delete_subscription(subscription=subscription, timeout=15)
        finally:
            publisher.delete_topic(topic=topic, timeout=15)
    finally:
        subscriber.close()
        publisher.transport.close()


def _aws_client(service: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=endpoints.AWS_ENDPOINT,
        aws_access_key_id=endpoints.AWS_ACCESS_KEY_ID,
        aws_secret_access_key=endpoints.AWS_SECRET_ACCESS_KEY,
        region_name=endpoints.AWS_REGION,
        config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}),
    )


def test_moto_s3_put_and_get() -> None:
    s3 = _aws_client("s3")
    bucket = _name("sluice-smoke")
    body = uuid.uuid4().bytes
    s3.create_bucket(Bucket=bucket)
    try:
        s3.put_object(Bucket=bucket, Key="dir/object.bin", Body=body)
        assert s3.get_object(Bucket=bucket, Key="dir/object.bin")["Body"].read() == body
        s3.delete_object(Bucket=bucket, Key="dir/object.bin")
    finally:
        s3.delete_bucket(Bucket=bucket)


def test_moto_kinesis_put_and_get_records() -> None:
    kinesis = _aws_client("kinesis")
    stream = _name("sluice-smoke")
    kinesis.create_stream(StreamName=stream, ShardCount=1)
    try:
        kinesis.get_waiter("stream_exists").wait(
            StreamName=stream, WaiterConfig={"Delay": 1, "MaxAttempts": 30}
        )
        data = uuid.uuid4().bytes
        put = kinesis.put_record(StreamName=stream, Data=data, PartitionKey="smoke")
        iterator = kinesis.get_shard_iterator(
            StreamName=stream,
            ShardId=put["ShardId"],
            ShardIteratorType="AT_SEQUENCE_NUMBER",
            StartingSequenceNumber=put["SequenceNumber"],
        )["ShardIterator"]
        records = kinesis.get_records(ShardIterator=iterator, Limit=10)["Records"]
        assert [r["Data"] for r in records] == [data]
        assert records[0]["PartitionKey"] == "smoke"
    finally:
        kinesis.delete_stream(StreamName=stream)
