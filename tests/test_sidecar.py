"""The container sidecar, run as a script: no container engine runs on these
machines, so this test does what the image would.

It reads the ``Dockerfile`` (its ENV, USER, EXPOSE, ENTRYPOINT, HEALTHCHECK)
and the Kubernetes example ``deploy/kubernetes/sidecar.yaml`` (the sluice
container's args, env, probes, grace period, and the pipeline in its
ConfigMap), maps the pod's volumes (``/etc/sluice``, ``/data``) to temporary
folders, and runs the entrypoint with that environment: the readiness probe
answers 200, the HEALTHCHECK command succeeds, the pipeline moves the
quickstart data, the logs are JSON lines, and SIGTERM ends the process with
exit 0 within the grace period. ``make lint`` runs hadolint on the Dockerfile.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[1]


def dockerfile() -> dict[str, Any]:
    parser = DockerfileParser(str(REPO / "Dockerfile"))
    out: dict[str, Any] = {"env": parser.envs, "user": None, "expose": [], "entrypoint": None}
    for item in parser.structure:
        if item["instruction"] == "USER":
            out["user"] = item["value"]
        elif item["instruction"] == "EXPOSE":
            out["expose"] += item["value"].split()
        elif item["instruction"] == "ENTRYPOINT":
            out["entrypoint"] = json.loads(item["value"])
        elif item["instruction"] == "HEALTHCHECK":
            out["healthcheck"] = json.loads(item["value"].split("CMD", 1)[1])
    return out


def manifest() -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The ConfigMap's pipeline, the pod spec, the sluice container."""
    docs = list(yaml.safe_load_all((REPO / "deploy/kubernetes/sidecar.yaml").read_text()))
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["pipeline.toml"]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    sluice = next(c for c in pod["containers"] if c["name"] == "sluice")
    return config, pod, sluice


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_the_image_settings_are_those_of_a_sidecar() -> None:
    image = dockerfile()
    _, pod, sluice = manifest()
    assert image["entrypoint"] == ["flow", "consume"]
    assert image["user"] != "root" and int(image["user"]) == pod["securityContext"]["runAsUser"]
    env = {e["name"]: e["value"] for e in sluice["env"]}
    port = int(env["SLUICE_METRICS_PORT"])
    assert image["expose"] == [str(port)] == [image["env"]["SLUICE_METRICS_PORT"]]
    named = {p["name"]: p["containerPort"] for p in sluice["ports"]}
    assert named[sluice["readinessProbe"]["httpGet"]["port"]] == port
    assert sluice["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sluice["livenessProbe"]["httpGet"]["path"] == "/healthz"
    annotations = manifest_annotations()
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def manifest_annotations() -> dict[str, str]:
    docs = yaml.safe_load_all((REPO / "deploy/kubernetes/sidecar.yaml").read_text())
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    return dict(deployment["spec"]["template"]["metadata"]["annotations"])


def test_the_sidecar_runs_the_pipeline_is_ready_and_drains_on_sigterm(tmp_path: Path) -> None:
    image = dockerfile()
    config, pod, sluice = manifest()
    mounts = {"/etc/sluice": tmp_path / "etc", "/data": tmp_path / "data"}

    def mapped(value: str) -> str:
        for inside, outside in mounts.items():
            value = value.replace(inside, str(outside))
        return value

    for folder in mounts.values():
        folder.mkdir()
    (mounts["/etc/sluice"] / "pipeline.toml").write_text(mapped(config))
    shutil.copytree(REPO / "examples/quickstart/events", mounts["/data"] / "inbox" / "events")

    port = free_port()
    env = {**os.environ, **{k: mapped(v) for k, v in image["env"].items()}}
    env.update({e["name"]: mapped(str(e["value"])) for e in sluice["env"]})
    env["SLUICE_METRICS_PORT"] = str(port)  # a free port here; the pod's is checked above
    entry = image["entrypoint"]
    command = [sys.executable, "-m", "sluice", *entry[1:], *map(mapped, sluice["args"])]
    assert entry[0] == "flow"
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ready = f"http://127.0.0.1:{port}{sluice['readinessProbe']['httpGet']['path']}"
        deadline = time.monotonic() + 60
        while status(ready) != 200:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.2)
        check = [sys.executable if a == "python" else a for a in image["healthcheck"]]
        assert subprocess.run(check, env=env, timeout=10, check=False).returncode == 0

        db = mounts["/data"] / "quickstart.db"

        def rows() -> int:
            try:
                with sqlite3.connect(db) as conn:
                    return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
            except sqlite3.OperationalError:
                return 0

        deadline = time.monotonic() + 60
        while rows() < 1200:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"{rows()} rows"
            time.sleep(0.2)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=pod["terminationGracePeriodSeconds"])
        assert time.monotonic() - started < pod["terminationGracePeriodSeconds"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert rows() == 1200
    assert "Traceback" not in err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert lines and all(line["pipeline"] == "quickstart" for line in lines)
    assert {"ts", "level", "logger", "msg"} <= set(lines[0])
