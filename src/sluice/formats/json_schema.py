"""``payload_format = "json_schema"`` (ours): JSON bodies framed by a schema registry.

Confluent's JSON Schema serializer writes magic byte 0 + the 4-byte schema
id + the JSON text (or the schema in a ``__value_schema_id`` header). Each
payload's schema must be a JSON schema in the registry (fetched once per
id); the bodies then decode like ``payload_format = "json"`` (one call for
the batch, the same schema rule). With ``json_schema_validation = true``
every body is also validated against its schema (``jsonschema``, one
compiled validator per schema id; this is per-message Python work, so it is
asked for, not done by default); a body that fails is a bad message
(``on_error``) with the validator's first error as the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from sluice.errors import ConnectorError
from sluice.formats.confluent import BadFrame, Headers, _schema_header, frame
from sluice.formats.json import Decoded, JsonDecoder
from sluice.formats.registry import RegistryClient, UnknownSchema


class JsonSchemaDecoder:
    """Registry-framed JSON payloads, validated on request."""

    name = "json_schema"

    def __init__(self, client: RegistryClient, validate: bool) -> None:
        self.client = client
        self.validate = validate
        self._json = JsonDecoder()
        self._validators: dict[int | str, Any] = {}  # validator, or why the schema is unusable

    def decode(self, payloads: list[bytes | None], offsets: list[int]) -> Decoded:
        """Payloads whose schema is in their prefix."""
        return self.decode_with_headers(payloads, None)

    def decode_with_headers(
        self, payloads: list[bytes | None], headers: Sequence[Headers] | None
    ) -> Decoded:
        """Payloads with their message headers (``None``: no headers)."""
        bad: list[tuple[int, str]] = []
        bodies: list[bytes | None] = []
        index: list[int] = []
        for i, payload in enumerate(payloads):
            if payload is None:
                bad.append((i, "message has no value (tombstone)"))
                continue
            header = _schema_header(headers[i]) if headers is not None else None
            try:
                f = frame(payload, header, protobuf=False)
            except BadFrame as exc:
                bad.append((i, str(exc)))
                continue
            body = payload[f.start :]
            check = self._validator(f.key)
            if isinstance(check, str):
                bad.append((i, check))
                continue
            if check is not None:
                why = _invalid(check, body)
                if why is not None:
                    bad.append((i, f"json_schema schema {f.key}: {why}"))
                    continue
            bodies.append(body)
            index.append(i)
        if not bad:
            return self._json.decode(bodies)
        decoded = self._json.decode(bodies) if bodies else Decoded(self._json_empty(), [], [])
        rows = decoded.rows if decoded.rows is not None else list(range(len(bodies)))
        bad.extend((index[j], why) for j, why in decoded.bad)
        bad.sort()
        return Decoded(decoded.table, bad, [index[r] for r in rows])

    @staticmethod
    def _json_empty() -> Any:
        import pyarrow as pa

        return pa.table({})

    def _validator(self, key: int | str) -> Any:
        """The compiled validator of schema ``key`` (``None`` when not validating),
        or why the schema cannot be used."""
        if key in self._validators:
            return self._validators[key]
        try:
            registered = (
                self.client.by_guid(key) if isinstance(key, str) else self.client.schema(key)
            )
            if registered.schema_type != "JSON":
                raise ConnectorError(f"it is a {registered.schema_type} schema, not JSON")
            built: Any = None
            if self.validate:
                import jsonschema

                schema = msgspec.json.decode(registered.text)
                cls = jsonschema.validators.validator_for(schema)
                cls.check_schema(schema)
                built = cls(schema)
        except UnknownSchema:
            built = f"schema id {key} is not in the schema registry"
        except ConnectorError as exc:
            built = f"json_schema schema {key}: {exc}"
        except (msgspec.DecodeError, ImportError) as exc:
            built = f"json_schema schema {key}: {exc}"
        except Exception as exc:  # jsonschema.SchemaError: the registry holds a bad schema
            built = f"json_schema schema {key}: invalid JSON schema: {exc}"
        self._validators[key] = built
        return built


def _invalid(validator: Any, body: bytes) -> str | None:
    """Why ``body`` does not satisfy the schema, or ``None``."""
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        return f"invalid JSON: {exc}"
    error = next(iter(validator.iter_errors(value)), None)
    if error is None:
        return None
    path = "/".join(str(p) for p in error.absolute_path)
    return f"does not match its JSON schema{' at ' + path if path else ''}: {error.message}"
