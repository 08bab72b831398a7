"""[transform.cdc] configuration: what loads, and the messages of what does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.cli import main
from sluice.config import load_text
from sluice.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

BASE = """
pipeline_name = "mirror"
source_query = "dbz.public.customers"
[source]
kind = "kafka"
bootstrap_servers = "127.0.0.1:19092"
{target}
{transform}
[transform.cdc]
{cdc}
"""

PG = """[target]
kind = "postgres"
url = "postgresql://u@h/db"
[target.table]
name = "customers"
"""


def problems(cdc: str, target: str = PG, transform: str = "") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(BASE.format(target=target, transform=transform, cdc=cdc), "p.toml")
    return [f"{p.path}: {p.message}" for p in info.value.problems]


def test_the_example_config_validates() -> None:
    assert main(["validate", "-q", str(ROOT / "configs" / "kafka_cdc_to_postgres.toml")]) == 0


def test_every_envelope_loads_with_its_required_keys() -> None:
    for cdc in (
        'envelope = "debezium"\nkey_field = "after.id"',
        'envelope = "maxwell"\nkey_field = "data.id"\nschema_evolution = "add_columns"',
        'envelope = "custom"\nkey_field = "new.pk"\nop_field = "kind"\nbefore_field = "old"\n'
        'after_field = "new"\nts_field = "at"\nop_map = { I = "create", D = "delete" }',
    ):
        spec = load_text(BASE.format(target=PG, transform="", cdc=cdc))
        assert spec.transform is not None and spec.transform.cdc is not None


def test_key_field_is_required_with_an_example_of_the_envelope() -> None:
    assert problems('envelope = "debezium"') == [
        "transform.cdc.key_field: missing required key (expected a path like 'after.id')"
    ]
    assert problems('envelope = "maxwell"') == [
        "transform.cdc.key_field: missing required key (expected a path like 'data.id')"
    ]


def test_custom_names_every_missing_path() -> None:
    got = problems('envelope = "custom"\nkey_field = "new.pk"\nop_field = "kind"')
    assert got == [
        f'transform.cdc.{key}: missing: envelope = "custom" sets every path and op_map explicitly'
        for key in ("op_map", "before_field", "after_field", "ts_field")
    ]


def test_an_op_map_value_must_be_an_operation() -> None:
    (got,) = problems(
        'envelope = "custom"\nkey_field = "n.pk"\nop_field = "k"\nbefore_field = "o"\n'
        'after_field = "n"\nts_field = "t"\nop_map = { U = "upsert" }'
    )
    assert got == (
        "transform.cdc.op_map.U: expected one of 'create', 'delete', 'read', 'update', "
        'got a string "upsert"'
    )


def test_soft_deletes_need_their_column() -> None:
    assert problems('envelope = "debezium"\nkey_field = "after.id"\ndelete_mode = "soft"') == [
        'transform.cdc.soft_delete_column: missing: delete_mode = "soft" needs soft_delete_column'
    ]


def test_a_misspelt_key_suggests_the_right_one() -> None:
    (got,) = problems('envelope = "debezium"\nkey_field = "after.id"\nschema_evolutoin = "fail"')
    assert got == "transform.cdc.schema_evolutoin: unknown key; did you mean 'schema_evolution'?"


def test_cdc_needs_a_table_target_and_delta_its_primary_key() -> None:
    kafka = '[target]\nkind = "kafka"\nbootstrap_servers = "h:1"\ntopic = "out"\n'
    (got,) = problems('envelope = "debezium"\nkey_field = "after.id"', target=kafka)
    assert got.startswith("target.kind: [transform.cdc] needs a table target (")
    delta = '[target]\nkind = "delta_local"\npath = "/tmp/x"\n'
    assert problems('envelope = "debezium"\nkey_field = "after.id"', target=delta) == [
        "target.table.primary_key: missing: a delta target needs primary_key for [transform.cdc]"
    ]


def test_cdc_excludes_a_sql_stage() -> None:
    got = problems(
        'envelope = "debezium"\nkey_field = "after.id"',
        transform='[transform]\nsql = "SELECT * FROM source"',
    )
    assert got == [
        "transform.sql: not allowed with [transform.cdc]: CDC applies the envelopes as they are"
    ]
