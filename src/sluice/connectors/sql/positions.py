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

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from sluice.connectors.api import Position, Target

#: The name of the positions table in every target database.
TABLE = "_sluice_positions"

#: Runs one statement with parameters on the target's connection; its rows.
Run = Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]


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


POSTGRES = Dialect(
    mark=lambda i: f"${i}",
    upsert='ON CONFLICT (pipeline, target, source, "partition") DO UPDATE SET '
    "position_int = EXCLUDED.position_int, position_text = EXCLUDED.position_text",
)
MYSQL = Dialect(
    mark=lambda i: "%s",
    upsert="ON DUPLICATE KEY UPDATE position_int = VALUES(position_int), "
    "position_text = VALUES(position_text)",
    text="VARCHAR(190)",  # four utf8mb4 key columns fit the 3072-byte key limit
    part="`partition`",
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
    """

    def __init__(self, dialect: Dialect, table: str, pipeline: str, target: str) -> None:
        self._d = dialect
        self._table = table
        self._pipeline = pipeline
        self._target = target
        self._staged: dict[str, Position] = {}
        self._also: Callable[[Any], None] | None = None
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
        """What the table holds for this pipeline and target."""
        out: dict[str, Position] = {}
        for source, part, pos_int, pos_text in run(self._select, (self._pipeline, self._target)):
            out.setdefault(str(source), {})[str(part)] = (
                int(pos_int) if pos_int is not None else str(pos_text)
            )
        return out

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
        are kept until :meth:`done`: a failed commit is retried with them."""
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
