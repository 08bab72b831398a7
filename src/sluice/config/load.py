"""Read a pipeline.toml into a :class:`PipelineSpec`, or fail with every problem.

Order of work: parse TOML → interpolate ``${VAR}`` → normalise the seeds'
``[[targets.table]]`` array form → type walk → cross-rules → build the frozen
spec. Problems from all steps after parsing are reported together.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sluice.config.interpolate import interpolate
from sluice.config.spec import PipelineSpec, pipeline_type
from sluice.config.validate import (
    Problem,
    check_rules,
    check_sql,
    check_types,
    convert,
    resolve_dlq_store,
    resolve_paths,
    strip_markers,
)
from sluice.errors import ConfigError, ConfigProblem


def load_file(path: str | Path, env: Mapping[str, str] | None = None) -> PipelineSpec:
    """Load and validate one pipeline file.

    Raises :class:`ConfigError` carrying every problem found, each naming the
    file and the key path.
    """
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError([ConfigProblem(name, "", f"cannot read: {reason}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigProblem(name, "", f"not a TOML file: not UTF-8 text (byte {exc.start})")]
        ) from None
    if "\x00" in text:
        raise ConfigError([ConfigProblem(name, "", "not a TOML file: it holds NUL bytes")])
    return load_text(text, name, env, base_dir=Path(path).resolve().parent)


def load_text(
    text: str,
    name: str = "<string>",
    env: Mapping[str, str] | None = None,
    base_dir: str | Path | None = None,
) -> PipelineSpec:
    """Load and validate pipeline TOML given as text; ``name`` labels the problems.

    Relative local paths (database files, folders, a ``.jsonl`` DLQ) resolve
    from ``base_dir``: :func:`load_file` passes the file's folder. Without
    it they stay relative (to the working directory).
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem(name, "", f"invalid TOML: {exc}")]) from None
    data, problems = interpolate(raw, os.environ if env is None else env)
    problems += _normalise(data)
    # A key already reported (missing variable, bad array form) is not
    # reported again by the checks that follow.
    reported = {p for p, _ in problems}
    spec_type = pipeline_type()  # the unions of every registered connector
    types, suggested = strip_markers(check_types(data, spec_type))
    later = (
        types
        + [(p, m) for p, m in check_rules(data) if not (p in suggested and m.startswith("missing"))]
        + check_sql(data)
    )
    problems += [(p, m) for p, m in later if p not in reported]
    if problems:
        raise ConfigError([ConfigProblem(name, p, m) for p, m in _unique(problems)])
    if base_dir is not None:
        resolve_paths(data, spec_type, str(base_dir))
        resolve_dlq_store(data, str(base_dir))
    spec: PipelineSpec = convert(data, spec_type)
    return spec


def _normalise(data: dict[str, Any]) -> list[Problem]:
    """Accept ``[[targets.table]]`` (an array of one table) as the seeds write it."""
    problems: list[Problem] = []
    entries: list[tuple[str, Any]] = [("target", data.get("target"))]
    if isinstance(data.get("targets"), list):
        entries += [(f"targets[{i}]", t) for i, t in enumerate(data["targets"])]
    for at, target in entries:
        if not isinstance(target, dict):
            continue
        table = target.get("table")
        if isinstance(table, list) and all(isinstance(t, dict) for t in table):
            if len(table) == 1:
                target["table"] = table[0]
            else:
                problems.append(
                    (f"{at}.table", f"expected one table, got an array of {len(table)}")
                )
    return problems


def _unique(problems: list[Problem]) -> list[Problem]:
    seen: set[Problem] = set()
    out = []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out
