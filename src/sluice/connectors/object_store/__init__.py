"""Object stores (local folders and S3): a new-files source streaming each file
in bounded batches, and a file target committing each flush with a manifest
that holds the source positions."""

from __future__ import annotations

from typing import Any

from sluice.connectors.descriptor import Add, Capabilities, Connector
from sluice.connectors.object_store.encode import csv_chars_problem
from sluice.connectors.object_store.spec import (
    ObjectStoreLocalSource,
    ObjectStoreLocalTarget,
    ObjectStoreS3Source,
    ObjectStoreS3Target,
)


def _csv_options(at: str, target: dict[str, Any], add: Add) -> None:
    """The CSV write options must make a file a reader can split back."""
    keys = ("csv_delimiter", "csv_quote", "csv_escape", "csv_null_value")
    values = [target.get(k) for k in keys]
    if not all(v is None or isinstance(v, str) for v in values):
        return  # a type error, reported by the spec
    problem = csv_chars_problem(*values)
    if problem is not None:
        add((f"{at}.{problem[0]}", problem[1]))


CONNECTOR = Connector(
    name="object_store",
    extra="aws",
    sources=(ObjectStoreLocalSource, ObjectStoreS3Source),
    targets=(ObjectStoreLocalTarget, ObjectStoreS3Target),
    # Source: positions are per file (byte / record offset), a reopened source
    # resumes mid-file. Target: positions commit in the flush's manifest.
    capabilities=Capabilities(seekable=True, transactional_positions=True),
    target_rules=(_csv_options,),
    source="sluice.connectors.object_store.source:build_source",
    target="sluice.connectors.object_store.target:build_target",
)
