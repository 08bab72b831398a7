"""The process's allocators, set once before the engine starts its threads.

Measured on the 1M-event Kafka -> Postgres append benchmark (2026-12-07,
``benchmarks/results/kafka_to_postgres-ab-2026-12-07.md``): with glibc's
default of up to 8 malloc arenas per core and pyarrow's mimalloc pool, every
thread that allocates (librdkafka's, the reader's, the writer's, Arrow's)
keeps its own high-water mark of freed memory; peak RSS was ~300 MB more
than the rows in flight. Both choices below keep the throughput and CPU of
the defaults.

* glibc: at most :data:`ARENAS` malloc arenas (``mallopt(M_ARENA_MAX)``,
  what the ``MALLOC_ARENA_MAX`` variable sets), unless that variable is set.
* pyarrow: the system allocator for Arrow buffers (freed memory goes back to
  glibc, and from there to the OS, instead of staying in mimalloc's pages),
  unless ``ARROW_DEFAULT_MEMORY_POOL`` is set. ``pa.set_memory_pool`` below
  covers what pyarrow's Python calls allocate; Arrow's C++ default pool
  (Acero's group-by in the window stage and the watermarks, kernels called
  without a pool) is fixed when pyarrow loads, so ``sluice/__init__.py``
  sets ``ARROW_DEFAULT_MEMORY_POOL=system`` before pyarrow is imported. On
  the tumbling-window benchmark (2026-12-07, third session) that took the
  peak RSS from 618-630 MB to ~504 MB, at the same CPU: mimalloc kept
  ~230-280 MB of freed group-by buffers resident.

Either variable set by the user wins: a deployment that trades memory for
speed (or measures otherwise) says so in its environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

#: glibc's ``M_ARENA_MAX`` (malloc.h).
_M_ARENA_MAX = -8
#: Malloc arenas for the whole process (glibc's default: 8 x cores).
ARENAS = 2


def tune() -> None:
    """Set the allocators (call once, before starting threads)."""
    if "MALLOC_ARENA_MAX" not in os.environ:
        _limit_arenas(ARENAS)
    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        import pyarrow as pa

        pa.set_memory_pool(pa.system_memory_pool())


def _limit_arenas(arenas: int) -> None:
    name = ctypes.util.find_library("c")
    if name is None:  # not glibc (musl has no arenas to limit)
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_ARENA_MAX, arenas) != 1:
        log.debug("mallopt(M_ARENA_MAX, %d) refused", arenas)
