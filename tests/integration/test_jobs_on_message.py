"""Message-triggered workflows (``sluice.workflow(..., on_message=...)``)
against real Kafka and Postgres, through real ``flow run-due`` processes:
one workflow run per message, the message handed to the jobs (``$message``
and :func:`sluice.current_message`), retries, a message given up on, and a
SIGKILL mid-run that fires the uncommitted message again."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from tests import endpoints
from tests.integration.conftest import (
    committed,
    pg_count,
    produce,
    unique,
    wait_for_count,
    wait_until,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

MODULE = f'''
import os, pathlib, time
from typing import Annotated
import pyarrow as pa
import sluice
from sluice.api.connections import Connection, register_connection
from sluice.types import BigInt, Text

TOPIC, TABLE, DIR = os.environ["T_TOPIC"], os.environ["T_TABLE"], pathlib.Path(os.environ["T_DIR"])
register_connection(Connection("bus", kind="kafka", bootstrap_servers="{endpoints.KAFKA_BOOTSTRAP}",
                               session_timeout_ms=2000))
register_connection(Connection("pg", kind="postgres", url="{endpoints.POSTGRES_URL}"))

@sluice.table(schema="sluice_jobs_test", name=TABLE)
class Orders:
    id: Annotated[BigInt, sluice.pk()]
    note: Text

@sluice.table(schema="sluice_jobs_test", name=TABLE + "_audit")
class Audit:
    id: Annotated[BigInt, sluice.pk()]
    note: Text

@sluice.job(name="load", target=Orders, target_connection="pg", mode="merge",
            retry={{"max_attempts": 2, "backoff_seconds": 0.2}})
def load():
    m = sluice.current_message()
    i = m.value["id"]
    if m.value.get("fail") == "once" and not (DIR / f"failed-{{i}}").exists():
        (DIR / f"failed-{{i}}").touch()
        raise RuntimeError(f"flaky {{i}}")
    if m.value.get("fail") == "always":
        raise RuntimeError(f"broken {{i}}")
    if m.value.get("slow") and not (DIR / f"slow-{{i}}").exists():
        (DIR / f"slow-{{i}}").touch()
        time.sleep(60)  # killed here
    yield pa.record_batch({{"id": [i], "note": [m.value["note"]]}})

@sluice.job(name="audit", target=Audit, target_connection="pg", mode="merge", depends_on=["load"])
def audit(conn):
    return "SELECT ($message::jsonb ->> 'id')::bigint AS id, 'audit ' || ($message::jsonb ->> 'note') AS note"

sluice.workflow("orders", jobs=[load, audit], on_message=sluice.Source("bus", query=TOPIC))
'''


def _env(tmp_path: Path, topic: str, table: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "T_TOPIC": topic,
        "T_TABLE": table,
        "T_DIR": str(tmp_path),
    }


def _cmd(tmp_path: Path) -> list[str]:
    (tmp_path / "wf.py").write_text(MODULE)
    return [
        sys.executable,
        "-m",
        "sluice",
        "run-due",
        "--module",
        str(tmp_path / "wf.py"),
        "--run-log",
        f"sqlite://{tmp_path}/run_log.db",
        "--message-wait",
        "20",
    ]


def _runs(tmp_path: Path, job: str) -> list[tuple[str, int, str | None, str]]:
    with sqlite3.connect(tmp_path / "run_log.db") as db:
        rows = db.execute(
            "SELECT status, attempt, error, metrics FROM sluice_jobs_run_log WHERE job = ?", (job,)
        ).fetchall()
    return [(s, a, e, m) for s, a, e, m in rows]


def _msgs(rows: list[dict[str, object]]) -> list[bytes]:
    return [msgspec.json.encode(r) for r in rows]


@pytest.fixture
def topic() -> Callable[[], str]:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": endpoints.KAFKA_BOOTSTRAP})

    def make() -> str:
        name = unique("wfmsg")
        admin.create_topics([NewTopic(name, 1, 1)])[name].result(timeout=30)
        return name

    return make


def test_each_message_fires_the_workflow_once_retries_and_gives_up(
    tmp_path: Path, topic: Callable[[], str]
) -> None:
    t, table = topic(), unique("onmsg")
    n = 8
    rows: list[dict[str, object]] = [{"id": i, "note": f"n{i}"} for i in range(n)]
    rows[3]["fail"] = "once"  # retried, then succeeds
    rows[6]["fail"] = "always"  # gives up after 2 attempts; the position moves on
    produce(t, _msgs(rows))
    r = subprocess.run(
        _cmd(tmp_path),
        env=_env(tmp_path, t, table),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 1, r.stderr  # one message given up on
    wf = _runs(tmp_path, "orders")
    assert len(wf) == n
    assert sorted(s for s, *_ in wf) == ["failed"] + ["success"] * (n - 1)
    failed = next(x for x in wf if x[0] == "failed")
    assert "broken 6" in (failed[2] or "")
    assert json.loads(json.loads(failed[3])["message"])["id"] == 6
    assert pg_count(f"sluice_jobs_test.{table}") == n - 1
    assert (
        pg_count(f"sluice_jobs_test.{table}_audit", "count(*) FILTER (WHERE note LIKE 'audit n%')")
        == n - 1
    )
    loads = _runs(tmp_path, "load")
    assert sorted((s, a) for s, a, *_ in loads if s == "failed") == [
        ("failed", 1),
        ("failed", 1),
        ("failed", 2),
    ]
    audits = sorted(s for s, *_ in _runs(tmp_path, "audit"))
    # Skipped while load 3 awaited its retry (then run), and after load 6 gave up.
    assert audits == ["skipped"] * 2 + ["success"] * (n - 1)
    # Everything committed, the given-up message included (the position moved on).
    assert committed("sluice-workflow-orders", t, 1) == n


def test_a_kill_mid_run_fires_the_uncommitted_message_again(
    tmp_path: Path, topic: Callable[[], str]
) -> None:
    t, table = topic(), unique("onmsgkill")
    n = 8
    rows: list[dict[str, object]] = [{"id": i, "note": f"n{i}"} for i in range(n)]
    rows[5]["slow"] = True
    produce(t, _msgs(rows))
    # The dead process's lease on the workflow lapses within 2 s.
    env = {**_env(tmp_path, t, table), "SLUICE_MESSAGE_LEASE_S": "2"}
    with (tmp_path / "first.log").open("wb") as out:
        proc = subprocess.Popen(_cmd(tmp_path), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until((tmp_path / "slow-5").exists, 60, "message 5's run to start")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert pg_count(f"sluice_jobs_test.{table}") == 5  # 0-4 done, 5 killed mid-run
    r = subprocess.run(
        _cmd(tmp_path), env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 0, r.stderr
    assert pg_count(f"sluice_jobs_test.{table}") == n
    assert pg_count(f"sluice_jobs_test.{table}_audit") == n
    ok = [json.loads(json.loads(m)["message"])["id"] for s, _, _, m in _runs(tmp_path, "orders")]
    # Each message fired to success once: the messages fired before the kill
    # (same uncommitted batch) are not fired again; message 5 is.
    assert sorted(ok) == list(range(n))


def test_flow_listen_fires_as_messages_arrive_until_sigterm(
    tmp_path: Path, topic: Callable[[], str]
) -> None:
    t, table = topic(), unique("onmsglisten")
    env = _env(tmp_path, t, table)
    cmd = _cmd(tmp_path)
    cmd[3:4] = ["listen"]
    cmd = [*cmd[: cmd.index("--message-wait")], "orders"]
    with (tmp_path / "listen.log").open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        produce(t, _msgs([{"id": i, "note": f"n{i}"} for i in range(3)]))
        wait_for_count(f"sluice_jobs_test.{table}_audit", lambda c: c == 3, 60, "3 audits")
        produce(t, _msgs([{"id": i, "note": f"n{i}"} for i in range(3, 5)]))
        wait_for_count(f"sluice_jobs_test.{table}_audit", lambda c: c == 5, 60, "5 audits")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, (tmp_path / "listen.log").read_text()
    assert len(_runs(tmp_path, "orders")) == 5
    cmd[-1] = "nope"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0
    assert "no workflow with on_message= of that name (there are: orders)" in r.stderr


def test_run_due_fails_when_the_source_never_connects(tmp_path: Path) -> None:
    cmd = _cmd(tmp_path)
    (tmp_path / "wf.py").write_text(MODULE.replace(endpoints.KAFKA_BOOTSTRAP, "127.0.0.1:1", 1))
    cmd[cmd.index("--message-wait") + 1] = "2"
    env = _env(tmp_path, "never", unique("onmsgdown"))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1
    assert "workflow orders: its on_message source did not connect within 2s" in r.stderr
