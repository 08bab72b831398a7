"""``flow init``: a starter pipeline file for a chosen source and target.

The file it writes passes ``flow validate`` as written (a test checks every
pair); connection strings point at the usual local ports and say which
``${VAR}`` to set instead.
"""

from __future__ import annotations

from pathlib import Path

from sluice.errors import SluiceError

_SOURCES = {
    "files": """\
source_query = "events"        # the sub-folder (prefix) to watch under path

[source]
kind = "object_store_local"
path = "data"                  # relative to this file's folder
format = "json_lines"          # parquet, csv, json_lines, orc
""",
    "kafka": """\
source_query = "events"        # the topic

[source]
kind = "kafka"
bootstrap_servers = "${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:9092}"
""",
    "rabbitmq": """\
source_query = "events"        # the queue

[source]
kind = "rabbitmq"
amqp_url = "${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}"
""",
    "pubsub": """\
source_query = "events-sub"    # the subscription

[source]
kind = "pubsub"
project_id = "${PUBSUB_PROJECT:-my-project}"
""",
}

_TARGETS = {
    "duckdb": """\
[target]
kind = "duckdb"
path = "{name}.duckdb"         # relative to this file's folder
mode = "append"                # append, merge (upsert on primary_key), scd2, truncate

[target.table]
name = "events"
""",
    "sqlite": """\
[target]
kind = "sqlite"
path = "{name}.db"             # relative to this file's folder
mode = "append"

[target.table]
name = "events"
""",
    "postgres": """\
[target]
kind = "postgres"
url = "${{DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres}}"
mode = "append"

[target.table]
schema = "public"
name = "events"
""",
    "mysql": """\
[target]
kind = "mysql"
url = "${{MYSQL_URL:-mysql://root@127.0.0.1:3306/sluice}}"
mode = "append"

[target.table]
name = "events"
""",
    "files": """\
[target]
kind = "object_store_local"
path = "out"                   # relative to this file's folder
format = "parquet"
""",
}

SOURCES = tuple(_SOURCES)
TARGETS = tuple(_TARGETS)


def starter(source: str, target: str, name: str = "my-pipeline") -> str:
    """The text of a starter pipeline reading ``source`` into ``target``."""
    slug = name.replace("-", "_")
    return (
        f"# A starter pipeline: {source} -> {target}. Check it, then run it:\n"
        "#   flow validate pipeline.toml && flow doctor pipeline.toml\n"
        "#   flow consume pipeline.toml\n"
        "# Every key: docs/pipeline-toml.md (or `flow schema`).\n"
        f'pipeline_name = "{name}"\n'
        + _SOURCES[source]
        + "\n"
        + _TARGETS[target].format(name=slug)
        + "\n"
        "# Optional: SQL over each batch (the input is the table `source`).\n"
        "# [transform]\n"
        '# sql = "SELECT * FROM source"\n'
    )


def write_starter(source: str, target: str, output: str, *, force: bool = False) -> Path:
    """Write :func:`starter` to ``output``; refuses to overwrite unless ``force``."""
    path = Path(output)
    if path.exists() and not force:
        raise SluiceError(f"{path} exists; pass --force to overwrite it")
    stem = path.stem if path.stem not in ("", "pipeline") else "my-pipeline"
    try:
        path.write_text(starter(source, target, stem), encoding="utf-8")
    except OSError as exc:
        raise SluiceError(f"cannot write {path}: {exc.strerror}") from None
    return path
