"""Every ``flow`` flag from the environment: ``SLUICE_<FLAG>`` (a sidecar's config).

``--metrics-port 9100`` is ``SLUICE_METRICS_PORT=9100``; a switch such as
``--restart-on-error`` is on with ``1`` / ``true`` / ``yes`` / ``on`` and off
with ``0`` / ``false`` / ``no`` / ``off``; the positional ``CONFIG`` of
``flow consume`` is ``SLUICE_CONFIG``. A flag on the command line wins over
the environment. A value that does not convert is a usage error naming the
variable (exit 2), like a bad flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def variable(action: argparse.Action) -> str:
    """The environment variable of one flag (or positional)."""
    return "SLUICE_" + action.dest.upper()


def apply_to(
    parser: argparse.ArgumentParser, env: Mapping[str, str], commands: tuple[str, ...]
) -> None:
    """:func:`apply` to the subcommands ``commands`` of ``parser``."""
    for action in parser._actions:  # argparse offers no public accessor
        if isinstance(action, argparse._SubParsersAction):
            for command in commands:
                if command in action.choices:
                    apply(action.choices[command], env)


def apply(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """Take ``parser``'s defaults from ``env`` where a ``SLUICE_*`` variable is
    set; every flag's help names its variable."""
    for action in parser._actions:  # argparse offers no public accessor
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        name = variable(action)
        if action.help is not argparse.SUPPRESS and name not in (action.help or ""):
            action.help = f"{action.help} (env {name})" if action.help else f"env {name}"
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            word = raw.strip().lower()
            if word not in _TRUE | _FALSE:
                parser.error(f"{name}={raw!r}: expected one of 1/true/yes/on or 0/false/no/off")
            on = word in _TRUE
            action.default = on if isinstance(action, argparse._StoreTrueAction) else not on
            continue
        try:
            value = action.type(raw) if callable(action.type) else raw
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"{name}={raw!r}: {exc}")
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            parser.error(f"{name}={raw!r}: expected one of {choices}")
        action.default = value
        if not action.option_strings:  # a positional given by the environment
            action.nargs = "?"
