"""Message-triggered workflows: the source behind ``on_message`` and the
message a firing hands its jobs.

``on_message`` takes the streaming API's :class:`sluice.Source` (a named
connection or :class:`~sluice.Connection` plus ``query`` = the topic / queue
/ subscription, and the kind's source keys); the source connector is built
through the registry exactly as ``flow consume`` builds it, as the consumer
group ``sluice-workflow-<name>`` unless the source names its own
(``group_id=``).

While a workflow runs for a message, :func:`current_message` returns it
(a job body yielding batches reads it), and ``$message`` in a job's SQL is
replaced by the decoded message as a JSON string literal.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sluice.errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    from sluice.api.pipeline import Source
    from sluice.connectors.api import Source as SourceConnector

PLACEHOLDER = "$message"


@dataclass(frozen=True)
class Message:
    """One message that fired a workflow.

    ``value`` is the decoded row (the source's format: JSON objects become
    dicts); ``raw`` the undecoded payload when the source keeps it; ``where``
    names its place (``topic t partition 0 offset 12``); ``partition`` and
    ``offset`` are its position key and offset (``None`` when unknown)."""

    value: dict[str, Any]
    where: str
    raw: bytes | None = None
    partition: str | None = None
    offset: int | str | None = None

    def json(self) -> str:
        return json.dumps(self.value, default=str, sort_keys=True)


_current: contextvars.ContextVar[Message | None] = contextvars.ContextVar(
    "sluice_message", default=None
)


def current_message() -> Message | None:
    """The message the running workflow fired for (``None`` outside one)."""
    return _current.get()


@contextmanager
def handing(message: Message) -> Iterator[None]:
    """Make ``message`` the :func:`current_message` for the block."""
    token = _current.set(message)
    try:
        yield
    finally:
        _current.reset(token)


def render(sql: str) -> str:
    """``sql`` with ``$message`` replaced by the current message as a JSON
    string literal; unchanged outside a message-triggered run."""
    if PLACEHOLDER not in sql:
        return sql
    msg = _current.get()
    if msg is None:
        from sluice.jobs.db import JobError

        raise JobError("the query uses $message but the run was not fired by a message")
    return sql.replace(PLACEHOLDER, "'" + msg.json().replace("'", "''") + "'")


def check(value: Any, where: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` can be an ``on_message`` source."""
    from sluice.api.pipeline import Source

    if isinstance(value, Source):
        if not value.table().get("query"):
            raise ConfigError(
                [ConfigProblem(where, "on_message", "the Source needs query= (topic / queue)")]
            )
        return
    raise ConfigError(
        [
            ConfigProblem(
                where,
                "on_message",
                f"expected sluice.Source(connection, query='topic'), got {type(value).__name__}",
            )
        ]
    )


def build_source(workflow: str, source: Source) -> SourceConnector:
    """The source connector for ``on_message=source``, as ``flow consume`` builds it."""
    from sluice.api.pipeline import pipeline_data
    from sluice.config.load import load_data
    from sluice.connectors import registry

    name = f"sluice-workflow-{workflow}"
    query = source.table().get("query")
    data = pipeline_data(name, source=source, source_query=query)
    data["source"].pop("query", None)
    # The config wants a target; the workflow's jobs are the target, this one is never built.
    data["target"] = {"kind": "sqlite", "path": "unused.sqlite", "table": {"name": "t"}}
    spec = load_data(data, f"<workflow {workflow} on_message>", base_dir=".")
    (src,) = spec.all_sources
    return registry.build_source(src, registry.Context(spec))


def rows(table: Any) -> list[dict[str, Any]]:
    """The decoded rows of a batch's table, without the source's ``_event_ts``."""
    from sluice.connectors.api import EVENT_TS

    if EVENT_TS in table.column_names:
        table = table.drop_columns([EVENT_TS])
    out: list[dict[str, Any]] = table.to_pylist()
    return out
