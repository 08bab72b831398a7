"""Load a ``[transform.lookups]`` table from PostgreSQL (ADBC, straight to Arrow)."""

from __future__ import annotations

import pyarrow as pa

from sluice.connectors.postgres.spec import PostgresLookup
from sluice.connectors.sql.lookup import qualified


def load(spec: PostgresLookup) -> pa.Table:
    """The whole table; driver errors propagate (the engine wraps them)."""
    from sluice.connectors.postgres.driver import adbc

    with adbc.connect(spec.url) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT * FROM {qualified(spec.schema, spec.table)}")
        table: pa.Table = cur.fetch_arrow_table()
        return table
