"""The typed Python API lowers to exactly the spec of the TOML files."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import sluice
from sluice.api import connections
from sluice.config import load_file, load_text
from sluice.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def twins() -> Any:
    spec = importlib.util.spec_from_file_location("twins", ROOT / "examples/python/twins.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def twin_name(path: Path) -> str:
    return path.stem.replace("-", "_").replace(".", "_")


def test_every_config_has_a_python_twin() -> None:
    module = twins()
    missing = [p.name for p in CONFIGS if not hasattr(module, twin_name(p))]
    assert not missing, f"configs without a twin in examples/python/twins.py: {missing}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_the_python_twin_lowers_to_the_files_spec(path: Path) -> None:
    kwargs = getattr(twins(), twin_name(path))()
    assert sluice.pipeline_spec(**kwargs) == load_file(path)


def test_a_connection_refuses_an_unknown_key_naming_the_nearest() -> None:
    with pytest.raises(ConfigError) as err:
        sluice.KafkaConnection(name="k", bootstrap_server="x", groupid="g")
    text = str(err.value)
    assert (
        "bootstrap_server: unknown key for a kafka connection; did you mean 'bootstrap_servers'"
        in text
    )
    assert "groupid: unknown key for a kafka connection; did you mean 'group_id'" in text


def test_an_unknown_kind_names_the_nearest() -> None:
    with pytest.raises(ConfigError, match="unknown kind 'postgress'; did you mean 'postgres'"):
        sluice.Connection("db", kind="postgress", url="x")


def test_repr_never_shows_a_secret() -> None:
    conn = sluice.PostgresConnection(name="w", url="postgresql://admin:SECRET@h/db")
    kafka = sluice.KafkaConnection(name="k", bootstrap_servers="b", sasl_plain_password="SECRET")
    assert "SECRET" not in repr(conn) and "SECRET" not in repr(kafka)
    assert "admin" in repr(conn)


def test_python_arguments_get_the_files_messages() -> None:
    with pytest.raises(ConfigError) as err:
        sluice.pipeline_spec(
            name="p",
            source=sluice.KafkaConnection(name="k", bootstrap_servers="b"),
            source_query="t",
            target=sluice.PostgresConnection(name="w", url="postgresql://h/db"),
            target_table=("public", "t"),
            window=sluice.Window(
                kind="tumbling",
                duraton_ms=60_000,
                aggregations=[sluice.Aggregation(agg="count", as_="n")],
            ),
        )
    text = str(err.value)
    assert "<python:p>: transform.window.duraton_ms: unknown key" in text
    assert "did you mean 'duration_ms'" in text


def test_the_connection_decorator_registers_the_class_body() -> None:
    @sluice.connection
    class warehouse_deco:  # noqa: N801  (the user guide's shape)
        kind = "postgres"
        url = "postgresql://postgres@127.0.0.1:55432/postgres"

    try:
        assert isinstance(warehouse_deco, sluice.Connection)
        assert connections.resolve("warehouse_deco", env={}) is warehouse_deco
        spec = sluice.pipeline_spec(
            name="p",
            source=sluice.KafkaConnection(name="k", bootstrap_servers="b"),
            source_query="t",
            target="warehouse_deco",
            target_table="events",
        )
        target = spec.all_targets[0]
        assert target.url == "postgresql://postgres@127.0.0.1:55432/postgres"  # type: ignore[attr-defined]
    finally:
        connections.unregister_connection("warehouse_deco")


def test_names_resolve_through_env_then_registry_then_files(tmp_path: Path) -> None:
    cwd, home = tmp_path / "work", tmp_path / "home"
    (home / ".sluice").mkdir(parents=True)
    cwd.mkdir()
    (home / ".sluice" / "connections.toml").write_text(
        '[connections.wh]\nurl = "postgresql://user-file/db"\n'
        '[connections.bus]\nkind = "kafka"\nbootstrap_servers = "home:9092"\n'
    )
    (cwd / ".sluice.toml").write_text('[connections.wh]\nurl = "postgresql://local-file/db"\n')
    found = connections.resolve("wh", env={}, cwd=cwd, home=home)
    assert (found.kind, found.keys["url"]) == ("postgres", "postgresql://local-file/db")
    assert connections.resolve("bus", env={}, cwd=cwd, home=home).keys == {
        "bootstrap_servers": "home:9092"
    }
    env = {"SLUICE_DSN_WH": "mysql://root@env/db"}
    assert connections.resolve("wh", env=env, cwd=cwd, home=home).kind == "mysql"
    assert connections.resolve("default", env={"SLUICE_DSN": "sqlite://x.db"}).keys == {
        "path": "x.db"
    }
    with pytest.raises(ConfigError, match=r"unknown connection 'bux'.*did you mean 'bus'"):
        connections.resolve("bux", env={}, cwd=cwd, home=home)


def test_a_pipeline_file_names_a_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".sluice.toml").write_text(
        '[connections.bus]\nkind = "kafka"\nbootstrap_servers = "b:9092"\ngroup_id = "g"\n'
        '[connections.wh]\nkind = "postgres"\nurl = "postgresql://${PGUSER_X:-me}@h/db"\n'
    )
    text = """
pipeline_name = "p"
source_query = "t"
[source]
connection = "bus"
max_batch_rows = 10
[target]
connection = "wh"
[target.table]
name = "events"
[state_store]
kind = "postgres"
connection = "wh"
"""
    spec = load_text(text, "p.toml")
    source, target = spec.all_sources[0], spec.all_targets[0]
    assert (source.bootstrap_servers, source.group_id, source.max_batch_rows) == ("b:9092", "g", 10)  # type: ignore[attr-defined]
    assert target.url == "postgresql://me@h/db"  # type: ignore[attr-defined]
    assert spec.state_store is not None and spec.state_store.url == "postgresql://me@h/db"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as err:
        load_text(text.replace('"wh"', '"whh"', 1), "p.toml")
    assert "p.toml: target.connection: unknown connection 'whh'" in str(err.value)
    assert "did you mean 'wh'" in str(err.value)


def test_a_module_declares_pipelines_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_pipelines_api.py").write_text(
        textwrap.dedent(
            """
            import sluice

            @sluice.connection
            class bus_mod:
                kind = "kafka"
                bootstrap_servers = "b:9092"

            @sluice.streaming_pipeline(
                name="events_to_pg_mod",
                source=bus_mod,
                source_query="events",
                target=sluice.PostgresConnection(name="w", url="postgresql://h/db"),
                target_table=("public", "events"),
            )
            def events_to_pg():
                pass
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        found = sluice.load_module("my_pipelines_api")
        assert list(found) == ["events_to_pg_mod"]
        spec = found["events_to_pg_mod"].spec()
        assert spec.pipeline_name == "events_to_pg_mod" and spec.source_query == "events"
        with pytest.raises(ConfigError, match="cannot import module"):
            sluice.load_module("no_such_module_here")
    finally:
        sys.modules.pop("my_pipelines_api", None)
        connections.unregister_connection("bus_mod")
