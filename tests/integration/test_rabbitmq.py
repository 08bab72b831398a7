"""RabbitMQ → Postgres through real `flow consume` processes, against the real broker.

* SIGKILL mid-stream and a restart: every message lands, once (merge target).
* The broker closes the consumer's connection (management API) while a batch
  is being written: the batch's delivery tags are not acknowledged on the new
  connection, the broker delivers those messages again, the merge target
  holds each once, and the queue ends empty (nothing ready, nothing unacked).
* A target slower than two heartbeat intervals (a table lock held by the
  test, heartbeat 2 s): the connection stays up and nothing is delivered twice.
* A message that does not decode follows ``on_error``: fail naming the queue
  and the delivery tag, drop counted, dlq with the raw payload.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import psycopg
import pytest
from tests import amqp, endpoints
from tests.integration.conftest import (
    Flow,
    events,
    kill_after_reading,
    unique,
    wait_for_count,
    wait_until,
)

pytestmark = pytest.mark.integration

decode = msgspec.json.Decoder().decode


def config(
    queue: str,
    table: str,
    *,
    url: str = endpoints.RABBITMQ_URL,
    batch_rows: int = 200,
    on_error: str | None = None,
    extra: str = "",
) -> str:
    """A RabbitMQ → Postgres merge pipeline (key ``id``)."""
    transform = f'[transform]\non_error = "{on_error}"\n' if on_error else ""
    return f"""
pipeline_name = "{table}"
source_query = "{queue}"
idle_pause_ms = 100
{extra}

[source]
kind = "rabbitmq"
amqp_url = "{url}"
max_batch_rows = {batch_rows}
max_batch_wait_ms = 100

{transform}
[target]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
mode = "merge"

[target.table]
schema = "public"
name = "{table}"
primary_key = ["id"]
"""


@pytest.fixture
def queue() -> Iterator[str]:
    name = unique("rq")
    amqp.declare(name)
    yield name
    amqp.delete(name)


@pytest.fixture
def table(pg: psycopg.Connection[Any]) -> Iterator[str]:
    name = unique("rabbit")
    yield name
    pg.execute(f'DROP TABLE IF EXISTS public."{name}"')
    row = pg.execute("SELECT to_regclass('public._sluice_positions')").fetchone()
    if row is not None and row[0] is not None:  # the stream test's positions
        pg.execute("DELETE FROM public._sluice_positions WHERE pipeline = %s", (name,))


def assert_once(table: str, n: int) -> None:
    """The table holds ids 0..n-1, each once, with the values produced."""
    with psycopg.connect(endpoints.POSTGRES_URL, autocommit=True) as conn:
        rows = conn.execute(f"SELECT id, user_id, note FROM public.{table} ORDER BY id").fetchall()
    assert [r[0] for r in rows] == list(range(n)), f"{len(rows)} rows, expected ids 0..{n - 1}"
    assert all(u == i % 997 and note == f"n{i}" for i, u, note in rows), "values differ"


def queue_settles_empty(queue: str, f: Flow) -> float:
    """0 ready and 0 unacknowledged while the consumer runs (management API,
    statistics a few seconds old), then, with the consumer stopped, nothing
    came back to the queue (a passive declare counts in real time). Returns
    the rows the process consumed."""
    wait_until(lambda: amqp.counts(queue) == (0, 0), 30, f"queue {queue} at 0 ready, 0 unacked")
    consumed = f.metric("sluice_rows_consumed_total")
    assert f.stop() == 0, f.output()
    with amqp.connect() as conn:
        ok = conn.channel().queue_declare(queue, passive=True)
    assert ok.method.message_count == 0, f"{ok.method.message_count} messages came back"
    return consumed


def consumer_name(queue: str) -> str:
    """What the source's connection name contains (``sluice <pipeline> <- <queue>``)."""
    return f"<- {queue}"


def test_sigkill_mid_stream_then_restart(queue: str, table: str, flow: Callable[..., Flow]) -> None:
    n = 6000
    amqp.publish(queue, events(n))
    cfg = config(queue, table)
    first = flow(cfg)
    kill_after_reading(first, n / 4, random.uniform(0.0, 0.1))
    landed = wait_for_count(f"public.{table}", lambda c: True, 5, "a count")
    assert landed < n, "the kill came after everything was written: the test proves nothing"
    second = flow(cfg)
    wait_for_count(f"public.{table}", lambda c: c >= n, 60, f"{n} rows")
    assert_once(table, n)
    queue_settles_empty(queue, second)


def test_connection_closed_by_broker_mid_batch(
    queue: str, table: str, flow: Callable[..., Flow], pg: psycopg.Connection[Any]
) -> None:
    amqp.publish(queue, events(100))
    f = flow(config(queue, table))
    wait_for_count(f"public.{table}", lambda c: c == 100, 30, "the first 100 rows")
    rest = 500
    with psycopg.connect(endpoints.POSTGRES_URL) as locker:
        # The test holds the table: the next batch's write waits, unacknowledged.
        locker.execute(f"LOCK TABLE public.{table} IN ACCESS EXCLUSIVE MODE")
        amqp.publish(queue, events(rest, start=100))
        # A batch is counted as consumed right before its write (which waits).
        wait_until(
            lambda: f.metric("sluice_rows_consumed_total") > 100, 30, "the next batch's write"
        )
        closed = amqp.close_connections(consumer_name(queue))
        assert closed == 1, f"closed {closed} connections of the consumer"
        locker.rollback()  # the write goes on, into a batch whose tags are dead
    wait_for_count(f"public.{table}", lambda c: c >= 100 + rest, 60, "every row")
    consumed = queue_settles_empty(queue, f)
    # The batch written over the closed connection was not acknowledged, and
    # its messages came again: more rows read than published.
    assert consumed > 100 + rest, f"{consumed} rows read: nothing was delivered again"
    assert "not acknowledging delivery tags" in f.output(), f.output()
    assert_once(table, 100 + rest)


def test_slow_target_keeps_the_connection(
    queue: str, table: str, flow: Callable[..., Flow], pg: psycopg.Connection[Any]
) -> None:
    heartbeat_s = 2
    url = endpoints.RABBITMQ_URL + f"?heartbeat={heartbeat_s}"
    amqp.publish(queue, events(50))
    f = flow(config(queue, table, url=url))
    wait_for_count(f"public.{table}", lambda c: c == 50, 30, "the first 50 rows")
    names = wait_until(lambda: amqp.connections(consumer_name(queue)), 20, "the consumer")
    with psycopg.connect(endpoints.POSTGRES_URL) as locker:
        locker.execute(f"LOCK TABLE public.{table} IN ACCESS EXCLUSIVE MODE")
        amqp.publish(queue, events(150, start=50))
        wait_until(
            lambda: f.metric("sluice_rows_consumed_total") > 50, 30, "the next batch's write"
        )
        # The write waits for 3.5 heartbeat intervals: a client that misses
        # two is closed by the broker.
        time.sleep(3.5 * heartbeat_s)
        locker.rollback()
    wait_for_count(f"public.{table}", lambda c: c >= 200, 30, "every row")
    assert amqp.connections(consumer_name(queue)) == names, "the consumer's connection changed"
    assert "lost:" not in f.output(), f.output()
    consumed = queue_settles_empty(queue, f)
    assert consumed == 200, f"{consumed} rows read: messages were delivered twice"
    assert_once(table, 200)


BAD = b'{"id": 3, "user_id": '  # cut short: not JSON


def publish_with_bad(queue: str) -> None:
    """Ids 0-2, one undecodable message (the 4th: delivery tag 4), ids 3-5."""
    amqp.publish(queue, [*events(3), BAD, *events(3, start=3)])


def test_undecodable_message_fails_naming_queue_and_tag(
    queue: str, table: str, flow: Callable[..., Flow]
) -> None:
    publish_with_bad(queue)
    f = flow(config(queue, table, batch_rows=2))  # the bad one is not in the first batch
    assert f.proc.wait(timeout=60) == 1, f.output()
    out = f.output()
    assert f"cannot decode message at queue {queue} delivery tag 4" in out, out
    # Nothing at or after it was acknowledged: it is back in the queue.
    with amqp.connect() as conn:
        ok = conn.channel().queue_declare(queue, passive=True)
    assert ok.method.message_count >= 4, f"{ok.method.message_count} messages left"


def test_undecodable_message_dropped_and_counted(
    queue: str, table: str, flow: Callable[..., Flow], pg: psycopg.Connection[Any]
) -> None:
    started = time.time()
    publish_with_bad(queue)
    f = flow(config(queue, table, on_error="drop"))
    wait_for_count(f"public.{table}", lambda c: c >= 6, 30, "the 6 good rows")
    wait_until(lambda: f.metric("sluice_rows_dropped_total") == 1, 10, "one row dropped")
    queue_settles_empty(queue, f)
    assert_once(table, 6)
    # No AMQP timestamp on these messages: _event_ts is the time they were received.
    row = pg.execute(
        f"SELECT min(extract(epoch FROM _event_ts)), max(extract(epoch FROM _event_ts)) "
        f"FROM public.{table}"
    ).fetchone()
    assert row is not None and started - 1 <= float(row[0]) <= float(row[1]) <= time.time(), row


def test_undecodable_message_to_the_dead_letter_exchange(
    queue: str, table: str, flow: Callable[..., Flow]
) -> None:
    """``x-dead-letter-exchange`` on the queue: the raw message is published
    there (confirmed) before the batch is acknowledged."""
    exchange, letters = unique("dlx"), unique("dead")
    amqp.bind_exchange(exchange, letters)
    source_queue = unique("rq")
    amqp.declare(source_queue, {"x-dead-letter-exchange": exchange})
    try:
        publish_with_bad(source_queue)
        cfg = config(source_queue, table, on_error="dlq", extra='dlq_store = "auto"')
        cfg = cfg.replace(
            "max_batch_rows",
            f'queue_args = {{ "x-dead-letter-exchange" = "{exchange}" }}\nmax_batch_rows',
        )
        f = flow(cfg)
        wait_for_count(f"public.{table}", lambda c: c >= 6, 30, "the 6 good rows")
        wait_until(lambda: f.metric("sluice_dlq_writes_total") == 1, 10, "one dead letter")
        queue_settles_empty(source_queue, f)
        assert_once(table, 6)
        dead = amqp.drain(letters)
        assert [body for body, _ in dead] == [BAD], dead
        headers = dead[0][1]
        assert headers["sluice.stage"] == "decode", headers
        assert headers["sluice.partition"] == source_queue and headers["sluice.offset"] == "4"
        assert "invalid JSON" in headers["sluice.error"], headers
    finally:
        amqp.delete(source_queue)
        amqp.delete(letters)
        amqp.delete_exchange(exchange)


def test_stream_sigkill_then_restart_exactly_once_into_append(
    table: str, flow: Callable[..., Flow]
) -> None:
    """A stream queue is seekable: its offsets go into the target's transaction
    (``_sluice_positions``) like Kafka's, so a SIGKILL and a restart write every
    message exactly once even into an append table."""
    stream = unique("rs")
    amqp.declare(stream, {"x-queue-type": "stream"})
    try:
        n = 6000
        amqp.publish(stream, events(n))
        cfg = config(stream, table).replace('mode = "merge"', 'mode = "append"')
        cfg = cfg.replace('primary_key = ["id"]', "")
        cfg = cfg.replace(
            "max_batch_rows", 'queue_args = { "x-queue-type" = "stream" }\nmax_batch_rows'
        )
        first = flow(cfg)
        kill_after_reading(first, n / 4, random.uniform(0.0, 0.1))
        landed = wait_for_count(f"public.{table}", lambda c: True, 5, "a count")
        assert landed < n, "the kill came after everything was written: the test proves nothing"
        second = flow(cfg)
        wait_for_count(f"public.{table}", lambda c: c >= n, 60, f"{n} rows")
        time.sleep(1.0)  # a replay that doubled rows would land by now
        assert second.stop() == 0, second.output()
        assert_once(table, n)
    finally:
        amqp.delete(stream)


def build_target(queue: str, queue_args: dict[str, Any] | None = None) -> Any:
    """The RabbitMQ target of a pipeline writing ``queue``, as `flow consume` builds it."""
    from sluice.connectors import registry
    from sluice.testing import load_pipeline

    target: dict[str, Any] = {"kind": "rabbitmq", "amqp_url": endpoints.RABBITMQ_URL}
    target["queue"] = queue
    if queue_args:
        target["queue_args"] = queue_args
    spec = load_pipeline(
        {
            "pipeline_name": unique("p"),
            "source_query": "unused",
            "source": {"kind": "kafka", "bootstrap_servers": "unused:9092"},
            "target": target,
        }
    )
    return registry.build_target(spec.all_targets[0], registry.Context(spec), 0)


def test_target_unroutable_message_is_an_error() -> None:
    """``mandatory`` publishes: with its queue deleted under it, a flush fails
    loudly instead of the broker dropping the messages."""
    import pyarrow as pa

    from sluice.errors import ConnectorError

    queue = unique("rt")
    target = build_target(queue)
    target.open()
    try:
        amqp.delete(queue)
        target.write(pa.table({"id": [1, 2]}))
        with pytest.raises(ConnectorError, match="returned 2 of 2 message"):
            target.flush()
    finally:
        target.close()
        amqp.delete(queue)


def test_target_nacked_message_is_a_transient_error() -> None:
    """A queue full with ``x-overflow = reject-publish`` nacks what does not
    fit: the flush fails (transiently: the engine publishes again)."""
    import pyarrow as pa

    from sluice.errors import TransientError

    queue = unique("rt")
    target = build_target(queue, {"x-max-length": 2, "x-overflow": "reject-publish"})
    target.open()
    try:
        target.write(pa.table({"id": [1, 2, 3, 4, 5]}))
        with pytest.raises(TransientError, match="nacked\\) 3 of 5"):
            target.flush()
        assert sorted(decode(b)["id"] for b in amqp.peek(queue) or []) == [1, 2]
    finally:
        target.close()
        amqp.delete(queue)


def test_broker_unreachable_is_retried_and_not_ready(table: str, flow: Callable[..., Flow]) -> None:
    """No broker at the URL: the source retries with backoff, ``/readyz``
    answers 503 meanwhile, and SIGTERM stops the process cleanly."""
    f = flow(config("nowhere", table, url="amqp://guest:guest@127.0.0.1:1/%2f"))
    wait_until(lambda: "cannot consume, retrying" in f.output(), 30, "a retry")
    assert f.status("/readyz") == 503
    assert f.proc.poll() is None, f.output()
    assert f.stop() == 0, f.output()


def test_window_with_state_store_is_not_starved_by_the_prefetch(
    queue: str, table: str, flow: Callable[..., Flow], pg: psycopg.Connection[Any]
) -> None:
    """A window over a queue acknowledges at checkpoints: once its prefetch
    (2 x 100 here) is read the broker sends nothing more, so the engine
    checkpoints at the next idle round instead of waiting for the interval
    (60 s) or taking the silence for the end of the input."""
    schema = unique("rstate")
    amqp.publish(queue, events(1000))
    window = f"""
[transform.window]
kind = "tumbling"
duration_ms = 3600000
group_by = ["user_id"]
max_groups_per_window = 100000

[[transform.window.aggregations]]
agg = "count"
as = "n"

[state_store]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
schema = "{schema}"
"""
    cfg = config(queue, table, batch_rows=100).replace("\n[target]", window + "\n[target]", 1)
    cfg = cfg.replace('primary_key = ["id"]', 'primary_key = ["user_id", "window_start"]')
    # A bounded run: once idle for 2 s it drains (emits the hour's window),
    # commits and exits. Starved by the prefetch, it would stop after 200.
    f = flow(cfg, "--stop-after-idle-ms", "2000")
    try:
        assert f.proc.wait(timeout=30) == 0, f.output()
        with amqp.connect() as conn:
            ok = conn.channel().queue_declare(queue, passive=True)
        assert ok.method.message_count == 0, f"{ok.method.message_count} messages came back"
        # 997 users (id % 997), 1000 events.
        assert pg.execute(f"SELECT count(*), sum(n) FROM public.{table}").fetchone() == (997, 1000)
    finally:
        pg.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
