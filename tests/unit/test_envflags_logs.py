"""Flags from SLUICE_* variables, and JSON log lines (the sidecar's config)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from sluice import envflags, logs
from sluice.cli import build_parser


def consume_args(argv: list[str], env: dict[str, str]) -> object:
    parser = build_parser()
    envflags.apply_to(parser, env, ("consume",))
    return parser.parse_args(["consume", *argv])


def test_every_consume_flag_reads_its_variable() -> None:
    env = {
        "SLUICE_CONFIG": "/etc/sluice/pipeline.toml",
        "SLUICE_METRICS_PORT": "9100",
        "SLUICE_RESTART_ON_ERROR": "true",
        "SLUICE_MAX_BACKOFF_MS": "30000",
        "SLUICE_NO_DRAIN": "yes",
        "SLUICE_LOG_FORMAT": "json",
    }
    args = vars(consume_args([], env))
    assert {
        k: args[k]
        for k in (
            "config",
            "metrics_port",
            "restart_on_error",
            "max_backoff_ms",
            "no_drain",
            "log_format",
        )
    } == {
        "config": "/etc/sluice/pipeline.toml",
        "metrics_port": 9100,
        "restart_on_error": True,
        "max_backoff_ms": 30000,
        "no_drain": True,
        "log_format": "json",
    }


def test_the_command_line_wins_and_off_switches_work() -> None:
    env = {"SLUICE_METRICS_PORT": "9100", "SLUICE_RESTART_ON_ERROR": "0"}
    args = consume_args(["p.toml", "--metrics-port", "9200"], env)
    assert (args.config, args.metrics_port, args.restart_on_error) == ("p.toml", 9200, False)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLUICE_METRICS_PORT": "abc"}, "SLUICE_METRICS_PORT='abc'"),
        ({"SLUICE_RESTART_ON_ERROR": "maybe"}, "expected one of 1/true/yes/on"),
        ({"SLUICE_LOG_FORMAT": "xml"}, "expected one of text, json"),
    ],
)
def test_a_bad_variable_is_a_usage_error_naming_it(
    env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        consume_args([], env)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_help_names_each_variable() -> None:
    parser = build_parser()
    envflags.apply_to(parser, {}, ("consume",))
    consume = next(a for a in parser._actions if a.dest == "command").choices["consume"]  # type: ignore[attr-defined]
    flags = [a for a in consume._actions if a.dest != "help"]
    assert flags and all(envflags.variable(a) in (a.help or "") for a in flags)


def test_json_lines_carry_the_pipeline_and_structured_fields() -> None:
    stream = io.StringIO()
    logs.configure("json", "info", stream)
    logs.bind("orders")
    try:
        log = logging.getLogger("sluice")
        log.info("hello %s", "there", extra={"source": "orders", "partition": "orders:1"})
        log.debug("not shown")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed", extra={"offset": 42})
    finally:
        logs.bind(None)
        logs.configure("text", "warning")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "hello there" and first["level"] == "info"
    assert (first["pipeline"], first["source"], first["partition"]) == (
        "orders",
        "orders",
        "orders:1",
    )
    assert second["offset"] == 42 and "ValueError: boom" in second["exc"]
