"""The pipeline.toml contract: typed specs, loading, validation, redaction."""

from sluice.config.load import load_file, load_text
from sluice.config.spec import PipelineSpec

__all__ = ["PipelineSpec", "load_file", "load_text"]
