"""Crash points for crash tests: ``SLUICE_TEST_KILL_AFTER_<POINT>=N`` makes the
process SIGKILL itself the N-th time it passes ``point``.

A SIGKILL at a chosen instant (right after a Delta commit and before the
broker commit, between a file and its manifest) is what random-timing kills
rarely hit. Unset (production), :func:`reached` costs one dictionary lookup.
"""

from __future__ import annotations

import collections
import os
import signal

_passed: collections.Counter[str] = collections.Counter()


def reached(point: str) -> None:
    """Count a pass through ``point``; SIGKILL the process when its limit is reached."""
    limit = os.environ.get(f"SLUICE_TEST_KILL_AFTER_{point}")
    if not limit:
        return
    _passed[point] += 1
    if _passed[point] >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)
