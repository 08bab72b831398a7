"""``to_json_text`` against an independently built Python value.

Property-style without a property library: a seeded generator draws nested
Arrow types and values (nulls at every level, empty lists, unicode, control
characters, quotes, NaN/Inf, every timestamp unit with and without a zone,
binary, maps, decimals, ...). Alongside each input value it builds the JSON
value the documented format must decode to, from the Python value alone
(never from Arrow's formatting). Each array is checked whole, sliced
(``offset != 0``) and chunked. Example tests pin the exact text.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import random
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sluice.formats.jsontext import to_json_text

# -- the reference ------------------------------------------------------------


class Num:
    """Expected JSON number compared through a converter (float width, Decimal)."""

    def __init__(self, value: Any, kind: str) -> None:
        self.value: Any = value
        self.kind = kind

    def matches(self, got: Any) -> bool:
        if isinstance(got, bool) or not isinstance(got, int | Decimal):
            return False
        if self.kind == "decimal":
            return bool(Decimal(got) == self.value)
        if self.kind == "float32":
            return bool(np.float32(float(got)) == np.float32(self.value))
        if self.kind == "float16":
            return bool(np.float16(float(got)) == np.float16(self.value))
        return bool(float(got) == self.value)

    def __repr__(self) -> str:
        return f"Num({self.value!r}, {self.kind})"


def _no_constants(name: str) -> Any:
    raise AssertionError(f"JSON has the non-standard literal {name}")


def parse(text: str) -> Any:
    """Strict JSON: no NaN/Infinity literals, raw control characters refused."""
    return json.loads(text, parse_float=Decimal, parse_constant=_no_constants, strict=True)


def assert_same(got: Any, want: Any, path: str = "$") -> None:
    """``got`` (parsed JSON) equals ``want`` (reference), types and key order included."""
    if isinstance(want, Num):
        assert want.matches(got), f"{path}: {got!r} != {want!r}"
    elif isinstance(want, dict):
        assert isinstance(got, dict), f"{path}: {got!r} is not an object"
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list), f"{path}: {got!r} is not an array"
        assert len(got) == len(want), f"{path}: {len(got)} items != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}[{i}]")
    else:
        assert type(got) is type(want) and got == want, f"{path}: {got!r} != {want!r}"


def check(arr: pa.Array | pa.ChunkedArray, want: list[Any]) -> None:
    """Top-level nulls stay null; every other slot parses to its reference value."""
    out = to_json_text(arr)
    assert isinstance(out, pa.Array) and out.type == pa.string()
    assert len(out) == len(want)
    out.validate(full=True)
    for i, (text, w) in enumerate(zip(out.to_pylist(), want, strict=True)):
        if w is _TOP_NULL:
            assert text is None, f"[{i}]: a null slot gave {text!r}"
        else:
            assert text is not None, f"[{i}]: a valid slot gave a null"
            assert_same(parse(text), w, f"[{i}]")


_TOP_NULL = object()

_EPOCH = dt.datetime(1970, 1, 1)
_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_DIGITS = {"s": 0, "ms": 3, "us": 6, "ns": 9}


def iso_utc(ticks: int, unit: str) -> str:
    """``YYYY-MM-DDTHH:MM:SS[.f]Z`` of ``ticks`` ``unit``s since the epoch, by hand."""
    seconds, frac = divmod(ticks, _PER_SECOND[unit])
    d = _EPOCH + dt.timedelta(seconds=seconds)
    text = f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}"
    if _DIGITS[unit]:
        text += "." + str(frac).rjust(_DIGITS[unit], "0")
    return text + "Z"


def clock(ticks: int, unit: str) -> str:
    seconds, frac = divmod(ticks, _PER_SECOND[unit])
    text = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    if _DIGITS[unit]:
        text += "." + str(frac).rjust(_DIGITS[unit], "0")
    return text


# -- the generator ------------------------------------------------------------

_CHARS = [*"abZ0 \"\\/'é∆😀\u2028\x7f\ufeff", *(chr(c) for c in range(0x20))]
_NAMES = ["a", "b", "strike", "", 'q"uote', "back\\slash", "new\nline", "é", "tab\t", "{x}"]
_ZONES = [None, "UTC", "Europe/Paris", "+05:30", "America/New_York"]
_TS_RANGE = {  # years 0001 .. 9999 (Python's datetime range), int64 for ns
    "s": (-62_135_596_800, 253_402_300_799),
    "ms": (-62_135_596_800_000, 253_402_300_799_999),
    "us": (-62_135_596_800_000_000, 253_402_300_799_999_999),
    "ns": (-(2**63) + 1, 2**63 - 1),
}


def decimal(rng: random.Random, make: Any, max_precision: int) -> pa.DataType:
    precision = rng.randint(1, max_precision)
    return make(precision, rng.randint(0, min(precision, 12)))


def leaf_type(rng: random.Random) -> pa.DataType:
    unit = rng.choice(["s", "ms", "us", "ns"])
    return rng.choice(
        [
            pa.null(),
            pa.bool_(),
            pa.int8(),
            pa.int16(),
            pa.int32(),
            pa.int64(),
            pa.uint8(),
            pa.uint32(),
            pa.uint64(),
            pa.float16(),
            pa.float32(),
            pa.float64(),
            pa.float64(),
            decimal(rng, pa.decimal128, 38),
            decimal(rng, pa.decimal256, 76),
            pa.string(),
            pa.string(),
            pa.large_string(),
            pa.string_view(),
            pa.binary(),
            pa.large_binary(),
            pa.binary(3),
            pa.timestamp(unit, rng.choice(_ZONES)),
            pa.timestamp(unit, rng.choice(_ZONES)),
            pa.date32(),
            pa.date64(),
            rng.choice([pa.time32("s"), pa.time32("ms"), pa.time64("us"), pa.time64("ns")]),
            pa.duration(unit),
            pa.dictionary(pa.int8(), pa.string()),
        ]
    )


def nested_type(rng: random.Random, depth: int) -> pa.DataType:
    if depth == 0 or rng.random() < 0.3:
        return leaf_type(rng)
    kind = rng.choice(["list", "list", "large_list", "fixed_list", "struct", "struct", "map"])
    if kind == "list":
        return pa.list_(nested_type(rng, depth - 1))
    if kind == "large_list":
        return pa.large_list(nested_type(rng, depth - 1))
    if kind == "fixed_list":
        return pa.list_(nested_type(rng, depth - 1), rng.randint(1, 3))
    if kind == "struct":
        names = rng.sample(_NAMES, rng.randint(1, 4))
        return pa.struct([(n, nested_type(rng, depth - 1)) for n in names])
    key = rng.choice([pa.string(), pa.int64(), pa.bool_(), pa.binary(), pa.timestamp("ms")])
    return pa.map_(key, nested_type(rng, depth - 1))


def text(rng: random.Random) -> str:
    return "".join(rng.choice(_CHARS) for _ in range(rng.choice([0, 1, 3, 8])))


def value(rng: random.Random, t: pa.DataType, null_p: float = 0.15) -> tuple[Any, Any]:
    """``(input for pa.array, reference JSON value)``; JSON null is ``None``."""
    if pa.types.is_null(t) or rng.random() < null_p:
        return None, None
    if pa.types.is_boolean(t):
        b = rng.random() < 0.5
        return b, b
    if pa.types.is_integer(t):
        info = np.iinfo(t.to_pandas_dtype())
        i = rng.choice([int(info.min), int(info.max), 0, rng.randint(int(info.min), int(info.max))])
        return i, i
    if pa.types.is_floating(t):
        x = rng.choice(
            [
                *(math.nan, math.inf, -math.inf, -0.0, 0.1, 1e16, 5e-324, 1.7976931348623157e308),
                rng.uniform(-1e6, 1e6),
                rng.uniform(-1, 1) * 10.0 ** rng.randint(-30, 30),
            ]
        )
        kind = {16: "float16", 32: "float32", 64: "float64"}[t.bit_width]
        with np.errstate(over="ignore"):  # 1e308 as float16 is inf: also a case
            if kind == "float16":
                x = float(np.float16(x))
                return np.float16(x), Num(x, kind) if math.isfinite(x) else None
            if kind == "float32":
                x = float(np.float32(x))
        return x, Num(x, kind) if math.isfinite(x) else None
    if pa.types.is_decimal(t):
        digits = rng.randint(1, t.precision)
        unscaled = rng.randint(-(10**digits) + 1, 10**digits - 1)
        d = Decimal(unscaled).scaleb(-t.scale)
        return d, Num(d, "decimal")
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        s = text(rng)
        return s, s
    if pa.types.is_dictionary(t):
        s = rng.choice(["call", "put", 'sp"x', "ü\n"])
        return s, s
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        size = t.byte_width if pa.types.is_fixed_size_binary(t) else rng.choice([0, 1, 2, 5])
        raw = bytes(rng.randrange(256) for _ in range(size))
        return raw, "\\x" + raw.hex()
    if pa.types.is_timestamp(t):
        lo, hi = _TS_RANGE[t.unit]
        near = rng.randint(max(lo, -(10**12)), min(hi, 10**12))  # around 1970
        ticks = rng.choice([0, -1, lo, hi, rng.randint(lo, hi), near])
        return ticks, iso_utc(ticks, t.unit)
    if pa.types.is_date32(t) or pa.types.is_date64(t):
        days = rng.randint(-719_162, 2_932_896)  # 0001-01-01 .. 9999-12-31
        day = dt.date(1970, 1, 1) + dt.timedelta(days=days)
        return day, day.isoformat()
    if pa.types.is_time(t):
        ticks = rng.randrange(86_400 * _PER_SECOND[t.unit])
        return ticks, clock(ticks, t.unit)
    if pa.types.is_duration(t):
        ticks = rng.choice([0, -1, 1, 1500, rng.randint(-(10**15), 10**15)])
        micros = Decimal(ticks) * _PER_SECOND["us"] / _PER_SECOND[t.unit]
        return ticks, Num(micros, "decimal")
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        n = t.list_size if pa.types.is_fixed_size_list(t) else rng.choice([0, 0, 1, 2, 4])
        pairs = [value(rng, t.value_type) for _ in range(n)]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    if pa.types.is_map(t):
        entries, want = [], {}
        for _ in range(rng.choice([0, 1, 2, 3])):
            k, wk = value(rng, t.key_type, null_p=0)
            v, wv = value(rng, t.item_type)
            if pa.types.is_integer(t.key_type):
                wk = str(k)
            elif pa.types.is_boolean(t.key_type):
                wk = "true" if k else "false"
            entries.append((k, v))
            want[wk] = wv  # a repeated key: json.loads keeps the first place, last value
        return entries, want
    if pa.types.is_struct(t):
        obj, want = {}, {}
        for f in t:
            obj[f.name], want[f.name] = value(rng, f.type)
        return obj, want
    raise AssertionError(f"no generator for {t}")


def generated(seed: int) -> tuple[pa.Array, list[Any]]:
    rng = random.Random(seed)
    t = nested_type(rng, rng.randint(1, 3))
    pairs = [value(rng, t) for _ in range(rng.randint(0, 30))]
    arr = pa.array([p[0] for p in pairs], t)
    want = [_TOP_NULL if p[0] is None else p[1] for p in pairs]
    return arr, want


# -- properties ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(300))
def test_generated_arrays_match_the_reference(seed: int) -> None:
    arr, want = generated(seed)
    check(arr, want)


@pytest.mark.parametrize("seed", range(300, 400))
def test_slices_match_the_reference(seed: int) -> None:
    arr, want = generated(seed)
    rng = random.Random(seed)
    for _ in range(3):
        start = rng.randint(0, len(arr))
        length = rng.randint(0, len(arr) - start)
        check(arr.slice(start, length), want[start : start + length])


@pytest.mark.parametrize("seed", range(400, 450))
def test_chunked_arrays_match_the_reference(seed: int) -> None:
    arr, want = generated(seed)
    rng = random.Random(seed)
    cuts = sorted(rng.randint(0, len(arr)) for _ in range(3))
    bounds = [0, *cuts, len(arr)]
    chunks = [arr.slice(a, b - a) for a, b in itertools.pairwise(bounds)]
    check(pa.chunked_array(chunks, arr.type), want)


def test_the_benchmark_shape_matches_the_reference() -> None:
    rng = random.Random(7)
    t = pa.list_(
        pa.struct(
            [
                ("strike", pa.int64()),
                ("bid", pa.float64()),
                ("ask", pa.float64()),
                ("ts", pa.timestamp("us", "UTC")),
                ("tag", pa.string()),
            ]
        )
    )
    pairs = [value(rng, t, null_p=0.02) for _ in range(2_000)]
    want = [_TOP_NULL if p[0] is None else p[1] for p in pairs]
    check(pa.array([p[0] for p in pairs], t), want)


# -- exact text -----------------------------------------------------------------


def j(arr: pa.Array | pa.ChunkedArray) -> list[str | None]:
    out: list[str | None] = to_json_text(arr).to_pylist()
    return out


def test_structs_lists_and_nulls_at_every_level() -> None:
    t = pa.struct([("a", pa.list_(pa.int64())), ("b", pa.struct([("c", pa.string())]))])
    arr = pa.array(
        [
            {"a": [1, None], "b": {"c": "x"}},
            {"a": [], "b": None},
            {"a": None, "b": {"c": None}},
            None,
        ],
        t,
    )
    assert j(arr) == [
        '{"a":[1,null],"b":{"c":"x"}}',
        '{"a":[],"b":null}',
        '{"a":null,"b":{"c":null}}',
        None,
    ]


def test_field_names_are_json_escaped() -> None:
    arr = pa.array([{'q"\\\n': 1}], pa.struct([('q"\\\n', pa.int8())]))
    assert j(arr) == ['{"q\\"\\\\\\n":1}']


def test_strings_escape_quotes_backslashes_and_every_control_character() -> None:
    s = "".join(chr(c) for c in range(0x20)) + '"\\/é😀\x7f'
    (out,) = j(pa.array([s]))
    assert out == (
        '"\\u0000\\u0001\\u0002\\u0003\\u0004\\u0005\\u0006\\u0007\\b\\t\\n\\u000b\\f\\r'
        "\\u000e\\u000f\\u0010\\u0011\\u0012\\u0013\\u0014\\u0015\\u0016\\u0017\\u0018"
        '\\u0019\\u001a\\u001b\\u001c\\u001d\\u001e\\u001f\\"\\\\/é😀\x7f"'
    )
    assert json.loads(out) == s
    assert j(pa.array(["plain", "", None])) == ['"plain"', '""', None]


def test_floats_nan_and_infinity_become_null() -> None:
    arr = pa.array([[0.1, math.nan, math.inf, -math.inf, -0.0, 1e16, 1.0]])
    assert j(arr) == ["[0.1,null,null,null,-0,1e+16,1]"]
    # At the top level a NaN is the JSON text null, a null slot a SQL NULL.
    assert j(pa.array([math.nan, None, 2.5])) == ["null", None, "2.5"]
    assert j(pa.array([np.float16(0.5), np.float16("inf")], pa.float16())) == ["0.5", "null"]


@pytest.mark.parametrize(
    ("unit", "text"),
    [
        ("s", "2026-01-02T03:04:05Z"),
        ("ms", "2026-01-02T03:04:05.123Z"),
        ("us", "2026-01-02T03:04:05.123456Z"),
        ("ns", "2026-01-02T03:04:05.123456789Z"),
    ],
)
@pytest.mark.parametrize("tz", [None, "UTC", "Asia/Tokyo", "-03:00"])
def test_timestamps_are_utc_iso_8601_with_z(unit: str, text: str, tz: str | None) -> None:
    ticks = 1_767_323_045_123_456_789 // (1_000_000_000 // _PER_SECOND[unit])
    arr = pa.array([{"t": ticks}, {"t": None}], pa.struct([("t", pa.timestamp(unit, tz))]))
    assert j(arr) == ['{"t":"' + text + '"}', '{"t":null}']


def test_timestamps_outside_four_digit_years_still_become_strings() -> None:
    arr = pa.array([[-62_167_219_201, 253_402_300_800, 0]], pa.list_(pa.timestamp("s", "UTC")))
    assert j(arr) == ['["-0001-12-31T23:59:59Z","10000-01-01T00:00:00Z","1970-01-01T00:00:00Z"]']


def test_binary_is_backslash_x_lowercase_hex_like_postgres() -> None:
    arr = pa.array([[b"\x0a\x0b\xff", b"", None]], pa.list_(pa.binary()))
    assert j(arr) == ['["\\\\x0a0bff","\\\\x",null]']
    assert json.loads(j(arr)[0] or "") == ["\\x0a0bff", "\\x", None]
    assert j(pa.array([b"\xab\xcd", None], pa.binary(2))) == ['"\\\\xabcd"', None]
    assert j(pa.array([b"\x01"], pa.large_binary()).slice(0)) == ['"\\\\x01"']


def test_dates_times_decimals_and_durations() -> None:
    assert j(pa.array([[dt.date(2026, 1, 2), dt.date(1, 1, 1)]])) == ['["2026-01-02","0001-01-01"]']
    assert j(pa.array([[dt.time(3, 4, 5, 123456)]], pa.list_(pa.time64("us")))) == [
        '["03:04:05.123456"]'
    ]
    dec = pa.array(
        [[Decimal("1.50"), Decimal("-0.01"), Decimal("0.00")]], pa.list_(pa.decimal128(5, 2))
    )
    assert j(dec) == ["[1.50,-0.01,0.00]"]
    tiny = pa.array([[Decimal("1.2E-9")]], pa.list_(pa.decimal128(5, 10)))
    assert parse(j(tiny)[0] or "") == [Decimal("1.2E-9")]
    big = pa.array([[Decimal("1.2E+5")]], pa.list_(pa.decimal128(5, -3)))
    assert parse(j(big)[0] or "") == [Decimal("120000")]
    assert j(pa.array([[1, -1, None]], pa.list_(pa.duration("s")))) == ["[1000000,-1000000,null]"]
    assert j(pa.array([[1500, -1]], pa.list_(pa.duration("ns")))) == ["[1.500,-0.001]"]
    assert j(pa.array([[7]], pa.list_(pa.duration("us")))) == ["[7]"]


def test_maps_become_objects_with_string_keys() -> None:
    m = pa.array([[("a", 1), ("b", None)], [], None], pa.map_(pa.string(), pa.int64()))
    assert j(m) == ['{"a":1,"b":null}', "{}", None]
    ints = pa.array([[(1, "x"), (-2, "y")]], pa.map_(pa.int64(), pa.string()))
    assert j(ints) == ['{"1":"x","-2":"y"}']
    raw = pa.array([[(b"\x01", True)]], pa.map_(pa.binary(), pa.bool_()))
    assert j(raw) == ['{"\\\\x01":true}']
    nested_key = pa.array(
        [[({"k": 'a"b'}, 1)]], pa.map_(pa.struct([("k", pa.string())]), pa.int8())
    )
    assert json.loads(j(nested_key)[0] or "") == {'{"k":"a\\"b"}': 1}
    assert j(m.slice(1)) == ["{}", None]


def test_dictionaries_are_decoded() -> None:
    d = pa.array(["x", "y", None, "x"]).dictionary_encode()
    assert j(d) == ['"x"', '"y"', None, '"x"']
    inner = pa.array(
        [{"d": "q\n"}, {"d": None}], pa.struct([("d", pa.dictionary(pa.int8(), pa.string()))])
    )
    assert j(inner) == ['{"d":"q\\n"}', '{"d":null}']


def test_sliced_and_null_backed_lists_use_only_their_own_elements() -> None:
    values = pa.array([10, 11, 12, 13, 14, 15])
    offsets = pa.array([1, 3, 5, 6], pa.int32())  # starts past element 0
    lists = pa.ListArray.from_arrays(offsets, values, mask=pa.array([False, True, False]))
    assert j(lists) == ["[11,12]", None, "[15]"]
    assert j(lists.slice(1)) == [None, "[15]"]
    assert j(lists.slice(2)) == ["[15]"]
    fixed = pa.FixedSizeListArray.from_arrays(values, 2).slice(1, 2)
    assert j(fixed) == ["[12,13]", "[14,15]"]
    structs = pa.StructArray.from_arrays([values, pa.array(list("abcdef"))], ["n", "s"]).slice(4)
    assert j(structs) == ['{"n":14,"s":"e"}', '{"n":15,"s":"f"}']


def test_list_views_follow_their_offsets_and_sizes() -> None:
    values = pa.array(["a", "b", "c", "d"])
    lv = pa.ListViewArray.from_arrays(
        pa.array([2, 0, 1, 0], pa.int32()), pa.array([2, 1, 0, 3], pa.int32()), values
    )
    assert j(lv) == ['["c","d"]', '["a"]', "[]", '["a","b","c"]']
    assert j(lv.slice(1, 2)) == ['["a"]', "[]"]


def test_unions_take_the_selected_child() -> None:
    sparse = pa.UnionArray.from_sparse(
        pa.array([0, 1, 0], pa.int8()), [pa.array([1, 2, 3]), pa.array(["a", "b", None])]
    )
    assert j(sparse) == ["1", '"b"', "3"]
    assert j(sparse.slice(1)) == ['"b"', "3"]
    dense = pa.UnionArray.from_dense(
        pa.array([1, 0, 1], pa.int8()),
        pa.array([0, 0, 1], pa.int32()),
        [pa.array([True]), pa.array([None, 2.5])],
    )
    assert j(dense) == ["null", "true", "2.5"]
    assert j(dense.slice(2)) == ["2.5"]


def test_run_end_encoded_and_extension_values_are_decoded() -> None:
    ree = pc.run_end_encode(pa.array(["a", "a", "b"]))
    assert j(ree) == ['"a"', '"a"', '"b"']
    uuid = pa.array([b"\x00" * 16], pa.binary(16)).cast(pa.uuid())
    assert j(uuid) == ['"\\\\x' + "00" * 16 + '"']


def test_empty_inputs() -> None:
    assert j(pa.array([], pa.list_(pa.int8()))) == []
    assert j(pa.chunked_array([], pa.struct([("a", pa.int8())]))) == []
    assert j(pa.array([{}, None], pa.struct([]))) == ["{}", None]
    assert j(pa.array([[None, None]], pa.list_(pa.null()))) == ["[null,null]"]


def test_a_type_without_json_form_is_a_type_error() -> None:
    arr = pa.array([[pa.MonthDayNano([1, 2, 3])]], pa.list_(pa.month_day_nano_interval()))
    with pytest.raises(TypeError, match="month_day_nano_interval"):
        to_json_text(arr)
