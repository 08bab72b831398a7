"""The plan graph: which nodes a pipeline compiles to and what each edge carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sluice.cli import main
from sluice.config import load_file, load_text
from sluice.engine.plan import Plan, build_plan

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT / "tests" / "fixtures" / "seeds"
CONFIGS = ROOT / "configs"

KAFKA = 'kind = "kafka"\nbootstrap_servers = "127.0.0.1:19092"\n'
PG = 'kind = "postgres"\nurl = "postgresql://postgres@127.0.0.1:55432/postgres"\n'


def plan_of(path: Path) -> Plan:
    return build_plan(load_file(path))


def plan_text(text: str) -> Plan:
    return build_plan(load_text(text))


def edges(plan: Plan) -> list[tuple[str, str]]:
    return [(e.src, e.dst) for e in plan.edges]


def ids(plan: Plan) -> list[str]:
    return [n.id for n in plan.nodes]


def node(plan: Plan, node_id: str) -> dict[str, object]:
    found = [n for n in plan.nodes if n.id == node_id]
    assert len(found) == 1, ids(plan)
    n = found[0]
    return {"role": n.role, "kind": n.kind, **n.detail}


def carries(plan: Plan, src: str, dst: str) -> str:
    found = [e.carries for e in plan.edges if (e.src, e.dst) == (src, dst)]
    assert len(found) == 1, edges(plan)
    return found[0]


def test_single_source_to_target() -> None:
    plan = plan_of(SEEDS / "events_to_pg.toml")
    assert plan.pipeline == "events-to-pg"
    assert ids(plan) == ["source:events", "target:0"]
    assert edges(plan) == [("source:events", "target:0")]
    assert node(plan, "source:events") == {
        "role": "source",
        "kind": "kafka",
        "query": "events",
        "bootstrap_servers": "127.0.0.1:19092",
        "group_id": "ematix-flow",
    }
    assert node(plan, "target:0")["table"] == "public.events"
    assert "_event_ts" in carries(plan, "source:events", "target:0")
    assert plan.by_role("stage") == []
    assert plan.by_role("dlq") == []


def test_fan_in_unions_every_source() -> None:
    plan = plan_of(SEEDS / "fanin.toml")
    assert ids(plan) == ["source:orders", "source:payments", "stage:union", "target:0"]
    assert edges(plan) == [
        ("source:orders", "stage:union"),
        ("source:payments", "stage:union"),
        ("stage:union", "target:0"),
    ]
    assert node(plan, "stage:union") == {"role": "stage", "kind": "union", "inputs": 2}
    assert "unioned" in carries(plan, "stage:union", "target:0")


def test_fan_out_edges_to_each_target() -> None:
    plan = plan_of(CONFIGS / "fan_out.toml")
    assert ids(plan) == ["source:events", "target:0", "target:1"]
    assert edges(plan) == [("source:events", "target:0"), ("source:events", "target:1")]
    assert node(plan, "target:0")["kind"] == "postgres"
    assert node(plan, "target:1")["kind"] == "delta_local"
    assert node(plan, "target:1")["partition_by"] == ["event_type"]


def test_fan_out_seed_with_targets_table_array() -> None:
    plan = plan_of(SEEDS / "fanout.toml")
    assert edges(plan) == [("source:events", "target:0"), ("source:events", "target:1")]
    assert node(plan, "target:0")["table"] == "public.events_pg"
    assert node(plan, "target:1")["kind"] == "delta_s3"


def test_sql_with_lookup() -> None:
    plan = plan_of(CONFIGS / "sql_lookup.toml")
    assert ids(plan) == ["source:events", "stage:sql", "target:0"]
    assert edges(plan) == [("source:events", "stage:sql"), ("stage:sql", "target:0")]
    sql = node(plan, "stage:sql")
    assert sql["kind"] == "sql"
    assert sql["dialect"] == "datafusion"
    assert sql["lookups"] == {"users": {"kind": "postgres", "table": "public.users"}}
    assert carries(plan, "stage:sql", "target:0") == "rows of the SQL result"


def test_tumbling_window_carries_window_group_and_aggregate_columns() -> None:
    plan = plan_of(CONFIGS / "tumbling.toml")
    assert ids(plan) == ["source:events", "stage:sql", "stage:window", "target:0"]
    assert edges(plan) == [
        ("source:events", "stage:sql"),
        ("stage:sql", "stage:window"),
        ("stage:window", "target:0"),
    ]
    window = node(plan, "stage:window")
    assert window["kind"] == "tumbling"
    assert window["duration_ms"] == 60000
    assert window["group_by"] == ["user_id"]
    assert window["aggregations"] == [
        "n=count(*)",
        "amount_sum=sum(amount)",
        "amount_avg=avg(amount)",
        "distinct_event_types=count_distinct(event_type)",
    ]
    out = carries(plan, "stage:window", "target:0")
    assert out == (
        "one row per closed window and group: window_start, window_end, user_id, "
        "n, amount_sum, amount_avg, distinct_event_types"
    )


def test_window_without_sql_reads_the_source_directly() -> None:
    plan = plan_of(CONFIGS / "hopping.toml")
    assert edges(plan) == [("source:events", "stage:window"), ("stage:window", "target:0")]
    window = node(plan, "stage:window")
    assert window["kind"] == "hopping"
    assert window["hop_ms"] == 60000


def test_session_window_carries_session_id() -> None:
    plan = plan_of(CONFIGS / "session.toml")
    assert node(plan, "stage:window")["kind"] == "session"
    out = carries(plan, "stage:window", "target:0")
    assert out.split(": ", 1)[1].split(", ") == [
        "window_start",
        "window_end",
        "session_id",
        "user_id",
        "events",
        "entry_page",
        "exit_page",
    ]
    assert "postgres transaction" in plan.delivery


def test_join_has_an_edge_from_each_source() -> None:
    plan = plan_of(SEEDS / "join.toml")
    assert ids(plan) == ["source:orders", "source:payments", "stage:join", "target:0"]
    assert edges(plan) == [
        ("source:orders", "stage:join"),
        ("source:payments", "stage:join"),
        ("stage:join", "target:0"),
    ]
    join = node(plan, "stage:join")
    assert join["left_source"] == "orders"
    assert join["right_source"] == "payments"
    assert join["time_window_ms"] == 300000
    assert "union" not in " ".join(ids(plan))
    assert carries(plan, "stage:join", "target:0") == "joined rows: left_* and right_* columns"


def test_cdc_stage() -> None:
    plan = plan_of(SEEDS / "cdc.toml")
    assert ids(plan) == ["source:dbz.public.customers", "stage:cdc", "target:0"]
    assert edges(plan) == [
        ("source:dbz.public.customers", "stage:cdc"),
        ("stage:cdc", "target:0"),
    ]
    cdc = node(plan, "stage:cdc")
    assert cdc["envelope"] == "debezium"
    assert cdc["key_field"] == "after.id"


def test_cdc_delta_target_shows_primary_key() -> None:
    plan = plan_of(CONFIGS / "cdc_delta.toml")
    target = node(plan, "target:0")
    assert target["kind"] == "delta_local"
    assert target["primary_key"] == ["id"]


def test_dead_letter_topic_in_source_adds_dlq_node() -> None:
    plan = plan_of(SEEDS / "dead_letter_kafka.toml")
    assert ids(plan) == ["source:events", "target:0", "dlq"]
    assert node(plan, "dlq") == {"role": "dlq", "kind": "kafka", "topic": "events-failed"}
    assert ("source:events", "dlq") in edges(plan)


def test_top_level_dead_letter_topic_fed_by_the_sql_stage() -> None:
    plan = plan_text(
        'pipeline_name = "p"\nsource_query = "events"\ndead_letter_topic = "events-failed"\n'
        f'[source]\n{KAFKA}[target]\n{PG}[target.table]\nname = "t"\n'
        '[transform]\nsql = "SELECT * FROM source"\non_error = "dlq"\n'
    )
    assert node(plan, "dlq") == {"role": "dlq", "kind": "kafka", "topic": "events-failed"}
    assert edges(plan)[-1] == ("stage:sql", "dlq")
    assert node(plan, "stage:sql")["on_error"] == "dlq"


def test_dlq_store_jsonl() -> None:
    plan = plan_text(
        'pipeline_name = "p"\nsource_query = "events"\ndlq_store = "/tmp/dlq/p.jsonl"\n'
        f'[source]\n{KAFKA}[target]\n{PG}[target.table]\nname = "t"\n'
    )
    assert node(plan, "dlq") == {"role": "dlq", "kind": "jsonl", "store": "/tmp/dlq/p.jsonl"}


def test_no_dlq_node_without_a_destination() -> None:
    assert plan_of(CONFIGS / "events_to_pg.toml").by_role("dlq") == []


def test_group_id_defaults_to_pipeline_name() -> None:
    plan = plan_of(SEEDS / "fanin.toml")
    assert node(plan, "source:orders")["group_id"] == "fanin"
    assert node(plan, "source:payments")["group_id"] == "fanin"


def test_explicit_group_id_is_kept() -> None:
    plan = plan_of(CONFIGS / "events_to_pg.toml")
    assert node(plan, "source:events")["group_id"] == "sluice-events-to-pg"


def test_raw_bytes_source_edge_says_binary() -> None:
    plan = plan_text(
        'pipeline_name = "p"\nsource_query = "events"\n'
        f'[source]\n{KAFKA}payload_format = "raw_bytes"\n[target]\n{PG}[target.table]\nname = "t"\n'
    )
    assert carries(plan, "source:events", "target:0").startswith("Arrow record batches: value")


@pytest.mark.parametrize(
    ("name", "kind", "query"),
    [
        ("rabbitmq_to_pg", "rabbitmq", "events"),
        ("pubsub_to_pg", "pubsub", "events-sub"),
        ("kinesis_to_pg", "kinesis", "events"),
    ],
)
def test_non_kafka_sources(name: str, kind: str, query: str) -> None:
    plan = plan_of(CONFIGS / f"{name}.toml")
    assert edges(plan) == [(f"source:{query}", "target:0")]
    src = plan.by_role("source")[0]
    assert src.kind == kind
    assert "group_id" not in src.detail


def test_flow_plan_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["plan", "tests/fixtures/seeds/join.toml", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    doc = json.loads(out)
    assert set(doc) >= {"pipeline", "delivery", "nodes", "edges"}
    assert doc["pipeline"] == "orders-payments"
    assert [n["id"] for n in doc["nodes"]] == [
        "source:orders",
        "source:payments",
        "stage:join",
        "target:0",
    ]
    assert all(set(n) == {"id", "role", "kind", "detail"} for n in doc["nodes"])
    assert [(e["from"], e["to"]) for e in doc["edges"]] == [
        ("source:orders", "stage:join"),
        ("source:payments", "stage:join"),
        ("stage:join", "target:0"),
    ]
    assert all(e["carries"] for e in doc["edges"])


def test_flow_plan_text(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["plan", "tests/fixtures/seeds/fanin.toml"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "pipeline fanin"
    assert "  [stage:union] union  inputs=2" in lines
    assert (
        "  source:orders -> stage:union: "
        + carries(plan_of(SEEDS / "fanin.toml"), "source:orders", "stage:union")
        in lines
    )


def test_every_edge_joins_known_nodes() -> None:
    for path in [*SEEDS.glob("*.toml"), *CONFIGS.glob("*.toml")]:
        plan = plan_of(path)
        known = set(ids(plan))
        assert len(known) == len(plan.nodes), path
        for src, dst in edges(plan):
            assert src in known and dst in known, (path, src, dst)
        for target in plan.by_role("target"):
            assert any(dst == target.id for _, dst in edges(plan)), (path, target.id)
