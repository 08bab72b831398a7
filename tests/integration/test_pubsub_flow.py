"""Pub/Sub → Postgres through a real `flow consume` process, against the real emulator.

Crashes are SIGKILLs of the real process; the oracle is the set of ids
published, counted in Postgres, and an empty subscription at the end (every
message acknowledged).
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import msgspec
import psycopg
import pytest
from tests import endpoints, pubsub_kit
from tests.integration.conftest import (
    events,
    kill_after_reading,
    pg_count,
    unique,
    wait_for_count,
    wait_until,
)

from sluice.config import load_text
from sluice.connectors import registry
from sluice.connectors.pubsub.source import PubSubSource
from sluice.errors import ConnectorError
from sluice.testing.targets import table as rows_table

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ps() -> pubsub_kit.PubSub:
    return pubsub_kit.PubSub()


def fresh(
    ps: pubsub_kit.PubSub, ack_deadline_s: int = 10, ordered: bool = False
) -> tuple[str, str]:
    """A new topic and its subscription: (topic, subscription).

    Unordered unless asked: on an ordered subscription a redelivery brings
    back every later message of the key too, acknowledged ones included (the
    emulator treats the empty key as a key), which the drain checks below
    would count as unacknowledged.
    """
    topic = ps.topic(unique("ps"))
    return topic, ps.subscription(
        f"{topic}-sub", topic, ack_deadline_s=ack_deadline_s, ordered=ordered
    )


def config(
    subscription: str,
    table: str,
    *,
    mode: str = "merge",
    batch_rows: int = 1000,
    top: str = "",
    transform: str = "",
) -> str:
    key = 'primary_key = ["id"]' if mode == "merge" else ""
    return f"""
pipeline_name = "{table}"
source_query = "{subscription}"
idle_pause_ms = 100
{top}

[source]
kind = "pubsub"
project_id = "{pubsub_kit.PROJECT}"
endpoint = "{pubsub_kit.HOST}"
anonymous_auth = true
max_batch_rows = {batch_rows}

[target]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
mode = "{mode}"

[target.table]
schema = "public"
name = "{table}"
{key}
{transform}
"""


def assert_drained(ps: pubsub_kit.PubSub, subscription: str, since: float) -> None:
    """Nothing is left unacknowledged: no message comes back until an ack
    deadline (10 s, plus a second) after ``since`` (the last moment a dead
    process held leases; a clean stop hands its messages back at once)."""
    quiet = max(1.0, since + 11 - time.monotonic())
    left = ps.drain(subscription, quiet_s=quiet)
    assert not left, f"{len(left)} message(s) were never acknowledged"


def settle(f: Any, quiet_s: float = 2.0, timeout_s: float = 60) -> None:
    """Wait until ``f`` has consumed nothing new for ``quiet_s``: what it read
    is written and acknowledged (an idle process has nothing in flight)."""
    deadline = time.monotonic() + timeout_s
    seen = f.metric("sluice_rows_consumed_total")
    since = time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"still consuming after {timeout_s} s"
        time.sleep(0.2)
        now = f.metric("sluice_rows_consumed_total")
        if now != seen:
            seen, since = now, time.monotonic()


def test_sigkill_mid_stream_restart_loses_and_doubles_nothing(
    ps: pubsub_kit.PubSub, flow: Any
) -> None:
    topic, sub = fresh(ps)
    table = unique("psk")
    n = 6_000
    ps.publish(topic, events(n))
    cfg = config(sub, table)
    f = flow(cfg)
    kill_after_reading(f, 2_000, random.uniform(0.0, 0.5))
    killed = time.monotonic()
    # The messages the killed process held come back once their lease lapses.
    g = flow(cfg)
    wait_for_count(table, lambda c: c >= n, 90, f"{n} rows", "count(DISTINCT id)")
    # The killed process may have written batches it died before acknowledging:
    # they come back (to g) only when its leases lapse, up to a deadline after
    # the kill, and g must have written and acknowledged them before it stops.
    time.sleep(max(0.0, killed + 12 - time.monotonic()))
    settle(g)
    assert g.stop() == 0, g.output()
    assert pg_count(table) == n  # merge: a redelivered message replaced its row
    assert pg_count(table, "count(DISTINCT id)") == n
    assert pg_count(table, "sum(id)") == n * (n - 1) // 2
    assert_drained(ps, sub, killed)


def test_killed_between_the_write_and_the_ack_is_redelivered_and_acknowledged(
    ps: pubsub_kit.PubSub, flow: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row written, none acknowledged: the table is complete before the
    redelivery, which the next process must still take, merge and acknowledge."""
    topic, sub = fresh(ps)
    table = unique("pskack")
    n = 1000
    ps.publish(topic, events(n))
    # One batch of all n (the wait lets the pulls fill it), then the kill at
    # its acknowledgement (SLUICE_TEST_KILL_AFTER_SOURCE_COMMITS).
    cfg = config(sub, table, batch_rows=n).replace(
        "anonymous_auth = true", "anonymous_auth = true\nmax_batch_wait_ms = 5000"
    )
    monkeypatch.setenv("SLUICE_TEST_KILL_AFTER_SOURCE_COMMITS", "1")
    f = flow(cfg)
    assert f.proc.wait(timeout=60) == -9, f.output()
    killed = time.monotonic()
    monkeypatch.delenv("SLUICE_TEST_KILL_AFTER_SOURCE_COMMITS")
    assert pg_count(table) == n  # written, not acknowledged
    g = flow(cfg)
    time.sleep(max(0.0, killed + 12 - time.monotonic()))  # the leases lapse
    wait_until(lambda: g.metric("sluice_rows_consumed_total") >= n, 30, "the redelivery")
    settle(g)
    assert g.stop() == 0, g.output()
    assert pg_count(table) == n
    assert pg_count(table, "sum(id)") == n * (n - 1) // 2
    assert_drained(ps, sub, killed)


def test_target_slower_than_the_ack_deadline_causes_no_redelivery(
    ps: pubsub_kit.PubSub, flow: Any, pg: Any
) -> None:
    """Ack deadline 10 s, a write held 30 s by a lock: the leases keep every
    message, so an append target gets each exactly once."""
    topic, sub = fresh(ps, ack_deadline_s=10)
    table = unique("psslow")
    f = flow(config(sub, table, mode="append", batch_rows=500))
    ps.publish(topic, events(100))
    wait_for_count(table, lambda c: c == 100, 60, "the first 100 rows")

    locked = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        with psycopg.connect(endpoints.POSTGRES_URL) as conn:
            conn.execute(f"LOCK TABLE public.{table} IN ACCESS EXCLUSIVE MODE")
            locked.set()
            release.wait(120)

    holder = threading.Thread(target=hold_lock, daemon=True)
    holder.start()
    assert locked.wait(30)
    started = time.monotonic()
    n = 2_000
    ps.publish(topic, events(n, 100))
    # The process pulled some (and is stuck writing them).
    wait_until(lambda: f.metric("sluice_rows_consumed_total") > 100, 30, "rows pulled")
    time.sleep(max(0.0, 30 - (time.monotonic() - started)))  # the slow write: 30 s
    release.set()
    holder.join(30)
    total = 100 + n
    wait_for_count(table, lambda c: c >= total, 60, f"{total} rows")
    # Anything redelivered would now be pulled and appended a second time.
    wait_until(lambda: f.metric("sluice_rows_consumed_total") >= total, 30, "every row consumed")
    assert f.stop() == 0, f.output()
    assert pg_count(table) == total, "a message was delivered twice"
    assert pg_count(table, "count(DISTINCT id)") == total


def _source(subscription: str, batch_rows: int, extra: str = "") -> PubSubSource:
    spec = load_text(
        f"""
pipeline_name = "{unique("p")}"
source_query = "{subscription}"
[source]
kind = "pubsub"
project_id = "{pubsub_kit.PROJECT}"
endpoint = "{pubsub_kit.HOST}"
anonymous_auth = true
max_batch_rows = {batch_rows}
{extra}
[target]
kind = "sqlite"
path = "unused.sqlite"
table = {{ name = "t" }}
""",
        "<test>",
    )
    source = registry.build_source(spec.all_sources[0], registry.Context(spec))
    assert isinstance(source, PubSubSource)
    return source


def test_ordering_keys_keep_per_key_order_across_batches_and_redelivery(
    ps: pubsub_kit.PubSub,
) -> None:
    topic, sub = fresh(ps, ordered=True)
    keys = ["a", "b", "c"]
    per_key = 300
    payloads, order_keys = [], []
    for seq in range(per_key):
        for k in keys:
            payloads.append(f'{{"k": "{k}", "seq": {seq}}}'.encode())
            order_keys.append(k)
    ps.publish(topic, payloads, order_keys)

    # With ordering, Pub/Sub hands out a key's next messages only after the
    # earlier ones are acknowledged: read, commit, and once close without a
    # commit (the batch comes again when its lease lapses, ~10 s, in order).
    source = _source(sub, 40)
    seen: dict[str, list[int]] = {k: [] for k in keys}
    handed_back = 0
    source.open(None)
    try:
        deadline = time.monotonic() + 60
        reads = 0
        while sum(len(v) for v in seen.values()) < len(payloads):
            assert time.monotonic() < deadline, {k: len(v) for k, v in seen.items()}
            b = source.read(1.0)
            if b is None:
                continue
            reads += 1
            if reads == 3:
                source.close()  # not committed: handed back
                handed_back += 1
                source.open(None)
                continue
            for k, s in zip(b.data["k"].to_pylist(), b.data["seq"].to_pylist(), strict=True):
                seen[k].append(s)
            source.commit(b.ack)
    finally:
        source.close()
    assert handed_back == 1
    for k in keys:
        assert seen[k] == list(range(per_key)), f"key {k}: {seen[k][:20]}..."


def test_dead_letter_policy_set_when_missing_and_checked_when_present(
    ps: pubsub_kit.PubSub,
) -> None:
    _topic, sub = fresh(ps)
    dead = ps.topic(unique("dead"))
    source = _source(
        sub, 10, f'dead_letter_policy = {{ topic = "{dead}", max_delivery_attempts = 7 }}'
    )
    source.open(None)
    source.close()
    got = ps.sub.get_subscription(subscription=pubsub_kit.sub_path(sub)).dead_letter_policy
    assert (got.dead_letter_topic, got.max_delivery_attempts) == (pubsub_kit.topic_path(dead), 7)
    source.open(None)  # the same policy: accepted
    source.close()
    other = _source(
        sub, 10, f'dead_letter_policy = {{ topic = "{dead}", max_delivery_attempts = 9 }}'
    )
    with pytest.raises(
        ConnectorError, match=r"max_delivery_attempts = 7.*max_delivery_attempts = 9"
    ):
        other.open(None)
    other.close()


BAD = b'{"id": 7, "note": '


def test_undecodable_message_follows_on_error(ps: pubsub_kit.PubSub, flow: Any, pg: Any) -> None:
    # fail: the process stops, naming the subscription and the message id.
    topic, sub = fresh(ps)
    table = unique("psbad")
    (bad_id,) = ps.publish(topic, [BAD])
    f = flow(config(sub, table, transform='[transform]\non_error = "fail"\n'))
    assert f.proc.wait(timeout=60) != 0
    assert f"subscription {pubsub_kit.sub_path(sub)} message id {bad_id}" in f.output()

    # drop: counted, the good rows land, the bad one is acknowledged.
    topic, sub = fresh(ps)
    ps.publish(topic, [*events(5), BAD, *events(5, 5)])
    f = flow(config(sub, table + "d", transform='[transform]\non_error = "drop"\n'))
    wait_for_count(table + "d", lambda c: c == 10, 60, "the good rows")
    wait_until(lambda: f.metric("sluice_rows_dropped_total") == 1, 30, "the drop counted")
    assert f.stop() == 0, f.output()

    # dlq: the raw payload lands in the dead-letter table, named by its message id.
    topic, sub = fresh(ps)
    ids = ps.publish(topic, [*events(3), BAD])
    f = flow(
        config(
            sub,
            table + "q",
            top='dlq_store = "table"',
            transform='[transform]\non_error = "dlq"\n',
        )
    )
    wait_for_count(table + "q", lambda c: c == 3, 60, "the good rows")
    wait_until(lambda: f.metric("sluice_dlq_writes_total") == 1, 30, "the dead letter")
    assert f.stop() == 0, f.output()
    rows = pg.execute(
        'SELECT payload, "offset" FROM public.sluice_dead_letters WHERE pipeline = %s',
        (table + "q",),
    ).fetchall()
    assert [(bytes(p), o) for p, o in rows] == [(BAD, ids[-1])]


def test_target_publishes_ordering_keys_from_a_column(ps: pubsub_kit.PubSub) -> None:
    topic = ps.topic(unique("pst"))
    sub = ps.subscription(f"{topic}-read", topic, ordered=True)
    spec = load_text(
        f"""
pipeline_name = "{unique("p")}"
source_query = "unused"
[source]
kind = "kafka"
bootstrap_servers = "unused:9092"
[target]
kind = "pubsub"
project_id = "{pubsub_kit.PROJECT}"
topic = "{topic}"
endpoint = "{pubsub_kit.HOST}"
anonymous_auth = true
ordering_key_column = "k"
""",
        "<test>",
    )
    target = registry.build_target(spec.all_targets[0], registry.Context(spec), 0)
    target.open()
    n = 300
    try:
        target.write(rows_table({"id": i, "k": f"k{i % 3}", "seq": i // 3} for i in range(n)))
        target.flush()
    finally:
        target.close()
    got: list[Any] = []
    deadline = time.monotonic() + 30
    while len(got) < n:  # an ordered subscription hands a key's next messages after an ack
        assert time.monotonic() < deadline, f"{len(got)} of {n} messages"
        got.extend(ps.pull(sub))
    per_key: dict[str, list[int]] = {}
    for m in got:
        row = msgspec.json.decode(m.data)
        assert m.ordering_key == row["k"]
        per_key.setdefault(m.ordering_key, []).append(row["seq"])
    assert per_key == {f"k{j}": list(range(n // 3)) for j in range(3)}
