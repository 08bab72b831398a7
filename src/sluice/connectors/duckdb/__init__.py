"""DuckDB: an Arrow-scan target (append / truncate / merge / scd2), CDC apply, lookups."""

from __future__ import annotations

from sluice.connectors.descriptor import Capabilities, Connector
from sluice.connectors.duckdb.spec import DuckDBLookup, DuckDBTarget
from sluice.connectors.sql.mode_rules import mode_rules

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
    target_rules=(mode_rules,),
    target="sluice.connectors.duckdb.target:build_target",
    cdc_target="sluice.connectors.duckdb.cdc:DuckDBCdcTarget",
    lookup="sluice.connectors.duckdb.lookup:load",
)
