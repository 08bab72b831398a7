"""Watermarks over partitions: an assigned partition holds the watermark
from its assignment until it delivers, or until it has been silent for
``source_idleness_ms`` *and* its source reports it caught up (lag 0).
"""

from __future__ import annotations

import pyarrow as pa

from sluice.connectors.api import EVENT_TS_TYPE
from sluice.engine.watermark import Watermarks

T0 = 1_700_000_000_000_000
DAY_US = 86_400_000_000


def _ts(*us: int) -> pa.Array:
    return pa.array(list(us), pa.int64()).cast(EVENT_TS_TYPE)


def _parts(*names: str) -> pa.Array:
    return pa.array(list(names)).dictionary_encode()


def _marks(clock: list[float], idle_ms: int = 1_000) -> Watermarks:
    return Watermarks(["k"], lateness_ms=0, idle_after_ms=idle_ms, clock=lambda: clock[0])


def test_assigned_partitions_hold_before_they_deliver_anything() -> None:
    clock = [0.0]
    marks = _marks(clock)
    marks.assign("k", ["t:0", "t:1", "t:2"])
    marks.report_lag("k", {"t:0": 0, "t:1": 500_000, "t:2": 500_000})
    # Partition 0 delivered everything, closing event a day later included.
    marks.observe("k", _ts(T0, T0 + DAY_US), _parts("t:0", "t:0"), ["t:0", "t:1", "t:2"])
    assert marks.global_us() is None
    clock[0] = 3_600.0  # an hour later the broker still serves partition 0's neighbours slowly
    assert marks.global_us() is None  # a backlog is never idle, whatever the clock
    marks.observe("k", _ts(T0 + 5), _parts("t:1"), ["t:0", "t:1", "t:2"])
    marks.report_lag("k", {"t:0": 0, "t:1": 1, "t:2": 500_000})
    assert marks.global_us() is None  # t:2 still holds
    marks.observe("k", _ts(T0 + 7), _parts("t:2"), ["t:0", "t:1", "t:2"])
    assert marks.global_us() == T0 + 5


def test_a_partition_not_measured_yet_counts_as_behind() -> None:
    clock = [0.0]
    marks = _marks(clock)
    marks.assign("k", ["t:0", "t:1"])
    marks.observe("k", _ts(T0 + DAY_US), _parts("t:0"), ["t:0", "t:1"])
    marks.report_lag("k", {"t:0": 0})  # the broker has not answered for t:1
    clock[0] = 10.0
    marks.observe("k", _ts(T0 + DAY_US + 1), _parts("t:0"), ["t:0", "t:1"])
    assert marks.global_us() is None
    marks.report_lag("k", {"t:0": 0, "t:1": 0})
    assert marks.global_us() == T0 + DAY_US + 1  # now t:1 is silent and caught up: idle


def test_an_empty_caught_up_partition_goes_idle_after_the_timeout_only() -> None:
    clock = [0.0]
    marks = _marks(clock)
    marks.assign("k", ["t:0", "t:1"])
    marks.report_lag("k", {"t:0": 0, "t:1": 0})
    marks.observe("k", _ts(T0 + 9), _parts("t:0"), ["t:0", "t:1"])
    clock[0] = 0.5
    assert marks.global_us() is None  # caught up, but not silent long enough
    clock[0] = 1.5
    marks.observe("k", _ts(T0 + 10), _parts("t:0"), ["t:0", "t:1"])
    assert marks.global_us() == T0 + 10


def test_assignment_starts_the_clock_and_a_revoked_partition_stops_counting() -> None:
    clock = [0.0]
    marks = _marks(clock)
    marks.observe("k", _ts(T0 + 9), _parts("t:0"), ["t:0"])
    assert marks.global_us() == T0 + 9
    clock[0] = 5.0
    marks.assign("k", ["t:0", "t:1"])  # t:1 arrives with a rebalance: holds from now
    marks.report_lag("k", {"t:0": 0, "t:1": 0})
    marks.observe("k", _ts(T0 + 20), _parts("t:0"), ["t:0", "t:1"])
    assert marks.global_us() == T0 + 9
    clock[0] = 6.5
    marks.observe("k", _ts(T0 + 21), _parts("t:0"), ["t:0", "t:1"])
    assert marks.global_us() == T0 + 21  # t:1 idle 1.5 s after its assignment
    marks.assign("k", [])  # an empty assignment (rejoining) changes nothing
    marks.assign("k", ["t:0"])
    marks.observe("k", _ts(T0 + 30), _parts("t:0"), ["t:0"])
    assert marks.global_us() == T0 + 30


def test_a_claimed_partition_assigned_elsewhere_holds_the_watermark() -> None:
    # A killed predecessor's consumer holds t:1 until its session times out:
    # the range assignor gave this process t:0 only. t:1 is the pipeline's all
    # the same, and its rows must not be late when it comes back.
    clock = [0.0]
    marks = _marks(clock)
    marks.claim("k", ["t:0", "t:1"])
    marks.assign("k", ["t:0"])
    marks.report_lag("k", {"t:0": 0})
    marks.observe("k", _ts(T0 + 50), _parts("t:0"), ["t:0"])
    clock[0] = 3_600.0  # not measured (not assigned here): never idle
    marks.observe("k", _ts(T0 + 60), _parts("t:0"), ["t:0"])
    assert marks.global_us() is None
    marks.assign("k", ["t:0", "t:1"])  # the dead member left: t:1 comes back
    marks.observe("k", _ts(T0 + 7), _parts("t:1"), ["t:0", "t:1"])
    assert marks.global_us() == T0 + 7
    marks.reset()  # a read-again measures afresh: the claim stays
    marks.observe("k", _ts(T0 + 90), _parts("t:0"), ["t:0"])
    assert marks.global_us() is None


def test_a_source_reporting_a_backlog_is_not_idle() -> None:
    clock = [0.0]
    marks = Watermarks(["a", "b"], idle_after_ms=1_000, clock=lambda: clock[0])
    marks.observe("a", _ts(T0 + 9))
    marks.report_lag("b", {"b:0": 3})
    clock[0] = 2.0
    marks.observe("a", _ts(T0 + 10))
    assert marks.global_us() is None  # b holds 3 unread records
    marks.report_lag("b", {"b:0": 0})
    assert marks.global_us() == T0 + 10


def test_event_times_computed_by_sql_raise_each_partition_conservatively() -> None:
    clock = [0.0]
    marks = _marks(clock)
    marks.assign("k", ["t:0", "t:1"])
    # Rows from both partitions, times not aligned with the partitions: each
    # partition may only be raised to the smallest time.
    marks.observe_unaligned("k", _ts(T0 + DAY_US, T0 + 3), _parts("t:0", "t:1"))
    assert marks.global_us() == T0 + 3
    # One partition alone: its largest time is its own.
    marks.observe_unaligned("k", _ts(T0 + 50, T0 + 40), _parts("t:1", "t:1"))
    assert marks.global_us() == T0 + 3  # t:0 still at T0 + 3
    marks.observe_unaligned("k", _ts(T0 + 60), _parts("t:0"))
    assert marks.global_us() == T0 + 50


def test_alignment_pauses_a_partition_far_ahead_until_it_is_within_half_the_drift() -> None:
    clock = [0.0]
    marks = _marks(clock)
    parts = ["t:0", "t:1"]
    marks.assign("k", parts)
    marks.report_lag("k", {"t:0": 1_000, "t:1": 1_000})
    drift = 1_000
    assert marks.ahead(drift) == {}  # no watermark yet: nothing to align to
    marks.observe("k", _ts(T0, T0 + 5_000), _parts("t:0", "t:1"), parts)
    assert marks.global_us() == T0
    assert marks.ahead(drift) == {"k": {"t:1"}}  # 5 ms ahead of the watermark, 1 ms allowed
    marks.report_lag("k", {"t:0": 0, "t:1": 1_000})
    assert marks.ahead(drift) == {}  # t:0 is caught up: waiting for it would only delay t:1
    marks.report_lag("k", {"t:0": 1_000, "t:1": 1_000})
    assert marks.ahead(0) == {}  # 0: alignment off
    assert marks.ahead(drift) == {"k": {"t:1"}}
    marks.observe("k", _ts(T0 + 4_200), _parts("t:0"), parts)
    assert marks.ahead(drift) == {"k": {"t:1"}}  # 800 us ahead: within the drift, not half
    marks.observe("k", _ts(T0 + 4_600), _parts("t:0"), parts)
    assert marks.ahead(drift) == {}  # 400 us ahead: resumed
    marks.observe("k", _ts(T0 + 4_800), _parts("t:0"), parts)
    assert marks.ahead(drift) == {}  # 200 us: stays resumed (not ahead by more than the drift)
    # Now t:1 holds the watermark: it is fetched, t:0 ran ahead and waits.
    marks.observe("k", _ts(T0 + 90_000), _parts("t:0"), parts)
    assert marks.ahead(drift) == {"k": {"t:0"}}
    assert marks.global_us() == T0 + 5_000
    marks.reset()
    assert marks.ahead(drift) == {}


def test_alignment_without_lag_reports_pauses_nothing() -> None:
    clock = [0.0]
    marks = _marks(clock)
    marks.assign("k", ["t:0", "t:1"])
    marks.observe("k", _ts(T0, T0 + 5_000), _parts("t:0", "t:1"), ["t:0", "t:1"])
    assert marks.ahead(1_000) == {}


# -- the marks a checkpoint stores -------------------------------------------------


def test_a_partition_restored_at_its_end_counts_from_its_stored_event_time() -> None:
    clock = [0.0]
    before = _marks(clock, idle_ms=60_000)
    both = ["t:4", "t:5"]
    before.assign("k", both)
    # t:5 delivered everything, its closing event included; t:4 not yet.
    before.observe("k", _ts(T0, T0 + DAY_US), _parts("t:5", "t:5"), both)
    before.observe("k", _ts(T0 + 60_000_000), _parts("t:4"), both)
    stored = before.snapshot()
    assert set(stored) == {"mark/t:4", "mark/t:5"}

    after = _marks(clock, idle_ms=60_000)  # the process that claims both after a crash
    after.reset()
    after.assign("k", both)
    after.seed(stored)
    assert after.global_us() == T0 + 60_000_000  # without a single delivery
    # t:4's closing event: every window closes, t:5 has nothing left to read.
    after.observe("k", _ts(T0 + DAY_US), _parts("t:4"), both)
    assert after.global_us() == T0 + DAY_US
    # Without the marks, t:5 (at its end offset, never delivering) held it.
    bare = _marks(clock, idle_ms=60_000)
    bare.assign("k", both)
    bare.observe("k", _ts(T0 + DAY_US), _parts("t:4"), both)
    assert bare.global_us() is None


def test_a_partition_without_a_stored_mark_still_holds_the_watermark() -> None:
    clock = [0.0]
    before = _marks(clock)
    before.assign("k", ["t:0"])
    before.observe("k", _ts(T0 + DAY_US), _parts("t:0"), ["t:0"])
    after = _marks(clock)
    after.seed(before.snapshot())
    assert after.global_us() is None  # nothing is assigned yet: the source holds
    after.assign("k", ["t:0", "t:1"])
    assert after.global_us() is None  # t:1 has a backlog nobody measured
    after.observe("k", _ts(T0), _parts("t:1"), ["t:0", "t:1"])
    assert after.global_us() == T0


def test_marks_are_kept_per_owned_partition_and_never_lower_what_was_delivered() -> None:
    clock = [0.0]
    marks = _marks(clock)
    marks.assign("k", ["t:0", "t:1"])
    marks.observe("k", _ts(T0 + 5, T0 + 9), _parts("t:0", "t:1"), ["t:0", "t:1"])
    mine = marks.snapshot({"t:1"})
    assert set(mine) == {"mark/t:1"}
    again = _marks(clock)
    again.assign("k", ["t:1"])
    again.observe("k", _ts(T0 + 20), _parts("t:1"), ["t:1"])
    again.seed(mine)  # older than what t:1 delivered since: kept as it is
    assert again.global_us() == T0 + 20
    again.seed({"window/1": b"not a mark", "mark/t:1": b"{broken"})  # ignored
    assert again.global_us() == T0 + 20
