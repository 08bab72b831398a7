"""How the Kafka source sizes its batches, against the real broker (tansu):
a slow stream's messages are handed on after ``batch_linger_ms``, not after
``max_batch_wait_ms``; a backlog is read in full batches, bounded by rows and
by bytes."""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from tests import endpoints
from tests.integration.conftest import kafka_source, unique

from sluice.connectors.kafka.source import KafkaSource

pytestmark = pytest.mark.integration


def _topic(partitions: int = 2) -> str:
    topic = unique("batching")
    admin = AdminClient({"bootstrap.servers": endpoints.KAFKA_BOOTSTRAP})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(timeout=30)
    return topic


def _produce(topic: str, payloads: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": endpoints.KAFKA_BOOTSTRAP, "linger.ms": 5})
    for i, payload in enumerate(payloads):
        producer.produce(topic, payload, key=str(i).encode())
    assert producer.flush(30) == 0


def _source(topic: str, **keys: Any) -> KafkaSource:
    source = kafka_source(topic, **keys)
    assert isinstance(source, KafkaSource)
    return source


def _until_assigned(source: KafkaSource) -> list[Any]:
    """Read until the group assigned the partitions; the batches read meanwhile."""
    batches = []
    deadline = time.monotonic() + 30
    while not source.assignment():
        assert time.monotonic() < deadline, "no partitions assigned within 30 s"
        batch = source.read(0.5)
        if batch is not None:
            batches.append(batch)
    return batches


def test_a_slow_streams_messages_wait_the_linger_not_the_batch_wait() -> None:
    topic = _topic()
    source = _source(topic, max_batch_wait_ms=20_000, batch_linger_ms=50)
    source.open(None)
    try:
        assert not [b for b in _until_assigned(source) if b.num_rows]
        for round_ in range(3):
            _produce(topic, [b'{"id": %d}' % (round_ * 10 + i) for i in range(5)])
            started = time.monotonic()
            rows = 0
            while rows < 5:
                batch = source.read(20)
                assert batch is not None
                rows += batch.num_rows
                source.commit(batch.ack)
            # max_batch_wait_ms (20 s) would hold a batch of 5 until it is full.
            assert time.monotonic() - started < 3, "a batch waited for more messages"
            assert rows == 5
    finally:
        source.close()


def test_a_backlog_is_read_in_full_batches_bounded_by_rows_and_by_bytes() -> None:
    topic = _topic()
    n = 3_000
    payloads = [b'{"id": %d, "pad": "%s"}' % (i, b"x" * 1000) for i in range(n)]
    _produce(topic, payloads)
    size = len(payloads[0])
    max_bytes = 100 * size
    source = _source(topic, max_batch_rows=40, max_batch_bytes=max_bytes, batch_linger_ms=50)
    source.open(None)
    by_rows = _read_all(source, n)
    source.close()
    # Bounded by rows: every batch but the last is full (an end-of-partition
    # event, one per partition, takes the place of a message).
    sizes = [b.num_rows for b in by_rows]
    assert max(sizes) == 40 and min(sizes[:-1]) >= 38, sizes

    source = _source(topic, group_id=f'"{unique("g")}"', max_batch_bytes=max_bytes)
    source.open(None)
    by_bytes = _read_all(source, n)
    source.close()
    sizes = [b.num_rows for b in by_bytes]
    # Bounded by bytes: about 100 values a batch, never far more; the
    # backlog fills them (a batch of a few rows would mean it was handed on early).
    assert max(sizes) <= 110, sizes
    assert min(sizes[1:-1]) >= 90, sizes


def test_unset_max_batch_bytes_reads_4_mib_and_8_mib_into_a_window_or_join() -> None:
    # The default trades: an append reads 4 MiB batches (as fast, less memory);
    # a window or join (the run loop tracks row partitions) 8 MiB, fewer rounds.
    topic = _topic()
    n = 12_000
    payloads = [b'{"id": %d, "pad": "%s"}' % (i, b"x" * 1000) for i in range(n)]
    _produce(topic, payloads)
    size = len(payloads[-1])
    largest = {}
    for stateful in (False, True):
        source = _source(topic, group_id=f'"{unique("g")}"', batch_linger_ms=200)
        source.track(row_partitions=stateful, wait_on_revoke=True)
        source.open(None)
        largest[stateful] = max(b.num_rows for b in _read_all(source, n)) * size
        source.close()
    # (rows x the largest payload: within a few messages of the limit)
    assert 3.5 * MIB <= largest[False] <= 4.02 * MIB, largest
    assert 7 * MIB <= largest[True] <= 8.04 * MIB, largest


MIB = 1 << 20


def _read_all(source: KafkaSource, n: int) -> list[Any]:
    batches = [b for b in _until_assigned(source) if b.num_rows]
    ids: list[int] = [i for b in batches for i in b.data.column("id").to_pylist()]
    deadline = time.monotonic() + 60
    while len(ids) < n:
        assert time.monotonic() < deadline, f"only {len(ids)} of {n} rows read"
        batch = source.read(1)
        if batch is None or not batch.num_rows:
            continue
        batches.append(batch)
        ids.extend(batch.data.column("id").to_pylist())
        source.commit(batch.ack)
    assert sorted(ids) == list(range(n))
    return batches
