"""The latency benchmark's append as a Bytewax program: Kafka JSON -> Postgres.

    /opt/peers/bytewax/bin/python bytewax_append.py --bootstrap-servers ... --topic T \\
        --group G --postgres-url URL --table T --columns a,b,... --state-dir DIR

Run by ``run.py`` in the peers' own venv (``benchmarks/setup_peers.sh``), never
in the project's: it imports nothing from the repository. Bytewax 0.21 has no
Postgres sink, so this is the smallest one its docs describe: a
``DynamicSink`` whose partition COPYs each batch it is handed (psycopg 3)
and commits. The Kafka input (``KafkaSource``, from the beginning of the
topic, its default batch size) assigns partitions itself and never joins the
consumer group: the program prints ``ready`` once the sink is built, which
``run.py`` waits for. One worker, no recovery (the defaults). Runs until
SIGTERM.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import bytewax.operators as op
import psycopg
from bytewax.connectors.kafka import KafkaSource, KafkaSourceMessage
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.run import cli_main
from confluent_kafka import OFFSET_BEGINNING


class CopyPartition(StatelessSinkPartition[tuple[Any, ...]]):
    def __init__(self, url: str, table: str, columns: list[str]) -> None:
        self.conn = psycopg.connect(url)
        self.copy_sql = f"COPY public.{table} ({', '.join(columns)}) FROM STDIN"

    def write_batch(self, items: list[tuple[Any, ...]]) -> None:
        with self.conn.cursor() as cur, cur.copy(self.copy_sql) as copy:
            for row in items:
                copy.write_row(row)
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()


class CopySink(DynamicSink[tuple[Any, ...]]):
    def __init__(self, url: str, table: str, columns: list[str]) -> None:
        self.url, self.table, self.columns = url, table, columns

    def build(self, step_id: str, worker_index: int, worker_count: int) -> CopyPartition:
        part = CopyPartition(self.url, self.table, self.columns)
        print("ready", flush=True)
        return part


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--bootstrap-servers", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--group", required=True, help="group.id (offsets are not committed)")
    p.add_argument("--postgres-url", required=True)
    p.add_argument("--table", required=True, help="in schema public")
    p.add_argument("--columns", required=True, help="the payload fields to write, in order")
    p.add_argument("--state-dir", required=True, help="unused (no recovery)")
    a = p.parse_args()
    columns = a.columns.split(",")

    def row(msg: KafkaSourceMessage[bytes, bytes]) -> tuple[Any, ...]:
        value = json.loads(msg.value)
        return tuple(value.get(c) for c in columns)

    flow = Dataflow("latency-append")
    source = KafkaSource(
        brokers=[a.bootstrap_servers],
        topics=[a.topic],
        starting_offset=OFFSET_BEGINNING,
        add_config={"group.id": a.group},
    )
    rows = op.map("row", op.input("kafka", flow, source), row)
    op.output("postgres", rows, CopySink(a.postgres_url, a.table, columns))
    cli_main(flow)


if __name__ == "__main__":
    main()
