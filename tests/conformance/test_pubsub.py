"""The source and target conformance suites over GCP Pub/Sub, against the real emulator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import pyarrow as pa
import pytest

from sluice.testing import (
    APPEND_TARGET_CHECKS,
    SOURCE_CHECKS,
    Check,
    SourceHarness,
    TargetHarness,
    unique,
)
from sluice.testing.harness import Row
from tests import pubsub_kit
from tests.conformance.conftest import cases

pytestmark = pytest.mark.integration

#: Checks that do not apply: a subscription is ack-only (no positions to
#: resume from); a topic has no merge (APPEND_TARGET_CHECKS).
SOURCE_SKIP = {"resume_honoured"}


def _connection() -> dict[str, Any]:
    return {
        "kind": "pubsub",
        "project_id": pubsub_kit.PROJECT,
        "endpoint": pubsub_kit.HOST,
        "anonymous_auth": True,
    }


class PubSubSourceHarness(SourceHarness):
    """A fresh topic + subscription per check; a second subscription on the
    same topic ("peek") tells the publish time the service gave each message."""

    name = "pubsub"
    encode = msgspec.json.Encoder().encode

    def __init__(self) -> None:
        self.ps = pubsub_kit.PubSub()

    def new_stream(self) -> str:
        topic = self.ps.topic(unique("conf"))
        self.ps.subscription(f"{topic}-peek", topic, ordered=False)
        # Unordered: a close hands the messages in flight back at once.
        return self.ps.subscription(f"{topic}-sub", topic, ordered=False)

    def source(self, stream: str) -> dict[str, Any]:
        return _connection()

    def _send(self, stream: str, payloads: list[bytes]) -> list[int]:
        topic = stream.removesuffix("-sub")
        ids = self.ps.publish(topic, payloads)
        peeked = self.ps.read(f"{topic}-peek", len(ids))
        times = {m.message_id: pubsub_kit.micros(m.publish_time) for m in peeked}
        return [times[i] for i in ids]

    def produce(self, stream: str, rows: Sequence[Row]) -> list[int]:
        return self._send(stream, [self.encode(dict(r)) for r in rows])

    def produce_bad(self, stream: str) -> bytes:
        raw = b'{"id": 1, "name": '
        self._send(stream, [raw])
        return raw


class PubSubTargetHarness(TargetHarness):
    """A fresh topic per check with a subscription that reads what landed;
    rows read back are kept (a pull takes them), so each read shows them all."""

    name = "pubsub"
    has_connection = False  # no server-side connection to kill; the suite abandons a write

    def __init__(self) -> None:
        self.ps = pubsub_kit.PubSub()
        self.seen: dict[str, list[dict[str, Any]]] = {}

    def new_table(self) -> str:
        topic = self.ps.topic(unique("conf"))
        self.ps.subscription(f"{topic}-read", topic)
        self.seen[topic] = []
        return topic

    def target(
        self, table: str, *, mode: str = "append", key: Sequence[str] = ()
    ) -> dict[str, Any]:
        return {**_connection(), "topic": table}

    def read_back(self, table: str) -> pa.Table | None:
        rows = self.seen.setdefault(table, [])
        rows.extend(msgspec.json.decode(m.data) for m in self.ps.drain(f"{table}-read", 0.2))
        if not rows:
            return None
        names = list(dict.fromkeys(k for r in rows for k in r))
        return pa.table({n: [r.get(n) for r in rows] for n in names})


@pytest.fixture(scope="module")
def source_harness() -> PubSubSourceHarness:
    return PubSubSourceHarness()


@pytest.fixture(scope="module")
def target_harness() -> PubSubTargetHarness:
    return PubSubTargetHarness()


@pytest.mark.parametrize("check", cases(c for c in SOURCE_CHECKS if c.name not in SOURCE_SKIP))
def test_source(check: Check[SourceHarness], source_harness: PubSubSourceHarness) -> None:
    check(source_harness)


@pytest.mark.parametrize("check", cases(APPEND_TARGET_CHECKS))
def test_target(check: Check[TargetHarness], target_harness: PubSubTargetHarness) -> None:
    check(target_harness)
