"""Source positions kept in a SQL target, in the transaction of its rows.

A target whose descriptor declares ``transactional_positions`` owns a table
``_sluice_positions`` beside its data table (Postgres: the target table's
schema; MySQL / MariaDB: its database; SQLite: ``main``; DuckDB: the target
table's schema)::

    pipeline text, target text, source text, partition text,
    position_int bigint, position_text text,
    PRIMARY KEY (pipeline, target, source, partition)

:meth:`Ledger.write` upserts the positions the commit policy staged
(:meth:`RecordsPositions.stage_positions`) on the target's connection, right
before the target commits its rows, so a row is in the table exactly when the
position past it is. On start the policy reads them back
(:meth:`RecordsPositions.held_positions`) and the sources resume there
(:func:`lowest`), each target skipping what it already holds (:func:`ahead`).

Each system differs only in its placeholders and its upsert; a :class:`Dialect`
says those. The bookkeeping is per partition (a few rows a flush), never per
data row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, runtime_checkable

from sluice.connectors.api import Position, Target
from sluice.errors import PositionsMoved

#: The name of the positions table in every target database.
TABLE = "_sluice_positions"

#: Runs one statement with parameters on the target's connection; its rows.
Run = Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]
#: Turns a driver error into sluice's (transient or not) and raises it.
Fail = Callable[[Any], NoReturn]


@runtime_checkable
class RecordsPositions(Target, Protocol):
    """A target that stores source positions in the transaction of its rows
    (descriptor capability ``transactional_positions``)."""

    def held_positions(self) -> dict[str, Position]:
        """Source id -> partition -> next record to read, as this target last
        committed them for this pipeline (empty when it holds none). Called
        after :meth:`open`."""

    def stage_positions(
        self, positions: Mapping[str, Position], also: Callable[[Any], None] | None = None
    ) -> None:
        """Record ``positions`` (merged per source and partition) in the next
        :meth:`flush`, in the transaction of its rows; a flush without rows
        commits them alone. ``also(connection)`` runs in that transaction too
        (a state store's checkpoint in the same database), once."""

    @property
    def database(self) -> str | None:
        """``kind://host:port/database`` of the connection (no credentials),
        to tell whether a state store shares it; ``None`` for files."""


@runtime_checkable
class DefersCommits(RecordsPositions, Protocol):
    """A target recording positions that may hold what :meth:`flush` took for a
    later commit (``flush_rows`` / ``flush_interval_ms``: fewer, larger
    commits). It defers only while the commit policy stages positions in it
    (the :class:`~sluice.engine.commit.Immediate` policy, which then holds
    the sources' acknowledgements back until the commit): rows and positions
    still commit together, and a crash re-reads what was deferred."""

    @property
    def deferred(self) -> bool:
        """Whether rows or positions taken by :meth:`flush` wait for a commit."""

    def commit_deferred(self, force: bool) -> None:
        """Commit what waits when it is due (``force``: now, the run is stopping)."""


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one system spells the positions table's statements.

    ``mark(i)``: the ``i``-th placeholder (from 1). ``upsert``: the clause
    after ``INSERT ... VALUES (...)`` that replaces a row of the same key.
    ``text``: the type of the text key columns (MySQL keys need a length).
    ``part``: the partition column, quoted (a reserved word in some systems).
    """

    mark: Callable[[int], str]
    upsert: str
    text: str = "TEXT"
    part: str = '"partition"'
    lock: str = ""  # row locks on the read that checks the positions (servers with writers)


POSTGRES = Dialect(
    mark=lambda i: f"${i}",
    lock=" FOR UPDATE",
    upsert='ON CONFLICT (pipeline, target, source, "partition") DO UPDATE SET '
    "position_int = EXCLUDED.position_int, position_text = EXCLUDED.position_text",
)
MYSQL = Dialect(
    mark=lambda i: "%s",
    upsert="ON DUPLICATE KEY UPDATE position_int = VALUES(position_int), "
    "position_text = VALUES(position_text)",
    text="VARCHAR(190)",  # four utf8mb4 key columns fit the 3072-byte key limit
    part="`partition`",
    lock=" FOR UPDATE",
)
SQLITE = Dialect(
    mark=lambda i: "?",
    upsert='ON CONFLICT (pipeline, target, source, "partition") DO UPDATE SET '
    "position_int = excluded.position_int, position_text = excluded.position_text",
)
DUCKDB = Dialect(
    mark=lambda i: "?",
    upsert='ON CONFLICT (pipeline, target, source, "partition") DO UPDATE SET '
    "position_int = excluded.position_int, position_text = excluded.position_text",
)


class Ledger:
    """One target's positions: what it holds, what its next flush records.

    ``table`` is the quoted, qualified name of the positions table. Not
    thread-safe: the run loop calls one target method at a time.

    **Fencing.** Once :meth:`held` has read the table (the stateless
    exactly-once policy does, on start and after every rebalance), each
    :meth:`write` first reads the stored positions of the partitions it
    records (row-locked on Postgres and MySQL) and checks they are still what
    this process last read or wrote. If another process committed for one of
    them since — a replica the group gave the partition, or the one it was
    taken from, still writing — :class:`~sluice.errors.PositionsMoved` is
    raised before anything is recorded, and the caller rolls its transaction
    back: two processes never both commit rows for one stretch of a
    partition.
    """

    def __init__(self, dialect: Dialect, table: str, pipeline: str, target: str) -> None:
        self._d = dialect
        self._table = table
        self._pipeline = pipeline
        self._target = target
        self._staged: dict[str, Position] = {}
        self._also: Callable[[Any], None] | None = None
        # What the table held, as this process last read or wrote it; None
        # until held() read it (no fencing then: a joined checkpoint's store fences).
        self._seen: dict[tuple[str, str], int | str] | None = None
        m = dialect.mark
        t = dialect.text
        self._create = (
            f"CREATE TABLE IF NOT EXISTS {table} (pipeline {t} NOT NULL, target {t} NOT NULL, "
            f"source {t} NOT NULL, {dialect.part} {t} NOT NULL, position_int BIGINT, "
            "position_text TEXT, "
            f"PRIMARY KEY (pipeline, target, source, {dialect.part}))"
        )
        self._select = (
            f"SELECT source, {dialect.part}, position_int, position_text FROM {table} "
            f"WHERE pipeline = {m(1)} AND target = {m(2)}"
        )
        self._insert = (
            f"INSERT INTO {table} (pipeline, target, source, {dialect.part}, "
            f"position_int, position_text) VALUES ({m(1)}, {m(2)}, {m(3)}, {m(4)}, {m(5)}, "
            f"{m(6)}) {dialect.upsert}"
        )

    @property
    def pending(self) -> bool:
        """Whether positions (or a joined checkpoint) wait for the next flush."""
        return bool(self._staged) or self._also is not None

    def create(self, run: Run) -> None:
        """Create the table when missing (inside the caller's transaction)."""
        run(self._create, ())

    def held(self, run: Run) -> dict[str, Position]:
        """What the table holds for this pipeline and target (from now on the
        positions later writes are fenced on)."""
        out = self._read(run, self._select)
        self._seen = {(s, p): v for s, parts in out.items() for p, v in parts.items()}
        return out

    def _read(self, run: Run, statement: str) -> dict[str, Position]:
        out: dict[str, Position] = {}
        for source, part, pos_int, pos_text in run(statement, (self._pipeline, self._target)):
            out.setdefault(str(source), {})[str(part)] = (
                int(pos_int) if pos_int is not None else str(pos_text)
            )
        return out

    def _check(self, run: Run) -> None:
        """Raise :class:`PositionsMoved` when a partition about to be recorded
        holds another position than this process last saw."""
        seen = self._seen
        if seen is None or not self._staged:
            return
        now = self._read(run, self._select + self._d.lock)
        moved = [
            f"{source} {part}"
            for source, parts in self._staged.items()
            for part in parts
            if now.get(source, {}).get(part) != seen.get((source, part))
        ]
        if moved:
            raise PositionsMoved(
                f"{self._target}: another process committed rows for {', '.join(moved[:5])}"
                + (" ..." if len(moved) > 5 else "")
                + " since this one last read or wrote its positions (a rebalance); "
                "this round is rolled back and read again"
            )

    def held_committed(
        self, run: Run, connection: Any, errors: tuple[type[Exception], ...], fail: Fail
    ) -> dict[str, Position]:
        """:meth:`held` in its own transaction on a server's ``connection``;
        a driver error (one of ``errors``) goes to ``fail`` (which raises)."""
        try:
            held = self.held(run)
            connection.commit()
        except errors as exc:
            fail(exc)
        return held

    def flush(
        self,
        run: Run,
        connection: Any,
        errors: tuple[type[Exception], ...],
        fail: Fail,
        rolled_back: Callable[[], None] | None = None,
    ) -> None:
        """A server target's flush: record the staged positions, then commit
        ``connection``'s transaction (the round's rows and them). A driver
        error goes to ``fail``; on :class:`PositionsMoved` the transaction is
        rolled back (then ``rolled_back()``: the caller's caches) and the
        error raised."""
        try:
            if self.pending:
                self.write(run, connection)
            connection.commit()
        except errors as exc:
            fail(exc)
        except PositionsMoved:
            self.drop()
            with contextlib.suppress(*errors):
                connection.rollback()
                if rolled_back is not None:
                    rolled_back()
            raise
        self.done()

    def drop(self) -> None:
        """The round was rolled back: forget what it staged, and what was
        seen (the caller reads the table again with :meth:`held`)."""
        self._staged = {}
        self._also = None
        self._seen = None if self._seen is None else {}

    def stage(
        self, positions: Mapping[str, Position], also: Callable[[Any], None] | None = None
    ) -> None:
        """Merge ``positions`` into what the next :meth:`write` records."""
        for source, parts in positions.items():
            self._staged.setdefault(source, {}).update(parts)
        if also is not None:
            self._also = also

    def write(self, run: Run, connection: Any) -> None:
        """Upsert the staged positions and run the staged ``also`` (in the
        caller's open transaction, right before its commit). The staged values
        are kept until :meth:`done`: a failed commit is retried with them.
        Raises :class:`PositionsMoved` (see the class docstring)."""
        self._check(run)
        for source, parts in self._staged.items():
            for part, pos in parts.items():
                run(
                    self._insert,
                    (
                        self._pipeline,
                        self._target,
                        source,
                        part,
                        pos if isinstance(pos, int) else None,
                        pos if isinstance(pos, str) else None,
                    ),
                )
        if self._also is not None:
            self._also(connection)

    def done(self) -> None:
        """The transaction :meth:`write` joined committed: forget what it recorded."""
        if self._seen is not None:
            for source, parts in self._staged.items():
                for part, pos in parts.items():
                    if isinstance(pos, int | str):
                        self._seen[(source, part)] = pos
        self._staged = {}
        self._also = None


# -- resume and skip ---------------------------------------------------------------


def lowest(held: Iterable[Mapping[str, Position]]) -> dict[str, Position]:
    """Where each source resumes: per source and partition, the lowest position
    any target holds (a target without a position for a partition does not
    constrain it). Positions of different types (an int and a str) cannot be
    ordered: such a partition is left out, so the source resumes from its own
    committed position there."""
    out: dict[str, Position] = {}
    mixed: set[tuple[str, str]] = set()
    for by_source in held:
        for source, parts in by_source.items():
            mine = out.setdefault(source, {})
            for part, pos in parts.items():
                have = mine.get(part)
                if have is None:
                    mine[part] = pos
                elif type(have) is not type(pos):
                    mixed.add((source, part))
                elif pos < have:  # type: ignore[operator]  # same type, checked above
                    mine[part] = pos
    for source, part in mixed:
        out[source].pop(part, None)
    return {s: p for s, p in out.items() if p}


def ahead(holds: Mapping[str, Position], resume: Mapping[str, Position]) -> dict[str, Position]:
    """The partitions (per source) where a target holds more than the sources
    resume from: rows before its position there are already in it. Integer
    positions only (offsets); others never skip."""
    out: dict[str, Position] = {}
    for source, parts in holds.items():
        start = resume.get(source, {})
        for part, pos in parts.items():
            begin = start.get(part)
            if isinstance(pos, int) and isinstance(begin, int) and pos > begin:
                out.setdefault(source, {})[part] = pos
    return out
