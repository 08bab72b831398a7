"""``flow doctor``: reach every source, target, lookup and state store of a
pipeline and say, one line each, what works.

A check does what a run does at start, and no more: a target and a state
store are opened as :class:`~sluice.engine.runner.Runner` opens them (so the
target's schema and positions table, the store's migrations, are created as
a first run would), a lookup is loaded once, then everything is closed.
Sources are checked without joining their consumer group (a doctor run
beside a live pipeline must not make it rebalance): a Kafka source asks the
brokers for its topics' metadata; a local folder is listed; any other source
kind is opened and closed (its connector's own connect path). Nothing is
read, written or committed.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sluice.config.redact import redact_text
from sluice.config.spec import PipelineSpec
from sluice.connectors import registry


@dataclass(frozen=True)
class Check:
    """The result of one check."""

    role: str  # source, target, lookup, state_store
    name: str  # what was checked, as the user knows it
    ok: bool
    detail: str

    def __str__(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return f"{mark} {self.role} {self.name}: {self.detail}"


def check_pipeline(spec: PipelineSpec, timeout_s: float = 10.0) -> list[Check]:
    """Every check of ``spec``, in file order: sources, targets, lookups, state store."""
    jobs: list[tuple[str, str, Callable[[], str]]] = []
    ctx = registry.Context(spec)
    for s in spec.all_sources:
        query = spec.query_of(s)
        jobs.append(("source", f"{s.kind} '{query}'", _source_check(spec, s, ctx, timeout_s)))
    for i, t in enumerate(spec.all_targets):
        jobs.append(("target", _target_name(t), _target_check(t, ctx, i)))
    lookups = spec.transform.lookups if spec.transform is not None else {}
    for name, lookup in lookups.items():
        jobs.append(("lookup", f"{lookup.kind} '{name}'", _lookup_check(lookup)))
    if spec.state_store is not None:
        jobs.append(("state_store", spec.state_store.kind, _store_check(spec)))
    return [_run(role, name, job, timeout_s) for role, name, job in jobs]


def _run(role: str, name: str, job: Callable[[], str], timeout_s: float) -> Check:
    # A thread per check, abandoned on timeout: a driver stuck in connect
    # cannot be interrupted, and the process exits when doctor is done.
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sluice-doctor")
    future = pool.submit(job)
    try:
        return Check(role, name, True, future.result(timeout=timeout_s))
    except concurrent.futures.TimeoutError:
        return Check(role, name, False, f"no answer within {timeout_s:g}s")
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return Check(role, name, False, redact_text(first))
    finally:
        pool.shutdown(wait=False)


def _target_name(t: Any) -> str:
    table = getattr(t, "table", None)
    name = getattr(table, "name", None) if table is not None else None
    return f"{t.kind} '{name}'" if name else str(t.kind)


def _source_check(
    spec: PipelineSpec, source: Any, ctx: registry.Context, timeout_s: float
) -> Callable[[], str]:
    query = spec.query_of(source)
    if hasattr(source, "bootstrap_servers"):  # the Kafka wire protocol
        return lambda: _kafka_topics(source, query, timeout_s)
    if source.kind == "object_store_local":
        return lambda: _local_folder(os.path.join(source.path, query))

    def open_close() -> str:
        built = registry.build_source(source, ctx)
        try:
            built.open(None)
        finally:
            built.close()
        return "connected"

    return open_close


def _kafka_topics(source: Any, query: str, timeout_s: float) -> str:
    import confluent_kafka as ck
    from confluent_kafka.admin import AdminClient

    from sluice.connectors.kafka.source import client_config

    conf = client_config(source)
    conf["socket.timeout.ms"] = max(1000, int(timeout_s * 1000))
    conf["log_level"] = 0  # librdkafka's own stderr lines: the one-line result says it
    admin = AdminClient(conf)
    try:
        # Inside the check's own timeout, so a down broker says so by name.
        metadata = admin.list_topics(timeout=max(0.5, timeout_s * 0.8))
    except ck.KafkaException as exc:
        raise RuntimeError(f"brokers {source.bootstrap_servers} unreachable: {exc}") from None
    topics = [t.strip() for t in query.split(",") if t.strip()]
    missing = [t for t in topics if t not in metadata.topics]
    if missing:
        raise RuntimeError(
            f"brokers {source.bootstrap_servers} answer, but topic(s) {', '.join(missing)} "
            "do not exist"
        )
    parts = sum(len(metadata.topics[t].partitions) for t in topics)
    return f"brokers {source.bootstrap_servers} answer; {parts} partition(s)"


def _local_folder(path: str) -> str:
    if not os.path.isdir(path):
        raise RuntimeError(f"folder {path} does not exist")
    files = sum(len(names) for _, _, names in os.walk(path))
    return f"folder {path} holds {files} file(s)"


def _target_check(target: Any, ctx: registry.Context, index: int) -> Callable[[], str]:
    def open_close() -> str:
        built = registry.build_target(target, ctx, index)
        try:
            built.open()
        finally:
            built.close()
        return f"opened {built.id}"

    return open_close


def _lookup_check(lookup: Any) -> Callable[[], str]:
    def load() -> str:
        from sluice.engine.lookups import load as load_lookup

        table = load_lookup(lookup)
        return f"loaded {table.num_rows} row(s)"

    return load


def _store_check(spec: PipelineSpec) -> Callable[[], str]:
    def open_close() -> str:
        from sluice.state import build_store

        store = build_store(spec.state_store)
        if store is None:  # pragma: no cover - guarded by the caller
            return "none"
        try:
            store.open()
        finally:
            store.close()
        return "opened (schema migrated)"

    return open_close
