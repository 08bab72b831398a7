"""Managed tables: ``@sluice.table(schema=...)`` classes and ``ManagedTable``.

A class whose annotations are column types (:mod:`sluice.types`), optionally
``Annotated`` with :func:`pk` and normalisers (:func:`lower`, :func:`trim`,
:func:`parse_timestamp`), declares a target table. The job that writes it
creates the table on its first run and adds the columns declared since
(:meth:`ManagedTable.ensure`); columns are never dropped or retyped.

Normalisers run on the data, never per row in Python: as Arrow compute on
each batch on the streamed path, as SQL around the query on the
``INSERT … SELECT`` path.
"""

from __future__ import annotations

import re
import types as pytypes
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sluice.errors import ConfigError, ConfigProblem
from sluice.jobs.types import SqlType


@dataclass(frozen=True)
class PrimaryKey:
    """Marks a column as (part of) the primary key: ``Annotated[BigInt, pk()]``."""


def pk() -> PrimaryKey:
    """The primary-key marker for ``Annotated[...]``."""
    return PrimaryKey()


@dataclass(frozen=True)
class Normaliser:
    """A column normaliser: an Arrow function and its SQL twin (``{}`` is the value)."""

    name: str
    arrow: Callable[[Any, pa.DataType], Any]
    sql: dict[str, str]

    def sql_for(self, dialect: str) -> str:
        return self.sql.get(dialect, self.sql["default"])


def lower() -> Normaliser:
    """Lower-cases text."""
    return Normaliser("lower", lambda a, _t: pc.utf8_lower(a), {"default": "lower({})"})


def trim() -> Normaliser:
    """Strips leading and trailing whitespace."""
    return Normaliser("trim", lambda a, _t: pc.utf8_trim_whitespace(a), {"default": "trim({})"})


def _parse_ts(a: Any, target: pa.DataType) -> Any:
    if pa.types.is_timestamp(a.type):
        return a.cast(target)
    if pa.types.is_string(a.type) or pa.types.is_large_string(a.type):
        fmt = "%Y-%m-%dT%H:%M:%S"
        text = pc.replace_substring_regex(a, r"^(\d{4}-\d\d-\d\d) ", r"\1T")
        try:
            return pc.cast(text, target)
        except pa.ArrowInvalid:
            return pc.strptime(text, format=fmt, unit="us").cast(target)
    return a.cast(target)


def parse_timestamp() -> Normaliser:
    """Parses ISO-8601 text (or passes a timestamp) into the column's timestamp type."""
    return Normaliser(
        "parse_timestamp",
        _parse_ts,
        {
            "default": "CAST({} AS TIMESTAMP)",
            "postgres": "CAST({} AS timestamptz)",
            "duckdb": "CAST({} AS TIMESTAMPTZ)",
            "mysql": "CAST({} AS DATETIME(6))",
            "sqlite": "{}",
        },
    )


@dataclass(frozen=True)
class Column:
    """One declared column."""

    name: str
    type: type[SqlType]
    nullable: bool
    primary_key: bool = False
    normalisers: tuple[Normaliser, ...] = ()


@dataclass
class ManagedTable:
    """A declared target table: name, schema (namespace) and columns."""

    name: str
    columns: list[Column]
    schema: str | None = None
    connection: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def primary_key(self) -> list[str]:
        return [c.name for c in self.columns if c.primary_key]

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(c.name, c.type.arrow, nullable=c.nullable) for c in self.columns]
        )

    def qualified(self, dialect: str) -> str:
        """The quoted ``schema.table`` (``table`` where the dialect has no schemas)."""
        q = quote_for(dialect)
        if self.schema and dialect not in {"sqlite", "mysql"}:
            return f"{q(self.schema)}.{q(self.name)}"
        return q(self.name)

    def create_sql(self, dialect: str) -> list[str]:
        """``CREATE SCHEMA`` / ``CREATE TABLE IF NOT EXISTS`` in ``dialect``."""
        q = quote_for(dialect)
        cols = [
            f"{q(c.name)} {c.type.ddl(dialect)}{'' if c.nullable else ' NOT NULL'}"
            for c in self.columns
        ]
        if self.primary_key:
            cols.append(f"PRIMARY KEY ({', '.join(q(k) for k in self.primary_key)})")
        out = []
        if self.schema and dialect in {"postgres", "duckdb"}:
            out.append(f"CREATE SCHEMA IF NOT EXISTS {q(self.schema)}")
        out.append(f"CREATE TABLE IF NOT EXISTS {self.qualified(dialect)} ({', '.join(cols)})")
        return out

    def add_column_sql(self, dialect: str, existing: Sequence[str]) -> list[str]:
        """``ALTER TABLE … ADD COLUMN`` for each declared column not in ``existing``."""
        q = quote_for(dialect)
        have = {e.lower() for e in existing}
        return [
            f"ALTER TABLE {self.qualified(dialect)} ADD COLUMN {q(c.name)} {c.type.ddl(dialect)}"
            for c in self.columns
            if c.name.lower() not in have
        ]

    def normalise(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """``batch`` with the declared columns only, normalised and cast to their types.

        Raises :class:`ConfigError` naming a declared column the batch lacks.
        """
        names = batch.schema.names
        arrays = []
        for c in self.columns:
            if c.name not in names:
                if c.nullable:
                    arrays.append(pa.nulls(batch.num_rows, c.type.arrow))
                    continue
                raise ConfigError(
                    [
                        ConfigProblem(
                            f"table {self.name}",
                            c.name,
                            f"the job's rows have no column {c.name!r} (they have {names})",
                        )
                    ]
                )
            a = batch.column(names.index(c.name))
            for n in c.normalisers:
                a = n.arrow(a, c.type.arrow)
            if a.type != c.type.arrow:
                a = a.cast(c.type.arrow)
            arrays.append(a)
        return pa.RecordBatch.from_arrays(arrays, schema=self.arrow_schema)

    def select_sql(self, dialect: str, query: str) -> str:
        """``query`` wrapped so it yields the declared columns, normalised, in order."""
        q = quote_for(dialect)
        parts = []
        for c in self.columns:
            expr = f"s.{q(c.name)}"
            for n in c.normalisers:
                expr = n.sql_for(dialect).format(expr)
            parts.append(f"{expr} AS {q(c.name)}")
        return f"SELECT {', '.join(parts)} FROM ({query}) AS s"


def quote_for(dialect: str) -> Callable[[str], str]:
    """The identifier quoting of ``dialect``."""
    if dialect == "mysql":
        return lambda n: "`" + n.replace("`", "``") + "`"
    return lambda n: '"' + n.replace('"', '""') + '"'


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _column(name: str, hint: Any, where: str) -> Column:
    pk_ = False
    norms: list[Normaliser] = []
    if typing.get_origin(hint) is typing.Annotated:
        base, *meta = typing.get_args(hint)
        for m in meta:
            if isinstance(m, PrimaryKey):
                pk_ = True
            elif isinstance(m, Normaliser):
                norms.append(m)
            else:
                raise ConfigError([ConfigProblem(where, name, f"unknown marker {m!r}")])
        hint = base
    nullable = False
    if typing.get_origin(hint) in (typing.Union, pytypes.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise ConfigError([ConfigProblem(where, name, "expected one column type")])
        hint = args[0]
    if not (isinstance(hint, type) and issubclass(hint, SqlType)):
        raise ConfigError(
            [ConfigProblem(where, name, f"expected a sluice.types column type, got {hint!r}")]
        )
    return Column(name, hint, nullable and not pk_, pk_, tuple(norms))


def table(
    cls: type[Any] | None = None,
    *,
    schema: str | None = None,
    name: str | None = None,
    connection: str | None = None,
) -> Any:
    """Class decorator: the class's annotated columns as a :class:`ManagedTable`.

    ``@sluice.table`` or ``@sluice.table(schema="analytics")``; the table name
    is ``name`` or the class name in snake case (``CustomerDim`` ->
    ``customer_dim``). Returns the ManagedTable in place of the class.
    """

    def wrap(c: type[Any]) -> ManagedTable:
        where = f"table {c.__name__}"
        hints = typing.get_type_hints(c, include_extras=True)
        cols = [_column(n, h, where) for n, h in hints.items() if not n.startswith("_")]
        if not cols:
            raise ConfigError([ConfigProblem(where, "", "declares no columns")])
        return ManagedTable(name or _snake(c.__name__), cols, schema, connection)

    return wrap(cls) if cls is not None else wrap
