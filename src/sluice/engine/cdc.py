"""``[transform.cdc]``: the targets that apply a change stream to mirror tables.

CDC is not a stage between the sources and the targets: the apply *is* the
write, one transaction of the target per batch, so each CDC target implements
the :class:`~sluice.connectors.api.Target` protocol itself and the run loop
treats it like any other target (``write`` + ``flush``, then the offsets
commit).

The envelopes are decoded where the messages are read (the Kafka source
builds a :class:`~sluice.formats.cdc.EnvelopeDecoder` when the
pipeline has ``[transform.cdc]``), so an undecodable envelope follows
``on_error`` with its offset and raw payload like any undecodable message.
The targets receive the change table; the rules they share are in
:mod:`sluice.connectors.cdc_apply`.
"""

from __future__ import annotations

import importlib

from sluice.config.spec import (
    DeltaLocalTarget,
    DeltaS3Target,
    DuckDBTarget,
    MySQLTarget,
    PipelineSpec,
    PostgresTarget,
    SQLiteTarget,
)
from sluice.config.spec import Target as TargetSpec
from sluice.connectors.api import Target
from sluice.connectors.registry import Context
from sluice.errors import MissingDependencyError, SluiceError

# target kind -> (module, class, extra that installs its library)
_TARGETS: dict[str, tuple[str, str, str]] = {
    "postgres": ("sluice.connectors.postgres.cdc", "PostgresCdcTarget", "postgres"),
    "mysql": ("sluice.connectors.mysql.cdc", "MySQLCdcTarget", "mysql"),
    "sqlite": ("sluice.connectors.sql.cdc", "SQLiteCdcTarget", "all"),
    "duckdb": ("sluice.connectors.sql.cdc", "DuckDBCdcTarget", "duckdb"),
    "delta_local": ("sluice.connectors.delta.target", "DeltaCdcTarget", "delta"),
    "delta_s3": ("sluice.connectors.delta.target", "DeltaCdcTarget", "delta"),
}

_SUPPORTED = (
    PostgresTarget,
    MySQLTarget,
    SQLiteTarget,
    DuckDBTarget,
    DeltaLocalTarget,
    DeltaS3Target,
)


def build_targets(spec: PipelineSpec) -> list[Target]:
    """One CDC target per ``[target]`` / ``[[targets]]`` of ``spec``, in file order.

    The first one feeds the ``sluice_cdc_*_total`` counters (each target
    gates on its own, so counting all would count a fan-out twice).
    Raises :class:`SluiceError` for a target kind CDC cannot apply to.
    """
    transform = spec.transform
    if transform is None or transform.cdc is None:
        raise SluiceError("build_targets needs a pipeline with [transform.cdc]")
    ctx = Context(spec)
    return [
        _build(target, ctx, index, count=index == 0)
        for index, target in enumerate(spec.all_targets)
    ]


def _build(target: TargetSpec, ctx: Context, index: int, *, count: bool) -> Target:
    entry = _TARGETS.get(target.kind)
    if entry is None or not isinstance(target, _SUPPORTED):
        raise SluiceError(
            f"[transform.cdc] cannot apply changes to a '{target.kind}' target "
            f"(it can to {', '.join(_TARGETS)})"
        )
    module_name, class_name, extra = entry
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("sluice"):
            raise MissingDependencyError(
                f"target kind '{target.kind}' needs the Python package '{exc.name}': "
                f"pip install 'sluice[{extra}]'"
            ) from exc
        raise
    cdc = ctx.pipeline.transform.cdc if ctx.pipeline.transform else None
    assert cdc is not None
    built: Target = getattr(module, class_name)(target, ctx, index, cdc, count=count)
    return built
