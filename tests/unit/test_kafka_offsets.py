"""The offsets a Kafka batch hands its decoder: read from the messages only
when a decoder asks (CDC's), and then as every consumer of a sequence expects."""

from __future__ import annotations

import numpy as np

from sluice.connectors.kafka.source import _Offsets


class Message:
    """What the source reads of a confluent-kafka message here: its offset."""

    calls = 0

    def __init__(self, offset: int) -> None:
        self._offset = offset

    def offset(self) -> int:
        Message.calls += 1
        return self._offset


def test_offsets_are_read_only_when_asked_for_and_then_once() -> None:
    Message.calls = 0
    offsets = _Offsets([Message(o) for o in (7, 8, 12)])
    assert len(offsets) == 3
    assert Message.calls == 0  # a decoder that ignores them costs nothing
    assert offsets[0] == 7
    assert offsets[-1] == 12
    assert offsets[1:] == [8, 12]
    assert list(offsets) == [7, 8, 12]
    assert np.array_equal(np.asarray(offsets, dtype=np.int64)[[2, 0]], [12, 7])
    assert Message.calls == 3
