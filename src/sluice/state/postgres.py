"""``kind = "postgres"``: checkpoints in PostgreSQL, one transaction per commit.

Tables (all in the configured ``schema``, created by the numbered SQL files in
``migrations/``):

* ``sluice_checkpoints (pipeline PK, version, watermark_us, writer, committed_at)``
  one row per pipeline; ``version`` is the fencing token.
* ``sluice_state (pipeline, key) PK, value bytea, version, updated_at``
  operator state blobs.
* ``sluice_offsets (pipeline, source, partition) PK, position_int bigint |
  position_text text, version, updated_at``: next record to read.
* ``sluice_state_migrations (version PK, name, applied_at, applied_by)``: the
  migrations applied, written by this module (not by a migration).

**Migrations.** :meth:`PostgresStore.open` takes a transaction-scoped advisory
lock keyed by the schema, creates the schema and the ledger when missing,
refuses a database whose ledger holds a migration this sluice does not ship
(a newer sluice migrated it), and applies the missing ones in order, all in
that one transaction: two processes starting at once apply each migration
once, and a failed migration leaves nothing behind.

**Commit.** One transaction: raise the pipeline's version (``UPDATE ... WHERE
version = expected``: the row lock it takes also serialises concurrent
writers, and a writer that lost the race sees no row and is fenced), upsert
the state keys (``INSERT ... SELECT FROM unnest(keys, values) ON CONFLICT DO
UPDATE``, the blobs sent as one binary ``bytea[]`` per chunk), delete keys,
upsert positions per partition, commit.

**Failures.** A lost connection, a server shutting down, a serialization
failure or a lock timeout is a :class:`TransientError`: the transaction is
gone (rolled back by the server), the connection is dropped and the next call
reconnects. Anything else is a :class:`ConnectorError`, after a rollback.
When the connection dies during ``COMMIT`` itself, the commit may have landed;
the store remembers that and, on the retry, accepts its own landed commit in
place of the expected version instead of reporting itself as a rival writer.

**Commit inside a target's transaction.** When a Postgres target writes to the
same database (:attr:`PostgresStore.database`), :meth:`PostgresStore.commit_on`
applies the same delta on the target's connection (ADBC), inside the
transaction of its rows: operator state, output rows and positions then commit
together (see ``engine/commit.py``). The same fencing applies; the blobs go by
ADBC bulk ingest into a temporary table.

Errors never carry the URL's password nor the rows of a failed statement.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.resources
import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from sluice.config.redact import redact_text
from sluice.connectors.api import Position
from sluice.errors import ConnectorError, SluiceError, TransientError
from sluice.state.base import Checkpoint, Claimed, PartitionsMoved, check_commit, fenced

try:
    import psycopg
    from psycopg import sql
except ModuleNotFoundError as exc:  # pragma: no cover
    raise ModuleNotFoundError("psycopg", name="psycopg") from exc

log = logging.getLogger(__name__)

Conn = psycopg.Connection[tuple[Any, ...]]

#: Most blob bytes sent in one upsert statement. Postgres caps one bound
#: parameter (the ``bytea[]``) at 1 GiB, and psycopg builds it in memory:
#: 64 MiB keeps both far away while a chunk still amortises its round trip.
CHUNK_BYTES = 64 * 1024 * 1024

#: How long a commit waits for a row lock held by another writer of the same
#: pipeline (normally the few ms of its commit) before giving up as transient.
COMMIT_LOCK_TIMEOUT_MS = 10_000

#: How long open() waits for another process that is migrating the schema.
MIGRATION_LOCK_TIMEOUT_MS = 60_000

#: libpq settings used unless the URL sets them: give up connecting after
#: 10 s; notice a dead server or network on an idle connection in about a
#: minute (30 s idle, then 3 probes 10 s apart) instead of the kernel's hours.
_CONNECT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}

#: SQLSTATE classes worth a retry: 08 connection exception, 40 transaction
#: rollback (serialization failure, deadlock), 53 insufficient resources (too
#: many connections, disk full), 57 operator intervention (shutdown, query
#: canceled), 58 system error (I/O). Plus 55P03 lock_not_available.
_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_TRANSIENT_STATES = frozenset({"55P03"})

_MIGRATION_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LEDGER = "sluice_state_migrations"
#: NAMEDATALEN - 1: Postgres truncates longer names.
_MAX_IDENTIFIER_BYTES = 63


@dataclass(frozen=True)
class Migration:
    """One shipped migration: ``version`` 1, 2, ...; ``name`` the file stem."""

    version: int
    name: str
    sql: str


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """The migrations shipped in this package, in order.

    Raises :class:`ConnectorError` when the install is broken: no files (the
    package data was not installed) or numbers that are not 1, 2, ..., n.
    """
    folder = importlib.resources.files("sluice.state").joinpath("migrations")
    found: list[Migration] = []
    if folder.is_dir():
        for entry in folder.iterdir():
            match = _MIGRATION_FILE.match(entry.name)
            if match:
                found.append(
                    Migration(int(match.group(1)), entry.name[:-4], entry.read_text("utf-8"))
                )
    found.sort(key=lambda m: m.version)
    if not found or [m.version for m in found] != list(range(1, len(found) + 1)):
        raise ConnectorError(
            "this sluice installation is broken: the state store migrations in "
            f"sluice/state/migrations are {[m.name for m in found]}, expected files numbered "
            "0001, 0002, ... (reinstall sluice)"
        )
    return tuple(found)


def _lock_key(schema: str) -> int:
    """The advisory lock guarding the migrations of ``schema`` (a signed 64-bit int)."""
    digest = hashlib.blake2b(f"sluice.state.migrations:{schema}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def _sluice_version() -> str:
    try:
        return importlib.metadata.version("sluice")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
        return "unknown"


def _text(exc: BaseException) -> str:
    """The first line of ``exc`` with passwords masked.

    Only the first line: Postgres puts the failing row (megabytes of blob in
    hex) in the DETAIL lines of a constraint violation.
    """
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return redact_text(first)


def _transient(exc: BaseException, conn: Conn | None) -> bool:
    """True when retrying the same call later may succeed."""
    if conn is None or conn.closed or conn.broken:
        return True
    state = getattr(exc, "sqlstate", None)
    if state is None:
        # Client-side: connection failures are OperationalError; a value
        # psycopg cannot send is DataError / ProgrammingError.
        return isinstance(exc, psycopg.OperationalError)
    return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES


class PostgresStore:
    """A :class:`~sluice.state.base.StateStore` in PostgreSQL tables under ``schema``.

    Holds one connection, used by one call at a time (a lock serialises
    callers). After a connection loss the failed call raises
    :class:`TransientError` and the next call reconnects (re-running the
    schema check).
    """

    def __init__(self, url: str, schema: str = "public") -> None:
        self._url = url
        self.schema = schema
        self.id = f"postgres state store {redact_text(url)} schema {schema!r}"
        #: Written into sluice_checkpoints.writer: who made the last commit.
        self.writer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._conn: Conn | None = None
        self._opened = False
        self._lock = threading.Lock()
        # pipeline -> the version a commit wrote when the connection died
        # during its COMMIT (it may have landed).
        self._in_doubt: dict[str, int] = {}

        def t(name: str) -> sql.Identifier:
            return sql.Identifier(schema, name)

        names = {
            "cp": t("sluice_checkpoints"),
            "st": t("sluice_state"),
            "off": t("sluice_offsets"),
            "own": t("sluice_owners"),
        }
        self._q_claim = sql.SQL(
            "INSERT INTO {own} AS o (pipeline, partition, owner, generation) "
            "SELECT %s, p, %s, 1 FROM unnest(%s::text[]) AS p ON CONFLICT (pipeline, partition) "
            "DO UPDATE SET owner = EXCLUDED.owner, generation = o.generation + 1, "
            "claimed_at = now() RETURNING partition, generation"
        ).format(**names)
        self._q_owned = sql.SQL(
            "SELECT partition, owner, generation FROM {own} "
            "WHERE pipeline = %s AND partition = ANY(%s::text[]) ORDER BY partition FOR UPDATE"
        ).format(**names)
        # A claim's keys and the keys under them (join/<p>/<bucket> under join/<p>).
        self._q_read_keys = sql.SQL(
            "SELECT key, value FROM {st} WHERE pipeline = %s AND (key = ANY(%s::text[]) "
            "OR EXISTS (SELECT 1 FROM unnest(%s::text[]) AS k(p) WHERE starts_with(key, k.p || '/')))"
        ).format(**names)
        self._q_read_parts = sql.SQL(
            "SELECT source, partition, position_int, position_text FROM {off} "
            "WHERE pipeline = %s AND partition = ANY(%s::text[])"
        ).format(**names)
        self._q_read_cp = sql.SQL(
            "SELECT version, watermark_us FROM {cp} WHERE pipeline = %s"
        ).format(**names)
        self._q_read_state = sql.SQL("SELECT key, value FROM {st} WHERE pipeline = %s").format(
            **names
        )
        self._q_read_off = sql.SQL(
            "SELECT source, partition, position_int, position_text FROM {off} WHERE pipeline = %s"
        ).format(**names)
        self._q_who = sql.SQL("SELECT version, writer FROM {cp} WHERE pipeline = %s").format(
            **names
        )
        # Fencing: each statement returns the new version, or no row when the
        # stored version is not the expected one.
        self._q_first = sql.SQL(
            "INSERT INTO {cp} (pipeline, version, watermark_us, writer) VALUES (%s, 1, %s, %s) "
            "ON CONFLICT (pipeline) DO NOTHING RETURNING version"
        ).format(**names)
        self._q_next = sql.SQL(
            "UPDATE {cp} SET version = version + 1, "
            "watermark_us = COALESCE(%s, watermark_us), writer = %s, committed_at = now() "
            "WHERE pipeline = %s AND version = %s RETURNING version"
        ).format(**names)
        self._q_any = sql.SQL(
            "INSERT INTO {cp} AS c (pipeline, version, watermark_us, writer) "
            "VALUES (%s, 1, %s, %s) ON CONFLICT (pipeline) DO UPDATE SET "
            "version = c.version + 1, "
            "watermark_us = COALESCE(EXCLUDED.watermark_us, c.watermark_us), "
            "writer = EXCLUDED.writer, committed_at = now() RETURNING version"
        ).format(**names)
        self._q_upsert = sql.SQL(
            "INSERT INTO {st} (pipeline, key, value, version, updated_at) "
            "SELECT %s, u.key, u.value, %s, now() FROM unnest(%s::text[], %b::bytea[]) "
            "AS u(key, value) ON CONFLICT (pipeline, key) DO UPDATE SET "
            "value = EXCLUDED.value, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at"
        ).format(**names)
        self._q_delete = sql.SQL(
            "DELETE FROM {st} WHERE pipeline = %s AND key = ANY(%s::text[])"
        ).format(**names)
        self._q_positions = sql.SQL(
            "INSERT INTO {off} (pipeline, source, partition, position_int, position_text, "
            "version, updated_at) "
            "SELECT %s, u.source, u.partition, u.position_int, u.position_text, %s, now() "
            "FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[]) "
            "AS u(source, partition, position_int, position_text) "
            "ON CONFLICT (pipeline, source, partition) DO UPDATE SET "
            "position_int = EXCLUDED.position_int, position_text = EXCLUDED.position_text, "
            "version = EXCLUDED.version, updated_at = EXCLUDED.updated_at"
        ).format(**names)

    def __repr__(self) -> str:
        return f"PostgresStore({self.id})"

    @property
    def database(self) -> str | None:
        """``postgres://host:port/database`` this store writes to (no
        credentials), as a Postgres target names its own; ``None`` when the
        url does not parse."""
        try:
            given = psycopg.conninfo.conninfo_to_dict(self._url)
        except psycopg.Error:
            return None
        host = str(given.get("host") or "localhost")
        port = str(given.get("port") or 5432)
        name = str(given.get("dbname") or given.get("user") or "postgres")
        return f"postgres://{host}:{port}/{name}"

    # -- lifecycle ------------------------------------------------------------

    def open(self) -> None:
        """Connect, apply the missing migrations, check the schema version.

        Idempotent while open. Raises :class:`TransientError` when Postgres
        cannot be reached or refuses the connection (it may be restarting),
        :class:`ConnectorError` when the database was migrated by a newer
        sluice, the URL is malformed, or a migration fails.
        """
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            self._opened = True

    def close(self) -> None:
        """Drop the connection (an open transaction is rolled back by the server)."""
        with self._lock:
            self._opened = False
            self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _connection(self) -> Conn:
        """The open connection, reconnecting after a loss."""
        if not self._opened:
            raise ConnectorError(f"{self.id}: not open (call open() first)")
        if self._conn is None or self._conn.closed:
            self._conn = None
            self._conn = self._connect()
        return self._conn

    def _connect(self) -> Conn:
        if len(self.schema.encode()) > _MAX_IDENTIFIER_BYTES:
            # Postgres would silently truncate it, and find no such schema next time.
            raise ConnectorError(
                f"{self.id}: the schema name is longer than Postgres' "
                f"{_MAX_IDENTIFIER_BYTES}-byte limit for identifiers"
            )
        try:
            given = psycopg.conninfo.conninfo_to_dict(self._url)
        except psycopg.Error as exc:
            raise ConnectorError(f"{self.id}: bad url: {_text(exc)}") from None
        extra = {k: v for k, v in _CONNECT_DEFAULTS.items() if k not in given}
        if "application_name" not in given:
            extra["application_name"] = f"sluice state {self.schema}"[:63]
        try:
            conn: Conn = psycopg.connect(self._url, autocommit=False, **extra)
        except psycopg.Error as exc:
            # ``from None``: psycopg's chained errors may repeat the conninfo.
            if isinstance(exc, psycopg.OperationalError):
                raise TransientError(f"{self.id}: cannot connect: {_text(exc)}") from None
            raise ConnectorError(f"{self.id}: cannot connect: {_text(exc)}") from None
        try:
            conn.execute(
                sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{COMMIT_LOCK_TIMEOUT_MS}ms"))
            )
            conn.commit()
            self._migrate(conn)
        except psycopg.Error as exc:
            transient = _transient(exc, conn)
            with contextlib.suppress(psycopg.Error):
                conn.close()
            kind = TransientError if transient else ConnectorError
            raise kind(f"{self.id}: preparing the state tables: {_text(exc)}") from exc
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                conn.close()
            raise
        return conn

    def _migrate(self, conn: Conn) -> None:
        """Bring the schema to the newest shipped migration, in one transaction
        under the schema's advisory lock; refuse a schema from a newer sluice."""
        known = migrations()
        schema = sql.Identifier(self.schema)
        ledger = sql.Identifier(self.schema, _LEDGER)
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("SET LOCAL lock_timeout = {}").format(
                    sql.Literal(f"{MIGRATION_LOCK_TIMEOUT_MS}ms")
                )
            )
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(self.schema),))
            # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when
            # the schema exists; a DBA-made schema must work without it.
            cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            cur.execute(
                "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = %s",
                (self.schema, _LEDGER),
            )
            if cur.fetchone() is None:
                cur.execute(
                    sql.SQL(
                        "CREATE TABLE {} (version integer PRIMARY KEY, name text NOT NULL, "
                        "applied_at timestamptz NOT NULL DEFAULT now(), applied_by text NOT NULL)"
                    ).format(ledger)
                )
            cur.execute(sql.SQL("SELECT version, name FROM {} ORDER BY version").format(ledger))
            applied: dict[int, str] = {int(v): str(n) for v, n in cur.fetchall()}
            newest = known[-1]
            ahead = [v for v in applied if v > newest.version]
            if ahead:
                top = max(ahead)
                raise ConnectorError(
                    f"{self.id}: the state tables are at migration version {top} "
                    f"({applied[top]!r}), but this sluice ({_sluice_version()}) knows migrations "
                    f"up to version {newest.version} ({newest.name!r}): a newer sluice migrated "
                    "this schema. Refusing to run against a schema it does not know: upgrade "
                    "sluice, or point [state_store] schema at another schema."
                )
            for m in known:
                if m.version in applied:
                    if applied[m.version] != m.name:
                        raise ConnectorError(
                            f"{self.id}: migration version {m.version} in the database is "
                            f"{applied[m.version]!r}, this sluice ships {m.name!r}: the schema "
                            "was made by an incompatible build; use another schema."
                        )
                    continue
                cur.execute(sql.SQL("SET LOCAL search_path TO {}").format(schema))
                cur.execute(m.sql.encode())  # several statements, no parameters
                cur.execute(
                    sql.SQL(
                        "INSERT INTO {} (version, name, applied_by) VALUES (%s, %s, %s)"
                    ).format(ledger),
                    (m.version, m.name, f"sluice {_sluice_version()}"),
                )
                log.info("state store schema %r: applied migration %s", self.schema, m.name)
        conn.commit()

    # -- reading ----------------------------------------------------------------

    def load(self, pipeline: str) -> Checkpoint:
        """``pipeline``'s checkpoint, read in one REPEATABLE READ snapshot.

        Raises :class:`TransientError` (connection lost; the next call
        reconnects) or :class:`ConnectorError`.
        """
        with self._lock:
            conn = self._connection()
            try:
                # Binary results: bytea arrives as raw bytes, not hex to decode.
                with conn.cursor(binary=True) as cur:
                    cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    cur.execute(self._q_read_cp, (pipeline,))
                    row = cur.fetchone()
                    cur.execute(self._q_read_state, (pipeline,))
                    state: dict[str, bytes] = dict(cur.fetchall())
                    cur.execute(self._q_read_off, (pipeline,))
                    positions: dict[str, Position] = {}
                    for source, part, pos_int, pos_text in cur.fetchall():
                        positions.setdefault(source, {})[part] = (
                            pos_text if pos_int is None else pos_int
                        )
                conn.rollback()  # read only: nothing to commit
            except psycopg.Error as exc:
                raise self._failure(exc, f"loading pipeline {pipeline!r} failed") from exc
            except BaseException:
                self._rollback_quietly()
                raise
        if row is None:
            return Checkpoint(state=state, positions=positions)
        return Checkpoint(
            state=state, positions=positions, watermark_us=row[1], version=int(row[0])
        )

    # -- writing ----------------------------------------------------------------

    def commit(
        self,
        pipeline: str,
        upserts: Mapping[str, bytes],
        deletes: Collection[str],
        positions: Mapping[str, Position],
        watermark_us: int | None,
        *,
        expected_version: int | None,
    ) -> int:
        """See :meth:`sluice.state.base.StateStore.commit`: one transaction,
        fenced on ``expected_version``, returns the new version."""
        check_commit(pipeline, upserts, deletes, positions, watermark_us, expected_version)
        with self._lock:
            conn = self._connection()
            version = 0
            committing = False
            try:
                with conn.cursor() as cur:
                    version = self._bump(cur, pipeline, watermark_us, expected_version)
                    self._write_state(cur, pipeline, version, upserts, deletes)
                    self._write_positions(cur, pipeline, version, positions)
                committing = True
                self._finish(conn)
            except psycopg.Error as exc:
                what = f"commit of pipeline {pipeline!r}"
                if committing:
                    raise self._failure(exc, what, in_doubt=(pipeline, version)) from exc
                raise self._failure(exc, f"{what} failed, nothing was committed") from exc
            except BaseException:
                self._rollback_quietly()
                raise
            self._in_doubt.pop(pipeline, None)
            return version

    def claim(self, pipeline: str, partitions: Collection[str], keys: Collection[str]) -> Claimed:
        """See :meth:`sluice.state.base.ClaimingStore.claim`: one transaction."""
        with self._lock:
            conn = self._connection()
            try:
                with conn.cursor(binary=True) as cur:
                    cur.execute(self._q_claim, (pipeline, self.writer, sorted(partitions)))
                    generations = {str(p): int(g) for p, g in cur.fetchall()}
                    cur.execute(self._q_read_keys, (pipeline, sorted(keys), sorted(keys)))
                    state: dict[str, bytes] = dict(cur.fetchall())
                    cur.execute(self._q_read_parts, (pipeline, sorted(partitions)))
                    positions: dict[str, Position] = {}
                    for source, part, pos_int, pos_text in cur.fetchall():
                        positions.setdefault(source, {})[part] = (
                            pos_text if pos_int is None else pos_int
                        )
                self._finish(conn)
            except psycopg.Error as exc:
                raise self._failure(exc, f"claiming partitions of {pipeline!r} failed") from exc
            except BaseException:
                self._rollback_quietly()
                raise
        return Claimed(Checkpoint(state=state, positions=positions), generations)

    def commit_owned(
        self,
        pipeline: str,
        upserts: Mapping[str, bytes],
        deletes: Collection[str],
        positions: Mapping[str, Position],
        owned: Mapping[str, int],
    ) -> int:
        """See :meth:`sluice.state.base.ClaimingStore.commit_owned`."""
        check_commit(pipeline, upserts, deletes, positions, None, None)
        with self._lock:
            conn = self._connection()
            try:
                with conn.cursor() as cur:
                    # The row locks serialise this commit with any claim of these partitions.
                    cur.execute(self._q_owned, (pipeline, sorted(owned)))
                    held = {str(p): (str(o), int(g)) for p, o, g in cur.fetchall()}
                    moved = [p for p, g in owned.items() if held.get(p) != (self.writer, g)]
                    if moved:
                        raise PartitionsMoved(pipeline, moved)
                    version = self._bump(cur, pipeline, None, None)
                    self._write_state(cur, pipeline, version, upserts, deletes)
                    self._write_positions(cur, pipeline, version, positions)
                self._finish(conn)
            except psycopg.Error as exc:
                raise self._failure(exc, f"commit of pipeline {pipeline!r} failed") from exc
            except BaseException:
                self._rollback_quietly()
                raise
            return version

    def commit_on(
        self,
        connection: Any,
        pipeline: str,
        upserts: Mapping[str, bytes],
        deletes: Collection[str],
        positions: Mapping[str, Position],
        watermark_us: int | None,
        *,
        expected_version: int,
    ) -> int:
        """:meth:`commit` on ``connection``, an open ADBC Postgres connection to
        :attr:`database` with its transaction open, without committing it: the
        caller's commit makes the checkpoint durable with whatever else that
        transaction holds. Returns the new version.

        Raises :class:`ConnectorError` when fenced; the ADBC driver's errors
        pass through (the caller classifies its own connection's failures).
        """
        check_commit(pipeline, upserts, deletes, positions, watermark_us, expected_version)
        cp = self._ident("sluice_checkpoints")
        st = self._ident("sluice_state")
        off = self._ident("sluice_offsets")
        with connection.cursor() as cur:
            if expected_version == 0:
                cur.execute(
                    f"INSERT INTO {cp} (pipeline, version, watermark_us, writer) "
                    "VALUES ($1, 1, $2::bigint, $3) ON CONFLICT (pipeline) DO NOTHING "
                    "RETURNING version",
                    (pipeline, watermark_us, self.writer),
                )
            else:
                cur.execute(
                    f"UPDATE {cp} SET version = version + 1, "
                    "watermark_us = COALESCE($1::bigint, watermark_us), writer = $2, "
                    "committed_at = now() WHERE pipeline = $3 AND version = $4 RETURNING version",
                    (watermark_us, self.writer, pipeline, expected_version),
                )
            row = cur.fetchone()
            if row is None:
                cur.execute(f"SELECT version, writer FROM {cp} WHERE pipeline = $1", (pipeline,))
                found = cur.fetchone()
                raise fenced(
                    pipeline,
                    expected_version,
                    0 if found is None else int(found[0]),
                    "" if found is None else str(found[1]),
                )
            version = int(row[0])
            if upserts:
                blobs = pa.table(
                    {
                        "key": pa.array(list(upserts), pa.string()),
                        "value": pa.array([bytes(v) for v in upserts.values()], pa.binary()),
                    }
                )
                cur.adbc_ingest("_sluice_state_delta", blobs, mode="replace", temporary=True)
                cur.execute(
                    f"INSERT INTO {st} (pipeline, key, value, version, updated_at) "
                    "SELECT $1, key, value, $2, now() FROM _sluice_state_delta "
                    "ON CONFLICT (pipeline, key) DO UPDATE SET value = EXCLUDED.value, "
                    "version = EXCLUDED.version, updated_at = EXCLUDED.updated_at",
                    (pipeline, version),
                )
            if deletes:
                gone = pa.table({"key": pa.array(list(deletes), pa.string())})
                cur.adbc_ingest("_sluice_state_gone", gone, mode="replace", temporary=True)
                cur.execute(
                    f"DELETE FROM {st} WHERE pipeline = $1 "
                    "AND key IN (SELECT key FROM _sluice_state_gone)",
                    (pipeline,),
                )
            for source, by_part in positions.items():
                for part, pos in by_part.items():
                    cur.execute(
                        f"INSERT INTO {off} (pipeline, source, partition, position_int, "
                        "position_text, version, updated_at) "
                        "VALUES ($1, $2, $3, $4::bigint, $5::text, $6, now()) "
                        "ON CONFLICT (pipeline, source, partition) DO UPDATE SET "
                        "position_int = EXCLUDED.position_int, "
                        "position_text = EXCLUDED.position_text, "
                        "version = EXCLUDED.version, updated_at = EXCLUDED.updated_at",
                        (
                            pipeline,
                            source,
                            part,
                            pos if isinstance(pos, int) else None,
                            pos if isinstance(pos, str) else None,
                            version,
                        ),
                    )
        return version

    def _ident(self, table: str) -> str:
        """``"schema"."table"`` quoted for text SQL (the ADBC path)."""
        return ".".join('"' + n.replace('"', '""') + '"' for n in (self.schema, table))

    def _finish(self, conn: Conn) -> None:
        """COMMIT: the one step after which a lost connection leaves the
        outcome unknown (a separate method so tests can lose its answer)."""
        conn.commit()

    def _bump(
        self,
        cur: psycopg.Cursor[tuple[Any, ...]],
        pipeline: str,
        watermark_us: int | None,
        expected: int | None,
    ) -> int:
        """Raise the pipeline's version, first thing in the transaction; the
        row lock it takes makes a concurrent writer wait and then be fenced."""
        if expected is None:
            cur.execute(self._q_any, (pipeline, watermark_us, self.writer))
        elif expected == 0:
            cur.execute(self._q_first, (pipeline, watermark_us, self.writer))
        else:
            cur.execute(self._q_next, (watermark_us, self.writer, pipeline, expected))
        row = cur.fetchone()
        if row is not None:
            return int(row[0])
        assert expected is not None  # the unfenced upsert always returns a row
        cur.execute(self._q_who, (pipeline,))
        found = cur.fetchone()
        found_version, by = (0, "") if found is None else (int(found[0]), str(found[1]))
        if (
            found_version == expected + 1
            and by == self.writer
            and self._in_doubt.get(pipeline) == found_version
        ):
            # Our own earlier commit landed though its acknowledgement was
            # lost. This call retries the same delta (or a later one of the
            # same writer): applying it on top is what two commits would do.
            log.info(
                "state store: pipeline %r: the commit of version %d whose answer was lost did "
                "land; committing on top of it",
                pipeline,
                found_version,
            )
            cur.execute(self._q_next, (watermark_us, self.writer, pipeline, found_version))
            row = cur.fetchone()
            if row is not None:
                return int(row[0])
        raise fenced(pipeline, expected, found_version, by)

    def _write_state(
        self,
        cur: psycopg.Cursor[tuple[Any, ...]],
        pipeline: str,
        version: int,
        upserts: Mapping[str, bytes],
        deletes: Collection[str],
    ) -> None:
        keys: list[str] = []
        values: list[bytes] = []
        size = 0
        for key, value in upserts.items():
            blob = value if isinstance(value, bytes) else bytes(value)
            if keys and size + len(blob) > CHUNK_BYTES:
                cur.execute(self._q_upsert, (pipeline, version, keys, values))
                keys, values, size = [], [], 0
            keys.append(key)
            values.append(blob)
            size += len(blob)
        if keys:
            cur.execute(self._q_upsert, (pipeline, version, keys, values))
        if deletes:
            cur.execute(self._q_delete, (pipeline, list(deletes)))

    def _write_positions(
        self,
        cur: psycopg.Cursor[tuple[Any, ...]],
        pipeline: str,
        version: int,
        positions: Mapping[str, Position],
    ) -> None:
        sources: list[str] = []
        parts: list[str] = []
        ints: list[int | None] = []
        texts: list[str | None] = []
        for source, by_part in positions.items():
            for part, pos in by_part.items():
                sources.append(source)
                parts.append(part)
                ints.append(pos if isinstance(pos, int) else None)
                texts.append(pos if isinstance(pos, str) else None)
        if sources:
            cur.execute(self._q_positions, (pipeline, version, sources, parts, ints, texts))

    # -- failures -------------------------------------------------------------

    def _failure(
        self, exc: psycopg.Error, what: str, in_doubt: tuple[str, int] | None = None
    ) -> SluiceError:
        """Classify ``exc`` and leave the connection usable or dropped.

        ``in_doubt``: (pipeline, version) when ``exc`` came from COMMIT.
        """
        if _transient(exc, self._conn):
            self._drop()
            if in_doubt is None:
                return TransientError(f"{self.id}: {what}: {_text(exc)}")
            # The COMMIT may or may not have reached the server; only the
            # stored version can tell, on the retry (see _bump).
            pipeline, version = in_doubt
            self._in_doubt[pipeline] = version
            return TransientError(
                f"{self.id}: {what}: the connection failed during COMMIT, so version {version} "
                f"may or may not be stored; retry the same commit (the store recognises its "
                f"own landed commit): {_text(exc)}"
            )
        self._rollback_quietly()
        if in_doubt is not None:
            what = f"{what} failed, nothing was committed"
        return ConnectorError(f"{self.id}: {what}: {_text(exc)}")

    def _rollback_quietly(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            conn.rollback()
        except psycopg.Error:
            self._drop()
