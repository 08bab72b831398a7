"""Bulk JSON decoding and the documented schema rule."""

from __future__ import annotations

import pyarrow as pa

from sluice.formats.json import JsonDecoder


def test_a_batch_decodes_in_one_call_with_inferred_types() -> None:
    d = JsonDecoder()
    out = d.decode([b'{"a": 1, "b": "x", "c": true}', b'{"a": 2, "b": null, "c": false}'])
    assert out.bad == [] and out.rows is None
    assert out.table.to_pydict() == {"a": [1, 2], "b": ["x", None], "c": [True, False]}
    assert out.table.schema.field("a").type == pa.int64()


def test_a_new_field_becomes_a_new_column_and_the_schema_stays_locked() -> None:
    d = JsonDecoder()
    d.decode([b'{"a": 1}'])
    out = d.decode([b'{"a": 2, "extra": "y"}', b'{"a": 3}'])
    assert out.table.column_names == ["a", "extra"]
    assert out.table["extra"].to_pylist() == ["y", None]
    assert d.schema is not None and d.schema.names == ["a", "extra"]


def test_an_integer_column_widens_to_float_on_a_fraction() -> None:
    d = JsonDecoder()
    d.decode([b'{"a": 1}'])
    out = d.decode([b'{"a": 1.5}', b'{"a": 2}'])
    assert out.bad == []
    assert out.table["a"].to_pylist() == [1.5, 2.0]


def test_bad_messages_are_isolated_and_the_rest_decodes() -> None:
    d = JsonDecoder()
    d.decode([b'{"a": 1}'])
    out = d.decode([b'{"a": 2}', b"not json", b'{"a": "str"}', b"[1]", None, b'{\n "a": 3}'])
    assert [i for i, _ in out.bad] == [1, 2, 3, 4]
    reasons = dict(out.bad)
    assert reasons[1].startswith("invalid JSON")
    assert "does not fit" in reasons[2]
    assert reasons[3] == "expected a JSON object, got list"
    assert reasons[4] == "message has no value (tombstone)"
    assert out.rows == [0, 5]  # a multi-line message is fine
    assert out.table["a"].to_pylist() == [2, 3]
