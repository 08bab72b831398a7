"""``${VAR}`` interpolation of string values from the environment.

``${VAR}`` is replaced by the variable's value; ``${VAR:-default}`` falls
back to ``default`` when the variable is unset or empty; ``$${`` is a
literal ``${``. A missing variable is a problem naming the variable and the
key that used it (all of them are collected, not just the first).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_REF = re.compile(r"\$\$\{|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def interpolate(
    data: Any, env: Mapping[str, str], path: str = ""
) -> tuple[Any, list[tuple[str, str]]]:
    """Return ``data`` with every string interpolated, and the problems found.

    Each problem is ``(key path, message)``.
    """
    problems: list[tuple[str, str]] = []

    def walk(value: Any, at: str) -> Any:
        if isinstance(value, str):
            return _substitute(value, env, at, problems)
        if isinstance(value, dict):
            return {k: walk(v, f"{at}.{k}" if at else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{at}[{i}]") for i, v in enumerate(value)]
        return value

    return walk(data, path), problems


def _substitute(text: str, env: Mapping[str, str], at: str, problems: list[tuple[str, str]]) -> str:
    if "$" not in text:
        return text

    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name = match.group("name")
        value = env.get(name)
        if value:
            return value
        default = match.group("default")
        if default is not None:
            return default
        if value is None:
            problems.append((at, f"environment variable ${{{name}}} is not set"))
        return value or ""

    return _REF.sub(repl, text)
