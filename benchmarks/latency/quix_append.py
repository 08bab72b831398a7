"""The latency benchmark's append as a Quix Streams program: Kafka JSON -> Postgres.

    /opt/peers/quixstreams/bin/python quix_append.py --bootstrap-servers ... --topic T \\
        --group G --postgres-url URL --table T --columns a,b,... --state-dir DIR

Run by ``run.py`` in the peers' own venv (``benchmarks/setup_peers.sh``), never
in the project's: it imports nothing from the repository. Each JSON value goes
as it is into the pre-created ``public.<table>`` through the community
``PostgreSQLSink`` (no metadata columns, no schema changes), with the
library's defaults otherwise: the sink writes at each checkpoint, every
``commit_interval`` (5 s by default). Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
from urllib.parse import urlsplit

from quixstreams import Application
from quixstreams.sinks.community.postgresql import PostgreSQLSink


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--bootstrap-servers", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--group", required=True, help="consumer group")
    p.add_argument("--postgres-url", required=True)
    p.add_argument("--table", required=True, help="in schema public")
    p.add_argument("--columns", required=True, help="the payload's fields (unused: as is)")
    p.add_argument("--state-dir", required=True)
    a = p.parse_args()

    app = Application(
        broker_address=a.bootstrap_servers,
        consumer_group=a.group,
        auto_offset_reset="earliest",
        state_dir=a.state_dir,
        loglevel="WARNING",
    )
    sdf = app.dataframe(app.topic(a.topic, key_deserializer="str", value_deserializer="json"))
    url = urlsplit(a.postgres_url)
    sdf.sink(
        PostgreSQLSink(
            host=url.hostname or "127.0.0.1",
            port=url.port or 5432,
            dbname=url.path.lstrip("/") or "postgres",
            user=url.username or "postgres",
            password=url.password or "",
            table_name=a.table,
            schema_name="public",
            schema_auto_update=False,  # the harness created the table
            include_metadata=False,  # no __key / timestamp columns
        )
    )
    app.run()


if __name__ == "__main__":
    main()
