"""``mode = "merge"`` into the real Postgres through ``PostgresTarget``: the
COPY route for batches of new keys and the staged upsert it falls back to.

Each test checks the table's rows against what an upsert of the same batches
(the last row of a key wins) must leave, and which route each batch took.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from tests import endpoints
from tests.integration.conftest import postgres_target

from sluice.connectors.postgres.target import PostgresTarget
from sluice.errors import ConnectorError

pytestmark = pytest.mark.integration


def target(table: str) -> PostgresTarget:
    t: PostgresTarget = postgres_target(
        table, target='mode = "merge"', table_keys='primary_key = ["id", "day"]'
    )
    return t


@pytest.fixture
def table(pg_table: str) -> str:
    return pg_table


def batch(ids: list[int], values: list[float], day: int = 1) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "day": pa.array([day] * len(ids), pa.int32()),
            "v": pa.array(values, pa.float64()),
        }
    )


def write(t: PostgresTarget, data: pa.Table) -> None:
    t.write(data)
    t.flush()


def rows(pg: psycopg.Connection[Any], table: str) -> dict[tuple[int, int], float]:
    return {(i, d): v for i, d, v in pg.execute(f'SELECT id, day, v FROM "{table}"').fetchall()}


def test_new_keys_are_copied_and_a_known_key_is_upserted(
    pg: psycopg.Connection[Any], table: str
) -> None:
    t = target(table)
    try:
        write(t, batch([1, 2, 3], [1.0, 2.0, 3.0]))
        assert t.merged_by_copy == 1
        # Key 2 is in the table: the COPY fails on the primary key, is rolled
        # back, and the batch is upserted whole (4 is inserted once, not twice).
        write(t, batch([2, 4], [20.0, 4.0]))
        assert t.merged_by_copy == 1
        assert rows(pg, table) == {(1, 1): 1.0, (2, 1): 20.0, (3, 1): 3.0, (4, 1): 4.0}
        # After a conflict the next batch is staged without trying (back-off
        # of 1), the one after it is copied again.
        write(t, batch([5], [5.0]))
        assert t.merged_by_copy == 1
        write(t, batch([6], [6.0], day=2))
        assert t.merged_by_copy == 2
        assert t.committed_rows() == 1
        assert rows(pg, table) == {
            (1, 1): 1.0,
            (2, 1): 20.0,
            (3, 1): 3.0,
            (4, 1): 4.0,
            (5, 1): 5.0,
            (6, 2): 6.0,
        }
    finally:
        t.close()


def test_a_key_twice_in_a_batch_is_staged_and_its_last_row_wins(
    pg: psycopg.Connection[Any], table: str
) -> None:
    t = target(table)
    try:
        write(t, batch([7, 8, 7], [1.0, 2.0, 3.0]))
        assert t.merged_by_copy == 0
        assert rows(pg, table) == {(7, 1): 3.0, (8, 1): 2.0}
    finally:
        t.close()


def test_conflicts_in_a_row_stage_ever_more_batches_before_trying_again(
    pg: psycopg.Connection[Any], table: str
) -> None:
    t = target(table)
    try:
        write(t, batch([1], [1.0]))
        tried = []
        for i in range(1, 13):  # every batch an update of key 1
            before = t.merge_copies_rolled_back
            write(t, batch([1], [float(i)]))
            if t.merge_copies_rolled_back > before:
                tried.append(i)
        # 1, 2, 4 and then 8 batches staged after each conflict
        assert tried == [1, 3, 6, 11]
        assert t.merged_by_copy == 1
        assert rows(pg, table) == {(1, 1): 12.0}
    finally:
        t.close()


def test_without_a_unique_index_on_the_key_nothing_is_copied(
    pg: psycopg.Connection[Any], table: str
) -> None:
    """A configured key the table does not guard: the upsert fails as Postgres
    says, rather than a COPY adding a second row for the key."""
    pg.execute(f'CREATE TABLE "{table}" (id bigint, day integer, v double precision)')
    pg.execute(f'INSERT INTO "{table}" VALUES (1, 1, 1.0)')
    t = target(table)
    try:
        with pytest.raises(ConnectorError, match="ON CONFLICT"):
            write(t, batch([2], [2.0]))
        assert t.merged_by_copy == 0
        assert rows(pg, table) == {(1, 1): 1.0}
    finally:
        t.close()


def test_a_unique_index_on_the_key_is_enough(pg: psycopg.Connection[Any], table: str) -> None:
    pg.execute(f'CREATE TABLE "{table}" (id bigint, day integer, v double precision)')
    pg.execute(f'CREATE UNIQUE INDEX ON "{table}" (day, id)')
    t = target(table)
    try:
        write(t, batch([1, 2], [1.0, 2.0]))
        write(t, batch([2], [9.0]))
        assert t.merged_by_copy == 1
        assert rows(pg, table) == {(1, 1): 1.0, (2, 1): 9.0}
    finally:
        t.close()


def test_a_deadlock_with_another_writer_of_the_keys_falls_back_to_the_upsert(
    pg: psycopg.Connection[Any], table: str
) -> None:
    """Another transaction holds key 2 (uncommitted) while the COPY of keys
    1, 2 waits on it, then asks for key 1: Postgres breaks the deadlock by
    failing the COPY, which the target rolls back and upserts instead, once
    the other writer committed."""
    pg.execute(
        f'CREATE TABLE "{table}" (id bigint, day integer, v double precision, '
        "PRIMARY KEY (id, day))"
    )
    t = target(table)
    other = psycopg.connect(endpoints.POSTGRES_URL)
    done: list[BaseException | None] = []
    try:
        other.execute(f'INSERT INTO "{table}" VALUES (2, 1, -2.0)')

        def copy() -> None:
            try:
                write(t, batch([1, 2], [1.0, 2.0]))
                done.append(None)
            except BaseException as exc:  # reported by the assertion below
                done.append(exc)

        writer = threading.Thread(target=copy)
        writer.start()
        time.sleep(0.3)  # the COPY inserted key 1 and waits for key 2
        try:
            other.execute(f'INSERT INTO "{table}" VALUES (1, 1, -1.0)')  # waits: a deadlock
            other.commit()
            copy_failed = True
        except psycopg.errors.DeadlockDetected:
            # Only if the COPY was held up between its two rows for longer than
            # this insert waited: Postgres then fails this side instead.
            other.rollback()
            copy_failed = False
        writer.join(timeout=30)
        assert done == [None]
        if copy_failed:
            assert t.merge_copies_rolled_back == 1
            assert t.merged_by_copy == 0
        assert rows(pg, table) == {(1, 1): 1.0, (2, 1): 2.0}
    finally:
        other.close()
        t.close()


def test_unsigned_and_decimal_values_are_copied_into_numeric_columns_exactly(
    pg: psycopg.Connection[Any], table: str
) -> None:
    """A session id (uint64) goes to numeric(20,0), a decimal to its
    numeric(p,s): both by the COPY, to the last digit, as the upsert writes
    them when a key comes again."""
    t = target(table)
    big = [0, 2**63, 2**64 - 1]
    amounts = ["-12345678901234567890.25", "0.10", None]

    def numbers(ids: list[int], sid: list[int], amount: list[str | None]) -> pa.Table:
        return (
            batch(ids, [1.0] * len(ids))
            .append_column("sid", pa.array(sid, pa.uint64()))
            .append_column("amount", pa.array(amount, pa.string()).cast(pa.decimal128(24, 2)))
        )

    try:
        write(t, numbers([1, 2, 3], big, amounts))
        assert t.merged_by_copy == 1
        write(t, numbers([3], [5], ["7.00"]))  # a known key: upserted
        assert t.merged_by_copy == 1
        got = pg.execute(
            f'SELECT id, sid::text, amount::text, format_type(a.atttypid, a.atttypmod) FROM "{table}", '
            f"pg_attribute a WHERE a.attrelid = '\"{table}\"'::regclass AND a.attname = 'sid' "
            "ORDER BY id"
        ).fetchall()
        assert got == [
            (1, "0", "-12345678901234567890.25", "numeric(20,0)"),
            (2, str(2**63), "0.10", "numeric(20,0)"),
            (3, "5", "7.00", "numeric(20,0)"),
        ]
    finally:
        t.close()


@pytest.mark.parametrize(
    ("values", "column", "rounded"),
    [
        (pa.array([0.125, 2.675]), "numeric(6,2)", ["0.13", "2.68"]),
        (pa.array(["1.50", "-2.50"]).cast(pa.decimal128(10, 2)), "numeric(6,0)", ["2", "-3"]),
    ],
    ids=["float", "decimal with more digits"],
)
def test_values_that_need_rounding_into_numeric_columns_are_left_to_postgres(
    pg: psycopg.Connection[Any], table: str, values: pa.Array, column: str, rounded: list[str]
) -> None:
    """Arrow would round a float into numeric(p,s) its own way, and refuses to
    drop a decimal's digits: such a batch takes the staged upsert, and
    Postgres rounds."""
    pg.execute(
        f'CREATE TABLE "{table}" (id bigint, day integer, v {column}, PRIMARY KEY (id, day))'
    )
    t = target(table)
    try:
        write(t, batch([1, 2], [0.0, 0.0]).set_column(2, "v", values))
        assert t.merged_by_copy == 0
        got = pg.execute(f'SELECT id, v::text FROM "{table}" ORDER BY id').fetchall()
        assert [v for _, v in got] == rounded
    finally:
        t.close()
