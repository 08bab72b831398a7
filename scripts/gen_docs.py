"""Write docs/pipeline-toml.md from the spec (run by `make docs`).

With --check, write nothing and exit 1 when the file is not current.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sluice.config.reference import reference_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "pipeline-toml.md"


def main(argv: list[str]) -> int:
    text = reference_markdown()
    if "--check" in argv:
        current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
