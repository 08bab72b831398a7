"""A connector kind from outside sluice: one folder + one registration.

The echo connector (``tests/fixtures/connectors/echo/``) is registered with
one call; then a pipeline using it validates (its own cross-rule and the
nearest-key suggestion on its spec), plans, and runs end to end into SQLite
through the same entry point ``flow consume`` uses.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fixtures.connectors.echo import CONNECTOR as ECHO

import sluice
from sluice.config import load_text
from sluice.connectors import kafka, registry
from sluice.engine.plan import build_plan
from sluice.errors import ConfigError, SluiceError


@pytest.fixture
def echo() -> Iterator[None]:
    registry.register(ECHO)
    try:
        yield
    finally:
        registry.unregister(ECHO)


def pipeline(db: Path, source: str) -> str:
    return f"""
pipeline_name = "echo_to_sqlite"
source_query = "greetings"

[source]
kind = "echo"
{source}

[target]
kind = "sqlite"
path = "{db}"
mode = "merge"
table = {{ name = "greetings", primary_key = ["id"] }}
"""


ECHO_SOURCE = """url = "echo://one"
timestamp_ms = 1700000000000
messages = ['{"id": 1, "word": "hello"}', '{"id": 2, "word": "world"}', '{"id": 1, "word": "hi"}']
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(text, "p.toml")
    return [f"{p.path}: {p.message}" for p in info.value.problems]


def test_an_unregistered_kind_is_unknown(tmp_path: Path) -> None:
    (got,) = problems(pipeline(tmp_path / "out.db", ECHO_SOURCE))
    assert got.startswith("source.kind: unknown kind 'echo'")


@pytest.mark.usefixtures("echo")
def test_a_registered_kind_validates_with_its_own_rules_and_suggestions(tmp_path: Path) -> None:
    spec = load_text(pipeline(tmp_path / "out.db", ECHO_SOURCE))
    (source,) = spec.all_sources
    assert isinstance(source, ECHO.sources[0])
    assert registry.of(source) is ECHO

    typo = ECHO_SOURCE.replace("timestamp_ms", "timestamp_sm")
    assert problems(pipeline(tmp_path / "out.db", typo)) == [
        "source.timestamp_sm: unknown key for kind 'echo'; did you mean 'timestamp_ms'?"
    ]
    bad_url = ECHO_SOURCE.replace("echo://one", "http://one")
    assert problems(pipeline(tmp_path / "out.db", bad_url)) == [
        'source.url: expected a echo:// URL, got "http://one"'
    ]


@pytest.mark.usefixtures("echo")
def test_a_registered_kind_plans(tmp_path: Path) -> None:
    plan = build_plan(load_text(pipeline(tmp_path / "out.db", ECHO_SOURCE)))
    (source,) = plan.by_role("source")
    assert (source.kind, source.detail["query"], source.detail["url"]) == (
        "echo",
        "greetings",
        "echo://one",
    )
    assert [(e.src, e.dst) for e in plan.edges] == [("source:greetings", "target:0")]


@pytest.mark.usefixtures("echo")
def test_a_registered_kind_runs_end_to_end(tmp_path: Path) -> None:
    db = tmp_path / "out.db"
    config = tmp_path / "echo.toml"
    config.write_text(pipeline(db, ECHO_SOURCE))
    assert sluice.run_pipeline(config, stop_after_idle_ms=300) == 0
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, word, _event_ts FROM greetings ORDER BY id").fetchall()
    assert [(i, w) for i, w, _ in rows] == [(1, "hi"), (2, "world")]  # merge: last row wins
    assert all(ts.startswith("2023-11-14 22:13:20") for _, _, ts in rows)


def test_a_kind_cannot_be_registered_twice() -> None:
    with pytest.raises(SluiceError, match="source kind 'kafka' is already registered"):
        registry.register(kafka.CONNECTOR)
