"""The source conformance suite over Kafka and local files, against the real services."""

from __future__ import annotations

import pytest

from sluice.testing import SOURCE_CHECKS, Check, SourceHarness
from tests.conformance.conftest import FilesHarness, KafkaHarness, cases

pytestmark = pytest.mark.integration

#: Connector bugs the suite found: check name -> why it fails today.
KAFKA_BUGS = {
    "redelivers_uncommitted": "KafkaSource.close() with a batch read and not committed "
    "waits 30 s (_REVOKE_WAIT_S) in the revoke callback for a commit that cannot come",
}
FILES_BUGS = {
    "bad_payload_reported": "LocalFilesSource.read raises DecodeError for a file that does "
    "not parse instead of reporting it in Batch.bad / Batch.raw, so on_error never sees it",
}


@pytest.mark.parametrize("check", cases(SOURCE_CHECKS, KAFKA_BUGS))
def test_kafka(check: Check[SourceHarness], kafka_harness: KafkaHarness) -> None:
    check(kafka_harness)


@pytest.mark.parametrize("check", cases(SOURCE_CHECKS, FILES_BUGS))
def test_object_store_local(check: Check[SourceHarness], files_harness: FilesHarness) -> None:
    check(files_harness)
