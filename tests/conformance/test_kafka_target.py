"""The target conformance suite over the Kafka target, against the real broker (tansu).

A "table" is a topic; reading it back is consuming every partition from the
start to its end with a consumer of the test's own and decoding the JSON
messages. The merge checks do not apply: the connector does not declare the
``merge`` capability (a topic is a log, not a keyed table).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import pyarrow as pa
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from sluice.connectors import registry
from sluice.testing import APPEND_TARGET_CHECKS, TARGET_CHECKS, Check, TargetHarness, unique
from tests import endpoints
from tests.conformance.conftest import cases

pytestmark = pytest.mark.integration

READ_TIMEOUT_S = 30.0


def read_topic(topic: str, timeout_s: float = READ_TIMEOUT_S) -> list[Any] | None:
    """Every message of ``topic`` (all partitions, from the start to the end),
    or ``None`` when the topic does not exist. Never creates it."""
    conf = {"bootstrap.servers": endpoints.KAFKA_BOOTSTRAP}
    topics = AdminClient(conf).list_topics(timeout=10).topics
    if topic not in topics:
        return None
    partitions = list(topics[topic].partitions)
    consumer = Consumer(
        {
            **conf,
            "group.id": unique("readback"),
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        done: set[int] = set()
        out: list[Any] = []
        import time

        deadline = time.monotonic() + timeout_s
        while len(done) < len(partitions):
            assert time.monotonic() < deadline, f"reading {topic} back took over {timeout_s} s"
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, err
                done.add(msg.partition())
                continue
            out.append(msg)
        return out
    finally:
        consumer.close()


class KafkaTargetHarness(TargetHarness):
    """A topic per check (auto-created by the first produce); JSON messages."""

    name = "kafka_target"
    has_connection = False  # no server-side connection kill on tansu: the abandoned-write path

    def target(
        self, table: str, *, mode: str = "append", key: Sequence[str] = ()
    ) -> dict[str, Any]:
        return {
            "kind": "kafka",
            "bootstrap_servers": endpoints.KAFKA_BOOTSTRAP,
            "topic": table,
            "message_key_column": "id",
        }

    def read_back(self, table: str) -> pa.Table | None:
        msgs = read_topic(table)
        if msgs is None:
            return None
        rows = [msgspec.json.decode(m.value()) for m in msgs]
        for m, row in zip(msgs, rows, strict=True):
            assert m.key() == str(row["id"]).encode(), f"key {m.key()!r} of row {row}"
        if not rows:
            return pa.table({"id": pa.array([], pa.int64())})
        return pa.Table.from_struct_array(
            pa.array(rows)
        )  # every key seen, not just the first row's


APPLICABLE = list(APPEND_TARGET_CHECKS)


def test_kafka_target_is_not_merge_capable() -> None:
    """The merge checks are left out because the descriptor says so, not by choice."""
    connector = registry.of_kind("target", "kafka")
    assert connector is not None and not connector.capabilities.merge
    assert {c.name for c in TARGET_CHECKS} - {c.name for c in APPLICABLE} == {
        "merge_last_row_wins",
        "merge_replay_changes_nothing",
    }


@pytest.fixture(scope="module")
def kafka_target_harness() -> KafkaTargetHarness:
    return KafkaTargetHarness()


@pytest.mark.parametrize("check", cases(APPLICABLE))
def test_kafka_target(
    check: Check[TargetHarness], kafka_target_harness: KafkaTargetHarness
) -> None:
    check(kafka_target_harness)
