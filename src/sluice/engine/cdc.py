"""``[transform.cdc]``: the targets that apply a change stream to mirror tables.

CDC is not a stage between the sources and the targets: the apply *is* the
write, one transaction of the target per batch, so each CDC target implements
the :class:`~sluice.connectors.api.Target` protocol itself and the run loop
treats it like any other target (``write`` + ``flush``, then the offsets
commit).

The envelopes are decoded where the messages are read (a source's
decoder, :func:`sluice.formats.decoder_for`, is an
:class:`~sluice.formats.cdc.EnvelopeDecoder` when the pipeline has
``[transform.cdc]``), so an undecodable envelope follows
``on_error`` with its offset and raw payload like any undecodable message.
The targets receive the change table; the rules they share are in
:mod:`sluice.connectors.cdc_apply`. Which targets can apply changes is
their connector's ``cdc`` capability.
"""

from __future__ import annotations

from sluice.config.spec import PipelineSpec
from sluice.connectors import registry
from sluice.connectors.api import Target
from sluice.errors import SluiceError


def build_targets(spec: PipelineSpec) -> list[Target]:
    """One CDC target per ``[target]`` / ``[[targets]]`` of ``spec``, in file order.

    The first one feeds the ``sluice_cdc_*_total`` counters (each target
    gates on its own, so counting all would count a fan-out twice).
    Raises :class:`SluiceError` for a target kind without the ``cdc`` capability.
    """
    transform = spec.transform
    if transform is None or transform.cdc is None:
        raise SluiceError("build_targets needs a pipeline with [transform.cdc]")
    ctx = registry.Context(spec)
    return [
        registry.build_cdc_target(target, ctx, index, transform.cdc, count=index == 0)
        for index, target in enumerate(spec.all_targets)
    ]
