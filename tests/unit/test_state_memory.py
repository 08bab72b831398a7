"""The in-memory state store, the shared commit contract, and build_store (no network)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from sluice.config.spec import InMemoryStateStore, PostgresStateStore
from sluice.errors import ConnectorError
from sluice.state import Checkpoint, InMemoryStore, StateStore, build_store

P = "pipe"


def commit(store: StateStore, expected: int | None, **kwargs: Any) -> int:
    args: dict[str, Any] = {"upserts": {}, "deletes": (), "positions": {}, "watermark_us": None}
    args.update(kwargs)
    return store.commit(P, expected_version=expected, **args)


def test_empty_store_loads_version_zero() -> None:
    assert InMemoryStore().load(P) == Checkpoint({}, {}, None, 0)


def test_round_trip_upserts_deletes_and_merged_positions() -> None:
    store = InMemoryStore()
    store.open()
    v1 = commit(
        store,
        0,
        upserts={"window": b"w1", "join/orders:0": b"j0", "join/orders:1": bytearray(b"j1")},
        positions={"kafka:orders": {"orders:0": 10, "orders:1": 7}, "files": {"f": "a.json"}},
        watermark_us=1_000,
    )
    assert v1 == 1
    v2 = commit(
        store,
        1,
        upserts={"window": b"w2"},
        deletes=["join/orders:1", "never-stored"],
        positions={"kafka:orders": {"orders:1": 9}},
        watermark_us=None,  # keeps the stored watermark
    )
    assert v2 == 2
    store.close()
    store.open()
    cp = store.load(P)
    assert cp == Checkpoint(
        state={"window": b"w2", "join/orders:0": b"j0"},
        positions={"kafka:orders": {"orders:0": 10, "orders:1": 9}, "files": {"f": "a.json"}},
        watermark_us=1_000,
        version=2,
    )
    assert all(type(v) is bytes for v in cp.state.values())
    assert store.load("other") == Checkpoint()


def test_load_returns_copies() -> None:
    store = InMemoryStore()
    commit(store, 0, upserts={"k": b"v"}, positions={"s": {"p": 1}})
    cp = store.load(P)
    cp.state["k"] = b"changed"
    cp.positions["s"]["p"] = 99
    assert store.load(P).state == {"k": b"v"}
    assert store.load(P).positions == {"s": {"p": 1}}


def test_fencing_first_commit_wins() -> None:
    store = InMemoryStore()
    commit(store, 0, upserts={"k": b"a"})
    assert store.load(P).version == 1
    assert commit(store, 1, upserts={"k": b"first"}) == 2
    with pytest.raises(
        ConnectorError, match="expected checkpoint version 1, the store holds version 2"
    ):
        commit(store, 1, upserts={"k": b"second"})
    assert store.load(P).state == {"k": b"first"}
    # A fresh pipeline: expected 0 means "nothing stored yet".
    with pytest.raises(ConnectorError, match="another writer"):
        commit(store, 0)
    # expected_version=None skips the check.
    assert commit(store, None, upserts={"k": b"forced"}) == 3


def test_concurrent_commits_exactly_one_wins() -> None:
    store = InMemoryStore()
    results: list[object] = []
    barrier = threading.Barrier(8)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results.append(commit(store, 0, upserts={"k": bytes([i])}))
        except ConnectorError as exc:
            results.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(r for r in results if isinstance(r, int)) == [1]
    assert sum(isinstance(r, ConnectorError) for r in results) == 7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"upserts": {"": b"x"}}, "state key must be a non-empty string"),
        ({"upserts": {"k\x00": b"x"}}, "NUL"),
        ({"upserts": {"k": "text"}}, "must be bytes, got str"),
        ({"upserts": {"k": b"x"}, "deletes": ["k"]}, "both upserted and deleted"),
        ({"positions": {"s": {"p": 1.5}}}, "must be an int or a str, got float"),
        ({"positions": {"s": {"p": True}}}, "must be an int or a str, got bool"),
        ({"positions": {"s": {"p": 2**63}}}, "does not fit in 64 bits"),
        ({"positions": {"": {"p": 1}}}, "source id"),
        ({"watermark_us": 1.0}, "watermark_us must be"),
    ],
)
def test_bad_commit_changes_nothing(kwargs: dict[str, Any], message: str) -> None:
    store = InMemoryStore()
    commit(store, 0, upserts={"a": b"1"}, positions={"s": {"p": 5}}, watermark_us=7)
    before = store.load(P)
    good = {"upserts": {"a": b"2", "b": b"3"}, "positions": {"s": {"p": 6}}}
    with pytest.raises(ConnectorError, match=message):
        commit(store, 1, **{**good, **kwargs})
    assert store.load(P) == before


def test_bad_expected_version_and_pipeline() -> None:
    store = InMemoryStore()
    with pytest.raises(ConnectorError, match="expected_version"):
        commit(store, -1)
    with pytest.raises(ConnectorError, match="pipeline name"):
        store.commit("", {}, (), {}, None, expected_version=0)


def test_build_store() -> None:
    assert build_store(None) is None
    memory = build_store(InMemoryStateStore())
    assert isinstance(memory, InMemoryStore)
    assert isinstance(memory, StateStore)
    from sluice.state.postgres import PostgresStore

    pg = build_store(PostgresStateStore(url="postgresql://u:s3cret@db.invalid/x", schema="st"))
    assert isinstance(pg, PostgresStore)  # built, not connected
    assert isinstance(pg, StateStore)
    assert pg.schema == "st"
    assert "s3cret" not in repr(pg) and "s3cret" not in pg.id
    with pytest.raises(ConnectorError, match="not open"):
        pg.load("p")


def test_migrations_ship_with_the_package() -> None:
    """The SQL files are package data: found through importlib.resources,
    numbered 1..n, and the first creates the three tables."""
    from sluice.state.postgres import migrations

    found = migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert found[0].name == "0001_init"
    for table in ("sluice_checkpoints", "sluice_state", "sluice_offsets"):
        assert f"CREATE TABLE {table}" in found[0].sql
