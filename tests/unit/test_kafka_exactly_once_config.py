"""delivery = "exactly_once": Kafka → Kafka transactions, and what they refuse."""

from __future__ import annotations

import pytest

from sluice.config import load_text
from sluice.connectors import registry
from sluice.connectors.kafka.target import KafkaTarget, build_target
from sluice.connectors.kafka.transactions import TransactionalKafkaTarget
from sluice.connectors.sql.positions import RecordsPositions
from sluice.engine.plan import build_plan
from sluice.errors import ConfigError

KAFKA_TO_KAFKA = """
pipeline_name = "p"
source_query = "in"
delivery = "exactly_once"
[source]
kind = "kafka"
bootstrap_servers = "b:9092"
group_id = "g"
[target]
kind = "kafka"
bootstrap_servers = "b:9092"
topic = "out"
"""

WINDOW = """
[transform.window]
kind = "tumbling"
duration_ms = 60000
group_by = ["user_id"]
[[transform.window.aggregations]]
agg = "count"
as = "n"
"""


def test_kafka_to_kafka_builds_the_transactional_target() -> None:
    spec = load_text(KAFKA_TO_KAFKA, "p.toml")
    target = build_target(spec.all_targets[0], registry.Context(spec), 0)  # type: ignore[arg-type]
    assert isinstance(target, TransactionalKafkaTarget)
    assert isinstance(target, RecordsPositions)
    assert target.commits_source_positions
    assert target.transactional_id == "sluice.p.g.out"  # stable: a restart fences the old one
    assert "exactly once" in build_plan(spec).delivery


def test_without_exactly_once_the_target_records_no_positions() -> None:
    spec = load_text(KAFKA_TO_KAFKA.replace('delivery = "exactly_once"\n', ""), "p.toml")
    target = build_target(spec.all_targets[0], registry.Context(spec), 0)  # type: ignore[arg-type]
    assert type(target) is KafkaTarget
    assert not isinstance(target, RecordsPositions)


def test_a_transactional_id_of_the_users_wins() -> None:
    text = KAFKA_TO_KAFKA + 'librdkafka = { "transactional.id" = "mine" }\n'
    spec = load_text(text, "p.toml")
    target = build_target(spec.all_targets[0], registry.Context(spec), 0)  # type: ignore[arg-type]
    assert isinstance(target, TransactionalKafkaTarget) and target.transactional_id == "mine"


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        (lambda t: t + WINDOW, "transform.window", "without window, join or CDC state"),
        (
            lambda t: t + '[state_store]\nkind = "postgres"\nurl = "postgresql://h/db"\n',
            "state_store",
            "no [state_store]",
        ),
        (
            lambda t: t.replace(
                'delivery = "exactly_once"', 'delivery = "exactly_once"\nreplicas = true'
            ),
            "replicas",
            "one process per transactional.id",
        ),
        (
            lambda t: (
                t.split("[target]")[0]
                + '[target]\nkind = "postgres"\nurl = "postgresql://h/db"\n[target.table]\nname = "t"\n'
            ),
            "target.kind",
            "needs a Kafka target, not 'postgres'",
        ),
        (
            lambda t: t.replace(
                'kind = "kafka"\nbootstrap_servers = "b:9092"\ngroup_id = "g"',
                'kind = "rabbitmq"\namqp_url = "amqp://h"',
            ),
            "source.kind",
            "needs Kafka sources, not 'rabbitmq'",
        ),
    ],
)
def test_exactly_once_refuses_what_a_transaction_cannot_hold(
    change: object, path: str, message: str
) -> None:
    text = change(KAFKA_TO_KAFKA)  # type: ignore[operator]
    with pytest.raises(ConfigError) as err:
        load_text(text, "p.toml")
    problems = [(p.path, p.message) for p in err.value.problems]
    assert any(p == path and message in m for p, m in problems), problems


def test_exactly_once_needs_one_target() -> None:
    second = KAFKA_TO_KAFKA.split("[target]", maxsplit=1)[0] + (
        '[[targets]]\nkind = "kafka"\nbootstrap_servers = "b:9092"\ntopic = "o1"\n'
        '[[targets]]\nkind = "kafka"\nbootstrap_servers = "b:9092"\ntopic = "o2"\n'
    )
    with pytest.raises(ConfigError, match="needs exactly one target"):
        load_text(second, "p.toml")
