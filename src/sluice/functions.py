"""Python functions callable from ``[transform] sql``: ``@udf`` and ``@udaf``.

Both are vectorised: DataFusion hands the function whole Arrow arrays once
per batch, never one row at a time.

    @sluice.udf(args=["Float64", "Float64"], returns="Float64")
    def ratio(a, b):
        return pc.divide(a, b)

    @sluice.udaf(args=["Float64", "Float64"], state=["Float64", "Float64"], returns="Float64")
    class Vwap:
        def __init__(self): ...
        def update_batch(self, prices, qtys): ...      # or update(...)
        def merge_batch(self, nums, dens): ...         # or merge(...)
        def state(self): ...    # one length-1 array (or scalar) per state type
        def evaluate(self): ... # a length-1 array (or scalar) of ``returns``

Types are DataFusion type names: ``Int8`` … ``Int64``, ``UInt8`` … ``UInt64``,
``Float32``, ``Float64``, ``Boolean``, ``Utf8``, ``Binary``. Any other name
is a ``ValueError`` when the decorator runs.

Functions reach a pipeline through ``[transform] udf_modules`` (every
decorated function those modules define; imported from the Python path and
the current directory) or the ``udfs=`` argument of
:func:`sluice.run_pipeline`. Two functions with one SQL name are an error,
never a silent shadowing.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import pyarrow as pa

from sluice.errors import ConfigError, ConfigProblem, StageError

#: DataFusion type names the decorators accept, with their Arrow types.
TYPES: dict[str, pa.DataType] = {
    "Int8": pa.int8(),
    "Int16": pa.int16(),
    "Int32": pa.int32(),
    "Int64": pa.int64(),
    "UInt8": pa.uint8(),
    "UInt16": pa.uint16(),
    "UInt32": pa.uint32(),
    "UInt64": pa.uint64(),
    "Float32": pa.float32(),
    "Float64": pa.float64(),
    "Boolean": pa.bool_(),
    "Utf8": pa.string(),
    "Binary": pa.binary(),
}

Volatility = Literal["immutable", "stable", "volatile"]
F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)


def arrow_type(name: str, what: str) -> pa.DataType:
    """The Arrow type of a DataFusion type name; ``ValueError`` naming ``what`` otherwise."""
    if not isinstance(name, str) or name not in TYPES:
        raise ValueError(f"{what}: unknown type {name!r}; expected one of {', '.join(TYPES)}")
    return TYPES[name]


@dataclass(frozen=True)
class ScalarFunction:
    """A vectorised scalar function: Arrow arrays in, one Arrow array out."""

    name: str
    func: Callable[..., Any]
    args: tuple[pa.DataType, ...]
    returns: pa.DataType
    volatility: Volatility = "immutable"

    def __call__(self, *args: Any) -> Any:
        """Call the Python function directly (tests, notebooks)."""
        return self.func(*args)

    def to_datafusion(self) -> Any:
        """The DataFusion ScalarUDF, checking what the function returns."""
        import datafusion

        name, returns, func = self.name, self.returns, self.func

        def call(*arrays: pa.Array) -> pa.Array:
            out = func(*arrays)
            if isinstance(out, pa.ChunkedArray):
                out = out.combine_chunks()
            if not isinstance(out, pa.Array):
                raise StageError(
                    f"udf {name} returned {type(out).__name__}, expected a pyarrow Array"
                )
            if out.type != returns:
                try:
                    out = out.cast(returns)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise StageError(
                        f"udf {name} returned {out.type}, declared {returns}: {exc}"
                    ) from exc
            return out

        return datafusion.udf(call, list(self.args), returns, self.volatility, name)


@dataclass(frozen=True)
class AggregateFunction:
    """A vectorised aggregate: a class folding Arrow arrays into per-group state."""

    name: str
    cls: type
    args: tuple[pa.DataType, ...]
    state: tuple[pa.DataType, ...]
    returns: pa.DataType
    volatility: Volatility = "immutable"

    def to_datafusion(self) -> Any:
        """The DataFusion AggregateUDF, adapting the class to its Accumulator."""
        import datafusion

        fn = self

        class Adapter(datafusion.Accumulator):
            def __init__(self) -> None:
                self.inner = fn.cls()
                self._update = _method(self.inner, fn.name, "update_batch", "update")
                self._merge = _method(self.inner, fn.name, "merge_batch", "merge")

            def update(self, *values: pa.Array) -> None:
                self._update(*values)

            def merge(self, states: list[pa.Array]) -> None:
                self._merge(*states)

            def state(self) -> list[pa.Scalar]:
                parts = list(self.inner.state())
                if len(parts) != len(fn.state):
                    raise StageError(
                        f"udaf {fn.name}: state() returned {len(parts)} values, "
                        f"declared {len(fn.state)}"
                    )
                return [
                    _scalar(p, t, fn.name, "state") for p, t in zip(parts, fn.state, strict=True)
                ]

            def evaluate(self) -> pa.Scalar:
                return _scalar(self.inner.evaluate(), fn.returns, fn.name, "evaluate")

        return datafusion.udaf(
            Adapter, list(self.args), self.returns, list(self.state), self.volatility, self.name
        )


def _method(obj: Any, name: str, *candidates: str) -> Callable[..., Any]:
    for attr in candidates:
        method = getattr(obj, attr, None)
        if callable(method):
            return method  # type: ignore[no-any-return]
    raise StageError(f"udaf {name}: the class needs a method {' or '.join(candidates)}")


def _scalar(value: Any, type_: pa.DataType, name: str, method: str) -> pa.Scalar:
    """A length-1 array / scalar / Python value as a scalar of ``type_``."""
    if isinstance(value, pa.ChunkedArray):
        value = value.combine_chunks()
    if isinstance(value, pa.Array):
        if len(value) != 1:
            raise StageError(f"udaf {name}: {method}() returned {len(value)} values, expected 1")
        value = value[0]
    scalar = value if isinstance(value, pa.Scalar) else pa.scalar(value, type_)
    if scalar.type != type_:
        try:
            scalar = scalar.cast(type_)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise StageError(
                f"udaf {name}: {method}() returned {scalar.type}, declared {type_}"
            ) from exc
    return scalar


def udf(
    *,
    args: Sequence[str],
    returns: str,
    name: str | None = None,
    volatility: Volatility = "immutable",
) -> Callable[[Callable[..., Any]], ScalarFunction]:
    """Declare a vectorised scalar function for the SQL stage."""
    arg_types = tuple(arrow_type(a, f"udf args[{i}]") for i, a in enumerate(args))
    ret = arrow_type(returns, "udf returns")

    def wrap(func: Callable[..., Any]) -> ScalarFunction:
        return ScalarFunction(name or func.__name__, func, arg_types, ret, volatility)

    return wrap


def udaf(
    *,
    args: Sequence[str],
    state: Sequence[str],
    returns: str,
    name: str | None = None,
    volatility: Volatility = "immutable",
) -> Callable[[type], AggregateFunction]:
    """Declare a vectorised aggregate function (a class) for the SQL stage."""
    arg_types = tuple(arrow_type(a, f"udaf args[{i}]") for i, a in enumerate(args))
    state_types = tuple(arrow_type(s, f"udaf state[{i}]") for i, s in enumerate(state))
    if not state_types:
        raise ValueError("udaf state: declare at least one state type")
    ret = arrow_type(returns, "udaf returns")

    def wrap(cls: type) -> AggregateFunction:
        if not isinstance(cls, type):
            raise ValueError(f"@udaf decorates a class, not {type(cls).__name__}")
        return AggregateFunction(
            name or cls.__name__.lower(), cls, arg_types, state_types, ret, volatility
        )

    return wrap


Function = ScalarFunction | AggregateFunction


def collect(
    functions: Iterable[Function] = (),
    modules: Sequence[str] = (),
    file: str = "<pipeline>",
) -> dict[str, Function]:
    """Every function by SQL name: ``functions`` plus those ``modules`` define.

    A module that fails to import, a decorator with a bad type and two
    functions with one name are :class:`ConfigError` problems, all at once.
    """
    found: dict[str, Function] = {}
    origin: dict[str, str] = {}
    problems: list[ConfigProblem] = []

    def add(fn: Function, where: str, path: str) -> None:
        if fn.name in found and found[fn.name] is not fn:
            problems.append(
                ConfigProblem(
                    file,
                    path,
                    f"two functions are named {fn.name!r} ({origin[fn.name]} and {where}); "
                    "rename one with name=...",
                )
            )
            return
        found[fn.name] = fn
        origin[fn.name] = where

    for fn in functions:
        if not isinstance(fn, ScalarFunction | AggregateFunction):
            problems.append(
                ConfigProblem(file, "udfs", f"{fn!r} is not decorated with @sluice.udf / @udaf")
            )
            continue
        add(fn, "udfs=", "udfs")
    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules next to the pipeline
    for i, module_name in enumerate(modules):
        path = f"transform.udf_modules[{i}]"
        try:
            module = importlib.import_module(module_name)
        except ValueError as exc:  # a decorator rejected a type
            problems.append(ConfigProblem(file, path, f"cannot load {module_name}: {exc}"))
            continue
        except ImportError as exc:
            problems.append(ConfigProblem(file, path, f"cannot import {module_name}: {exc}"))
            continue
        for attr, value in sorted(vars(module).items()):
            if isinstance(value, ScalarFunction | AggregateFunction):
                add(value, f"{module_name}.{attr}", path)
    if problems:
        raise ConfigError(problems)
    return found
