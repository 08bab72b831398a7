"""The one exception tree of sluice.

Everything sluice raises on purpose derives from :class:`SluiceError`. The
CLI maps :class:`ConfigError` to exit code 2 and every other
:class:`SluiceError` to exit code 1.
"""

from __future__ import annotations

from dataclasses import dataclass


class SluiceError(Exception):
    """Base class of every error sluice raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem found in one pipeline file.

    ``path`` is the dotted key path (``transform.window.hop_ms``, list items as
    ``sources[1].kind``); empty for a problem with the whole file.
    """

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        if self.path:
            return f"{self.file}: {self.path}: {self.message}"
        return f"{self.file}: {self.message}"


class ConfigError(SluiceError):
    """A pipeline file is invalid. Carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ConnectorError(SluiceError):
    """A source or target failed talking to its system."""


class PositionsMoved(ConnectorError):
    """A target's stored source positions changed under this process since it
    last read or wrote them: another process (a replica the group gave these
    partitions, or one it took them from that is still writing) committed
    rows for them. The round's transaction was rolled back; the run loop
    reads again from what the target holds now."""


class Fenced(ConnectorError):
    """Another process took this one's place (a Kafka producer fenced by a
    newer one with the same ``transactional.id``). The run stops and is never
    restarted in-process: a restart would fence the other in turn."""


class MissingDependencyError(SluiceError):
    """A connector's library is not installed; the message names the extra to install."""


class TransientError(ConnectorError):
    """A failure worth retrying (connection refused, broker or database restarting)."""


class DecodeError(SluiceError):
    """A message could not be decoded; the message names source, partition and offset."""


class StageError(SluiceError):
    """A stage (SQL, window, join, cdc) failed on a batch."""


class AlertError(SluiceError):
    """An alerter could not deliver an alert (the far end refused it or could not be reached)."""


class PipelineStopped(SluiceError):
    """Raised inside the run loop when a stop was requested mid-wait."""
