"""Tools to test sluice connectors and pipelines.

* In-memory connectors: :class:`MemorySource` (over a :class:`MemoryStream`),
  :class:`MemoryTarget`, and :class:`FlakyTarget` to inject transient failures.
* Conformance suites, written once and run by every connector against its
  real system: :data:`SOURCE_CHECKS`, :data:`TARGET_CHECKS`,
  :data:`CDC_CHECKS` (and :data:`ACK_ONLY_SOURCE_CHECKS` for sources that
  cannot seek, :data:`APPEND_TARGET_CHECKS` for targets without merge: files,
  queues, topics,
  :data:`POSITIONS_CHECKS` for targets recording positions), each a tuple of named :class:`Check` s that take a
  harness (:class:`SourceHarness`, :class:`TargetHarness`,
  :class:`CdcTargetHarness`). Run them one per test (pytest
  ``parametrize`` over the tuple) or all at once with :func:`run_all`.
"""

from sluice.testing.checks import Check, commit, run_all
from sluice.testing.harness import (
    CdcTargetHarness,
    SourceHarness,
    TargetHarness,
    load_pipeline,
    unique,
)
from sluice.testing.memory import FlakyTarget, MemorySource, MemoryStream, MemoryTarget
from sluice.testing.sources import ACK_ONLY_SOURCE_CHECKS, SOURCE_CHECKS
from sluice.testing.targets import (
    APPEND_TARGET_CHECKS,
    CDC_CHECKS,
    POSITIONS_CHECKS,
    TARGET_CHECKS,
)

__all__ = [
    "ACK_ONLY_SOURCE_CHECKS",
    "APPEND_TARGET_CHECKS",
    "CDC_CHECKS",
    "POSITIONS_CHECKS",
    "SOURCE_CHECKS",
    "TARGET_CHECKS",
    "CdcTargetHarness",
    "Check",
    "FlakyTarget",
    "MemorySource",
    "MemoryStream",
    "MemoryTarget",
    "SourceHarness",
    "TargetHarness",
    "commit",
    "load_pipeline",
    "run_all",
    "unique",
]
