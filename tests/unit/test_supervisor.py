"""Restart backoff of `flow consume --restart-on-error`."""

from __future__ import annotations

from sluice.engine.consume import SupervisorOptions, jittered, next_backoff_ms


def test_backoff_doubles_from_the_initial_value_up_to_the_cap() -> None:
    opts = SupervisorOptions(initial_backoff_ms=1_000, max_backoff_ms=5_000)
    waits, b = [], None
    for _ in range(5):
        b = next_backoff_ms(b, opts)
        waits.append(b)
    assert waits == [1_000, 2_000, 4_000, 5_000, 5_000]


def test_jitter_stays_within_twenty_percent() -> None:
    samples = [jittered(1_000) for _ in range(200)]
    assert all(0.8 <= s <= 1.2 for s in samples)
    assert len(set(samples)) > 1


def test_consume_drains_a_bounded_run_unless_told_not_to() -> None:
    from sluice.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["consume", "p.toml", "--stop-after-idle-ms", "500"])
    assert args.stop_after_idle_ms == 500 and args.no_drain is False
    args = parser.parse_args(["consume", "p.toml", "--stop-after-idle-ms", "500", "--no-drain"])
    assert args.no_drain is True
