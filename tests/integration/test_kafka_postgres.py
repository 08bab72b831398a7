"""Kafka → Postgres through a real `flow consume` process (streaming-core acceptance).

Every test runs the real broker and the real Postgres started by
``scripts/services.sh``; crashes are SIGKILLs of the real process.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests import endpoints
from tests.integration.conftest import (
    REPO,
    committed,
    events,
    kafka_pg_config,
    pg_count,
    produce,
    unique,
    wait_for_count,
    wait_until,
)

pytestmark = pytest.mark.integration


def _keys(n: int, start: int = 0) -> list[bytes]:
    return [str(i).encode() for i in range(start, start + n)]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class _SlowProducer(threading.Thread):
    """Produces ``n`` events in chunks, so the stream is still flowing while a test acts."""

    def __init__(self, topic: str, n: int, chunk: int, pause_s: float) -> None:
        super().__init__(daemon=True)
        self.topic, self.n, self.chunk, self.pause_s = topic, n, chunk, pause_s
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for start in range(0, self.n, self.chunk):
                size = min(self.chunk, self.n - start)
                produce(self.topic, events(size, start), keys=_keys(size, start))
                time.sleep(self.pause_s)  # pacing the stream, not waiting for anything
        except BaseException as exc:
            self.error = exc


def test_200k_messages_arrive_exactly_once_with_values_and_event_time(
    kafka_topic: Any, flow: Any, pg: Any
) -> None:
    topic, table = kafka_topic(3), unique("ev")
    n = 200_000
    produced = produce(topic, events(n), keys=_keys(n))
    assert {p for p, _, _ in produced.records} == {0, 1, 2}

    f = flow(kafka_pg_config(topic, table), "--stop-after-idle-ms", "2000")
    assert f.proc.wait(timeout=180) == 0, f.output()

    count, distinct, id_sum, amount_sum, n_click = pg.execute(
        f"SELECT count(*), count(DISTINCT id), sum(id), sum(amount), count(*) FILTER (WHERE event_type = 'click') FROM {table}"
    ).fetchone()
    assert (count, distinct, id_sum) == (n, n, n * (n - 1) // 2)
    assert amount_sum == pytest.approx(sum((i % 1000) / 4 for i in range(n)))
    assert n_click == len(range(0, n, 3))
    assert pg.execute(f"SELECT note FROM {table} WHERE id = 12345").fetchone()[0] == "n12345"
    # _event_ts is the broker timestamp of each message, in microseconds, UTC.
    got = dict(
        pg.execute(
            f"SELECT id, (extract(epoch FROM _event_ts) * 1000)::bigint FROM {table}"
        ).fetchall()
    )
    assert all(got[i] == ts for i, (_, _, ts) in enumerate(produced.records))
    col = pg.execute(
        "SELECT data_type FROM information_schema.columns WHERE table_name = %s AND column_name = '_event_ts'",
        (table,),
    ).fetchone()
    assert col[0] == "timestamp with time zone"
    # Offsets were committed as offset + 1 per partition: the whole topic.
    assert committed(table, topic, 3) == n


@pytest.mark.parametrize("mode", ["append", "merge"])
def test_sigkill_at_three_points_then_restart_loses_nothing(
    mode: str, kafka_topic: Any, flow: Any, pg: Any
) -> None:
    topic, table = kafka_topic(3), unique(f"crash_{mode}")
    n = 60_000
    produce(topic, events(n), keys=_keys(n))
    pk = 'primary_key = ["id"]' if mode == "merge" else ""
    config = kafka_pg_config(topic, table, mode=mode, batch_rows=500, primary_key=pk)

    for threshold in (n // 4, n // 2, 3 * n // 4):
        f = flow(config)
        wait_for_count(table, lambda c, t=threshold: c >= t, 120, f"{threshold} rows")
        f.kill()
        assert pg_count(table) < n, "the kill must land mid-stream"
    f = flow(config, "--stop-after-idle-ms", "3000")
    assert f.proc.wait(timeout=180) == 0, f.output()

    total, distinct = pg.execute(f"SELECT count(*), count(DISTINCT id) FROM {table}").fetchone()
    assert distinct == n, "a row is missing"
    if mode == "merge":
        assert total == n, "merge must absorb redelivered rows"
    else:
        assert total >= n


def _postgres_down_for_10s(kafka_topic: Any, flow: Any) -> list[int]:
    """Stop Postgres under a running pipeline for about 10 s, then start it.

    Asserts that the process waits, commits nothing while Postgres is down,
    retries, and loses nothing. Returns the process's RSS (kB), sampled once a
    second while Postgres was down.
    """
    topic, table = kafka_topic(3), unique("outage")
    n = 60_000
    producer = _SlowProducer(topic, n, chunk=3_000, pause_s=0.5)
    producer.start()
    f = flow(kafka_pg_config(topic, table, batch_rows=1_000))
    wait_for_count(table, lambda c: c >= 5_000, 120, "the first rows")
    services = ["bash", str(REPO / "scripts" / "services.sh")]
    subprocess.run([*services, "stop", "postgres"], check=True, capture_output=True)
    rss: list[int] = []
    try:
        # Batches are written and committed one after another: once a write
        # has failed, the commit of the batch before it has landed.
        wait_until(
            lambda: f.metric("sluice_write_retries_total") >= 1, 60, "a failed write retried"
        )
        frozen = committed(table, topic, 3)
        # Deliberately long: 8 s of nothing is what proves the process neither
        # exits nor commits while its target is down.
        for _ in range(8):
            time.sleep(1)
            assert f.proc.poll() is None, "sluice must wait for Postgres, not exit"
            rss.append(_rss_kb(f.proc.pid))
        assert committed(table, topic, 3) == frozen, "offsets moved while the target was down"
    finally:
        subprocess.run([*services, "start", "postgres"], check=True, capture_output=True)
    producer.join(timeout=120)
    assert producer.error is None
    wait_for_count(table, lambda c: c >= n, 180, "every row after the outage", "count(DISTINCT id)")
    assert f.metric("sluice_write_retries_total") >= 1
    assert f.stop() == 0
    assert pg_count(table, "count(DISTINCT id)") == n
    assert committed(table, topic, 3) == n
    return rss


@pytest.mark.disruptive
def test_postgres_down_for_10s_retries_commits_nothing_and_loses_nothing(
    kafka_topic: Any, flow: Any
) -> None:
    _postgres_down_for_10s(kafka_topic, flow)


@pytest.mark.disruptive
@pytest.mark.slow
def test_memory_stays_bounded_while_postgres_is_down(kafka_topic: Any, flow: Any) -> None:
    """The outage above, measured: RSS bounds depend on the machine, so they
    run only on request (``make test-slow``), not in CI."""
    rss = _postgres_down_for_10s(kafka_topic, flow)
    assert max(rss) < 700_000, f"RSS grew to {max(rss)} kB while Postgres was down"
    assert max(rss) - min(rss) < 100_000, f"RSS kept growing: {rss}"


def test_a_message_that_is_not_json_stops_the_run_naming_its_offset(
    kafka_topic: Any, flow: Any
) -> None:
    topic, table = kafka_topic(1), unique("poison")
    produce(topic, events(100), partition=0)
    produce(topic, [b"{not json"], partition=0)
    produce(topic, events(100, 100), partition=0)

    f = flow(kafka_pg_config(topic, table))
    code = f.proc.wait(timeout=120)
    out = f.output()
    assert code == 1, out
    assert f"topic {topic} partition 0 offset 100" in out
    assert "invalid JSON" in out
    # Nothing at or past the poison message was committed: it is not skipped.
    assert committed(table, topic, 1) <= 100


def test_two_processes_in_one_group_split_partitions_and_hand_over_on_stop(
    kafka_topic: Any, flow: Any
) -> None:
    topic, table = kafka_topic(4), unique("group")
    n = 40_000
    producer = _SlowProducer(topic, n, chunk=1_000, pause_s=0.25)
    producer.start()
    config = kafka_pg_config(topic, table, batch_rows=500)
    a = flow(config, name="a")
    b = flow(config, name="b")
    wait_until(
        lambda: (
            a.metric("sluice_rows_consumed_total") > 0
            and b.metric("sluice_rows_consumed_total") > 0
        ),
        60,
        "both processes to own partitions",
    )

    # Each process reports lag only for the partitions it owns: they split the four.
    def owned(f: Any) -> set[str]:
        lines = f.scrape().splitlines()
        return {
            ln.split('partition="')[1].split('"')[0]
            for ln in lines
            if ln.startswith("sluice_consumer_lag_messages{")
        }

    def split() -> tuple[set[str], set[str]] | None:
        pa_, pb_ = owned(a), owned(b)
        return (pa_, pb_) if pa_ and pb_ and len(pa_ | pb_) == 4 else None

    a_parts, b_parts = wait_until(split, 60, "both processes to report the four partitions")
    assert not (a_parts & b_parts), (a_parts, b_parts)

    assert a.stop() == 0, a.output()  # SIGTERM: drain, commit, leave the group
    before = b.metric("sluice_rows_consumed_total")
    producer.join(timeout=120)
    assert producer.error is None
    wait_for_count(table, lambda c: c >= n, 120, "every row", "count(DISTINCT id)")
    assert b.metric("sluice_rows_consumed_total") > before, "b took over a's partitions"
    assert b.stop() == 0
    assert pg_count(table, "count(DISTINCT id)") == n
    # Exactly once across the rebalance: a batch in flight when partitions are
    # revoked is committed before they go, so nobody re-reads what was written.
    assert pg_count(table) == n
    assert committed(table, topic, 4) == n


def test_metrics_move_and_readyz_waits_for_the_source(kafka_topic: Any, flow: Any) -> None:
    # A broker that does not exist: the process is alive but never ready.
    dead = kafka_pg_config("nowhere", unique("dead")).replace(
        endpoints.KAFKA_BOOTSTRAP, "127.0.0.1:1"
    )
    d = flow(dead, name="dead")
    assert d.status("/healthz") == 200
    assert d.status("/readyz") == 503
    time.sleep(2)  # deliberately: /readyz must stay 503 while the broker never answers
    assert d.status("/readyz") == 503
    assert d.stop() == 0

    topic, table = kafka_topic(3), unique("metrics")
    n = 20_000
    produce(topic, events(n), keys=_keys(n))
    f = flow(kafka_pg_config(topic, table, batch_rows=2_000))
    wait_until(lambda: f.status("/readyz") == 200, 60, "/readyz to turn 200")
    wait_until(lambda: f.metric("sluice_rows_written_total") >= n, 60, "all rows written")
    text = f.scrape()
    assert f'sluice_rows_consumed_total{{pipeline="{table}"}} {float(n)}' in text
    assert f.metric("sluice_batches_total") >= n / 2_000
    assert f.metric("sluice_iterations_total") >= f.metric("sluice_batches_total")
    assert f.metric("sluice_commits_total") >= f.metric("sluice_batches_total")
    assert f.metric("sluice_batch_duration_seconds_count") == f.metric("sluice_batches_total")
    assert f.metric("sluice_watermark_seconds") > time.time() - 600
    wait_until(lambda: f.metric("sluice_idle_iterations_total") > 0, 30, "idle iterations")
    wait_until(lambda: "sluice_consumer_lag_messages{" in f.scrape(), 10, "the lag gauge")
    assert f.stop() == 0
    log = f.output()
    assert "WARNING" not in log and "ERROR" not in log, log  # quiet in normal operation


def test_fan_out_writes_every_target_before_committing(
    kafka_topic: Any, flow: Any, tmp_path: Path
) -> None:
    topic, table = kafka_topic(3), unique("fanout")
    n = 10_000
    produce(topic, events(n), keys=_keys(n))
    config = (
        kafka_pg_config(topic, table)
        .replace("[target]", "[[targets]]")
        .replace("[target.table]", "[targets.table]")
        + f"""
[[targets]]
kind = "duckdb"
path = "{tmp_path / "fan.duckdb"}"
[targets.table]
name = "events"
"""
    )
    f = flow(config, "--stop-after-idle-ms", "2000")
    assert f.proc.wait(timeout=120) == 0, f.output()
    assert pg_count(table, "count(DISTINCT id)") == n
    import duckdb

    con = duckdb.connect(str(tmp_path / "fan.duckdb"))
    assert con.execute("SELECT count(*), count(DISTINCT id) FROM events").fetchone() == (n, n)


def test_fan_in_unions_sources_and_commits_each(kafka_topic: Any, flow: Any, pg: Any) -> None:
    orders, payments, table = kafka_topic(2), kafka_topic(2), unique("fanin")
    produce(orders, events(5_000))
    produce(payments, events(3_000, 100_000))
    config = f"""
pipeline_name = "{table}"
idle_pause_ms = 100
[[sources]]
query = "{orders}"
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{table}"
session_timeout_ms = 2000
[[sources]]
query = "{payments}"
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{table}_p"
session_timeout_ms = 2000
[target]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
[target.table]
name = "{table}"
"""
    f = flow(config, "--stop-after-idle-ms", "2000")
    assert f.proc.wait(timeout=120) == 0, f.output()
    assert pg.execute(f"SELECT count(DISTINCT id) FROM {table}").fetchone()[0] == 8_000
    assert committed(table, orders, 2) == 5_000
    assert committed(f"{table}_p", payments, 2) == 3_000


def test_merge_mode_upserts_last_row_per_key(kafka_topic: Any, flow: Any, pg: Any) -> None:
    topic, table = kafka_topic(1), unique("upsert")
    import msgspec

    rows = [msgspec.json.encode({"id": i % 100, "v": i}) for i in range(1_000)]
    produce(topic, rows, partition=0)
    config = kafka_pg_config(
        topic, table, mode="merge", batch_rows=300, primary_key='primary_key = ["id"]'
    )
    f = flow(config, "--stop-after-idle-ms", "2000")
    assert f.proc.wait(timeout=120) == 0, f.output()
    got = dict(pg.execute(f"SELECT id, v FROM {table}").fetchall())
    assert got == {k: 900 + k for k in range(100)}
    with pytest.raises(psycopg.errors.UniqueViolation):
        pg.execute(f"INSERT INTO {table} (id, v) VALUES (1, 1)")
