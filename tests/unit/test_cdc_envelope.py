"""CDC envelope decoding: every envelope form, op_map, key fallback, tombstones, bad messages."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from sluice.config import load_text
from sluice.config.spec import CdcSpec
from sluice.engine import metrics as m
from sluice.errors import ConnectorError
from sluice.formats.cdc import (
    HASH,
    IMAGE,
    KEY,
    OP,
    SEQ,
    TS,
    EnvelopeDecoder,
)

enc = msgspec.json.encode


def decoder(pipeline: str = "unit", **cdc: Any) -> EnvelopeDecoder:
    return EnvelopeDecoder(CdcSpec(**cdc), pipeline)


def rows(d: EnvelopeDecoder, payloads: list[bytes | None], offsets: list[int] | None = None):
    decoded = d.decode(payloads, offsets)
    table = decoded.table.select([KEY, OP, TS, SEQ, IMAGE]).to_pylist()
    return [tuple(r.values()) for r in table], decoded.bad, decoded.rows


def skipped(pipeline: str) -> float:
    return m.REGISTRY.get_sample_value("sluice_cdc_skipped_total", {"pipeline": pipeline}) or 0.0


# -- Debezium -------------------------------------------------------------------------


def dbz(op: str, before: Any, after: Any, ts: int = 1000, **extra: Any) -> bytes:
    return enc({"before": before, "after": after, "op": op, "source": {"ts_ms": ts}, **extra})


def test_debezium_every_op_with_its_image_time_and_offset() -> None:
    d = decoder(envelope="debezium", key_field="after.id")
    got, bad, index = rows(
        d,
        [
            dbz("r", None, {"id": 1, "v": "snap"}, 10),
            dbz("c", None, {"id": 2, "v": "new"}, 11),
            dbz("u", {"id": 2, "v": "new"}, {"id": 2, "v": "upd"}, 12),
            dbz("d", {"id": 2, "v": "upd"}, None, 13),
        ],
        [40, 41, 42, 43],
    )
    assert bad == []
    assert index == [0, 1, 2, 3]
    assert got == [
        ("1", "r", 10, 40, '{"id":1,"v":"snap"}'),
        ("2", "c", 11, 41, '{"id":2,"v":"new"}'),
        ("2", "u", 12, 42, '{"id":2,"v":"upd"}'),
        # A delete's key falls back to before.id; its image is the before image.
        ("2", "d", 13, 43, '{"id":2,"v":"upd"}'),
    ]


def test_debezium_schema_and_payload_form_and_the_bare_form_mix() -> None:
    d = decoder(envelope="debezium", key_field="after.id")
    wrapped = enc(
        {
            "schema": {"type": "struct", "fields": [{"field": "before"}]},
            "payload": {"op": "c", "after": {"id": "k1"}, "source": {"ts_ms": 5}},
        }
    )
    got, bad, _ = rows(d, [wrapped, dbz("u", None, {"id": "k1", "n": 1.5}, 6)])
    assert bad == []
    assert got == [
        ('"k1"', "c", 5, -1, '{"id":"k1"}'),
        ('"k1"', "u", 6, -1, '{"id":"k1","n":1.5}'),
    ]
    # key_field may name the payload too.
    d = decoder(envelope="debezium", key_field="payload.after.id")
    assert rows(d, [wrapped])[0] == [('"k1"', "c", 5, -1, '{"id":"k1"}')]


def test_tombstones_are_skipped_and_counted_not_bad() -> None:
    d = decoder("tomb", envelope="debezium", key_field="after.id")
    before = skipped("tomb")
    got, bad, index = rows(
        d,
        [
            dbz("d", {"id": 7}, None, 3),
            None,  # Kafka tombstone after a delete
            enc({"schema": {"type": "struct"}, "payload": None}),  # converter with schemas on
            dbz("c", None, {"id": 8}, 4),
        ],
    )
    assert bad == []
    assert index == [0, 3]
    assert [g[:2] for g in got] == [("7", "d"), ("8", "c")]
    assert skipped("tomb") - before == 2


def test_a_delete_without_a_before_image_keys_on_key_field() -> None:
    # REPLICA IDENTITY NOTHING: no before image; the key is in the Kafka key only.
    # Here key_field points at after.id, so a delete without any image has no key.
    d = decoder(envelope="debezium", key_field="after.id")
    got, bad, _ = rows(d, [dbz("d", None, None, 3)])
    assert got == []
    assert bad == [(0, "no key at 'after.id'")]
    # With the key in the before image only, the image is synthesised from it.
    d = decoder(envelope="debezium", key_field="before.id")
    got, _, _ = rows(d, [dbz("d", {"id": 9}, None, 3)])
    assert got == [("9", "d", 3, -1, '{"id":9}')]


def test_bad_envelopes_are_reported_by_index_with_the_reason_and_counted() -> None:
    d = decoder("bad", envelope="debezium", key_field="after.id")
    before = skipped("bad")
    payloads = [
        b"not json",
        enc([1, 2]),
        dbz("t", None, None, 1),  # truncate: outside op_map
        enc({"after": {"id": 1}, "source": {"ts_ms": 1}}),  # no op
        enc({"op": "c", "after": {"id": 1}}),  # no time
        dbz("c", None, {"name": "no id"}, 1),
        dbz("c", None, None, 1),
        dbz("c", None, [1], 1),
        dbz("c", None, {"id": 3}, 1),
    ]
    got, bad, index = rows(d, payloads)
    assert index == [8]
    assert got == [("3", "c", 1, -1, '{"id":3}')]
    reasons = dict(bad)
    assert sorted(reasons) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert reasons[0].startswith("not a Debezium JSON envelope: JSON is malformed")
    assert reasons[1].startswith("not a Debezium JSON envelope: Expected `object`")
    assert reasons[2] == 'unknown operation "t" (op_map has c, u, d, r)'
    assert reasons[3] == "no operation at 'op'"
    assert reasons[4] == "no change time at 'source.ts_ms'"
    assert reasons[5] == "no key at 'after.id'"
    assert reasons[6] == "no key at 'after.id'"
    assert reasons[7] == "no key at 'after.id'"
    assert skipped("bad") - before == 8


def test_a_multi_line_payload_gives_a_one_line_image() -> None:
    d = decoder(envelope="debezium", key_field="after.id")
    pretty = b'{"op": "c",\n  "after": {\n    "id": 1,\r\n    "s": "a\\nb"\n  },\n  "source": {"ts_ms": 1.0}\n}'
    got, bad, _ = rows(d, [pretty])
    assert bad == []
    (key, op, ts, _, image) = got[0]
    assert (key, op, ts) == ("1", "c", 1)
    assert "\n" not in image and "\r" not in image
    assert msgspec.json.decode(image) == {"id": 1, "s": "a\nb"}


def test_the_fingerprint_tells_content_apart() -> None:
    d = decoder(envelope="debezium", key_field="after.id")
    table = d.decode(
        [
            dbz("c", None, {"id": 1, "v": 1}, 1),
            dbz("c", None, {"id": 1, "v": 1}, 2),  # same op and image, other time
            dbz("u", None, {"id": 1, "v": 1}, 1),  # other op
            dbz("c", None, {"id": 1, "v": 2}, 1),  # other image
        ]
    ).table
    h = table[HASH].to_pylist()
    assert h[0] == h[1]
    assert len({h[0], h[2], h[3]}) == 3


def test_an_empty_batch_and_an_all_tombstone_batch() -> None:
    d = decoder(envelope="debezium", key_field="after.id")
    assert d.decode([]).table.num_rows == 0
    decoded = d.decode([None, None])
    assert decoded.table.num_rows == 0
    assert decoded.bad == []
    assert decoded.rows == []


# -- Maxwell ----------------------------------------------------------------------------


def mx(kind: str, data: Any, ts: int, old: Any = None) -> bytes:
    body: dict[str, Any] = {"database": "db", "table": "t", "type": kind, "ts": ts, "data": data}
    if old is not None:
        body["old"] = old
    return enc(body)


def test_maxwell_types_times_in_seconds_and_markers() -> None:
    d = decoder("mx", envelope="maxwell", key_field="data.id")
    before = skipped("mx")
    got, bad, index = rows(
        d,
        [
            mx("bootstrap-start", {}, 1_700_000_000),
            mx("bootstrap-insert", {"id": 1, "v": "a"}, 1_700_000_000),
            mx("bootstrap-complete", {}, 1_700_000_000),
            mx("insert", {"id": 2, "v": "b"}, 1_700_000_001),
            mx("update", {"id": 2, "v": "c"}, 1_700_000_002, old={"v": "b"}),
            mx("delete", {"id": 2, "v": "c"}, 1_700_000_003),
            mx("insert", {"id": 3}, 1_700_000_004_500),  # already in ms: kept
        ],
    )
    assert bad == []
    assert index == [1, 3, 4, 5, 6]
    assert got == [
        ("1", "r", 1_700_000_000_000, -1, '{"id":1,"v":"a"}'),
        ("2", "c", 1_700_000_001_000, -1, '{"id":2,"v":"b"}'),
        ("2", "u", 1_700_000_002_000, -1, '{"id":2,"v":"c"}'),
        ("2", "d", 1_700_000_003_000, -1, '{"id":2,"v":"c"}'),
        ("3", "c", 1_700_000_004_500, -1, '{"id":3}'),
    ]
    assert skipped("mx") - before == 2


def test_maxwell_unknown_type_is_bad() -> None:
    d = decoder(envelope="maxwell", key_field="data.id")
    _, bad, _ = rows(d, [mx("upsert", {"id": 1}, 1)])
    assert bad == [
        (0, 'unknown operation "upsert" (op_map has insert, update, delete, bootstrap-insert)')
    ]


# -- custom -------------------------------------------------------------------------------


def custom(**overrides: Any) -> EnvelopeDecoder:
    cdc: dict[str, Any] = {
        "envelope": "custom",
        "key_field": "change.new.pk",
        "op_field": "change.kind",
        "op_map": {"INS": "create", "UPD": "update", "DEL": "delete", "SNAP": "read"},
        "before_field": "change.old",
        "after_field": "change.new",
        "ts_field": "meta.at_ms",
    }
    cdc.update(overrides)
    return decoder(**cdc)


def cu(kind: Any, old: Any, new: Any, at: Any) -> bytes:
    return enc({"change": {"kind": kind, "old": old, "new": new}, "meta": {"at_ms": at}})


def test_custom_paths_and_op_map_with_the_key_fallback() -> None:
    got, bad, _ = rows(
        custom(),
        [
            cu("SNAP", None, {"pk": "a", "x": 1}, 1),
            cu("INS", None, {"pk": "b"}, 2),
            cu("UPD", {"pk": "b"}, {"pk": "b", "x": 2}, 3),
            cu("DEL", {"pk": "b", "x": 2}, None, 4),
            cu("MERGE", None, {"pk": "c"}, 5),
        ],
    )
    assert got == [
        ('"a"', "r", 1, -1, '{"pk":"a","x":1}'),
        ('"b"', "c", 2, -1, '{"pk":"b"}'),
        ('"b"', "u", 3, -1, '{"pk":"b","x":2}'),
        ('"b"', "d", 4, -1, '{"pk":"b","x":2}'),
    ]
    assert bad == [(4, 'unknown operation "MERGE" (op_map has INS, UPD, DEL, SNAP)')]


def test_custom_numeric_op_values_and_a_key_outside_the_images() -> None:
    d = custom(op_map={"1": "create", "2": "update", "3": "delete"}, key_field="meta.key")
    payloads = [
        enc({"change": {"kind": 1, "new": {"v": 1}}, "meta": {"at_ms": 10, "key": 42}}),
        enc({"change": {"kind": "3", "old": {"v": 1}}, "meta": {"at_ms": 11, "key": 42}}),
    ]
    got, bad, _ = rows(d, payloads)
    assert bad == []
    assert got == [("42", "c", 10, -1, '{"v":1}'), ("42", "d", 11, -1, '{"v":1}')]


def test_custom_paths_that_overlap_are_refused_naming_them() -> None:
    with pytest.raises(ConnectorError, match=r"\[transform.cdc\]: path 'change.kind.x'"):
        custom(ts_field="change.kind.x")


# -- configuration ----------------------------------------------------------------------


CDC_FILE = """
pipeline_name = "p"
source_query = "t"
[source]
kind = "kafka"
bootstrap_servers = "127.0.0.1:1"
{source_extra}
[target]
kind = "postgres"
url = "postgresql://u@h/db"
[target.table]
name = "m"
[transform.cdc]
{cdc}
"""


def test_the_kafka_source_refuses_a_cdc_pipeline_that_is_not_json() -> None:
    from sluice.connectors.registry import Context, build_source

    spec = load_text(
        CDC_FILE.format(
            source_extra='payload_format = "raw_bytes"',
            cdc='envelope = "debezium"\nkey_field = "after.id"',
        )
    )
    assert spec.source is not None
    with pytest.raises(ConnectorError, match='payload_format = "json"'):
        build_source(spec.source, Context(spec))


def test_build_targets_refuses_a_target_cdc_cannot_apply_to() -> None:
    from sluice.engine.cdc import build_targets
    from sluice.errors import SluiceError

    spec = load_text(
        CDC_FILE.format(source_extra="", cdc='envelope = "debezium"\nkey_field = "after.id"')
    )
    no_cdc = msgspec.structs.replace(spec, transform=None)
    with pytest.raises(SluiceError, match=r"needs a pipeline with \[transform.cdc\]"):
        build_targets(no_cdc)
