"""Lookup tables for the SQL stage: loaded at start, refreshed in the background.

Each ``[transform.lookups.NAME]`` is read whole (``SELECT * FROM
schema.table``) into Arrow and registered under NAME. With
``refresh_interval_ms`` a daemon thread reloads it on that period and parks
the new table; the SQL stage swaps it in between two batches, so a batch
never sees half a refresh. A failed refresh keeps the old table, counts an
error and logs it; the next period tries again.
"""

from __future__ import annotations

import logging
import threading

import pyarrow as pa

from sluice.config.base import LookupSpec
from sluice.connectors import registry
from sluice.engine import metrics as m
from sluice.errors import ConnectorError, SluiceError

log = logging.getLogger("sluice")


def load(spec: LookupSpec) -> pa.Table:
    """Read one lookup table whole with its connector's loader.

    Any failure is a :class:`ConnectorError`.
    """
    try:
        return registry.load_lookup(spec)
    except SluiceError:
        raise
    except Exception as exc:  # every driver has its own error tree
        raise ConnectorError(f"{spec.kind} lookup {_name(spec)}: {exc}") from exc


class LookupTables:
    """The pipeline's lookup tables, with background refresh."""

    def __init__(self, specs: dict[str, LookupSpec], pipeline: str) -> None:
        self.specs = specs
        self.pipeline = pipeline
        self._pending: dict[str, pa.Table] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def load_all(self) -> dict[str, pa.Table]:
        """Every table, loaded now (at start: a failure stops the pipeline)."""
        tables = {}
        for name, spec in self.specs.items():
            tables[name] = load(spec)
            m.LOOKUP_REFRESHES.labels(self.pipeline, name, "ok").inc()
        return tables

    def start(self) -> None:
        """Start a refresh thread for each lookup with ``refresh_interval_ms``."""
        self._stop.clear()
        for name, spec in self.specs.items():
            if spec.refresh_interval_ms is None:
                continue
            thread = threading.Thread(
                target=self._refresh_loop,
                args=(name, spec),
                name=f"sluice-lookup-{name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop the refresh threads (a load in progress finishes in the background)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=1)
        self._threads.clear()

    def take_updates(self) -> dict[str, pa.Table]:
        """Tables reloaded since the last call, by name (each handed out once)."""
        with self._lock:
            updates, self._pending = self._pending, {}
        return updates

    def _refresh_loop(self, name: str, spec: LookupSpec) -> None:
        interval = (spec.refresh_interval_ms or 0) / 1000
        while not self._stop.wait(interval):
            try:
                table = load(spec)
            except ConnectorError as exc:
                m.LOOKUP_REFRESHES.labels(self.pipeline, name, "error").inc()
                m.ERRORS.labels(self.pipeline, "lookup").inc()
                log.error("lookup %s: refresh failed, keeping the previous table: %s", name, exc)
                continue
            m.LOOKUP_REFRESHES.labels(self.pipeline, name, "ok").inc()
            with self._lock:
                self._pending[name] = table


def _name(spec: LookupSpec) -> str:
    return ".".join(f'"{p}"' for p in (spec.schema, spec.table) if p)
