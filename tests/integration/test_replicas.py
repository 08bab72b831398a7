"""Replicas: one window or join pipeline run as three processes in one group.

``replicas = true``: each replica claims the partitions the group gives it in
the shared Postgres state store and loads only their state; one is SIGKILLed
mid-stream and another started; the output (a merge target) must equal the
DuckDB oracle, and the store must show each partition owned by one live
replica. The store's fencing is tried directly: a replica whose partition was
claimed by another since cannot commit it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import psycopg
import pytest
from tests import endpoints
from tests.integration import test_join_consume as joins
from tests.integration import test_state_recovery as recovery
from tests.integration import test_windows as windows
from tests.integration.conftest import Flow, unique, wait_until

from sluice.state.base import PartitionsMoved
from sluice.state.postgres import PostgresStore

pytestmark = pytest.mark.integration

PARTITIONS = 6


def owners(schema: str, pipeline: str) -> dict[str, str]:
    with psycopg.connect(endpoints.POSTGRES_URL) as conn:
        rows = conn.execute(
            f"SELECT partition, owner FROM {schema}.sluice_owners WHERE pipeline = %s",
            (pipeline,),
        ).fetchall()
    return {str(p): str(o) for p, o in rows}


def pid_of(owner: str) -> int:
    return int(owner.split(":")[1])


def run_replicas(
    flow: Callable[..., Flow],
    config: str,
    produce_rest: Callable[[], None],
    rows_before_kill: int,
) -> list[Flow]:
    """Three replicas; one killed after the group read ``rows_before_kill``
    rows, a fourth started, then the rest of the input produced. Returns the
    live ones."""
    live = [flow(config, name=f"replica{i}") for i in range(3)]

    def consumed() -> float:
        return sum(f.metric("sluice_rows_consumed_total") for f in live)

    wait_until(lambda: consumed() >= rows_before_kill, 120, f"{rows_before_kill} rows read")
    victim = live.pop(random.Random(7).randrange(3))
    # Killed once it has checkpointed state of its own: that state must move.
    wait_until(
        lambda: victim.metric("sluice_checkpoints_total") >= 2, 60, "the victim's checkpoints"
    )
    victim.kill()
    live.append(flow(config, name="replica3"))
    produce_rest()
    return live


def assert_owned_by(live: list[Flow], schema: str, pipeline: str, partitions: int) -> None:
    """Every partition is owned by one live replica, and each replica claimed
    some (the group spread them)."""
    pids = {f.proc.pid for f in live}

    def spread() -> dict[str, str] | None:
        got = owners(schema, pipeline)
        # The group gives every live replica a share, the new one included.
        return got if len(got) == partitions and {pid_of(o) for o in got.values()} == pids else None

    wait_until(spread, 60, "every partition owned by a live replica")
    for f in live:
        assert f.proc.poll() is None, f.output()
        assert "Traceback" not in f.output(), f.output()
    # Some live replica took over partitions whose state the victim had stored.
    moved = re.compile(r"replica: claimed \d+ partition\(s\) \(.*\), ([1-9]\d*) state key")
    assert any(moved.search(f.output()) for f in live), [f.output() for f in live]


def test_a_window_pipeline_as_three_replicas_with_one_killed_equals_duckdb(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    topic = kafka_topic(PARTITIONS)
    table = unique("rep_win")
    events = windows.history(6000, seed=11, users=60)
    half = len(events) // 2
    windows.send(topic, events[:half])  # keyed by user_id: a user's rows in one partition
    window, key, _ = windows.WINDOWS["tumbling"]
    config = "replicas = true\n" + windows.config(
        topic, table, window, key, recovery.store_block(table)
    )
    end = max(e["ts_ms"] for e in events)

    def rest() -> None:
        windows.send(topic, events[half:])
        for p in range(PARTITIONS):  # one event per partition, hours later: every window closes
            row = {"user_id": 100_000 + p, "amount": 1, "page": "/end", "ts_ms": end + 7_200_000}
            row["ts_us"] = row["ts_ms"] * 1000
            windows.send(topic, [row], partition=p)

    live = run_replicas(flow, config, rest, half // 2)
    want = windows.expected(events, "tumbling")

    def equal() -> bool:
        for f in live:
            assert f.proc.poll() is None, f.output()
        try:
            return windows.same(windows.table_rows(table), want)
        except psycopg.errors.UndefinedTable:
            return False

    try:
        wait_until(equal, 120, f"table {table} to equal DuckDB's {len(want)} windows", 0.5)
    except AssertionError as exc:
        got = windows.table_rows(table)
        missing = [k for k in want if k not in got][:5]
        wrong = [(k, got[k], want[k]) for k in want if k in got and got[k] != want[k]][:5]
        raise AssertionError(f"missing {missing} wrong {wrong}") from exc
    assert_owned_by(live, f"{table}_state", table, PARTITIONS)
    for f in live:
        assert f.stop() == 0


def test_a_join_pipeline_as_three_replicas_with_one_killed_equals_duckdb(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    orders_t = kafka_topic(PARTITIONS, "orders")
    payments_t = kafka_topic(PARTITIONS, "payments")
    name = unique("rep_join")
    orders, payments = joins.history(4000, seed=5)
    half = len(orders) // 2
    recovery.send(orders_t, orders[:half])  # keyed by order_id on both topics
    recovery.send(payments_t, payments[: len(payments) // 2])
    config = "replicas = true\n" + recovery.join_config(
        orders_t, payments_t, name, recovery.pg_merge_target(name, "left_order_id"), batch=300
    )

    def rest() -> None:
        recovery.send(orders_t, orders[half:])
        recovery.send(payments_t, payments[len(payments) // 2 :])

    live = run_replicas(flow, config, rest, half // 2)
    want = joins.expected(orders, payments, "inner")

    def equal() -> bool:
        for f in live:
            assert f.proc.poll() is None, f.output()
        try:
            return bool(joins.got(name) == want)
        except psycopg.errors.UndefinedTable:
            return False

    try:
        wait_until(equal, 120, f"{name} to hold DuckDB's {sum(want.values())} pairs", 0.5)
    except AssertionError as exc:
        got = joins.got(name)
        raise AssertionError(
            f"missing {list((want - got).items())[:5]} extra {list((got - want).items())[:5]}"
        ) from exc
    assert_owned_by(live, f"{name}_state", name, 2 * PARTITIONS)
    for f in live:
        assert f.stop() == 0


def test_a_replica_whose_partition_was_claimed_since_cannot_commit_it() -> None:
    schema, pipeline = unique("fence"), unique("p")
    a, b = (
        PostgresStore(endpoints.POSTGRES_URL, schema),
        PostgresStore(endpoints.POSTGRES_URL, schema),
    )
    for store in (a, b):
        store.open()
    try:
        mine = a.claim(pipeline, ["t:0", "t:1"], ["window/0", "window/1"])
        assert mine.generations == {"t:0": 1, "t:1": 1}
        a.commit_owned(
            pipeline,
            {"window/0": b"a0", "window/1": b"a1"},
            (),
            {"t": {"t:0": 5, "t:1": 7}},
            mine.generations,
        )
        # b takes t:1 (a rebalance a has not seen yet): it loads what a committed.
        taken = b.claim(pipeline, ["t:1"], ["window/1"])
        assert taken.generations == {"t:1": 2}
        assert taken.checkpoint.state == {"window/1": b"a1"}
        assert taken.checkpoint.positions == {"t": {"t:1": 7}}
        # a tries to write both: fenced, and nothing of it lands.
        with pytest.raises(PartitionsMoved, match="t:1"):
            a.commit_owned(
                pipeline,
                {"window/0": b"A0", "window/1": b"A1"},
                (),
                {"t": {"t:0": 9, "t:1": 9}},
                mine.generations,
            )
        b.commit_owned(pipeline, {"window/1": b"b1"}, (), {"t": {"t:1": 8}}, taken.generations)
        both = a.claim(pipeline, ["t:0", "t:1"], ["window/0", "window/1"])
        assert both.checkpoint.state == {"window/0": b"a0", "window/1": b"b1"}
        assert both.checkpoint.positions == {"t": {"t:0": 5, "t:1": 8}}
        assert both.generations == {"t:0": 2, "t:1": 3}
        with pytest.raises(PartitionsMoved):  # b's claim is gone too
            b.commit_owned(pipeline, {"window/1": b"B1"}, (), {}, taken.generations)
        # A claimed key brings the keys under it (a join's buckets), not its namesakes.
        a.commit_owned(
            pipeline, {"join/t:1/5": b"j5", "join/t:10/5": b"t10"}, (), {}, both.generations
        )
        again = a.claim(pipeline, ["t:1"], ["join/t:1"])
        assert again.checkpoint.state == {"join/t:1/5": b"j5"}
    finally:
        for store in (a, b):
            store.close()
        with psycopg.connect(endpoints.POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def test_a_join_of_topics_with_different_partition_counts_is_refused(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    orders_t, payments_t = kafka_topic(6, "orders"), kafka_topic(4, "payments")
    name = unique("rep_counts")
    config = "replicas = true\n" + recovery.join_config(
        orders_t, payments_t, name, recovery.pg_merge_target(name, "left_order_id")
    )
    f = flow(config)
    assert f.proc.wait(timeout=60) == 1
    out = f.output()
    assert "need the same partition count" in out, out
    assert f"{orders_t}: 6, {payments_t}: 4" in out or f"{payments_t}: 4" in out, out
    assert "Traceback" not in out
