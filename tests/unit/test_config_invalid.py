"""Invalid pipeline files: every problem reported, each naming its key path.

One file per case under ``tests/fixtures/invalid/``; each test asserts the
EXACT list of problem lines (``<file>: <key.path>: <message>``). Loading runs
from the repository root so the file names in the lines are stable.

Cases marked ``xfail(strict=True)`` assert the message we believe is right
where the loader's current message is wrong, duplicated or leaks a secret;
each reason says what is wrong today. They turn into failures (XPASS) once
the loader is fixed, so the marker must then be removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sluice.cli import main
from sluice.config import load_file, load_text
from sluice.connectors.kafka.spec import KafkaSource
from sluice.connectors.postgres.spec import PostgresTarget
from sluice.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
INVALID = ROOT / "tests" / "fixtures" / "invalid"
VALID_SEED = "tests/fixtures/seeds/events_to_pg.toml"

FOLLOW_ON = (
    "a typo of a required key is reported twice: the unknown key (with the right "
    "suggestion) and a follow-on 'missing' problem for the key it suggests"
)


def rel(name: str) -> str:
    """The fixture's path as the problem lines name it (relative to the repo root)."""
    return f"tests/fixtures/invalid/{name}.toml"


def case(name: str, *lines: str, xfail: str | None = None) -> Any:
    """A fixture and its expected problem lines (without the ``<file>: `` prefix)."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(name, list(lines), id=name, marks=marks)


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    for var in ("NOPE", "NOPE_TOO"):
        monkeypatch.delenv(var, raising=False)


def problem_lines(path: str) -> list[str]:
    """Load ``path``, expect a ConfigError, return its lines (checked against .problems)."""
    with pytest.raises(ConfigError) as info:
        load_file(path)
    lines = str(info.value).splitlines()
    assert lines == [str(p) for p in info.value.problems]
    return lines


CASES = [
    case(
        "typo_top_level",
        "idle_pause_mss: unknown key; did you mean 'idle_pause_ms'?",
    ),
    case(
        "typo_source_key",
        "source.group_ib: unknown key for kind 'kafka'; did you mean 'group_id'?",
    ),
    case(
        "typo_target_table",
        "target.table.schmea: unknown key; did you mean 'schema'?",
    ),
    case(
        "typo_window_key",
        "transform.window.groupby: unknown key for kind 'tumbling'; did you mean 'group_by'?",
    ),
    case(
        "typo_aggregation",
        "transform.window.aggregations[1].mdoe: unknown key; did you mean 'mode'?",
    ),
    case(
        "typo_required_agg_column",
        "transform.window.aggregations[0].colunm: unknown key; did you mean 'column'?",
    ),
    case(
        "typo_required_source_key",
        (
            "source.bootstrap_server: unknown key for kind 'kafka'; did you mean "
            "'bootstrap_servers'?"
        ),
    ),
    case(
        "key_of_other_kind_near_miss",
        (
            "transform.window.gap_ms: unknown key for kind 'hopping' (it belongs to kind "
            "'session'); expected one of 'aggregations', 'group_by', 'event_time_column', "
            "'late_data', 'allowed_lateness_ms', 'max_groups_per_window', "
            "'window_start_column', 'window_end_column', 'duration_ms', 'hop_ms'"
        ),
    ),
    case(
        "secret_keyword_dsn",
        (
            'target.url: expected a postgres:// or postgresql:// URL, got "host=127.0.0.1 '
            'user=postgres password=***"'
        ),
    ),
    case(
        "secret_at_in_password",
        (
            "target.url: expected a postgres:// or postgresql:// URL, got "
            '"mysql://root:***@127.0.0.1:3306/db"'
        ),
    ),
    case(
        "typo_join_key",
        "transform.join.left_column_prefx: unknown key; did you mean 'left_column_prefix'?",
    ),
    case(
        "typo_cdc_key",
        "transform.cdc.delete_mod: unknown key; did you mean 'delete_mode'?",
    ),
    case(
        "typo_state_store",
        (
            "state_store.checkpoint_interval: unknown key for kind 'postgres'; did you mean "
            "'checkpoint_interval_ms'?"
        ),
    ),
    case(
        "key_of_other_kind",
        (
            "source.group_id: unknown key for kind 'rabbitmq' (it belongs to kind 'kafka'); "
            "expected one of 'max_batch_rows', 'max_batch_wait_ms', 'amqp_url', "
            "'queue_args', 'payload_format', 'prefetch_count'"
        ),
    ),
    case(
        "unknown_kind",
        (
            "source.kind: unknown kind 'kafak'; did you mean 'kafka'? (expected one of "
            "'kafka', 'rabbitmq', 'pubsub', 'kinesis', 'delta_local', 'delta_s3', "
            "'object_store_local', 'object_store_s3')"
        ),
    ),
    case(
        "missing_kind",
        (
            "target.kind: missing required key (expected one of 'postgres', 'mysql', "
            "'sqlite', 'duckdb', 'kafka', 'rabbitmq', 'pubsub', 'kinesis', 'delta_local', "
            "'delta_s3', 'object_store_local', 'object_store_s3')"
        ),
    ),
    case(
        "type_string_for_int",
        'idle_pause_ms: expected an integer >= 0, got a string "500"',
    ),
    case(
        "type_bool_for_int",
        "source.max_batch_rows: expected an integer > 0, got a boolean (true)",
    ),
    case(
        "type_int_for_string",
        "source.group_id: expected a string, got an integer (42)",
    ),
    case(
        "type_string_for_array",
        'target.table.primary_key: expected an array of non-empty strings, got a string "id"',
    ),
    case(
        "type_table_for_string",
        "source.bootstrap_servers: expected a non-empty string, got a table",
    ),
    case(
        "sql_as_table",
        'transform.sql: expected a string, got a table (sql is a plain key: write sql = """...""" under [transform], not a [transform.sql] table)',
    ),
    case(
        "negative_duration",
        "idle_pause_ms: expected an integer >= 0, got -5",
    ),
    case(
        "zero_duration",
        "transform.window.duration_ms: expected an integer > 0, got 0",
    ),
    case(
        "bad_enum",
        (
            "transform.on_error: expected one of 'dlq', 'drop', 'fail', got a string \"dorp\"; "
            "did you mean 'drop'?"
        ),
    ),
    case(
        "empty_required_string",
        "target.table.name: expected a non-empty string, got an empty string",
    ),
    case(
        "missing_pipeline_name",
        "pipeline_name: missing required key (expected a non-empty string)",
    ),
    case(
        "missing_bootstrap_servers",
        "source.bootstrap_servers: missing required key (expected a non-empty string)",
    ),
    case(
        "missing_table_name",
        "target.table.name: missing required key (expected a non-empty string)",
    ),
    case(
        "missing_window_duration",
        "transform.window.duration_ms: missing required key (expected an integer > 0)",
    ),
    case(
        "missing_session_gap",
        "transform.window.gap_ms: missing required key (expected an integer > 0)",
    ),
    case(
        "hopping_without_hop",
        "transform.window.hop_ms: missing required key (expected an integer > 0)",
    ),
    case(
        "hop_larger_than_duration",
        "transform.window.hop_ms: expected at most duration_ms (60000), got 120000",
    ),
    case(
        "window_and_join",
        "transform.join: [transform.window] and [transform.join] are mutually exclusive",
    ),
    case(
        "window_and_cdc",
        "transform.cdc: [transform.window] and [transform.cdc] are mutually exclusive",
    ),
    case(
        "join_and_cdc",
        "transform.cdc: [transform.join] and [transform.cdc] are mutually exclusive",
    ),
    case(
        "cdc_and_sql",
        "transform.sql: not allowed with [transform.cdc]: CDC applies the envelopes as they are",
    ),
    case(
        "join_and_sql",
        "transform.sql: not allowed with [transform.join]: the join reads the sources directly",
    ),
    case(
        "join_without_sources",
        (
            "transform.join: needs the [[sources]] form, one entry per side (a single "
            "[source] cannot join)"
        ),
    ),
    case(
        "join_without_state_store",
        "transform.join: needs a [state_store] (join buffers are persisted)",
    ),
    case(
        "join_unknown_left_source",
        (
            "transform.join.left_source: 'order' matches no [[sources]] query (expected one "
            "of 'orders', 'payments'); did you mean 'orders'?"
        ),
    ),
    case(
        "join_without_time_bound",
        (
            "transform.join: missing the time bound: set time_window_ms, or min_delta_ms and "
            "max_delta_ms"
        ),
    ),
    case(
        "join_both_time_forms",
        ("transform.join.time_window_ms: exclusive with min_delta_ms / max_delta_ms; use one form"),
    ),
    case(
        "join_min_without_max",
        "transform.join.max_delta_ms: missing: min_delta_ms and max_delta_ms go together",
    ),
    case(
        "join_min_greater_than_max",
        "transform.join.max_delta_ms: expected at least min_delta_ms (600000), got 300000",
    ),
    case(
        "join_key_count_mismatch",
        "transform.join.right_keys: expected as many key columns as left_keys (1), got 2",
    ),
    case(
        "session_without_state_store",
        "transform.window: a session window needs a [state_store]",
    ),
    case(
        "session_without_group_by",
        "transform.window.group_by: a session window needs at least one group_by column",
    ),
    case(
        "window_reopen_without_lateness",
        (
            'transform.window.allowed_lateness_ms: missing: late_data = "reopen" requires '
            "allowed_lateness_ms"
        ),
    ),
    case(
        "join_reopen_without_lateness",
        (
            'transform.join.allowed_lateness_ms: missing: late_data = "reopen" requires '
            "allowed_lateness_ms"
        ),
    ),
    case(
        "agg_missing_column",
        ("transform.window.aggregations[0].column: missing required key: agg 'sum' needs a column"),
    ),
    case(
        "agg_count_with_column",
        (
            "transform.window.aggregations[0].column: agg 'count' counts rows and takes no "
            "column; use 'count_col' to count a column's non-null values"
        ),
    ),
    case(
        "agg_mode_not_count_distinct",
        "transform.window.aggregations[0].mode: only for agg 'count_distinct', not 'sum'",
    ),
    case(
        "agg_exact_without_max",
        (
            "transform.window.aggregations[0].max_distinct_values_per_group: missing: mode = "
            '"exact" needs max_distinct_values_per_group'
        ),
    ),
    case(
        "agg_duplicate_as",
        ("transform.window.aggregations[1].as: duplicate output column 'n' (also aggregations[0])"),
    ),
    case(
        "no_source",
        "missing a source: add [source] (with top-level source_query) or [[sources]]",
    ),
    case(
        "source_and_sources",
        "sources: [source] and [[sources]] are exclusive; use one form",
    ),
    case(
        "source_without_source_query",
        "source_query: missing required key (expected a string: what [source] reads)",
    ),
    case(
        "sources_entry_without_query",
        "sources[1].query: missing required key (expected a string)",
    ),
    case(
        "sources_duplicate_query",
        "sources[1].query: duplicate query 'orders' (also sources[0])",
    ),
    case(
        "no_target",
        "missing a target: add [target] or [[targets]]",
    ),
    case(
        "cdc_into_kafka_target",
        (
            "target.kind: [transform.cdc] needs a table target ('postgres', 'mysql', "
            "'sqlite', 'duckdb', 'delta_local', 'delta_s3'), got 'kafka'"
        ),
    ),
    case(
        "cdc_delta_without_primary_key",
        ("target.table.primary_key: missing: a delta target needs primary_key for [transform.cdc]"),
    ),
    case(
        "dlq_without_destination",
        (
            'transform.on_error: "dlq" needs a dead-letter destination: set dead_letter_topic'
            " (Kafka source) or dlq_store"
        ),
    ),
    case(
        "dead_letter_topic_without_kafka",
        (
            "dead_letter_topic: needs a kafka source (its brokers receive the DLQ); use "
            "dlq_store for other sources"
        ),
    ),
    case(
        "bad_dlq_store",
        (
            "dlq_store: expected auto, topic, table, kafka:TOPIC, postgres:SCHEMA.TABLE or a "
            'path ending in .jsonl, got "s3://bucket/dlq"'
        ),
    ),
    case(
        "dlq_store_topic_without_topic",
        'dlq_store: "topic" needs dead_letter_topic (on the pipeline or a kafka source)',
    ),
    case(
        "dlq_store_table_without_postgres",
        (
            'dlq_store: "postgres:ops.dead_letters" needs a postgres target or [state_store] '
            "(its database holds the table)"
        ),
    ),
    case(
        "dlq_store_kafka_without_kafka_source",
        'dlq_store: "kafka:dead" needs a kafka source (its brokers receive the DLQ)',
    ),
    case(
        "bad_url_scheme",
        (
            "target.url: expected a postgres:// or postgresql:// URL, got "
            '"mysql://root@127.0.0.1:3306/db"'
        ),
    ),
    case(
        "bad_amqp_url_scheme",
        'source.amqp_url: expected an amqp:// or amqps:// URL, got "http://127.0.0.1:15672/"',
    ),
    case(
        "avro_without_registry",
        "source.schema_registry_url: missing: payload_format 'avro' needs a schema registry",
    ),
    case(
        "json_schema_target_without_registry",
        "target.schema_registry_url: missing: payload_format 'json_schema' needs a schema registry",
    ),
    case(
        "lookups_without_sql",
        "transform.lookups: lookups need a [transform] sql that uses them",
    ),
    case(
        "lookup_named_source",
        "transform.lookups.source: 'source' is reserved for the streaming input",
    ),
    case(
        "invalid_toml",
        "invalid TOML: Illegal character '\\n' (at line 14, column 15)",
    ),
    case(
        "missing_env_var",
        "target.url: environment variable ${NOPE} is not set",
    ),
    case(
        "missing_env_vars",
        "source.group_id: environment variable ${NOPE} is not set",
        "target.url: environment variable ${NOPE_TOO} is not set",
    ),
    case(
        "two_errors",
        "idle_pause_ms: expected an integer >= 0, got -1",
        (
            "target.mode: expected one of 'append', 'merge', 'scd2', 'truncate', got a string"
            ' "upsert"'
        ),
    ),
    case(
        "type_and_rule_errors",
        "source.group_id: expected a string, got an integer (42)",
        "transform.cdc: [transform.window] and [transform.cdc] are mutually exclusive",
    ),
    case(
        "secret_in_bad_url",
        (
            "target.url: expected a postgres:// or postgresql:// URL, got "
            '"mysql://root:***@127.0.0.1:3306/db"'
        ),
    ),
    case(
        "secret_wrong_type",
        "source.sasl_plain_password: expected a string, got an integer",
    ),
    case(
        "empty_pipeline_name",
        "pipeline_name: expected a non-empty string, got an empty string",
    ),
    case(
        "kind_not_string",
        (
            "source.kind: expected one of 'kafka', 'rabbitmq', 'pubsub', 'kinesis', "
            "'delta_local', 'delta_s3', 'object_store_local', 'object_store_s3', got an "
            "integer (1)"
        ),
    ),
    case(
        "targets_table_array_of_two",
        "targets[0].table: expected one table, got an array of 2",
    ),
    case(
        "query_in_single_source",
        "source.query: not allowed in [source]; use the top-level source_query",
    ),
    case(
        "source_query_with_sources",
        "source_query: not used with [[sources]]: each entry has its own query",
    ),
    case(
        "late_data_dlq_without_destination",
        (
            'transform.window.late_data: "dlq" needs a dead-letter destination: set '
            "dead_letter_topic (Kafka source) or dlq_store"
        ),
    ),
    case(
        "delta_merge_without_primary_key",
        'target.table.primary_key: missing: mode = "merge" on a delta target needs primary_key',
    ),
    case(
        "session_max_below_gap",
        "transform.window.max_session_duration_ms: expected at least gap_ms (300000), got 60000",
    ),
    case(
        "cdc_custom_missing_fields",
        (
            'transform.cdc.op_field: missing: envelope = "custom" sets every path and op_map '
            "explicitly"
        ),
        (
            'transform.cdc.op_map: missing: envelope = "custom" sets every path and op_map '
            "explicitly"
        ),
        (
            'transform.cdc.before_field: missing: envelope = "custom" sets every path and '
            "op_map explicitly"
        ),
        (
            'transform.cdc.after_field: missing: envelope = "custom" sets every path and '
            "op_map explicitly"
        ),
        (
            'transform.cdc.ts_field: missing: envelope = "custom" sets every path and op_map '
            "explicitly"
        ),
    ),
    case(
        "window_without_aggregations",
        "transform.window.aggregations: missing required key (expected an array of tables)",
    ),
    # More cross-rules of check_rules.
    case(
        "lookup_bad_name",
        "transform.lookups.my-users: expected a SQL identifier as the lookup name",
    ),
    case(
        "lookup_bad_url_scheme",
        (
            "transform.lookups.users.url: expected a postgres:// or postgresql:// URL, got "
            '"mysql://root@127.0.0.1:3306/ref"'
        ),
    ),
    case(
        "state_store_bad_url_scheme",
        (
            "state_store.url: expected a postgres:// or postgresql:// URL, got "
            '"http://127.0.0.1:55432/"'
        ),
    ),
    case(
        "join_same_source_twice",
        "transform.join.right_source: must name a different source than left_source",
    ),
    case(
        "join_same_prefixes",
        "transform.join.right_column_prefix: must differ from left_column_prefix",
    ),
    case(
        "join_empty_keys",
        "transform.join.left_keys: expected at least one key column",
        "transform.join.right_keys: expected at least one key column",
    ),
    case(
        "agg_as_collides_with_group_by",
        (
            "transform.window.aggregations[0].as: output column 'user_id' collides with a "
            "group_by or window column"
        ),
    ),
    case(
        "aggregations_empty",
        (
            "transform.window.aggregations: expected at least one "
            "[[transform.window.aggregations]] entry"
        ),
    ),
    case(
        "cdc_soft_delete_without_column",
        (
            'transform.cdc.soft_delete_column: missing: delete_mode = "soft" needs '
            "soft_delete_column"
        ),
    ),
    case(
        "cdc_maxwell_without_key_field",
        "transform.cdc.key_field: missing required key (expected a path like 'data.id')",
    ),
    case(
        "sasl_plain_without_credentials",
        "source.sasl_plain_username: missing: sasl_mechanism 'PLAIN' needs it",
        "source.sasl_plain_password: missing: sasl_mechanism 'PLAIN' needs it",
    ),
    case(
        "sources_empty",
        "sources: expected at least one [[sources]] entry",
    ),
    case(
        "targets_and_target",
        "targets: [target] and [[targets]] are exclusive; use one form",
    ),
    case(
        "secret_in_dlq_store",
        (
            "dlq_store: expected auto, topic, table, kafka:TOPIC, postgres:SCHEMA.TABLE or a "
            'path ending in .jsonl, got "postgresql://dlq:***@127.0.0.1:55432/postgres"'
        ),
    ),
]


@pytest.mark.parametrize(("name", "expected"), CASES)
def test_invalid_file_reports_exactly(name: str, expected: list[str]) -> None:
    path = rel(name)
    assert problem_lines(path) == [f"{path}: {line}" for line in expected]


def test_every_fixture_has_a_case() -> None:
    names = {p.values[0] for p in CASES}
    files = {p.stem for p in INVALID.glob("*.toml")}
    assert files == names
    assert len(files) >= 35


def test_unreadable_file() -> None:
    path = "tests/fixtures/invalid/does_not_exist.toml"
    assert problem_lines(path) == [f"{path}: cannot read: No such file or directory"]


def test_directory_is_unreadable() -> None:
    path = "tests/fixtures/invalid"
    assert problem_lines(path) == [f"{path}: cannot read: Is a directory"]


# ---------------------------------------------------------------------------
# ${VAR} interpolation

PIPELINE = """
pipeline_name = "interp"
source_query = "events"

[source]
kind = "kafka"
bootstrap_servers = "127.0.0.1:19092"
group_id = "{group_id}"

[target]
kind = "postgres"
url = "{url}"

[target.table]
name = "events"
"""
PG_URL = "postgresql://postgres@127.0.0.1:55432/postgres"


def test_env_var_is_substituted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_TEST_GROUP", "g-from-env")
    spec = load_text(PIPELINE.format(group_id="${SLUICE_TEST_GROUP}", url=PG_URL))
    assert isinstance(spec.source, KafkaSource)
    assert spec.source.group_id == "g-from-env"


def test_env_default_used_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_TEST_PG_URL", raising=False)
    text = PIPELINE.format(group_id="g", url="${SLUICE_TEST_PG_URL:-" + PG_URL + "}")
    spec = load_text(text)
    assert isinstance(spec.target, PostgresTarget)
    assert spec.target.url == PG_URL


def test_env_default_ignored_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    other = "postgresql://app@db.internal:5432/app"
    monkeypatch.setenv("SLUICE_TEST_PG_URL", other)
    spec = load_text(PIPELINE.format(group_id="g", url="${SLUICE_TEST_PG_URL:-" + PG_URL + "}"))
    assert isinstance(spec.target, PostgresTarget)
    assert spec.target.url == other


def test_double_dollar_is_a_literal() -> None:
    # NOPE is unset (autouse fixture): $${ must not even look it up.
    spec = load_text(PIPELINE.format(group_id="$${NOPE}-x", url=PG_URL))
    assert isinstance(spec.source, KafkaSource)
    assert spec.source.group_id == "${NOPE}-x"


def test_env_mapping_argument_overrides_os_environ() -> None:
    spec = load_text(PIPELINE.format(group_id="${NOPE}", url=PG_URL), env={"NOPE": "given"})
    assert isinstance(spec.source, KafkaSource)
    assert spec.source.group_id == "given"


def test_missing_env_var_names_variable_and_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_text(PIPELINE.format(group_id="${NOPE}", url=PG_URL), "p.toml")
    assert str(info.value).splitlines() == [
        "p.toml: source.group_id: environment variable ${NOPE} is not set"
    ]


# ---------------------------------------------------------------------------
# flow validate


def test_flow_validate_invalid_exits_2_with_problems_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = rel("two_errors")
    assert main(["validate", path]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}: idle_pause_ms: expected an integer >= 0, got -1",
        (
            f"{path}: target.mode: expected one of 'append', 'merge', 'scd2', 'truncate', "
            'got a string "upsert"'
        ),
    ]


@pytest.mark.parametrize("order", ["valid_first", "invalid_first"])
def test_flow_validate_valid_and_invalid_exits_2(
    order: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = rel("bad_enum")
    files = [VALID_SEED, bad] if order == "valid_first" else [bad, VALID_SEED]
    assert main(["validate", *files]) == 2
    out, err = capsys.readouterr()
    assert out == f"{VALID_SEED}: ok\n"
    assert err.splitlines() == [
        (
            f"{bad}: transform.on_error: expected one of 'dlq', 'drop', 'fail', got a string "
            "\"dorp\"; did you mean 'drop'?"
        )
    ]


def test_flow_validate_quiet_prints_nothing_for_valid(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["validate", "-q", VALID_SEED]) == 0
    assert capsys.readouterr().out == ""


def test_flow_plan_on_invalid_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    path = rel("no_target")
    assert main(["plan", path]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"{path}: missing a target: add [target] or [[targets]]\n"
