"""Secrets never leave the loader: not in plans, reprs, or validation errors.

Every secret below is a distinctive literal; each test asserts that literal
is absent from what a user (or a log) could see, and that ``***`` stands in
its place where the key is shown at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sluice.cli import main
from sluice.config import PipelineSpec, load_file, load_text
from sluice.config.spec import PostgresStateStore
from sluice.connectors.kafka.spec import KafkaTarget
from sluice.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

PG_URL_PASSWORD = "pg-url-s3cret"
PG_QUERY_PASSWORD = "pg-query-s3cret"
SASL_PASSWORD = "sasl-s3cret"
SR_PASSWORD = "sr-basic-s3cret"
SR_URL_PASSWORD = "sr-url-s3cret"
AWS_SECRET = "aws-s3cret"
ENV_KAFKA_PASSWORD = "env-kafka-s3cret"
ENV_LOOKUP_PASSWORD = "env-lookup-s3cret"
ENV_STATE_PASSWORD = "env-state-s3cret"

SECRETS = [
    PG_URL_PASSWORD,
    PG_QUERY_PASSWORD,
    SASL_PASSWORD,
    SR_PASSWORD,
    SR_URL_PASSWORD,
    AWS_SECRET,
    ENV_KAFKA_PASSWORD,
    ENV_LOOKUP_PASSWORD,
    ENV_STATE_PASSWORD,
]

PIPELINE = f"""
pipeline_name = "secrets"
source_query = "events"
dlq_store = "postgres:public.dlq"

[source]
kind = "kafka"
bootstrap_servers = "127.0.0.1:19092"
payload_format = "avro"
schema_registry_url = "http://registry:{SR_URL_PASSWORD}@127.0.0.1:8081"
schema_registry_basic_auth_user = "registry"
schema_registry_basic_auth_password = "{SR_PASSWORD}"
security_protocol = "SASL_PLAINTEXT"
sasl_mechanism = "PLAIN"
sasl_plain_username = "svc"
sasl_plain_password = "{SASL_PASSWORD}"

[[targets]]
kind = "postgres"
url = "postgresql://app:{PG_URL_PASSWORD}@127.0.0.1:55432/postgres?sslmode=disable&password={PG_QUERY_PASSWORD}"

[targets.table]
name = "events"

[[targets]]
kind = "object_store_s3"
bucket = "lake"
format = "parquet"
endpoint = "http://127.0.0.1:5000"
access_key_id = "test"
secret_access_key = "{AWS_SECRET}"

[[targets]]
kind = "kafka"
bootstrap_servers = "127.0.0.1:19092"
topic = "out"
sasl_mechanism = "PLAIN"
sasl_plain_username = "producer"
sasl_plain_password = "${{SLUICE_TEST_KAFKA_PW}}"

[transform]
sql = "SELECT * FROM source s JOIN users u ON s.user_id = u.id"

[transform.lookups.users]
kind = "postgres"
url = "postgresql://ref:${{SLUICE_TEST_LOOKUP_PW}}@127.0.0.1:55432/postgres"
table = "users"

[state_store]
kind = "postgres"
url = "postgresql://state:${{SLUICE_TEST_STATE_PW}}@127.0.0.1:55432/postgres"
"""


@pytest.fixture
def pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLUICE_TEST_KAFKA_PW", ENV_KAFKA_PASSWORD)
    monkeypatch.setenv("SLUICE_TEST_LOOKUP_PW", ENV_LOOKUP_PASSWORD)
    monkeypatch.setenv("SLUICE_TEST_STATE_PW", ENV_STATE_PASSWORD)
    path = tmp_path / "secrets.toml"
    path.write_text(PIPELINE, encoding="utf-8")
    return path


def assert_no_secret(text: str, secrets: list[str] = SECRETS) -> None:
    leaked = [s for s in secrets if s in text]
    assert not leaked, f"leaked {leaked} in:\n{text}"


def test_the_secrets_really_are_loaded(pipeline: Path) -> None:
    # Guards the other tests: redaction must hide values the spec does hold.
    spec = load_file(pipeline)
    assert isinstance(spec.state_store, PostgresStateStore)
    assert ENV_STATE_PASSWORD in spec.state_store.url
    assert spec.targets is not None
    assert isinstance(spec.targets[2], KafkaTarget)
    assert spec.targets[2].sasl_plain_password == ENV_KAFKA_PASSWORD


def test_flow_plan_text_redacts(pipeline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(pipeline)]) == 0
    out, err = capsys.readouterr()
    assert_no_secret(out + err)
    assert "url=postgresql://app:***@127.0.0.1:55432/postgres?sslmode=disable&password=***" in out
    assert "sasl_plain_password=***" in out
    assert "schema_registry_basic_auth_password=***" in out
    assert "schema_registry_url=http://registry:***@127.0.0.1:8081" in out
    assert "secret_access_key=***" in out


def test_flow_plan_json_redacts(pipeline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(pipeline), "--json"]) == 0
    out, err = capsys.readouterr()
    assert_no_secret(out + err)
    doc = json.loads(out)
    details = {n["id"]: n["detail"] for n in doc["nodes"]}
    assert details["source:events"]["sasl_plain_password"] == "***"
    assert details["source:events"]["schema_registry_basic_auth_password"] == "***"
    assert details["target:0"]["url"] == (
        "postgresql://app:***@127.0.0.1:55432/postgres?sslmode=disable&password=***"
    )
    assert details["target:1"]["secret_access_key"] == "***"
    assert details["target:2"]["sasl_plain_password"] == "***"


def nested_specs(spec: PipelineSpec) -> list[object]:
    assert spec.transform is not None
    assert spec.targets is not None
    return [
        spec,
        spec.source,
        *spec.targets,
        getattr(spec.targets[0], "table", None),
        spec.transform,
        spec.transform.lookups["users"],
        spec.state_store,
    ]


def test_repr_and_str_redact(pipeline: Path) -> None:
    spec = load_file(pipeline)
    for obj in nested_specs(spec):
        assert_no_secret(repr(obj))
        assert_no_secret(str(obj))
    assert "sasl_plain_password='***'" in repr(spec.source)
    assert "secret_access_key='***'" in repr(spec)
    assert "postgresql://state:***@127.0.0.1" in repr(spec.state_store)
    assert "postgresql://ref:***@127.0.0.1" in str(spec.transform)


def test_repr_of_collections_of_specs_redacts(pipeline: Path) -> None:
    spec = load_file(pipeline)
    assert spec.transform is not None
    assert_no_secret(repr(spec.targets))
    assert_no_secret(repr(spec.transform.lookups))
    assert_no_secret(repr(spec.all_sources))


# ---------------------------------------------------------------------------
# Validation errors

BAD = """
pipeline_name = "bad"
source_query = "events"

[source]
kind = "kafka"
bootstrap_servers = "127.0.0.1:19092"
{source_extra}

[target]
kind = "postgres"
url = "{url}"

[target.table]
name = "events"
"""
GOOD_URL = "postgresql://postgres@127.0.0.1:55432/postgres"


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(text, "bad.toml")
    return str(info.value)


def test_bad_url_scheme_masks_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as info:
        load_file("tests/fixtures/invalid/secret_in_bad_url.toml")
    text = str(info.value)
    assert "hunter2-url-secret" not in text
    assert 'got "mysql://root:***@127.0.0.1:3306/db"' in text


def test_wrong_typed_secret_value_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as info:
        load_file("tests/fixtures/invalid/secret_wrong_type.toml")
    text = str(info.value)
    assert "8675309" not in text
    assert "source.sasl_plain_password: expected a string, got an integer" in text


@pytest.mark.parametrize(
    "extra",
    [
        'sasl_plain_password = ["array-s3cret"]',
        'sasl_plain_password = { value = "table-s3cret" }',
        "schema_registry_basic_auth_password = 4242",
        "ssl_key_password = true",
    ],
)
def test_wrong_typed_secrets_of_any_shape(extra: str) -> None:
    text = problems(BAD.format(source_extra=extra, url=GOOD_URL))
    assert "s3cret" not in text
    assert "4242" not in text
    assert "true" not in text
    assert "expected a string, got " in text


def test_env_password_in_bad_url_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_TEST_PW", "env-url-s3cret")
    text = problems(BAD.format(source_extra="", url="mysql://root:${SLUICE_TEST_PW}@db/app"))
    assert "env-url-s3cret" not in text
    assert text == (
        "bad.toml: target.url: expected a postgres:// or postgresql:// URL, "
        'got "mysql://root:***@db/app"'
    )


def test_amqp_password_in_bad_url_is_masked() -> None:
    text = problems(
        'pipeline_name = "bad"\nsource_query = "q"\n'
        '[source]\nkind = "rabbitmq"\namqp_url = "http://guest:amqp-s3cret@127.0.0.1:5672/"\n'
        f'[target]\nkind = "postgres"\nurl = "{GOOD_URL}"\n[target.table]\nname = "t"\n'
    )
    assert "amqp-s3cret" not in text
    assert "http://guest:***@127.0.0.1:5672/" in text


def test_missing_env_var_for_a_secret_names_only_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SLUICE_TEST_UNSET_PW", raising=False)
    text = problems(
        BAD.format(source_extra='sasl_plain_password = "${SLUICE_TEST_UNSET_PW}"', url=GOOD_URL)
    )
    assert text == (
        "bad.toml: source.sasl_plain_password: environment variable ${SLUICE_TEST_UNSET_PW} "
        "is not set"
    )


def test_flow_validate_stderr_masks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    files = [
        "tests/fixtures/invalid/secret_in_bad_url.toml",
        "tests/fixtures/invalid/secret_wrong_type.toml",
    ]
    assert main(["validate", *files]) == 2
    out, err = capsys.readouterr()
    assert "hunter2-url-secret" not in out + err
    assert "8675309" not in out + err
    assert "***" in err


def test_validation_error_lists_other_problems_without_secrets(pipeline: Path) -> None:
    # A valid-but-secret-laden file made invalid elsewhere: the error must not
    # echo the secrets it walked past.
    text = pipeline.read_text(encoding="utf-8").replace('topic = "out"', 'topic = ""')
    out = problems(text)
    assert out == "bad.toml: targets[2].topic: expected a non-empty string, got an empty string"
    assert_no_secret(out)


# ---------------------------------------------------------------------------
# Leaks found in review, fixed in redact.py; kept as regressions


def test_keyword_dsn_password_masked_in_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as info:
        load_file("tests/fixtures/invalid/secret_keyword_dsn.toml")
    assert "hunter2-kw-secret" not in str(info.value)


def test_raw_at_in_url_password_masked_in_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as info:
        load_file("tests/fixtures/invalid/secret_at_in_password.toml")
    assert "hunter2" not in str(info.value)


def test_raw_at_in_url_password_masked_in_plan_and_repr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "at.toml"
    path.write_text(
        'pipeline_name = "at"\nsource_query = "events"\n'
        '[source]\nkind = "kafka"\nbootstrap_servers = "127.0.0.1:19092"\n'
        '[target]\nkind = "postgres"\n'
        'url = "postgresql://app:p@ss-at-s3cret@127.0.0.1:55432/postgres"\n'
        '[target.table]\nname = "t"\n',
        encoding="utf-8",
    )
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "at-s3cret" not in out + repr(load_file(path))


def test_dlq_store_url_password_masked_in_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as info:
        load_file("tests/fixtures/invalid/secret_in_dlq_store.toml")
    assert "hunter2-dlq-secret" not in str(info.value)


def test_dlq_store_url_password_masked_in_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "dlq.toml"
    path.write_text(
        'pipeline_name = "dlq"\nsource_query = "events"\n'
        'dlq_store = "s3://key:dlq-s3cret@bucket/dead/letters.jsonl"\n'
        '[source]\nkind = "kafka"\nbootstrap_servers = "127.0.0.1:19092"\n'
        f'[target]\nkind = "postgres"\nurl = "{GOOD_URL}"\n[target.table]\nname = "t"\n',
        encoding="utf-8",
    )
    assert "dlq-s3cret" not in repr(load_file(path))  # the spec repr does redact it
    assert main(["plan", str(path), "--json"]) == 0
    assert "dlq-s3cret" not in capsys.readouterr().out
