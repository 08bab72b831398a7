"""Column types for ``@sluice.table`` classes (see :mod:`sluice.jobs.types`)."""

from sluice.jobs.types import *  # noqa: F403
from sluice.jobs.types import __all__ as _all

__all__ = list(_all)
