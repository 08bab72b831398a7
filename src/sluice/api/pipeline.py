"""Streaming pipelines declared in Python, lowered to the TOML file's spec.

:func:`pipeline_data` turns the arguments of the user guide's
``run_streaming_pipeline(...)`` into the table a ``pipeline.toml`` would hold;
:func:`pipeline_spec` validates it exactly as a file (same messages, key paths
in TOML terms, every problem at once); :func:`run_streaming_pipeline` runs it
like ``flow consume``. ``@streaming_pipeline(...)`` records a pipeline under
its name for ``flow consume --module M NAME``.

The building blocks (:class:`Source`, :class:`Target`, :class:`Lookup`,
:class:`Window`, :class:`Aggregation`, :class:`Join`, :class:`CDC`,
:class:`StateStore`, :class:`Watermark`) hold keyword arguments named like the
TOML keys (``as_`` for ``as``); they are checked when the pipeline is lowered.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sluice.api.connections import Connection, expand, resolve
from sluice.config.load import load_data
from sluice.config.spec import PipelineSpec
from sluice.errors import ConfigError, ConfigProblem
from sluice.functions import Function

ConnectionRef = Connection | str


class _Block:
    """Keyword arguments named like one TOML table's keys."""

    def __init__(self, **keys: Any) -> None:
        self.keys = {("as" if k == "as_" else k): v for k, v in keys.items() if v is not None}

    def table(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self.keys.items()}

    def __repr__(self) -> str:
        from sluice.config.redact import redact_value

        shown = ", ".join(f"{k}={redact_value(k, v)!r}" for k, v in self.keys.items())
        return f"{type(self).__name__}({shown})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.keys == other.keys

    __hash__ = None  # type: ignore[assignment]


class Aggregation(_Block):
    """One ``[[transform.window.aggregations]]`` entry: ``agg``, ``column``, ``as_``, ``mode``."""


class Window(_Block):
    """``[transform.window]``: ``kind``, ``duration_ms`` / ``hop_ms`` / ``gap_ms``,
    ``group_by``, ``aggregations`` (a list of :class:`Aggregation`), ..."""


class Join(_Block):
    """``[transform.join]``: ``kind``, ``left_source``, ``right_source``, keys, time bounds."""


class CDC(_Block):
    """``[transform.cdc]``: ``envelope``, ``key_field``, ..."""


class Watermark(_Block):
    """``[watermark]``: ``lateness_ms``, ``source_idleness_ms``."""


class StateStore(_Block):
    """``[state_store]``: ``kind`` (``postgres`` / ``memory``), ``url``, ``schema``, ...
    ``connection=`` takes the url of a Postgres connection."""


class Source(_Block):
    """One ``[[sources]]`` entry: ``connection`` and ``query`` plus source keys."""

    def __init__(self, connection: ConnectionRef, query: str | None = None, **keys: Any) -> None:
        super().__init__(query=query, **keys)
        self.connection = connection


class Target(_Block):
    """One target: ``connection``, ``table`` (``"name"`` or ``("schema", "name")``),
    ``primary_key``, ``mode`` and the kind's other keys (``prefix``, ...)."""

    def __init__(
        self,
        connection: ConnectionRef,
        table: str | Sequence[str] | None = None,
        primary_key: Sequence[str] | None = None,
        **keys: Any,
    ) -> None:
        super().__init__(**keys)
        self.connection = connection
        self.table_name = table
        self.primary_key = primary_key


class Lookup(_Block):
    """One ``[transform.lookups.<name>]`` entry: ``connection``, ``table``,
    ``schema``, ``refresh_interval_ms``."""

    def __init__(self, connection: ConnectionRef, table: str, **keys: Any) -> None:
        super().__init__(table=table, **keys)
        self.connection = connection


def _plain(value: Any) -> Any:
    if isinstance(value, _Block):
        return value.table()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _connected(conn: ConnectionRef, at: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    ref = conn if isinstance(conn, Connection) else resolve(conn)
    return expand({"connection": ref, **extra}, at)


def _table(table: str | Sequence[str] | None, key: Sequence[str] | None) -> dict[str, Any] | None:
    if table is None and key is None:
        return None
    out: dict[str, Any] = {}
    if isinstance(table, str):
        out["name"] = table
    elif table is not None:
        parts = list(table)
        if len(parts) == 2:
            out["schema"], out["name"] = parts
        elif len(parts) == 1:
            out["name"] = parts[0]
        else:
            raise ConfigError(
                [ConfigProblem("<python>", "target_table", "expected 'name' or ('schema', 'name')")]
            )
    if key is not None:
        out["primary_key"] = list(key)
    return out


def _target(
    t: Target | ConnectionRef, at: str, table: Any = None, key: Any = None
) -> dict[str, Any]:
    if isinstance(t, Target):
        data = _connected(t.connection, at, t.table())
        shaped = _table(t.table_name, t.primary_key)
    else:
        data = _connected(t, at, {})
        shaped = _table(table, key)
    if shaped is not None:
        data["table"] = {**data.get("table", {}), **shaped}
    return data


def _source(s: Source | ConnectionRef, at: str) -> dict[str, Any]:
    if isinstance(s, Source):
        return _connected(s.connection, at, s.table())
    return _connected(s, at, {})


def pipeline_data(
    name: str,
    *,
    source: Source | ConnectionRef | None = None,
    source_query: str | None = None,
    sources: Iterable[Source] | None = None,
    target: Target | ConnectionRef | None = None,
    target_table: str | Sequence[str] | None = None,
    primary_key: Sequence[str] | None = None,
    targets: Iterable[Target | ConnectionRef] | None = None,
    transform_sql: str | None = None,
    lookups: Mapping[str, Lookup] | None = None,
    window: Window | None = None,
    join: Join | None = None,
    cdc: CDC | None = None,
    on_error: str | None = None,
    udf_modules: Sequence[str] | None = None,
    state_store: StateStore | None = None,
    watermark: Watermark | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The table a ``pipeline.toml`` for these arguments would hold.

    ``options`` are the file's other top-level keys (``idle_pause_ms``,
    ``dlq_store``, ...). Connections given by name resolve through
    :func:`sluice.api.connections.resolve`.
    """
    data: dict[str, Any] = {"pipeline_name": name}
    if source_query is not None:
        data["source_query"] = source_query
    data.update({k: _plain(v) for k, v in options.items() if v is not None})
    if source is not None:
        data["source"] = _source(source, "source")
    if sources is not None:
        data["sources"] = [_source(s, f"sources[{i}]") for i, s in enumerate(sources)]
    if target is not None:
        data["target"] = _target(target, "target", target_table, primary_key)
    if targets is not None:
        data["targets"] = [_target(t, f"targets[{i}]") for i, t in enumerate(targets)]
    transform: dict[str, Any] = {}
    if transform_sql is not None:
        transform["sql"] = transform_sql
    if on_error is not None:
        transform["on_error"] = on_error
    if udf_modules is not None:
        transform["udf_modules"] = list(udf_modules)
    if lookups:
        transform["lookups"] = {
            n: _connected(lk.connection, f"transform.lookups.{n}", lk.table())
            for n, lk in lookups.items()
        }
    for key, block in (("window", window), ("join", join), ("cdc", cdc)):
        if block is not None:
            transform[key] = block.table()
    if transform:
        data["transform"] = transform
    if state_store is not None:
        store = state_store.table()
        data["state_store"] = (
            expand(store, "state_store", only=("url",)) if "connection" in store else store
        )
    if watermark is not None:
        data["watermark"] = watermark.table()
    return data


def pipeline_spec(name: str, **kwargs: Any) -> PipelineSpec:
    """Validate :func:`pipeline_data`'s table like a pipeline file; raises
    :class:`ConfigError` with every problem (labelled ``<python:NAME>``).
    Relative local paths resolve from the working directory."""
    return load_data(pipeline_data(name, **kwargs), f"<python:{name}>", base_dir=os.getcwd())


def run_streaming_pipeline(
    name: str,
    *,
    udfs: Iterable[Function] = (),
    aggregate_udfs: Iterable[Function] = (),
    metrics_port: int | None = None,
    stop_after_idle_ms: int | None = None,
    restart_on_error: bool = False,
    drain: bool = True,
    **kwargs: Any,
) -> int:
    """Run the pipeline these arguments describe in this process, as ``flow
    consume`` runs a file, until it stops; the exit code (see
    :func:`sluice.run_pipeline` for the run options)."""
    from sluice.engine.consume import run_spec

    spec = pipeline_spec(name, **kwargs)
    return run_spec(
        spec,
        f"<python:{name}>",
        udfs=udfs,
        aggregate_udfs=aggregate_udfs,
        metrics_port=metrics_port,
        stop_after_idle_ms=stop_after_idle_ms,
        restart_on_error=restart_on_error,
        drain=drain,
    )


@dataclass(frozen=True)
class Declared:
    """A pipeline recorded by :func:`streaming_pipeline`."""

    name: str
    kwargs: dict[str, Any]
    udfs: tuple[Function, ...] = ()
    aggregate_udfs: tuple[Function, ...] = ()
    func: Callable[..., Any] | None = field(default=None, compare=False)

    def spec(self) -> PipelineSpec:
        return pipeline_spec(self.name, **self.kwargs)


_declared: dict[str, Declared] = {}


def streaming_pipeline(
    name: str,
    *,
    udfs: Iterable[Function] = (),
    aggregate_udfs: Iterable[Function] = (),
    **kwargs: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: record the pipeline ``name`` (the arguments of
    :func:`run_streaming_pipeline`) for ``flow consume --module M NAME``.
    The decorated function is returned unchanged; it is not called."""

    def record(func: Callable[..., Any]) -> Callable[..., Any]:
        _declared[name] = Declared(name, dict(kwargs), tuple(udfs), tuple(aggregate_udfs), func)
        return func

    return record


def declared() -> dict[str, Declared]:
    """Every pipeline recorded so far, by name."""
    return dict(_declared)


def load_module(module: str) -> dict[str, Declared]:
    """Import ``module`` (firing its decorators); the pipelines it declared.

    Raises :class:`ConfigError` when it cannot be imported.
    """
    # As `python -m`: a module in the working directory is importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    before = set(_declared)
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError([ConfigProblem(module, "", f"cannot import module: {exc}")]) from None
    found = {n: d for n, d in _declared.items() if n not in before or _owner(d) == module}
    return found


def _owner(d: Declared) -> str | None:
    return getattr(d.func, "__module__", None)


def run_declared(d: Declared, **run: Any) -> int:
    """Run a recorded pipeline (``flow consume --module``)."""
    return run_streaming_pipeline(
        d.name, udfs=d.udfs, aggregate_udfs=d.aggregate_udfs, **run, **d.kwargs
    )


__all__ = [
    "CDC",
    "Aggregation",
    "Join",
    "Lookup",
    "Source",
    "StateStore",
    "Target",
    "Watermark",
    "Window",
    "pipeline_data",
    "pipeline_spec",
    "run_streaming_pipeline",
    "streaming_pipeline",
]
