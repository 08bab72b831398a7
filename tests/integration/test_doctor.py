"""``flow doctor`` against the real broker and Postgres, and against ones that are down."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests import endpoints
from tests.integration.conftest import free_port, unique

pytestmark = pytest.mark.integration

SECRET = "SECRET"


def config(topic: str, table: str, lookup: str, *, kafka: str, pg_url: str, store_url: str) -> str:
    return f"""
pipeline_name = "{unique("doctor")}"
source_query = "{topic}"

[source]
kind = "kafka"
bootstrap_servers = "{kafka}"

[target]
kind = "postgres"
url = "{pg_url}"
[target.table]
name = "{table}"

[transform]
sql = "SELECT s.*, r.name FROM source s LEFT JOIN regions r ON s.region = r.id"
[transform.lookups.regions]
kind = "postgres"
url = "{pg_url}"
table = "{lookup}"

[state_store]
kind = "postgres"
url = "{store_url}"
schema = "{unique("doctor_state")}"
"""


def doctor(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice", "doctor", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def with_password(url: str) -> str:
    """The test Postgres trusts every password: put a secret in the URL to see it is masked."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@")


def test_doctor_says_what_works(
    tmp_path: Path, kafka_topic: Callable[..., str], pg: psycopg.Connection[Any]
) -> None:
    topic = kafka_topic(partitions=2, prefix="doctor")
    lookup = unique("doctor_regions")
    pg.execute(f"CREATE TABLE {lookup} (id int PRIMARY KEY, name text)")
    pg.execute(f"INSERT INTO {lookup} VALUES (1, 'north'), (2, 'south')")
    url = with_password(endpoints.POSTGRES_URL)
    path = tmp_path / "pipeline.toml"
    path.write_text(
        config(
            topic,
            unique("doctor_out"),
            lookup,
            kafka=endpoints.KAFKA_BOOTSTRAP,
            pg_url=url,
            store_url=url,
        )
    )
    done = doctor(path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        f"ok   source kafka '{topic}'",
        "ok   target postgres '" + lines[1].split("'")[1] + "'",
        "ok   lookup postgres 'regions'",
        "ok   state_store postgres",
    ]
    assert "2 partition(s)" in lines[0]
    assert "loaded 2 row(s)" in lines[2]
    assert SECRET not in done.stdout + done.stderr


def test_doctor_names_what_is_down(tmp_path: Path) -> None:
    down_kafka = f"127.0.0.1:{free_port()}"
    down_pg = with_password(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    path = tmp_path / "pipeline.toml"
    path.write_text(
        config(
            unique("nope"),
            unique("doctor_out"),
            unique("nope"),
            kafka=down_kafka,
            pg_url=down_pg,
            store_url=with_password(endpoints.POSTGRES_URL),
        )
    )
    done = doctor(path, "--timeout-secs", "3")
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("FAIL source kafka") and down_kafka in lines[0]
    assert lines[1].startswith("FAIL target postgres") and "refused" in lines[1].lower()
    assert lines[2].startswith("FAIL lookup postgres 'regions'")
    assert lines[3] == "ok   state_store postgres: opened (schema migrated)"
    assert done.stderr.strip() == "flow doctor: 3 of 4 check(s) failed"
    assert "Traceback" not in done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_doctor_reports_a_missing_topic(tmp_path: Path) -> None:
    missing = unique("never_created")
    url = endpoints.POSTGRES_URL
    path = tmp_path / "pipeline.toml"
    path.write_text(
        config(
            missing,
            unique("doctor_out"),
            "pg_am",  # any readable table
            kafka=endpoints.KAFKA_BOOTSTRAP,
            pg_url=url,
            store_url=url,
        ).replace('table = "pg_am"', 'table = "pg_am"\nschema = "pg_catalog"')
    )
    done = doctor(path)
    assert done.returncode == 1
    first = done.stdout.splitlines()[0]
    assert first == (
        f"FAIL source kafka '{missing}': brokers {endpoints.KAFKA_BOOTSTRAP} answer, "
        f"but topic(s) {missing} do not exist"
    )
