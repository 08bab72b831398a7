"""Column normalisers for ``@sluice.table`` classes (see :mod:`sluice.jobs.tables`)."""

from sluice.jobs.tables import lower, parse_timestamp, trim

__all__ = ["lower", "parse_timestamp", "trim"]
