"""The run log: run history, per-job attempt state, and claims.

Three tables (created on first use unless ``?create_tables=false``):

- ``run_log`` (Postgres: in schema ``sluice_jobs``; elsewhere prefixed
  ``sluice_jobs_``): one row per finished (or skipped) job run;
- ``attempt_state``: one JSON document per job / workflow with a version,
  updated by compare-and-set (:meth:`RunLog.put_state`): the retry count,
  next retry time, last tick fired, last success, the watermark;
- ``claims``: one row per firing key (``job@tick#attempt``); inserting it is
  the compare-and-set that lets several ``flow run-due`` processes share one
  log and fire each job once per tick (:meth:`RunLog.claim`).

URL forms (``--run-log``): ``sqlite:///abs/path.db``, ``sqlite://rel.db`` or
a bare path; ``memory://``; ``postgres://`` / ``postgresql://`` (tables in
schema ``sluice_jobs``); ``mysql://`` / ``mariadb://``; ``duckdb:///path``;
``s3://bucket/prefix`` (one object per record; ``?endpoint_url=`` for
moto / MinIO). :func:`open_run_log` never raises for an unreachable or
unwritable log: it warns and keeps the state in memory so orchestration
goes on.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sluice.errors import ConfigError, ConfigProblem

log = logging.getLogger("sluice.jobs")

DEFAULT_URL = "sqlite://~/.sluice/run_log.db"


class RunLog(Protocol):
    """What the orchestrator needs from a run log backend."""

    url: str

    def get_state(self, name: str) -> tuple[dict[str, Any], int] | None:
        """The state document of ``name`` and its version, or None."""

    def put_state(self, name: str, data: dict[str, Any], version: int | None) -> bool:
        """Write ``data`` if the stored version is still ``version`` (None: absent)."""

    def claim(self, key: str, owner: str) -> bool:
        """True for exactly one caller per ``key``, across processes sharing the log."""

    def append_run(self, record: dict[str, Any]) -> None:
        """Record one run (keys: run_id, job, workflow, tick, attempt, status,
        started_at, finished_at, rows, error, metrics)."""

    def runs(self, job: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The latest runs, newest first."""

    def states(self) -> dict[str, dict[str, Any]]:
        """Every state document."""

    def close(self) -> None: ...


RUN_COLUMNS = (
    "run_id",
    "job",
    "workflow",
    "tick",
    "attempt",
    "status",
    "started_at",
    "finished_at",
    "rows",
    "error",
    "metrics",
)


#: The run_log table's columns (``rows`` is reserved in MySQL: ``row_count``).
_SQL_COLUMNS = ", ".join("row_count" if c == "rows" else c for c in RUN_COLUMNS)


def now_iso(t: dt.datetime | None = None) -> str:
    return (t or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat()


class MemoryRunLog:
    """Everything in this process (``memory://``, and the fallback)."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.Lock()
        self._state: dict[str, tuple[dict[str, Any], int]] = {}
        self._claims: set[str] = set()
        self._runs: list[dict[str, Any]] = []

    def get_state(self, name: str) -> tuple[dict[str, Any], int] | None:
        with self._lock:
            got = self._state.get(name)
            return (json.loads(json.dumps(got[0])), got[1]) if got else None

    def put_state(self, name: str, data: dict[str, Any], version: int | None) -> bool:
        with self._lock:
            cur = self._state.get(name)
            if (cur[1] if cur else None) != version:
                return False
            self._state[name] = (json.loads(json.dumps(data)), (version or 0) + 1)
            return True

    def claim(self, key: str, owner: str) -> bool:
        with self._lock:
            if key in self._claims:
                return False
            self._claims.add(key)
            return True

    def append_run(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._runs.append(dict(record))

    def runs(self, job: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            out = [r for r in reversed(self._runs) if job is None or r["job"] == job]
            return [dict(r) for r in out[:limit]]

    def states(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: json.loads(json.dumps(v[0])) for k, v in self._state.items()}

    def close(self) -> None:
        pass


class SqlRunLog:
    """The run log in a SQL database (SQLite, Postgres, MySQL/MariaDB, DuckDB).

    Every statement commits on its own (autocommit): a claim or a state
    update is visible to the other processes as soon as it returns.
    """

    def __init__(self, url: str, dialect: str, connect: Callable[[], Any], create: bool) -> None:
        self.url = url
        self.dialect = dialect
        self._conn = connect()
        self._lock = threading.Lock()
        self._ph = {"postgres": "%s", "mysql": "%s"}.get(dialect, "?")
        prefix = {"postgres": "sluice_jobs.", "mysql": "sluice_jobs_"}.get(dialect, "sluice_jobs_")
        self._t = {n: f"{prefix}{n}" for n in ("run_log", "attempt_state", "claims")}
        if create:
            self._create()

    def _create(self) -> None:
        text = "VARCHAR(512)" if self.dialect == "mysql" else "TEXT"
        big = "LONGTEXT" if self.dialect == "mysql" else "TEXT"
        stmts = []
        if self.dialect == "postgres":
            stmts.append("CREATE SCHEMA IF NOT EXISTS sluice_jobs")
        stmts += [
            f"CREATE TABLE IF NOT EXISTS {self._t['run_log']} (run_id {text} PRIMARY KEY, "
            f"job {text} NOT NULL, workflow {text}, tick {text}, attempt INTEGER, "
            f"status {text} NOT NULL, started_at {text}, finished_at {text}, "
            f"row_count BIGINT, error {big}, metrics {big})",
            f"CREATE TABLE IF NOT EXISTS {self._t['attempt_state']} (name {text} PRIMARY KEY, "
            f"data {big} NOT NULL, version BIGINT NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {self._t['claims']} (claim_key {text} PRIMARY KEY, "
            f"owner {text}, claimed_at {text})",
        ]
        for s in stmts:
            self._exec(s)

    def _exec(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[int, list[Any]]:
        sql = sql.replace("?", self._ph) if self._ph != "?" else sql
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute(sql, params)
                rows = list(cur.fetchall()) if cur.description else []
                count = cur.rowcount
            finally:
                cur.close()
            if self.dialect == "mysql":
                self._conn.commit()
            return (int(count if count is not None else -1), rows)

    def get_state(self, name: str) -> tuple[dict[str, Any], int] | None:
        _, rows = self._exec(
            f"SELECT data, version FROM {self._t['attempt_state']} WHERE name = ?", (name,)
        )
        return (json.loads(rows[0][0]), int(rows[0][1])) if rows else None

    def put_state(self, name: str, data: dict[str, Any], version: int | None) -> bool:
        text = json.dumps(data, sort_keys=True)
        t = self._t["attempt_state"]
        if version is None:
            return self._insert_once(t, "name", (name, text, 1), "(name, data, version)")
        if self.dialect == "duckdb":
            _, rows = self._exec(
                f"UPDATE {t} SET data = ?, version = version + 1 WHERE name = ? AND version = ? "
                "RETURNING name",
                (text, name, version),
            )
            return len(rows) == 1
        count, _ = self._exec(
            f"UPDATE {t} SET data = ?, version = version + 1 WHERE name = ? AND version = ?",
            (text, name, version),
        )
        return count == 1

    def _insert_once(self, table: str, key: str, values: tuple[Any, ...], cols: str) -> bool:
        marks = ", ".join("?" * len(values))
        if self.dialect == "mysql":
            count, _ = self._exec(f"INSERT IGNORE INTO {table} {cols} VALUES ({marks})", values)
            return count == 1
        _, rows = self._exec(
            f"INSERT INTO {table} {cols} VALUES ({marks}) ON CONFLICT ({key}) DO NOTHING "
            f"RETURNING {key}",
            values,
        )
        return len(rows) == 1

    def claim(self, key: str, owner: str) -> bool:
        return self._insert_once(
            self._t["claims"],
            "claim_key",
            (key, owner, now_iso()),
            "(claim_key, owner, claimed_at)",
        )

    def append_run(self, record: dict[str, Any]) -> None:
        values = tuple(
            json.dumps(record.get(c)) if c == "metrics" else record.get(c) for c in RUN_COLUMNS
        )
        marks = ", ".join("?" * len(RUN_COLUMNS))
        self._exec(
            f"INSERT INTO {self._t['run_log']} ({_SQL_COLUMNS}) VALUES ({marks})",
            values,
        )

    def runs(self, job: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        where = "WHERE job = ? " if job else ""
        params: tuple[Any, ...] = (job,) if job else ()
        _, rows = self._exec(
            f"SELECT {_SQL_COLUMNS} FROM {self._t['run_log']} {where}"
            f"ORDER BY finished_at DESC, started_at DESC LIMIT {int(limit)}",
            params,
        )
        out = []
        for r in rows:
            d = dict(zip(RUN_COLUMNS, r, strict=True))
            d["metrics"] = json.loads(d["metrics"]) if d.get("metrics") else None
            out.append(d)
        return out

    def states(self) -> dict[str, dict[str, Any]]:
        _, rows = self._exec(f"SELECT name, data FROM {self._t['attempt_state']}")
        return {r[0]: json.loads(r[1]) for r in rows}

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class S3RunLog:
    """The run log as objects under ``s3://bucket/prefix``.

    ``run_log/<job>/<finished>-<run_id>.json``, ``attempt_state/<name>.json``
    (compare-and-set through the object's ETag: ``If-Match``, or
    ``If-None-Match: *`` when absent) and ``claims/<key>`` (created with
    ``If-None-Match: *``, so one caller wins).
    """

    def __init__(self, url: str) -> None:
        import boto3

        u = urllib.parse.urlsplit(url)
        q = dict(urllib.parse.parse_qsl(u.query))
        self.url = url
        self.bucket = u.netloc
        self.prefix = u.path.strip("/")
        kw: dict[str, Any] = {}
        if "endpoint_url" in q:
            kw["endpoint_url"] = q["endpoint_url"]
        if "region" in q:
            kw["region_name"] = q["region"]
        self._s3 = boto3.client("s3", **kw)
        self._s3.head_bucket(Bucket=self.bucket)

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _put(self, key: str, body: str, **cond: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=body.encode(), **cond)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}:
                return False
            raise
        return True

    def get_state(self, name: str) -> tuple[dict[str, Any], int] | None:
        got = self._get(self._key("attempt_state", f"{_safe(name)}.json"))
        if got is None:
            return None
        body, _etag = got
        doc = json.loads(body)
        return doc["data"], int(doc["version"])

    def _get(self, key: str) -> tuple[str, str] | None:
        from botocore.exceptions import ClientError

        try:
            obj = self._s3.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                return None
            raise
        return obj["Body"].read().decode(), str(obj["ETag"])

    def put_state(self, name: str, data: dict[str, Any], version: int | None) -> bool:
        key = self._key("attempt_state", f"{_safe(name)}.json")
        body = json.dumps({"data": data, "version": (version or 0) + 1}, sort_keys=True)
        if version is None:
            return self._put(key, body, IfNoneMatch="*")
        got = self._get(key)
        if got is None or int(json.loads(got[0])["version"]) != version:
            return False
        return self._put(key, body, IfMatch=got[1])

    def claim(self, key: str, owner: str) -> bool:
        return self._put(self._key("claims", _safe(key)), owner, IfNoneMatch="*")

    def append_run(self, record: dict[str, Any]) -> None:
        key = self._key(
            "run_log", _safe(record["job"]), f"{record['finished_at']}-{record['run_id']}.json"
        )
        self._put(key, json.dumps(record, sort_keys=True))

    def _list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        pager = self._s3.get_paginator("list_objects_v2")
        for page in pager.paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return keys

    def runs(self, job: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        base = self._key("run_log", _safe(job)) + "/" if job else self._key("run_log") + "/"
        keys = sorted(self._list(base), key=lambda k: k.rsplit("/", 1)[-1], reverse=True)
        out = []
        for k in keys[:limit]:
            got = self._get(k)
            if got:
                out.append(json.loads(got[0]))
        return out

    def states(self) -> dict[str, dict[str, Any]]:
        out = {}
        for k in self._list(self._key("attempt_state") + "/"):
            got = self._get(k)
            if got:
                out[urllib.parse.unquote(k.rsplit("/", 1)[-1][: -len(".json")])] = json.loads(
                    got[0]
                )["data"]
        return out

    def close(self) -> None:
        pass


def _safe(name: str) -> str:
    return urllib.parse.quote(name, safe="")


class GuardedRunLog:
    """A run log that never stops orchestration: the first failure warns once,
    and the rest of this process keeps its state in memory."""

    def __init__(self, inner: RunLog) -> None:
        self.inner: RunLog = inner
        self.url = inner.url
        self.degraded = False

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self.inner, name)(*args)
        except Exception as exc:
            if self.degraded:
                raise
            log.warning(
                "run log %s failed (%s: %s); going on without a durable run log",
                _redact(self.url),
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            self.degraded = True
            self.inner = MemoryRunLog(self.url)
            return getattr(self.inner, name)(*args)

    def get_state(self, name: str) -> tuple[dict[str, Any], int] | None:
        got: tuple[dict[str, Any], int] | None = self._call("get_state", name)
        return got

    def put_state(self, name: str, data: dict[str, Any], version: int | None) -> bool:
        return bool(self._call("put_state", name, data, version))

    def claim(self, key: str, owner: str) -> bool:
        return bool(self._call("claim", key, owner))

    def append_run(self, record: dict[str, Any]) -> None:
        self._call("append_run", record)

    def runs(self, job: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._call("runs", job, limit)
        return out

    def states(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = self._call("states")
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.inner.close()


def _redact(url: str) -> str:
    from sluice.config.redact import redact_text

    return redact_text(url)


def _sqlite_path(rest: str) -> str:
    return str(Path(rest).expanduser())


def open_raw(url: str) -> RunLog:
    """The backend ``url`` names; raises on a bad URL or an unreachable log."""
    if "://" not in url:
        url = f"sqlite://{url}"
    u = urllib.parse.urlsplit(url)
    scheme = u.scheme.lower()
    q = dict(urllib.parse.parse_qsl(u.query))
    create = q.pop("create_tables", "true").lower() not in {"false", "0", "no"}
    rest = url.split("://", 1)[1].split("?", 1)[0]
    if scheme == "memory":
        return MemoryRunLog(url)
    if scheme == "sqlite":
        import sqlite3

        path = _sqlite_path(rest)
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)

        def sqlite_conn() -> Any:
            c = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            c.execute("PRAGMA journal_mode=WAL")
            return c

        return SqlRunLog(url, "sqlite", sqlite_conn, create)
    if scheme == "duckdb":
        from sluice.connectors.duckdb.target import connect as duck

        path = _sqlite_path(rest)
        return SqlRunLog(url, "duckdb", lambda: duck(path), create)
    if scheme in {"postgres", "postgresql"}:
        import psycopg

        clean = urllib.parse.urlunsplit(u._replace(query=urllib.parse.urlencode(q)))
        return SqlRunLog(url, "postgres", lambda: psycopg.connect(clean, autocommit=True), create)
    if scheme in {"mysql", "mariadb"}:
        from sluice.jobs.db import _mysql

        return SqlRunLog(url, "mysql", lambda: _mysql(url.split("?", 1)[0]), create)
    if scheme == "s3":
        return S3RunLog(url)
    raise ConfigError(
        [
            ConfigProblem(
                "--run-log",
                "",
                f"unknown run log scheme {scheme!r}: expected sqlite://, memory://, postgres://, "
                "mysql://, duckdb:// or s3://",
            )
        ]
    )


def open_run_log(url: str | None) -> GuardedRunLog:
    """Open the run log at ``url`` (default :data:`DEFAULT_URL`), guarded.

    A bad scheme raises :class:`ConfigError`; a log that cannot be opened
    warns and gives an in-memory one.
    """
    url = url or DEFAULT_URL
    try:
        inner = open_raw(url)
    except ConfigError:
        raise
    except Exception as exc:
        log.warning(
            "run log %s cannot be opened (%s: %s); going on without a durable run log",
            _redact(url),
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        guarded = GuardedRunLog(MemoryRunLog(url))
        guarded.degraded = True
        return guarded
    return GuardedRunLog(inner)
