"""RabbitMQ keys: prefetch against the batch size, the derived prefetch and
batch size, stream queues. No broker needed."""

from __future__ import annotations

import pytest

from sluice.config import load_text
from sluice.connectors.rabbitmq.spec import RabbitMQSource
from sluice.errors import ConfigError


def pipeline(source_keys: str) -> str:
    return f"""
pipeline_name = "p"
source_query = "events"

[source]
kind = "rabbitmq"
amqp_url = "amqp://guest:guest@127.0.0.1:5672/"
{source_keys}

[target]
kind = "sqlite"
path = "x.sqlite"

[target.table]
name = "t"
"""


def source(keys: str) -> RabbitMQSource:
    spec = load_text(pipeline(keys))
    (src,) = spec.all_sources
    assert isinstance(src, RabbitMQSource)
    return src


def problems(keys: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(pipeline(keys), "p.toml")
    return [str(p) for p in info.value.problems]


def test_prefetch_below_the_batch_size_is_an_error() -> None:
    assert problems("max_batch_rows = 1000\nprefetch_count = 500") == [
        "p.toml: source.prefetch_count: must be at least max_batch_rows (1000): the broker "
        "sends no more than 500 unacknowledged messages, so a batch of 1000 could never fill; "
        "raise prefetch_count (at most 65535) or lower max_batch_rows"
    ]


def test_prefetch_below_the_default_batch_size_is_an_error() -> None:
    (line,) = problems("prefetch_count = 10000")
    assert "source.prefetch_count: must be at least max_batch_rows (50000)" in line


def test_prefetch_past_the_amqp_limit_is_an_error() -> None:
    assert problems("prefetch_count = 70000") == [
        "p.toml: source.prefetch_count: expected an integer > 0 and <= 65535, got 70000"
    ]


def test_default_prefetch_is_two_batches_capped_by_amqp() -> None:
    small = source("max_batch_rows = 1000")
    assert (small.prefetch, small.batch_rows) == (2000, 1000)
    default = source("")
    assert (default.prefetch, default.batch_rows) == (65535, 50000)


def test_a_batch_larger_than_any_prefetch_follows_the_prefetch() -> None:
    big = source("max_batch_rows = 100000")
    assert (big.prefetch, big.batch_rows) == (65535, 65535)


def test_explicit_prefetch_at_least_the_batch() -> None:
    s = source("max_batch_rows = 1000\nprefetch_count = 1000")
    assert (s.prefetch, s.batch_rows) == (1000, 1000)


def test_stream_queue_and_queue_args() -> None:
    s = source('queue_args = { "x-queue-type" = "stream", "x-max-length-bytes" = 1000000 }')
    assert s.stream
    assert s.queue_args == {"x-queue-type": "stream", "x-max-length-bytes": 1000000}
    assert not source('queue_args = { "x-queue-type" = "quorum" }').stream
