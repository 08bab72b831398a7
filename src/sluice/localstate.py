"""Small durable files under ``$SLUICE_STATE_DIR`` (default ``.sluice-state``).

Checkpoints of sources that have no broker to commit to (local files), the
JSON-lines dead-letter file and the window watermark of a pipeline without a
state store live here. Mount the directory on a volume in a container, or
use a ``[state_store]``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any


def state_dir() -> Path:
    """The directory of local checkpoints (not created here)."""
    return Path(os.environ.get("SLUICE_STATE_DIR", ".sluice-state"))


def safe_name(name: str) -> str:
    """``name`` reduced to characters that are safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "unnamed"


def write_json(path: Path, value: Any) -> None:
    """Replace ``path`` with ``value`` as JSON, atomically and fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(value, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON value in ``path``, ``None`` when the file does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
