"""What a connector package declares about itself: its ``CONNECTOR`` descriptor.

Every ``sluice.connectors.<kind>`` package exports one :class:`Connector`:
the kinds it answers to (the tags of its spec structs), the pip extra that
installs its library, its spec classes per role, what its implemented code can
do (:class:`Capabilities`), where its code lives (``"module:attribute"``
strings, imported only when a pipeline uses the kind, so a missing library
costs nothing until then) and its own cross-rules. The engine asks these,
never a kind name; :mod:`sluice.connectors.registry` holds the list.

This module imports no connector and no engine code, so a connector's
``__init__`` can import it while the registry is being built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sluice.config.base import LookupSpec, SourceSpec, TargetSpec

#: A problem found by a cross-rule: (key path, message).
Problem = tuple[str, str]
#: Reports one problem.
Add = Callable[[Problem], None]
#: A connector's cross-rule: ``rule(at, table, add)`` checks one raw
#: ``[source]`` / ``[target]`` / lookup table of the connector's kind found at
#: key path ``at`` (the data is raw TOML, checked defensively: a wrong type is
#: the type walk's problem, not the rule's).
Rule = Callable[[str, dict[str, Any], Add], None]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the connector's implemented code can do. Only true flags are set.

    Source side: ``seekable`` (positions resume a reopened source and a
    rewind re-reads from them), ``ack_only`` (messages are acknowledged and
    cannot be replayed: a window or join needs a ``[state_store]``),
    ``partitioned`` (a consumer group assigns partitions; a new assignment
    starts a new epoch). Target side: ``table`` (writes a keyed
    ``[target.table]``), ``merge`` (``mode = "merge"`` upserts on the key),
    ``cdc`` (applies ``[transform.cdc]`` change streams),
    ``transactional_positions`` (stores source positions in the transaction
    of its rows, :mod:`sluice.connectors.sql.positions`: a stateless pipeline
    from seekable sources into it is exactly-once). ``lookup``: loads
    ``[transform.lookups]`` tables. ``dead_letters``: holds dead letters
    (see :class:`DeadLetters`).
    """

    seekable: bool = False
    ack_only: bool = False
    partitioned: bool = False
    table: bool = False
    merge: bool = False
    cdc: bool = False
    transactional_positions: bool = False
    lookup: bool = False
    dead_letters: bool = False


@dataclass(frozen=True, slots=True)
class DeadLetters:
    """How a connector holds dead letters (``dlq_store = "<kind>:<destination>"``).

    ``word`` is the reference daemon's ``dlq_store`` word this connector
    serves (``"topic"`` or ``"table"``). The destination is reached through
    the connection of a spec of ``role`` in the pipeline (a Kafka *source*'s
    brokers, a Postgres *target*'s database). ``sink(spec, destination)``
    (``"module:attribute"``) builds the
    :class:`~sluice.engine.dlq.DeadLetterSink`. ``own(spec)`` is the
    destination a spec names for its own records (a Kafka source's
    ``dead_letter_topic``); ``default(spec)`` the destination used when the
    file names only the word or ``auto``.
    """

    word: str
    role: str
    destination: str
    pattern: str
    sink: str
    own: Callable[[Any], str | None] | None = None
    default: Callable[[Any], str] | None = None


@dataclass(frozen=True, slots=True)
class Connector:
    """One connector package's declaration (its ``CONNECTOR``).

    A role whose entry point is ``None`` is configuration-only today: the
    spec validates, and building it raises "... is not implemented yet".
    """

    name: str
    extra: str
    sources: tuple[type[SourceSpec], ...] = ()
    targets: tuple[type[TargetSpec], ...] = ()
    lookups: tuple[type[LookupSpec], ...] = ()
    capabilities: Capabilities = Capabilities()
    source: str | None = None
    #: Builds several sources of this kind that read through one reader (a
    #: pipeline run as replicas reads every topic through one consumer, so
    #: partition p of each lands on the same replica): ``(specs, ctx) -> sources``.
    shared_sources: str | None = None
    target: str | None = None
    cdc_target: str | None = None
    lookup: str | None = None
    dead_letters: DeadLetters | None = None
    source_rules: tuple[Rule, ...] = ()
    target_rules: tuple[Rule, ...] = ()
    lookup_rules: tuple[Rule, ...] = ()
    cdc_rules: tuple[Rule, ...] = field(default=())

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every ``kind`` this connector answers to, in declaration order."""
        tags = [str(s.__struct_config__.tag) for s in (*self.sources, *self.targets, *self.lookups)]
        return tuple(dict.fromkeys(tags))

    def rules(self, role: str) -> tuple[Rule, ...]:
        """The cross-rules of one role (``source``, ``target``, ``lookup``, ``cdc``)."""
        return {
            "source": self.source_rules,
            "target": self.target_rules,
            "lookup": self.lookup_rules,
            "cdc": self.cdc_rules,
        }[role]


def url_rule(key: str, schemes: tuple[str, ...], article: str = "a") -> Rule:
    """A cross-rule: ``key``, when set, is a URL with one of ``schemes``."""
    from sluice.config.redact import redact_text

    def rule(at: str, table: dict[str, Any], add: Add) -> None:
        url = table.get(key)
        if isinstance(url, str) and url and not url.startswith(schemes):
            add(
                (
                    f"{at}.{key}",
                    f'expected {article} {" or ".join(schemes)} URL, got "{redact_text(url)}"',
                )
            )

    return rule
