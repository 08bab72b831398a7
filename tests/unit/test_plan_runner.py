"""The run loop executes the graph ``flow plan`` prints: every edge the runner
wires (sources → stages → targets, dead letters, a window's late rows) is an
edge of the plan, for every example pipeline and for window / join / dead-letter
variants of them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow as pa
import pytest

from sluice.config import PipelineSpec, load_file, load_text
from sluice.connectors.api import Batch, Position
from sluice.engine.plan import build_plan
from sluice.engine.runner import Runner
from sluice.state import InMemoryStore

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))

KAFKA = 'kind = "kafka"\nbootstrap_servers = "127.0.0.1:19092"\n'
PG = 'kind = "postgres"\nurl = "postgresql://postgres@127.0.0.1:55432/postgres"\n'
TARGET = f'[target]\n{PG}[target.table]\nname = "out"\n'
WINDOW = """
[transform.window]
kind = "tumbling"
duration_ms = 60000
group_by = ["user"]
{late}
[[transform.window.aggregations]]
agg = "count"
as = "n"
"""
JOIN = """
[[sources]]
query = "orders"
{kafka}
[[sources]]
query = "payments"
{kafka}
[transform.join]
kind = "left_outer"
left_source = "orders"
right_source = "payments"
left_keys = ["order_id"]
right_keys = ["order_id"]
time_window_ms = 300000
[state_store]
{pg}"""

VARIANTS = {
    "window": f'pipeline_name = "w"\nsource_query = "events"\n[source]\n{KAFKA}{TARGET}'
    + WINDOW.format(late=""),
    "window-late-dlq": f'pipeline_name = "w"\nsource_query = "events"\ndlq_store = "auto"\n'
    f"[source]\n{KAFKA}{TARGET}" + WINDOW.format(late='late_data = "dlq"'),
    "sql-window-two-sources": 'pipeline_name = "w2"\n'
    f'[[sources]]\nquery = "a"\n{KAFKA}[[sources]]\nquery = "b"\n{KAFKA}{TARGET}'
    '[transform]\nsql = "SELECT * FROM source"\n' + WINDOW.format(late=""),
    "join": 'pipeline_name = "j"\n' + JOIN.format(kafka=KAFKA, pg=PG) + TARGET,
    "sql-dlq": f'pipeline_name = "d"\nsource_query = "events"\ndlq_store = "auto"\n'
    f'[source]\n{KAFKA}{TARGET}[transform]\nsql = "SELECT * FROM source"\non_error = "dlq"\n',
    "dlq-fan-out": f'pipeline_name = "f"\nsource_query = "events"\ndlq_store = "auto"\n'
    f'[source]\n{KAFKA}[[targets]]\n{PG}[targets.table]\nname = "a"\n'
    f'[[targets]]\n{PG}[targets.table]\nname = "b"\n[transform]\non_error = "dlq"\n',
}


class _Source:
    """Stands in for a connector: the runner only wires it here, never reads it."""

    def __init__(self, source_id: str) -> None:
        self.id = source_id

    def open(self, resume: Position | None) -> None:
        raise AssertionError("not run")

    def read(self, timeout_s: float) -> Batch | None:
        raise AssertionError("not run")

    def commit(self, ack: object) -> None:
        raise AssertionError("not run")

    def close(self) -> None:
        pass


class _Target:
    def __init__(self, target_id: str) -> None:
        self.id = target_id

    def open(self) -> None:
        raise AssertionError("not run")

    def write(self, data: pa.Table) -> None:
        raise AssertionError("not run")

    def flush(self) -> None:
        raise AssertionError("not run")

    def close(self) -> None:
        pass


def _runner(spec: PipelineSpec) -> Runner:
    return Runner(
        spec,
        asyncio.Event(),
        sources=[_Source(spec.query_of(s)) for s in spec.all_sources],
        targets=[_Target(f"t{i}") for i, _ in enumerate(spec.all_targets)],
        store=InMemoryStore() if spec.state_store is not None else None,
    )


def _check(spec: PipelineSpec) -> list[tuple[str, str]]:
    wired = _runner(spec).edges()
    planned = {(e.src, e.dst) for e in build_plan(spec).edges}
    assert wired, "the runner wired nothing"
    missing = [e for e in wired if e not in planned]
    assert not missing, f"wired but not in the plan: {missing}; plan: {sorted(planned)}"
    return wired


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_edge_the_runner_wires_is_in_the_plan(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path))
    _check(load_file(path))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_edge_of_a_variant_is_in_the_plan(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path))
    _check(load_text(VARIANTS[name]))


def test_the_runner_wires_the_late_rows_and_the_failures_to_the_dead_letters() -> None:
    late = _runner(load_text(VARIANTS["window-late-dlq"])).edges()
    assert ("source:events", "stage:window") in late
    assert ("stage:window", "dlq") in late
    assert ("stage:window", "target:0") in late
    failed = _runner(load_text(VARIANTS["sql-dlq"])).edges()
    assert {("source:events", "dlq"), ("stage:sql", "dlq"), ("stage:sql", "target:0")} <= set(
        failed
    )
    assert ("source:events", "stage:sql") in failed
    join = _runner(load_text(VARIANTS["join"])).edges()
    assert {("source:orders", "stage:join"), ("source:payments", "stage:join")} <= set(join)
