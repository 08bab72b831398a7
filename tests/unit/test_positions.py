"""Source positions kept in SQL targets: the bookkeeping (resume from the
lowest, a fan-out target ahead skips what it holds) and the SQLite / DuckDB
positions tables, without services."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from sluice.config.load import load_text
from sluice.connectors import registry
from sluice.connectors.api import Batch, Position, RawRecord
from sluice.connectors.sql.positions import RecordsPositions, ahead, lowest
from sluice.engine import commit
from sluice.engine.retry import Retry
from sluice.engine.watermark import Watermarks


def test_sources_resume_from_the_lowest_position_any_target_holds() -> None:
    a = {"s": {"t:0": 10, "t:1": 40}}
    b = {"s": {"t:0": 25, "t:2": 7}}
    assert lowest([a, b]) == {"s": {"t:0": 10, "t:1": 40, "t:2": 7}}
    assert lowest([]) == {}


def test_positions_of_different_types_are_left_to_the_source() -> None:
    assert lowest([{"s": {"p": 3}}, {"s": {"p": "file-9"}}]) == {}


def test_a_target_is_ahead_only_where_it_holds_more_than_the_resume_point() -> None:
    resume = {"s": {"t:0": 10, "t:1": 40}}
    assert ahead({"s": {"t:0": 25, "t:1": 40}}, resume) == {"s": {"t:0": 25}}
    assert ahead({"s": {"t:0": 10}}, resume) == {}


@dataclass
class _Raw:
    partition: str
    start: int
    n: int

    def __len__(self) -> int:
        return self.n

    def record(self, index: int) -> RawRecord:
        return RawRecord(self.partition, self.start + index, None, None, None)

    def where(self, index: int) -> str:
        return str(self.start + index)

    def span(self) -> str:
        return f"{self.start}-{self.start + self.n - 1}"


def _batch(start: int, n: int) -> Batch:
    data = pa.table({"id": pa.array(range(start, start + n), pa.int64())})
    return Batch(
        "s", data, {"t:0": start + n}, position={"t:0": start + n}, raw=_Raw("t:0", start, n)
    )


@dataclass
class _Recording:
    """A target double that records positions in its 'transaction'."""

    id: str
    holds: dict[str, Position]
    staged: list[Mapping[str, Position]] = field(default_factory=list)
    flushes: int = 0

    def open(self) -> None:
        pass

    def write(self, data: pa.Table) -> None:
        pass

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        pass

    def held_positions(self) -> dict[str, Position]:
        return self.holds

    def stage_positions(
        self, positions: Mapping[str, Position], also: Callable[[Any], None] | None = None
    ) -> None:
        self.staged.append(positions)

    @property
    def database(self) -> str | None:
        return None


class _Seekable:
    id = "s"

    def open(self, resume: Position | None) -> None:
        pass

    def read(self, timeout_s: float) -> Batch | None:
        return None

    def commit(self, ack: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def rewind(self, position: Position | None) -> None:
        pass


def _policy(*targets: _Recording) -> commit.CommitPolicy:
    assert all(isinstance(t, RecordsPositions) for t in targets)
    return commit.choose(
        "p",
        [_Seekable()],  # type: ignore[list-item]  # a minimal seekable source
        None,
        Watermarks(["s"], lateness_ms=0, idle_after_ms=1000),
        Retry("p", asyncio.Event()),
        None,
        1000,
        None,
        list(targets),  # type: ignore[arg-type]
    )


def test_a_fan_out_resumes_from_the_lowest_and_the_target_ahead_skips_what_it_holds() -> None:
    behind = _Recording("a", {"s": {"t:0": 100}})
    front = _Recording("b", {"s": {"t:0": 150}})
    policy = _policy(behind, front)
    assert asyncio.run(policy.restore()) == {"s": {"t:0": 100}}
    first = _batch(100, 30)  # 100..129: all held by b
    assert policy.held_back("a", [first]) is None
    kept = policy.held_back("b", [first])
    assert kept is not None and kept[0].num_rows == 0
    straddling = _batch(130, 40)  # 130..169: b holds 130..149
    kept = policy.held_back("b", [straddling])
    assert kept is not None
    assert kept[0].data["id"].to_pylist() == list(range(150, 170))
    # b has read past its position: from now on it takes everything
    assert policy.held_back("b", [_batch(170, 10)]) is None


def test_positions_are_staged_before_the_write_and_a_round_without_rows_flushes_them() -> None:
    target = _Recording("a", {})
    policy = _policy(target)
    assert asyncio.run(policy.restore()) == {}
    b = _batch(0, 5)
    policy.before_write([b], True)
    assert target.staged == [{"s": {"t:0": 5}}]
    policy.on_batch([b], [None])
    asyncio.run(policy.commit(emitted=True))
    assert target.flushes == 0  # the runner's write flushed them with the rows
    c = _batch(5, 5)
    policy.before_write([c], False)  # e.g. a filter dropped every row
    policy.on_batch([c], [None])
    asyncio.run(policy.commit(emitted=False))
    assert target.flushes == 1


@pytest.mark.parametrize("kind", ["sqlite", "duckdb"])
def test_an_embedded_target_keeps_positions_with_its_rows(kind: str, tmp_path: Path) -> None:
    spec = load_text(
        f"""
pipeline_name = "p"
source_query = "events"
[source]
kind = "kafka"
bootstrap_servers = "127.0.0.1:1"
[target]
kind = "{kind}"
path = "{tmp_path / ("db." + kind)}"
[target.table]
name = "events"
""",
        "<test>",
    )
    assert registry.of(spec.all_targets[0]).capabilities.transactional_positions

    def build() -> Any:
        return registry.build_target(spec.all_targets[0], registry.Context(spec), 0)

    target = build()
    target.open()
    assert target.held_positions() == {}
    target.stage_positions({"events": {"events:0": 3, "events:1": 7}})
    target.write(pa.table({"id": [1, 2, 3]}))
    target.flush()
    target.stage_positions({"events": {"events:0": 5}})
    target.flush()  # positions alone
    target.stage_positions({"events": {"events:0": 9}})
    target.write(pa.table({"id": [4]}))
    target.close()  # never flushed: rolled back, rows and positions alike
    again = build()
    again.open()
    assert again.held_positions() == {"events": {"events:0": 5, "events:1": 7}}
    again.close()
