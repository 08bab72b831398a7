"""Metrics sinks: where ``--metrics URL`` records finished job runs.

=======================================  ===============================================
URL                                      Records
=======================================  ===============================================
``null://``                              nothing (the default)
``stdout://``                            one line per run on stderr
``memory://`` / ``memory://NAME``        in-process lists and counters, for tests; the
                                         same ``NAME`` gives the same sink
                                         (:func:`memory_sink`)
``prometheus://:PORT``                   the ``sluice_job_*`` metrics of
                                         :mod:`sluice.engine.metrics`, served on
                                         ``/metrics`` (``HOST:PORT`` to bind one
                                         address; ``prometheus://`` records without
                                         serving)
``otlp://HOST:PORT``                     OpenTelemetry metrics over OTLP/gRPC (4317);
                                         ``otlp+http://HOST:PORT[/path]`` (and
                                         ``otlp://HOST:4318``, the OTLP/HTTP port) over
                                         OTLP/HTTP protobuf, ``/v1/metrics`` by default;
                                         ``otlp+https://`` and ``?tls=true`` for TLS,
                                         ``?interval_secs=`` between exports (60),
                                         ``?service_name=`` (``sluice``)
=======================================  ===============================================

A sink's :meth:`record` never blocks on the network (OTLP exports from its
own thread, Prometheus is scraped); :meth:`close` flushes, with a bounded
wait, and logs rather than raises when the collector cannot be reached.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Final

from sluice.config.redact import redact_text
from sluice.errors import ConfigError, ConfigProblem, MissingDependencyError
from sluice.jobs.notify import MetricsSink, RunRecord

if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

log = logging.getLogger(__name__)

METRICS_FLAG: Final[str] = "--metrics"
"""What a :class:`ConfigProblem` about a metrics URL names as its "file"."""

SCHEMES: Final[tuple[str, ...]] = (
    "null://",
    "stdout://",
    "memory://",
    "prometheus://",
    "otlp://",
    "otlp+grpc://",
    "otlp+http://",
    "otlp+https://",
)

OTLP_INTERVAL_SECS: Final[float] = 60.0
"""Default time between two OTLP exports: batch runs are minutes apart, and
:meth:`OtlpSink.close` exports what is left when the process ends."""
OTLP_TIMEOUT_SECS: Final[float] = 10.0
"""Longest wait for one OTLP export and for the flush on close."""
OTLP_HTTP_PORT: Final[int] = 4318
OTLP_GRPC_PORT: Final[int] = 4317
DURATION_BUCKETS_SECS: Final[tuple[float, ...]] = (
    0.1,
    0.5,
    1,
    5,
    10,
    30,
    60,
    300,
    900,
    1800,
    3600,
)
"""Histogram bounds of a run's duration: batch jobs take from under a second to an hour."""


def _bad(url: str, message: str) -> ConfigError:
    return ConfigError([ConfigProblem(METRICS_FLAG, "", f"{redact_text(url)}: {message}")])


def _query(url: str, query: str, allowed: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise _bad(url, f"unknown query parameter {key!r} (expected: {known})")
        out[key] = value
    return out


class NullSink:
    """``null://``: records nothing."""

    def record(self, run: RunRecord) -> None:
        """Drop ``run``."""

    def close(self) -> None:
        """Nothing to flush."""


@dataclass(slots=True)
class StdoutSink:
    """``stdout://``: one ``key=value`` line per run on stderr (stdout stays
    the command's own output). ``stream`` is for tests."""

    stream: IO[str] | None = None

    def record(self, run: RunRecord) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        stamp = run.started_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        workflow = f" workflow={run.workflow}" if run.workflow else ""
        stream.write(
            f"{stamp} RUN job={run.job}{workflow} status={run.status} attempt={run.attempt} "
            f"rows={run.rows} duration_s={run.duration_s:.3f} run_id={run.run_id}\n"
        )
        stream.flush()

    def close(self) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        stream.flush()


@dataclass(slots=True)
class MemorySink:
    """``memory://``: everything recorded, kept in the process for tests to read."""

    runs: list[RunRecord] = field(default_factory=list)
    """Every run recorded, in order."""
    closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, run: RunRecord) -> None:
        with self._lock:
            self.runs.append(run)

    def close(self) -> None:
        self.closed = True

    def counts(self) -> Counter[tuple[str, str]]:
        """Runs recorded by ``(job, status)``."""
        with self._lock:
            return Counter((r.job, r.status) for r in self.runs)

    def rows(self, job: str) -> int:
        """Rows recorded for ``job`` over all its runs."""
        with self._lock:
            return sum(r.rows for r in self.runs if r.job == job)


_MEMORY: dict[str, MemorySink] = {}
_MEMORY_LOCK = threading.Lock()


def memory_sink(name: str = "") -> MemorySink:
    """The sink ``memory://NAME`` builds in this process (made on first use),
    so a test can read what a run it started in-process recorded."""
    with _MEMORY_LOCK:
        return _MEMORY.setdefault(name, MemorySink())


class PrometheusSink:
    """``prometheus://[HOST]:PORT``: the ``sluice_job_*`` metrics.

    With a port, ``/metrics`` (and ``/healthz``, ``/readyz`` always ready) is
    served from a daemon thread until :meth:`close`; port 0 picks a free one
    (:attr:`port` says which).
    """

    def __init__(self, host: str, port: int | None) -> None:
        from sluice.engine import metrics as m

        self._m = m
        self._server: ThreadingHTTPServer | None = None
        self.port: int | None = None
        if port is not None:
            ready = m.Health()
            ready.set_ready(True)
            self._server = m.serve(port, host or "0.0.0.0", health=ready)
            self.port = int(self._server.server_address[1])

    def record(self, run: RunRecord) -> None:
        m = self._m
        m.JOB_RUNS.labels(run.job, run.status).inc()
        m.JOB_ROWS.labels(run.job).inc(run.rows)
        m.JOB_RUN_SECONDS.labels(run.job, run.status).observe(run.duration_s)
        m.JOB_LAST_ATTEMPT.labels(run.job).set(run.attempt)
        if run.status == "success":
            m.JOB_LAST_SUCCESS.labels(run.job).set(run.started_at.timestamp())

    def close(self) -> None:
        """Stop serving (the metrics stay in the process registry)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class OtlpSink:
    """``otlp://``: OpenTelemetry metrics through the SDK's periodic reader.

    Instruments (OTel names; a Collector's Prometheus exporter shows them as
    ``sluice_job_runs_total`` and so on): ``sluice.job.runs`` and
    ``sluice.job.rows`` counters and the ``sluice.job.duration`` histogram
    (seconds), with ``job`` and ``status`` attributes (``workflow`` too when
    the job is in one). The provider is private to the sink, never the global
    one.
    """

    def __init__(self, exporter: Any, interval_secs: float, service_name: str) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource

        reader = PeriodicExportingMetricReader(
            exporter,
            export_interval_millis=interval_secs * 1000,
            export_timeout_millis=OTLP_TIMEOUT_SECS * 1000,
        )
        self._provider = MeterProvider(
            metric_readers=[reader], resource=Resource.create({"service.name": service_name})
        )
        meter = self._provider.get_meter("sluice.jobs")
        self._runs = meter.create_counter(
            "sluice.job.runs", unit="{run}", description="Finished job runs, by job and status."
        )
        self._rows = meter.create_counter(
            "sluice.job.rows", unit="{row}", description="Rows job runs wrote to their targets."
        )
        self._duration = meter.create_histogram(
            "sluice.job.duration",
            unit="s",
            description="Wall time of one job run.",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS_SECS),
        )
        self._closed = False

    def record(self, run: RunRecord) -> None:
        attrs = {"job": run.job, "status": run.status}
        if run.workflow:
            attrs["workflow"] = run.workflow
        self._runs.add(1, attrs)
        self._rows.add(run.rows, attrs)
        self._duration.record(run.duration_s, attrs)

    def flush(self) -> bool:
        """Export what is recorded now; False when the collector did not take it in time."""
        return bool(self._provider.force_flush(timeout_millis=int(OTLP_TIMEOUT_SECS * 1000)))

    def close(self) -> None:
        """Export what is left and stop the reader's thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.flush():
            log.warning("otlp metrics sink: the last export did not complete")
        self._provider.shutdown(timeout_millis=OTLP_TIMEOUT_SECS * 1000)


def _otlp(url: str, parts: urllib.parse.SplitResult) -> OtlpSink:
    scheme = parts.scheme.lower()
    if not parts.hostname:
        raise _bad(url, f"no collector host: expected {scheme}://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        raise _bad(url, "the port is not a number in 1..65535") from None
    q = _query(url, parts.query, {"tls", "interval_secs", "service_name"})
    tls_flag = q.get("tls", "false").lower()
    if tls_flag not in {"true", "false"}:
        raise _bad(url, f"tls={q['tls']!r}: expected true or false")
    try:
        interval = float(q.get("interval_secs", OTLP_INTERVAL_SECS))
    except ValueError:
        raise _bad(url, f"interval_secs={q['interval_secs']!r}: expected seconds") from None
    if not interval > 0:
        raise _bad(url, "interval_secs must be > 0")
    http = scheme in {"otlp+http", "otlp+https"} or (scheme == "otlp" and port == OTLP_HTTP_PORT)
    tls = tls_flag == "true" or scheme == "otlp+https"
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    try:
        if http:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as HttpExporter,
            )

            path = parts.path if parts.path not in {"", "/"} else "/v1/metrics"
            endpoint = f"{'https' if tls else 'http'}://{host}:{port or OTLP_HTTP_PORT}{path}"
            exporter: Any = HttpExporter(endpoint=endpoint, timeout=OTLP_TIMEOUT_SECS)
        else:
            if parts.path not in {"", "/"}:
                raise _bad(url, "an OTLP/gRPC endpoint takes no path")
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcExporter,
            )

            exporter = GrpcExporter(
                endpoint=f"{host}:{port or OTLP_GRPC_PORT}",
                insecure=not tls,
                timeout=OTLP_TIMEOUT_SECS,
            )
    except ImportError as exc:
        raise MissingDependencyError(
            f"--metrics {scheme}:// needs the OpenTelemetry exporters ({exc.name} is "
            "missing): pip install 'sluice[otlp]'"
        ) from None
    return OtlpSink(exporter, interval, q.get("service_name") or "sluice")


def build_sink(url: str) -> MetricsSink:
    """The metrics sink ``url`` names (see the module docstring).

    Raises :class:`~sluice.errors.ConfigError` naming the URL (secrets masked)
    and the schemes there are when it is not one of them or lacks what its
    scheme needs; :class:`~sluice.errors.MissingDependencyError` when the
    OpenTelemetry exporter is not installed.
    """
    raw = url.strip()
    if "://" not in raw:
        raise _bad(url, f"not a metrics URL: expected one of {', '.join(SCHEMES)}")
    parts = urllib.parse.urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme in {"null", "stdout"}:
        if parts.netloc or parts.path or parts.query:
            raise _bad(url, f"{scheme}:// takes nothing after the scheme")
        return NullSink() if scheme == "null" else StdoutSink()
    if scheme == "memory":
        if parts.path or parts.query:
            raise _bad(url, "expected memory:// or memory://NAME")
        return memory_sink(parts.netloc)
    if scheme == "prometheus":
        if parts.path not in {"", "/"} or parts.query:
            raise _bad(url, "expected prometheus://:PORT or prometheus://HOST:PORT")
        try:
            port = parts.port
        except ValueError:
            raise _bad(url, "the port is not a number in 0..65535") from None
        if port is None and parts.hostname:
            raise _bad(url, "a host needs a port: prometheus://HOST:PORT")
        try:
            return PrometheusSink(parts.hostname or "", port)
        except OSError as exc:
            raise _bad(url, f"cannot serve /metrics: {exc.strerror or exc}") from None
    if scheme in {"otlp", "otlp+grpc", "otlp+http", "otlp+https"}:
        return _otlp(raw, parts)
    raise _bad(
        url, f"unknown metrics scheme {scheme + '://'!r}: expected one of {', '.join(SCHEMES)}"
    )
