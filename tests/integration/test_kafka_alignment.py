"""Watermark alignment on the real broker (tansu): a partition the engine
pauses is not fetched, and once resumed it continues right after the last
message handed out, so nothing is skipped or read twice."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from tests import endpoints
from tests.integration.conftest import kafka_source, unique

from sluice.config import load_text
from sluice.connectors import registry
from sluice.connectors.kafka.source import KafkaSource

pytestmark = pytest.mark.integration

N = 1_500  # messages per partition


def _topic_with_two_partitions() -> str:
    topic = unique("align")
    admin = AdminClient({"bootstrap.servers": endpoints.KAFKA_BOOTSTRAP})
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(timeout=30)
    return topic


def _produce(topic: str, partition: int, ids: range) -> None:
    producer = Producer({"bootstrap.servers": endpoints.KAFKA_BOOTSTRAP, "linger.ms": 5})
    for i in ids:
        producer.produce(topic, json.dumps({"p": partition, "i": i}).encode(), partition=partition)
    assert producer.flush(30) == 0


def _source(topic: str) -> KafkaSource:
    source = kafka_source(topic, max_batch_rows=100, batch_linger_ms=20)
    assert isinstance(source, KafkaSource)
    return source


def _read(source: KafkaSource, seen: dict[int, list[int]], until: Any, what: str) -> list[int]:
    """Read (committing) until ``until(seen)``; the partitions of each row read."""
    parts: list[int] = []
    deadline = time.monotonic() + 60
    while not until(seen):
        assert time.monotonic() < deadline, f"{what}: read {[len(v) for v in seen.values()]}"
        batch = source.read(1)
        if batch is None or not batch.num_rows:
            continue
        for p, i in zip(batch.data["p"].to_pylist(), batch.data["i"].to_pylist(), strict=True):
            seen[p].append(i)
            parts.append(p)
        source.commit(batch.ack)
    return parts


def test_a_paused_partition_is_not_fetched_and_resumes_after_its_last_row() -> None:
    topic = _topic_with_two_partitions()
    for p in (0, 1):
        _produce(topic, p, range(N))
    source = _source(topic)
    source.open(None)
    seen: dict[int, list[int]] = {0: [], 1: []}
    try:
        # Pause a partition part-way: the rest of it is prefetched, not handed out.
        _read(source, seen, lambda s: any(0 < len(v) < N for v in s.values()), "a first row")
        a = next(p for p, v in seen.items() if 0 < len(v) < N)
        b = 1 - a
        source.align({f"{topic}:{a}"})
        _produce(topic, b, range(N, 2 * N))
        during = _read(source, seen, lambda s: len(s[b]) == 2 * N, "the other partition")
        assert during and set(during) == {b}, "a paused partition was fetched"
        # Still paused: nothing more comes.
        assert all(x is None or not x.num_rows for x in (source.read(0.3) for _ in range(3)))
        source.align(())
        _read(source, seen, lambda s: len(s[a]) == N, "the paused partition after the resume")
    finally:
        source.close()
    assert seen[a] == list(range(N)), "the paused partition skipped or repeated rows"
    assert seen[b] == list(range(2 * N))


def test_a_replicas_shared_consumer_pauses_one_topic_and_reads_the_other() -> None:
    left, right = _topic_with_two_partitions(), _topic_with_two_partitions()
    for topic in (left, right):
        for p in (0, 1):
            _produce(topic, p, range(N))
    sources = "\n".join(
        f"""
[[sources]]
query = "{t}"
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
auto_offset_reset = "earliest"
session_timeout_ms = 2000
max_batch_rows = 100
batch_linger_ms = 20
"""
        for t in (left, right)
    )
    spec = load_text(
        f"""
pipeline_name = "{unique("p")}"
{sources}
[target]
kind = "sqlite"
path = "unused.sqlite"
table = {{ name = "t" }}
""",
        "<test>",
    )
    views = registry.build_sources(spec.all_sources, registry.Context(spec), shared=True)
    assert [type(v).__name__ for v in views] == ["TopicView", "TopicView"]
    for view in views:
        view.open(None)
    rows = {left: 0, right: 0}
    try:
        views[0].align({f"{left}:0", f"{left}:1"})
        deadline = time.monotonic() + 60
        while rows[right] < 2 * N:
            assert time.monotonic() < deadline, f"read {rows}"
            for view in views:
                batch = view.read(0.5)
                if batch is not None and batch.num_rows:
                    rows[view.id] += batch.num_rows
                    view.commit(batch.ack)
        assert rows[left] < 2 * N, "the paused topic was read whole"
        views[1].align(())  # the other view's choice does not resume the paused topic
        for _ in range(4):
            batch = views[0].read(0.3)
            assert batch is None or not batch.num_rows, "the paused topic was fetched"
        views[0].align(())
        deadline = time.monotonic() + 60
        while rows[left] < 2 * N:
            assert time.monotonic() < deadline, f"read {rows} after the resume"
            batch = views[0].read(0.5)
            if batch is not None and batch.num_rows:
                rows[left] += batch.num_rows
                views[0].commit(batch.ack)
    finally:
        for view in views:
            view.close()
    assert rows == {left: 2 * N, right: 2 * N}
