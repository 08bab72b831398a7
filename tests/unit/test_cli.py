"""``flow`` as a newcomer meets it (issue 18, item 4).

Every bad case the issue lists ends in exit 2 (config / usage) or 1 (a
runtime failure), with one line per problem, no traceback and no password.
The cases that need a real ``flow consume`` process run one (``python -m
sluice``); the rest call :func:`sluice.cli.main` in-process, where a
traceback would be an exception escaping the test.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluice.cli import build_parser, main
from sluice.config import load_file
from sluice.starter import SOURCES, TARGETS, starter

ROOT = Path(__file__).resolve().parents[2]
SECRET = "SECRET"

BASE = """
pipeline_name = "p"
source_query = "events"
{top}
[source]
kind = "object_store_local"
path = "in"
format = "json_lines"

[target]
kind = "sqlite"
path = "out.db"
[target.table]
name = "t"
{rest}
"""


def write(tmp_path: Path, text: str, name: str = "pipeline.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``flow ARGV`` in-process: (exit code, stdout, stderr); argparse exits count too."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean(err: str, lines: int | None = 1) -> None:
    """No traceback, no secret, and (when given) exactly ``lines`` lines."""
    assert "Traceback" not in err, err
    assert SECRET not in err, err
    if lines is not None:
        assert len(err.strip().splitlines()) == lines, err


def flow(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def files(tmp_path: Path) -> Iterator[Path]:
    """A pipeline folder with one JSON-lines input file under in/events/."""
    (tmp_path / "in" / "events").mkdir(parents=True)
    (tmp_path / "in" / "events" / "a.jsonl").write_text(
        "".join(f'{{"id": {i}, "amount": {i}.5}}\n' for i in range(50))
    )
    yield tmp_path


# ---------------------------------------------------------------------------
# Bad files: flow validate and flow consume, exit 2, one line per problem


def test_a_binary_file_as_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ls.toml"
    path.write_bytes(Path(sys.executable).read_bytes()[:4096])
    for command in ("validate", "consume", "plan", "doctor"):
        code, _, err = run_main(capsys, command, str(path))
        assert code == 2, (command, err)
        assert_clean(err)
        assert "not a TOML file" in err


def test_a_file_with_nul_bytes_is_not_toml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nul.toml"
    path.write_bytes(b'pipeline_name = "p"\x00\n')
    code, _, err = run_main(capsys, "validate", str(path))
    assert (code, err.strip()) == (2, f"{path}: not a TOML file: it holds NUL bytes")


def test_huge_durations_and_counts_fail_validation_with_their_key_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        BASE.format(
            top="idle_pause_ms = 100000000000000000000000",
            rest="""
[transform]
sql = "SELECT * FROM source"
[transform.window]
kind = "tumbling"
duration_ms = 9223372036854775807
max_groups_per_window = 9223372036854775808
aggregations = [{agg = "count", as = "n"}]
""",
        ),
    )
    code, _, err = run_main(capsys, "validate", str(path))
    assert code == 2
    assert_clean(err, lines=3)
    assert err.splitlines() == [
        f"{path}: idle_pause_ms: expected an integer >= 0 and <= 1000000000000, "
        "got 100000000000000000000000",
        f"{path}: transform.window.duration_ms: expected an integer > 0 and <= 1000000000000, "
        "got 9223372036854775807",
        f"{path}: transform.window.max_groups_per_window: expected an integer > 0 and <= 9223372036854775807, "
        "got 9223372036854775808",
    ]


def test_a_float_idle_pause(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BASE.format(top="idle_pause_ms = 1e23", rest=""))
    code, _, err = run_main(capsys, "consume", str(path), "--stop-after-idle-ms", "100")
    assert code == 2
    assert_clean(err)
    assert "idle_pause_ms: expected an integer >= 0, got a float (1e+23)" in err


def test_a_malformed_url_never_prints_its_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        BASE.format(top="", rest="")
        .replace('kind = "sqlite"\npath = "out.db"', 'kind = "postgres"\nurl = "X"')
        .replace('"X"', f'"postgresql//admin:{SECRET}@host/db"'),
    )
    for command in ("validate", "plan", "consume", "doctor"):
        code, out, err = run_main(capsys, command, str(path))
        assert code == 2, (command, err)
        assert_clean(err)
        assert SECRET not in out
        assert (
            err.strip() == f"{path}: target.url: expected a postgres:// or postgresql:// URL, "
            'got "postgresql//admin:***@host/db"'
        )


def test_sql_that_does_not_parse_fails_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        BASE.format(top="", rest='[transform]\nsql = "SELEC id, amount FROM source"'),
    )
    code, _, err = run_main(capsys, "validate", str(path))
    assert code == 2
    assert_clean(err)
    assert err.strip() == (
        f"{path}: transform.sql: invalid SQL: Expected: an SQL statement, found: SELEC "
        "at Line: 1, Column: 1"
    )


def test_sql_that_parses_passes_validate_whatever_it_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Columns and tables are known when data arrives: only syntax is checked here.
    path = write(
        tmp_path,
        BASE.format(top="", rest='[transform]\nsql = "SELECT nope, id + 1 AS x FROM source"'),
    )
    assert run_main(capsys, "validate", str(path))[0] == 0


def test_lateness_in_the_window_points_at_the_watermark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        BASE.format(
            top="",
            rest="""
[transform.window]
kind = "tumbling"
duration_ms = 1000
lateness_ms = 500
aggregations = [{agg = "count", as = "n"}]
""",
        ),
    )
    code, _, err = run_main(capsys, "validate", str(path))
    assert code == 2
    assert_clean(err)
    assert "in [watermark]" in err
    assert "did you mean 'allowed_lateness_ms'" not in err


# ---------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--stop-after-idle-ms", "-1"], "--stop-after-idle-ms: expected milliseconds"),
        (["--max-restarts", "-1"], "--max-restarts: expected an integer >= 0, got -1"),
        (["--metrics-port", "65536"], "--metrics-port: expected a port number from 1 to 65535"),
        (["--metrics-port", "0"], "--metrics-port: expected a port number from 1 to 65535"),
        (["--min-backoff-ms", "soon"], "--initial-backoff-ms: expected milliseconds"),
        (["--reset-backoff-after-secs", "nan"], "--reset-backoff-after-secs: expected seconds"),
        (["--max-backoff-ms", "10", "--initial-backoff-ms", "20"], "--max-backoff-ms (10)"),
        (["--no-drain"], "--no-drain needs --stop-after-idle-ms"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    path = write(tmp_path, BASE.format(top="", rest=""))
    code, _, err = run_main(capsys, "consume", str(path), *flags)
    assert code == 2, err
    assert_clean(err)
    assert err.startswith("flow") and message in err, err


def test_every_flag_says_what_it_does() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    seen = 0
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"flow {name} {action.option_strings or action.dest}"
            seen += 1
    assert seen > 15


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from sluice import __version__

    code, out, _ = run_main(capsys, "--version")
    assert (code, out.strip()) == (0, f"flow (sluice) {__version__}")


def test_a_metrics_port_in_use_is_one_line(files: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write(files, BASE.format(top="", rest=""))
        done = flow("consume", str(path), "--metrics-port", str(port), cwd=files)
    assert done.returncode == 2, done.stderr
    assert_clean(done.stderr)
    assert done.stderr.strip() == (
        f"flow consume: --metrics-port {port}: cannot serve /metrics: the port is already in use"
    )


# ---------------------------------------------------------------------------
# Runs: a long idle pause, a runtime failure, the summary line


def test_a_long_idle_pause_does_not_outlast_stop_after_idle(files: Path) -> None:
    path = write(files, BASE.format(top="idle_pause_ms = 3600000", rest=""))
    started = time.monotonic()
    done = flow("consume", str(path), "--stop-after-idle-ms", "300", cwd=files, timeout=60)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30
    assert_clean(done.stderr, lines=None)
    assert "read 50 rows; wrote 50 rows to sqlite:" in done.stderr


def test_a_runtime_failure_exits_1_with_one_error_line(files: Path) -> None:
    path = write(
        files,
        BASE.format(top="", rest='[transform]\nsql = "SELECT no_such_column FROM source"'),
    )
    done = flow("consume", str(path), "--stop-after-idle-ms", "300", cwd=files)
    assert done.returncode == 1, done.stderr
    assert_clean(done.stderr, lines=None)
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "no_such_column" in errors[0], done.stderr
    assert "stopped (exit 1)" in done.stderr.splitlines()[-1]


def test_relative_paths_resolve_from_the_files_folder(files: Path) -> None:
    folder = files / "pipelines"
    folder.mkdir()
    path = write(
        folder,
        BASE.format(top="", rest="").replace('path = "in"', 'path = "../in"'),
    )
    elsewhere = files / "elsewhere"
    elsewhere.mkdir()
    spec = load_file(path)
    assert spec.all_sources[0].path == str(files / "in")  # type: ignore[attr-defined]
    assert spec.all_targets[0].path == str(folder / "out.db")  # type: ignore[attr-defined]
    done = flow(
        "consume", "../pipelines/pipeline.toml", "--stop-after-idle-ms", "300", cwd=elsewhere
    )
    assert done.returncode == 0, done.stderr
    summary = done.stderr.strip().splitlines()[-1]
    assert f"read 50 rows; wrote 50 rows to sqlite:{folder / 'out.db'}:t" in summary
    assert not (elsewhere / "out.db").exists()


def test_progress_lines_when_asked(files: Path) -> None:
    path = write(files, BASE.format(top="", rest=""))
    done = flow(
        "consume", str(path), "--stop-after-idle-ms", "1500", "--progress-secs", "0.2", cwd=files
    )
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stderr.splitlines() if "elapsed" in line]
    assert progress and "50 rows read" in progress[-1], done.stderr
    assert "written 50 to sqlite:" in progress[-1]


# ---------------------------------------------------------------------------
# flow init


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("target", TARGETS)
def test_init_writes_a_pipeline_that_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, target: str
) -> None:
    out = tmp_path / f"{source}_{target}.toml"
    code, stdout, _ = run_main(
        capsys, "init", "--source", source, "--target", target, "-o", str(out)
    )
    assert code == 0 and str(out) in stdout
    assert out.read_text() == starter(source, target, f"{source}_{target}")
    code, stdout, err = run_main(capsys, "validate", str(out))
    assert (code, err) == (0, "")


def test_init_does_not_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = write(tmp_path, "keep me")
    code, _, err = run_main(capsys, "init", "-o", str(out))
    assert code == 2
    assert_clean(err)
    assert out.read_text() == "keep me"
    assert run_main(capsys, "init", "-o", str(out), "--force")[0] == 0


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql//admin:SECRET@host/db", "postgresql//admin:***@host/db"),
        ("postgresql:/admin:SECRET@host/db", "postgresql:/admin:***@host/db"),
        ("admin:SECRET@host", "admin:***@host"),
        ("postgres//a:SECRET/x@h/d", "postgres//a:***@h/d"),
        ("postgres://u:SECRET@h:5432/d", "postgres://u:***@h:5432/d"),
        (
            "kafka:topic at 10:30, mail user@example.com",
            "kafka:topic at 10:30, mail user@example.com",
        ),
    ],
)
def test_passwords_in_malformed_urls_are_masked(text: str, shown: str) -> None:
    from sluice.config.redact import redact_text

    assert redact_text(text) == shown


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT 'abc FROM source", "Unterminated string literal at Line: 1, Column: 8"),
        ("SELECT a FROM source GROUP BY", "Expected: an expression, found: EOF"),
        ("SELECT a FROM source; SELECT b FROM source", "expected one statement"),
        ("SELECT a FROM source WHERE a > 1", None),
    ],
)
def test_sql_syntax_is_checked_by_datafusion(sql: str, message: str | None) -> None:
    from sluice.config import load_text
    from sluice.errors import ConfigError

    text = BASE.format(top="", rest=f'[transform]\nsql = "{sql}"')
    if message is None:
        load_text(text)
        return
    with pytest.raises(ConfigError) as info:
        load_text(text)
    [problem] = info.value.problems
    assert problem.path == "transform.sql" and message in problem.message


def test_log_lines_of_a_run_mask_passwords() -> None:
    import io
    import logging

    from sluice.cli import _Redacting

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(_Redacting())
    logger = logging.getLogger("sluice.test_redacting")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error("cannot connect to %s", f"postgresql//admin:{SECRET}@db:5432/x")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "cannot connect to postgresql//admin:***@db:5432/x\n"
