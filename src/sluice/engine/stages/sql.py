"""The SQL stage: ``[transform] sql`` run by DataFusion over each batch.

The batch is registered as the table ``source``, each lookup under its name,
and every ``@udf`` / ``@udaf`` is registered once in the session. The
statement is planned and checked once per input schema (and lookup schemas):
a new schema, from the stream or from a lookup refresh, plans again and is
counted in ``sluice_sql_replans_total``. DataFusion binds the statement to
the batch's in-memory table each time (≈0.5 ms a batch; it has no way to
re-point a cached plan at new data), so the per-batch cost is independent
of the number of rows.

Output columns of DataFusion's view types (``Utf8View``, ``BinaryView``)
are cast to their plain twins, which every target writes.

Any failure, planning or execution, is a :class:`StageError`; the run loop
applies ``on_error`` to the batch.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from sluice.engine import metrics as m
from sluice.engine.lookups import LookupTables
from sluice.errors import StageError
from sluice.functions import Function, ScalarFunction

log = logging.getLogger("sluice")

SOURCE_TABLE = "source"

_PLAIN = {pa.string_view(): pa.string(), pa.binary_view(): pa.binary()}


def plain_types(table: pa.Table) -> pa.Table:
    """Cast view-typed columns (top level) to the plain Arrow types."""
    if not any(f.type in _PLAIN for f in table.schema):
        return table
    schema = pa.schema([f.with_type(_PLAIN.get(f.type, f.type)) for f in table.schema])
    return table.cast(schema)


class SqlStage:
    """Runs one SQL statement over each batch."""

    def __init__(
        self,
        sql: str,
        pipeline: str,
        functions: dict[str, Function] | None = None,
        lookups: LookupTables | None = None,
    ) -> None:
        self.sql = sql
        self.pipeline = pipeline
        self.functions = functions or {}
        self.lookups = lookups
        self._ctx: Any = None
        self._planned: tuple[pa.Schema, ...] | None = None
        self._lookup_schemas: dict[str, pa.Schema] = {}
        self.output_schema: pa.Schema | None = None

    def open(self) -> None:
        """Create the session, register the functions and load the lookups."""
        import datafusion

        ctx = datafusion.SessionContext()
        for fn in self.functions.values():
            registered = fn.to_datafusion()
            if isinstance(fn, ScalarFunction):
                ctx.register_udf(registered)
            else:
                ctx.register_udaf(registered)
        self._ctx = ctx
        self._planned = None
        if self.lookups is not None:
            for name, table in self.lookups.load_all().items():
                self._register(name, table)
                self._lookup_schemas[name] = table.schema
            self.lookups.start()

    def close(self) -> None:
        """Stop lookup refreshes and drop the session."""
        if self.lookups is not None:
            self.lookups.stop()
        self._ctx = None

    def process(self, data: pa.Table) -> pa.Table:
        """The statement's result over ``data``."""
        if self._ctx is None:
            raise StageError("the SQL stage is not open")
        self._swap_lookups()
        key = (data.schema, *(self._lookup_schemas[n] for n in sorted(self._lookup_schemas)))
        replan = self._planned is None or not _same(self._planned, key)
        self._register(SOURCE_TABLE, data)
        try:
            frame = self._ctx.sql(self.sql)
            if replan:
                schema = frame.schema()
                if self._planned is not None:
                    m.SQL_REPLANS.labels(self.pipeline).inc()
                    log.info("sql: input schema changed, planned again")
                self._planned = key
                self.output_schema = schema
            out = frame.to_arrow_table()
        except Exception as exc:  # DataFusion raises plain Exception / ValueError
            raise StageError(f"sql: {_first_line(exc)}") from exc
        return plain_types(out)

    def _swap_lookups(self) -> None:
        if self.lookups is None:
            return
        for name, table in self.lookups.take_updates().items():
            self._register(name, table)
            self._lookup_schemas[name] = table.schema

    def _register(self, name: str, table: pa.Table) -> None:
        ctx = self._ctx
        if ctx.table_exist(name):
            ctx.deregister_table(name)
        batches = table.to_batches()
        if not batches:
            batches = [pa.RecordBatch.from_pylist([], schema=table.schema)]
        ctx.register_record_batches(name, [batches])


def _same(a: tuple[pa.Schema, ...], b: tuple[pa.Schema, ...]) -> bool:
    return len(a) == len(b) and all(x.equals(y) for x, y in zip(a, b, strict=True))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
