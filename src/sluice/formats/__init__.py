"""Payload formats: decoders and encoders shared by every broker source and target.

A broker source does two things with what it read:

1. ``decoder = decoder_for(spec.payload_format, cdc, pipeline)`` once, then
   ``decoded = decoder.decode(payloads, offsets)`` per batch: JSON objects
   (:mod:`sluice.formats.json`), CDC envelopes when the pipeline has
   ``[transform.cdc]`` (:mod:`sluice.formats.cdc`), or the raw bytes.
2. ``table = event_table(decoded, timestamps_us)``: the decoded rows with
   ``_event_ts`` from the broker's timestamps.

Avro and Protobuf payloads framed by a schema registry (Confluent wire
format) decode through :mod:`sluice.formats.confluent` with the codecs of
:mod:`sluice.formats.avro` / :mod:`sluice.formats.protobuf` and the client
of :mod:`sluice.formats.registry`; a source with headers calls
``decoder.decode_with_headers`` when the decoder is a
:class:`~sluice.formats.confluent.RegistryDecoder` (schema ids in headers).

Encoders: :mod:`sluice.formats.jsontext` (Arrow values as JSON text),
:mod:`sluice.formats.encode` (rows as JSON / Avro payloads for broker targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from sluice.connectors.api import EVENT_TS, EVENT_TS_TYPE
from sluice.errors import ConnectorError, MissingDependencyError
from sluice.formats.json import Decoded, JsonDecoder

if TYPE_CHECKING:
    from sluice.config.spec import CdcSpec
    from sluice.formats.registry import RegistrySettings


class PayloadDecoder(Protocol):
    """Decodes a batch of payloads into Arrow in bulk (no Python per field)."""

    def decode(self, payloads: list[bytes | None], offsets: Sequence[int]) -> Decoded:
        """The decoded rows of ``payloads``; undecodable ones are listed in ``bad``
        by index. ``offsets`` name each payload's place in the source (CDC
        envelopes order by them)."""
        ...


@runtime_checkable
class HeaderAware(Protocol):
    """A decoder that also reads the messages' headers (schema ids in
    ``__value_schema_id``): a source with headers calls this instead of ``decode``."""

    def decode_with_headers(
        self,
        payloads: list[bytes | None],
        headers: Sequence[Sequence[tuple[str, bytes | None]] | None] | None,
    ) -> Decoded:
        """The decoded rows of ``payloads``, each with its headers (or ``None``)."""
        ...


class RawBytes:
    """``payload_format = "raw_bytes"``: one binary ``value`` column, nothing parsed."""

    def decode(self, payloads: list[bytes | None], offsets: Sequence[int]) -> Decoded:
        """Every payload as it arrived."""
        return Decoded(pa.table({"value": pa.array(payloads, pa.binary())}))


class Json:
    """``payload_format = "json"``: JSON objects, one schema kept across batches."""

    def __init__(self) -> None:
        self._decoder = JsonDecoder()

    def decode(self, payloads: list[bytes | None], offsets: Sequence[int]) -> Decoded:
        """See :meth:`sluice.formats.json.JsonDecoder.decode`."""
        return self._decoder.decode(payloads)


class Unsupported:
    """A format the spec accepts and sluice cannot decode yet: fails on the first batch."""

    def __init__(self, payload_format: str) -> None:
        self.payload_format = payload_format

    def decode(self, payloads: list[bytes | None], offsets: Sequence[int]) -> Decoded:
        """Raises :class:`ConnectorError`."""
        raise ConnectorError(
            f"payload_format '{self.payload_format}' is not supported yet by sluice"
        )


def decoder_for(
    payload_format: str,
    cdc: CdcSpec | None,
    pipeline: str,
    registry: RegistrySettings | None = None,
    *,
    validate: bool = False,
) -> PayloadDecoder:
    """The decoder of a source's payloads.

    ``avro``, ``protobuf`` and ``json_schema`` need ``registry`` (the schema
    registry the payloads' schema ids point into); ``validate`` checks
    ``json_schema`` bodies against their schema.

    With ``[transform.cdc]`` (``cdc``) payloads are change envelopes and
    decode into change rows where they are read, so a bad one follows
    ``on_error`` with its position and raw bytes like any bad message.
    Raises :class:`ConnectorError` when ``cdc`` is set and the payloads are
    not JSON.
    """
    if cdc is not None:
        if payload_format != "json":
            raise ConnectorError('[transform.cdc] reads JSON envelopes: payload_format = "json"')
        from sluice.formats.cdc import EnvelopeDecoder

        return EnvelopeDecoder(cdc, pipeline)
    if payload_format == "json":
        return Json()
    if payload_format == "raw_bytes":
        return RawBytes()
    if payload_format in ("avro", "protobuf", "json_schema"):
        if registry is None:
            raise ConnectorError(f"payload_format '{payload_format}' needs schema_registry_url")
        from sluice.formats.confluent import RegistryDecoder
        from sluice.formats.registry import client_for

        try:
            if payload_format == "json_schema":
                from sluice.formats.json_schema import JsonSchemaDecoder

                return JsonSchemaDecoder(client_for(registry), validate)
            if payload_format == "avro":
                from sluice.formats.avro import build_codec as avro_codec

                return RegistryDecoder("avro", client_for(registry), avro_codec)
            from sluice.formats.protobuf import build_codec as protobuf_codec

            return RegistryDecoder("protobuf", client_for(registry), protobuf_codec)
        except ModuleNotFoundError as exc:
            raise MissingDependencyError(
                f"payload_format '{payload_format}' needs the Python package '{exc.name}': "
                "pip install 'sluice[registry]'"
            ) from exc
    return Unsupported(payload_format)


def event_table(decoded: Decoded, timestamps_us: npt.NDArray[np.int64]) -> pa.Table:
    """The decoded rows with ``_event_ts`` (timestamp[us, UTC]) from the source's timestamps.

    ``timestamps_us`` holds one timestamp per *payload* (negative: unknown,
    null); each row takes the one of the payload it came from. A payload
    field named ``_event_ts`` is replaced: the source's clock is the event time.
    """
    ts = timestamps_us if decoded.rows is None else timestamps_us[decoded.rows]
    micros = pa.array(ts, pa.int64(), mask=ts < 0).cast(EVENT_TS_TYPE)
    table = decoded.table
    if EVENT_TS in table.column_names:
        table = table.drop_columns([EVENT_TS])
    return table.append_column(pa.field(EVENT_TS, EVENT_TS_TYPE), micros)


def with_event_ts(table: pa.Table, default_us: int) -> pa.Table:
    """``table`` with ``_event_ts``: its own column cast to timestamp[us, UTC] when
    it has one (files that carry their event time), else ``default_us`` on every row."""
    if EVENT_TS not in table.column_names:
        ts = pa.array(np.full(table.num_rows, default_us, np.int64)).cast(EVENT_TS_TYPE)
        return table.append_column(pa.field(EVENT_TS, EVENT_TS_TYPE), ts)
    if table.schema.field(EVENT_TS).type != EVENT_TS_TYPE:
        return table.set_column(
            table.column_names.index(EVENT_TS), EVENT_TS, pc.cast(table[EVENT_TS], EVENT_TS_TYPE)
        )
    return table
