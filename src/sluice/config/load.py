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
    return load_data(raw, name, env, base_dir)


def load_data(
    raw: dict[str, Any],
    name: str = "<data>",
    env: Mapping[str, str] | None = None,
    base_dir: str | Path | None = None,
) -> PipelineSpec:
    """Validate a pipeline given as the table its TOML would parse to (the
    Python API lowers to this); ``name`` labels the problems, relative local
    paths resolve from ``base_dir`` (see :func:`load_text`)."""
    problems = _connections(raw)
    # A table whose connection is unknown is left out; saying it is missing would repeat that.
    unresolved = {p.split(".")[0].split("[")[0] for p, _ in problems}
    data, more = interpolate(raw, os.environ if env is None else env)
    problems += more
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
    problems += [
        (p, m) for p, m in later if p not in reported and not (p == "" and _about(m, unresolved))
    ]
    if problems:
        raise ConfigError([ConfigProblem(name, p, m) for p, m in _unique(problems)])
    if base_dir is not None:
        resolve_paths(data, spec_type, str(base_dir))
        resolve_dlq_store(data, str(base_dir))
    spec: PipelineSpec = convert(data, spec_type)
    return spec


def _about(message: str, roles: set[str]) -> bool:
    """Whether a whole-file message says a source / target is missing, for ``roles``."""
    return any(
        message.startswith(f"missing a {role.rstrip('s')}")
        for role in roles
        if role in ("source", "sources", "target", "targets")
    )


def _connections(data: dict[str, Any]) -> list[Problem]:
    """Replace ``connection = "name"`` in every connector table (sources,
    targets, lookups, the state store) by that connection's keys; see
    :mod:`sluice.api.connections`. Unknown names are problems."""
    from sluice.api.connections import expand

    problems: list[Problem] = []
    tables: list[tuple[str, dict[str, Any], str]] = []  # (path, parent, key)
    for key in ("source", "target", "state_store"):
        tables.append((key, data, key))
    for key in ("sources", "targets"):
        if isinstance(data.get(key), list):
            tables += [(f"{key}[{i}]", data[key], i) for i in range(len(data[key]))]  # type: ignore[misc]
    lookups = (
        data.get("transform", {}).get("lookups")
        if isinstance(data.get("transform"), dict)
        else None
    )
    if isinstance(lookups, dict):
        tables += [(f"transform.lookups.{n}", lookups, n) for n in lookups]
    for at, parent, key in tables:
        table = parent[key] if isinstance(parent, list) else parent.get(key)
        if not isinstance(table, dict) or "connection" not in table:
            continue
        try:
            # A state store takes a database connection's url only.
            expanded = expand(table, at, only=("url",) if key == "state_store" else None)
        except ConfigError as exc:
            problems += [(p.path, p.message) for p in exc.problems]
            # Checked no further: its keys are unknown without the connection's.
            del parent[key]
            continue
        parent[key] = expanded
    return problems


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
