"""Logging for ``flow``: human text (the default) or one JSON object per line.

``--log-format json`` (``SLUICE_LOG_FORMAT=json``) is for containers whose
logs a collector parses: every line is an object with ``ts`` (RFC 3339, UTC),
``level``, ``logger``, ``msg``, the ``pipeline`` being run, and the
structured fields a message carries (``source``, ``partition``, ``offset``,
``target``, ...; passed as ``extra=``). Exceptions go in ``exc`` as text.

Quiet by default: INFO says when a pipeline starts and stops and what it
did; warnings and errors say what went wrong. The Kafka client's own
chatter is kept at ERROR.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, Final, TextIO

FORMATS: Final = ("text", "json")
LEVELS: Final = ("debug", "info", "warning", "error")

#: Fields a record may carry (``extra=``) that a JSON line shows.
FIELDS: Final = ("pipeline", "source", "partition", "offset", "target", "rows", "attempt")

_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_bound: dict[str, str] = {}  # fields stamped on every record (the pipeline)


class _Context(logging.Filter):
    """Stamps the bound fields (the pipeline being run) on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _bound.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record; see the module docstring."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Route every ``sluice`` (and library) record to ``stream`` (stderr) in ``fmt``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    handler.addFilter(_Context())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("sluice.connectors.kafka.source").setLevel(logging.ERROR)


def bind(pipeline: str | None) -> None:
    """Name the pipeline every following record is about."""
    if pipeline is None:
        _bound.pop("pipeline", None)
    else:
        _bound["pipeline"] = pipeline
