"""Pub/Sub emulator helpers for tests: topics, subscriptions, publishing, reading back.

Everything goes to the real emulator (``tests.endpoints.PUBSUB_EMULATOR_HOST``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent import futures
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.api_core.exceptions import DeadlineExceeded
from google.auth.credentials import AnonymousCredentials
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from tests import endpoints

HOST = endpoints.PUBSUB_EMULATOR_HOST
PROJECT = endpoints.PUBSUB_PROJECT
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def topic_path(name: str) -> str:
    return f"projects/{PROJECT}/topics/{name}"


def sub_path(name: str) -> str:
    return f"projects/{PROJECT}/subscriptions/{name}"


def publisher(ordered: bool = False) -> Any:
    transport = PublisherGrpcTransport(
        host=HOST, channel=grpc.insecure_channel(HOST), credentials=AnonymousCredentials()
    )
    return pubsub_v1.PublisherClient(
        pubsub_v1.types.BatchSettings(max_messages=1000, max_latency=0.01),
        pubsub_v1.types.PublisherOptions(enable_message_ordering=ordered),
        transport=transport,
    )


def subscriber() -> Any:
    transport = SubscriberGrpcTransport(
        host=HOST, channel=grpc.insecure_channel(HOST), credentials=AnonymousCredentials()
    )
    return pubsub_v1.SubscriberClient(transport=transport)


class PubSub:
    """One publisher and one subscriber client on the emulator."""

    def __init__(self) -> None:
        os.environ.setdefault("PUBSUB_EMULATOR_HOST", HOST)
        self.pub = publisher(ordered=True)
        self.sub = subscriber()

    def topic(self, name: str) -> str:
        self.pub.create_topic(name=topic_path(name))
        return name

    def subscription(
        self, name: str, topic: str, *, ack_deadline_s: int = 10, ordered: bool = True
    ) -> str:
        self.sub.create_subscription(
            request={
                "name": sub_path(name),
                "topic": topic_path(topic),
                "ack_deadline_seconds": ack_deadline_s,
                "enable_message_ordering": ordered,
            }
        )
        return name

    def publish(
        self, topic: str, payloads: Sequence[bytes], keys: Sequence[str] | None = None
    ) -> list[str]:
        """Publish and wait for every message id."""
        sent = [
            self.pub.publish(topic_path(topic), p, ordering_key=keys[i] if keys else "")
            for i, p in enumerate(payloads)
        ]
        _done, pending = futures.wait(sent, timeout=120)
        assert not pending, f"{len(pending)} publishes unanswered"
        return [str(f.result()) for f in sent]

    def pull(self, subscription: str) -> list[Any]:
        """One pull (up to 1000 messages), acknowledged; the messages."""
        try:
            resp = self.sub.pull(
                request={"subscription": sub_path(subscription), "max_messages": 1000},
                # An empty pull is held open (~4 s) up to its deadline: keep it short.
                timeout=0.3,
                retry=None,
            )
        except DeadlineExceeded:
            return []
        msgs = list(resp.received_messages)
        if msgs:
            self.sub.acknowledge(
                subscription=sub_path(subscription), ack_ids=[m.ack_id for m in msgs]
            )
        return [m.message for m in msgs]

    def drain(self, subscription: str, quiet_s: float = 0.5) -> list[Any]:
        """Pull and acknowledge until nothing comes for ``quiet_s``; the messages."""
        out: list[Any] = []
        quiet = time.monotonic() + quiet_s
        while time.monotonic() < quiet:
            msgs = self.pull(subscription)
            if not msgs:
                time.sleep(0.05)
                continue
            out.extend(msgs)
            quiet = time.monotonic() + quiet_s
        return out

    def read(self, subscription: str, count: int, timeout_s: float = 30) -> list[Any]:
        """Pull and acknowledge until ``count`` messages came; the messages."""
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < count:
            assert time.monotonic() < deadline, f"{len(out)} of {count} messages in {timeout_s} s"
            msgs = self.pull(subscription)
            out.extend(msgs)
            if not msgs:
                time.sleep(0.05)
        return out


def micros(ts: Any) -> int:
    """A message's publish_time (a datetime) in microseconds since the epoch."""
    return (ts - EPOCH) // timedelta(microseconds=1)
