"""A streaming scd2 target through a real `flow consume` process: a restart
resumes from the positions kept in the target's transaction, and a changed
row makes a new version while an unchanged one makes none."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from tests.integration.conftest import kafka_pg_config, produce, unique

pytestmark = pytest.mark.integration


def _rows(ids: range, note: str) -> list[bytes]:
    enc = msgspec.json.Encoder()
    return [enc.encode({"id": i, "note": f"{note}{i}", "amount": i / 4}) for i in ids]


def test_flow_consume_scd2_versions_across_a_restart(kafka_topic: Any, flow: Any, pg: Any) -> None:
    topic, table = kafka_topic(2), unique("scd")
    config = kafka_pg_config(topic, table, mode="scd2", primary_key='primary_key = ["id"]').replace(
        'mode = "scd2"', 'mode = "scd2"\ncompare_columns = ["note"]'
    )

    produce(topic, _rows(range(100), "n"))
    first = flow(config, "--stop-after-idle-ms", "1500")
    assert first.proc.wait(timeout=120) == 0, first.output()

    # ids 0-49 change, 50-99 come again unchanged (other amounts are not compared)
    produce(topic, _rows(range(50), "m") + _rows(range(50, 100), "n"))
    second = flow(config, "--stop-after-idle-ms", "1500")
    assert second.proc.wait(timeout=120) == 0, second.output()

    total, current, closed = pg.execute(
        f"SELECT count(*), count(*) FILTER (WHERE is_current), "
        f"count(*) FILTER (WHERE NOT is_current AND valid_to IS NOT NULL) FROM {table}"
    ).fetchone()
    assert (total, current, closed) == (150, 100, 50)
    changed = pg.execute(
        f"SELECT count(*) FROM {table} WHERE is_current AND note = 'm' || id AND id < 50"
    ).fetchone()[0]
    assert changed == 50
    # each key's versions do not overlap: the closed one ends where the current one starts
    gaps = pg.execute(
        f"SELECT count(*) FROM {table} o JOIN {table} c ON o.id = c.id "
        f"AND NOT o.is_current AND c.is_current WHERE o.valid_to <> c.valid_from"
    ).fetchone()[0]
    assert gaps == 0
