"""The Postgres state store under a real `flow consume`: what a checkpoint puts
in Postgres, SIGKILLs at random points, and the store going down.

A join pipeline and a session pipeline are killed five times each, at random
moments, and restarted; their output must equal an uninterrupted run's (the
DuckDB result over the same events), and every restart must continue from the
positions stored in Postgres, not from the start of the topics.
"""

from __future__ import annotations

import collections
import json
import random
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests import endpoints
from tests.integration import test_join_consume as joins
from tests.integration import test_windows as windows
from tests.integration.conftest import Flow, committed, produce, unique, wait_until

from sluice.config.spec import JoinSpec
from sluice.engine.stages.join import JoinStage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WINDOW_MS = joins.WINDOW_MS


def store_block(name: str) -> str:
    """A Postgres state store in schema ``<name>_state``, checkpointing every second."""
    return f"""
[state_store]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
schema = "{name}_state"
checkpoint_interval_ms = 1000
"""


def join_config(orders_t: str, payments_t: str, name: str, target: str, batch: int = 500) -> str:
    """An inner join of orders and payments, its state in schema ``<name>_state``."""
    sources = "".join(
        f"""
[[sources]]
query = "{topic}"
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{name}"
session_timeout_ms = 3000
max_batch_rows = {batch}
"""
        for topic in (orders_t, payments_t)
    )
    return f"""
pipeline_name = "{name}"
idle_pause_ms = 100
{sources}
{target}

[watermark]
lateness_ms = 5000

{store_block(name)}

[transform.join]
kind = "inner"
left_source = "{orders_t}"
right_source = "{payments_t}"
left_keys = ["order_id"]
right_keys = ["order_id"]
time_window_ms = {WINDOW_MS}
"""


def pg_merge_target(table: str, key: str) -> str:
    return f"""
[target]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
mode = "merge"

[target.table]
schema = "public"
name = "{table}"
primary_key = ["{key}"]
"""


def close_join(orders_t: str, payments_t: str, after_ms: int) -> None:
    """One event per side and partition, two hours later: every buffered row expires."""
    for topic, row in (
        (orders_t, {"order_id": -1, "amount": 0}),
        (payments_t, {"order_id": -2, "paid": 0}),
    ):
        for p in range(2):
            produce(topic, [json.dumps(row).encode()], partition=p, timestamps_ms=[after_ms])


def store(schema: str, pipeline: str) -> dict[str, Any]:
    """What the state store holds for ``pipeline``, read with plain SQL."""
    with psycopg.connect(endpoints.POSTGRES_URL) as conn:
        cp = conn.execute(
            f"SELECT version, watermark_us FROM {schema}.sluice_checkpoints WHERE pipeline = %s",
            (pipeline,),
        ).fetchone()
        state = dict(
            conn.execute(
                f"SELECT key, value FROM {schema}.sluice_state WHERE pipeline = %s", (pipeline,)
            ).fetchall()
        )
        offsets = {
            (source, part): pos
            for source, part, pos in conn.execute(
                f"""SELECT source, partition, position_int FROM {schema}.sluice_offsets
                    WHERE pipeline = %s""",
                (pipeline,),
            ).fetchall()
        }
    return {
        "version": cp[0] if cp else 0,
        "watermark_us": cp[1] if cp else None,
        "state": state,
        "offsets": offsets,
    }


def stored_total(schema: str, pipeline: str) -> int:
    """Messages before the stored positions, over every source and partition.

    Raises when the store's tables do not exist; poll with
    :func:`wait_for_stored_total` while the process may not have made them yet.
    """
    return sum(store(schema, pipeline)["offsets"].values())


def wait_for_stored_total(
    schema: str, pipeline: str, want: int, timeout_s: float, what: str
) -> None:
    """Poll :func:`stored_total` until it is ``want``.

    Only here do store tables that do not exist yet count as nothing stored:
    the process under test creates them when it opens the store.
    """

    def done() -> bool:
        try:
            return stored_total(schema, pipeline) == want
        except psycopg.errors.UndefinedTable:
            return False

    wait_until(done, timeout_s, what)


def send(topic: str, rows: list[dict[str, Any]]) -> dict[str, int]:
    """Produce ``rows`` keyed by ``order_id``; the next offset of every
    partition written, by partition key (see :func:`sent`)."""
    return sent(topic, rows)[0]


def sent(topic: str, rows: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, int]]:
    """Produce ``rows`` keyed by ``order_id``; the next offset and the largest
    timestamp (ms) of every partition written, by partition key.

    Keyed, so every partition gets rows: unkeyed records go through the
    sticky partitioner, which may put a whole small history into one
    partition, and an empty partition holds the watermark until it is idle.
    """
    produced = produce(
        topic,
        [json.dumps(r).encode() for r in rows],
        keys=[str(r["order_id"]).encode() for r in rows],
        timestamps_ms=[r["ts_ms"] for r in rows],
    )
    ends: dict[str, int] = {}
    tops: dict[str, int] = {}
    for part, offset, ts_ms in produced.records:
        key = f"{topic}:{part}"
        ends[key] = max(ends.get(key, 0), offset + 1)
        tops[key] = max(tops.get(key, ts_ms), ts_ms)
    return ends, tops


def inner_pairs(table: str) -> collections.Counter[tuple[Any, ...]]:
    with psycopg.connect(endpoints.POSTGRES_URL) as conn:
        rows = conn.execute(
            f"""SELECT left_order_id, left_amount, right_order_id, right_paid FROM public.{table}
                WHERE left_order_id >= 0"""
        ).fetchall()
    return collections.Counter(rows)


def wait_for(check: Callable[[], Any], want: Any, flow: Flow, what: str, timeout: float) -> None:
    def done() -> bool:
        assert flow.proc.poll() is None, flow.output()
        try:
            return bool(check() == want)
        except psycopg.errors.UndefinedTable:
            return False

    try:
        wait_until(done, timeout, what, 0.5)
    except AssertionError as exc:  # a timeout, or the process died: chained below
        have = check()
        if isinstance(want, collections.Counter):
            raise AssertionError(
                f"{what}: missing {list((want - have).items())[:5]} "
                f"extra {list((have - want).items())[:5]}"
            ) from exc
        raise


def kill_five_times(
    start: Callable[[], Flow],
    feed: Callable[[int], int],
    schema: str,
    pipeline: str,
    rng: random.Random,
) -> tuple[Flow, int]:
    """Five times: ``feed`` the next part of the input (it returns its row
    count), start, let the process consume a random number of rows up to that
    many, SIGKILL. Then feed the last part and return the sixth process with
    the stored total it started from. Every restart must find the positions
    stored before, and the input never runs out before the last run."""
    before = 0
    for kill in range(5):
        fed = feed(kill)
        f = start()
        target = rng.randint(1, fed)
        wait_until(
            lambda f=f, t=target: (
                f.proc.poll() is not None or f.metric("sluice_rows_consumed_total") >= t
            ),
            90,
            f"run {kill + 1} to consume {target} rows",
            0.05,
        )
        # Deliberately random, not a wait for anything: the kill should not
        # always land right after a checkpoint.
        time.sleep(rng.uniform(0, 0.3))
        assert f.proc.poll() is None, f.output()
        f.kill()
        now = stored_total(schema, pipeline)
        assert now >= before, f"stored positions went back after kill {kill + 1}"
        before = now
    assert before > 0, "five runs stored no position"
    feed(5)
    return start(), before


def parts(rows: list[dict[str, Any]], n: int = 6) -> list[list[dict[str, Any]]]:
    """``rows`` in ``n`` consecutive parts."""
    step = -(-len(rows) // n)
    return [rows[i * step : (i + 1) * step] for i in range(n)]


def assert_resumed(f: Flow, total: int, resumed_at: int) -> None:
    """The last run read what lay after the stored positions, not the topics again
    (exactly that, unless a rebalance made it read again from a checkpoint)."""
    consumed = f.metric("sluice_rows_consumed_total")
    assert consumed < total
    exact = consumed == total - resumed_at
    assert exact or "reassigned" in f.output(), (consumed, total, resumed_at)


def test_a_checkpoint_puts_state_rows_and_offsets_in_postgres(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    orders_t, payments_t = kafka_topic(2, "orders"), kafka_topic(2, "payments")
    name = unique("ckpt")
    orders, payments = joins.history(1000, seed=7)
    (o_ends, o_tops), (p_ends, p_tops) = sent(orders_t, orders), sent(payments_t, payments)
    ends = {orders_t: o_ends, payments_t: p_ends}
    assert all(len(by) == 2 for by in ends.values()), ends  # every partition has rows
    f = flow(join_config(orders_t, payments_t, name, pg_merge_target(name, "left_order_id")))
    total = len(orders) + len(payments)
    wait_until(lambda: f.metric("sluice_rows_consumed_total") >= total, 60, "the input")
    # Everything read is checkpointed within checkpoint_interval_ms.
    wait_for_stored_total(f"{name}_state", name, total, 30, "stored positions")

    # Once every partition has rows the watermark is known; an idle tick
    # checkpoints it within checkpoint_interval_ms.
    def settled() -> dict[str, Any] | None:
        got = store(f"{name}_state", name)
        known = got["watermark_us"] is not None
        return got if known and got["version"] == f.metric("sluice_checkpoints_total") else None

    got = wait_until(settled, 90, "a checkpoint with a watermark")
    assert got["version"] >= 1
    assert got["offsets"] == {(t, k): o for t, by in ends.items() for k, o in by.items()}
    # The broker commit follows the store commit, with the same positions.
    wait_until(
        lambda: committed(name, orders_t, 2) + committed(name, payments_t, 2) == total,
        10,
        "the broker commit",
    )
    # The watermark: the smallest partition's largest event time minus lateness.
    assert got["watermark_us"] is not None
    assert got["watermark_us"] <= max(e["ts_ms"] for e in orders + payments) * 1000
    # State rows: the join buffers, one row per source partition, which
    # restore into a stage holding exactly the rows the gauge reports; and
    # the event time each partition reached, its largest one.
    parts_ = [f"{t}:{p}" for t in (orders_t, payments_t) for p in range(2)]
    # join/<partition>/<minute bucket> and a head per partition, mark/<partition>
    heads = {f"join/{p}/head" for p in parts_}
    buckets = {k for k in got["state"] if k.startswith("join/") and k not in heads}
    assert heads <= set(got["state"]) and {k.split("/")[1] for k in buckets} == set(parts_)
    assert set(got["state"]) == heads | buckets | {f"mark/{p}" for p in parts_}
    tops = {p: ms * 1000 for p, ms in {**o_tops, **p_tops}.items()}
    marks = {p: json.loads(bytes(got["state"][f"mark/{p}"])) for p in parts_}
    assert {p: set(m.values()) for p, m in marks.items()} == {p: {tops[p]} for p in parts_}
    spec = JoinSpec(
        left_source=orders_t,
        right_source=payments_t,
        left_keys=["order_id"],
        right_keys=["order_id"],
        time_window_ms=WINDOW_MS,
    )

    def restored() -> JoinStage:
        stage = JoinStage(spec, name)
        stage.open()
        stage.restore({k: bytes(v) for k, v in store(f"{name}_state", name)["state"].items()})
        return stage

    wait_until(
        lambda: sum(restored().buffer_rows()) == f.metric("sluice_join_buffer_rows") > 0,
        30,
        "the stored buffers to hold the rows the gauge reports",
    )
    assert restored().watermark_us == store(f"{name}_state", name)["watermark_us"]
    assert f.stop() == 0


def test_a_join_killed_five_times_resumes_at_stored_positions_and_equals_duckdb(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    orders_t, payments_t = kafka_topic(2, "orders"), kafka_topic(2, "payments")
    name = unique("jkill")
    orders, payments = joins.history(8000, seed=11)
    chunks = list(zip(parts(orders), parts(payments), strict=True))

    def feed(i: int) -> int:
        joins.send(orders_t, chunks[i][0])
        joins.send(payments_t, chunks[i][1])
        return len(chunks[i][0]) + len(chunks[i][1])

    toml = join_config(orders_t, payments_t, name, pg_merge_target(name, "left_order_id"), 200)
    f, resumed_at = kill_five_times(
        lambda: flow(toml), feed, f"{name}_state", name, random.Random(5)
    )
    close_join(orders_t, payments_t, max(e["ts_ms"] for e in orders + payments) + 7_200_000)
    want = joins.expected(orders, payments, "inner")
    wait_for(lambda: inner_pairs(name), want, f, "the join after 5 kills", 120)
    total = len(orders) + len(payments) + 4
    wait_for_stored_total(f"{name}_state", name, total, 30, "the final positions")
    assert_resumed(f, total, resumed_at)
    assert f.metric("sluice_late_rows_dropped_total") == 0


def session_config(topic: str, name: str) -> str:
    window, key, _ = windows.WINDOWS["session"]
    return (
        windows.config(topic, name, window, key, store_block(name))
        .replace("max_batch_rows = 700", "max_batch_rows = 200")
        .replace("session_timeout_ms = 6000", "session_timeout_ms = 3000")
    )


def test_a_session_pipeline_killed_five_times_resumes_at_stored_positions_and_equals_duckdb(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    topic = kafka_topic(windows.PARTITIONS)
    name = unique("skill")
    events = windows.history(12_000, seed=3, users=60)
    chunks = parts(events)

    def feed(i: int) -> int:
        windows.send(topic, chunks[i])
        return len(chunks[i])

    toml = session_config(topic, name)
    f, resumed_at = kill_five_times(
        lambda: flow(toml), feed, f"{name}_state", name, random.Random(9)
    )
    windows.close_all(topic, max(e["ts_ms"] for e in events))
    windows.wait_for_table(name, windows.expected(events, "session"), f)
    assert_resumed(f, len(events) + windows.PARTITIONS, resumed_at)
    assert f.metric("sluice_windows_emitted_total") > 0


def test_a_partition_restored_at_its_end_does_not_hold_the_windows_back(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    # Partition 1 is read to its end, its closing event included, partition 0
    # only half, and the process is SIGKILLed once that is checkpointed. The
    # next one reads nothing more from partition 1, so only the event time
    # the checkpoint stored for it (its mark) lets partition 0's closing event
    # close every window: as a partition that never delivered, it would hold
    # the watermark for source_idleness_ms (10 min here).
    topic = kafka_topic(2)
    name = unique("wmark")
    events = windows.history(3000, seed=21, users=30)
    end = max(e["ts_ms"] for e in events)
    by_part = [[e for e in events if e["user_id"] % 2 == p] for p in range(2)]

    def closing(p: int) -> dict[str, Any]:
        ts = end + 2 * windows.HOUR_MS
        return {
            "user_id": 100_000 + p,
            "amount": 1,
            "page": "/end",
            "ts_ms": ts,
            "ts_us": ts * 1000,
        }

    half = len(by_part[0]) // 2
    windows.send(topic, [*by_part[1], closing(1)], partition=1)
    windows.send(topic, by_part[0][:half], partition=0)
    window, key, _ = windows.WINDOWS["tumbling"]
    toml = windows.config(topic, name, window, key, store_block(name)).replace(
        "lateness_ms = 5000", "lateness_ms = 5000\nsource_idleness_ms = 600000"
    )
    f = flow(toml)
    wait_for_stored_total(f"{name}_state", name, len(by_part[1]) + 1 + half, 60, "the checkpoint")
    f.kill()
    marks = store(f"{name}_state", name)["state"]
    assert set(json.loads(bytes(marks[f"mark/{topic}:1"])).values()) == {closing(1)["ts_us"]}
    f = flow(toml)
    windows.send(topic, [*by_part[0][half:], closing(0)], partition=0)
    windows.wait_for_table(name, windows.expected(events, "tumbling"), f)
    assert f.stop() == 0


@pytest.mark.disruptive
def test_the_state_store_down_for_10s_commits_nothing_and_loses_nothing(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow], tmp_path: Path
) -> None:
    orders_t, payments_t = kafka_topic(2, "orders"), kafka_topic(2, "payments")
    name = unique("stdown")
    lite = tmp_path / "out.sqlite"
    orders, payments = joins.history(3000, seed=13)
    half = (len(orders) // 2, len(payments) // 2)
    joins.send(orders_t, orders[: half[0]])
    joins.send(payments_t, payments[: half[1]])
    target = f"""
[target]
kind = "sqlite"
path = "{lite}"

[target.table]
name = "pairs"
"""
    f = flow(join_config(orders_t, payments_t, name, target))
    wait_for_stored_total(f"{name}_state", name, sum(half), 60, "the first half stored")
    wait_until(  # the broker commit follows the store's
        lambda: committed(name, orders_t, 2) + committed(name, payments_t, 2) == sum(half),
        30,
        "the first half committed to the broker",
    )
    services = ["bash", str(REPO / "scripts" / "services.sh")]
    subprocess.run([*services, "stop", "postgres"], check=True, capture_output=True)
    try:
        frozen = committed(name, orders_t, 2) + committed(name, payments_t, 2)
        assert frozen == sum(half)
        joins.send(orders_t, orders[half[0] :])
        joins.send(payments_t, payments[half[1] :])
        # Deliberately long: 10 s of nothing is what proves the process neither
        # exits nor commits while its state store is down.
        for _ in range(10):
            time.sleep(1)
            assert f.proc.poll() is None, "sluice must wait for the state store, not exit"
            now = committed(name, orders_t, 2) + committed(name, payments_t, 2)
            assert now == frozen, "offsets moved on the broker while the state store was down"
        assert f.metric("sluice_write_retries_total") >= 1
    finally:
        subprocess.run([*services, "start", "postgres"], check=True, capture_output=True)
    close_join(orders_t, payments_t, max(e["ts_ms"] for e in orders + payments) + 7_200_000)
    total = len(orders) + len(payments) + 4
    wait_for_stored_total(f"{name}_state", name, total, 120, "every position")

    def pairs() -> collections.Counter[tuple[Any, ...]]:
        with sqlite3.connect(lite) as conn:
            rows = conn.execute(
                """SELECT left_order_id, left_amount, right_order_id, right_paid FROM pairs
                   WHERE left_order_id >= 0"""
            ).fetchall()
        return collections.Counter(rows)

    # Appended, not merged: a pair written twice would show here.
    wait_for(pairs, joins.expected(orders, payments, "inner"), f, "every pair, once", 60)
    wait_until(  # the broker commit follows the store's
        lambda: committed(name, orders_t, 2) + committed(name, payments_t, 2) == total,
        30,
        "every position committed to the broker",
    )
    assert f.stop() == 0
