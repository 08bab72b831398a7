"""One process at a time consumes an on_message workflow's source: a second
one finds the lease held and skips (run-due) without opening the source."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pyarrow as pa
import pytest

import sluice
from sluice.jobs import clear, registry
from sluice.jobs.orchestrate import Orchestrator, Unit
from sluice.jobs.runlog import MemoryRunLog
from sluice.types import BigInt


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    clear()
    yield
    clear()


def test_a_held_lease_skips_the_workflow_and_run_due_ignores_it() -> None:
    @sluice.table(name="t_lease")
    class T:
        id: BigInt

    @sluice.job(name="j", target=T, target_connection="nowhere")
    def j() -> object:
        yield pa.record_batch({"id": [1]})

    # A broker nothing listens on: were the source opened, this would hang then fail.
    sluice.workflow("w", jobs=[j], on_message=sluice.Source("nowhere", query="t"))
    log = MemoryRunLog()
    first = Orchestrator(registry(), log, owner="a")
    second = Orchestrator(registry(), log, owner="b")
    unit = Unit("w", ["j"], None, [], "w")
    assert first._acquire(unit, None, dt.datetime.now(dt.UTC), 30) is not None
    assert second.consume("w", idle_timeout_s=0.2) == []
    assert second.run_due(60) == []  # never fired by ticks
    assert first.message_workflows() == ["w"]
