"""Find the connector of a ``kind``, importing its module only when needed.

A connector module exposes ``build_source(spec, ctx)`` and/or
``build_target(spec, ctx)``. A missing optional library surfaces as
:class:`MissingDependencyError` naming the extra to install.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from sluice.config.spec import PipelineSpec
from sluice.config.spec import Source as SourceSpecT
from sluice.config.spec import Target as TargetSpecT
from sluice.connectors.api import Source, Target
from sluice.errors import MissingDependencyError, SluiceError

# kind -> (module, extra that installs its library)
_SOURCES: dict[str, tuple[str, str]] = {
    "kafka": ("sluice.connectors.kafka.source", "kafka"),
    "object_store_local": ("sluice.connectors.files.source", "all"),
}
_TARGETS: dict[str, tuple[str, str]] = {
    "postgres": ("sluice.connectors.postgres.target", "postgres"),
    "mysql": ("sluice.connectors.mysql.target", "mysql"),
    "sqlite": ("sluice.connectors.sql.embedded", "all"),
    "duckdb": ("sluice.connectors.sql.embedded", "duckdb"),
    "delta_local": ("sluice.connectors.delta.target", "delta"),
    "delta_s3": ("sluice.connectors.delta.target", "delta"),
}


@dataclass(frozen=True, slots=True)
class Context:
    """What a connector may know about the pipeline it serves."""

    pipeline: PipelineSpec
    source_id: str = ""


def _module(table: dict[str, tuple[str, str]], kind: str, role: str) -> Any:
    entry = table.get(kind)
    if entry is None:
        raise SluiceError(f"{role} kind '{kind}' is not implemented yet in this version of sluice")
    module, extra = entry
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("sluice"):
            raise MissingDependencyError(
                f"{role} kind '{kind}' needs the Python package '{exc.name}': "
                f"pip install 'sluice[{extra}]'"
            ) from exc
        raise


def build_source(spec: SourceSpecT, ctx: Context) -> Source:
    """The source connector for ``spec``."""
    source: Source = _module(_SOURCES, spec.kind, "source").build_source(spec, ctx)
    return source


def build_target(spec: TargetSpecT, ctx: Context, index: int) -> Target:
    """The target connector for ``spec`` (``index`` = its place in the file)."""
    target: Target = _module(_TARGETS, spec.kind, "target").build_target(spec, ctx, index)
    return target
