"""The ``flow`` command: validate, plan, schema, consume.

Exit codes: 0 success; 1 a runtime failure; 2 an invalid configuration or
usage. Problems go to stderr, one per line; results to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import msgspec

from sluice import envflags
from sluice.config import load_file
from sluice.config.spec import pipeline_type
from sluice.engine.plan import build_plan
from sluice.errors import ConfigError, SluiceError
from sluice.functions import collect

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def _cmd_validate(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for path in args.files:
        try:
            spec = load_file(path)
            if spec.transform is not None and spec.transform.udf_modules:
                collect((), spec.transform.udf_modules, path)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            status = EXIT_CONFIG
        else:
            if not args.quiet:
                print(f"{path}: ok")
    return status


def _cmd_plan(args: argparse.Namespace) -> int:
    try:
        spec = load_file(args.file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    plan = build_plan(spec)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan.to_text(), end="")
    return EXIT_OK


def _cmd_schema(_: argparse.Namespace) -> int:
    schema = msgspec.json.schema(pipeline_type())
    print(json.dumps(schema, indent=2))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``flow`` (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="flow", description="sluice: run TOML-configured streaming pipelines."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check pipeline files; exit 2 listing every problem")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing for valid files")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("plan", help="print the plan graph of a pipeline")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("schema", help="print the JSON schema of pipeline.toml (for editors)")
    p.set_defaults(func=_cmd_schema)

    try:
        from sluice.engine.consume import add_consume_parser
    except ImportError:  # pragma: no cover - consume lands with the streaming core
        pass
    else:
        add_consume_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flow`` console script; returns the exit code."""
    parser = build_parser()
    envflags.apply_to(parser, os.environ, ("consume",))
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    except SluiceError as exc:
        print(f"flow: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`flow plan | head`): not an error of ours.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return EXIT_OK
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
