"""MySQL / MariaDB: a LOAD DATA target (append / truncate / merge / scd2), CDC apply, lookups."""

from __future__ import annotations

from sluice.connectors.descriptor import Capabilities, Connector, url_rule
from sluice.connectors.mysql.spec import MySQLLookup, MySQLTarget
from sluice.connectors.sql.mode_rules import mode_rules

_URL = url_rule("url", ("mysql://", "mariadb://"))

CONNECTOR = Connector(
    name="mysql",
    extra="mysql",
    targets=(MySQLTarget,),
    lookups=(MySQLLookup,),
    capabilities=Capabilities(
        table=True,
        merge=True,
        cdc=True,
        transactional_positions=True,
        lookup=True,
    ),
    target="sluice.connectors.mysql.target:build_target",
    cdc_target="sluice.connectors.mysql.cdc:MySQLCdcTarget",
    lookup="sluice.connectors.mysql.lookup:load",
    target_rules=(_URL, mode_rules),
    lookup_rules=(_URL,),
)
