"""Metrics sinks (``--metrics URL``): Prometheus scraped over HTTP, OTLP
received by a local collector stand-in (OTLP/HTTP and OTLP/gRPC, the
protobuf requests decoded), and the in-process ones."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import socket
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from sluice.errors import ConfigError
from sluice.jobs.notify import RunRecord
from sluice.jobs.sinks import (
    MemorySink,
    NullSink,
    OtlpSink,
    PrometheusSink,
    StdoutSink,
    build_sink,
    memory_sink,
)

T0 = dt.datetime(2026, 3, 29, 1, 0, tzinfo=dt.UTC)


def _runs(job: str) -> list[RunRecord]:
    """Three runs of ``job``: a failure, then a success of 120 rows, then a skip."""
    return [
        RunRecord(job, "r1", "failed", 1, T0, 0.2, 0, workflow="nightly"),
        RunRecord(job, "r2", "success", 2, T0 + dt.timedelta(minutes=5), 42.0, 120),
        RunRecord(job, "r3", "skipped", 1, T0 + dt.timedelta(days=1), 0.0, 0),
    ]


# -- in-process sinks -----------------------------------------------------------------


def test_null_stdout_and_memory_sinks() -> None:
    assert isinstance(build_sink("null://"), NullSink)
    assert isinstance(build_sink("stdout://"), StdoutSink)
    out = io.StringIO()
    StdoutSink(out).record(_runs("daily_sales")[1])
    assert out.getvalue() == (
        "2026-03-29T01:05:00Z RUN job=daily_sales status=success attempt=2 rows=120 "
        "duration_s=42.000 run_id=r2\n"
    )

    name = f"t{uuid.uuid4().hex[:8]}"
    sink = build_sink(f"memory://{name}")
    assert isinstance(sink, MemorySink)
    assert build_sink(f"memory://{name}") is sink is memory_sink(name)
    for run in _runs("daily_sales"):
        sink.record(run)
    sink.close()
    assert memory_sink(name).closed
    assert memory_sink(name).counts() == {
        ("daily_sales", "failed"): 1,
        ("daily_sales", "success"): 1,
        ("daily_sales", "skipped"): 1,
    }
    assert memory_sink(name).rows("daily_sales") == 120
    assert [r.run_id for r in memory_sink(name).runs] == ["r1", "r2", "r3"]


# -- Prometheus ---------------------------------------------------------------------


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_prometheus_sink_is_scraped_over_http() -> None:
    job = f"job_{uuid.uuid4().hex[:8]}"
    sink = build_sink("prometheus://127.0.0.1:0")
    assert isinstance(sink, PrometheusSink) and sink.port
    for run in _runs(job):
        sink.record(run)
    got = _scrape(sink.port)

    def at(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted({"job": job, **labels}.items())))]

    assert at("sluice_job_runs_total", status="failed") == 1
    assert at("sluice_job_runs_total", status="success") == 1
    assert at("sluice_job_runs_total", status="skipped") == 1
    assert at("sluice_job_rows_total") == 120
    assert at("sluice_job_run_duration_seconds_count", status="success") == 1
    assert at("sluice_job_run_duration_seconds_sum", status="success") == 42.0
    assert at("sluice_job_run_duration_seconds_bucket", status="success", le="60.0") == 1
    assert at("sluice_job_run_duration_seconds_bucket", status="success", le="30.0") == 0
    assert at("sluice_job_last_attempt") == 1
    assert (
        at("sluice_job_last_success_timestamp_seconds")
        == (T0 + dt.timedelta(minutes=5)).timestamp()
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/readyz", timeout=5) as response:
        assert response.status == 200

    sink.close()
    with pytest.raises(urllib.error.URLError):
        _scrape(sink.port)


def test_prometheus_without_a_port_records_without_serving() -> None:
    from sluice.engine.metrics import REGISTRY

    job = f"job_{uuid.uuid4().hex[:8]}"
    sink = build_sink("prometheus://")
    assert isinstance(sink, PrometheusSink) and sink.port is None
    sink.record(_runs(job)[1])
    sink.close()
    labels = {"job": job, "status": "success"}
    assert REGISTRY.get_sample_value("sluice_job_runs_total", labels) == 1
    assert REGISTRY.get_sample_value("sluice_job_rows_total", {"job": job}) == 120


def test_prometheus_on_a_taken_port_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ConfigError, match=rf"--metrics: prometheus://127.0.0.1:{port}: cannot serve"
        ):
            build_sink(f"prometheus://127.0.0.1:{port}")


# -- OTLP ---------------------------------------------------------------------------


def _points(requests: list[bytes]) -> dict[str, Any]:
    """The data points of the last export (cumulative: it holds everything),
    by metric name, then by sorted attributes; and the resource's attributes."""
    assert requests, "the collector received no export"
    request = metrics_service_pb2.ExportMetricsServiceRequest.FromString(requests[-1])
    out: dict[str, Any] = {}
    for rm in request.resource_metrics:
        out["resource"] = {a.key: a.value.string_value for a in rm.resource.attributes}
        for sm in rm.scope_metrics:
            assert sm.scope.name == "sluice.jobs"
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                points = getattr(metric, kind).data_points
                out[metric.name] = {
                    tuple(sorted((a.key, a.value.string_value) for a in p.attributes)): p
                    for p in points
                }
                out[f"{metric.name}:unit"] = metric.unit
    return out


def _assert_received(requests: list[bytes], job: str) -> None:
    got = _points(requests)
    assert got["resource"]["service.name"] == "sluice-test"
    failed = (("job", job), ("status", "failed"), ("workflow", "nightly"))
    success = (("job", job), ("status", "success"))
    skipped = (("job", job), ("status", "skipped"))
    runs = got["sluice.job.runs"]
    assert {k: p.as_int for k, p in runs.items()} == {failed: 1, success: 1, skipped: 1}
    assert got["sluice.job.rows"][success].as_int == 120
    duration = got["sluice.job.duration"][success]
    assert got["sluice.job.duration:unit"] == "s"
    assert (duration.count, duration.sum) == (1, 42.0)
    assert list(duration.explicit_bounds) == [0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600]
    assert got["sluice.job.duration"][failed].sum == pytest.approx(0.2)


@pytest.fixture
def otlp_http() -> Iterator[tuple[int, list[bytes]]]:
    received: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            assert self.path == "/v1/metrics"
            assert self.headers["Content-Type"] == "application/x-protobuf"
            received.append(body)
            answer = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield int(server.server_address[1]), received
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_otlp_http_sink_exports_to_a_collector(otlp_http: tuple[int, list[bytes]]) -> None:
    port, received = otlp_http
    job = f"job_{uuid.uuid4().hex[:8]}"
    sink = build_sink(f"otlp+http://127.0.0.1:{port}?service_name=sluice-test")
    assert isinstance(sink, OtlpSink)
    for run in _runs(job):
        sink.record(run)
    assert received == []  # nothing leaves before the interval or close
    sink.close()
    _assert_received(received, job)
    sink.close()  # idempotent


class _Collector(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method name
        self.received.append(request.SerializeToString())
        return metrics_service_pb2.ExportMetricsServiceResponse()


def test_otlp_grpc_sink_exports_to_a_collector() -> None:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        job = f"job_{uuid.uuid4().hex[:8]}"
        sink = build_sink(f"otlp://127.0.0.1:{port}?service_name=sluice-test")
        assert isinstance(sink, OtlpSink)
        for run in _runs(job):
            sink.record(run)
        sink.close()
        _assert_received(collector.received, job)
    finally:
        server.stop(grace=None)


# -- bad URLs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("statsd://host:8125", "unknown metrics scheme 'statsd://': expected one of null://"),
        ("prometheus", "not a metrics URL"),
        ("prometheus://:notaport", "the port is not a number"),
        ("prometheus://host", "a host needs a port"),
        ("prometheus://:9100/metrics", "expected prometheus://:PORT"),
        ("null://x", "null:// takes nothing"),
        ("memory://x?y=1", "expected memory://"),
        ("otlp://", "no collector host"),
        ("otlp://c:4317?interval_secs=soon", "interval_secs='soon'"),
        ("otlp://c:4317?interval_secs=0", "interval_secs must be > 0"),
        ("otlp://c:4317?tls=maybe", "tls='maybe'"),
        ("otlp://c:4317?headers=x", "unknown query parameter 'headers'"),
        ("otlp+grpc://c:4317/v1/metrics", "takes no path"),
        ("otlp+http://u:hunter2@c:4318?tls=maybe", "otlp+http://u:***@c:4318?tls=maybe: tls="),
    ],
)
def test_bad_urls_are_config_errors_naming_the_url(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_sink(url)
    assert str(caught.value).startswith("--metrics: ")
    assert expected in str(caught.value)
    assert "hunter2" not in str(caught.value)
