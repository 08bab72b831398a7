"""The source conformance suite over Kafka, RabbitMQ, local files, S3 objects and Delta tables, against the real services."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.testing import ACK_ONLY_SOURCE_CHECKS, SOURCE_CHECKS, Check, SourceHarness
from tests.conformance.conftest import (
    FilesHarness,
    KafkaHarness,
    RabbitMQHarness,
    S3FilesHarness,
    cases,
)

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


@pytest.mark.parametrize("check", cases(SOURCE_CHECKS))
def test_object_store_s3(
    check: Check[SourceHarness],
    s3_files_harness: S3FilesHarness,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path / "state"))
    check(s3_files_harness)


#: A Delta table holds no undecodable records: every check but that one.
DELTA_CHECKS = [c for c in SOURCE_CHECKS if c.name != "bad_payload_reported"]


@pytest.mark.parametrize("kind", ["delta_local", "delta_s3"])
@pytest.mark.parametrize("check", cases(DELTA_CHECKS))
def test_delta(check: Check[SourceHarness], kind: str, request: pytest.FixtureRequest) -> None:
    check(request.getfixturevalue(f"{kind}_source_harness"))
