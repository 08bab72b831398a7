"""Load a ``[transform.lookups]`` table from MySQL / MariaDB."""

from __future__ import annotations

import pyarrow as pa

from sluice.connectors.mysql.spec import MySQLLookup


def load(spec: MySQLLookup) -> pa.Table:
    """The whole table, typed from the column metadata."""
    from sluice.connectors.mysql import target as mysql

    return mysql.load_table(spec.url, spec.schema, spec.table)
