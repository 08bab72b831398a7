"""The window stage: event-time tumbling, hopping and session aggregation.

The stage folds Arrow batches into open windows and hands back the windows the
watermark closed. Everything is vectorised: a batch is aggregated with
``pyarrow.Table.group_by`` together with the open-window state (an Arrow table
with one row per open (window, group), holding partial aggregates), so merging
a batch into the state is one hash aggregation with merge functions (sum of
sums, sum of counts, min of mins, first = value at the smallest event time).
A batch costs O(batch + open state). Python loops run per emitted group (HLL
estimates), per distinct string key value (session ids), per bridged session
or item of an emitted session (HLL unions) and per cap split of the longest
run of rows without a gap (each step over all keys at once), never per row,
with one exception: approximate ``count_distinct``.
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
  already emitted and dropped from state, so emitted sessions are final,
  and every row at or before ``wm - L`` is known: sessions settle there.)
* **Emission.** A window is emitted when ``end <= wm``, exactly once under
  ``drop`` / ``dlq``, after which its state is dropped. Under ``reopen`` the
  state is kept until ``end + L <= wm``; a row accepted into an emitted
  window marks it dirty and the window is emitted again, full and corrected,
  at the end of the same call (same start and group keys, so a merge target
  keyed by group + ``window_start`` replaces the earlier row).
* **Sessions.** Per group key, take the accepted rows in event-time order.
  A session opens at the first row; a row joins the open session when it is
  at most ``gap_ms`` after the previous row *and* earlier than the session's
  start + ``max_session_duration_ms`` (``M``); otherwise it opens the next
  session. So a session ends after more than ``gap_ms`` of silence or at
  its own start + ``M``, whichever comes first, and a row exactly ``gap_ms``
  after the previous one joins while a row exactly at start + ``M`` opens
  the next session (``M`` is a hard ceiling, under ``reopen`` too, measured
  from the session's start, not from the epoch: a session may span any hour
  or day boundary). ``window_start`` is the session's first event time,
  ``window_end`` its close boundary ``min(last event time + gap_ms, start +
  M)`` (the guide's ``last_event_ts + gap_ms``, never past the cap), so
  ``window_end - window_start <= M``. Sessions depend only on the set of
  accepted rows, not on their arrival order or batch split (which rows are
  accepted does, through lateness), and a restart from a snapshot or a
  replay rebuilds the same sessions and ids.

  How, with mergeable state: a later row can only have an event time above
  ``ref = wm - L``, so a session that *starts* at or before ``ref`` can no
  longer move its start, lose a row or be split, and is folded into one
  state row. The rows of a session that starts after ``ref`` are kept one
  state row each until it is settled: a later row may still bridge it into
  an earlier session, which moves its start and so where ``M`` cuts it.
  Every call re-derives the sessions of the open state and the new rows,
  so a bridge re-applies the cap from the merged session's start. Under
  ``reopen`` a row within ``gap_ms`` of two sessions bridges them and the
  merged session is emitted again (guide: "Out-of-order session merging");
  a session whose start moved, or that was bridged into an earlier one or
  re-cut by the cap, is re-emitted under its new start and id, and its old
  row is not retracted. ``session_id`` is a stable 64-bit hash (``uint64``)
  of the group key values and the session start. A session is emitted when
  ``window_end <= wm`` and it changed since its last emission.
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
  hopping window, or more sessions than that still open after the call,
  fails the batch.

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
  needs replaying. A session snapshot of format 1 (written before sessions
  were cut from their start) restores too: each stored session becomes one
  settled state row, so it is exact unless the new rule would cut inside a
  stored session (possible only where format 1 cut at an epoch multiple):
  that session is then kept whole, as its rows can no longer be split.

Every failure of :meth:`~WindowStage.process` and :meth:`~WindowStage.restore`
is a :class:`StageError` and leaves the state as it was before the call, so
the run loop may apply ``on_error`` to the batch and go on (or, for a
snapshot it cannot restore, stop with the message).
"""

from sluice.engine.stages.window.stage import WindowOutput, WindowStage

__all__ = ["WindowOutput", "WindowStage"]
