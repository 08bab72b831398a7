"""The source conformance suite over Kafka, RabbitMQ and local files, against the real services."""

from __future__ import annotations

import pytest

from sluice.testing import ACK_ONLY_SOURCE_CHECKS, SOURCE_CHECKS, Check, SourceHarness
from tests.conformance.conftest import FilesHarness, KafkaHarness, RabbitMQHarness, cases

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("check", cases(SOURCE_CHECKS))
def test_kafka(check: Check[SourceHarness], kafka_harness: KafkaHarness) -> None:
    check(kafka_harness)


@pytest.mark.parametrize("check", cases(SOURCE_CHECKS))
def test_object_store_local(check: Check[SourceHarness], files_harness: FilesHarness) -> None:
    check(files_harness)


@pytest.mark.parametrize("check", cases(ACK_ONLY_SOURCE_CHECKS))
def test_rabbitmq(check: Check[SourceHarness], rabbitmq_harness: RabbitMQHarness) -> None:
    check(rabbitmq_harness)


@pytest.mark.parametrize("check", cases(SOURCE_CHECKS))
def test_rabbitmq_stream(
    check: Check[SourceHarness], rabbitmq_stream_harness: RabbitMQHarness
) -> None:
    check(rabbitmq_stream_harness)
