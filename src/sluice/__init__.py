"""sluice: a TOML-configured stream-processing engine.

Public API: load a pipeline file into a typed spec, compile its plan, run it
(:func:`run_pipeline`), and declare Python functions for its SQL
(:func:`udf`, :func:`udaf`); or declare the pipeline itself in Python with
typed connections (:func:`run_streaming_pipeline`, ``@sluice.connection``,
``@sluice.streaming_pipeline``; see :mod:`sluice.api`).
"""

import os as _os
import sys as _sys

if "pyarrow" not in _sys.modules:
    # Arrow's C++ default pool (what Acero's group-by and kernels called
    # without a pool allocate from) is chosen from this variable when pyarrow
    # loads, and only then: the system allocator returns freed buffers to
    # glibc instead of keeping them in mimalloc's pages (see
    # sluice.engine.memory). A value the user set wins.
    _os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from sluice.api import *  # noqa: F403  (the typed API, listed in sluice.api.__all__)
from sluice.api import __all__ as _api
from sluice.config import PipelineSpec, load_file, load_text
from sluice.engine.consume import run_pipeline
from sluice.engine.plan import Plan, build_plan
from sluice.errors import ConfigError, SluiceError
from sluice.functions import udaf, udf
from sluice.jobs import (
    ManagedTable,
    current_message,
    job,
    pipeline,
    pk,
    table,
    target,
    workflow,
)

__version__ = "0.1.0"

__all__ = [  # noqa: PLE0604
    *_api,
    "ConfigError",
    "ManagedTable",
    "PipelineSpec",
    "Plan",
    "SluiceError",
    "__version__",
    "build_plan",
    "current_message",
    "job",
    "load_file",
    "load_text",
    "pipeline",
    "pk",
    "run_pipeline",
    "table",
    "target",
    "udaf",
    "udf",
    "workflow",
]

# The user guide's modules start ``from ematix_flow import ematix, pk`` and
# use ``@ematix.job`` / ``@ematix.table``; renamed, ``from sluice import
# sluice, pk`` gives this package itself under that name.
sluice = _sys.modules[__name__]
