"""Every Prometheus metric sluice exports, defined once, and the HTTP endpoint.

Names follow the reference daemon's metrics (user guide, "Prometheus
metrics") with our prefix and the units in the name: ``*_total`` counters,
``*_seconds`` times, labels rather than name prefixes. The same port serves
``/metrics``, ``/healthz`` (the process is alive) and ``/readyz`` (sources
connected and the pipeline is making progress: 503 otherwise).
"""

from __future__ import annotations

import platform
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar, cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)


def _version() -> str:
    """The installed distribution's version (the package's when run from a checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sluice")
    except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
        from sluice import __version__

        return __version__


_P = ["pipeline"]


def _counter(name: str, doc: str, *labels: str) -> Counter:
    """A counter labelled by pipeline, then ``labels``."""
    return Counter(name, doc, [*_P, *labels], registry=REGISTRY)


def _gauge(name: str, doc: str, *labels: str) -> Gauge:
    """A gauge labelled by pipeline, then ``labels``."""
    return Gauge(name, doc, [*_P, *labels], registry=REGISTRY)


ROWS_CONSUMED = _counter("sluice_rows_consumed", "Rows read from the sources (before stages).")
ROWS_WRITTEN = _counter(
    "sluice_rows_written", "Rows written durably to the targets (after stages)."
)
BATCHES = _counter("sluice_batches", "Non-empty batches processed.")
ITERATIONS = _counter("sluice_iterations", "Run-loop iterations, idle ones included.")
IDLE_ITERATIONS = _counter("sluice_idle_iterations", "Iterations whose reads returned nothing.")
ERRORS = _counter("sluice_errors", "Errors surfaced, by kind (transient, decode, fatal).", "kind")
RETRIES = _counter(
    "sluice_write_retries", "Target writes retried after a transient failure.", "target"
)
RESTARTS = _counter("sluice_restarts", "In-process restarts by the supervisor.")
DLQ_WRITES = _counter("sluice_dlq_writes", "Rows written to the dead-letter destination.")
ROWS_DROPPED = _counter("sluice_rows_dropped", "Rows dropped by policy, by reason.", "reason")
SQL_REPLANS = _counter(
    "sluice_sql_replans",
    "Times the SQL stage planned its statement again for a new input or lookup schema.",
)
LOOKUP_REFRESHES = _counter(
    "sluice_lookup_refreshes",
    "Lookup table loads, by lookup and result (ok / error).",
    "lookup",
    "result",
)
COMMITS = _counter("sluice_commits", "Source position commits.", "source")

BATCH_SECONDS = Histogram(
    "sluice_batch_duration_seconds",
    "Time from a batch read to its commit.",
    _P,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
WATERMARK = _gauge("sluice_watermark_seconds", "Global event-time watermark (unix seconds).")
SOURCE_WATERMARK = _gauge(
    "sluice_source_watermark_seconds", "Per-source event-time watermark (unix seconds).", "source"
)
PARTITIONS_PAUSED = _gauge(
    "sluice_partitions_paused",
    "Partitions not fetched because their event time ran ahead (watermark alignment).",
    "source",
)
CONSUMER_LAG = _gauge(
    "sluice_consumer_lag_messages",
    "Messages behind the partition's high watermark.",
    "source",
    "partition",
)
UP = _gauge("sluice_up", "1 while the pipeline runs, 0 while it restarts or stops.")

# Window / join / CDC metrics are defined here too, with the stages that use them.
WINDOWS_EMITTED = _counter("sluice_windows_emitted", "Window results emitted.")
WINDOWS_ACTIVE = _gauge("sluice_windows_active", "Open windows or sessions.")
STATE_GROUPS = _gauge("sluice_state_groups", "Group keys held across open windows.")
LATE_ROWS_DROPPED = _counter(
    "sluice_late_rows_dropped", "Late rows discarded, by policy.", "policy"
)
JOIN_BUFFER_ROWS = _gauge(
    "sluice_join_buffer_rows", "Rows buffered by the stream-stream join, by side.", "side"
)
CHECKPOINTS = _counter(
    "sluice_checkpoints",
    "State store commits (stage state, source positions and watermark in one transaction).",
)
CHECKPOINT_SECONDS = Histogram(
    "sluice_checkpoint_duration_seconds",
    "Time to snapshot the stage state and commit it to the state store.",
    _P,
    registry=REGISTRY,
)
STATE_BYTES = _gauge("sluice_state_bytes", "Size of the stage state at the last checkpoint.")

# Per target: rows and the time of one write + flush (the durable part of a
# batch), so a slow target shows itself among several.
TARGET_ROWS_WRITTEN = _counter(
    "sluice_target_rows_written", "Rows written durably to one target.", "target"
)
TARGET_WRITE_SECONDS = Histogram(
    "sluice_target_write_duration_seconds",
    "Time to write and flush one batch to one target (retries not included).",
    [*_P, "target"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
# Which sluice is running: constant 1, the facts in the labels (the
# Prometheus "info" convention, joinable on instance).
BUILD_INFO = Gauge(
    "sluice_build_info",
    "sluice build: version and Python version in the labels; always 1.",
    ["version", "python_version"],
    registry=REGISTRY,
)
BUILD_INFO.labels(_version(), platform.python_version()).set(1)


class Health:
    """Liveness and readiness, shared by the run loop and the HTTP handler."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = False
        self._reason = "starting"

    def set_ready(self, ready: bool, reason: str = "") -> None:
        """Mark the pipeline ready (or not, saying why)."""
        with self._lock:
            self._ready, self._reason = ready, reason

    def ready(self) -> tuple[bool, str]:
        """Whether ready, and why not."""
        with self._lock:
            return self._ready, self._reason


HEALTH = Health()


class _Handler(BaseHTTPRequestHandler):
    health: ClassVar[Health] = HEALTH

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n")
        elif path == "/readyz":
            ok, reason = self.health.ready()
            self._send(
                200 if ok else 503, (b"ready\n" if ok else f"not ready: {reason}\n".encode())
            )
        else:
            self._send(404, b"not found\n")

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: scrapes are normal operation."""


def serve(port: int, host: str = "0.0.0.0", health: Health = HEALTH) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz on ``port`` from a daemon thread;
    /readyz answers from ``health`` (the streaming pipeline's by default)."""
    handler: type[_Handler] = _Handler
    if health is not HEALTH:
        handler = cast("type[_Handler]", type("_HealthHandler", (_Handler,), {"health": health}))
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="sluice-metrics", daemon=True).start()
    return server


# CDC apply ([transform.cdc]); counted once per event, after the target commits
# (skipped: when the envelopes are decoded).
CDC_CREATES = _counter("sluice_cdc_creates", "CDC create and read (snapshot) events applied.")
CDC_UPDATES = _counter("sluice_cdc_updates", "CDC update events applied.")
CDC_DELETES = _counter("sluice_cdc_deletes", "CDC delete events applied (hard or soft).")
CDC_SKIPPED = _counter(
    "sluice_cdc_skipped",
    "CDC messages that are not row changes: tombstones, undecodable envelopes, markers.",
)
CDC_IDEMPOTENT_SKIPPED = _counter(
    "sluice_cdc_idempotent_skipped",
    "CDC events not newer than the key's last applied change (redeliveries, re-sends).",
)

# Batch jobs (``flow run-due`` / ``flow run`` with ``--metrics prometheus://``,
# recorded by ``sluice.jobs.sinks``): one sample set per finished run.
_J = ["job"]
JOB_RUNS = Counter(
    "sluice_job_runs",
    "Finished job runs, by job and status (success, failed, skipped).",
    [*_J, "status"],
    registry=REGISTRY,
)
JOB_ROWS = Counter(
    "sluice_job_rows", "Rows job runs wrote to their targets, by job.", _J, registry=REGISTRY
)
JOB_RUN_SECONDS = Histogram(
    "sluice_job_run_duration_seconds",
    "Wall time of one job run, by job and status.",
    [*_J, "status"],
    # Batch jobs take from a fraction of a second to an hour.
    buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600),
    registry=REGISTRY,
)
JOB_LAST_ATTEMPT = Gauge(
    "sluice_job_last_attempt",
    "The attempt number of the job's last finished run (1 = first try).",
    _J,
    registry=REGISTRY,
)
JOB_LAST_SUCCESS = Gauge(
    "sluice_job_last_success_timestamp_seconds",
    "When the job's last successful run started (unix seconds).",
    _J,
    registry=REGISTRY,
)
