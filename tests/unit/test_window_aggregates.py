"""The window aggregates one by one: the registry of kinds, how a configured
aggregation compiles, and a snapshot written before the aggregates were classes
restoring into them (the blob format must stay readable)."""

from __future__ import annotations

import base64
import typing

import pyarrow as pa
import pytest

from sluice.config.spec import AggFunction, Aggregation, SessionWindow, TumblingWindow
from sluice.engine.stages.window import WindowStage
from sluice.engine.stages.window.aggregates import (
    AGGREGATES,
    ApproxCountDistinct,
    ExactCountDistinct,
    compile_aggregates,
)
from sluice.errors import StageError

MS = 1000  # µs per ms
T0 = 1_700_000_040_000  # ms since the epoch, a whole minute


def test_every_configurable_agg_has_one_aggregate_class() -> None:
    assert set(AGGREGATES) == set(typing.get_args(AggFunction))
    for name, cls in AGGREGATES.items():
        assert cls.fn == name


def test_count_distinct_compiles_by_mode() -> None:
    got = compile_aggregates(
        [
            Aggregation(agg="count_distinct", column="p", as_="a"),
            Aggregation(agg="count_distinct", column="p", as_="b", mode="approximate"),
            Aggregation(
                agg="count_distinct",
                column="p",
                as_="c",
                mode="exact",
                max_distinct_values_per_group=5,
            ),
        ]
    )
    assert [type(a) for a in got] == [ApproxCountDistinct, ApproxCountDistinct, ExactCountDistinct]
    assert [a.index for a in got] == [0, 1, 2]
    assert [a.describe() for a in got] == [
        "count_distinct approximate(p)",
        "count_distinct approximate(p)",
        "count_distinct exact(p)",
    ]


@pytest.mark.parametrize(
    ("agg", "message"),
    [
        (Aggregation(agg="sum", as_="s"), r"aggregation 's' \(sum\) needs a column"),
        (
            Aggregation(agg="count_distinct", column="p", as_="d", mode="exact"),
            "exact count_distinct needs max_distinct_values_per_group",
        ),
    ],
)
def test_an_aggregation_that_cannot_compile_is_a_stage_error(
    agg: Aggregation, message: str
) -> None:
    with pytest.raises(StageError, match=message):
        WindowStage(TumblingWindow(duration_ms=1000, aggregations=[agg]), "test")


@pytest.mark.parametrize(
    ("agg", "column", "message"),
    [
        ("sum", pa.array(["a"]), "sum 's': column 'v' is string"),
        ("avg", pa.array([True]), "avg 's': column 'v' is bool"),
        ("count_distinct", pa.array([[1]]), "count_distinct 's': column 'v' of type list"),
    ],
)
def test_an_aggregate_refuses_a_column_type_it_cannot_fold(
    agg: AggFunction, column: pa.Array, message: str
) -> None:
    spec = TumblingWindow(
        duration_ms=1000,
        aggregations=[Aggregation(agg=agg, column="v", as_="s")],
    )
    stage = WindowStage(spec, "test")
    stage.open()
    data = pa.table({"_event_ts": pa.array([T0 * MS], pa.timestamp("us", tz="UTC")), "v": column})
    with pytest.raises(StageError, match=message):
        stage.process(data, None)
    assert stage.state_size() == 0


# A session window snapshot (format 1) taken by the window stage as it was before
# the aggregates became classes (commit 1792c5a): every aggregate kind, two
# open sessions a key, a null `last`, exact and approximate count_distinct.
OLD_SPEC = SessionWindow(
    gap_ms=1000,
    max_session_duration_ms=60_000,
    group_by=["k"],
    aggregations=[
        Aggregation(agg="count", as_="n"),
        Aggregation(agg="count_col", column="v", as_="nv"),
        Aggregation(agg="sum", column="v", as_="sv"),
        Aggregation(agg="avg", column="v", as_="av"),
        Aggregation(agg="min", column="v", as_="mn"),
        Aggregation(agg="max", column="v", as_="mx"),
        Aggregation(agg="first", column="p", as_="fp"),
        Aggregation(agg="last", column="p", as_="lp"),
        Aggregation(
            agg="count_distinct",
            column="p",
            as_="dp",
            mode="exact",
            max_distinct_values_per_group=10,
        ),
        Aggregation(agg="count_distinct", column="p", as_="hp"),
    ],
)
OLD_BLOB = base64.b64decode(
    "U1dOAXEBAABG4s0SeyJjb25maWciOnsiYWdncmVnYXRpb25zIjpbImNvdW50KCkiLCJjb3VudF9jb2wodikiLCJz"
    "dW0odikiLCJhdmcodikiLCJtaW4odikiLCJtYXgodikiLCJmaXJzdChwKSIsImxhc3QocCkiLCJjb3VudF9kaXN0"
    "aW5jdCBleGFjdChwKSIsImNvdW50X2Rpc3RpbmN0IGFwcHJveGltYXRlKHApIl0sImdhcF9tcyI6MTAwMCwiZ3Jv"
    "dXBfYnkiOlsiayJdLCJraW5kIjoic2Vzc2lvbiIsIm1heF9zZXNzaW9uX2R1cmF0aW9uX21zIjo2MDAwMH0sIm5l"
    "eHRfaWQiOjQsInBpZWNlcyI6W1sic3RhdGUiLDMxNjhdLFsiZGlzdGluY3Q4Iiw1MzZdLFsiaGxsOSIsNTYwXV0s"
    "InNlcSI6NywidHoiOiJVVEMiLCJ3YXRlcm1hcmtfdXMiOjE3MDAwMDAwMzk5OTkwMDB9/////0AEAAAQAAAAAAAK"
    "AAwABgAFAAgACgAAAAABBAAMAAAACAAIAAAABAAIAAAABAAAABQAAADUAwAAkAMAAFwDAAAsAwAAAAMAAMwCAACY"
    "AgAAZAIAADACAAD8AQAAyAEAAJQBAABgAQAALAEAAPgAAADEAAAAkAAAAGQAAAA4AAAABAAAAIz8//8AAAECEAAA"
    "ABgAAAAEAAAAAAAAAAQAAABfX2E4AAAAAHz8//8AAAABQAAAALz8//8AAAEFEAAAABgAAAAEAAAAAAAAAAQAAABf"
    "X2E3AAAAAEj9///k/P//AAABBRAAAAAYAAAABAAAAAAAAAAEAAAAX19hNgAAAABw/f//DP3//wAAAQIQAAAAGAAA"
    "AAQAAAAAAAAABAAAAF9fYTUAAAAA/Pz//wAAAAFAAAAAPP3//wAAAQIQAAAAGAAAAAQAAAAAAAAABAAAAF9fYTQA"
    "AAAALP3//wAAAAFAAAAAbP3//wAAAQIQAAAAGAAAAAQAAAAAAAAABQAAAF9fYTNuAAAAXP3//wAAAAFAAAAAnP3/"
    "/wAAAQIQAAAAGAAAAAQAAAAAAAAABAAAAF9fYTMAAAAAjP3//wAAAAFAAAAAzP3//wAAAQIQAAAAGAAAAAQAAAAA"
    "AAAABAAAAF9fYTIAAAAAvP3//wAAAAFAAAAA/P3//wAAAQIQAAAAGAAAAAQAAAAAAAAABAAAAF9fYTEAAAAA7P3/"
    "/wAAAAFAAAAALP7//wAAAQIQAAAAGAAAAAQAAAAAAAAABAAAAF9fYTAAAAAAHP7//wAAAAFAAAAAXP7//wAAAQIQ"
    "AAAAGAAAAAQAAAAAAAAABgAAAF9fbHNlcQAATP7//wAAAAFAAAAAjP7//wAAAQIQAAAAGAAAAAQAAAAAAAAABQAA"
    "AF9fbHRzAAAAfP7//wAAAAFAAAAAvP7//wAAAQIQAAAAGAAAAAQAAAAAAAAABgAAAF9fZnNlcQAArP7//wAAAAFA"
    "AAAA7P7//wAAAQIQAAAAGAAAAAQAAAAAAAAABQAAAF9fZnRzAAAA3P7//wAAAAFAAAAAHP///wAAAQIQAAAAGAAA"
    "AAQAAAAAAAAABAAAAF9faWQAAAAADP///wAAAAFAAAAATP///wAAAQYQAAAAGAAAAAQAAAAAAAAABwAAAF9fZGly"
    "dHkA2P///3T///8AAAEFEAAAABwAAAAEAAAAAAAAAAQAAABfX2swAAAAAAQABAAEAAAAoP///wAAAQIQAAAAGAAA"
    "AAQAAAAAAAAABgAAAF9fbGFzdAAAkP///wAAAAFAAAAA0P///wAAAQIQAAAAGAAAAAQAAAAAAAAABAAAAF9fd2UA"
    "AAAAwP///wAAAAFAAAAAEAAUAAgABgAHAAwAAAAQABAAAAAAAAECEAAAACAAAAAEAAAAAAAAAAQAAABfX3dzAAAA"
    "AAgADAAIAAcACAAAAAAAAAFAAAAAAAAAAP////9gBAAAFAAAAAAAAAAMABgABgAFAAgADAAMAAAAAAMEABwAAACo"
    "AwAAAAAAAAAAAAAMAB4AEAAEAAgADAAMAAAA4AIAACQAAAAYAAAABAAAAAAAAAAAAAAAAAAGAAgABwAGAAAAAAAA"
    "ASsAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAxAAAAAAAAADgAAAAAAAAAAAAAAAAAAAA4AAAAAAAAAC4AAAAA"
    "AAAAaAAAAAAAAAAAAAAAAAAAAGgAAAAAAAAALgAAAAAAAACYAAAAAAAAAAAAAAAAAAAAmAAAAAAAAAAlAAAAAAAA"
    "AMAAAAAAAAAAFQAAAAAAAADYAAAAAAAAAAAAAAAAAAAA2AAAAAAAAAASAAAAAAAAAPAAAAAAAAAAAAAAAAAAAADw"
    "AAAAAAAAACYAAAAAAAAAGAEAAAAAAAAAAAAAAAAAABgBAAAAAAAAMQAAAAAAAABQAQAAAAAAAAAAAAAAAAAAUAEA"
    "AAAAAAAmAAAAAAAAAHgBAAAAAAAAAAAAAAAAAAB4AQAAAAAAAC4AAAAAAAAAqAEAAAAAAAAAAAAAAAAAAKgBAAAA"
    "AAAAJgAAAAAAAADQAQAAAAAAAAAAAAAAAAAA0AEAAAAAAAAmAAAAAAAAAPgBAAAAAAAAAAAAAAAAAAD4AQAAAAAA"
    "ACYAAAAAAAAAIAIAAAAAAAAAAAAAAAAAACACAAAAAAAAJgAAAAAAAABIAgAAAAAAAAAAAAAAAAAASAIAAAAAAAAm"
    "AAAAAAAAAHACAAAAAAAAAAAAAAAAAABwAgAAAAAAACYAAAAAAAAAmAIAAAAAAAAAAAAAAAAAAJgCAAAAAAAAJgAA"
    "AAAAAADAAgAAAAAAAAAAAAAAAAAAwAIAAAAAAAAmAAAAAAAAAOgCAAAAAAAAAAAAAAAAAADoAgAAAAAAACUAAAAA"
    "AAAAEAMAAAAAAAAVAAAAAAAAACgDAAAAAAAAEgAAAAAAAABAAwAAAAAAACUAAAAAAAAAaAMAAAAAAAAUAAAAAAAA"
    "AIADAAAAAAAAAAAAAAAAAACAAwAAAAAAACYAAAAAAAAAAAAAABQAAAAEAAAAAAAAAAAAAAAAAAAABAAAAAAAAAAA"
    "AAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAEAAAAAAAAAAAAAAAAAAAABAAAAAAAAAAAAAAAAAAAAAQAAAAAAAAAAAAA"
    "AAAAAAAEAAAAAAAAAAAAAAAAAAAABAAAAAAAAAAAAAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAEAAAAAAAAAAAAAAAA"
    "AAAABAAAAAAAAAAAAAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAEAAAAAAAAAAAAAAAAAAAABAAAAAAAAAAAAAAAAAAA"
    "AAQAAAAAAAAAAAAAAAAAAAAEAAAAAAAAAAAAAAAAAAAABAAAAAAAAAAAAAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAE"
    "AAAAAAAAAAEAAAAAAAAABAAAAAAAAAAAAAAAAAAAACAAAAAAAAAAKLUv/SAgAQEAAJqAGiQKBgAAo70aJAoGAECn"
    "gxokCgYAIETFGiQKBgAAAAAAAAAAIAAAAAAAAAAotS/9ICDtAACo4JedGiQKBgBA5cxgfZeG1BokCgYAAgBgxq7i"
    "BQAAIAAAAAAAAAAotS/9ICDtAACooFWOGiQKBgAAo70gO4hExRokCgYAAgBgxq7iBQAAFAAAAAAAAAAotS/9IBSh"
    "AAAAAAAAAQAAAAIAAAADAAAABAAAAAAAAAQAAAAAAAAAKLUv/SAEIQAAYWFiYgAAAAEAAAAAAAAAKLUv/SABCQAA"
    "DwAAAAAAACAAAAAAAAAAKLUv/SAgrQAAcAAAAQACAAMAAAAAAAAAA1QCAAMBAAAgAAAAAAAAACi1L/0gIAEBAACa"
    "gBokCgYAAKO9GiQKBgBAp4MaJAoGACBExRokCgYAAAAAAAAAACAAAAAAAAAAKLUv/SAgrQAAcAAABAAFAAYAAAAA"
    "AAAAA1QCAAMBAAAgAAAAAAAAACi1L/0gIO0AAKigVY4aJAoGAACjvSA7iETFGiQKBgACAGDGruIFAAAgAAAAAAAA"
    "ACi1L/0gIK0AAHADAAQAAgAGAAAAAAAAAANUAgADAQAAIAAAAAAAAAAotS/9ICCtAABwAwABAAIAAQAAAAAAAAAD"
    "VAIAAwEAACAAAAAAAAAAKLUv/SAgrQAAcAIAAQACAAEAAAAAAAAAA1QCAAMBAAAgAAAAAAAAACi1L/0gIK0AAHAF"
    "AAUACQAHAAAAAAAAAANUAgADAQAAIAAAAAAAAAAotS/9ICCtAABwBQAFAAkABwAAAAAAAAADVAIAAwEAACAAAAAA"
    "AAAAKLUv/SAgrQAAcAIAAQACAAEAAAAAAAAAA1QCAAMBAAAgAAAAAAAAACi1L/0gIK0AAHABAAUAAwAHAAAAAAAA"
    "AANUAgADAQAAIAAAAAAAAAAotS/9ICCtAABwBAAFAAYABwAAAAAAAAADVAIAAwEAABQAAAAAAAAAKLUv/SAUoQAA"
    "AAAAAAEAAAACAAAAAwAAAAQAAAAAAAAEAAAAAAAAACi1L/0gBCEAAHh6eXgAAAABAAAAAAAAACi1L/0gAQkAAA4A"
    "AAAAAAAUAAAAAAAAACi1L/0gFKEAAAAAAAAAAAAAAQAAAAIAAAADAAAAAAAAAwAAAAAAAAAotS/9IAMZAAB6eHgA"
    "AAAAIAAAAAAAAAAotS/9ICCtAABwAgABAAIAAQAAAAAAAAADVAIAAwEAAP////8AAAAA/////6gAAAAQAAAAAAAK"
    "AAwABgAFAAgACgAAAAABBAAMAAAACAAIAAAABAAIAAAABAAAAAIAAABAAAAABAAAANj///8AAAEFEAAAABgAAAAE"
    "AAAAAAAAAAMAAABfX3YABAAEAAQAAAAQABQACAAGAAcADAAAABAAEAAAAAAAAQIQAAAAIAAAAAQAAAAAAAAABAAA"
    "AF9faWQAAAAACAAMAAgABwAIAAAAAAAAAUAAAAD/////4AAAABQAAAAAAAAADAAYAAYABQAIAAwADAAAAAADBAAc"
    "AAAAeAAAAAAAAAAAAAAADAAeABAABAAIAAwADAAAAIAAAAAkAAAAGAAAAAYAAAAAAAAAAAAAAAAABgAIAAcABgAA"
    "AAAAAAEFAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAKQAAAAAAAAAwAAAAAAAAAAAAAAAAAAAAMAAAAAAAAAAt"
    "AAAAAAAAAGAAAAAAAAAAFwAAAAAAAAAAAAAAAgAAAAYAAAAAAAAAAAAAAAAAAAAGAAAAAAAAAAAAAAAAAAAAMAAA"
    "AAAAAAAotS/9IDDFAACAAAACAAEAAgADAAAAAAAAAARQAgBjDHIAAAAAAAAAHAAAAAAAAAAotS/9IBzhAAAAAAAA"
    "AQAAAAIAAAADAAAABAAAAAUAAAAGAAAAAAAABgAAAAAAAAAotS/9IAYxAAB4eXh6eXgA/////wAAAAD/////sAAA"
    "ABAAAAAAAAoADAAGAAUACAAKAAAAAAEEAAwAAAAIAAgAAAAEAAgAAAAEAAAAAgAAAEgAAAAEAAAA0P///wAAARMQ"
    "AAAAIAAAAAQAAAAAAAAACAAAAF9fc2tldGNoAAAAAAQABAAEAAAAEAAUAAgABgAHAAwAAAAQABAAAAAAAAECEAAA"
    "ACAAAAAEAAAAAAAAAAQAAABfX2lkAAAAAAgADAAIAAcACAAAAAAAAAFAAAAA/////+AAAAAUAAAAAAAAAAwAGAAG"
    "AAUACAAMAAwAAAAAAwQAHAAAAIgAAAAAAAAAAAAAAAwAHgAQAAQACAAMAAwAAACAAAAAJAAAABgAAAAEAAAAAAAA"
    "AAAAAAAAAAYACAAHAAYAAAAAAAABBQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAACYAAAAAAAAAKAAAAAAAAAAA"
    "AAAAAAAAACgAAAAAAAAAKAAAAAAAAABQAAAAAAAAADYAAAAAAAAAAAAAAAIAAAAEAAAAAAAAAAAAAAAAAAAABAAA"
    "AAAAAAAAAAAAAAAAACAAAAAAAAAAKLUv/SAgrQAAcAAAAQACAAMAAAAAAAAAA1QCAAMBAAAoAAAAAAAAACi1L/0g"
    "KL0AAIAAABAAHAAsADgAAAAAAAAABFQCAAMBOAAAAAAAAAAotS/9IDgtAQDQAgEHDAMIAghy4pIO/ZORBgEICiG4"
    "B3Likg4DAD89eBnFDHMJAAD/////AAAAAA=="
)


def test_a_snapshot_written_before_the_split_restores() -> None:
    stage = WindowStage(OLD_SPEC, "test")
    stage.open()
    stage.restore({"window": OLD_BLOB})
    assert stage.state_size() == 4
    assert stage.watermark_us == (T0 - 1) * MS
    # a late-arriving row of key b bridges nothing: it extends b's second session
    more = pa.table(
        {
            "_event_ts": pa.array([(T0 + 5000) * MS], pa.timestamp("us", tz="UTC")),
            "k": ["b"],
            "v": pa.array([8]),
            "p": ["w"],
        }
    )
    assert len(stage.process(more, None).late) == 0
    out = stage.advance((T0 + 10**6) * MS).emitted
    assert out["window_start"].cast(pa.int64()).to_pylist() == [
        (T0 + t) * MS for t in (0, 200, 4000, 4500)
    ]
    assert out["window_end"].cast(pa.int64()).to_pylist() == [
        (T0 + t) * MS for t in (1900, 1500, 5000, 6000)
    ]
    rows = out.drop_columns(["window_start", "window_end", "session_id"]).to_pylist()
    assert rows == [
        {"k": "a", "n": 3, "nv": 2, "sv": 5, "av": 2.5, "mn": 1, "mx": 4}
        | {"fp": "x", "lp": None, "dp": 2, "hp": 2},
        {"k": "b", "n": 2, "nv": 2, "sv": 9, "av": 4.5, "mn": 3, "mx": 6}
        | {"fp": "y", "lp": "x", "dp": 2, "hp": 2},
        {"k": "a", "n": 1, "nv": 1, "sv": 5, "av": 5.0, "mn": 5, "mx": 5}
        | {"fp": "z", "lp": "z", "dp": 1, "hp": 1},
        {"k": "b", "n": 2, "nv": 2, "sv": 15, "av": 7.5, "mn": 7, "mx": 8}
        | {"fp": "x", "lp": "w", "dp": 2, "hp": 2},
    ]
    assert out["session_id"].to_pylist()[:3] == [
        7058736723528717761,
        10047083183887440540,
        7682305772711724894,
    ]
