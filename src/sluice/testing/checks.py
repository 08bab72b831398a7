"""What the suites share: a named check, bounded calls, the one commit call."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from sluice.connectors.api import Batch, Source

H = TypeVar("H")

#: Longest a ``close()`` may take, seconds. A restart closes and reopens its
#: connectors; a close that waits on something (a batch it thinks is still
#: in flight) stalls the restart and the shutdown.
CLOSE_BOUND_S = 5.0


@dataclass(frozen=True, slots=True)
class Check(Generic[H]):
    """One conformance check: ``run(harness)`` raises ``AssertionError`` on failure."""

    name: str
    run: Callable[[H], None]

    def __call__(self, harness: H) -> None:
        self.run(harness)


def run_all(checks: Iterable[Check[H]], harness: H) -> None:
    """Run every check on ``harness`` (without pytest); raises the first failure."""
    for check in checks:
        check(harness)


def commit(source: Source, batch: Batch) -> None:
    """Acknowledge ``batch`` as the engine does after every target flushed it.

    The one place the suites commit: with the batch's ack token.
    """
    source.commit(batch.ack)


def bounded(what: str, call: Callable[[], None], bound_s: float = CLOSE_BOUND_S) -> None:
    """Run ``call`` and fail the check when it has not returned within ``bound_s``.

    The call runs on a daemon thread so a hung one cannot hang the suite.
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # re-raised on the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"conformance {what}", daemon=True)
    thread.start()
    thread.join(bound_s)
    if thread.is_alive():
        raise AssertionError(f"{what} did not return within {bound_s} s")
    if errors:
        raise errors[0]
