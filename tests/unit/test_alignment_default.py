"""Watermark alignment's drift per pipeline: ``[watermark] max_drift_ms``
when set, else on for windows and off for joins (see runner._max_drift_ms)."""

from __future__ import annotations

from sluice.config.spec import WatermarkSpec
from sluice.engine.runner import WINDOW_DRIFT_MS, _max_drift_ms


def test_unset_is_on_for_windows_and_off_for_joins() -> None:
    assert _max_drift_ms(None, window=True, join=False) == WINDOW_DRIFT_MS
    assert _max_drift_ms(WatermarkSpec(), window=True, join=False) == WINDOW_DRIFT_MS
    assert _max_drift_ms(WatermarkSpec(), window=False, join=True) == 0
    assert _max_drift_ms(None, window=False, join=False) == 0


def test_a_set_drift_wins_and_zero_turns_it_off() -> None:
    assert _max_drift_ms(WatermarkSpec(max_drift_ms=60_000), window=False, join=True) == 60_000
    assert _max_drift_ms(WatermarkSpec(max_drift_ms=0), window=True, join=False) == 0
    assert _max_drift_ms(WatermarkSpec(max_drift_ms=60_000), window=False, join=False) == 0
