"""PostgreSQL: a COPY target (append / truncate / merge / scd2), CDC apply, lookups, dead letters."""

from __future__ import annotations

from typing import Any

from sluice.connectors.descriptor import Capabilities, Connector, DeadLetters, url_rule
from sluice.connectors.postgres.spec import PostgresLookup, PostgresTarget
from sluice.connectors.sql.mode_rules import mode_rules

_URL = url_rule("url", ("postgres://", "postgresql://"))

#: The table that receives dead letters when the file names only ``table``.
DEAD_LETTER_TABLE = "sluice_dead_letters"


def _default_dead_letters(spec: Any) -> str:
    """``<schema>.sluice_dead_letters`` in the target's (or state store's) schema."""
    schema = spec.table.schema if isinstance(spec, PostgresTarget) else spec.schema
    return f"{schema or 'public'}.{DEAD_LETTER_TABLE}"


CONNECTOR = Connector(
    name="postgres",
    extra="postgres",
    targets=(PostgresTarget,),
    lookups=(PostgresLookup,),
    capabilities=Capabilities(
        table=True,
        merge=True,
        cdc=True,
        transactional_positions=True,
        lookup=True,
        dead_letters=True,
    ),
    target="sluice.connectors.postgres.target:build_target",
    cdc_target="sluice.connectors.postgres.cdc:PostgresCdcTarget",
    lookup="sluice.connectors.postgres.lookup:load",
    dead_letters=DeadLetters(
        word="table",
        role="target",
        destination="SCHEMA.TABLE",
        pattern=r"[A-Za-z_][\w]*\.[A-Za-z_][\w]*",
        sink="sluice.connectors.postgres.dlq:build_sink",
        default=_default_dead_letters,
    ),
    target_rules=(_URL, mode_rules),
    lookup_rules=(_URL,),
)
