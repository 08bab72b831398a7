"""The batch-job commands as a user runs them: ``flow run-due`` / ``run`` /
``status`` / ``runs list`` / ``preview`` / ``validate --module`` over the
example module, real processes, a SQLite run log, alerts to a local webhook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import duckdb
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "batch_jobs" / "shop_jobs.py"


def flow(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHOP_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    got: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", got
    server.shutdown()
    server.server_close()


def test_example_module_under_run_due_status_and_runs_list(
    tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, got = webhook
    log = f"sqlite://{tmp_path}/run_log.db"
    common = ["--module", str(EXAMPLE), "--run-log", log]
    # 01:59 UTC = 02:59 Berlin on 7 Dec: the 02:00 tick is an hour old; a job
    # that never ran fires only for a tick in the last interval.
    r = flow(tmp_path, "run-due", *common, "--now", "2026-12-07T01:59:00", "--interval", "60")
    assert (r.returncode, r.stdout) == (0, ""), r.stderr
    r = flow(
        tmp_path,
        "run-due",
        *common,
        "--now",
        "2026-12-08T01:00:20",
        "--alerter",
        "stdout://",
        "--alerter",
        url,
        "--metrics",
        "stdout://",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "ingest_orders",
        "daily_revenue",
        "export_revenue",
    ]
    assert "path=insert_select" in lines[1] and "path=arrow" in lines[2]
    assert got == []  # first-time successes alert nobody
    with duckdb.connect(str(tmp_path / "data" / "lake.duckdb")) as c:
        assert c.execute("SELECT count(*) FROM shop.orders").fetchone() == (1000,)

    # The same tick again: nothing.
    r = flow(tmp_path, "run-due", *common, "--now", "2026-12-08T01:00:50")
    assert (r.returncode, r.stdout) == (0, ""), r.stderr

    r = flow(tmp_path, "status", *common, "--now", "2026-12-08T01:01:00", "--json")
    rows = {s["job"]: s for s in json.loads(r.stdout)}
    assert rows["ingest_orders"]["status"] == "success"
    assert rows["ingest_orders"]["next_due"] == "2026-12-09T02:00:00+01:00"  # Berlin time

    r = flow(tmp_path, "runs", "list", "--run-log", log, "--json")
    runs = json.loads(r.stdout)
    assert sorted(x["job"] for x in runs) == ["daily_revenue", "export_revenue", "ingest_orders"]
    assert {x["status"] for x in runs} == {"success"}

    r = flow(tmp_path, "preview", *common, "daily_revenue", "--now", "2026-12-09T01:00:10")
    assert "due now" in r.stdout and "INSERT" not in r.stdout and "path: insert_select" in r.stdout

    r = flow(tmp_path, "validate", "--module", str(EXAMPLE), "daily_revenue", "export_revenue")
    assert r.returncode == 0, r.stderr
    assert "daily_revenue: ok" in r.stdout and "export_revenue: ok" in r.stdout


def test_failures_alert_and_a_bad_query_fails_validate(
    tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, got = webhook
    module = tmp_path / "broken_jobs.py"
    module.write_text(
        "import sluice\n"
        "from sluice.types import BigInt\n"
        "@sluice.connection\nclass lake:\n    kind = 'duckdb'\n"
        f"    path = {str(tmp_path / 'x.duckdb')!r}\n"
        "@sluice.table\nclass T:\n    n: BigInt\n"
        "@sluice.job(name='bad', target=T, target_connection='lake', schedule='@hourly',\n"
        "            retry={'max_attempts': 2, 'backoff_seconds': 30})\n"
        "def bad(conn):\n    return 'SELECT n FROM no_such_table'\n"
    )
    log = f"sqlite://{tmp_path}/run_log.db"
    common = ["--module", str(module), "--run-log", log, "--alerter", url]
    # An alerter that cannot deliver (nothing listens there) is logged; the run goes on.
    dead = ["--alerter", "https://127.0.0.1:9/nothing"]
    r = flow(tmp_path, "run-due", *common, *dead, "--now", "2026-12-07T10:00:05")
    assert r.returncode == 1 and "bad: failed attempt=1" in r.stdout
    assert "could not deliver" in r.stderr
    r = flow(tmp_path, "run-due", *common, "--now", "2026-12-07T10:00:20")  # backing off
    assert r.stdout == ""
    r = flow(tmp_path, "run-due", *common, "--now", "2026-12-07T10:00:40")
    assert "bad: failed attempt=2" in r.stdout
    assert [(e["kind"], e["job"], e["attempt"]) for e in map(_event, got)] == [
        ("failure", "bad", 1),
        ("failure", "bad", 2),
    ]
    r = flow(tmp_path, "validate", "--module", str(module), "bad")
    assert r.returncode == 2 and "bad: invalid" in r.stderr and "no_such_table" in r.stderr


def _event(body: dict[str, Any]) -> dict[str, Any]:
    return body.get("event", body)


GUIDE_MODULE = """
from typing import Annotated
from ematix_flow import ematix, pk
from ematix_flow.types import BigInt, Text, TimestampTZ

@ematix.table(schema="SCHEMA")
class Events:
    event_id: Annotated[BigInt, pk()]
    name: Text | None
    received_at: TimestampTZ

@ematix.pipeline(target=Events, schedule="*/5 * * * *", mode="append")
def ingest_events(conn):
    return "SELECT event_id, name, received_at FROM SCHEMA.raw_events"

@ematix.job(
    name="daily_rollups",
    target=Events,
    schedule="0 2 * * *",
    mode="merge",
    depends_on=["ingest_events"],
    retry={"max_attempts": 5, "backoff_seconds": 30, "backoff_factor": 2.0},
)
def daily_rollups(conn):
    return "SELECT event_id + 1000 AS event_id, name, received_at FROM SCHEMA.events"
"""


def test_a_module_in_the_user_guides_shape_runs_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guide's Surface 1 module, ``ematix`` / ``ematix_flow`` renamed to
    ``sluice``, no connection named: the target is SLUICE_DSN."""
    import uuid

    import psycopg
    from tests import endpoints

    schema = f"guide_{uuid.uuid4().hex[:8]}"
    text = GUIDE_MODULE.replace("ematix_flow", "sluice").replace("ematix", "sluice")
    (tmp_path / "my_pipelines.py").write_text(text.replace("SCHEMA", schema))
    with psycopg.connect(endpoints.POSTGRES_URL, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
        c.execute(
            f"CREATE TABLE {schema}.raw_events AS SELECT g::bigint AS event_id, "
            "'e' || g AS name, now() AS received_at FROM generate_series(1, 50) g"
        )
    monkeypatch.setenv("SLUICE_DSN", endpoints.POSTGRES_URL)
    try:
        log = f"sqlite://{tmp_path}/run_log.db"
        r = flow(tmp_path, "run", "--module", "my_pipelines", "--run-log", log, "ingest_events")
        assert r.returncode == 0 and "path=insert_select" in r.stdout, r.stderr
        r = flow(tmp_path, "run", "--module", "my_pipelines", "--run-log", log, "daily_rollups")
        assert r.returncode == 0 and "rows=50" in r.stdout, r.stderr
        with psycopg.connect(endpoints.POSTGRES_URL) as c:
            assert c.execute(f"SELECT count(*) FROM {schema}.events").fetchone() == (100,)
    finally:
        with psycopg.connect(endpoints.POSTGRES_URL, autocommit=True) as c:
            c.execute(f"DROP SCHEMA {schema} CASCADE")
