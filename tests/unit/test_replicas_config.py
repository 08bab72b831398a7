"""replicas = true: what a pipeline must have to run as several processes."""

from __future__ import annotations

import pytest

from sluice.config import load_text
from sluice.errors import ConfigError

WINDOW = """
[target]
kind = "postgres"
url = "postgresql://h/db"
[target.table]
name = "t"
[transform.window]
kind = "tumbling"
duration_ms = 60000
group_by = ["user_id"]
[[transform.window.aggregations]]
agg = "count"
as = "n"
"""


def test_a_window_replica_needs_a_shared_postgres_store() -> None:
    text = (
        'pipeline_name = "p"\nreplicas = true\nsource_query = "t"\n[source]\nkind = "kafka"\nbootstrap_servers = "b"\n'
        + WINDOW
    )
    with pytest.raises(ConfigError, match="replicas = true with a window or join needs a postgres"):
        load_text(text, "p.toml")
    store = '[state_store]\nkind = "postgres"\nurl = "postgresql://h/db"\n'
    assert load_text(text + store, "p.toml").replicas


def test_replicas_need_partitioned_sources_read_through_one_consumer() -> None:
    text = (
        'pipeline_name = "p"\nreplicas = true\n'
        '[[sources]]\nquery = "a"\nkind = "kafka"\nbootstrap_servers = "b1"\n'
        '[[sources]]\nquery = "c"\nkind = "rabbitmq"\namqp_url = "amqp://h"\n'
        '[[sources]]\nquery = "d"\nkind = "kafka"\nbootstrap_servers = "b2"\n'
        + WINDOW
        + '[state_store]\nkind = "postgres"\nurl = "postgresql://h/db"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_text(text, "p.toml")
    message = str(err.value)
    assert "sources[1].kind: replicas = true needs sources whose partitions" in message
    assert (
        "sources[2].bootstrap_servers: replicas = true reads every source through one consumer"
        in message
    )
