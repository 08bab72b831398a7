"""The Grafana dashboard and the Prometheus alert rules use only what sluice exports.

Metric names and label names are taken from the registry the code fills
(src/sluice/engine/metrics.py), not from a list kept by hand; a renamed
metric fails here until the dashboard and the rules follow it. The last test
scrapes a real run's /metrics for the build info and the per-target latency.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from sluice.engine import metrics as m

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "observability"

# PromQL words that look like names: functions, keywords, Grafana variables.
_NAME = re.compile(r"\b(sluice_[a-z_]+)\b")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"(sluice_[a-z_]+)\{([^}]*)\}")


def exported() -> dict[str, set[str]]:
    """Every series name the code exports -> its label names."""
    out: dict[str, set[str]] = {}
    for value in vars(m).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        labels = set(value._labelnames)
        for metric in value.describe():
            suffixes = {
                "counter": ["_total"],
                "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""],
            }[metric.type]
            for suffix in suffixes:
                out[metric.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def check_expr(expr: str, names: dict[str, set[str]]) -> list[str]:
    """Problems of one PromQL expression: unknown metrics, unknown labels."""
    used = set(_NAME.findall(expr))
    problems = [f"unknown metric {n}" for n in sorted(used - set(names))]
    known = set().union(*(names[n] for n in used if n in names))
    for group in _BY.findall(expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            if label not in known:
                problems.append(f"label {label} is on none of {sorted(used)}")
    for name, matchers in _SELECTOR.findall(expr):
        for matcher in filter(None, (x.strip() for x in matchers.split(","))):
            label = re.split(r"[=!~]", matcher, maxsplit=1)[0].strip()
            if name in names and label not in names[name]:
                problems.append(f"{name} has no label {label}")
    return problems


def test_the_checker_catches_a_wrong_name() -> None:
    names = exported()
    assert check_expr("rate(sluice_rows_read_total[5m])", names) == [
        "unknown metric sluice_rows_read_total"
    ]
    assert check_expr("sum by (topic) (sluice_consumer_lag_messages)", names) == [
        "label topic is on none of ['sluice_consumer_lag_messages']"
    ]
    assert check_expr('sluice_up{target="x"}', names) == ["sluice_up has no label target"]


def test_the_alert_rules_use_only_exported_metrics() -> None:
    doc = yaml.safe_load((OBS / "prometheus-alerts.yml").read_text())
    names = exported()
    rules = [r for g in doc["groups"] for r in g["rules"]]
    alerts = {r["alert"] for r in rules}
    # The list: lag growing, no progress, restarts, DLQ writes, checkpoints.
    assert {
        "SluiceConsumerLagGrowing",
        "SluiceNoProgress",
        "SluiceRestarting",
        "SluiceDeadLetters",
        "SluiceCheckpointsStalled",
    } <= alerts
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert _NAME.search(rule["expr"]), rule["alert"]
        assert check_expr(rule["expr"], names) == [], rule["alert"]


def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        for key in ("query", "definition"):
            if isinstance(node.get(key), str) and "sluice_" in node[key]:
                found.append(node[key])
        return found + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_the_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads((OBS / "grafana-dashboard.json").read_text())
    names = exported()
    exprs = _exprs(dashboard)
    assert len(exprs) >= 12
    for expr in exprs:
        assert check_expr(expr, names) == [], expr
    shown = {n for e in exprs for n in _NAME.findall(e)}
    for needed in (
        "sluice_rows_consumed_total",
        "sluice_target_rows_written_total",
        "sluice_consumer_lag_messages",
        "sluice_target_write_duration_seconds_bucket",
        "sluice_checkpoints_total",
        "sluice_restarts_total",
        "sluice_dlq_writes_total",
        "sluice_build_info",
    ):
        assert needed in shown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_expose_build_info_and_per_target_write_latency(tmp_path: Path) -> None:
    from sluice import __version__

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    port = _free_port()
    target = f"sqlite:{tmp_path / 'quickstart.db'}:events"
    written = f'sluice_target_rows_written_total{{pipeline="quickstart",target="{target}"}} 1200.0'
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sluice",
            "consume",
            str(tmp_path / "configs" / "quickstart.toml"),
            "--metrics-port",
            str(port),
        ],
        cwd=tmp_path,  # the file source's checkpoints (.sluice-state) land here
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        body = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    body = r.read().decode()
            except OSError:
                body = ""
            if written in body:
                break
            time.sleep(0.2)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert 'sluice_build_info{python_version="' in body
    assert f'version="{__version__}"' in body
    assert written in body
    count = re.search(
        rf'sluice_target_write_duration_seconds_count\{{pipeline="quickstart",'
        rf'target="{re.escape(target)}"\}} (\d+)',
        body,
    )
    assert count is not None and int(count.group(1)) >= 1
