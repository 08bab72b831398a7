"""Fixtures for integration tests: real topics, real tables, real `flow` processes.

Nothing here fakes a service: a service that is down fails the test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from tests import endpoints

REPO = Path(__file__).resolve().parents[2]


def wait_until(
    check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1
) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def unique(prefix: str) -> str:
    """A name no other test run uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def postgres_target(table: str, target: str = "", table_keys: str = "") -> Any:
    """An opened ``PostgresTarget`` writing ``public.<table>`` of the test
    Postgres; ``target`` / ``table_keys``: more TOML lines for ``[target]`` /
    ``[target.table]``."""
    from sluice.config import load_text
    from sluice.connectors.postgres.spec import PostgresTarget as PostgresTargetSpec
    from sluice.connectors.postgres.target import PostgresTarget
    from sluice.connectors.registry import Context

    spec = load_text(
        f"""
pipeline_name = "{table}"
source_query = "unused"

[source]
kind = "kafka"
bootstrap_servers = "127.0.0.1:1"

[target]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
{target}

[target.table]
schema = "public"
name = "{table}"
{table_keys}
"""
    )
    assert isinstance(spec.target, PostgresTargetSpec)
    t = PostgresTarget(spec.target, Context(spec), 0)
    t.open()
    return t


def committed(group: str, topic: str, partitions: int) -> int:
    """Sum of the group's committed offsets on ``topic`` (what the broker holds).

    A partition with no committed offset counts 0 (nothing committed yet); a
    partition the broker answers with an error raises, so an error is never
    read as "nothing committed".
    """
    c = Consumer({"bootstrap.servers": endpoints.KAFKA_BOOTSTRAP, "group.id": group})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        c.close()
    failed = [(tp.partition, tp.error) for tp in tps if tp.error is not None]
    if failed:
        raise AssertionError(f"committed offsets of {group} on {topic}: {failed}")
    return sum(max(tp.offset, 0) for tp in tps)


@pytest.fixture
def kafka_topic() -> Callable[..., str]:
    """Create a fresh topic: ``kafka_topic(partitions=3) -> name``."""
    admin = AdminClient({"bootstrap.servers": endpoints.KAFKA_BOOTSTRAP})

    def create(partitions: int = 3, prefix: str = "t") -> str:
        name = unique(prefix)
        admin.create_topics([NewTopic(name, partitions, 1)])[name].result(timeout=30)
        return name

    return create


@dataclass(frozen=True)
class Produced:
    """What was produced: (partition, offset, timestamp ms) per message, in order."""

    records: list[tuple[int, int, int]]


def produce(
    topic: str,
    payloads: list[bytes],
    keys: list[bytes] | None = None,
    partition: int | None = None,
    timestamps_ms: list[int] | None = None,
) -> Produced:
    """Produce ``payloads`` (with message timestamps, when given) and wait for
    every delivery report."""
    producer = Producer(
        {
            "bootstrap.servers": endpoints.KAFKA_BOOTSTRAP,
            "linger.ms": 10,
            "queue.buffering.max.messages": 2_000_000,
        }
    )
    records: list[tuple[int, int, int] | None] = [None] * len(payloads)

    def report(i: int) -> Callable[[Any, Any], None]:
        def cb(err: Any, msg: Any) -> None:
            assert err is None, err
            records[i] = (msg.partition(), msg.offset(), msg.timestamp()[1])

        return cb

    for i, payload in enumerate(payloads):
        kwargs: dict[str, Any] = {"on_delivery": report(i)}
        if keys is not None:
            kwargs["key"] = keys[i]
        if partition is not None:
            kwargs["partition"] = partition
        if timestamps_ms is not None:
            kwargs["timestamp"] = timestamps_ms[i]
        while True:
            try:
                producer.produce(topic, payload, **kwargs)
                break
            except BufferError:
                producer.poll(0.1)
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0
    assert all(r is not None for r in records)
    return Produced([r for r in records if r is not None])


def events(n: int, start: int = 0) -> list[bytes]:
    """``n`` JSON events with ids ``start .. start+n-1``."""
    enc = msgspec.json.Encoder()
    kinds = ("click", "view", "purchase")
    return [
        enc.encode(
            {
                "id": i,
                "user_id": i % 997,
                "event_type": kinds[i % 3],
                "amount": (i % 1000) / 4,
                "note": f"n{i}",
            }
        )
        for i in range(start, start + n)
    ]


def kafka_source(topic: str, **keys: Any) -> Any:
    """A Kafka source on ``topic`` (a new group, from the earliest offset),
    built as the engine builds it; ``keys`` are more ``[source]`` keys."""
    from sluice.config import load_text
    from sluice.connectors import registry

    extra = "\n".join(f"{k} = {v}" for k, v in keys.items())
    spec = load_text(
        f"""
pipeline_name = "{unique("p")}"
source_query = "{topic}"
[source]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
auto_offset_reset = "earliest"
session_timeout_ms = 2000
{extra}
[target]
kind = "sqlite"
path = "unused.sqlite"
table = {{ name = "t" }}
""",
        "<test>",
    )
    return registry.build_source(spec.all_sources[0], registry.Context(spec))


@pytest.fixture
def pg() -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test Postgres."""
    with psycopg.connect(endpoints.POSTGRES_URL, autocommit=True) as conn:
        yield conn


@pytest.fixture
def pg_table(pg: psycopg.Connection[Any]) -> Iterator[str]:
    """A fresh Postgres table name (``public``), dropped afterwards."""
    name = unique("t")
    yield name
    pg.execute(f'DROP TABLE IF EXISTS "{name}"')


def pg_count(table: str, expr: str = "count(*)") -> int:
    """``expr`` (an integer aggregate) over ``table``.

    Raises when the table does not exist or Postgres does not answer: outside
    a polling loop a missing table is a failure, not a count of 0. Poll with
    :func:`wait_for_count` while the pipeline may not have created it yet.
    """
    with psycopg.connect(endpoints.POSTGRES_URL, autocommit=True, connect_timeout=3) as conn:
        row = conn.execute(f"SELECT {expr} FROM {table}").fetchone()
    assert row is not None, f"SELECT {expr} FROM {table} returned no row"
    return int(row[0])


def wait_for_count(
    table: str, done: Callable[[int], bool], timeout_s: float, what: str, expr: str = "count(*)"
) -> int:
    """Poll :func:`pg_count` until ``done(count)``; return that count.

    Only here does a table that does not exist yet count as 0: the pipeline
    under test creates it on its first write. Any other error raises at once.
    """

    def check() -> tuple[int] | None:
        try:
            count = pg_count(table, expr)
        except psycopg.errors.UndefinedTable:
            count = 0
        # A (count,) tuple is truthy even for a count of 0, which may be the answer.
        return (count,) if done(count) else None

    return int(wait_until(check, timeout_s, what)[0])


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Flow:
    """A running `flow consume` process."""

    proc: subprocess.Popen[bytes]
    metrics_port: int
    log: Path

    def metric(self, name: str) -> float:
        """Sum of a metric's samples: 0 when the metric is declared but has no
        sample yet (a labelled counter appears at its first increment).

        A name the process does not declare at all (a typo, a renamed metric)
        raises, so it can never pass as 0.
        """
        text = self.scrape()
        families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
        if not any(
            name == family + suffix
            for family in families
            for suffix in ("", "_total", "_count", "_sum", "_bucket", "_created")
        ):
            raise AssertionError(f"the process declares no metric {name!r}")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def scrape(self, path: str = "/metrics") -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5
        ) as resp:
            return str(resp.read().decode())

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5
            ) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def kill(self) -> None:
        """SIGKILL: no drain, no commit, no goodbye."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM and wait for the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def flow(tmp_path: Path) -> Iterator[Callable[..., Flow]]:
    """Start `flow consume CONFIG` as a real process: ``flow(toml_text, *args)``."""
    started: list[Flow] = []

    def start(config: str, *args: str, name: str = "pipeline") -> Flow:
        path = tmp_path / f"{name}.toml"
        path.write_text(config)
        port = free_port()
        log = tmp_path / f"{name}-{len(started)}.log"
        env = {**os.environ, "SLUICE_STATE_DIR": str(tmp_path / "state")}
        with log.open("ab") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sluice",
                    "consume",
                    str(path),
                    "--metrics-port",
                    str(port),
                    *args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,
            )
        f = Flow(proc, port, log)
        started.append(f)
        wait_until(lambda: _answers(port) or proc.poll() is not None, 30, "the metrics port")
        return f

    yield start
    for f in started:
        if f.proc.poll() is None:
            f.proc.kill()
            f.proc.wait(timeout=30)


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def kafka_pg_config(
    topic: str,
    table: str,
    *,
    group: str | None = None,
    mode: str = "append",
    batch_rows: int = 50_000,
    extra_source: str = "",
    primary_key: str = "",
) -> str:
    """A Kafka → Postgres pipeline file."""
    return f"""
pipeline_name = "{table}"
source_query = "{topic}"
idle_pause_ms = 100

[source]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{group or table}"
session_timeout_ms = 2000
max_batch_rows = {batch_rows}
{extra_source}

[target]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
mode = "{mode}"

[target.table]
schema = "public"
name = "{table}"
{primary_key}
"""


def kill_after_reading(f: Flow, rows: float, delay_s: float, timeout_s: float = 90) -> None:
    """SIGKILL ``f`` ``delay_s`` after it has consumed ``rows`` rows.

    The caller draws ``delay_s`` at random, so that the kill does not always
    land right after a checkpoint. Fails (with the process's output) when the
    process exits by itself before the kill.
    """
    wait_until(
        lambda: f.proc.poll() is not None or f.metric("sluice_rows_consumed_total") >= rows,
        timeout_s,
        f"the process to consume {rows:.0f} rows",
        0.02,
    )
    time.sleep(delay_s)
    assert f.proc.poll() is None, f.output()
    f.kill()
