"""Postgres dead letters: COPY into a table, one transaction per write.

The table is created when missing; durable on commit.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

from sluice.engine.dlq import DeadLetter
from sluice.errors import ConnectorError, TransientError


class PostgresDeadLetters:
    """Copies dead letters into a Postgres table, one transaction per write."""

    def __init__(self, url: str, schema: str, table: str) -> None:
        self.url = url
        self.schema = schema
        self.table = table
        self.id = f"dlq:postgres:{schema}.{table}"
        self._conn: Any = None

    def _ident(self) -> Any:
        from psycopg import sql

        return sql.Identifier(self.schema, self.table)

    def open(self) -> None:
        """Connect and create the table when missing."""
        import psycopg
        from psycopg import sql

        try:
            self._conn = psycopg.connect(self.url, connect_timeout=10)
            with self._conn.transaction():
                self._conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
                )
                self._conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} ("
                        "id bigserial PRIMARY KEY, pipeline text NOT NULL, source text NOT NULL, "
                        "stage text NOT NULL, error text NOT NULL, partition text, "
                        '"offset" text, source_timestamp timestamptz, key bytea, payload bytea, '
                        "failed_at timestamptz NOT NULL DEFAULT now())"
                    ).format(self._ident())
                )
        except psycopg.OperationalError as exc:
            self.close()
            raise TransientError(f"{self.id}: cannot connect: {exc}") from exc
        except psycopg.Error as exc:
            self.close()
            raise ConnectorError(f"{self.id}: {exc}") from exc

    def write(self, letters: list[DeadLetter]) -> None:
        """COPY the letters in and commit."""
        import psycopg
        from psycopg import sql

        if self._conn is None:
            raise ConnectorError(f"{self.id} is not open")
        statement = sql.SQL(
            'COPY {} (pipeline, source, stage, error, partition, "offset", '
            "source_timestamp, key, payload) FROM STDIN"
        ).format(self._ident())
        try:
            with self._conn.transaction(), self._conn.cursor() as cur, cur.copy(statement) as copy:
                for d in letters:
                    r = d.record
                    ts = (
                        None
                        if r.timestamp_ms is None
                        else datetime.fromtimestamp(r.timestamp_ms / 1000, UTC)
                    )
                    offset = None if r.offset is None else str(r.offset)
                    copy.write_row(
                        (
                            d.pipeline,
                            d.source,
                            d.stage,
                            d.error,
                            r.partition,
                            offset,
                            ts,
                            r.key,
                            r.payload,
                        )
                    )
        except psycopg.OperationalError as exc:
            raise TransientError(f"{self.id}: {exc}") from exc
        except psycopg.Error as exc:
            raise ConnectorError(f"{self.id}: {exc}") from exc

    def close(self) -> None:
        """Close the connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def build_sink(spec: Any, destination: str) -> PostgresDeadLetters:
    """Registry hook: dead letters to ``destination`` (``SCHEMA.TABLE``) in the
    database of ``spec`` (a Postgres target or a Postgres state store: both have ``url``)."""
    schema, _, table = destination.partition(".")
    return PostgresDeadLetters(spec.url, schema, table)
