"""`flow consume --module M NAME`: a pipeline declared in Python, run end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from tests import endpoints
from tests.integration.conftest import events, pg_count, produce, unique

pytestmark = pytest.mark.integration

MODULE = """
import sluice

@sluice.connection
class bus:
    kind = "kafka"
    bootstrap_servers = "{bootstrap}"
    session_timeout_ms = 3000

@sluice.streaming_pipeline(
    name="{name}",
    source=bus,
    source_query="{topic}",
    target="warehouse",  # from $SLUICE_DSN_WAREHOUSE
    target_table=("public", "{name}"),
    transform_sql="SELECT id, event_type, double_it(amount) AS amount2 FROM source",
    udfs=[double_it],
)
def events_to_pg():
    pass
"""

UDF = """
import pyarrow.compute as pc
import sluice

@sluice.udf(args=("Float64",), returns="Float64")
def double_it(x):
    return pc.multiply(x, 2.0)
"""


def flow(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "SLUICE_STATE_DIR": str(cwd / "state"),
        "SLUICE_DSN_WAREHOUSE": endpoints.POSTGRES_URL,
    }
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_decorated_pipeline_runs_from_its_module(
    tmp_path: Path, kafka_topic: Callable[..., str]
) -> None:
    topic = kafka_topic(2)
    name = unique("pymod")
    module = unique("pipelines")
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(UDF)
        + MODULE.format(bootstrap=endpoints.KAFKA_BOOTSTRAP, name=name, topic=topic)
    )
    produce(topic, events(500))

    listed = flow(["consume-list", "--module", module], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split("\t")[0] == name and f"{topic} -> postgres" in listed.stdout

    run = flow(["consume", "--module", module, name, "--stop-after-idle-ms", "1500"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert pg_count(f"public.{name}") == 500
    assert pg_count(f"public.{name}", "sum(amount2 * 100)::bigint") == sum(
        round((i % 1000) / 4 * 2 * 100) for i in range(500)
    )

    missing = flow(["consume", "--module", module, "nope"], tmp_path)
    assert missing.returncode == 2
    assert f"declares no streaming pipeline 'nope' (it declares: {name})" in missing.stderr
    assert "Traceback" not in missing.stderr
