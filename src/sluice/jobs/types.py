"""Column types for ``@sluice.table`` classes (``sluice.types``).

Each type is a class: its Arrow type and its SQL type per dialect. A sized
type is subscripted (``String[256]``) and gives a cached subclass, so
``String[256] | None`` is an ordinary union of classes.
"""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa

#: The SQL dialects a managed table can be created in.
DIALECTS = ("postgres", "mysql", "sqlite", "duckdb")


class SqlType:
    """A column type: ``arrow`` and ``sql`` (one string per dialect)."""

    arrow: ClassVar[pa.DataType] = pa.string()
    sql: ClassVar[dict[str, str]] = {}

    @classmethod
    def ddl(cls, dialect: str) -> str:
        """The column type in ``dialect``'s ``CREATE TABLE``."""
        return cls.sql[dialect]


def _t(name: str, arrow: pa.DataType, pg: str, my: str, lite: str, duck: str) -> type[SqlType]:
    sql = {"postgres": pg, "mysql": my, "sqlite": lite, "duckdb": duck}
    return type(name, (SqlType,), {"arrow": arrow, "sql": sql, "__doc__": f"SQL {pg}."})


BigInt = _t("BigInt", pa.int64(), "bigint", "BIGINT", "INTEGER", "BIGINT")
Integer = _t("Integer", pa.int32(), "integer", "INT", "INTEGER", "INTEGER")
SmallInt = _t("SmallInt", pa.int16(), "smallint", "SMALLINT", "INTEGER", "SMALLINT")
Double = _t("Double", pa.float64(), "double precision", "DOUBLE", "REAL", "DOUBLE")
Real = _t("Real", pa.float32(), "real", "FLOAT", "REAL", "REAL")
Boolean = _t("Boolean", pa.bool_(), "boolean", "BOOLEAN", "INTEGER", "BOOLEAN")
Text = _t("Text", pa.string(), "text", "TEXT", "TEXT", "VARCHAR")
Date = _t("Date", pa.date32(), "date", "DATE", "TEXT", "DATE")
Bytes = _t("Bytes", pa.binary(), "bytea", "BLOB", "BLOB", "BLOB")
Json = _t("Json", pa.string(), "jsonb", "JSON", "TEXT", "JSON")
TimestampTZ = _t(
    "TimestampTZ",
    pa.timestamp("us", tz="UTC"),
    "timestamptz",
    "DATETIME(6)",
    "TEXT",
    "TIMESTAMPTZ",
)
Timestamp = _t("Timestamp", pa.timestamp("us"), "timestamp", "DATETIME(6)", "TEXT", "TIMESTAMP")


class String(SqlType):
    """``String[n]``: text of at most ``n`` characters (``varchar(n)``)."""

    arrow = pa.string()
    length: ClassVar[int | None] = None
    _sized: ClassVar[dict[int, type[String]]] = {}

    @classmethod
    def ddl(cls, dialect: str) -> str:
        n = cls.length
        if n is None:
            return Text.ddl(dialect)
        return {"postgres": f"varchar({n})", "mysql": f"VARCHAR({n})", "sqlite": "TEXT"}.get(
            dialect, f"VARCHAR({n})"
        )

    def __class_getitem__(cls, n: int) -> type[String]:
        if not isinstance(n, int) or n < 1:
            raise TypeError(f"String[n] takes a length >= 1, got {n!r}")
        if n not in String._sized:
            String._sized[n] = type(f"String[{n}]", (String,), {"length": n})
        return String._sized[n]


class Numeric(SqlType):
    """``Numeric[p, s]``: an exact decimal."""

    arrow = pa.decimal128(38, 9)
    precision: ClassVar[int] = 38
    scale: ClassVar[int] = 9

    @classmethod
    def ddl(cls, dialect: str) -> str:
        p, s = cls.precision, cls.scale
        return "REAL" if dialect == "sqlite" else f"DECIMAL({p},{s})"

    def __class_getitem__(cls, ps: tuple[int, int]) -> type[Numeric]:
        p, s = ps
        return type(
            f"Numeric[{p},{s}]",
            (Numeric,),
            {"precision": p, "scale": s, "arrow": pa.decimal128(p, s)},
        )


__all__ = [
    "BigInt",
    "Boolean",
    "Bytes",
    "Date",
    "Double",
    "Integer",
    "Json",
    "Numeric",
    "Real",
    "SmallInt",
    "SqlType",
    "String",
    "Text",
    "Timestamp",
    "TimestampTZ",
]
