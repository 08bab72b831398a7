"""Nested Arrow columns into the real Postgres through ``PostgresTarget``.

A ``list<struct>`` column lands in a new table as ``jsonb``, in existing
``jsonb`` / ``json`` columns (checked with Postgres' own JSON operators), and
is refused, before anything is written, by a column of any other type.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from tests.integration.conftest import postgres_target, unique

from sluice.connectors.postgres.target import PostgresTarget
from sluice.errors import ConnectorError
from sluice.formats.jsontext import to_json_text

pytestmark = pytest.mark.integration

QUOTE = pa.struct(
    [
        ("strike", pa.int64()),
        ("bid", pa.float64()),
        ("ts", pa.timestamp("us", "UTC")),
        ("tag", pa.string()),
        ("raw", pa.binary()),
    ]
)
TS = 1_767_323_045_123_456  # 2026-01-02T03:04:05.123456Z in microseconds


FIRST = {"strike": 4500, "bid": 1.25, "ts": TS, "tag": 'call "A"\n\\é', "raw": b"\x0a\x0b"}


def quotes() -> pa.Table:
    """Four rows: two quotes (one NaN bid), an empty list, a null list; a null quote."""
    rows = [
        [FIRST, {"strike": 4600, "bid": float("nan"), "ts": None, "tag": None, "raw": None}],
        [],
        None,
        [None, {"strike": -1, "bid": -0.5, "ts": 0, "tag": "\x01", "raw": b""}],
    ]
    return pa.table(
        {"id": pa.array([1, 2, 3, 4], pa.int64()), "quotes": pa.array(rows, pa.list_(QUOTE))}
    )


#: What row 1 must hold, as Postgres would build it from SQL values.
ROW_1 = [
    {
        "strike": 4500,
        "bid": 1.25,
        "ts": "2026-01-02T03:04:05.123456Z",
        "tag": 'call "A"\n\\é',
        "raw": "\\x0a0b",
    },
    {"strike": 4600, "bid": None, "ts": None, "tag": None, "raw": None},
]


def target(table: str) -> PostgresTarget:
    t: PostgresTarget = postgres_target(table)
    return t


@pytest.fixture
def table(pg_table: str) -> str:
    return pg_table


def column_type(pg: psycopg.Connection[Any], table: str, column: str) -> str:
    row = pg.execute(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attname = %s",
        (table, column),
    ).fetchone()
    assert row is not None
    return str(row[0])


def check_jsonb(pg: psycopg.Connection[Any], table: str, column: str) -> None:
    """The stored values, read back through Postgres' jsonb operators."""
    c = f'"{column}"::jsonb'
    row = pg.execute(
        f"SELECT jsonb_array_length({c}), ({c}->0->>'strike')::int, ({c}->0->>'bid')::float8, "
        f"({c}->0->>'ts')::timestamptz = '2026-01-02 03:04:05.123456+00', "
        f"{c}->0->>'tag', {c}->0->'raw' = to_jsonb('\\x0a0b'::bytea), "
        f"jsonb_typeof({c}->1->'bid'), {c}->1 ? 'tag', jsonb_typeof({c}->1->'tag') "
        f"FROM {table} WHERE id = 1"
    ).fetchone()
    assert row == (2, 4500, 1.25, True, 'call "A"\n\\é', True, "null", True, "null")
    assert pg.execute(
        f"SELECT {c} = %s::jsonb FROM {table} WHERE id = 1", (json.dumps(ROW_1),)
    ).fetchone() == (True,)
    rest = pg.execute(
        f"SELECT id, {c} = '[]'::jsonb, {c} IS NULL, jsonb_typeof({c}->0), {c}->1->>'ts', "
        f"{c}->1->>'tag' FROM {table} WHERE id > 1 ORDER BY id"
    ).fetchall()
    assert rest == [
        (2, True, False, None, None, None),
        (3, None, True, None, None, None),  # a null list is SQL NULL, not JSON null
        (4, False, False, "null", "1970-01-01T00:00:00.000000Z", "\x01"),
    ]
    # Only the NaN went to null: the rest of the batch arrived.
    assert pg.execute(f"SELECT count(*) FROM {table}").fetchone() == (4,)


def test_a_new_table_gets_a_jsonb_column(pg: psycopg.Connection[Any], table: str) -> None:
    t = target(table)
    try:
        t.write(quotes())
        t.flush()
    finally:
        t.close()
    assert column_type(pg, table, "quotes") == "jsonb"
    check_jsonb(pg, table, "quotes")


def test_a_missing_column_is_added_as_jsonb(pg: psycopg.Connection[Any], table: str) -> None:
    pg.execute(f'CREATE TABLE "{table}" (id bigint)')
    t = target(table)
    try:
        t.write(quotes())
        t.flush()
    finally:
        t.close()
    assert column_type(pg, table, "quotes") == "jsonb"
    check_jsonb(pg, table, "quotes")


def test_existing_jsonb_json_and_domain_columns_take_nested_values(
    pg: psycopg.Connection[Any], table: str
) -> None:
    domain = unique("quotes_doc")
    pg.execute(f"CREATE DOMAIN \"{domain}\" AS jsonb CHECK (jsonb_typeof(VALUE) = 'array')")
    try:
        pg.execute(
            f'CREATE TABLE "{table}" (id bigint PRIMARY KEY, quotes jsonb, '
            f'quotes_json json, quotes_doc "{domain}")'
        )
        data = quotes()
        nested = data.column("quotes")
        data = data.append_column("quotes_json", nested).append_column("quotes_doc", nested)
        t = target(table)
        try:
            t.write(data)
            t.flush()
        finally:
            t.close()
        check_jsonb(pg, table, "quotes")
        check_jsonb(pg, table, "quotes_json")
        check_jsonb(pg, table, "quotes_doc")
        # json keeps the text as written: exactly what to_json_text made.
        stored = [r[0] for r in pg.execute(f'SELECT quotes_json::text FROM "{table}" ORDER BY id')]
        assert stored == to_json_text(nested).to_pylist()
    finally:
        pg.execute(f'DROP TABLE IF EXISTS "{table}"')
        pg.execute(f'DROP DOMAIN IF EXISTS "{domain}"')


@pytest.mark.parametrize("pg_type", ["text", "integer"])
@pytest.mark.parametrize("nested", ["list<struct>", "struct"])
def test_a_non_json_column_refuses_nested_values_and_nothing_is_written(
    pg: psycopg.Connection[Any], table: str, pg_type: str, nested: str
) -> None:
    pg.execute(f'CREATE TABLE "{table}" (id bigint, quotes {pg_type})')
    data = quotes()
    if nested == "struct":
        data = data.set_column(1, "quotes", pa.array([FIRST] * 4, QUOTE))
    t = target(table)
    try:
        with pytest.raises(ConnectorError) as caught:
            t.write(data)
        message = str(caught.value)
        assert f"public.{table}" in message
        assert 'column "quotes"' in message and f"is {pg_type} in Postgres" in message
        assert "json or jsonb" in message
        t.flush()  # even committing afterwards writes nothing of the refused batch
    finally:
        t.close()
    assert pg.execute(f'SELECT count(*) FROM "{table}"').fetchone() == (0,)
    assert column_type(pg, table, "quotes") == pg_type
