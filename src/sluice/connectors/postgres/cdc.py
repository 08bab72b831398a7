"""CDC into a Postgres table: the shared apply (:mod:`sluice.connectors.sql.cdc`)
with Postgres's dialect and session.

The events are staged by ADBC's binary COPY; each image is converted with
``jsonb_populate_record(NULL::<table>, image)``, which gives every key to the
column's own input function (the coercion an ``INSERT`` of the value would
do: ``"2024-01-02T03:04:05Z"`` into ``timestamptz``, ``1.5`` into
``numeric``, an object into ``jsonb``). The gate table is
``<schema>._sluice_cdc_gate``.

A connection that no longer answers is a :class:`~sluice.errors.TransientError`
(the engine reconnects and retries the batch), and so is a deadlock or a
serialization failure (two owners of a key during a rebalance); anything else
is a :class:`~sluice.errors.ConnectorError`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pyarrow as pa

from sluice.config.spec import CdcSpec
from sluice.connectors.postgres import target as postgres
from sluice.connectors.postgres.driver import adbc, adbc_driver_manager
from sluice.connectors.postgres.spec import PostgresTarget as PostgresTargetSpec
from sluice.connectors.registry import Context
from sluice.connectors.sql.cdc import (
    ACC_TABLE,
    IMAGE_COLUMN,
    OP_COLUMN,
    TYPED_TABLE,
    Dialect,
    Query,
    Rows,
    ServerSession,
    SqlCdcTarget,
)
from sluice.connectors.sql.embedded import check_cdc_mode
from sluice.connectors.sql.types import pg_type
from sluice.errors import ConnectorError, TransientError

#: SQLSTATEs that a retry of the batch resolves: deadlock, serialization failure.
_RETRY_STATES = frozenset({"40P01", "40001"})


class PostgresDialect(Dialect):
    """Postgres spelling: JSON converted by ``jsonb_populate_record``, temporary
    tables dropped at commit, statistics taken by ``ANALYZE``."""

    def sql_type(self, t: pa.DataType, *, key: bool = False) -> str:
        return pg_type(t)

    def typed(self, column: str, column_type: str, image: str) -> str:
        return f"(jsonb_populate_record(NULL::{self.ident}, {image})).{self.q(column)}"

    def present(self, column: str, image: str) -> str:
        return f"({image} ? {self.literal(column)})"

    def now(self) -> str:
        return "now()"

    def reflect(self, query: Query) -> tuple[dict[str, str] | None, list[str]]:
        rows = postgres.column_rows(query, self.schema, self.table)
        if not rows:
            return None, []
        return {r[0]: r[1] for r in rows}, postgres.primary_key(query, self.schema, self.table)

    def temp_table_as(self, name: str, select: str) -> str:
        return f"CREATE TEMP TABLE {name} ON COMMIT DROP AS {select}"

    def analyze(self, name: str) -> str | None:
        # Autovacuum never analyzes temporary tables; without statistics the
        # gate joins run as nested loops (20x slower at 3k events).
        return f"ANALYZE {name}"

    def gate_rows(self) -> str | None:
        return f"SELECT reltuples::bigint FROM pg_class WHERE oid = {self.literal(self.gate)}::regclass"

    def add_keys(self, select: str) -> str:
        return (
            "WITH added AS (INSERT INTO "
            f"{self.gate} (pipeline, tbl, k, ts_ms, seq, hash) {select} "
            "ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM added"
        )

    def create_typed(self, columns: list[str], types: dict[str, str]) -> list[str]:
        # One jsonb_populate_record per image: every column converted at once.
        return [
            self.temp_table_as(
                TYPED_TABLE,
                f"SELECT r.*, a.op AS {OP_COLUMN}, a.img::jsonb AS {IMAGE_COLUMN} FROM {ACC_TABLE} a CROSS JOIN "
                f"LATERAL jsonb_populate_record(NULL::{self.ident}, a.img::jsonb) r "
                "WHERE a.rk = 1",
            )
        ]


class PostgresSession(ServerSession):
    """One ADBC connection."""

    error = adbc_driver_manager.Error

    def __init__(self, url: str, target_id: str) -> None:
        super().__init__(target_id)
        self._url = url

    def connect(self) -> None:
        try:
            self._conn = adbc.connect(self._url)
        except adbc_driver_manager.Error as exc:
            self.close()
            raise TransientError(f"{self.id}: cannot connect: {postgres.first_line(exc)}") from exc

    def execute(self, statement: str, params: tuple[Any, ...] = ()) -> Rows:
        return postgres.query(self._require(), statement, params)

    def load(self, name: str, data: pa.Table) -> None:
        with self._require().cursor() as cur:
            cur.adbc_ingest(name, data, mode="replace", temporary=True)

    def failure(self, exc: Exception, *, committing: bool) -> ConnectorError:
        if getattr(exc, "sqlstate", None) in _RETRY_STATES:
            with contextlib.suppress(adbc_driver_manager.Error, TransientError):
                self._require().rollback()
            return TransientError(f"{self.id}: {postgres.first_line(exc)}")
        if not postgres.alive(self._conn):
            self.close()
            return TransientError(f"{self.id}: connection lost: {postgres.first_line(exc)}")
        return ConnectorError(f"{self.id}: {postgres.first_line(exc)}")


class PostgresCdcTarget(SqlCdcTarget):
    """CDC into one Postgres table, one transaction per batch (the registry's entry point)."""

    def __init__(
        self, spec: PostgresTargetSpec, ctx: Context, index: int, cdc: CdcSpec, *, count: bool
    ) -> None:
        schema = spec.table.schema or "public"
        target_id = f"postgres:{schema}.{spec.table.name}"
        check_cdc_mode(target_id, spec.mode)
        super().__init__(
            target_id,
            PostgresDialect(schema, spec.table.name),
            PostgresSession(spec.url, target_id),
            cdc,
            ctx,
            spec.table.primary_key,
            count=count,
        )
