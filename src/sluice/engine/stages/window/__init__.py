"""The window stage: event-time tumbling, hopping and session aggregation.

The stage folds Arrow batches into open windows and hands back the windows the
watermark closed. Everything is vectorised: a batch is aggregated with
``pyarrow.Table.group_by`` together with the open-window state (an Arrow table
with one row per open (window, group), holding partial aggregates), so merging
a batch into the state is one hash aggregation with merge functions (sum of
sums, sum of counts, min of mins, first = value at the smallest event time).
A batch costs O(batch + open state). Python loops run per emitted group (HLL
estimates), per distinct string key value (session ids) and per bridged
session, never per row, with one exception: approximate ``count_distinct``.
The ``datasketches`` HLL sketch has no bulk update in Python, so each batch's
*distinct* (group, value) pairs are fed to it one call each (≈0.1 µs a value).

Modules: :mod:`.aggregates` (one class per aggregate kind and the registry
of kinds), :mod:`.assign` (window and session assignment, lateness, session
ids), :mod:`.state` (the open-window store: merge, caps, eviction),
:mod:`.snapshot` (the snapshot blob format) and :mod:`.stage` (the stage).

Semantics (``wm`` is the watermark in µs since the epoch):

* **Time.** The event time is ``event_time_column`` (``_event_ts``): a
  timestamp of any unit, or an integer of µs since the epoch. A null event
  time fails the batch. Windows are half-open ``[start, end)`` in µs.
* **Assignment.** Tumbling: ``start = floor(ts / duration) * duration``.
  Hopping: windows start at multiples of ``hop_ms``; a row joins every window
  ``[start, start + duration)`` that contains it. Session: below.
* **Watermarks.** :meth:`WindowStage.process` judges lateness against the
  stage's own watermark, the largest one it was given before the call
  (``None``: nothing is late), then folds the accepted rows in, then raises
  its watermark to the one passed with the batch (a smaller one is ignored:
  watermarks only advance) and emits against that. :meth:`~WindowStage.advance`
  only raises the watermark and emits.
* **Lateness.** ``L`` is ``allowed_lateness_ms`` under ``late_data = "reopen"``
  and 0 under ``drop`` / ``dlq``. A (row, window) pair is late when
  ``end + L <= wm``. A row is returned in :attr:`WindowOutput.late` when it
  joins no window: tumbling, its window is late; hopping, its newest window
  (the one with the largest start) is late; the older windows it falls in are
  silently skipped when they are late and the newest is not. Session: a row
  is late when ``ts + L <= wm``. (Stricter than "its own session would be
  closed", on purpose: no accepted row can then touch a session that was
  already emitted and dropped from state, so emitted sessions are final.)
* **Emission.** A window is emitted when ``end <= wm``, exactly once under
  ``drop`` / ``dlq``, after which its state is dropped. Under ``reopen`` the
  state is kept until ``end + L <= wm``; a row accepted into an emitted
  window marks it dirty and the window is emitted again, full and corrected,
  at the end of the same call (same start and group keys, so a merge target
  keyed by group + ``window_start`` replaces the earlier row).
* **Sessions.** Per group key, rows whose consecutive event times are at
  most ``gap_ms`` apart form one session, except that a session never
  crosses a multiple of ``max_session_duration_ms`` (``M``) since the Unix
  epoch: rows on either side of such an instant are in different sessions
  however close they are. So no session is longer than ``M`` (a hard
  ceiling, under ``reopen`` too), and sessions depend only on the set of
  accepted rows, not on their arrival order or batch split: a replay after a
  crash rebuilds the same sessions and ids, and the result equals the same
  rule applied to all rows at once. (A cut anchored at each session's own
  start cannot promise that with mergeable state: a late row that bridges two
  sessions moves the anchor, and rows already folded into aggregates would
  have to be split again.) ``window_start`` is the session's first event
  time, ``window_end`` is ``min(last event time + gap_ms, the next multiple
  of M)``: the earliest event time that can no longer join it. A row that
  closes the gap between two open (or, under ``reopen``, retained) sessions
  bridges them into one. ``session_id`` is a stable 64-bit hash (``uint64``)
  of the group key values and the session start; a reopened session whose
  start moved, or that was bridged into an earlier one, is re-emitted under
  the new id and its old row is not retracted.
* **Aggregates** (SQL null semantics): ``count`` counts rows, ``count_col``
  non-null values, ``sum`` / ``avg`` / ``min`` / ``max`` skip nulls and are
  null when every value is; ``first`` / ``last`` are the value (null or not)
  of the row with the smallest / largest event time, ties broken by arrival
  order (``first`` takes the earliest-arriving, ``last`` the latest);
  ``count_distinct`` counts distinct non-null values, exactly (state bounded
  by ``max_distinct_values_per_group``, exceeding it fails) or with an HLL
  sketch (``lg_k`` 12: relative standard error ≈ 1.6 %).
* **Output.** ``window_start``, ``window_end`` (``timestamp[us]`` in the event
  time's time zone, UTC for an integer event time), ``session_id``
  (``uint64``, sessions only), the group keys (input types), then the
  aggregates in configuration order: ``count`` / ``count_col`` /
  ``count_distinct`` ``int64``; ``sum`` ``int64`` for signed integers,
  ``uint64`` for unsigned ones, ``float64`` for floats, Arrow's decimal sum
  type for decimals; ``avg`` ``float64``;
  ``min`` / ``max`` / ``first`` / ``last`` the input type. Rows are ordered by
  window start, window end, then group keys. A null group key is a key.
* **Caps.** More than ``max_groups_per_window`` groups in one tumbling or
  hopping window, or more open sessions than that, fails the batch.

* **Restart safety** is the caller's: commit a batch only once its largest
  event time is below :meth:`WindowStage.open_floor_us`, store the watermark
  with the commit, and after a restart call :meth:`WindowStage.advance` with
  it before the first batch, so replayed rows of windows that were already
  emitted are late instead of re-emitting those windows without their
  committed rows.
* **Snapshots.** Alternatively the caller stores :meth:`WindowStage.snapshot`
  (state key ``"window"`` → the whole state and the watermark) with the source
  positions in one transaction and feeds it to :meth:`WindowStage.restore` on
  start, before the first batch: the restored stage then emits exactly what
  the snapshotting one would have for the rows read after it, and nothing
  needs replaying.

Every failure of :meth:`~WindowStage.process` and :meth:`~WindowStage.restore`
is a :class:`StageError` and leaves the state as it was before the call, so
the run loop may apply ``on_error`` to the batch and go on (or, for a
snapshot it cannot restore, stop with the message).
"""

from sluice.engine.stages.window.stage import WindowOutput, WindowStage

__all__ = ["WindowOutput", "WindowStage"]
