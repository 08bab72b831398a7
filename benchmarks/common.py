"""Helpers shared by the benchmarks: process accounting, engine metrics, machine
facts, results.

Process accounting reads ``/proc`` (Linux only) so it needs no extra package:

* CPU: ``utime + stime`` of the process and every live descendant, plus the
  ``cutime + cstime`` of children they already reaped.
* Memory: ``VmHWM`` (peak resident set) of the process tree, and the
  ``ru_maxrss`` that :func:`os.wait4` reports when the process is reaped.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

#: Where ``benchmarks/setup_reference.sh`` installs the reference engine.
REFERENCE_VENV = Path(os.environ.get("EMATIX_VENV", "/opt/ematix"))
REFERENCE_PYTHON = REFERENCE_VENV / "bin" / "python"

_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the ``(comm)`` field, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants so far."""
    ticks = 0
    for p in [pid, *descendants(pid)]:
        fields = _stat_fields(p)
        if fields is not None:
            # utime, stime, cutime, cstime are stat fields 14-17 (1-based).
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / _CLK_TCK


def tree_peak_rss_bytes(pid: int) -> int:
    """Sum of ``VmHWM`` over ``pid`` and its live descendants (0 once it exited)."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
                break
    return total


# ---------------------------------------------------------------- processes


@dataclass
class Sample:
    """One poll of a monitored process."""

    t: float  # seconds since the process started
    cpu_s: float
    peak_rss_bytes: int


@dataclass
class MonitoredProcess:
    """A subprocess whose CPU and memory are sampled until it is reaped.

    It is reaped with :func:`os.wait4`, which returns that process's own
    resource usage (including descendants it waited for), so the final
    figures do not depend on how often it was sampled.
    """

    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] = field(init=False)
    started_at: float = field(init=False)
    returncode: int | None = field(init=False, default=None)
    ended_at: float | None = field(init=False, default=None)
    final_cpu_s: float | None = field(init=False, default=None)
    final_maxrss_bytes: int | None = field(init=False, default=None)
    last: Sample | None = field(init=False, default=None)
    signals_sent: list[str] = field(init=False, default_factory=list)
    _log: IO[bytes] = field(init=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            list(self.argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(self.env) if self.env is not None else None,
            cwd=self.cwd,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def sample(self) -> Sample | None:
        """CPU and peak RSS so far; None once the process has been reaped."""
        if self.returncode is not None:
            return None
        s = Sample(self.elapsed(), tree_cpu_seconds(self.pid), tree_peak_rss_bytes(self.pid))
        # VmHWM disappears when the process exits but is not yet reaped: keep the last.
        if self.last is not None and s.peak_rss_bytes < self.last.peak_rss_bytes:
            s.peak_rss_bytes = self.last.peak_rss_bytes
        self.last = s
        return s

    def reap(self, block: bool = False) -> bool:
        """Reap the process if it exited (waiting for it with ``block``); True once reaped."""
        if self.returncode is not None:
            return True
        pid, status, usage = os.wait4(self.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        self.ended_at = time.monotonic()
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # so Popen never waits for it again
        self.final_cpu_s = usage.ru_utime + usage.ru_stime
        self.final_maxrss_bytes = usage.ru_maxrss * 1024  # KiB on Linux
        self._log.close()
        return True

    def wait(self, timeout_s: float, poll_s: float = 0.1) -> bool:
        """Wait up to ``timeout_s`` for the process to exit on its own."""
        deadline = time.monotonic() + timeout_s
        while not self.reap():
            if time.monotonic() >= deadline:
                return False
            self.sample()
            time.sleep(poll_s)
        return True

    def stop(self, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; returns once reaped."""
        if self.reap():
            return
        self.sample()
        self._signal(signal.SIGTERM)
        if not self.wait(grace_s):
            self._signal(signal.SIGKILL)
            self.reap(block=True)

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return
        self.signals_sent.append(f"{sig.name} at {self.elapsed():.1f} s")

    def peak_rss_bytes(self) -> int:
        """Best known peak RSS: the reaped ``ru_maxrss`` or the polled ``VmHWM``."""
        polled = self.last.peak_rss_bytes if self.last else 0
        return max(polled, self.final_maxrss_bytes or 0)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------- metrics


def scrape_metrics(port: int, prefix: str, names: Collection[str]) -> dict[str, float] | None:
    """The Prometheus metrics ``<prefix><name>`` for each of ``names`` that an
    engine serves on ``port``, each summed over its label sets; None when it
    does not answer. A labelled counter has no sample until it first moves."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0].removeprefix(prefix)
        if name in names:
            found[name] = found.get(name, 0.0) + float(value)
    return found


# ---------------------------------------------------------------- facts


def utc_date() -> str:
    """Today in UTC, as ``date -u +%F`` prints it."""
    return datetime.now(UTC).strftime("%F")


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_capture(argv: Sequence[str], timeout_s: float = 30) -> str | None:
    try:
        out = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, check=True, cwd=REPO
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def package_versions(python: str | Path, names: Iterable[str]) -> dict[str, str | None]:
    """Installed versions of ``names`` in the environment of ``python``."""
    code = (
        "import json, sys\n"
        "from importlib import metadata\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try:\n"
        "        out[n] = metadata.version(n)\n"
        "    except metadata.PackageNotFoundError:\n"
        "        out[n] = None\n"
        "print(json.dumps(out))\n"
    )
    names = list(names)
    raw = run_capture([str(python), "-c", code, *names])
    if raw is None:
        return dict.fromkeys(names)
    result: dict[str, str | None] = json.loads(raw)
    return result


def git_revision() -> dict[str, Any]:
    """HEAD of the repository and whether the engine's sources differ from it."""
    head = run_capture(["git", "rev-parse", "HEAD"])
    dirty = run_capture(["git", "status", "--porcelain", "--", "src", "pyproject.toml"])
    return {"commit": head, "src_dirty": bool(dirty)}


def machine_facts() -> dict[str, Any]:
    """Facts that make a benchmark result comparable to another."""
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    os_name = None
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_total_gib": mem_total_gib,
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def run_facts(date: str) -> dict[str, Any]:
    """What a results file's ``machine`` starts with: ``date``, :func:`machine_facts`,
    the :func:`command_line` and the :func:`git_revision`."""
    return {"date": date, **machine_facts(), "command": command_line(), "git": git_revision()}


def engine_packages(
    project: Iterable[str], engines: Collection[str]
) -> dict[str, dict[str, str | None]]:
    """Versions of the ``project`` packages in this environment and, when
    ``engines`` include the reference, of the reference's own venv."""
    packages = {"project env": package_versions(sys.executable, project)}
    if "reference" in engines:
        packages["/opt/ematix"] = package_versions(REFERENCE_PYTHON, ["ematix-flow", "pyarrow"])
    return packages


def command_line() -> str:
    """The command that started this process, as it could be re-typed."""
    return shlex.join([Path(sys.executable).name, "-m", _module_name(), *sys.argv[1:]])


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return str(spec.name)
    return Path(sys.argv[0]).stem


# ---------------------------------------------------------------- output


class EngineRun(Protocol):
    """What the report needs of an engine's result (every scenario's ``EngineResult``).

    ``verification`` holds ``ok`` (True, False, or None when the table was
    not verified), ``problems`` and, optionally, ``examples``.
    """

    engine: str
    outcome: str  # ok | exited early | timeout | stalled
    verification: dict[str, Any]
    log: str  # the last lines of the engine's log


def failed(r: EngineRun) -> bool:
    """Whether the engine did not end ``ok`` or its table failed verification
    (a table that was not verified, ``ok`` None, is no failure)."""
    return r.outcome != "ok" or r.verification.get("ok") is False


def print_problem(r: EngineRun) -> None:
    """If the engine :func:`failed`, say so on stdout with its log tail."""
    if failed(r):
        print(f"[{r.engine}] PROBLEM: {r.outcome}; {r.verification['problems']}", flush=True)
        print(f"[{r.engine}] log tail:\n{r.log}", flush=True)


def problems_section(results: Iterable[EngineRun]) -> list[str]:
    """The ``## Problems`` section of a results file: each failed engine's
    outcome, verification problems and examples, and log tail; no lines when
    none failed."""
    lines: list[str] = []
    for r in results:
        if not failed(r):
            continue
        lines += [
            f"### {r.engine}: {r.outcome}",
            "",
            *(f"* {p}" for p in r.verification.get("problems", [])),
            *(f"* e.g. {e}" for e in r.verification.get("examples", [])),
            "",
            "Last lines of its log:",
            "",
            "```",
            r.log,
            "```",
            "",
        ]
    return ["## Problems", "", *lines] if lines else []


def num(value: float | None, fmt: str) -> str:
    """A figure for a table: ``value`` in ``fmt``, ``n/a`` when unknown."""
    return "n/a" if value is None else format(value, fmt)


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` for a table, as ``1.23x``; ``n/a`` when either is unknown or ``b`` is 0."""
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with right-aligned columns (first column left)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = ["---", *("---:" for _ in headers[1:])]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def report_tail(
    methodology: Iterable[str], facts: Mapping[str, Any], results: Iterable[Any]
) -> list[str]:
    """The closing sections of a results file: how it was measured, the command,
    the machine and the versions (``results``: objects with ``engine`` and ``version``)."""
    return [
        "## How it was measured",
        "",
        *(f"* {m}" for m in methodology),
        "",
        "## Command",
        "",
        "```",
        facts["command"],
        "```",
        "",
        "## Machine",
        "",
        *(f"* {k}: {v}" for k, v in facts.items() if k not in {"command", "packages"}),
        "",
        "## Versions",
        "",
        *(
            f"* {env}: " + ", ".join(f"{k} {v}" for k, v in pkgs.items())
            for env, pkgs in facts["packages"].items()
        ),
        *(f"* {r.engine} engine: {r.version}" for r in results),
        "",
    ]


def write_results(directory: Path, stem: str, markdown: str, data: Mapping[str, Any]) -> Path:
    """Write ``STEM.md`` and ``STEM.json`` into ``directory``; returns the .md path."""
    directory.mkdir(parents=True, exist_ok=True)
    md = directory / f"{stem}.md"
    md.write_text(markdown)
    (directory / f"{stem}.json").write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return md
