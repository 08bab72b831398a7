"""CDC into a Postgres table (see :mod:`sluice.connectors.sql.cdc` for the steps).

The events are staged by ADBC's binary COPY; each image is converted with
``jsonb_populate_record(NULL::<table>, image)``, which gives every key to the
column's own input function (the coercion an ``INSERT`` of the value would
do: ``"2024-01-02T03:04:05Z"`` into ``timestamptz``, ``1.5`` into
``numeric``, an object into ``jsonb``). The gate table is
``<schema>._sluice_cdc_gate``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import adbc_driver_manager
import pyarrow as pa

from sluice.config.spec import CdcSpec
from sluice.connectors.postgres import target as postgres
from sluice.connectors.postgres.spec import PostgresTarget as PostgresTargetSpec
from sluice.connectors.registry import Context
from sluice.connectors.sql.cdc import (
    ACC_TABLE,
    EV_TABLE,
    IMAGE_COLUMN,
    OP_COLUMN,
    TYPED_TABLE,
    SchemaQualified,
    SqlCdcTarget,
)
from sluice.connectors.sql.types import pg_type
from sluice.errors import ConnectorError, TransientError

#: New gate keys that trigger an ANALYZE of the gate table (see add_keys).
_ANALYZE_AFTER_KEYS = 1000
#: SQLSTATEs that a retry of the batch resolves: deadlock, serialization failure.
_RETRY_STATES = frozenset({"40P01", "40001"})


class PostgresCdcTarget(SchemaQualified, SqlCdcTarget, postgres.PostgresTarget):
    """CDC into one Postgres table, one transaction per batch.

    Connection handling and failure classification are the Postgres
    target's: a connection that no longer answers is a
    :class:`~sluice.errors.TransientError` (the engine reconnects and retries
    the batch), anything else a :class:`~sluice.errors.ConnectorError`.
    """

    def __init__(
        self, spec: PostgresTargetSpec, ctx: Context, index: int, cdc: CdcSpec, *, count: bool
    ) -> None:
        postgres.PostgresTarget.__init__(self, spec, ctx, index)
        SqlCdcTarget.__init__(self, cdc, ctx, spec.table.primary_key, count=count)
        self._gate_keys = 0  # keys in the gate when it was last analyzed (about)
        self._new_keys = 0  # keys added since

    def open(self) -> None:
        """Connect, reflect the table and its key, create the gate table."""
        postgres.PostgresTarget.open(self)
        try:
            self.run(f"CREATE SCHEMA IF NOT EXISTS {self.q(self.schema)}")
            self.prepare()
            rows = self.run(
                f"SELECT reltuples::bigint FROM pg_class WHERE oid = {self.literal(self.gate)}::regclass"
            )
            self._gate_keys = max(0, int(rows[0][0])) if rows else 0
            self._new_keys = 0
        except adbc_driver_manager.Error as exc:
            self._fail(exc)

    def run(self, statement: str) -> list[tuple[Any, ...]]:
        return self._query(statement)

    def commit(self) -> None:
        self._require().commit()

    def reflect(self) -> tuple[dict[str, str] | None, list[str]]:
        declared, self._key = self._key, []
        try:
            self._reflect()
            return (dict(self._columns) if self._columns is not None else None), list(self._key)
        finally:
            self._key = declared

    def stage(self, events: pa.Table) -> None:
        with self._require().cursor() as cur:
            cur.adbc_ingest(EV_TABLE, events, mode="replace", temporary=True)

    def add_keys(self, select: str) -> None:
        # The gate joins are planned from the gate table's statistics; a gate
        # that grew since autovacuum last analyzed it (a new pipeline grows by
        # thousands of keys a second) would get nested loops over the whole
        # scope. So analyze it once it grew by a fifth (at least 1000 keys).
        rows = self.run(
            "WITH added AS (INSERT INTO "
            f"{self.gate} (pipeline, tbl, k, ts_ms, seq, hash) {select} "
            "ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM added"
        )
        self._new_keys += int(rows[0][0]) if rows else 0
        if self._new_keys >= max(_ANALYZE_AFTER_KEYS, self._gate_keys // 5):
            self.run(f"ANALYZE {self.gate}")
            self._gate_keys += self._new_keys
            self._new_keys = 0

    def analyze(self, name: str) -> None:
        # Autovacuum never analyzes temporary tables; without statistics the
        # gate joins run as nested loops (20x slower at 3k events).
        self.run(f"ANALYZE {name}")

    def sql_type(self, t: pa.DataType, *, key: bool = False) -> str:
        return pg_type(t)

    def typed(self, column: str, image: str) -> str:
        return f"(jsonb_populate_record(NULL::{self.ident}, {image})).{self.q(column)}"

    def present(self, column: str, image: str) -> str:
        return f"({image} ? {self.literal(column)})"

    def now(self) -> str:
        return "now()"

    def temp_table_as(self, name: str, select: str) -> str:
        return f"CREATE TEMP TABLE {name} ON COMMIT DROP AS {select}"

    def gate_ddl(self) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {self.gate} (pipeline text NOT NULL, "
            "tbl text NOT NULL, k text NOT NULL, ts_ms bigint NOT NULL, "
            "seq bigint NOT NULL, hash bigint NOT NULL, PRIMARY KEY (pipeline, tbl, k))"
        )

    def create_typed(self, columns: list[str]) -> None:
        # One jsonb_populate_record per image: every column converted at once.
        self.run(
            self.temp_table_as(
                TYPED_TABLE,
                f"SELECT r.*, a.op AS {OP_COLUMN}, a.img::jsonb AS {IMAGE_COLUMN} FROM {ACC_TABLE} a CROSS JOIN "
                f"LATERAL jsonb_populate_record(NULL::{self.ident}, a.img::jsonb) r "
                "WHERE a.rk = 1",
            )
        )

    def _driver_error(self) -> type[Exception]:
        return adbc_driver_manager.Error

    def _rollback(self) -> None:
        with contextlib.suppress(adbc_driver_manager.Error, ConnectorError):
            self._require().rollback()

    def _failed(self, exc: Exception) -> None:
        self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        """A deadlock or a serialization failure is worth a retry (two owners of a
        key during a rebalance); otherwise as the Postgres target classifies it."""
        if getattr(exc, "sqlstate", None) in _RETRY_STATES:
            with contextlib.suppress(adbc_driver_manager.Error, TransientError):
                self._require().rollback()
            raise TransientError(f"{self.id}: {postgres._first_line(exc)}") from exc
        postgres.PostgresTarget._fail(self, exc)

    def flush(self) -> None:
        """Commit, then count."""
        postgres.PostgresTarget.flush(self)
        self.done()


def build_target(
    spec: PostgresTargetSpec, ctx: Context, index: int, cdc: CdcSpec, *, count: bool = True
) -> PostgresCdcTarget:
    """A CDC target for ``spec``."""
    return PostgresCdcTarget(spec, ctx, index, cdc, count=count)
