"""engine/memory.py: the allocators ``flow consume`` sets before its threads."""

from __future__ import annotations

import os
import subprocess
import sys

_PROBE = """
import pyarrow as pa
from sluice.engine import memory
memory.tune()
print(pa.default_memory_pool().backend_name)
"""


def _pool(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("ARROW_DEFAULT_MEMORY_POOL",)}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        check=False,
        env={**clean, **env},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_arrow_buffers_come_from_the_system_allocator() -> None:
    assert _pool() == "system"


_ACERO = """
import sluice, pyarrow as pa
t = pa.table({"k": list(range(100_000)) * 2, "v": [1.5] * 200_000})
t.group_by("k").aggregate([("v", "sum"), ("v", "max")])  # Acero: Arrow's C++ default pool
print(pa.mimalloc_memory_pool().max_memory(), pa.system_memory_pool().max_memory())
"""


def test_acero_allocates_from_the_system_allocator_once_sluice_is_imported() -> None:
    clean = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run(
        [sys.executable, "-c", _ACERO], check=False, env=clean, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    mimalloc, system = map(int, out.stdout.split())
    assert mimalloc == 0
    assert system > 1_000_000


def test_the_users_arrow_pool_wins() -> None:
    assert _pool(ARROW_DEFAULT_MEMORY_POOL="mimalloc") == "mimalloc"
