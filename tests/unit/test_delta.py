"""The plain Delta Lake target (append, merge) on a local table."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from sluice.config import load_text
from sluice.connectors.api import Target
from sluice.connectors.delta.target import location
from sluice.connectors.registry import Context, build_target
from sluice.errors import ConfigError, ConnectorError


def target(path: Path, mode: str = "append", key: str = "", extra: str = "") -> Target:
    spec = load_text(
        f"""
pipeline_name = "delta-unit"
source_query = "t"
[source]
kind = "kafka"
bootstrap_servers = "127.0.0.1:1"
[target]
kind = "delta_local"
path = "{path}"
mode = "{mode}"
{extra}
[target.table]
{key}
"""
    )
    assert spec.target is not None
    return build_target(spec.target, Context(spec), 0)


def rows(path: Path) -> list[dict[str, object]]:
    # DeltaTable.scan: a pyarrow dataset over deltalake aborts the process at exit.
    return sorted(pa.table(DeltaTable(str(path)).scan()).to_pylist(), key=lambda r: str(r["id"]))


def test_append_creates_the_table_and_adds_new_columns(tmp_path: Path) -> None:
    t = target(tmp_path / "t")
    t.open()
    t.write(pa.table({"id": [1, 2], "v": ["a", "b"]}))
    t.flush()
    t.write(pa.table({"id": [3], "v": ["c"], "w": [1.5]}))
    t.flush()
    t.flush()  # nothing pending: no commit
    assert rows(tmp_path / "t") == [
        {"id": 1, "v": "a", "w": None},
        {"id": 2, "v": "b", "w": None},
        {"id": 3, "v": "c", "w": 1.5},
    ]
    assert DeltaTable(str(tmp_path / "t")).version() == 1


def test_merge_upserts_on_the_key_and_the_last_row_of_a_batch_wins(tmp_path: Path) -> None:
    t = target(tmp_path / "m", "merge", 'primary_key = ["id"]')
    t.open()
    t.write(pa.table({"id": [1, 2], "v": ["a", "b"]}))
    t.flush()
    t.write(pa.table({"id": [2, 3, 2], "v": ["b1", "c", "b2"]}))
    t.flush()
    assert rows(tmp_path / "m") == [
        {"id": 1, "v": "a"},
        {"id": 2, "v": "b2"},
        {"id": 3, "v": "c"},
    ]


def test_a_key_column_the_table_lacks_fails_at_open_naming_it(tmp_path: Path) -> None:
    t = target(tmp_path / "k")
    t.open()
    t.write(pa.table({"id": [1]}))
    t.flush()
    with pytest.raises(ConnectorError, match=r"primary_key column\(s\) \['idd'\]"):
        target(tmp_path / "k", "merge", 'primary_key = ["idd"]').open()


def test_scd2_without_a_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='mode = "scd2" needs primary_key'):
        target(tmp_path / "x", "scd2")


def test_s3_location_and_options() -> None:
    spec = load_text(
        """
pipeline_name = "p"
source_query = "t"
[source]
kind = "kafka"
bootstrap_servers = "h:1"
[target]
kind = "delta_s3"
bucket = "lake"
prefix = "/mirror/customers/"
endpoint = "http://127.0.0.1:5000"
region = "us-east-1"
access_key_id = "test"
secret_access_key = "secret"
[target.table]
primary_key = ["id"]
"""
    )
    assert spec.target is not None
    uri, options = location(spec.target)  # type: ignore[arg-type]  # a delta_s3 spec, narrowed by the file
    assert uri == "s3://lake/mirror/customers"
    assert options == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:5000",
        "AWS_ALLOW_HTTP": "true",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "secret",
    }
