"""The target and CDC-target conformance suites, against the real systems.

Each check takes a harness (:class:`~sluice.testing.harness.TargetHarness`
or :class:`~sluice.testing.harness.CdcTargetHarness`), writes to a fresh
table, and compares what the harness reads back through its own connection
with the rows the check computed independently. Values are compared as
Python values (``1 == 1.0``), so each system may pick its column types.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from sluice.connectors.api import Target
from sluice.errors import TransientError
from sluice.testing.checks import Check, bounded
from sluice.testing.harness import CdcTargetHarness, TargetHarness, unique

#: id -> the row's other columns.
Rows = dict[int, dict[str, Any]]


def table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """A batch from rows (every row has the same keys)."""
    return pa.Table.from_pylist([dict(r) for r in rows])


def landed(h: TargetHarness, name: str, columns: Sequence[str]) -> Rows | None:
    """``columns`` of every row of ``name`` by id, read back; None without a table."""
    data = h.read_back(name)
    if data is None:
        return None
    have = set(data.column_names)
    missing = [c for c in ("id", *columns) if c not in have]
    assert not missing, f"{h.name}: table {name} has no column(s) {missing}: {data.column_names}"
    out: Rows = {}
    for row in data.select(["id", *columns]).to_pylist():
        key = int(row.pop("id"))
        assert key not in out, f"{h.name}: id {key} twice in {name}"
        out[key] = row
    return out


def write_flush(target: Target, *batches: pa.Table) -> None:
    """Write ``batches`` then flush, as the engine does for one batch of each."""
    for batch in batches:
        target.write(batch)
    target.flush()


def close(target: Target) -> None:
    """``close()``, which must return promptly."""
    bounded(f"close() of target {target.id}", target.close)


def _named(start: int, count: int, tag: str = "n") -> list[dict[str, Any]]:
    return [{"id": i, "name": f"{tag}{i}"} for i in range(start, start + count)]


def _expect(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Rows:
    return {int(r["id"]): {c: r.get(c) for c in columns} for r in rows}


# -- targets -------------------------------------------------------------------


def creates_table_and_adds_column(h: TargetHarness) -> None:
    """A missing table is created; a batch with a new column adds it."""
    name = h.new_table()
    assert h.read_back(name) is None, f"{h.name}: table {name} exists before the test"
    target = h.build(name)
    target.open()
    try:
        first = _named(0, 3)
        write_flush(target, table(first))
        assert landed(h, name, ["name"]) == _expect(first, ["name"])
        second = [{"id": i, "name": f"n{i}", "note": f"x{i}"} for i in range(3, 5)]
        write_flush(target, table(second))
    finally:
        close(target)
    want = _expect(first, ["name", "note"]) | _expect(second, ["name", "note"])
    assert landed(h, name, ["name", "note"]) == want


def invisible_before_flush(h: TargetHarness) -> None:
    """Rows written are not visible to another connection until ``flush``."""
    name = h.new_table()
    target = h.build(name)
    target.open()
    try:
        write_flush(target, table(_named(0, 2)))
        target.write(table(_named(2, 3)))
        seen = landed(h, name, ["name"])
        assert seen == _expect(_named(0, 2), ["name"]), f"before flush: {seen}"
        target.flush()
        assert landed(h, name, ["name"]) == _expect(_named(0, 5), ["name"])
    finally:
        close(target)

    fresh = h.new_table()
    target = h.build(fresh)
    target.open()
    try:
        target.write(table(_named(0, 2)))
        seen = landed(h, fresh, ["name"])
        assert not seen, f"rows of a new table visible before the first flush: {seen}"
    finally:
        close(target)
    seen = landed(h, fresh, ["name"])
    assert not seen, f"rows written and never flushed survived close: {seen}"


def flush_is_durable(h: TargetHarness) -> None:
    """Flushed rows survive ``close`` and are there for a new connector object."""
    name = h.new_table()
    target = h.build(name)
    target.open()
    try:
        write_flush(target, table(_named(0, 3)))
    finally:
        close(target)
    assert landed(h, name, ["name"]) == _expect(_named(0, 3), ["name"])
    again = h.build(name)  # a restarted process
    again.open()
    try:
        write_flush(again, table(_named(3, 2)))
    finally:
        close(again)
    assert landed(h, name, ["name"]) == _expect(_named(0, 5), ["name"])


def merge_last_row_wins(h: TargetHarness) -> None:
    """``merge``: within a batch the last row of a key wins; a later batch updates."""
    name = h.new_table()
    target = h.build(name, mode="merge", key=["id"])
    target.open()
    try:
        batch = [
            {"id": 1, "name": "a"},
            {"id": 2, "name": "b"},
            {"id": 1, "name": "c"},
            {"id": 3, "name": "d"},
            {"id": 2, "name": "e"},
        ]
        write_flush(target, table(batch))
        assert landed(h, name, ["name"]) == {1: {"name": "c"}, 2: {"name": "e"}, 3: {"name": "d"}}
        write_flush(target, table([{"id": 3, "name": "f"}, {"id": 4, "name": "g"}]))
    finally:
        close(target)
    want = {1: {"name": "c"}, 2: {"name": "e"}, 3: {"name": "f"}, 4: {"name": "g"}}
    assert landed(h, name, ["name"]) == want


def merge_replay_changes_nothing(h: TargetHarness) -> None:
    """``merge``: the same batch written again (a redelivery) changes nothing."""
    name = h.new_table()
    batch = table([{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 1, "name": "c"}])
    target = h.build(name, mode="merge", key=["id"])
    target.open()
    try:
        write_flush(target, batch)
        before = h.read_back(name)
    finally:
        close(target)
    again = h.build(name, mode="merge", key=["id"])  # redelivered after a restart
    again.open()
    try:
        write_flush(again, batch)
    finally:
        close(again)
    after = h.read_back(name)
    assert before is not None and after is not None
    assert after.num_rows == before.num_rows == 2, f"{before.num_rows} then {after.num_rows} rows"
    assert landed(h, name, ["name"]) == {1: {"name": "c"}, 2: {"name": "b"}}


def retry_after_lost_connection(h: TargetHarness) -> None:
    """A dropped connection raises :class:`TransientError`; close + open + the same
    batch again then lands it exactly once.

    Embedded systems have no connection to drop (``has_connection`` False):
    there the write is abandoned by ``close`` before its flush, as a crash
    would, and the retry must land it exactly once all the same.
    """
    name = h.new_table()
    target = h.build(name)
    target.open()
    retry = table(_named(2, 3))
    try:
        write_flush(target, table(_named(0, 2)))
        if h.has_connection:
            killed = h.drop_connection(name)
            assert killed > 0, f"{h.name}: found no connection of the target writing {name}"
            try:
                write_flush(target, retry)
            except TransientError:
                pass
            else:
                raise AssertionError("writing over a dropped connection did not fail transiently")
        else:
            target.write(retry)
        close(target)
        target.open()
        write_flush(target, retry)
    finally:
        close(target)
    assert landed(h, name, ["name"]) == _expect(_named(0, 5), ["name"])


TARGET_CHECKS: tuple[Check[TargetHarness], ...] = (
    Check("creates_table_and_adds_column", creates_table_and_adds_column),
    Check("invisible_before_flush", invisible_before_flush),
    Check("flush_is_durable", flush_is_durable),
    Check("merge_last_row_wins", merge_last_row_wins),
    Check("merge_replay_changes_nothing", merge_replay_changes_nothing),
    Check("retry_after_lost_connection", retry_after_lost_connection),
)
"""Every target check."""


def positions_commit_with_rows(h: TargetHarness) -> None:
    """A target recording positions (``transactional_positions``) holds, after a
    restart, the positions its last flush committed with its rows, and none of
    a flush that never ran; a round without rows commits positions alone."""
    from sluice.connectors.sql.positions import RecordsPositions

    name, pipeline = h.new_table(), unique("p")
    target = h.build(name, pipeline_name=pipeline)
    assert isinstance(target, RecordsPositions), f"{h.name}: the target records no positions"
    target.open()
    try:
        assert target.held_positions() == {}, "a new table holds positions"
        target.stage_positions({"src": {"src:0": 5, "src:1": 2}})
        write_flush(target, table(_named(0, 3)))
        target.stage_positions({"src": {"src:0": 9}})
        target.flush()  # positions alone
        target.stage_positions({"src": {"src:1": 7}})
        target.write(table(_named(3, 2)))  # never flushed: a crash
    finally:
        close(target)
    again = h.build(name, pipeline_name=pipeline)  # the same pipeline, restarted
    assert isinstance(again, RecordsPositions)
    again.open()
    try:
        held = again.held_positions()
    finally:
        close(again)
    assert held == {"src": {"src:0": 9, "src:1": 2}}, f"held after a restart: {held}"
    assert landed(h, name, ["name"]) == _expect(_named(0, 3), ["name"])


APPEND_TARGET_CHECKS: tuple[Check[TargetHarness], ...] = tuple(
    c for c in TARGET_CHECKS if not c.name.startswith("merge")
)
"""The checks of targets without ``mode = "merge"``: files, and targets that
publish messages (a queue, a topic), which have no key to merge on (their
harness reads the messages back as rows)."""

POSITIONS_CHECKS: tuple[Check[TargetHarness], ...] = (
    Check("positions_commit_with_rows", positions_commit_with_rows),
)
"""The checks of targets that record source positions in their commits."""


# -- CDC targets -----------------------------------------------------------------


def envelope(
    op: str, key: int, ts_ms: int, image: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A Debezium change event (``c`` / ``u`` / ``d``) for row ``key`` at ``ts_ms``.

    A delete carries its row as the before image; the others as the after image.
    """
    row = {"id": key, **(image or {})}
    return {
        "before": row if op == "d" else None,
        "after": None if op == "d" else row,
        "op": op,
        "source": {"ts_ms": ts_ms},
    }


#: ``[transform.cdc]`` of the CDC checks (Debezium, key ``after.id``).
CDC = {"envelope": "debezium", "key_field": "after.id"}


def _cdc_target(h: CdcTargetHarness, name: str, **cdc: Any) -> Target:
    target = h.build_cdc(name, {**CDC, **cdc})
    target.open()
    return target


def cdc_replay_changes_nothing(h: CdcTargetHarness) -> None:
    """A change batch applied twice (a redelivery) leaves the mirror as after once."""
    name = h.new_table()
    batch = table(
        [
            envelope("c", 1, 1000, {"name": "a", "qty": 1}),
            envelope("c", 2, 1000, {"name": "b", "qty": 2}),
            envelope("u", 1, 2000, {"name": "a2", "qty": 3}),
            envelope("c", 3, 1000, {"name": "c", "qty": 4}),
            envelope("d", 3, 3000, {"name": "c", "qty": 4}),
        ]
    )
    want = {1: {"name": "a2", "qty": 3}, 2: {"name": "b", "qty": 2}}
    target = _cdc_target(h, name)
    try:
        write_flush(target, batch)
        assert landed(h, name, ["name", "qty"]) == want
    finally:
        close(target)
    again = _cdc_target(h, name)  # redelivered after a restart
    try:
        write_flush(again, batch)
    finally:
        close(again)
    assert landed(h, name, ["name", "qty"]) == want


def cdc_older_event_ignored(h: CdcTargetHarness) -> None:
    """An event older than the one applied for its key changes nothing."""
    name = h.new_table()
    target = _cdc_target(h, name)
    try:
        write_flush(target, table([envelope("c", 1, 5000, {"name": "new", "qty": 2})]))
        write_flush(
            target,
            table(
                [
                    envelope("u", 1, 4000, {"name": "old", "qty": 1}),
                    envelope("c", 2, 4000, {"name": "other", "qty": 7}),
                ]
            ),
        )
    finally:
        close(target)
    want = {1: {"name": "new", "qty": 2}, 2: {"name": "other", "qty": 7}}
    assert landed(h, name, ["name", "qty"]) == want


def cdc_hard_delete(h: CdcTargetHarness) -> None:
    """A hard delete removes the row; an older create re-sent does not bring it back."""
    name = h.new_table()
    target = _cdc_target(h, name)
    try:
        write_flush(
            target,
            table(
                [
                    envelope("c", 1, 1000, {"name": "a", "qty": 1}),
                    envelope("c", 2, 1000, {"name": "b", "qty": 2}),
                ]
            ),
        )
        write_flush(target, table([envelope("d", 1, 2000, {"name": "a", "qty": 1})]))
        assert landed(h, name, ["name", "qty"]) == {2: {"name": "b", "qty": 2}}
        write_flush(target, table([envelope("c", 1, 1000, {"name": "a", "qty": 1})]))
    finally:
        close(target)
    assert landed(h, name, ["name", "qty"]) == {2: {"name": "b", "qty": 2}}


def cdc_soft_delete(h: CdcTargetHarness) -> None:
    """A soft delete keeps the row and sets ``soft_delete_column``."""
    name = h.new_table()
    target = _cdc_target(h, name, delete_mode="soft", soft_delete_column="deleted_at")
    try:
        write_flush(
            target,
            table(
                [
                    envelope("c", 1, 1000, {"name": "a", "qty": 1}),
                    envelope("c", 2, 1000, {"name": "b", "qty": 2}),
                ]
            ),
        )
        write_flush(target, table([envelope("d", 1, 2000, {"name": "a", "qty": 1})]))
    finally:
        close(target)
    got = landed(h, name, ["name", "deleted_at"])
    assert got is not None and set(got) == {1, 2}, f"soft delete removed rows: {got}"
    assert got[1]["name"] == "a" and got[1]["deleted_at"] is not None, f"row 1: {got[1]}"
    assert got[2] == {"name": "b", "deleted_at": None}, f"row 2: {got[2]}"


def cdc_add_columns(h: CdcTargetHarness) -> None:
    """``schema_evolution = "add_columns"``: a new image key becomes a column."""
    name = h.new_table()
    target = _cdc_target(h, name, schema_evolution="add_columns")
    try:
        write_flush(target, table([envelope("c", 1, 1000, {"name": "a", "qty": 1})]))
        write_flush(
            target,
            table(
                [
                    envelope("c", 2, 2000, {"name": "b", "qty": 2, "note": "x2"}),
                    envelope("u", 1, 2000, {"name": "a2", "qty": 1, "note": "x1"}),
                ]
            ),
        )
        write_flush(target, table([envelope("c", 3, 3000, {"name": "c", "qty": 3})]))
    finally:
        close(target)
    want = {
        1: {"name": "a2", "note": "x1"},
        2: {"name": "b", "note": "x2"},
        3: {"name": "c", "note": None},
    }
    assert landed(h, name, ["name", "note"]) == want


CDC_CHECKS: tuple[Check[CdcTargetHarness], ...] = (
    Check("cdc_replay_changes_nothing", cdc_replay_changes_nothing),
    Check("cdc_older_event_ignored", cdc_older_event_ignored),
    Check("cdc_hard_delete", cdc_hard_delete),
    Check("cdc_soft_delete", cdc_soft_delete),
    Check("cdc_add_columns", cdc_add_columns),
)
"""Every CDC-target check."""
