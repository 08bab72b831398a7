"""The run loop with in-memory connectors: order of write, flush and commit."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pyarrow as pa
import pytest

from sluice.config import load_text
from sluice.connectors.api import Batch, Position
from sluice.engine.runner import Runner, RunOptions
from sluice.errors import ConnectorError, DecodeError, TransientError

SPEC = load_text(
    """
pipeline_name = "unit"
source_query = "mem"
idle_pause_ms = 1
[source]
kind = "kafka"
bootstrap_servers = "unused:1"
max_batch_wait_ms = 1
[[targets]]
kind = "sqlite"
path = ":memory:"
[targets.table]
name = "a"
[[targets]]
kind = "sqlite"
path = ":memory:"
[targets.table]
name = "b"
"""
)


@dataclass
class MemSource:
    """Hands out pre-made batches; records commits (the journal is shared)."""

    batches: list[pa.Table]
    journal: list[str]
    id: str = "mem"
    committed: list[Position] = field(default_factory=list)
    connected: bool = True
    fail_at: int | None = None
    _next: int = 0

    def open(self, resume: Position | None) -> None:
        self.journal.append("source.open")

    def read(self, timeout_s: float) -> Batch | None:
        if self._next == self.fail_at:
            raise DecodeError("bad message at offset 7")
        if self._next >= len(self.batches):
            return None
        data = self.batches[self._next]
        self._next += 1
        self.journal.append(f"read {self._next}")
        return Batch(self.id, data, {"p:0": self._next})

    def commit(self, position: Position) -> None:
        self.journal.append(f"commit {position['p:0']}")
        self.committed.append(position)

    def close(self) -> None:
        self.journal.append("source.close")


@dataclass
class MemTarget:
    """Stages writes; flush makes them durable. Can fail transiently a few times."""

    id: str
    journal: list[str]
    transient_failures: int = 0
    fatal: bool = False
    durable: list[int] = field(default_factory=list)
    _pending: list[int] = field(default_factory=list)

    def open(self) -> None:
        self.journal.append(f"{self.id}.open")

    def write(self, data: pa.Table) -> None:
        if self.fatal:
            raise ConnectorError(f"{self.id}: column x does not exist")
        if self.transient_failures:
            self.transient_failures -= 1
            raise TransientError(f"{self.id}: connection refused")
        self._pending.extend(data["x"].to_pylist())
        self.journal.append(f"{self.id}.write")

    def flush(self) -> None:
        self.durable.extend(self._pending)
        self._pending.clear()
        self.journal.append(f"{self.id}.flush")

    def close(self) -> None:
        self._pending.clear()


def _run(source: MemSource, targets: list[MemTarget]) -> None:
    async def main() -> None:
        runner = Runner(
            SPEC,
            asyncio.Event(),
            RunOptions(stop_after_idle_ms=0),
            sources=[source],
            targets=list(targets),
        )
        await runner.run()

    asyncio.run(main())


def _tables(*sizes: int) -> list[pa.Table]:
    out, start = [], 0
    for n in sizes:
        out.append(pa.table({"x": list(range(start, start + n))}))
        start += n
    return out


def test_commit_follows_the_flush_of_every_target() -> None:
    journal: list[str] = []
    src = MemSource(_tables(3, 2), journal)
    a, b = MemTarget("a", journal), MemTarget("b", journal)
    _run(src, [a, b])
    body = [e for e in journal if not e.endswith(("open", "close", "read 2"))]
    assert body == [
        "read 1", "a.write", "a.flush", "b.write", "b.flush", "commit 1",
        "a.write", "a.flush", "b.write", "b.flush", "commit 2",
    ]  # fmt: skip
    # Batch 2 is read ahead while batch 1 is written, never after its own write.
    assert journal.index("read 2") < journal.index("commit 1")
    assert a.durable == b.durable == [0, 1, 2, 3, 4]


def test_read_ahead_keeps_at_most_two_batches_and_commits_in_order() -> None:
    journal: list[str] = []
    src = MemSource(_tables(1, 1, 1, 1), journal)
    _run(src, [MemTarget("a", journal)])
    reads = [e for e in journal if e.startswith(("read", "commit"))]
    for k in range(1, 4):
        # read k+2 never starts before batch k is committed
        if f"read {k + 2}" in reads:
            assert reads.index(f"read {k + 2}") > reads.index(f"commit {k}")
    assert [e for e in reads if e.startswith("commit")] == [f"commit {k}" for k in range(1, 5)]


def test_a_transient_failure_retries_the_same_batch_without_committing_early() -> None:
    journal: list[str] = []
    src = MemSource(_tables(2), journal)
    a, b = MemTarget("a", journal), MemTarget("b", journal, transient_failures=2)
    _run(src, [a, b])
    assert b.durable == [0, 1]
    # a flushed once and was not written again: a retry of b duplicates nothing in a.
    assert a.durable == [0, 1]
    assert journal.index("commit 1") > journal.index("b.flush")
    assert journal.count("b.open") == 3  # reconnected after each failure


def test_a_reconnect_that_fails_is_retried_before_the_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sluice.engine.retry.FIRST_WAIT_S", 0.001)

    @dataclass
    class Flaky(MemTarget):
        open_failures: int = 0

        def open(self) -> None:
            super().open()
            if self.journal.count(f"{self.id}.open") > 1 and self.open_failures:
                self.open_failures -= 1
                raise TransientError(f"{self.id}: still down")

    journal: list[str] = []
    src = MemSource(_tables(2), journal)
    target = Flaky("a", journal, transient_failures=1, open_failures=2)
    _run(src, [target])
    assert target.durable == [0, 1]
    assert journal.count("a.open") == 4  # start, two failed reconnects, one that worked
    assert src.committed == [{"p:0": 1}]


def test_a_fatal_target_error_stops_without_committing() -> None:
    journal: list[str] = []
    src = MemSource(_tables(2), journal)
    with pytest.raises(ConnectorError, match="column x"):
        _run(src, [MemTarget("a", journal, fatal=True)])
    assert src.committed == []
    assert "source.close" in journal


def test_a_decode_error_surfaces_and_earlier_batches_stay_committed() -> None:
    journal: list[str] = []
    src = MemSource(_tables(2, 2), journal, fail_at=1)
    with pytest.raises(DecodeError, match="offset 7"):
        _run(src, [MemTarget("a", journal)])
    assert src.committed == [{"p:0": 1}]


def test_a_stop_request_finishes_the_batch_in_flight() -> None:
    journal: list[str] = []

    class StopAfterFirst(MemTarget):
        def flush(self) -> None:
            super().flush()
            stop.set()

    stop = asyncio.Event()
    src = MemSource(_tables(1, 1, 1), journal)
    target = StopAfterFirst("a", journal)

    async def main() -> None:
        await Runner(SPEC, stop, RunOptions(), sources=[src], targets=[target]).run()

    asyncio.run(main())
    assert src.committed == [{"p:0": 1}]
    assert target.durable == [0]
