"""Positions in the target fence two writers of one partition (stateless replicas).

Two ledgers on one Postgres table stand for two processes: the one the group
took a partition from (still writing) and the one it gave it to. Whichever
commits second finds the stored position moved and records nothing; its
rows roll back with it.
"""

from __future__ import annotations

from typing import Any

import adbc_driver_postgresql.dbapi as adbc
import pytest
from tests import endpoints
from tests.integration.conftest import pg_count, unique

from sluice.connectors.postgres.target import query
from sluice.connectors.sql import positions
from sluice.errors import PositionsMoved

pytestmark = pytest.mark.integration


def ledger(schema: str) -> positions.Ledger:
    return positions.Ledger(
        positions.POSTGRES, f'"{schema}"."{positions.TABLE}"', "p", "postgres:t"
    )


def write(conn: Any, led: positions.Ledger, schema: str, ids: range, position: int) -> None:
    """One round: rows and the position after them, in one transaction."""
    with conn.cursor() as cur:
        for i in ids:
            cur.execute(f'INSERT INTO "{schema}".rows VALUES ($1)', (i,))
    led.stage({"topic": {"topic:0": position}})
    led.write(lambda s, p: query(conn, s, p), conn)
    conn.commit()
    led.done()


def test_the_second_writer_of_a_partition_is_fenced_and_rolled_back() -> None:
    schema = unique("fence")
    a_conn, b_conn = adbc.connect(endpoints.POSTGRES_URL), adbc.connect(endpoints.POSTGRES_URL)
    try:
        with a_conn.cursor() as cur:
            cur.execute(f'CREATE SCHEMA "{schema}"')
            cur.execute(f'CREATE TABLE "{schema}".rows (id bigint)')
        a, b = ledger(schema), ledger(schema)
        a.create(lambda s, p: query(a_conn, s, p))
        a_conn.commit()
        assert a.held(lambda s, p: query(a_conn, s, p)) == {}
        write(a_conn, a, schema, range(0, 100), 100)
        # b is given the partition: it reads where the target stands, writes on.
        assert b.held(lambda s, p: query(b_conn, s, p)) == {"topic": {"topic:0": 100}}
        b_conn.commit()
        write(b_conn, b, schema, range(100, 200), 200)
        # a, which had read rows 100..199 too, tries to commit them: fenced.
        with pytest.raises(PositionsMoved, match="topic topic:0"):
            write(a_conn, a, schema, range(100, 200), 200)
        a_conn.rollback()
        a.drop()
        assert pg_count(f'"{schema}".rows') == 200
        assert pg_count(f'"{schema}".rows', "count(DISTINCT id)") == 200
        # Read again, a writes on from the stored position.
        assert a.held(lambda s, p: query(a_conn, s, p)) == {"topic": {"topic:0": 200}}
        a_conn.commit()
        write(a_conn, a, schema, range(200, 250), 250)
        assert pg_count(f'"{schema}".rows') == 250
    finally:
        for conn in (a_conn, b_conn):
            conn.rollback()
        with a_conn.cursor() as cur:
            cur.execute(f'DROP SCHEMA "{schema}" CASCADE')
        a_conn.commit()
        for conn in (a_conn, b_conn):
            conn.close()


def test_a_ledger_that_never_read_the_table_does_not_fence() -> None:
    """A joined checkpoint stages positions without reading them: its store fences."""
    schema = unique("nofence")
    conn = adbc.connect(endpoints.POSTGRES_URL)
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE SCHEMA "{schema}"')
            cur.execute(f'CREATE TABLE "{schema}".rows (id bigint)')
        led, other = ledger(schema), ledger(schema)
        led.create(lambda s, p: query(conn, s, p))
        conn.commit()
        write(conn, other, schema, range(0, 10), 10)
        write(conn, led, schema, range(10, 20), 20)
        assert pg_count(f'"{schema}".rows') == 20
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP SCHEMA "{schema}" CASCADE')
        conn.commit()
        conn.close()
