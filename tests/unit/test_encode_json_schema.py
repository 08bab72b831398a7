"""The JSON schema the ``json_schema`` encoder derives accepts the JSON the
encoder writes, for every Arrow type it takes (checked by ``jsonschema``
itself, formats included), nulls too; an unsupported type is refused by name."""

from __future__ import annotations

import datetime
import decimal

import jsonschema
import msgspec
import pyarrow as pa
import pytest

from sluice.errors import ConnectorError
from sluice.formats.encode import _json_schema, json_payloads

UTC = datetime.UTC
TS = datetime.datetime(2026, 3, 1, 12, 0, 1, 123456, tzinfo=UTC)


def table() -> pa.Table:
    columns = {
        "i8": pa.array([1, None], pa.int8()),
        "u64": pa.array([2**64 - 1, None], pa.uint64()),
        "f32": pa.array([1.5, None], pa.float32()),
        "f64": pa.array([float("nan"), 2.0], pa.float64()),
        "dec": pa.array([decimal.Decimal("1.50"), None], pa.decimal128(10, 2)),
        "ok": pa.array([True, None]),
        "s": pa.array(['a "quoted"\n', None]),
        "b": pa.array([b"\x00\xff", None]),
        "ts_utc": pa.array([TS, None], pa.timestamp("us", tz="UTC")),
        "ts_ms": pa.array([TS.replace(tzinfo=None), None], pa.timestamp("ms")),
        "ts_ns": pa.array([TS, None], pa.timestamp("ns", tz="UTC")),
        "day": pa.array([datetime.date(2026, 1, 2), None], pa.date32()),
        "t": pa.array([datetime.time(3, 4, 5, 123000), None], pa.time32("ms")),
        "dur": pa.array([datetime.timedelta(seconds=1), None], pa.duration("us")),
        "tags": pa.array([["x", None], None], pa.list_(pa.string())),
        "addr": pa.array(
            [{"city": "c", "zip": 1}, None], pa.struct([("city", pa.string()), ("zip", pa.int32())])
        ),
        "attrs": pa.array([[("k", 1.0)], None], pa.map_(pa.string(), pa.float64())),
        "kind": pa.array(["a", None]).dictionary_encode(),
        "nothing": pa.nulls(2),
    }
    return pa.table(columns)


def test_derived_schema_accepts_every_payload() -> None:
    t = table()
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {f.name: _json_schema(f.type, f.name) for f in t.schema},
    }
    validator = jsonschema.Draft7Validator(
        schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )
    validator.check_schema(schema)
    rows = [msgspec.json.decode(p) for p in json_payloads(t)]
    for row in rows:
        assert set(row) == set(t.column_names)
        errors = [e.message for e in validator.iter_errors(row)]
        assert not errors
    assert rows[0]["ts_utc"] == "2026-03-01T12:00:01.123456Z"
    assert schema["properties"]["ts_utc"] == {"type": ["string", "null"], "format": "date-time"}
    assert schema["properties"]["u64"] == {"type": ["integer", "null"]}
    assert schema["properties"]["addr"]["properties"]["zip"] == {"type": ["integer", "null"]}
    assert schema["properties"]["attrs"]["additionalProperties"] == {"type": ["number", "null"]}
    # A wrong value is caught: the schema is not vacuous.
    assert list(validator.iter_errors({**rows[0], "i8": "x"}))
    assert list(validator.iter_errors({**rows[0], "ts_utc": "yesterday"}))


def test_unsupported_type_is_refused_by_name() -> None:
    with pytest.raises(ConnectorError, match="column 'iv' of type month_day_nano_interval"):
        _json_schema(pa.month_day_nano_interval(), "iv")
