"""Kafka -> SQL (filter + lookup join) -> Postgres: sluice against the reference engine.

    python -m benchmarks.kafka_sql_lookup_to_postgres.run [--rows N] [--engines sluice,reference]

1. Produce ``--rows`` JSON events to a new 3-partition topic: the generator,
   the producer and the topic layout are those of ``kafka_to_postgres``
   (imported from it, so both benchmarks read the same events).
2. In a new Postgres schema, create the lookup table ``users`` (10,000 rows,
   one per user_id of the events) and load the same events into a raw table.
   Run the pipeline's own SQL statement there (``source`` and ``users`` bound
   to those tables) to get the rows each engine must write.
3. For each engine, one after the other: create its own target table, render
   ``pipeline.toml.tmpl`` (only the group_id and table differ), start the
   engine and poll ``count(*)`` of its table until every expected row landed.
4. Verify each table against the expected rows (counts, sums, an md5 over
   every row, and EXCEPT ALL both ways), print the tables and write
   ``benchmarks/results/kafka_sql_lookup_to_postgres-<date>.{md,json}``.

The timing, CPU and memory accounting is that of ``kafka_to_postgres``; the
figures are per *input* event (what the source read), not per output row.
See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import json
import random
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka.admin import AdminClient

from benchmarks import common
from benchmarks.common import Dataset, EngineResult
from benchmarks.kafka_to_postgres import run as k2pg
from benchmarks.kafka_to_postgres.run import Settings

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "pipeline.toml.tmpl"
BENCHMARK = "kafka_sql_lookup_to_postgres"
ENGINES = k2pg.ENGINES
#: Prefix of the topic, the schema, the pipeline_name, the group ids and the work dir.
PREFIX = "bench-sqlk"
#: The packages of this environment that the results record.
PACKAGES = (
    "sluice", "confluent-kafka", "psycopg", "pyarrow", "adbc-driver-postgresql", "datafusion",
    "msgspec",
)  # fmt: skip

#: The lookup table: one row per user_id the event generator draws (1..USERS).
#: ``signup_date`` is a timestamptz at midnight UTC, not a ``date``: the
#: reference's Postgres lookup loader fails on ``date`` with "type mapping
#: error: Postgres → Arrow: unsupported type date (oid=1082)".
USERS_COLUMNS = (
    ("id", "bigint PRIMARY KEY"),
    ("name", "text NOT NULL"),
    ("country", "text NOT NULL"),
    ("tier", "text NOT NULL"),
    ("signup_date", "timestamptz NOT NULL"),
)
TIERS = ("free", "plus", "pro", "enterprise")
TIER_WEIGHTS = (60, 25, 12, 3)
SIGNUP_LATEST = datetime(2025, 12, 31, tzinfo=UTC)
SIGNUP_SPAN_DAYS = 1500

#: The events as produced, one column per JSON field, for the expected rows.
RAW_TABLE = "events_raw"
#: The events' own fields (no ``_event_ts``: they come from the payload alone).
RAW_COLUMNS = common.EVENT_COLUMNS[:-1]

#: What the pipeline's SELECT returns, in order; each engine's table has
#: exactly these columns. Keep it in step with the SQL in pipeline.toml.tmpl.
OUTPUT_COLUMNS = (
    ("id", "bigint"),
    ("user_id", "bigint"),
    ("event_type", "text"),
    ("amount", "double precision"),
    ("country", "text"),
    ("tier", "text"),
)
_OUT = ", ".join(name for name, _ in OUTPUT_COLUMNS)
#: Aggregates that must be equal over the expected rows and an engine's table.
#: ``row(...)::text`` spells NULLs out; a double prints its shortest exact form.
CHECKSUM_SELECT = (
    f"count(*), count(DISTINCT id), sum(id), sum(user_id), "
    f"md5(string_agg(row({_OUT})::text, E'\\n' ORDER BY {_OUT}))"
)
CHECKSUM_KEYS = ("rows", "distinct_ids", "id_sum", "user_id_sum", "md5")


# ---------------------------------------------------------------- data


def users(seed: int) -> Iterator[tuple[int, str, str, str, datetime]]:
    """Rows of the lookup table ``users`` for ids 1..USERS; the same for the same seed."""
    rng = random.Random(f"users:{seed}")
    for uid in range(1, common.USERS + 1):
        yield (
            uid,
            f"user-{uid:05d}",
            rng.choice(common.COUNTRIES),
            rng.choices(TIERS, TIER_WEIGHTS)[0],
            SIGNUP_LATEST - timedelta(days=rng.randrange(SIGNUP_SPAN_DAYS)),
        )


def raw_rows(rows: int, seed: int) -> Iterator[tuple[Any, ...]]:
    """The produced events, decoded from the very payloads the topic holds."""
    for _key, payload in common.events(rows, seed):
        event = json.loads(payload)
        yield tuple(event[name] for name, _ in RAW_COLUMNS)


@dataclass
class Expected:
    """What each engine must write, computed by Postgres over the raw events."""

    schema: str
    users: int = 0
    load_s: float = 0.0
    query_s: float = 0.0
    rows: int = 0
    checksums: dict[str, Any] = field(default_factory=dict)

    @property
    def selectivity(self) -> float:
        return self.rows / max(self.checksums.get("input_rows", 0), 1)


def expected_cte(schema: str, sql: str) -> str:
    """``WITH`` clauses that bind the pipeline's ``source`` and ``users`` to the
    raw tables and name the statement's result ``expected``."""
    return (
        f"WITH source AS (SELECT * FROM {schema}.{RAW_TABLE}), "
        f"users AS (SELECT * FROM {schema}.users), "
        f"expected AS ({sql}) "
    )


def prepare_postgres(
    conn: psycopg.Connection[Any], settings: Settings, schema: str, sql: str
) -> Expected:
    """Create ``schema`` with the lookup table and the raw events; compute the expected rows."""
    exp = Expected(schema=schema)
    started = time.monotonic()
    conn.execute(f"CREATE SCHEMA {schema}")
    common.create_table(conn, f"{schema}.users", USERS_COLUMNS)
    common.copy_rows(conn, f"{schema}.users", USERS_COLUMNS, users(settings.seed))
    common.create_table(conn, f"{schema}.{RAW_TABLE}", RAW_COLUMNS)
    common.copy_rows(
        conn, f"{schema}.{RAW_TABLE}", RAW_COLUMNS, raw_rows(settings.rows, settings.seed)
    )
    conn.execute(f"ANALYZE {schema}.users")
    conn.execute(f"ANALYZE {schema}.{RAW_TABLE}")
    exp.load_s = time.monotonic() - started
    row = conn.execute(f"SELECT count(*) FROM {schema}.users").fetchone()
    exp.users = int(row[0]) if row else 0

    started = time.monotonic()
    row = conn.execute(
        expected_cte(schema, sql)
        + f"SELECT {CHECKSUM_SELECT}, (SELECT count(*) FROM source) FROM expected"
    ).fetchone()
    exp.query_s = time.monotonic() - started
    assert row is not None
    exp.checksums = dict(zip((*CHECKSUM_KEYS, "input_rows"), _plain(row), strict=True))
    exp.rows = exp.checksums["rows"]
    return exp


def _plain(values: Sequence[Any]) -> list[Any]:
    """Postgres numerics (sums) as int, the rest as they are."""
    return [v if v is None or isinstance(v, str) else int(v) for v in values]


# ---------------------------------------------------------------- engines


def pipeline_name(run_id: str) -> str:
    return f"{PREFIX}-{run_id}"


def schema_name(run_id: str) -> str:
    return f"{PREFIX}_{run_id}".replace("-", "_")


def render_pipeline(
    settings: Settings, run_id: str, topic: str, group_id: str, schema: str, table: str
) -> str:
    return k2pg.render_template(
        TEMPLATE, settings, pipeline_name(run_id), group_id, table, topic=topic, schema=schema
    )


def pipeline_sql(settings: Settings) -> str:
    """The ``[transform] sql`` of the template, as both engines get it."""
    rendered = render_pipeline(settings, "x", "x", "x", "x", "x")
    sql: str = tomllib.loads(rendered)["transform"]["sql"]
    return sql


def verify(conn: psycopg.Connection[Any], sql: str, exp: Expected, table: str) -> dict[str, Any]:
    """Compare ``table`` with the expected rows: its columns, the checksums and
    the rows missing from it or not expected in it (EXCEPT ALL, duplicates count)."""
    schema = exp.schema
    columns = [
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            (schema, table),
        ).fetchall()
    ]
    row = conn.execute(f"SELECT {CHECKSUM_SELECT} FROM {schema}.{table}").fetchone()
    assert row is not None
    got: dict[str, Any] = dict(zip(CHECKSUM_KEYS, _plain(row), strict=True))
    compare = (
        f", actual AS (SELECT {_OUT} FROM {schema}.{table}) SELECT "
        f"(SELECT count(*) FROM (SELECT {_OUT} FROM expected "
        f"EXCEPT ALL SELECT {_OUT} FROM actual) m), "
        f"(SELECT count(*) FROM (SELECT {_OUT} FROM actual "
        f"EXCEPT ALL SELECT {_OUT} FROM expected) u)"
    )
    diff = conn.execute(expected_cte(schema, sql) + compare).fetchone()
    assert diff is not None
    got["missing"], got["unexpected"] = int(diff[0]), int(diff[1])
    want = {**{k: exp.checksums[k] for k in CHECKSUM_KEYS}, "missing": 0, "unexpected": 0}
    problems = [f"{k} = {got[k]}, expected {v}" for k, v in want.items() if got[k] != v]
    expected_columns = [name for name, _ in OUTPUT_COLUMNS]
    if columns != expected_columns:
        problems.append(f"columns = {columns}, expected {expected_columns}")
    return {"ok": not problems, "problems": problems, **got, "columns": columns}


def run_engine(
    settings: Settings,
    conn: psycopg.Connection[Any],
    admin: AdminClient,
    ds: Dataset,
    exp: Expected,
    sql: str,
    run_id: str,
    engine: str,
    version: str,
) -> EngineResult:
    """Run ``engine`` until every expected row landed (or it fails); verify its table.

    The polling is ``kafka_to_postgres``'s (``watch_engine``), waiting for
    ``exp.rows`` output rows; the rates it reports are in input events.
    """
    table = f"out_{engine}"
    toml_path = settings.work_dir / f"{engine}.toml"
    group_id = f"{PREFIX}-{run_id}-{engine}"
    toml_path.write_text(render_pipeline(settings, run_id, ds.topic, group_id, exp.schema, table))
    common.recreate_table(conn, f"{exp.schema}.{table}", OUTPUT_COLUMNS)

    argv = common.engine_argv(engine, toml_path)
    res = EngineResult(
        engine=engine,
        version=version,
        table=f"{exp.schema}.{table}",
        command=argv,
        group_id=group_id,
    )
    k2pg.watch_engine(
        settings, admin, res, lambda: common.count_rows(conn, f"{exp.schema}.{table}"), exp.rows
    )
    res.derive_rates(ds.rows, exp.rows)
    res.verification = verify(conn, sql, exp, table)
    common.print_problem(res)
    if not settings.keep:
        conn.execute(f"DROP TABLE IF EXISTS {exp.schema}.{table}")
    return res


# ---------------------------------------------------------------- report

OUTPUT_HEADERS = (
    "engine",
    "events in",
    "rows out",
    "expected rows out",
    "md5 over rows",
    "missing rows",
    "unexpected rows",
)


def _count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def output_rows(results: Sequence[EngineResult], ds: Dataset, exp: Expected) -> list[list[str]]:
    out = []
    for r in results:
        v = r.verification
        out.append(
            [
                r.engine,
                f"{ds.rows:,}",
                f"{v.get('rows', r.rows_seen):,}",
                f"{exp.rows:,}",
                "same" if v.get("md5") == exp.checksums["md5"] else "DIFFERS",
                _count(v.get("missing")),
                _count(v.get("unexpected")),
            ]
        )
    return out


def methodology(settings: Settings, exp: Expected) -> list[str]:
    return [
        "The pipeline is `[transform] sql` over the Kafka source `source`, joined with the "
        "Postgres lookup `[transform.lookups.users]`; both engines run the same TOML. "
        f"The filter keeps {exp.selectivity:.1%} of the events, the join keeps every one "
        f"of those (the lookup has a row for each of the {exp.users:,} user ids).",
        "rows/s counts *input events* (what the source read), not output rows: "
        "rows/s = events / (last expected output row landed - engine's consumer group "
        "became Stable). Startup, the lookup load and the group join (about 23 s for the "
        "reference on this broker, about 2.5 s for sluice with session_timeout_ms = 3000) "
        "are not counted against either engine.",
        f"Every {settings.poll_interval_s} s the harness polls `SELECT count(*)` of the "
        "engine's table and the state of its consumer group (AdminClient "
        "describe_consumer_groups); each time is that of the first poll that saw the event, "
        f"so it is known to within {settings.poll_interval_s} s.",
        f"'busy from': the start of the first poll interval after the join in which the "
        f"engine used >= {common.BUSY_CORES} cores; 'rows/s from busy' = events / (all rows "
        "at - busy from).",
        "'rows/s first->last landing' = the events behind the output rows that landed after "
        "the first poll that saw any, / (all rows at - first row at); n/a when every row "
        "landed between two polls (one big commit).",
        "CPU-s per 1M rows: user + system CPU of the engine's process tree from its start to "
        "the poll that saw the last row (startup, lookup load and group join included; "
        "sluice's 3 s idle tail and the reference's shutdown excluded), per 1M input events. "
        "'CPU-s whole run' is the reaped process's rusage (start to exit).",
        common.PEAK_RSS,
        f"Expected rows: the events are also loaded into `{RAW_TABLE}` and the pipeline's own "
        "SQL statement runs in Postgres with `source` and `users` bound to the raw table and "
        f"the lookup table ({exp.rows:,} rows). Each engine's table must have the same "
        "count, distinct ids, sums of id and user_id, md5 over every row (sorted), no row "
        "missing and none unexpected (EXCEPT ALL both ways), and exactly the SELECT's columns.",
        "The SELECT has no `_event_ts`: the reference's Kafka source does not add it and its "
        "SQL fails with `Schema error: No field named s._event_ts`. The lookup's "
        "`signup_date` is timestamptz: the reference cannot load a `date` column "
        "(`unsupported type date (oid=1082)`).",
        "sluice stops by itself (`--stop-after-idle-ms 3000`); the reference runs forever and "
        "gets SIGTERM once every row landed.",
        f"The reference stores its Kafka offsets in `{k2pg.REFERENCE_OFFSETS}` of the target "
        "database, keyed by pipeline_name and topic, and resumes from them whatever the "
        "group_id; so every run uses a new pipeline_name (and deletes its row afterwards).",
    ]


def render_markdown(
    settings: Settings,
    ds: Dataset,
    exp: Expected,
    sql: str,
    results: Sequence[EngineResult],
    facts: dict[str, Any],
    date: str,
) -> str:
    lines = [
        f"# Kafka -> SQL filter + lookup join -> Postgres: sluice vs the reference engine ({date})",
        "",
        f"{ds.rows:,} JSON events (avg {ds.payload_bytes_avg:.0f} bytes) in a "
        f"{ds.partitions}-partition topic (`{ds.topic}`, produced in {ds.produce_s:.1f} s), "
        f"filtered and joined with a {exp.users:,}-row Postgres lookup table by each engine, "
        f"which appends the {exp.rows:,} resulting rows into its own pre-created table, "
        "one engine at a time. rows/s and CPU are per input event.",
        "",
        common.markdown_table(common.SUMMARY_HEADERS, common.summary_rows(results, ds.rows)),
        "",
        common.markdown_table(common.DETAIL_HEADERS, common.detail_rows(results)),
        "",
        common.markdown_table(OUTPUT_HEADERS, output_rows(results, ds, exp)),
        "",
        *common.problems_section(results),
        "## The SQL",
        "",
        "```sql",
        sql.strip(),
        "```",
        "",
        *common.report_tail(methodology(settings, exp), facts, results),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> Settings:
    return k2pg.parse_settings(
        argv,
        benchmark=BENCHMARK,
        description=(
            "Kafka -> SQL filter + Postgres lookup join -> Postgres throughput, CPU and "
            "memory: sluice vs ematix-flow 1.0.0."
        ),
        engines=ENGINES,
        keep_help="keep the schema (tables, lookup), topic and offsets",
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings, run_id = common.start_run(parse_args(argv), PREFIX)
    date = common.utc_date()
    sql = pipeline_sql(settings)

    k2pg.check_services(settings)
    versions = {engine: common.check_engine(engine) for engine in settings.engines}
    facts = common.run_facts(date)
    facts["packages"] = common.engine_packages(PACKAGES, settings.engines)

    topic = f"{PREFIX}-{run_id}"
    schema = schema_name(run_id)
    ds = k2pg.produce_events(settings, topic)

    results: list[EngineResult] = []
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    try:
        with common.poller(settings.postgres_url, facts) as conn:
            exp = prepare_postgres(conn, settings, schema, sql)
            print(
                f"schema {schema}: users ({exp.users:,} rows) and {RAW_TABLE} loaded in "
                f"{exp.load_s:.1f} s; expected {exp.rows:,} output rows "
                f"({exp.selectivity:.1%} of the events), computed in {exp.query_s:.1f} s",
                flush=True,
            )
            if exp.rows == 0:
                raise SystemExit("the pipeline keeps no event: use a larger --rows")
            for engine in settings.engines:
                results.append(
                    run_engine(
                        settings, conn, admin, ds, exp, sql, run_id, engine, versions[engine]
                    )
                )
    finally:
        if not settings.keep:
            k2pg.drop_schema(settings, schema, pipeline_name(run_id))
            k2pg.delete_topic(settings, topic)

    common.print_tables(
        (common.SUMMARY_HEADERS, common.summary_rows(results, ds.rows)),
        (common.DETAIL_HEADERS, common.detail_rows(results)),
        (OUTPUT_HEADERS, output_rows(results, ds, exp)),
    )
    print()
    print("note: " + methodology(settings, exp)[1])

    data = {
        "benchmark": BENCHMARK,
        "run_id": run_id,
        "date": date,
        "settings": settings.as_json(),
        "dataset": asdict(ds),
        "expected": {**asdict(exp), "selectivity": exp.selectivity},
        "sql": sql,
        "machine": facts,
        "methodology": methodology(settings, exp),
        "results": common.results_json(results, ds.rows),
    }
    markdown = render_markdown(settings, ds, exp, sql, results, facts, date)
    return common.finish_run(settings, BENCHMARK, date, markdown, data, results)


if __name__ == "__main__":
    sys.exit(main())
