"""``payload_format = "json_schema"`` (ours): JSON bodies framed by a schema registry.

Confluent's JSON Schema serializer writes magic byte 0 + the 4-byte schema
id + the JSON text (or the schema in a ``__value_schema_id`` header). Each
payload's schema must be a JSON schema in the registry (fetched once per
id); the bodies then decode like ``payload_format = "json"`` (one call for
the batch, the same schema rule). With ``json_schema_validation = true``
every body is also validated against its schema (one compiled validator per
schema id; this is per-message work, so it is asked for, not done by
default); a body that fails is a bad message (``on_error``) with the
validator's first error as the reason.

Cost: the 5-byte headers of a batch are read and blanked out with numpy
over the joined payloads (no Python per message), and the bodies go to the
bulk JSON reader as they are, so a batch costs what plain JSON costs. Only
a batch with a bad frame, an unusable schema or a schema id in a header
takes the per-message path. Validation compiles the schema into Python
code with ``fastjsonschema`` (drafts 6 and 7; formats unchecked, as
``jsonschema`` does by default) and runs ``jsonschema`` only to word the
reason of a body that fails (and for the drafts ``fastjsonschema`` lacks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa

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

    def decode(self, payloads: list[bytes | None], offsets: Sequence[int]) -> Decoded:
        """Payloads whose schema is in their prefix."""
        return self.decode_with_headers(payloads, None)

    def decode_with_headers(
        self, payloads: list[bytes | None], headers: Sequence[Headers] | None
    ) -> Decoded:
        """Payloads with their message headers (``None``: no headers)."""
        fast = self._fast(payloads, headers)
        if fast is not None:
            return fast
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

    def _fast(
        self, payloads: list[bytes | None], headers: Sequence[Headers] | None
    ) -> Decoded | None:
        """The whole batch in bulk, or ``None`` when some message needs the
        per-message path (a bad frame, a bad schema, a schema id in a header,
        a body that does not parse as one line of the stream's schema)."""
        n = len(payloads)
        if not n or None in payloads:
            return None
        if headers is not None and any(_schema_header(h) is not None for h in headers if h):
            return None
        joined = b"\n".join(payloads)  # type: ignore[arg-type]  # None excluded just above
        lengths = np.fromiter(map(len, payloads), dtype=np.int64, count=n)  # type: ignore[arg-type]
        if int(lengths.min()) < 5:
            return None
        starts = np.empty(n, dtype=np.int64)
        starts[0] = 0
        np.cumsum(lengths[:-1] + 1, out=starts[1:])
        buf = np.frombuffer(joined, dtype=np.uint8)
        if buf[starts].any():  # a magic byte other than 0
            return None
        ids = (
            (buf[starts + 1].astype(np.int64) << 24)
            | (buf[starts + 2].astype(np.int64) << 16)
            | (buf[starts + 3].astype(np.int64) << 8)
            | buf[starts + 4].astype(np.int64)
        )
        first = int(ids[0])
        keys = [first] if (ids == first).all() else [int(k) for k in np.unique(ids)]
        checks = [self._validator(k) for k in keys]
        if any(isinstance(c, str) for c in checks):
            return None
        validating = any(c is not None for c in checks)
        if validating and not all(
            _valid(c, p[5:]) for c, p in _with_checks(checks, keys, ids, payloads)
        ):
            return None
        blank = bytearray(joined)
        view = np.frombuffer(blank, dtype=np.uint8)
        for k in range(5):  # the header becomes whitespace before the JSON object
            view[starts + k] = 0x20
        table = self._json.parse_lines(bytes(blank), n)
        return None if table is None else Decoded(table)

    @staticmethod
    def _json_empty() -> Any:
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
                built = _Validator(cls(schema), _compiled(schema))
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


class _Validator:
    """A schema's ``jsonschema`` validator (the reference, which words the
    reasons) and its ``fastjsonschema`` function (``None``: a draft it lacks)."""

    __slots__ = ("compiled", "reference")

    def __init__(self, reference: Any, compiled: Any) -> None:
        self.reference = reference
        self.compiled = compiled


def _compiled(schema: Any) -> Any:
    """``schema`` compiled by fastjsonschema, or ``None`` (not installed, a
    draft it does not know, a schema it cannot compile)."""
    try:
        import fastjsonschema
    except ImportError:
        return None
    draft = schema.get("$schema", "") if isinstance(schema, dict) else ""
    if not isinstance(draft, str) or not any(f"draft-0{d}/" in draft for d in (6, 7)):
        return None  # 2019-09 / 2020-12 (or none: jsonschema takes the latest)
    try:
        return fastjsonschema.compile(schema, use_formats=False)
    except Exception:  # a schema fastjsonschema cannot compile: jsonschema alone
        return None


def _with_checks(checks: list[Any], keys: list[int], ids: Any, payloads: list[bytes | None]) -> Any:
    """(validator, payload) for each payload."""
    if len(keys) == 1:
        check = checks[0]
        return ((check, p) for p in payloads)
    by_key = dict(zip(keys, checks, strict=True))
    return ((by_key[int(k)], p) for k, p in zip(ids.tolist(), payloads, strict=True))


def _valid(validator: Any, body: bytes) -> bool:
    """Whether ``body`` satisfies the schema (``False`` also when it is not
    JSON: the per-message path then words why)."""
    if validator is None:
        return True
    return _invalid(validator, body) is None


def _invalid(validator: _Validator, body: bytes) -> str | None:
    """Why ``body`` does not satisfy the schema, or ``None``."""
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        return f"invalid JSON: {exc}"
    compiled = validator.compiled
    if compiled is not None:
        try:
            compiled(value)
        except Exception:  # JsonSchemaValueException: ask the reference below
            pass
        else:
            return None
    error = next(iter(validator.reference.iter_errors(value)), None)
    if error is None:
        return None
    path = "/".join(str(p) for p in error.absolute_path)
    return f"does not match its JSON schema{' at ' + path if path else ''}: {error.message}"
