"""The MySQL / MariaDB target and lookup loader against the real MariaDB.

Targets are built from pipeline TOML through the connector registry, as
``flow consume`` builds them; the last test runs a real ``flow consume``
process from Kafka and SIGKILLs it mid-stream. The server restart test stops
and starts MariaDB with ``scripts/services.sh``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pyarrow as pa
import pymysql
import pytest
from tests import endpoints
from tests.integration.conftest import REPO, events, produce, unique, wait_until

from sluice.config.load import load_text
from sluice.connectors.api import Target
from sluice.connectors.mysql.target import MySQLUrl, load_table, parse_url
from sluice.connectors.registry import Context, build_target
from sluice.errors import ConnectorError, TransientError

pytestmark = pytest.mark.integration

SERVICES = ["bash", str(REPO / "scripts" / "services.sh")]


def _connect() -> Any:
    url = parse_url(endpoints.MYSQL_URL)
    return pymysql.connect(
        host=url.host,
        port=url.port,
        user=url.user,
        password=url.password,
        database=url.database,
        autocommit=True,
        connect_timeout=5,
        init_command="SET time_zone = '+00:00'",
    )


def _rows(statement: str, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
    conn = _connect()
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return list(cur.fetchall())
    finally:
        conn.close()


def _count(table: str, expr: str = "count(*)") -> int:
    """``expr`` (an integer aggregate) over ``table``; raises when the table
    does not exist or MariaDB does not answer (poll with :func:`_wait_for_count`)."""
    return int(_rows(f"SELECT {expr} FROM `{table}`")[0][0])


#: MariaDB's ER_NO_SUCH_TABLE.
_NO_SUCH_TABLE = 1146


def _wait_for_count(table: str, done: Callable[[int], bool], timeout_s: float, what: str) -> int:
    """Poll ``count(*)`` of ``table`` until ``done(count)``; return that count.

    Only here does a table that does not exist yet count as 0: the pipeline
    under test creates it on its first write. Any other error raises at once.
    """

    def check() -> tuple[int] | None:
        try:
            count = _count(table)
        except pymysql.err.ProgrammingError as exc:
            if exc.args[0] != _NO_SUCH_TABLE:
                raise
            count = 0
        # A (count,) tuple is truthy even for a count of 0, which may be the answer.
        return (count,) if done(count) else None

    return int(wait_until(check, timeout_s, what)[0])


@pytest.fixture
def table() -> Iterator[str]:
    """A fresh table name in the test database, dropped afterwards."""
    name = unique("my")
    yield name
    _rows(f"DROP TABLE IF EXISTS `{name}`")


def _target(table: str, mode: str = "append", primary_key: list[str] | None = None) -> Target:
    key = f"primary_key = {json.dumps(primary_key)}" if primary_key else ""
    spec = load_text(
        f"""
pipeline_name = "mysql-test"
source_query = "unused"

[source]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"

[target]
kind = "mysql"
url = "{endpoints.MYSQL_URL}"
mode = "{mode}"

[target.table]
name = "{table}"
{key}
"""
    )
    assert spec.target is not None
    return build_target(spec.target, Context(spec), 0)


def _write(target: Target, data: pa.Table) -> None:
    target.write(data)
    target.flush()


def _events(n: int, start: int = 0) -> pa.Table:
    ids = range(start, start + n)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "user_id": pa.array([i % 997 for i in ids], pa.int32()),
            "event_type": [("click", "view", "purchase")[i % 3] for i in ids],
            "amount": pa.array([(i % 1000) / 4 for i in ids], pa.float64()),
            "note": [f"n{i}" for i in ids],
            "_event_ts": pa.array(
                [1_700_000_000_000_000 + i for i in ids], pa.timestamp("us", tz="UTC")
            ),
        }
    )


NASTY = ["", "NULL", "\\N", 'a"b', 'x",', "a,b", "line\nbreak", "cr\r\n", "back\\", "tab\t", "é✓🎉"]


def test_creates_the_table_from_the_arrow_schema_and_keeps_every_value(table: str) -> None:
    n = len(NASTY)
    data = pa.table(
        {
            "k": pa.array(range(n), pa.int64()),
            "i8": pa.array([-128 if i == 0 else i for i in range(n)], pa.int8()),
            "u64": pa.array([2**64 - 1] + [None] * (n - 1), pa.uint64()),
            "f32": pa.array([0.5] + [None] * (n - 1), pa.float32()),
            "f64": pa.array([0.1, math.nan, -1e300] + [None] * (n - 3), pa.float64()),
            "flag": pa.array([True, False] + [None] * (n - 2)),
            "s": pa.array(NASTY),
            "ts": pa.array(
                [1_700_000_000_123_456_789, 0] + [None] * (n - 2), pa.timestamp("ns", tz="UTC")
            ),
            "ts_paris": pa.array(
                [1_700_000_000_000_000] + [None] * (n - 1), pa.timestamp("us", tz="Europe/Paris")
            ),
            "d": pa.array([dt.date(2024, 2, 29), dt.date(1000, 1, 1)] + [None] * (n - 2)),
            "t": pa.array([dt.time(23, 59, 59, 999_999)] + [None] * (n - 1), pa.time64("us")),
            "bin": pa.array([b"\x00\xff\n,\"'\\"] + [b""] + [None] * (n - 2), pa.binary()),
            "dec": pa.array(
                [decimal.Decimal("-12345678.90")] + [None] * (n - 1), pa.decimal128(12, 2)
            ),
            "nested": pa.array([{"a": [1, 2], "s": 'q"'}] + [None] * (n - 1)),
            "dict": pa.array(["x", "y"] * (n // 2) + ["x"] * (n % 2)).dictionary_encode(),
            "nothing": pa.nulls(n),
        }
    )
    target = _target(table, "merge", ["k"])
    target.open()
    _write(target, data)
    target.close()

    columns = {
        r[0]: (r[1], r[2])
        for r in _rows(
            "SELECT COLUMN_NAME, COLUMN_TYPE, COLUMN_KEY FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
            (table,),
        )
    }
    assert columns["k"] == ("bigint(20)", "PRI")
    assert columns["u64"][0] == "bigint(20) unsigned"
    assert columns["flag"][0] == "tinyint(1)"
    assert columns["s"][0] == "longtext"
    assert columns["ts"][0] == "datetime(6)"
    assert columns["bin"][0] == "longblob"
    assert columns["dec"][0] == "decimal(12,2)"
    assert columns["nested"][0] == "longtext"  # MariaDB's JSON
    assert "nothing" not in columns  # a null-typed column has no type to create

    got = {
        r[0]: r[1:]
        for r in _rows(
            "SELECT k, i8, u64, f32, f64, flag, s, ts, ts_paris, d, t, bin, `dec`, nested, dict "
            f"FROM `{table}`"
        )
    }
    assert len(got) == n
    assert [got[i][5] for i in range(n)] == NASTY  # NULL vs "NULL" vs "", quotes, newlines
    first = got[0]
    assert first[:5] == (-128, 2**64 - 1, 0.5, 0.1, 1)
    # tz-aware timestamps land as their UTC wall time, nanoseconds truncated.
    assert first[6] == dt.datetime(2023, 11, 14, 22, 13, 20, 123456)
    assert first[7] == dt.datetime(2023, 11, 14, 22, 13, 20)
    assert first[8:12] == (
        dt.date(2024, 2, 29),
        dt.timedelta(hours=23, minutes=59, seconds=59, microseconds=999_999),
        b"\x00\xff\n,\"'\\",
        decimal.Decimal("-12345678.90"),
    )
    assert json.loads(first[12]) == {"a": [1, 2], "s": 'q"'}
    assert first[13] == "x"
    second = got[1]
    assert second[3] is None, "NaN is stored as NULL (MySQL has no NaN)"
    assert second[4] == 0
    assert second[6] == dt.datetime(1970, 1, 1)
    assert second[10] == b""
    assert got[2][3] == -1e300
    assert got[3][1:] == (None,) * 4 + (NASTY[3],) + (None,) * 7 + ("y",)


def test_append_200k_rows_with_correct_values(table: str) -> None:
    n = 200_000
    target = _target(table)
    target.open()
    started = time.perf_counter()
    _write(target, _events(n // 2))
    _write(target, _events(n // 2, n // 2))
    elapsed = time.perf_counter() - started
    target.close()
    count, distinct, id_sum, amount_sum, clicks, first_ts, last_ts = _rows(
        "SELECT count(*), count(DISTINCT id), sum(id), sum(amount), sum(event_type = 'click'), "
        f"min(_event_ts), max(_event_ts) FROM `{table}`"
    )[0]
    assert (count, distinct, int(id_sum)) == (n, n, n * (n - 1) // 2)
    assert amount_sum == pytest.approx(sum((i % 1000) / 4 for i in range(n)))
    assert int(clicks) == len(range(0, n, 3))
    epoch = dt.datetime(1970, 1, 1)
    assert first_ts == epoch + dt.timedelta(microseconds=1_700_000_000_000_000)
    assert last_ts == epoch + dt.timedelta(microseconds=1_700_000_000_000_000 + n - 1)
    assert _rows(f"SELECT user_id, note FROM `{table}` WHERE id = 123456")[0] == (
        123456 % 997,
        "n123456",
    )
    print(f"200k rows appended in {elapsed:.2f}s")


def test_merge_on_a_composite_key_last_row_of_a_batch_wins(table: str) -> None:
    target = _target(table, "merge", ["region", "id"])
    target.open()
    first = pa.table(
        {
            "region": ["eu", "eu", "us", "eu", "EU", "eu "],
            "id": pa.array([1, 2, 1, 1, 1, 1], pa.int64()),
            "v": ["a", "b", "c", "a2", "upper", "space"],
            "n": pa.array([1, 2, 3, 4, 5, 6], pa.int64()),
        }
    )
    _write(target, first)
    # A later batch updates only the columns it carries; the last duplicate wins again.
    second = pa.table(
        {
            "id": pa.array([2, 2, 9], pa.int64()),
            "region": ["eu", "eu", "us"],
            "v": ["b2", "b3", "new"],
        }
    )
    _write(target, second)
    target.close()
    got = {(r[0], r[1]): (r[2], r[3]) for r in _rows(f"SELECT region, id, v, n FROM `{table}`")}
    assert got == {
        ("eu", 1): ("a2", 4),
        ("eu", 2): ("b3", 2),
        ("us", 1): ("c", 3),
        ("us", 9): ("new", None),
        # Keys compare exactly, as in Arrow: case and trailing spaces matter.
        ("EU", 1): ("upper", 5),
        ("eu ", 1): ("space", 6),
    }
    key = _rows(
        "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = "
        "DATABASE() AND TABLE_NAME = %s AND CONSTRAINT_NAME = 'PRIMARY' ORDER BY ORDINAL_POSITION",
        (table,),
    )
    assert [k[0] for k in key] == ["region", "id"]


def test_merge_reflects_the_key_and_handles_an_all_key_table(table: str) -> None:
    _rows(f"CREATE TABLE `{table}` (a INT NOT NULL, b VARCHAR(10) NOT NULL, PRIMARY KEY (a, b))")
    target = _target(table, "merge")  # no primary_key: reflected
    target.open()
    rows = pa.table({"a": pa.array([1, 1, 2, 1], pa.int32()), "b": ["x", "y", "x", "x"]})
    _write(target, rows)
    _write(target, rows)
    target.close()
    assert sorted(_rows(f"SELECT a, b FROM `{table}`")) == [(1, "x"), (1, "y"), (2, "x")]


def test_merge_needs_a_key_that_is_unique_in_the_table(table: str) -> None:
    _rows(f"CREATE TABLE `{table}` (id INT, v TEXT)")
    with pytest.raises(ConnectorError, match=rf"{table}.*needs a primary key"):
        _target(table, "merge").open()
    with pytest.raises(ConnectorError, match=rf"{table}.*neither the primary key nor a unique"):
        _target(table, "merge", ["id"]).open()
    _rows(f"ALTER TABLE `{table}` ADD UNIQUE KEY (id)")
    target = _target(table, "merge", ["id"])
    target.open()
    with pytest.raises(ConnectorError, match=rf"{table}.*merge key column\(s\) \['id'\] missing"):
        target.write(pa.table({"v": ["no key"]}))
    _write(target, pa.table({"id": pa.array([1, 1], pa.int32()), "v": ["a", "b"]}))
    target.close()
    assert _rows(f"SELECT id, v FROM `{table}`") == [(1, "b")]


def test_a_new_column_is_added(table: str) -> None:
    target = _target(table)
    target.open()
    _write(target, pa.table({"id": pa.array([1], pa.int64())}))
    _write(target, pa.table({"id": pa.array([2], pa.int64()), "Extra": ["x"], "ts": [None]}))
    _write(target, pa.table({"ID": pa.array([3], pa.int64()), "extra": ["y"]}))  # same columns
    target.close()
    assert sorted(_rows(f"SELECT id, Extra FROM `{table}`")) == [(1, None), (2, "x"), (3, "y")]
    names = _rows(
        "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
        "AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
        (table,),
    )
    assert [r[0] for r in names] == ["id", "Extra"]


def test_a_value_that_does_not_fit_fails_the_batch_naming_the_table(table: str) -> None:
    _rows(f"CREATE TABLE `{table}` (id INT PRIMARY KEY, small TINYINT, code VARCHAR(3))")
    target = _target(table)
    target.open()
    ok = pa.table({"id": pa.array([1], pa.int64()), "small": [1], "code": ["abc"]})
    too_big = pa.table({"id": pa.array([2, 3], pa.int64()), "small": [1, 300], "code": ["x", "y"]})
    with pytest.raises(ConnectorError, match=r"mysql:sluice\.\w+") as info:
        target.write(ok)
        target.write(too_big)
    assert not isinstance(info.value, TransientError)
    message = str(info.value)
    assert table in message and "'small'" in message and "row 2" in message, message
    assert _count(table) == 0, "the rejected batch and its transaction are rolled back"

    too_long = pa.table({"id": pa.array([4], pa.int64()), "small": [1], "code": ["abcd"]})
    with pytest.raises(ConnectorError, match=rf"{table}.*'code'"):
        target.write(too_long)
    duplicate = pa.table({"id": pa.array([5, 5], pa.int64()), "small": [1, 1], "code": ["a", "b"]})
    with pytest.raises(ConnectorError, match=rf"{table}.*Duplicate entry"):
        target.write(duplicate)
    with pytest.raises(ConnectorError, match=rf"{table}.*'small'.*infinite"):
        target.write(pa.table({"id": pa.array([6], pa.int64()), "small": [math.inf]}))
    # The connection is still good: the next batch goes in.
    _write(target, ok)
    target.close()
    assert _rows(f"SELECT id, small, code FROM `{table}`") == [(1, 1, "abc")]


def _bad_url(change: str) -> str:
    url = parse_url(endpoints.MYSQL_URL)
    if change == "database":
        return f"mysql://{url.user}@{url.host}:{url.port}/{url.database}_nope"
    return f"mysql://{url.user}:not-the-password@{url.host}:{url.port}/{url.database}"


@pytest.mark.parametrize(
    ("change", "error"), [("database", "Unknown database"), ("password", "Access denied")]
)
def test_a_server_that_refuses_the_url_is_fatal_and_the_password_never_shows(
    change: str, error: str, table: str
) -> None:
    spec = load_text(
        f"""
pipeline_name = "x"
source_query = "unused"
[source]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
[target]
kind = "mysql"
url = "{_bad_url(change)}"
[target.table]
name = "{table}"
"""
    )
    assert spec.target is not None
    target = build_target(spec.target, Context(spec), 0)
    with pytest.raises(ConnectorError, match=error) as info:
        target.open()
    assert not isinstance(info.value, TransientError), "retrying cannot help"
    assert "not-the-password" not in str(info.value)


def test_url_parts_are_percent_decoded_and_a_bad_url_never_shows_the_password() -> None:
    assert parse_url("mysql://app%40x:p%3Ass@db.example:3307/my%20db") == MySQLUrl(
        host="db.example", port=3307, user="app@x", password="p:ss", database="my db"
    )
    assert parse_url("mariadb://db.example").port == 3306
    for bad in ("postgres://u:secret@h/db", "mysql://u:secret@h/db?ssl=1", "mysql://u:secret@h:x/"):
        with pytest.raises(ConnectorError) as info:
            parse_url(bad)
        assert "secret" not in str(info.value)


@pytest.mark.disruptive
def test_a_server_restart_mid_write_is_transient_and_a_reopen_resumes(table: str) -> None:
    rows_per_batch = 20_000
    target = _target(table, "merge", ["id"])
    target.open()
    _write(target, _events(rows_per_batch))
    flushed = 1

    def stop_soon() -> None:
        time.sleep(0.5)  # deliberately: let a few batches in, then stop the server mid-stream
        subprocess.run([*SERVICES, "stop", "mariadb"], check=True, capture_output=True)

    stopper = threading.Thread(target=stop_soon, daemon=True)
    try:
        stopper.start()
        with pytest.raises(TransientError, match=rf"mysql:sluice\.{table}"):
            for _ in range(1_000):  # ends when the server goes (about 25 batches per second)
                _write(target, _events(rows_per_batch, flushed * rows_per_batch))
                flushed += 1
        stopper.join(timeout=60)
        target.close()
        with pytest.raises(TransientError, match="cannot connect"):
            target.open()
    finally:
        stopper.join(timeout=60)
        subprocess.run([*SERVICES, "start", "mariadb"], check=True, capture_output=True)
    # What the engine does: reopen and write the failed batch again.
    target.open()
    _write(target, _events(rows_per_batch, flushed * rows_per_batch))
    target.close()
    expected = (flushed + 1) * rows_per_batch
    assert _count(table) == expected
    assert _count(table, "count(DISTINCT id)") == expected
    assert _count(table, "max(id)") == expected - 1


def test_load_table_types_and_an_empty_table(table: str) -> None:
    _rows(
        f"CREATE TABLE `{table}` (id INT PRIMARY KEY, big BIGINT UNSIGNED, price DECIMAL(10,2), "
        "wide DECIMAL(50,5), ratio DOUBLE, f FLOAT, name VARCHAR(20), body TEXT, "
        "kind ENUM('a','b'), blob_ LONGBLOB, at DATETIME(6), stamp TIMESTAMP(6) NULL, "
        "day DATE, span TIME, doc JSON, flag BOOLEAN)"
    )
    empty = load_table(endpoints.MYSQL_URL, None, table)
    assert empty.num_rows == 0
    expected = pa.schema(
        [
            ("id", pa.int64()),
            ("big", pa.uint64()),
            ("price", pa.decimal128(10, 2)),
            ("wide", pa.decimal256(50, 5)),
            ("ratio", pa.float64()),
            ("f", pa.float32()),
            ("name", pa.string()),
            ("body", pa.string()),
            ("kind", pa.string()),
            ("blob_", pa.binary()),
            ("at", pa.timestamp("us")),
            ("stamp", pa.timestamp("us", tz="UTC")),
            ("day", pa.date32()),
            ("span", pa.duration("us")),
            ("doc", pa.string()),
            ("flag", pa.int64()),
        ]
    )
    assert empty.schema == expected
    _rows(
        f"INSERT INTO `{table}` VALUES (1, 18446744073709551615, 12.34, 1.5, 0.25, 1.5, 'ana', "
        "'long text', 'b', x'00ff', '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05', "
        "'2024-01-02', '-838:59:59', '{\"a\": 1}', TRUE), "
        "(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
        "NULL, NULL)"
    )
    loaded = load_table(endpoints.MYSQL_URL, "sluice", table)
    assert loaded.schema == expected
    first, second = sorted(loaded.to_pylist(), key=lambda r: r["id"])
    assert first == {
        "id": 1,
        "big": 2**64 - 1,
        "price": decimal.Decimal("12.34"),
        "wide": decimal.Decimal("1.50000"),
        "ratio": 0.25,
        "f": 1.5,
        "name": "ana",
        "body": "long text",
        "kind": "b",
        "blob_": b"\x00\xff",
        "at": dt.datetime(2024, 1, 2, 3, 4, 5, 123456),
        "stamp": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "day": dt.date(2024, 1, 2),
        "span": -dt.timedelta(hours=838, minutes=59, seconds=59),
        "doc": '{"a": 1}',
        "flag": 1,
    }
    assert all(v is None for k, v in second.items() if k != "id")

    with pytest.raises(ConnectorError, match=r"mysql lookup sluice\.missing_table"):
        load_table(endpoints.MYSQL_URL, "sluice", "missing_table")


# -- end to end: Kafka -> flow consume -> MariaDB --------------------------------


def _kafka_mysql_config(topic: str, table: str, mode: str, batch_rows: int) -> str:
    key = 'primary_key = ["id"]' if mode == "merge" else ""
    return f"""
pipeline_name = "{table}"
source_query = "{topic}"
idle_pause_ms = 100

[source]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{table}"
session_timeout_ms = 2000
max_batch_rows = {batch_rows}

[target]
kind = "mysql"
url = "{endpoints.MYSQL_URL}"
mode = "{mode}"

[target.table]
name = "{table}"
{key}
"""


@pytest.mark.parametrize("mode", ["append", "merge"])
def test_kafka_to_mysql_sigkill_mid_stream_then_restart_loses_nothing(
    mode: str, kafka_topic: Callable[..., str], flow: Any, table: str
) -> None:
    topic = kafka_topic(3)
    n = 40_000
    produce(topic, events(n), keys=[str(i).encode() for i in range(n)])
    config = _kafka_mysql_config(topic, table, mode, batch_rows=500)

    f = flow(config)
    _wait_for_count(table, lambda c: c >= n // 3, 120, f"{n // 3} rows")
    f.kill()
    assert _count(table) < n, "the kill must land mid-stream"
    f = flow(config, "--stop-after-idle-ms", "3000")
    assert f.proc.wait(timeout=180) == 0, f.output()

    total, distinct = _rows(f"SELECT count(*), count(DISTINCT id) FROM `{table}`")[0]
    assert distinct == n, "a row is missing"
    if mode == "merge":
        assert total == n, "merge must absorb redelivered rows"
    else:
        assert total >= n
    decoder = msgspec.json.Decoder()
    sample = decoder.decode(events(1, 12_345)[0])
    got = _rows(f"SELECT user_id, event_type, amount, note FROM `{table}` WHERE id = 12345")[0]
    assert got == (sample["user_id"], sample["event_type"], sample["amount"], sample["note"])
