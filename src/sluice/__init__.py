"""sluice: a TOML-configured stream-processing engine.

Public API: load a pipeline file into a typed spec and compile its plan.
"""

from sluice.config import PipelineSpec, load_file, load_text
from sluice.engine.plan import Plan, build_plan
from sluice.errors import ConfigError, SluiceError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "PipelineSpec",
    "Plan",
    "SluiceError",
    "__version__",
    "build_plan",
    "load_file",
    "load_text",
]
