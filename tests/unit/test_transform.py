"""The SQL stage, UDFs, lookups and on_error, with in-memory sources and targets."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import sluice
from sluice.config import load_text
from sluice.connectors.api import Batch, Position, RawRecord
from sluice.engine import metrics as m
from sluice.engine.lookups import LookupTables
from sluice.engine.runner import Runner, RunOptions
from sluice.engine.stages.sql import SqlStage
from sluice.errors import ConfigError, DecodeError, StageError
from sluice.functions import collect

# -- functions ------------------------------------------------------------------


@sluice.udf(args=["Float64", "Float64"], returns="Float64")
def ratio(a: pa.Array, b: pa.Array) -> pa.Array:
    return pc.divide(a, b)


@sluice.udaf(args=["Float64", "Float64"], state=["Float64", "Float64"], returns="Float64")
class Vwap:
    def __init__(self) -> None:
        self.num = 0.0
        self.den = 0.0

    def update_batch(self, prices: pa.Array, qtys: pa.Array) -> None:
        self.num += pc.sum(pc.multiply(prices, qtys)).as_py() or 0.0
        self.den += pc.sum(qtys).as_py() or 0.0

    def merge_batch(self, nums: pa.Array, dens: pa.Array) -> None:
        self.num += pc.sum(nums).as_py() or 0.0
        self.den += pc.sum(dens).as_py() or 0.0

    def evaluate(self) -> pa.Array:
        if self.den == 0:
            return pa.array([None], pa.float64())
        return pa.array([self.num / self.den], pa.float64())

    def state(self) -> tuple[pa.Array, pa.Array]:
        return pa.array([self.num]), pa.array([self.den])


def _stage(sql: str, **kw: Any) -> SqlStage:
    stage = SqlStage(sql, "unit", **kw)
    stage.open()
    return stage


def test_a_bad_type_name_fails_when_the_decorator_runs() -> None:
    with pytest.raises(ValueError, match=r"udf returns: unknown type 'Float'.*Float64"):
        sluice.udf(args=["Float64"], returns="Float")
    with pytest.raises(ValueError, match=r"udaf state\[0\]: unknown type 'Decimal'"):
        sluice.udaf(args=["Float64"], state=["Decimal"], returns="Float64")


def test_two_functions_with_one_name_are_a_config_error() -> None:
    other = sluice.udf(args=["Float64", "Float64"], returns="Float64", name="ratio")(lambda a, b: a)
    with pytest.raises(ConfigError, match="two functions are named 'ratio'"):
        collect([ratio, other])


def test_udf_modules_register_every_decorated_function(tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "my_udfs.py").write_text(
        "import sluice, pyarrow.compute as pc\n"
        "@sluice.udf(args=['Int64'], returns='Int64')\n"
        "def twice(a):\n    return pc.multiply(a, 2)\n"
        "@sluice.udf(args=['Utf8'], returns='Utf8', name='shout')\n"
        "def upper(s):\n    return pc.utf8_upper(s)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = collect([], ["my_udfs"])
    assert sorted(found) == ["shout", "twice"]
    out = _stage("SELECT twice(a) AS t, shout(s) AS u FROM source", functions=found).process(
        pa.table({"a": [1, 2], "s": ["x", "y"]})
    )
    assert out.to_pydict() == {"t": [2, 4], "u": ["X", "Y"]}


def test_a_missing_udf_module_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        collect([], ["no_such_module_here"], "p.toml")
    assert str(err.value).startswith("p.toml: transform.udf_modules[0]: cannot import")


def test_scalar_udf_and_vwap_udaf_match_plain_arithmetic() -> None:
    stage = _stage(
        "SELECT sym, vwap(price, qty) AS vwap, sum(ratio(price, qty)) AS r "
        "FROM source GROUP BY sym ORDER BY sym",
        functions={"ratio": ratio, "vwap": Vwap},
    )
    data = pa.table(
        {
            "sym": ["a", "a", "b", "b", "b"],
            "price": [10.0, 20.0, 1.0, 2.0, 3.0],
            "qty": [1.0, 3.0, 2.0, 2.0, 4.0],
        }
    )
    out = stage.process(data).to_pydict()
    assert out["sym"] == ["a", "b"]
    assert out["vwap"] == pytest.approx([(10 + 60) / 4, (2 + 4 + 12) / 8])
    assert out["r"] == pytest.approx([10 + 20 / 3, 0.5 + 1 + 0.75])


def test_array_agg_named_struct_builds_a_list_of_structs() -> None:
    stage = _stage(
        "SELECT date_trunc('minute', ts) AS minute, "
        "array_agg(named_struct('strike', strike, 'bid', bid)) AS strikes "
        "FROM source GROUP BY 1"
    )
    ts = pa.array([60_000_000, 61_000_000], pa.timestamp("us", tz="UTC"))
    out = stage.process(pa.table({"ts": ts, "strike": [4500, 4505], "bid": [1.25, 0.75]}))
    assert pa.types.is_list(out.schema.field("strikes").type)
    assert sorted(out["strikes"][0].as_py(), key=lambda d: d["strike"]) == [
        {"strike": 4500, "bid": 1.25},
        {"strike": 4505, "bid": 0.75},
    ]


def test_view_types_come_out_as_plain_strings() -> None:
    out = _stage("SELECT arrow_cast(s, 'Utf8View') AS v FROM source").process(
        pa.table({"s": ["x"]})
    )
    assert out.schema.field("v").type == pa.string()


def test_a_new_input_schema_plans_again_and_is_counted() -> None:
    stage = _stage("SELECT * FROM source")
    before = m.SQL_REPLANS.labels("unit")._value.get()
    stage.process(pa.table({"a": [1]}))
    stage.process(pa.table({"a": [2]}))
    assert m.SQL_REPLANS.labels("unit")._value.get() == before
    out = stage.process(pa.table({"a": [3], "b": ["new"]}))
    assert out.column_names == ["a", "b"]
    assert m.SQL_REPLANS.labels("unit")._value.get() == before + 1


def test_a_sql_error_is_a_stage_error() -> None:
    stage = _stage("SELECT CAST(s AS INT) AS i FROM source")
    with pytest.raises(StageError, match="Cannot cast string 'x'"):
        stage.process(pa.table({"s": ["1", "x"]}))


# -- lookups --------------------------------------------------------------------


def _lookups(text: str) -> LookupTables:
    spec = load_text(
        'pipeline_name = "unit"\nsource_query = "t"\n[source]\nkind = "kafka"\n'
        'bootstrap_servers = "x:1"\n[target]\nkind = "sqlite"\npath = ":memory:"\n'
        '[target.table]\nname = "t"\n[transform]\nsql = "SELECT * FROM source"\n' + text
    )
    assert spec.transform is not None
    return LookupTables(spec.transform.lookups, "unit")


def test_sqlite_and_duckdb_lookups_join_and_refresh(tmp_path: Path) -> None:
    lite = tmp_path / "ref.sqlite"
    with sqlite3.connect(lite) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, country TEXT)")
        conn.executemany("INSERT INTO users VALUES (?, ?)", [(1, "de"), (2, "fr")])
    duck = tmp_path / "ref.duckdb"
    with duckdb.connect(str(duck)) as conn:
        conn.execute("CREATE TABLE tiers (id BIGINT, tier VARCHAR)")
        conn.execute("INSERT INTO tiers VALUES (1, 'gold')")
    lookups = _lookups(
        f'[transform.lookups.users]\nkind = "sqlite"\npath = "{lite}"\ntable = "users"\n'
        f"refresh_interval_ms = 50\n"
        f'[transform.lookups.tiers]\nkind = "duckdb"\npath = "{duck}"\ntable = "tiers"\n'
    )
    stage = _stage(
        "SELECT s.user_id, u.country, t.tier FROM source s "
        "LEFT JOIN users u ON s.user_id = u.id LEFT JOIN tiers t ON s.user_id = t.id "
        "ORDER BY s.user_id",
        lookups=lookups,
    )
    try:
        batch = pa.table({"user_id": [1, 2, 3]})
        assert stage.process(batch).to_pydict() == {
            "user_id": [1, 2, 3],
            "country": ["de", "fr", None],
            "tier": ["gold", None, None],
        }
        with sqlite3.connect(lite) as conn:
            conn.execute("UPDATE users SET country = 'it' WHERE id = 2")
        _eventually(lambda: stage.process(batch)["country"].to_pylist() == ["de", "it", None])
    finally:
        stage.close()


def test_a_failed_refresh_keeps_the_old_table_and_counts(tmp_path: Path) -> None:
    lite = tmp_path / "ref.sqlite"
    with sqlite3.connect(lite) as conn:
        conn.execute("CREATE TABLE users (id INTEGER, country TEXT)")
        conn.execute("INSERT INTO users VALUES (1, 'de')")
    lookups = _lookups(
        f'[transform.lookups.users]\nkind = "sqlite"\npath = "{lite}"\ntable = "users"\n'
        "refresh_interval_ms = 30\n"
    )
    stage = _stage("SELECT u.country FROM source s JOIN users u ON s.id = u.id", lookups=lookups)
    errors = m.LOOKUP_REFRESHES.labels("unit", "users", "error")
    before = errors._value.get()
    try:
        with sqlite3.connect(lite) as conn:
            conn.execute("DROP TABLE users")
        _eventually(lambda: errors._value.get() > before)
        assert stage.process(pa.table({"id": [1]}))["country"].to_pylist() == ["de"]
    finally:
        stage.close()


def _eventually(check: Any, timeout_s: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# -- on_error through the run loop ---------------------------------------------


@dataclass
class _Raw:
    payloads: list[bytes]
    first_offset: int

    def __len__(self) -> int:
        return len(self.payloads)

    def record(self, index: int) -> RawRecord:
        return RawRecord(
            "mem:0", self.first_offset + index, 1_700_000_000_000, None, self.payloads[index]
        )

    def where(self, index: int) -> str:
        return f"partition mem:0 offset {self.first_offset + index}"

    def span(self) -> str:
        return f"partition mem:0 offsets {self.first_offset}-{self.first_offset + len(self) - 1}"


@dataclass
class RawSource:
    """Batches of JSON payloads, decoded as the Kafka source does (bad ones by index)."""

    batches: list[list[bytes]]
    id: str = "mem"
    committed: list[Position] = field(default_factory=list)
    crash_on_commit: bool = False
    connected: bool = True
    _next: int = 0
    _offset: int = 0

    def open(self, resume: Position | None) -> None:
        pass

    def read(self, timeout_s: float) -> Batch | None:
        if self._next >= len(self.batches):
            return None
        payloads = self.batches[self._next]
        self._next += 1
        rows, bad, good = [], [], []
        for i, p in enumerate(payloads):
            try:
                good.append(json.loads(p))
                rows.append(i)
            except json.JSONDecodeError as exc:
                bad.append((i, f"invalid JSON: {exc}"))
        raw = _Raw(payloads, self._offset)
        self._offset += len(payloads)
        return Batch(
            self.id,
            pa.Table.from_pylist(good),
            {"mem:0": self._offset},
            raw=raw,
            bad=tuple(bad),
            rows=tuple(rows),
        )

    def commit(self, position: Position) -> None:
        if self.crash_on_commit:
            raise KeyboardInterrupt("crash between the dead-letter write and the commit")
        self.committed.append(position)

    def close(self) -> None:
        pass


@dataclass
class ListTarget:
    id: str = "list"
    rows: list[dict[str, Any]] = field(default_factory=list)

    def open(self) -> None:
        pass

    def write(self, data: pa.Table) -> None:
        self.rows.extend(data.to_pylist())

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _pipeline(on_error: str, sql: str, dlq_path: Path | None = None) -> Any:
    dlq = f'dlq_store = "{dlq_path}"\n' if dlq_path else ""
    return load_text(
        f'pipeline_name = "unit-{on_error}"\nsource_query = "mem"\nidle_pause_ms = 1\n{dlq}'
        '[source]\nkind = "kafka"\nbootstrap_servers = "x:1"\nmax_batch_wait_ms = 1\n'
        '[target]\nkind = "sqlite"\npath = ":memory:"\n[target.table]\nname = "t"\n'
        f'[transform]\non_error = "{on_error}"\nsql = "{sql}"\n'
    )


def _run_loop(spec: Any, source: RawSource, target: ListTarget) -> None:
    runner = Runner(
        spec,
        asyncio.Event(),
        RunOptions(stop_after_idle_ms=0),
        sources=[source],
        targets=[target],
    )
    asyncio.run(runner.run())


GOOD = [b'{"x": 1}', b'{"x": 2}']
POISON = [b'{"x": 3}', b"{not json", b'{"x": 4}']
CAST_FAILS = [b'{"x": "oops"}']  # a string: CAST(x AS INT) fails for the whole batch
SQL = "SELECT CAST(x AS INT) AS x FROM source"


def test_fail_names_the_source_and_offset_of_a_bad_message() -> None:
    source = RawSource([GOOD, POISON])
    target = ListTarget()
    with pytest.raises(
        DecodeError, match=r"source mem: cannot decode message at partition mem:0 offset 3"
    ):
        _run_loop(_pipeline("fail", SQL), source, target)
    assert source.committed == [{"mem:0": 2}]


def test_fail_names_the_offset_range_of_a_batch_that_fails_in_sql() -> None:
    source = RawSource([GOOD, CAST_FAILS])
    with pytest.raises(StageError, match=r"Cannot cast.*source mem partition mem:0 offsets 2-2"):
        _run_loop(_pipeline("fail", SQL), source, ListTarget())
    assert source.committed == [{"mem:0": 2}]


def test_drop_keeps_the_rest_and_counts_what_it_dropped() -> None:
    spec = _pipeline("drop", SQL)
    decode = m.ROWS_DROPPED.labels(spec.pipeline_name, "decode")
    transform = m.ROWS_DROPPED.labels(spec.pipeline_name, "transform")
    d0, t0 = decode._value.get(), transform._value.get()
    source = RawSource([GOOD, POISON, CAST_FAILS, [b'{"x": 5}']])
    target = ListTarget()
    _run_loop(spec, source, target)
    assert [r["x"] for r in target.rows] == [1, 2, 3, 4, 5]
    assert decode._value.get() - d0 == 1
    assert transform._value.get() - t0 == 1
    assert source.committed[-1] == {"mem:0": 7}


def test_dlq_writes_raw_payloads_before_the_commit(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    spec = _pipeline("dlq", SQL, path)
    writes = m.DLQ_WRITES.labels(spec.pipeline_name)
    w0 = writes._value.get()
    source = RawSource([GOOD, POISON, CAST_FAILS])
    target = ListTarget()
    _run_loop(spec, source, target)
    letters = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(d["stage"], d["offset"], d["payload"]) for d in letters] == [
        ("decode", 3, "{not json"),
        ("transform", 5, '{"x": "oops"}'),
    ]
    assert letters[0]["error"].startswith("invalid JSON")
    assert "Cannot cast" in letters[1]["error"]
    assert {d["pipeline"] for d in letters} == {"unit-dlq"}
    assert letters[0]["timestamp_ms"] == 1_700_000_000_000
    assert [r["x"] for r in target.rows] == [1, 2, 3, 4]
    assert writes._value.get() - w0 == 2
    assert source.committed[-1] == {"mem:0": 6}


def test_a_crash_between_dlq_write_and_commit_redelivers(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    spec = _pipeline("dlq", SQL, path)
    crashing = RawSource([POISON], crash_on_commit=True)
    with pytest.raises(KeyboardInterrupt):
        _run_loop(spec, crashing, ListTarget())
    assert crashing.committed == []
    # The restarted process reads the same, uncommitted batch again.
    again = RawSource([POISON])
    target = ListTarget()
    _run_loop(spec, again, target)
    letters = [json.loads(line) for line in path.read_text().splitlines()]
    assert [d["payload"] for d in letters] == ["{not json", "{not json"]
    assert [r["x"] for r in target.rows] == [3, 4]
    assert again.committed == [{"mem:0": 3}]


def test_dlq_max_attempts_retries_a_failing_batch_before_dead_lettering(tmp_path: Path) -> None:
    calls: list[int] = []

    @sluice.udf(args=["Int64"], returns="Int64", name="flaky", volatility="volatile")
    def flaky(a: pa.Array) -> pa.Array:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("upstream service unavailable")
        return a

    path = tmp_path / "dead.jsonl"
    text = (
        f'pipeline_name = "unit-retry"\nsource_query = "mem"\nidle_pause_ms = 1\n'
        f'dlq_store = "{path}"\ndlq_max_attempts = 3\n'
        '[source]\nkind = "kafka"\nbootstrap_servers = "x:1"\nmax_batch_wait_ms = 1\n'
        '[target]\nkind = "sqlite"\npath = ":memory:"\n[target.table]\nname = "t"\n'
        '[transform]\non_error = "dlq"\nsql = "SELECT flaky(x) AS x FROM source"\n'
    )
    spec = load_text(text)
    source, target = RawSource([GOOD]), ListTarget()
    runner = Runner(
        spec, asyncio.Event(), RunOptions(stop_after_idle_ms=0), [source], [target], [flaky]
    )
    asyncio.run(runner.run())
    assert len(calls) == 3
    assert [r["x"] for r in target.rows] == [1, 2]
    assert not path.exists()
