"""DuckDB: an Arrow-scan target (append / merge), CDC apply, lookups."""

from __future__ import annotations

from sluice.connectors.descriptor import Capabilities, Connector
from sluice.connectors.duckdb.spec import DuckDBLookup, DuckDBTarget

CONNECTOR = Connector(
    name="duckdb",
    extra="duckdb",
    targets=(DuckDBTarget,),
    lookups=(DuckDBLookup,),
    capabilities=Capabilities(
        table=True,
        merge=True,
        cdc=True,
        transactional_positions=True,
        lookup=True,
    ),
    target="sluice.connectors.duckdb.target:build_target",
    cdc_target="sluice.connectors.duckdb.cdc:DuckDBCdcTarget",
    lookup="sluice.connectors.duckdb.lookup:load",
)
