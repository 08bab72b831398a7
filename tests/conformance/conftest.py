"""Harnesses of every connector against its real service, for the conformance suites.

Each harness tells the suites of :mod:`sluice.testing` how to make a fresh
topic / table / folder, feed the real system, read back what landed through
a connection of its own, and (server databases) drop the connector's
connection. Nothing is faked and nothing is skipped: a service that is down
fails the tests.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import duckdb
import msgspec
import psycopg
import pyarrow as pa
import pymysql
import pytest
from _pytest.mark.structures import ParameterSet
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from sluice.testing import CdcTargetHarness, Check, SourceHarness, TargetHarness, unique
from sluice.testing.harness import Row
from tests import amqp, endpoints

H = TypeVar("H")


def cases(checks: Iterable[Check[H]]) -> list[ParameterSet]:
    """One pytest param per check, named after it."""
    return [pytest.param(check, id=check.name) for check in checks]


def _table(cursor_rows: list[tuple[Any, ...]], names: list[str]) -> pa.Table:
    """Rows fetched by a DB-API cursor as a table (its columns even when empty)."""
    return pa.table({n: pa.array([r[i] for r in cursor_rows]) for i, n in enumerate(names)})


# -- sources ---------------------------------------------------------------------


class KafkaHarness(SourceHarness):
    """Kafka (tansu): a fresh two-partition topic per check, JSON messages."""

    name = "kafka"
    encode = msgspec.json.Encoder().encode

    def __init__(self) -> None:
        conf = {"bootstrap.servers": endpoints.KAFKA_BOOTSTRAP}
        self.admin = AdminClient(conf)
        self.producer = Producer({**conf, "linger.ms": 5})

    def new_stream(self) -> str:
        topic = unique("conf")
        self.admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(timeout=30)
        return topic

    def source(self, stream: str) -> dict[str, Any]:
        # A short session: a closed consumer's partitions move at once anyway.
        return {
            "kind": "kafka",
            "bootstrap_servers": endpoints.KAFKA_BOOTSTRAP,
            "session_timeout_ms": 2000,
        }

    def _send(self, topic: str, payloads: list[tuple[int, bytes]]) -> list[int]:
        """Produce (partition, payload) pairs with distinct timestamps; the
        broker's timestamps (ms) in order."""
        stamps: list[int | None] = [None] * len(payloads)
        base_ms = int(time.time() * 1000) - 60_000

        def report(i: int) -> Callable[[Any, Any], None]:
            def cb(err: Any, msg: Any) -> None:
                assert err is None, err
                stamps[i] = msg.timestamp()[1]

            return cb

        for i, (partition, payload) in enumerate(payloads):
            self.producer.produce(
                topic, payload, partition=partition, timestamp=base_ms + i, on_delivery=report(i)
            )
        assert self.producer.flush(30) == 0
        assert all(s is not None for s in stamps)
        return [int(s) for s in stamps if s is not None]

    def produce(self, stream: str, rows: Sequence[Row]) -> list[int]:
        payloads = [(int(r["id"]) % 2, self.encode(dict(r))) for r in rows]
        return [ms * 1000 for ms in self._send(stream, payloads)]

    def produce_bad(self, stream: str) -> bytes:
        raw = b'{"id": 1, "name": '
        self._send(stream, [(0, raw)])
        return raw


class FilesHarness(SourceHarness):
    """Local files (``object_store_local``): a fresh prefix per check, one JSON-lines file per produce."""

    name = "object_store_local"
    encode = msgspec.json.Encoder().encode

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files = 0
        self._mtime_s = 1_700_000_000  # whole seconds: exact in st_mtime's float

    def new_stream(self) -> str:
        stream = unique("conf")
        (self.root / stream).mkdir(parents=True)  # a missing folder is an error
        return stream

    def source(self, stream: str) -> dict[str, Any]:
        return {"kind": "object_store_local", "path": str(self.root), "format": "json_lines"}

    def _write(self, stream: str, text: bytes) -> int:
        """Write one file, atomically (a dot-file renamed), and stamp its mtime."""
        folder = self.root / stream
        folder.mkdir(parents=True, exist_ok=True)
        self._files += 1
        self._mtime_s += 1
        tmp = folder / f".{self._files:05d}.jsonl"
        tmp.write_bytes(text)
        os.utime(tmp, ns=(self._mtime_s * 10**9, self._mtime_s * 10**9))
        tmp.rename(folder / f"{self._files:05d}.jsonl")
        return self._mtime_s

    def produce(self, stream: str, rows: Sequence[Row]) -> list[int]:
        mtime_s = self._write(stream, b"".join(self.encode(dict(r)) + b"\n" for r in rows))
        return [mtime_s * 1_000_000] * len(rows)

    def produce_bad(self, stream: str) -> bytes:
        raw = b'{"id": 1, "name": '
        self._write(stream, raw + b"\n")
        return raw  # the record is the line, without its line break


class S3FilesHarness(SourceHarness):
    """S3 (moto) objects (``object_store_s3``): one bucket per session, a fresh
    prefix per check, one JSON-lines object per produce."""

    name = "object_store_s3"
    encode = msgspec.json.Encoder().encode

    def __init__(self) -> None:
        import boto3

        self.client = boto3.client(
            "s3",
            endpoint_url=endpoints.AWS_ENDPOINT,
            aws_access_key_id=endpoints.AWS_ACCESS_KEY_ID,
            aws_secret_access_key=endpoints.AWS_SECRET_ACCESS_KEY,
            region_name=endpoints.AWS_REGION,
        )
        self.bucket = unique("conf").replace("_", "-")
        self.client.create_bucket(Bucket=self.bucket)
        self._objects = 0

    def new_stream(self) -> str:
        return unique("conf") + "/"

    def source(self, stream: str) -> dict[str, Any]:
        return {
            "kind": "object_store_s3",
            "bucket": self.bucket,
            "endpoint": endpoints.AWS_ENDPOINT,
            "region": endpoints.AWS_REGION,
            "access_key_id": endpoints.AWS_ACCESS_KEY_ID,
            "secret_access_key": endpoints.AWS_SECRET_ACCESS_KEY,
            "format": "json_lines",
        }

    def _put(self, stream: str, body: bytes) -> int:
        """Put one object; its LastModified as listed, in µs."""
        self._objects += 1
        key = f"{stream}{self._objects:05d}.jsonl"
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body)
        (obj,) = self.client.list_objects_v2(Bucket=self.bucket, Prefix=key)["Contents"]
        return int(obj["LastModified"].timestamp() * 1_000_000)

    def produce(self, stream: str, rows: Sequence[Row]) -> list[int]:
        mtime_us = self._put(stream, b"".join(self.encode(dict(r)) + b"\n" for r in rows))
        return [mtime_us] * len(rows)

    def produce_bad(self, stream: str) -> bytes:
        raw = b'{"id": 1, "name": '
        self._put(stream, raw + b"\n")
        return raw


class RabbitMQHarness(SourceHarness):
    """RabbitMQ: a fresh durable queue per check (a stream queue with
    ``stream``), JSON messages with the AMQP ``timestamp`` property."""

    encode = msgspec.json.Encoder().encode

    def __init__(self, *, stream: bool = False) -> None:
        self.args: dict[str, Any] = {"x-queue-type": "stream"} if stream else {}
        self.name = "rabbitmq_stream" if stream else "rabbitmq"
        self.queues: list[str] = []
        self._stamp_s = int(time.time()) - 3600

    def new_stream(self) -> str:
        queue = unique("conf")
        amqp.declare(queue, self.args or None)
        self.queues.append(queue)
        return queue

    def source(self, stream: str) -> dict[str, Any]:
        spec: dict[str, Any] = {"kind": "rabbitmq", "amqp_url": endpoints.RABBITMQ_URL}
        if self.args:
            spec["queue_args"] = dict(self.args)
        return spec

    def produce(self, stream: str, rows: Sequence[Row]) -> list[int]:
        # AMQP timestamps are whole seconds: one second apart per row.
        stamps = [self._stamp_s + i for i in range(len(rows))]
        self._stamp_s += len(rows)
        amqp.publish(stream, [self.encode(dict(r)) for r in rows], stamps)
        return [s * 1_000_000 for s in stamps]

    def produce_bad(self, stream: str) -> bytes:
        raw = b'{"id": 1, "name": '
        amqp.publish(stream, [raw])
        return raw

    def cleanup(self) -> None:
        for queue in self.queues:
            amqp.delete(queue)


class DeltaSourceHarness(SourceHarness):
    """A Delta table per check (created empty), one append (version) per produce;
    local or on S3 (moto)."""

    encode = msgspec.json.Encoder().encode
    SCHEMA = pa.schema([pa.field("id", pa.int64()), pa.field("name", pa.string())])

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.name = "delta_local" if root is not None else "delta_s3"
        self.bucket = "" if root is not None else _bucket()

    def _uri(self, stream: str) -> str:
        return str(self.root / stream) if self.root is not None else f"s3://{self.bucket}/{stream}"

    def _options(self) -> dict[str, str] | None:
        return None if self.root is not None else S3_DELTA_OPTIONS

    def new_stream(self) -> str:
        stream = unique("conf")
        DeltaTable.create(self._uri(stream), self.SCHEMA, storage_options=self._options())
        return stream

    def source(self, stream: str) -> dict[str, Any]:
        if self.root is not None:
            return {"kind": "delta_local", "path": str(self.root)}
        return {"kind": "delta_s3", "bucket": self.bucket, **S3_KEYS}

    def produce(self, stream: str, rows: Sequence[Row]) -> list[int]:
        from deltalake import write_deltalake

        uri, options = self._uri(stream), self._options()
        write_deltalake(
            uri,
            pa.Table.from_pylist([dict(r) for r in rows], self.SCHEMA),
            mode="append",
            storage_options=options,
        )
        ms = int(DeltaTable(uri, storage_options=options).history(1)[0]["timestamp"])
        return [ms * 1000] * len(rows)

    def produce_bad(self, stream: str) -> bytes:  # pragma: no cover - not run for Delta
        raise NotImplementedError("a Delta table holds no undecodable records")


@pytest.fixture
def delta_local_source_harness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> DeltaSourceHarness:
    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path / "state"))
    return DeltaSourceHarness(tmp_path / "lake")


@pytest.fixture
def delta_s3_source_harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DeltaSourceHarness:
    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path / "state"))
    return DeltaSourceHarness(None)


@pytest.fixture(scope="session")
def s3_files_harness() -> S3FilesHarness:
    return S3FilesHarness()


@pytest.fixture(scope="session")
def kafka_harness() -> KafkaHarness:
    return KafkaHarness()


@pytest.fixture(scope="session")
def rabbitmq_harness() -> Iterator[RabbitMQHarness]:
    h = RabbitMQHarness()
    yield h
    h.cleanup()


@pytest.fixture
def rabbitmq_stream_harness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RabbitMQHarness]:
    # A stream source keeps its committed offset under $SLUICE_STATE_DIR.
    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path / "state"))
    h = RabbitMQHarness(stream=True)
    yield h
    h.cleanup()


@pytest.fixture
def files_harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FilesHarness:
    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path / "state"))
    return FilesHarness(tmp_path / "files")


# -- targets ---------------------------------------------------------------------


def _table_spec(table: str, key: Sequence[str]) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": table}
    if key:
        spec["primary_key"] = list(key)
    return spec


class PostgresHarness(CdcTargetHarness):
    """Postgres: each table's target connects with ``application_name`` = the
    table, so a drop terminates exactly its backends."""

    name = "postgres"

    def __init__(self) -> None:
        self.tables: list[str] = []

    def new_table(self) -> str:
        self.tables.append(unique("conf"))
        return self.tables[-1]

    def target(
        self, table: str, *, mode: str = "append", key: Sequence[str] = ()
    ) -> dict[str, Any]:
        return {
            "kind": "postgres",
            "url": f"{endpoints.POSTGRES_URL}?application_name={table}",
            "mode": mode,
            "table": _table_spec(table, key),
        }

    def _sql(self, statement: str, params: tuple[Any, ...] = ()) -> tuple[list[Any], list[str]]:
        with psycopg.connect(endpoints.POSTGRES_URL, autocommit=True) as conn:
            cur = conn.execute(statement.encode(), params)
            if cur.description is None:
                return [], []
            return list(cur.fetchall()), [d.name for d in cur.description]

    def read_back(self, table: str) -> pa.Table | None:
        (exists,), _ = self._sql("SELECT to_regclass(%s) IS NOT NULL", (f'public."{table}"',))
        if not exists[0]:
            return None
        rows, names = self._sql(f'SELECT * FROM public."{table}"')
        return _table(rows, names) if names else None

    def drop_connection(self, table: str) -> int:
        rows, _ = self._sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (table,),
        )
        return sum(1 for (ok,) in rows if ok)

    def cleanup(self) -> None:
        for table in self.tables:
            self._sql(f'DROP TABLE IF EXISTS public."{table}"')
        if self._sql("SELECT to_regclass('public._sluice_cdc_gate') IS NOT NULL")[0][0][0]:
            self._sql(
                "DELETE FROM _sluice_cdc_gate WHERE tbl = ANY(%s)",
                ([f"public.{t}" for t in self.tables],),
            )


class MySQLHarness(CdcTargetHarness):
    """MariaDB: the targets connect as a user of their own, so a drop kills
    exactly their connections."""

    name = "mysql"

    def __init__(self) -> None:
        url = urlsplit(endpoints.MYSQL_URL)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 3306
        self.database = url.path.lstrip("/")
        self.user = unique("conf")
        self.tables: list[str] = []
        self._sql(f"CREATE USER '{self.user}'@'%'")
        self._sql(f"GRANT ALL ON `{self.database}`.* TO '{self.user}'@'%'")

    def _sql(self, statement: str, params: tuple[Any, ...] = ()) -> tuple[list[Any], list[str]]:
        conn = pymysql.connect(
            host=self.host,
            port=self.port,
            user=urlsplit(endpoints.MYSQL_URL).username or "root",
            database=self.database,
            autocommit=True,
            charset="utf8mb4",
        )
        try:
            with conn.cursor() as cur:
                cur.execute(statement, params or None)
                names = [d[0] for d in cur.description or ()]
                return list(cur.fetchall()), names
        finally:
            conn.close()

    def new_table(self) -> str:
        self.tables.append(unique("conf"))
        return self.tables[-1]

    def target(
        self, table: str, *, mode: str = "append", key: Sequence[str] = ()
    ) -> dict[str, Any]:
        return {
            "kind": "mysql",
            "url": f"mysql://{self.user}@{self.host}:{self.port}/{self.database}",
            "mode": mode,
            "table": _table_spec(table, key),
        }

    def read_back(self, table: str) -> pa.Table | None:
        rows, _ = self._sql(
            "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            (self.database, table),
        )
        if not rows:
            return None
        rows, names = self._sql(f"SELECT * FROM `{table}`")
        return _table(rows, names)

    def drop_connection(self, table: str) -> int:
        ids, _ = self._sql(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s", (self.user,)
        )
        for (ident,) in ids:
            self._sql(f"KILL CONNECTION {int(ident)}")
        return len(ids)

    def cleanup(self) -> None:
        for table in self.tables:
            self._sql(f"DROP TABLE IF EXISTS `{table}`")
        gate, _ = self._sql(
            "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            (self.database, "_sluice_cdc_gate"),
        )
        for table in self.tables if gate else ():
            self._sql("DELETE FROM _sluice_cdc_gate WHERE tbl = %s", (f"{self.database}.{table}",))
        self._sql(f"DROP USER IF EXISTS '{self.user}'@'%'")


class SQLiteHarness(CdcTargetHarness):
    """SQLite: one database file per check; embedded, no connection to drop."""

    name = "sqlite"
    has_connection = False

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, table: str) -> Path:
        return self.root / f"{table}.sqlite"

    def target(
        self, table: str, *, mode: str = "append", key: Sequence[str] = ()
    ) -> dict[str, Any]:
        return {
            "kind": "sqlite",
            "path": str(self._path(table)),
            "mode": mode,
            "table": _table_spec(table, key),
        }

    def read_back(self, table: str) -> pa.Table | None:
        if not self._path(table).exists():
            return None
        with sqlite3.connect(self._path(table)) as conn:
            if not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchall():
                return None
            cur = conn.execute(f'SELECT * FROM "{table}"')
            return _table(cur.fetchall(), [d[0] for d in cur.description])


class DuckDBHarness(CdcTargetHarness):
    """DuckDB: one database file per check; embedded, no connection to drop."""

    name = "duckdb"
    has_connection = False

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, table: str) -> Path:
        return self.root / f"{table}.duckdb"

    def target(
        self, table: str, *, mode: str = "append", key: Sequence[str] = ()
    ) -> dict[str, Any]:
        return {
            "kind": "duckdb",
            "path": str(self._path(table)),
            "mode": mode,
            "table": _table_spec(table, key),
        }

    def read_back(self, table: str) -> pa.Table | None:
        if not self._path(table).exists():
            return None
        # Same process as the target: DuckDB shares the open database and
        # shows this connection only what was committed.
        conn = duckdb.connect(str(self._path(table)))
        try:
            found = conn.execute(
                "SELECT 1 FROM information_schema.tables WHERE table_name = ?", [table]
            ).fetchall()
            if not found:
                return None
            result: pa.Table = conn.sql(f'SELECT * FROM "{table}"').to_arrow_table()
            return result
        finally:
            conn.close()


class DeltaLocalHarness(CdcTargetHarness):
    """Delta on the local file system: one table folder per check; no connection."""

    name = "delta_local"
    has_connection = False

    def __init__(self, root: Path) -> None:
        self.root = root

    def target(
        self, table: str, *, mode: str = "append", key: Sequence[str] = ()
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {"kind": "delta_local", "path": str(self.root / table), "mode": mode}
        if key:
            spec["table"] = {"primary_key": list(key)}
        return spec

    def read_back(self, table: str) -> pa.Table | None:
        try:
            delta = DeltaTable(str(self.root / table))
        except TableNotFoundError:
            return None
        # DeltaTable.scan, not to_pyarrow_dataset: a pyarrow dataset over
        # deltalake makes the process abort at exit.
        return pa.table(delta.scan())


class RabbitMQTargetHarness(TargetHarness):
    """RabbitMQ: a fresh queue per check; messages read back (and left in the
    queue) as rows; a drop closes the target's connection through the
    management API (its connection name holds the queue)."""

    name = "rabbitmq"

    def __init__(self) -> None:
        self.queues: list[str] = []

    def new_table(self) -> str:
        self.queues.append(unique("conf"))
        return self.queues[-1]

    def target(
        self, table: str, *, mode: str = "append", key: Sequence[str] = ()
    ) -> dict[str, Any]:
        assert mode == "append" and not key, "a queue has no key to merge on"
        return {"kind": "rabbitmq", "amqp_url": endpoints.RABBITMQ_URL, "queue": table}

    def read_back(self, table: str) -> pa.Table | None:
        bodies = amqp.peek(table)
        if not bodies:
            return None
        rows = [msgspec.json.decode(b) for b in bodies]
        names = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist reads row 0's only
        return pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows])

    def drop_connection(self, table: str) -> int:
        return amqp.close_connections(f"-> {table} ")

    def cleanup(self) -> None:
        for queue in self.queues:
            amqp.delete(queue)


@pytest.fixture(scope="session")
def rabbitmq_target_harness() -> Iterator[RabbitMQTargetHarness]:
    h = RabbitMQTargetHarness()
    yield h
    h.cleanup()


S3_DELTA_OPTIONS = {
    "AWS_ENDPOINT_URL": endpoints.AWS_ENDPOINT,
    "AWS_ACCESS_KEY_ID": endpoints.AWS_ACCESS_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": endpoints.AWS_SECRET_ACCESS_KEY,
    "AWS_REGION": endpoints.AWS_REGION,
    "AWS_ALLOW_HTTP": "true",
}
S3_KEYS = {
    "endpoint": endpoints.AWS_ENDPOINT,
    "region": endpoints.AWS_REGION,
    "access_key_id": endpoints.AWS_ACCESS_KEY_ID,
    "secret_access_key": endpoints.AWS_SECRET_ACCESS_KEY,
}


def _bucket() -> str:
    import boto3

    name = unique("conf").replace("_", "-")
    boto3.client(
        "s3",
        endpoint_url=endpoints.AWS_ENDPOINT,
        aws_access_key_id=endpoints.AWS_ACCESS_KEY_ID,
        aws_secret_access_key=endpoints.AWS_SECRET_ACCESS_KEY,
        region_name=endpoints.AWS_REGION,
    ).create_bucket(Bucket=name)
    return name


class DeltaS3Harness(CdcTargetHarness):
    """Delta on S3 (moto): one bucket per session, one table prefix per check."""

    name = "delta_s3"
    has_connection = False  # no connection held between requests

    def __init__(self) -> None:
        self.bucket = _bucket()

    def target(
        self, table: str, *, mode: str = "append", key: Sequence[str] = ()
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "kind": "delta_s3",
            "bucket": self.bucket,
            "prefix": table,
            "mode": mode,
            **S3_KEYS,
        }
        if key:
            spec["table"] = {"primary_key": list(key)}
        return spec

    def read_back(self, table: str) -> pa.Table | None:
        try:
            delta = DeltaTable(f"s3://{self.bucket}/{table}", storage_options=S3_DELTA_OPTIONS)
        except TableNotFoundError:
            return None
        return pa.table(delta.scan())


class ObjectStoreHarness(TargetHarness):
    """Files under a prefix (local folder or S3 bucket): one prefix per check.
    Reads back the files the newest manifest lists (the committed ones)."""

    has_connection = False

    #: The CSV dialect of :func:`object_store_local_csv_dialect_harness`.
    DIALECT: ClassVar[dict[str, str]] = {
        "csv_delimiter": ";",
        "csv_quote": "'",
        "csv_escape": "\\",
        "csv_null_value": "NULL",
    }

    def __init__(
        self, kind: str, fmt: str, root: Path | None = None, *, dialect: bool = False
    ) -> None:
        self.name = f"{kind}:{fmt}" + (":dialect" if dialect else "")
        self.kind = kind
        self.format = fmt
        self.root = root
        self.dialect = dialect
        if kind == "object_store_s3":
            import pyarrow.fs as pafs

            self.bucket = _bucket()
            self.fs: Any = pafs.S3FileSystem(
                endpoint_override=endpoints.AWS_ENDPOINT,
                access_key=endpoints.AWS_ACCESS_KEY_ID,
                secret_key=endpoints.AWS_SECRET_ACCESS_KEY,
                region=endpoints.AWS_REGION,
            )
            self.base = self.bucket
        else:
            import pyarrow.fs as pafs

            assert root is not None
            self.fs = pafs.LocalFileSystem()
            self.base = root.as_posix()

    def target(
        self, table: str, *, mode: str = "append", key: Sequence[str] = ()
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {"kind": self.kind, "format": self.format, "prefix": table}
        if self.dialect:
            spec.update(self.DIALECT)
        if self.kind == "object_store_s3":
            spec.update(bucket=self.bucket, **S3_KEYS)
        else:
            spec["path"] = self.base
        return spec

    def read_back(self, table: str) -> pa.Table | None:
        import pyarrow.csv as pacsv
        import pyarrow.fs as pafs
        import pyarrow.json as pajson
        import pyarrow.parquet as pq

        folder = f"{self.base}/{table}/_sluice"
        infos = self.fs.get_file_info(
            pafs.FileSelector(folder, recursive=True, allow_not_found=True)
        )
        manifests = sorted(i.path for i in infos if i.path.endswith(".json"))
        if not manifests:
            return None
        with self.fs.open_input_stream(manifests[-1]) as f:
            newest = json.loads(f.read())
        files = []
        for m in manifests:  # every committed flush (older manifests may be gone)
            with self.fs.open_input_stream(m) as f:
                files.extend(json.loads(f.read())["files"])
        committed = {p for p in files}
        listed = self.fs.get_file_info(
            pafs.FileSelector(f"{self.base}/{table}", recursive=True, allow_not_found=True)
        )
        seq = int(newest["seq"])
        parts = []
        for info in listed:
            name = info.path.rsplit("/", 1)[-1]
            if not name.startswith("part-"):
                continue
            # files of committed flushes only: seq at most the newest manifest's
            if int(name.split("-")[2]) > seq and info.path not in committed:
                continue
            with self.fs.open_input_file(info.path) as f:
                if self.format == "parquet":
                    parts.append(pq.read_table(f))
                elif self.format == "csv" and self.dialect:
                    parse = pacsv.ParseOptions(
                        delimiter=";", quote_char="'", escape_char="\\", double_quote=False
                    )
                    convert = pacsv.ConvertOptions(
                        null_values=["NULL"],
                        strings_can_be_null=True,
                        quoted_strings_can_be_null=False,
                    )
                    parts.append(pacsv.read_csv(f, parse_options=parse, convert_options=convert))
                elif self.format == "csv":
                    parts.append(pacsv.read_csv(f))
                else:
                    parts.append(pajson.read_json(f))
        if not parts:
            return pa.table({})
        return pa.concat_tables(parts, promote_options="permissive")


@pytest.fixture(scope="session")
def delta_s3_harness() -> DeltaS3Harness:
    return DeltaS3Harness()


@pytest.fixture
def object_store_local_harness(tmp_path: Path) -> ObjectStoreHarness:
    return ObjectStoreHarness("object_store_local", "parquet", tmp_path)


@pytest.fixture
def object_store_local_csv_harness(tmp_path: Path) -> ObjectStoreHarness:
    return ObjectStoreHarness("object_store_local", "csv", tmp_path)


@pytest.fixture
def object_store_local_csv_dialect_harness(tmp_path: Path) -> ObjectStoreHarness:
    return ObjectStoreHarness("object_store_local", "csv", tmp_path, dialect=True)


@pytest.fixture(scope="session")
def object_store_s3_harness() -> ObjectStoreHarness:
    return ObjectStoreHarness("object_store_s3", "json_lines")


@pytest.fixture(scope="session")
def postgres_harness() -> Iterator[PostgresHarness]:
    h = PostgresHarness()
    yield h
    h.cleanup()


@pytest.fixture(scope="session")
def mysql_harness() -> Iterator[MySQLHarness]:
    h = MySQLHarness()
    yield h
    h.cleanup()


@pytest.fixture
def sqlite_harness(tmp_path: Path) -> SQLiteHarness:
    return SQLiteHarness(tmp_path)


@pytest.fixture
def duckdb_harness(tmp_path: Path) -> DuckDBHarness:
    return DuckDBHarness(tmp_path)


@pytest.fixture
def delta_local_harness(tmp_path: Path) -> DeltaLocalHarness:
    return DeltaLocalHarness(tmp_path)
