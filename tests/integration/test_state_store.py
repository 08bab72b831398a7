"""The Postgres state store against the real Postgres.

Every test works in its own schema (dropped afterwards), so tests never see
each other's tables or migrations.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from tests import endpoints
from tests.integration.conftest import unique, wait_until

from sluice.errors import ConnectorError, TransientError
from sluice.state import Checkpoint
from sluice.state.postgres import PostgresStore, migrations

pytestmark = pytest.mark.integration

P = "orders-payments"
KNOWN = len(migrations())


@pytest.fixture
def schema(pg: psycopg.Connection[Any]) -> Iterator[str]:
    name = unique("sluice_st")
    yield name
    pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def make_store(schema: str) -> Iterator[Callable[..., PostgresStore]]:
    """``make_store(open=True, url=..., schema=...)``: a store, closed after the test."""
    made: list[PostgresStore] = []

    def make(
        open: bool = True, url: str = endpoints.POSTGRES_URL, schema: str = schema
    ) -> PostgresStore:
        store = PostgresStore(url, schema)
        made.append(store)
        if open:
            store.open()
        return store

    yield make
    for store in made:
        store.close()


def table(schema: str, name: str) -> sql.Composable:
    return sql.Identifier(schema, name)


def commit(store: PostgresStore, expected: int | None, **kwargs: Any) -> int:
    args: dict[str, Any] = {"upserts": {}, "deletes": (), "positions": {}, "watermark_us": None}
    args.update(kwargs)
    return store.commit(P, expected_version=expected, **args)


def test_round_trip_in_a_new_store(make_store: Callable[..., PostgresStore]) -> None:
    store = make_store()
    assert store.load(P) == Checkpoint({}, {}, None, 0)
    big = os.urandom(3 * 1024 * 1024)  # a blob of MBs goes through unchanged
    v1 = commit(
        store,
        0,
        upserts={"window": b"w1", "join/orders:0": big, "join/orders:1": b"j1", "empty": b""},
        positions={"kafka:orders": {"orders:0": 10, "orders:1": 7}, "files": {"f": "a.json"}},
        watermark_us=1_700_000_000_000_000,
    )
    assert v1 == 1
    # Another pipeline in the same schema is independent.
    store.commit("other", {"window": b"x"}, (), {"s": {"p": 1}}, 5, expected_version=0)
    v2 = commit(
        store,
        1,
        upserts={"window": b"w2"},
        deletes=["join/orders:1", "never-stored"],
        positions={"kafka:orders": {"orders:1": 9}},
        watermark_us=None,  # keeps the stored one
    )
    assert v2 == 2
    store.close()

    fresh = make_store()
    cp = fresh.load(P)
    assert cp.version == 2
    assert cp.watermark_us == 1_700_000_000_000_000
    assert cp.positions == {
        "kafka:orders": {"orders:0": 10, "orders:1": 9},
        "files": {"f": "a.json"},
    }
    assert cp.state.keys() == {"window", "join/orders:0", "empty"}
    assert cp.state["window"] == b"w2"
    assert cp.state["empty"] == b""
    assert type(cp.state["join/orders:0"]) is bytes and cp.state["join/orders:0"] == big
    assert fresh.load("other") == Checkpoint({"window": b"x"}, {"s": {"p": 1}}, 5, 1)
    assert commit(fresh, 2, watermark_us=1_700_000_000_000_001) == 3
    assert fresh.load(P).watermark_us == 1_700_000_000_000_001


def test_any_schema_name_works(
    make_store: Callable[..., PostgresStore], pg: psycopg.Connection[Any]
) -> None:
    odd = unique('Odd "State" schema-')
    try:
        store = make_store(schema=odd)
        commit(store, 0, upserts={"k": b"v"}, positions={"s": {"p": 1}})
        assert make_store(schema=odd).load(P).state == {"k": b"v"}
    finally:
        pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(odd)))
    with pytest.raises(ConnectorError, match="63-byte limit"):
        make_store(schema="s" * 64)


def test_committed_rows_are_plain_sql(
    make_store: Callable[..., PostgresStore], schema: str, pg: psycopg.Connection[Any]
) -> None:
    store = make_store()
    commit(store, 0, upserts={"window": b"\x00\x01state"}, positions={"k": {"t:0": 41}})
    version = commit(
        store,
        1,
        upserts={"join/orders:3": b"join"},
        positions={"k": {"t:0": 42, "t:1": 7}, "files": {"inbox": "b.json"}},
        watermark_us=123,
    )
    rows = pg.execute(
        sql.SQL("SELECT key, value, version FROM {} WHERE pipeline = %s ORDER BY key").format(
            table(schema, "sluice_state")
        ),
        (P,),
    ).fetchall()
    assert rows == [("join/orders:3", b"join", 2), ("window", b"\x00\x01state", 1)]
    offsets = pg.execute(
        sql.SQL(
            "SELECT source, partition, position_int, position_text, version FROM {} "
            "WHERE pipeline = %s ORDER BY source, partition"
        ).format(table(schema, "sluice_offsets")),
        (P,),
    ).fetchall()
    assert offsets == [
        ("files", "inbox", None, "b.json", 2),
        ("k", "t:0", 42, None, 2),
        ("k", "t:1", 7, None, 2),
    ]
    checkpoint = pg.execute(
        sql.SQL("SELECT version, watermark_us, writer FROM {} WHERE pipeline = %s").format(
            table(schema, "sluice_checkpoints")
        ),
        (P,),
    ).fetchone()
    assert checkpoint == (version, 123, store.writer)


def test_a_commit_failing_midway_leaves_the_previous_checkpoint(
    make_store: Callable[..., PostgresStore], schema: str, pg: psycopg.Connection[Any]
) -> None:
    store = make_store()
    commit(
        store,
        0,
        upserts={f"k{i}": b"old" for i in range(100)},
        positions={"kafka:t": {"t:0": 5}},
        watermark_us=10,
    )
    before = store.load(P)
    # Failures Postgres raises halfway through the transaction: after the
    # version bump and (for the second) after every state row was written.
    pg.execute(
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT test_poison CHECK (key <> 'poison')").format(
            table(schema, "sluice_state")
        )
    )
    pg.execute(
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT test_poison CHECK (partition <> 't:9')").format(
            table(schema, "sluice_offsets")
        )
    )
    blob = os.urandom(64 * 1024)
    new_state = {f"k{i}": blob for i in range(90)}
    with pytest.raises(ConnectorError, match="test_poison") as bad_key:
        commit(
            store,
            1,
            upserts={**new_state, "poison": blob},
            deletes=["k95"],
            positions={"kafka:t": {"t:0": 6}},
            watermark_us=20,
        )
    assert not isinstance(bad_key.value, TransientError)
    assert "nothing was committed" in str(bad_key.value)
    assert len(str(bad_key.value)) < 500  # the failing row (a blob) is not in the message
    with pytest.raises(ConnectorError, match="test_poison"):
        commit(
            store,
            1,
            upserts=new_state,
            deletes=["k95"],
            positions={"kafka:t": {"t:0": 6, "t:9": 1}},
            watermark_us=20,
        )
    # Refused before touching Postgres.
    with pytest.raises(ConnectorError, match="must be an int or a str"):
        commit(store, 1, upserts=new_state, positions={"kafka:t": {"t:0": 6.0}})
    assert make_store().load(P) == before
    assert store.load(P) == before
    # The same store object goes on working.
    assert commit(store, 1, upserts={"k1": b"new"}, positions={"kafka:t": {"t:0": 6}}) == 2
    assert make_store().load(P).state["k1"] == b"new"


def test_migrations_are_idempotent(
    make_store: Callable[..., PostgresStore], schema: str, pg: psycopg.Connection[Any]
) -> None:
    first = make_store()
    commit(first, 0, upserts={"k": b"v"})
    first.close()
    first.open()  # reopening the same object
    second = make_store()
    assert second.load(P).state == {"k": b"v"}
    ledger = pg.execute(
        sql.SQL("SELECT version, name FROM {} ORDER BY version").format(
            table(schema, "sluice_state_migrations")
        )
    ).fetchall()
    assert ledger == [(m.version, m.name) for m in migrations()]


def test_a_schema_from_a_newer_sluice_is_refused(
    make_store: Callable[..., PostgresStore], schema: str, pg: psycopg.Connection[Any]
) -> None:
    make_store().close()
    pg.execute(
        sql.SQL("INSERT INTO {} (version, name, applied_by) VALUES (%s, %s, %s)").format(
            table(schema, "sluice_state_migrations")
        ),
        (9999, "9999_future", "sluice 99.0"),
    )
    url = endpoints.POSTGRES_URL.replace("postgres@", "postgres:s3cret@", 1)
    assert "s3cret" in url
    with pytest.raises(ConnectorError) as err:
        make_store(url=url)
    text = str(err.value)
    assert not isinstance(err.value, TransientError)
    assert "migration version 9999 ('9999_future')" in text
    assert f"up to version {KNOWN} ('{migrations()[-1].name}')" in text
    assert "newer sluice" in text
    assert "s3cret" not in text


def test_concurrent_opens_on_a_new_schema_all_succeed(
    make_store: Callable[..., PostgresStore], schema: str, pg: psycopg.Connection[Any]
) -> None:
    stores = [make_store(open=False) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def run(store: PostgresStore) -> None:
        barrier.wait()
        try:
            store.open()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    count = pg.execute(
        sql.SQL("SELECT count(*) FROM {}").format(table(schema, "sluice_state_migrations"))
    ).fetchone()
    assert count == (KNOWN,)
    assert all(s.load(P).version == 0 for s in stores)


def test_fencing_the_first_commit_wins(make_store: Callable[..., PostgresStore]) -> None:
    a, b = make_store(), make_store()
    commit(a, 0, upserts={"k": b"start"})
    assert a.load(P).version == b.load(P).version == 1
    assert commit(a, 1, upserts={"k": b"from a"}, positions={"s": {"p": 2}}) == 2
    with pytest.raises(ConnectorError) as err:
        commit(b, 1, upserts={"k": b"from b"}, positions={"s": {"p": 1}})
    assert not isinstance(err.value, TransientError)
    text = str(err.value)
    assert "committed by another writer" in text
    assert "expected checkpoint version 1, the store holds version 2" in text
    assert a.writer in text
    cp = make_store().load(P)
    assert (cp.state, cp.positions, cp.version) == ({"k": b"from a"}, {"s": {"p": 2}}, 2)
    # b reloads and continues; a is fenced in turn.
    assert commit(b, b.load(P).version, upserts={"k": b"b again"}) == 3
    with pytest.raises(ConnectorError, match="another writer"):
        commit(a, 2)
    # expected_version=None skips the check.
    assert commit(a, None, upserts={"k": b"forced"}) == 4


def race(stores: list[PostgresStore], expected: int) -> list[int | BaseException]:
    """Every store commits at once, expecting ``expected``: each one's result."""
    barrier = threading.Barrier(len(stores))
    results: list[int | BaseException] = []

    def run(i: int, store: PostgresStore) -> None:
        barrier.wait()
        try:
            blobs = {f"k{j}": bytes([i]) * 1000 for j in range(50)}
            results.append(commit(store, expected, upserts=blobs))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_racing_writers_exactly_one_wins(make_store: Callable[..., PostgresStore]) -> None:
    stores = [make_store() for _ in range(4)]
    for round_ in range(3):
        expected = stores[0].load(P).version
        results = race(stores, expected)
        wins = [r for r in results if isinstance(r, int)]
        losses = [r for r in results if isinstance(r, BaseException)]
        assert wins == [expected + 1], (round_, results)
        assert len(losses) == 3
        assert all(isinstance(e, ConnectorError) and "another writer" in str(e) for e in losses), (
            losses
        )
        state = stores[0].load(P).state
        assert len(set(state.values())) == 1  # one writer's keys, never a mix


def test_connection_loss_is_transient_then_reconnects(
    make_store: Callable[..., PostgresStore], schema: str, pg: psycopg.Connection[Any]
) -> None:
    store = make_store()
    assert commit(store, 0, upserts={"k": b"v1"}, positions={"s": {"p": 1}}) == 1

    def backends() -> list[int]:
        rows = pg.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (f"sluice state {schema}",),
        ).fetchall()
        return [r[0] for r in rows]

    pids = backends()
    assert len(pids) == 1
    pg.execute("SELECT pg_terminate_backend(%s)", (pids[0],))
    wait_until(lambda: not backends(), 10, "the store's backend to go away")

    with pytest.raises(TransientError, match="nothing was committed"):
        commit(store, 1, upserts={"k": b"v2"}, positions={"s": {"p": 2}})
    assert make_store(open=True).load(P) == Checkpoint({"k": b"v1"}, {"s": {"p": 1}}, None, 1)
    # The next call reconnects (a new backend) and succeeds.
    assert commit(store, 1, upserts={"k": b"v2"}, positions={"s": {"p": 2}}) == 2
    assert store.load(P) == Checkpoint({"k": b"v2"}, {"s": {"p": 2}}, None, 2)

    # A load that loses its connection is transient too.
    pg.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        (f"sluice state {schema}",),
    )
    wait_until(lambda: not backends(), 10, "the backends to go away")
    with pytest.raises(TransientError):
        store.load(P)
    assert store.load(P).version == 2


@pytest.mark.parametrize("landed", [True, False])
def test_commit_whose_answer_is_lost(
    make_store: Callable[..., PostgresStore], monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    """The connection dies during COMMIT: the retry with the same expected
    version succeeds whether the first attempt landed or not."""
    store = make_store()
    commit(store, 0, upserts={"k": b"v1"})
    real = PostgresStore._finish

    def lose_answer(self: PostgresStore, conn: psycopg.Connection[Any]) -> None:
        if landed:
            real(self, conn)
        else:
            conn.rollback()
        raise psycopg.OperationalError("simulated: server closed the connection unexpectedly")

    monkeypatch.setattr(PostgresStore, "_finish", lose_answer)
    with pytest.raises(TransientError, match="may or may not be stored"):
        commit(store, 1, upserts={"k": b"v2"}, positions={"s": {"p": 2}})
    monkeypatch.setattr(PostgresStore, "_finish", real)
    assert make_store().load(P).version == (2 if landed else 1)

    version = commit(store, 1, upserts={"k": b"v2"}, positions={"s": {"p": 2}})
    assert version == (3 if landed else 2)
    cp = make_store().load(P)
    assert (cp.state, cp.positions, cp.version) == ({"k": b"v2"}, {"s": {"p": 2}}, version)
    # Another writer's store is not fooled by that: it is fenced as usual.
    with pytest.raises(ConnectorError, match="another writer"):
        commit(make_store(), version - 1)


def test_errors_never_show_the_password(
    make_store: Callable[..., PostgresStore], schema: str
) -> None:
    with pytest.raises(TransientError) as refused:
        make_store(url="postgresql://postgres:s3cret@127.0.0.1:1/postgres")
    with pytest.raises(ConnectorError) as bad:
        make_store(url="postgresql://postgres:s3cret@127.0.0.1:1/postgres?bogus_option=1")
    for err in (refused, bad):
        assert "s3cret" not in str(err.value)
        assert err.value.__cause__ is None or "s3cret" not in str(err.value.__cause__)
    assert "***" in str(refused.value)


def _commit_a_thousand_10k_blobs(make_store: Callable[..., PostgresStore]) -> tuple[float, float]:
    """Commit 1000 blobs of 10 KiB, overwrite them all, and load them back
    (asserting the load sees the overwrite). Returns the seconds the insert
    and the overwrite commits took."""
    store = make_store()
    positions = {"kafka:t": {f"t:{p}": 1_000_000 + p for p in range(64)}}
    blobs = {f"window/t:{i}": os.urandom(10 * 1024) for i in range(1000)}
    start = time.perf_counter()
    v1 = commit(store, 0, upserts=blobs, positions=positions, watermark_us=1)
    first_s = time.perf_counter() - start
    blobs2 = {k: os.urandom(10 * 1024) for k in blobs}
    start = time.perf_counter()
    commit(store, v1, upserts=blobs2, positions=positions, watermark_us=2)
    update_s = time.perf_counter() - start
    start = time.perf_counter()
    cp = make_store().load(P)
    load_s = time.perf_counter() - start
    assert cp.state == blobs2
    print(
        f"\nstate store, 1000 keys x 10 KiB (10 MiB): insert commit {first_s * 1000:.0f} ms, "
        f"overwrite commit {update_s * 1000:.0f} ms, load {load_s * 1000:.0f} ms"
    )
    return first_s, update_s


def test_a_thousand_10k_blobs_commit_and_load_back(
    make_store: Callable[..., PostgresStore],
) -> None:
    _commit_a_thousand_10k_blobs(make_store)


@pytest.mark.slow
def test_a_thousand_10k_blobs_commit_well_under_a_second(
    make_store: Callable[..., PostgresStore],
) -> None:
    """A wall-clock bound depends on the machine: run on request
    (``make test-slow``), not in CI."""
    first_s, update_s = _commit_a_thousand_10k_blobs(make_store)
    assert first_s < 1.0 and update_s < 1.0
