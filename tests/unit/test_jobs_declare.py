"""Job, table, workflow and schedule declarations: what is refused at import."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Annotated, Any

import pyarrow as pa
import pytest

import sluice
from sluice.errors import ConfigError
from sluice.jobs import CycleError, clear, registry
from sluice.jobs.schedule import Schedule
from sluice.normalize import lower, parse_timestamp, trim
from sluice.types import BigInt, String, Text, TimestampTZ


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    clear()
    yield
    clear()


@sluice.table(schema="analytics")
class CustomerDim:
    customer_id: Annotated[BigInt, sluice.pk()]
    email: Annotated[String[256] | None, lower(), trim()]
    name: Text | None
    updated_at: Annotated[TimestampTZ, parse_timestamp()]


def _job(name: str, **kw: Any) -> Any:
    kw.setdefault("target", CustomerDim)
    kw.setdefault("target_connection", "warehouse")
    return sluice.job(name=name, **kw)(lambda conn: "SELECT 1")


def test_table_declares_types_key_and_ddl() -> None:
    t = CustomerDim
    assert (t.schema, t.name, t.primary_key) == ("analytics", "customer_dim", ["customer_id"])
    assert [(c.name, c.nullable) for c in t.columns] == [
        ("customer_id", False),
        ("email", True),
        ("name", True),
        ("updated_at", False),
    ]
    ddl = t.create_sql("postgres")[-1]
    assert '"email" varchar(256)' in ddl and 'PRIMARY KEY ("customer_id")' in ddl
    assert t.add_column_sql("duckdb", ["customer_id", "email"]) == [
        'ALTER TABLE "analytics"."customer_dim" ADD COLUMN "name" VARCHAR',
        'ALTER TABLE "analytics"."customer_dim" ADD COLUMN "updated_at" TIMESTAMPTZ',
    ]


def test_normalisers_run_on_arrow_and_as_sql() -> None:
    batch = pa.record_batch(
        {
            "customer_id": [1],
            "email": ["  Ann@X.COM "],
            "updated_at": ["2026-03-01 10:00:00+00:00"],
            "extra": [0],
        }
    )
    out = CustomerDim.normalise(batch)
    assert out.schema.names == ["customer_id", "email", "name", "updated_at"]
    assert out.column(1).to_pylist() == ["ann@x.com"]
    assert out.column(3).to_pylist()[0] == dt.datetime(2026, 3, 1, 10, tzinfo=dt.UTC)
    sql = CustomerDim.select_sql("postgres", "SELECT * FROM raw")
    assert 'trim(lower(s."email")) AS "email"' in sql
    assert 'CAST(s."updated_at" AS timestamptz)' in sql


def test_job_checks_its_declaration() -> None:
    with pytest.raises(ConfigError, match="expected one of append, truncate"):
        _job("a", mode="upsert")
    with pytest.raises(ConfigError, match="unknown IANA time zone"):
        _job("b", schedule="@daily", timezone="Mars/Olympus")
    with pytest.raises(ConfigError, match="expected a cron expression"):
        _job("c", schedule="at teatime")
    with pytest.raises(ConfigError, match="give exactly one of target= and targets="):
        sluice.job(name="d", target_connection="w")(lambda: "x")
    with pytest.raises(ConfigError, match="unknown keys"):
        _job("e", retry={"max_tries": 3})


def test_cycles_are_rejected_naming_the_ring() -> None:
    _job("a", depends_on=["c"])
    _job("b", depends_on=["a"])
    with pytest.raises(CycleError, match=r"cycle: a -> c -> b -> a|cycle: .*a.*b.*c"):
        _job("c", depends_on=["b"])


def test_workflow_trigger_rules() -> None:
    a, b = _job("a"), _job("b")
    with pytest.raises(ConfigError, match="needs schedule= or triggered_by="):
        sluice.workflow("w0", jobs=[a])
    with pytest.raises(ConfigError, match="exclusive"):
        sluice.workflow("w0", jobs=[a], schedule="@daily", on_message="topic")
    with pytest.raises(ConfigError, match="take no depends_on"):
        sluice.workflow("w0", jobs=[a], schedule="@daily", depends_on={"a": []})
    sluice.workflow("w1", jobs=[a], schedule="@daily", triggered_by=["w2"])
    with pytest.raises(CycleError, match=r"w1 -> w2 -> w1|w2 -> w1 -> w2"):
        sluice.workflow("w2", jobs=[b], triggered_by=["w1"])
    with pytest.raises(ConfigError, match="already in workflow 'w1'"):
        sluice.workflow("w3", jobs=[a], schedule="@daily")
    assert set(registry().workflows) == {"w1"}


@pytest.mark.parametrize(
    ("text", "zone", "now", "latest", "nxt"),
    [
        (
            "0 9 * * *",
            "America/New_York",
            "2026-03-07T20:00",
            "2026-03-07T14:00",
            "2026-03-08T13:00",
        ),
        ("@hourly", "UTC", "2026-01-01T10:59", "2026-01-01T10:00", "2026-01-01T11:00"),
        (
            "daily at 02:30",
            "Europe/Berlin",
            "2026-06-01T00:00",
            "2026-05-31T00:30",
            "2026-06-01T00:30",
        ),
        ("hourly at :15", "UTC", "2026-01-01T10:14", "2026-01-01T09:15", "2026-01-01T10:15"),
        ("every 15 minutes", "UTC", "2026-01-01T10:44", "2026-01-01T10:30", "2026-01-01T10:45"),
        (
            "every 30 seconds",
            "UTC",
            "2026-01-01T10:44:40",
            "2026-01-01T10:44:30",
            "2026-01-01T10:45",
        ),
        ("*/5 * * * *", "UTC", "2026-01-01T10:05", "2026-01-01T10:05", "2026-01-01T10:10"),
    ],
)
def test_schedules(text: str, zone: str, now: str, latest: str, nxt: str) -> None:
    def t(s: str) -> dt.datetime:
        return dt.datetime.fromisoformat(s).replace(tzinfo=dt.UTC)

    s = Schedule.parse(text, zone)
    assert s.latest(t(now)) == t(latest)
    assert s.next_after(t(now)) == t(nxt)


def test_on_message_takes_a_source_with_a_query() -> None:
    a = _job("a")
    with pytest.raises(ConfigError, match=r"workflow w0.*on_message.*expected sluice.Source"):
        sluice.workflow("w0", jobs=[a], on_message="topic")
    with pytest.raises(ConfigError, match="needs query="):
        sluice.workflow("w0", jobs=[a], on_message=sluice.Source("bus"))
    with pytest.raises(ConfigError, match="exclusive"):
        sluice.workflow(
            "w0", jobs=[a], on_message=sluice.Source("bus", query="t"), triggered_by=["x"]
        )
    w = sluice.workflow("w0", jobs=[a], on_message=sluice.Source("bus", query="t"))
    assert w.on_message == sluice.Source("bus", query="t")
    assert w.schedule is None


def test_message_placeholder_outside_a_message_run_is_refused() -> None:
    from sluice.jobs.db import JobError
    from sluice.jobs.message import Message, handing, render

    assert render("SELECT 1") == "SELECT 1"
    with pytest.raises(JobError, match="not fired by a message"):
        render("SELECT $message")
    with handing(Message({"id": 1, "n": "it's"}, "topic t partition 0 offset 3")):
        assert render("SELECT $message") == """SELECT '{"id": 1, "n": "it''s"}'"""
        assert sluice.current_message() is not None
    assert sluice.current_message() is None
