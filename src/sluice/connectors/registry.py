"""The connector registry: the list of ``CONNECTOR`` descriptors, and nothing else.

Adding a built-in connector is one folder (``sluice/connectors/<kind>/``) and
one line in :data:`BUILTIN`. A connector from outside sluice (a plugin, a
test) calls :func:`register` once, before its pipelines load; from then on
the config unions (:func:`sluice.config.spec.pipeline_type`) accept its kinds
and the builders below construct it.

Everything the engine knows about a kind comes from its descriptor:
the builders import a connector's code only when a pipeline uses it, and a
missing optional library surfaces as :class:`MissingDependencyError` naming
the extra to install.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from sluice.connectors import (
    delta,
    duckdb,
    kafka,
    kinesis,
    mysql,
    object_store,
    postgres,
    pubsub,
    rabbitmq,
    sqlite,
)
from sluice.connectors.api import Source, Target
from sluice.connectors.descriptor import Connector
from sluice.errors import MissingDependencyError, SluiceError

if TYPE_CHECKING:
    import pyarrow as pa

    from sluice.config.base import LookupSpec, SourceSpec, Tagged, TargetSpec
    from sluice.config.spec import CdcSpec, PipelineSpec

#: The built-in connectors. The order is the order kinds are listed in
#: messages and in ``flow schema``.
BUILTIN: tuple[Connector, ...] = (
    postgres.CONNECTOR,
    mysql.CONNECTOR,
    sqlite.CONNECTOR,
    duckdb.CONNECTOR,
    kafka.CONNECTOR,
    rabbitmq.CONNECTOR,
    pubsub.CONNECTOR,
    kinesis.CONNECTOR,
    delta.CONNECTOR,
    object_store.CONNECTOR,
)

_connectors: list[Connector] = list(BUILTIN)
# One entry per register / unregister call: its length tells the config
# whether the unions it built are still current.
_changes: list[Connector] = []


def register(connector: Connector) -> None:
    """Add a connector from outside the built-in list.

    Its kinds must be new for each role it declares. Pipelines loaded after
    this call accept them (the config unions are rebuilt on the next load).
    Raises :class:`SluiceError` for a kind already taken.
    """
    for role in ("source", "target", "lookup"):
        taken = {str(s.__struct_config__.tag) for c in _connectors for s in _specs(c, role)}
        clash = taken.intersection(str(s.__struct_config__.tag) for s in _specs(connector, role))
        if clash:
            raise SluiceError(f"{role} kind {sorted(clash)[0]!r} is already registered")
    _connectors.append(connector)
    _changes.append(connector)


def unregister(connector: Connector) -> None:
    """Remove a connector added by :func:`register` (tests). Built-ins stay."""
    if connector in BUILTIN:
        raise SluiceError(f"connector {connector.name!r} is built in")
    _connectors.remove(connector)
    _changes.append(connector)


def generation() -> int:
    """A number that changes whenever the list changes (the config caches on it)."""
    return len(_changes)


def connectors() -> tuple[Connector, ...]:
    """Every connector, built-ins first, in registration order."""
    return tuple(_connectors)


def _specs(connector: Connector, role: str) -> tuple[type[Tagged], ...]:
    by_role: dict[str, tuple[type[Tagged], ...]] = {
        "source": connector.sources,
        "target": connector.targets,
        "lookup": connector.lookups,
    }
    return by_role[role]


def specs(role: str) -> list[type[Tagged]]:
    """The spec classes of one role (``source``, ``target``, ``lookup``) over all connectors."""
    return [s for c in _connectors for s in _specs(c, role)]


def of_kind(role: str, kind: object) -> Connector | None:
    """The connector declaring ``kind`` for ``role``, if any (raw config data welcome)."""
    for c in _connectors:
        if any(s.__struct_config__.tag == kind for s in _specs(c, role)):
            return c
    return None


def of(spec: Tagged) -> Connector:
    """The connector a built spec belongs to."""
    for c in _connectors:
        if type(spec) in (*c.sources, *c.targets, *c.lookups):
            return c
    raise SluiceError(f"no connector declares {type(spec).__name__}")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class Context:
    """What a connector may know about the pipeline it serves."""

    pipeline: PipelineSpec
    source_id: str = ""


def resolve(entry: str, kind: str, role: str, extra: str) -> Any:
    """Import ``"module:attribute"``; a missing library names the extra to install."""
    module_name, _, attribute = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith(("sluice", "tests")):
            raise MissingDependencyError(
                f"{role} kind '{kind}' needs the Python package '{exc.name}': "
                f"pip install 'sluice[{extra}]'"
            ) from exc
        raise
    return getattr(module, attribute)


def _entry(spec: Tagged, role: str, entry: str | None) -> Any:
    connector = of(spec)
    if entry is None:
        raise SluiceError(
            f"{role} kind '{spec.kind}' is not implemented yet in this version of sluice"
        )
    return resolve(entry, spec.kind, role, connector.extra)


def build_source(spec: SourceSpec, ctx: Context) -> Source:
    """The source connector for ``spec``."""
    source: Source = _entry(spec, "source", of(spec).source)(spec, ctx)
    return source


def build_sources(specs: Sequence[SourceSpec], ctx: Context, *, shared: bool) -> list[Source]:
    """The sources of ``specs``; with ``shared`` (a pipeline run as replicas)
    several of one kind whose connector can read them through one reader do
    (``Connector.shared_sources``), so their partitions are assigned together."""
    kinds = {of(s) for s in specs}
    if shared and len(specs) > 1 and len(kinds) == 1:
        connector = next(iter(kinds))
        if connector.shared_sources is not None:
            build = resolve(connector.shared_sources, specs[0].kind, "source", connector.extra)
            built: list[Source] = build(specs, ctx)
            return built
    return [build_source(s, ctx) for s in specs]


def build_target(spec: TargetSpec, ctx: Context, index: int) -> Target:
    """The target connector for ``spec`` (``index`` = its place in the file)."""
    target: Target = _entry(spec, "target", of(spec).target)(spec, ctx, index)
    return target


def cdc_kinds() -> list[str]:
    """The target kinds that apply ``[transform.cdc]``, in registry order."""
    return [
        str(s.__struct_config__.tag) for c in _connectors if c.capabilities.cdc for s in c.targets
    ]


def build_cdc_target(
    spec: TargetSpec, ctx: Context, index: int, cdc: CdcSpec, *, count: bool
) -> Target:
    """The target that applies ``cdc`` change streams to ``spec``'s table.

    Raises :class:`SluiceError` for a target kind without the ``cdc`` capability.
    """
    connector = of(spec)
    if not connector.capabilities.cdc or connector.cdc_target is None:
        raise SluiceError(
            f"[transform.cdc] cannot apply changes to a '{spec.kind}' target "
            f"(it can to {', '.join(cdc_kinds())})"
        )
    factory = resolve(connector.cdc_target, spec.kind, "target", connector.extra)
    built: Target = factory(spec, ctx, index, cdc, count=count)
    return built


def load_lookup(spec: LookupSpec) -> pa.Table:
    """Read one lookup table whole with its connector's loader."""
    connector = of(spec)
    loaded: pa.Table = _entry(spec, "lookup", connector.lookup)(spec)
    return loaded


def union(role: str) -> Any:
    """The msgspec tagged union of every spec class of ``role``, in registry order."""
    return Union[tuple(specs(role))]  # noqa: UP007 - a union built at runtime
