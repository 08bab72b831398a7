"""Retrying an action on a connector until it succeeds or the pipeline stops.

:class:`Retry` runs a blocking action in a worker thread, reconnects the
endpoint after a :class:`~sluice.errors.TransientError` and tries again, with
exponential backoff and jitter. It returns what the action returned, or
:data:`STOPPED` when a stop was requested while it waited, so callers get
their result back without closures or output lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Callable
from typing import Literal, Protocol, TypeVar

from sluice.engine import metrics as m
from sluice.errors import SluiceError, TransientError

log = logging.getLogger("sluice")

T = TypeVar("T")

FIRST_WAIT_S = 0.5  # first wait after a transient failure
MAX_WAIT_S = 30.0  # waits double up to this; the batch is held, not re-read
NOT_READY_AFTER_S = 60.0  # /readyz turns 503 when an endpoint has been failing this long


class _Stopped(enum.Enum):
    STOPPED = "stopped"


#: What :meth:`Retry.__call__` returns when a stop was requested while waiting.
STOPPED = _Stopped.STOPPED
Stopped = Literal[_Stopped.STOPPED]


class Endpoint(Protocol):
    """What the retry loop needs of a target, a dead-letter sink or a state store."""

    @property
    def id(self) -> str:
        """The endpoint's name in logs and metrics."""

    def open(self) -> None:
        """Connect."""

    def close(self) -> None:
        """Disconnect."""


class Retry:
    """Retries transient failures of one pipeline's endpoints until ``stop`` is set."""

    def __init__(self, pipeline: str, stop: asyncio.Event) -> None:
        self.pipeline = pipeline
        self.stop = stop

    async def __call__(self, endpoint: Endpoint, action: Callable[[], T], what: str) -> T | Stopped:
        """Run ``action`` (in a worker thread) until it succeeds; its result.

        After a :class:`TransientError` the endpoint is closed, the loop waits
        (0.5 s doubling up to 30 s, ±20 % jitter) and, unless ``what`` is
        ``"open"`` (the action connects by itself), reopens the endpoint
        before the next try. :data:`STOPPED` when a stop is requested while
        waiting; any other error propagates.
        """
        backoff = FIRST_WAIT_S
        failing_since: float | None = None
        reopen = False
        while True:
            try:
                if reopen:  # reconnect first: the action needs an open endpoint
                    await asyncio.to_thread(endpoint.open)
                    reopen = False
                return await asyncio.to_thread(action)
            except TransientError as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                m.ERRORS.labels(self.pipeline, "transient").inc()
                m.RETRIES.labels(self.pipeline, endpoint.id).inc()
                if now - failing_since >= NOT_READY_AFTER_S:
                    m.HEALTH.set_ready(False, f"{endpoint.id} failing: {exc}")
                log.warning(
                    "%s %s failed, retrying in %.1fs: %s",
                    endpoint.id,
                    what,
                    backoff,
                    exc,
                    extra={"target": endpoint.id},
                )
                await asyncio.to_thread(quietly, endpoint.close)
                await self.sleep(backoff * random.uniform(0.8, 1.2))
                if self.stop.is_set():
                    return STOPPED
                backoff = min(backoff * 2, MAX_WAIT_S)
                reopen = what != "open"

    async def sleep(self, seconds: float) -> None:
        """Sleep, waking early when a stop is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)


def quietly(action: Callable[[], None]) -> None:
    """Run a closing ``action``, logging (at debug) the connector errors it raises."""
    try:
        action()
    except (SluiceError, OSError) as exc:
        log.debug("ignored while closing: %s", exc)
