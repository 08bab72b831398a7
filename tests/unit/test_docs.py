"""docs/pipeline-toml.md is the spec's key reference, and it is current."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sluice.cli import main
from sluice.config.reference import reference_markdown

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "pipeline-toml.md"


def test_the_reference_is_current() -> None:
    # Stale after a key or a connector kind was added: run `make docs`.
    assert DOC.read_text(encoding="utf-8") == reference_markdown(), "run `make docs`"


def test_the_check_mode_of_the_generator_agrees() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _descriptions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("description"), str):
            yield node["description"]
        for value in node.values():
            yield from _descriptions(value)
    elif isinstance(node, list):
        for value in node:
            yield from _descriptions(value)


def test_every_description_of_flow_schema_is_in_the_reference(capsys: Any) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    doc = DOC.read_text(encoding="utf-8")
    descriptions = set(_descriptions(schema))
    assert len(descriptions) > 100
    # Struct docstrings are the JSON schema's table descriptions: first lines here.
    missing = [
        d for d in descriptions if d.replace("|", "\\|") not in doc and d.splitlines()[0] not in doc
    ]
    assert missing == []


def test_the_readme_links_to_the_reference() -> None:
    assert "](docs/pipeline-toml.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
