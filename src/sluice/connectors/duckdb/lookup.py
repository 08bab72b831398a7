"""Load a ``[transform.lookups]`` table from DuckDB (read-only)."""

from __future__ import annotations

import pyarrow as pa

from sluice.connectors.duckdb.spec import DuckDBLookup
from sluice.connectors.sql.lookup import qualified
from sluice.errors import ConnectorError


def load(spec: DuckDBLookup) -> pa.Table:
    """The whole table, read-only, by Arrow export."""
    import duckdb

    conn = duckdb.connect(spec.path, read_only=True)
    try:
        table: pa.Table = conn.sql(
            f"SELECT * FROM {qualified(spec.schema, spec.table)}"
        ).to_arrow_table()
        return table
    except duckdb.Error as exc:
        raise ConnectorError(f"duckdb lookup {spec.path}: {exc}") from exc
    finally:
        conn.close()
