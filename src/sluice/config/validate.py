"""Collect every problem in a parsed pipeline file before building the spec.

msgspec stops at the first error, and a user fixing a file wants all of them
at once. :func:`check_types` walks the raw TOML data against the spec classes'
type information (so the Structs stay the one source of truth) and reports
unknown keys with the nearest valid one, wrong types, missing keys and bad
values. :func:`check_rules` applies the cross-rules of ``PIPELINE_TOML.md``
on the same raw data, defensively, so both kinds of problem come out in one
run. Each problem is ``(key path, message)``.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
from collections.abc import Iterable
from typing import Any, cast

import msgspec
import msgspec.inspect as mi

from sluice.config.base import MAX_INT, MAX_MS
from sluice.config.redact import is_secret_key, redact_text
from sluice.connectors import registry
from sluice.connectors.descriptor import DeadLetters, url_rule

Problem = tuple[str, str]


# ---------------------------------------------------------------------------
# Type walk


def check_types(data: Any, spec_type: Any) -> list[Problem]:
    """Every type-level problem of ``data`` against ``spec_type``, in file order.

    A typo of a required key is reported once, as the unknown key with its
    suggestion, not a second time as the missing key.
    """
    problems: list[Problem] = []
    _walk(data, mi.type_info(spec_type), "", problems)
    suggested = {p for p, msg in problems if msg.startswith(_SUGGESTED)}
    return [(p, msg) for p, msg in problems if not (p in suggested and msg.startswith("missing"))]


# Marks a problem that stands for a suggested key (see check_types). The
# message text after it is the path of the key suggested.
_SUGGESTED = "\x00suggest:"


def strip_markers(problems: list[Problem]) -> tuple[list[Problem], set[str]]:
    """Drop the suggestion markers; return the paths of keys that were suggested."""
    return [(p, m) for p, m in problems if not m.startswith(_SUGGESTED)], {
        p for p, m in problems if m.startswith(_SUGGESTED)
    }


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def nearest(word: str, candidates: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def _quote_list(values: Iterable[object]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def toml_type_name(value: Any) -> str:
    """The TOML name of a value's type, with its article."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return "a datetime"
    return type(value).__name__


def describe_got(path: str, value: Any) -> str:
    """``a string ("500")``: what was found, its value shown unless secret."""
    name = toml_type_name(value)
    key = path.rsplit(".", 1)[-1]
    if isinstance(value, list | dict) or is_secret_key(key):
        return name
    if isinstance(value, str):
        return f'{name} "{redact_text(value)}"'
    if isinstance(value, bool):
        return f"{name} ({str(value).lower()})"
    return f"{name} ({value})"


def _unwrap(t: mi.Type) -> mi.Type:
    while isinstance(t, mi.Metadata):
        t = t.type
    return t


def _bounds(t: mi.IntType | mi.FloatType, full: bool = False) -> str:
    """The bounds of ``t`` for messages; the shared sanity caps (MAX_MS,
    MAX_INT) only when ``full`` (a value broke one)."""
    parts = []
    if t.gt is not None:
        parts.append(f"> {t.gt}")
    if t.ge is not None:
        parts.append(f">= {t.ge}")
    if t.lt is not None:
        parts.append(f"< {t.lt}")
    if t.le is not None and (full or t.le not in (MAX_MS, MAX_INT)):
        parts.append(f"<= {t.le}")
    return " and ".join(parts)


def expected_name(t: mi.Type) -> str:
    """What a value of type ``t`` looks like, for messages."""
    t = _unwrap(t)
    if isinstance(t, mi.StrType):
        return "a non-empty string" if t.min_length else "a string"
    if isinstance(t, mi.IntType):
        b = _bounds(t)
        return f"an integer {b}" if b else "an integer"
    if isinstance(t, mi.FloatType):
        return "a number"
    if isinstance(t, mi.BoolType):
        return "a boolean (true or false)"
    if isinstance(t, mi.ListType):
        return f"an array of {_plural(expected_name(t.item_type))}"
    if isinstance(t, mi.DictType | mi.StructType):
        return "a table"
    if isinstance(t, mi.LiteralType):
        return f"one of {_quote_list(t.values)}"
    if isinstance(t, mi.UnionType):
        members = [m for m in t.types if not isinstance(_unwrap(m), mi.NoneType)]
        if members and all(isinstance(_unwrap(m), mi.StructType) for m in members):
            return "a table"
        return " or ".join(expected_name(m) for m in members)
    return "a value"


def _plural(name: str) -> str:
    for article in ("an ", "a "):
        if name.startswith(article):
            name = name[len(article) :]
            break
    for noun in ("string", "integer", "number", "boolean", "table", "array"):
        if noun in name:
            return name.replace(noun, noun + "s", 1)
    return name


def _walk(value: Any, t: mi.Type, path: str, problems: list[Problem]) -> None:
    t = _unwrap(t)
    if isinstance(t, mi.AnyType):
        return
    if isinstance(t, mi.UnionType):
        _walk_union(value, t, path, problems)
        return
    if isinstance(t, mi.StructType):
        if not isinstance(value, dict):
            problems.append((path, f"expected a table, got {describe_got(path, value)}"))
            return
        _walk_struct(value, t, path, problems, kind=None)
        return
    if isinstance(t, mi.ListType):
        if not isinstance(value, list):
            problems.append((path, f"expected {expected_name(t)}, got {describe_got(path, value)}"))
            return
        for i, item in enumerate(value):
            _walk(item, t.item_type, f"{path}[{i}]", problems)
        return
    if isinstance(t, mi.DictType):
        if not isinstance(value, dict):
            problems.append((path, f"expected a table, got {describe_got(path, value)}"))
            return
        for k, v in value.items():
            _walk(v, t.value_type, _join(path, str(k)), problems)
        return
    _check_scalar(value, t, path, problems)


def _check_scalar(value: Any, t: mi.Type, path: str, problems: list[Problem]) -> None:
    got = describe_got(path, value)
    if isinstance(t, mi.LiteralType):
        if value not in t.values or isinstance(value, bool) != any(
            isinstance(v, bool) for v in t.values
        ):
            msg = f"expected one of {_quote_list(t.values)}, got {got}"
            near = (
                nearest(str(value), [str(v) for v in t.values]) if isinstance(value, str) else None
            )
            if near is not None:
                msg += f"; did you mean '{near}'?"
            problems.append((path, msg))
        return
    if isinstance(t, mi.StrType):
        if not isinstance(value, str):
            hint = ""
            if path == "transform.sql" and isinstance(value, dict):
                hint = ' (sql is a plain key: write sql = """...""" under [transform], not a [transform.sql] table)'
            problems.append((path, f"expected {expected_name(t)}, got {got}{hint}"))
        elif t.min_length and len(value) < t.min_length:
            problems.append((path, f"expected {expected_name(t)}, got an empty string"))
        elif t.pattern and not re.search(t.pattern, value):
            problems.append((path, f"expected a string matching {t.pattern}, got {got}"))
        return
    if isinstance(t, mi.BoolType):
        if not isinstance(value, bool):
            problems.append((path, f"expected {expected_name(t)}, got {got}"))
        return
    if isinstance(t, mi.IntType | mi.FloatType):
        ok_types: tuple[type, ...] = (int,) if isinstance(t, mi.IntType) else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_types):
            problems.append((path, f"expected {expected_name(t)}, got {got}"))
            return
        unbounded = t.le is None and t.lt is None
        if unbounded and isinstance(value, int) and not -MAX_INT - 1 <= value <= MAX_INT:
            problems.append((path, f"expected {expected_name(t)} (64-bit), got {value}"))
            return
        num = float(cast(float, value))
        if (
            (t.gt is not None and not num > t.gt)
            or (t.ge is not None and not num >= t.ge)
            or (t.lt is not None and not num < t.lt)
            or (t.le is not None and not num <= t.le)
        ):
            noun = "an integer" if isinstance(t, mi.IntType) else "a number"
            above = (t.lt is not None and num >= t.lt) or (t.le is not None and num > t.le)
            problems.append((path, f"expected {noun} {_bounds(t, full=above)}, got {value}"))
        return
    if isinstance(t, mi.NoneType):
        problems.append((path, f"expected no value, got {got}"))
        return
    problems.append((path, f"unsupported value {got}"))  # pragma: no cover - spec uses no others


def _walk_union(value: Any, t: mi.UnionType, path: str, problems: list[Problem]) -> None:
    members = [m for m in t.types if not isinstance(_unwrap(m), mi.NoneType)]
    structs = [_unwrap(m) for m in members]
    if len(members) == 1:
        _walk(value, members[0], path, problems)
        return
    if all(isinstance(s, mi.StructType) and s.tag_field for s in structs):
        tagged = [s for s in structs if isinstance(s, mi.StructType)]
        _walk_tagged(value, tagged, path, problems)
        return
    # A union of scalars (e.g. `str | int`): fine when any member accepts it.
    for m in members:
        trial: list[Problem] = []
        _walk(value, m, path, trial)
        if not trial:
            return
    problems.append((path, f"expected {expected_name(t)}, got {describe_got(path, value)}"))


def _walk_tagged(
    value: Any, members: list[mi.StructType], path: str, problems: list[Problem]
) -> None:
    if not isinstance(value, dict):
        problems.append((path, f"expected a table, got {describe_got(path, value)}"))
        return
    tag_field = members[0].tag_field or "kind"
    by_tag = {str(s.tag): s for s in members}
    kinds = _quote_list(by_tag)
    tag = value.get(tag_field)
    kind_path = _join(path, tag_field)
    if tag is None:
        problems.append((kind_path, f"missing required key (expected one of {kinds})"))
        return
    if not isinstance(tag, str):
        problems.append((kind_path, f"expected one of {kinds}, got {describe_got(kind_path, tag)}"))
        return
    if tag not in by_tag:
        msg = f"unknown kind '{tag}'"
        near = nearest(tag, by_tag)
        if near is not None:
            msg += f"; did you mean '{near}'?"
        problems.append((kind_path, f"{msg} (expected one of {kinds})"))
        return
    _walk_struct(value, by_tag[tag], path, problems, kind=tag, siblings=members)


def _walk_struct(
    value: dict[str, Any],
    t: mi.StructType,
    path: str,
    problems: list[Problem],
    kind: str | None,
    siblings: list[mi.StructType] | None = None,
) -> None:
    fields = {f.encode_name: f for f in t.fields}
    for key, item in value.items():
        key_path = _join(path, key)
        if key == t.tag_field:
            continue
        field = fields.get(key)
        if field is None:
            message, near = _unknown_key(
                key, [f for f in fields if f != "query" or "query" in value], kind, siblings or []
            )
            problems.append((key_path, message))
            if near is not None:
                problems.append((_join(path, near), _SUGGESTED))
            continue
        _walk(item, field.type, key_path, problems)
    for name, field in fields.items():
        if field.required and name not in value:
            problems.append(
                (_join(path, name), f"missing required key (expected {expected_name(field.type)})")
            )


def _unknown_key(
    key: str, valid: list[str], kind: str | None, siblings: list[mi.StructType]
) -> tuple[str, str | None]:
    """The message for an unknown key, and the key it suggests (if any)."""
    where = f"unknown key for kind '{kind}'" if kind else "unknown key"
    owners = [str(s.tag) for s in siblings if any(f.encode_name == key for f in s.fields)]
    if owners:
        # An exact key of another kind says more than a fuzzy match here.
        return (
            f"{where} (it belongs to kind {_quote_list(owners)}); expected one of {_quote_list(valid)}",
            None,
        )
    misplaced = _MISPLACED.get((key, kind or ""))
    if misplaced is not None:
        return f"{where}; {misplaced}", None
    near = nearest(key, valid)
    if near is not None:
        return f"{where}; did you mean '{near}'?", near
    hint = _HINTS.get(key, "")
    return f"{where}; expected one of {_quote_list(valid)}{hint}", None


# Keys that exist elsewhere and a fuzzy match would point the wrong way:
# (key, kind of the table it was found in) -> where it belongs.
_MISPLACED = {
    ("lateness_ms", kind): "the watermark's slack is 'lateness_ms' in [watermark] "
    '(allowed_lateness_ms here keeps windows open for late_data = "reopen")'
    for kind in ("tumbling", "hopping", "session", "")
}

# Keys users often put one table too deep.
_HINTS = {
    "mode": " ('mode' belongs in [target] / [[targets]])",
    "primary_key": " ('primary_key' belongs in [target.table])",
}


# ---------------------------------------------------------------------------
# Cross-rules, on raw data


def _table(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _tables(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


# The state store is not a connector: its own URL rule lives here.
_STATE_STORE_URLS = {"postgres": url_rule("url", ("postgres://", "postgresql://"))}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_rules(data: dict[str, Any]) -> list[Problem]:
    """Every cross-rule problem of a pipeline file (see ``PIPELINE_TOML.md``)."""
    problems: list[Problem] = []
    add = problems.append

    sources = _check_sources(data, add)
    targets = _check_targets(data, add)
    transform = _table(data.get("transform"))
    state_store = data.get("state_store")

    window = transform.get("window")
    join = transform.get("join")
    cdc = transform.get("cdc")
    sql = transform.get("sql")
    has_sql = isinstance(sql, str) and sql.strip() != ""

    present = [n for n, v in (("window", window), ("join", join), ("cdc", cdc)) if v is not None]
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            add((f"transform.{b}", f"[transform.{a}] and [transform.{b}] are mutually exclusive"))
    if cdc is not None and has_sql:
        add(
            (
                "transform.sql",
                "not allowed with [transform.cdc]: CDC applies the envelopes as they are",
            )
        )
    if join is not None and has_sql:
        add(
            (
                "transform.sql",
                "not allowed with [transform.join]: the join reads the sources directly",
            )
        )

    lookups = transform.get("lookups")
    if isinstance(lookups, dict):
        if lookups and not has_sql:
            add(("transform.lookups", "lookups need a [transform] sql that uses them"))
        for name in lookups:
            if name == "source":
                add(("transform.lookups.source", "'source' is reserved for the streaming input"))
            elif not _IDENT.match(str(name)):
                add((f"transform.lookups.{name}", "expected a SQL identifier as the lookup name"))
        for name, lk in lookups.items():
            if isinstance(lk, dict):
                _connector_rules("lookup", lk, f"transform.lookups.{name}", add)

    if transform.get("engine") == "distributed" or transform.get("peers"):
        key = "transform.engine" if transform.get("engine") == "distributed" else "transform.peers"
        add(
            (
                key,
                "sluice runs each pipeline in one process; scale out with replicas sharing a Kafka group_id",
            )
        )
    if data.get("delivery") == "exactly_once":
        _check_exactly_once(data, sources, targets, present, state_store, add)
    if isinstance(window, dict):
        _check_window(window, state_store, add)
    if (window is not None or join is not None) and state_store is None:
        _check_replay(sources, "window" if window is not None else "join", add)
    if isinstance(join, dict):
        _check_join(join, data, sources, state_store, add)
    if isinstance(cdc, dict):
        _check_cdc(cdc, targets, add)

    _check_dlq(data, transform, window, sources, targets, add)
    if data.get("replicas") is True:
        _check_replicas(data, sources, window is not None or join is not None, add)

    for t_at, t in targets:
        _connector_rules("target", t, t_at, add)
    ss = _table(state_store)
    state_kind = ss.get("kind")
    state_url = _STATE_STORE_URLS.get(state_kind) if isinstance(state_kind, str) else None
    if state_url is not None:
        state_url("state_store", ss, add)
    return problems


def _check_exactly_once(
    data: dict[str, Any],
    sources: list[tuple[str, dict[str, Any]]],
    targets: list[tuple[str, dict[str, Any]]],
    stages: list[str],
    state_store: Any,
    add: Any,
) -> None:
    """``delivery = "exactly_once"``: Kafka → Kafka transactions, which carry
    the consumer offsets; so Kafka sources, one Kafka target, and no state
    but the offsets (see ``connectors/kafka/transactions.py``)."""
    why = 'delivery = "exactly_once" (Kafka transactions with the consumer offsets)'
    for at, source in sources:
        if source.get("kind") != "kafka":
            add((f"{at}.kind", f"{why} needs Kafka sources, not '{source.get('kind')}'"))
    if len(targets) != 1:
        add(("targets", f"{why} needs exactly one target, a Kafka one"))
    for at, target in targets:
        if target.get("kind") != "kafka":
            add((f"{at}.kind", f"{why} needs a Kafka target, not '{target.get('kind')}'"))
    for stage in stages:
        add(
            (
                f"transform.{stage}",
                f"{why} is for pipelines without window, join or CDC state: "
                "it cannot hold stage state",
            )
        )
    if state_store is not None:
        add(("state_store", f"{why} keeps the positions in the transactions: no [state_store]"))
    if data.get("replicas") is True:
        add(
            (
                "replicas",
                f"{why} runs as one process per transactional.id: not with replicas = true",
            )
        )


def _check_replicas(
    data: dict[str, Any], sources: list[tuple[str, dict[str, Any]]], stateful: bool, add: Any
) -> None:
    """``replicas = true``: partitioned sources read through one consumer
    group, and (with a window or join) a shared durable state store."""
    for at, source in sources:
        connector = registry.of_kind("source", source.get("kind"))
        if connector is not None and not connector.capabilities.partitioned:
            add(
                (
                    f"{at}.kind",
                    f"replicas = true needs sources whose partitions a group spreads over "
                    f"processes (kafka); '{source.get('kind')}' has none",
                )
            )
    if not stateful:
        return
    store = _table(data.get("state_store"))
    if store.get("kind") != "postgres":
        add(
            (
                "state_store",
                "replicas = true with a window or join needs a postgres [state_store] the "
                "replicas share (state and fencing per source partition)",
            )
        )
    same = {"bootstrap_servers", "group_id", "security_protocol", "sasl_mechanism"}
    first = sources[0][1] if sources else {}
    for at, source in sources[1:]:
        differ = sorted(k for k in same if source.get(k) != first.get(k))
        if differ:
            add(
                (
                    f"{at}.{differ[0]}",
                    "replicas = true reads every source through one consumer (so that "
                    "partition p of each topic lands on the same replica): the sources must "
                    f"share {', '.join(differ)}",
                )
            )


def _connector_rules(role: str, table: dict[str, Any], at: str, add: Any) -> None:
    """The cross-rules the connector of ``table``'s kind declares for ``role``."""
    # CDC rules belong to the target kind that applies the changes.
    connector = registry.of_kind("target" if role == "cdc" else role, table.get("kind"))
    if connector is not None:
        for rule in connector.rules(role):
            rule(at, table, add)


def _check_replay(sources: list[tuple[str, dict[str, Any]]], stage: str, add: Any) -> None:
    """An ack-only source cannot re-deliver what a window or join buffered."""
    for at, s in sources:
        connector = registry.of_kind("source", s.get("kind"))
        if connector is not None and connector.capabilities.ack_only:
            add(
                (
                    f"{at}.kind",
                    f"a {stage} over an ack-only '{s.get('kind')}' source needs a [state_store] "
                    "(acknowledged messages cannot be read again after a restart)",
                )
            )


def _forms(
    data: dict[str, Any], one: str, many: str, missing: str, add: Any
) -> tuple[Any, Any, list[tuple[str, dict[str, Any]]]]:
    """The ``[one]`` / ``[[many]]`` form rules; returns both raw values and the entries."""
    single, entries = data.get(one), data.get(many)
    out: list[tuple[str, dict[str, Any]]] = []
    if single is None and entries is None:
        add(("", missing))
    elif single is not None and entries is not None:
        add((many, f"[{one}] and [[{many}]] are exclusive; use one form"))
    if isinstance(single, dict):
        out.append((one, single))
    if isinstance(entries, list):
        if not entries:
            add((many, f"expected at least one [[{many}]] entry"))
        out.extend((f"{many}[{i}]", e) for i, e in enumerate(entries) if isinstance(e, dict))
    return single, entries, out


def _check_sources(data: dict[str, Any], add: Any) -> list[tuple[str, dict[str, Any]]]:
    single, many, out = _forms(
        data,
        "source",
        "sources",
        "missing a source: add [source] (with top-level source_query) or [[sources]]",
        add,
    )
    if isinstance(single, dict):
        if "query" in single:
            add(("source.query", "not allowed in [source]; use the top-level source_query"))
        if many is None and data.get("source_query") is None:
            add(("source_query", "missing required key (expected a string: what [source] reads)"))
    if isinstance(many, list) and data.get("source_query") is not None and single is None:
        add(("source_query", "not used with [[sources]]: each entry has its own query"))
    seen: dict[str, str] = {}
    for at, s in out:
        if at != "source":
            q = s.get("query")
            if q is None:
                add((f"{at}.query", "missing required key (expected a string)"))
            elif isinstance(q, str):
                if q in seen:
                    add((f"{at}.query", f"duplicate query '{q}' (also {seen[q]})"))
                seen.setdefault(q, at)
        _connector_rules("source", s, at, add)
    return out


def _check_targets(data: dict[str, Any], add: Any) -> list[tuple[str, dict[str, Any]]]:
    return _forms(data, "target", "targets", "missing a target: add [target] or [[targets]]", add)[
        2
    ]


def _check_late(spec: dict[str, Any], at: str, add: Any) -> None:
    if spec.get("late_data") == "reopen" and spec.get("allowed_lateness_ms") is None:
        add(
            (
                f"{at}.allowed_lateness_ms",
                'missing: late_data = "reopen" requires allowed_lateness_ms',
            )
        )


def _check_window(window: dict[str, Any], state_store: Any, add: Any) -> None:
    at = "transform.window"
    kind = window.get("kind")
    _check_late(window, at, add)
    group_by = window.get("group_by") or []
    if kind == "session":
        if state_store is None:
            add((at, "a session window needs a [state_store]"))
        if not group_by:
            add((f"{at}.group_by", "a session window needs at least one group_by column"))
        gap, cap = window.get("gap_ms"), window.get("max_session_duration_ms")
        if _ints(gap, cap) and cast(int, cap) < cast(int, gap):
            add((f"{at}.max_session_duration_ms", f"expected at least gap_ms ({gap}), got {cap}"))
    if kind == "hopping":
        dur, hop = window.get("duration_ms"), window.get("hop_ms")
        if _ints(dur, hop) and cast(int, hop) > cast(int, dur):
            add((f"{at}.hop_ms", f"expected at most duration_ms ({dur}), got {hop}"))
    aggs = window.get("aggregations")
    if isinstance(aggs, list) and not aggs:
        add((f"{at}.aggregations", "expected at least one [[transform.window.aggregations]] entry"))
    reserved = {
        str(window.get("window_start_column", "window_start")),
        str(window.get("window_end_column", "window_end")),
    }
    if kind == "session":
        reserved.add(str(window.get("session_id_column", "session_id")))
    names: dict[str, int] = {}
    for i, agg in enumerate(_tables(aggs)):
        a_at = f"{at}.aggregations[{i}]"
        fn, col, mode = agg.get("agg"), agg.get("column"), agg.get("mode")
        if fn == "count" and col is not None:
            add(
                (
                    f"{a_at}.column",
                    "agg 'count' counts rows and takes no column; use 'count_col' to count a column's non-null values",
                )
            )
        elif fn not in (None, "count") and col is None:
            add((f"{a_at}.column", f"missing required key: agg '{fn}' needs a column"))
        if mode is not None and fn != "count_distinct":
            add((f"{a_at}.mode", f"only for agg 'count_distinct', not '{fn}'"))
        if (
            fn == "count_distinct"
            and mode == "exact"
            and agg.get("max_distinct_values_per_group") is None
        ):
            add(
                (
                    f"{a_at}.max_distinct_values_per_group",
                    'missing: mode = "exact" needs max_distinct_values_per_group',
                )
            )
        name = agg.get("as")
        if isinstance(name, str):
            if name in names:
                add(
                    (
                        f"{a_at}.as",
                        f"duplicate output column '{name}' (also aggregations[{names[name]}])",
                    )
                )
            elif name in group_by or name in reserved:
                add(
                    (
                        f"{a_at}.as",
                        f"output column '{name}' collides with a group_by or window column",
                    )
                )
            names.setdefault(name, i)


def _ints(*values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _check_join(
    join: dict[str, Any],
    data: dict[str, Any],
    sources: list[tuple[str, dict[str, Any]]],
    state_store: Any,
    add: Any,
) -> None:
    at = "transform.join"
    if data.get("sources") is None:
        add((at, "needs the [[sources]] form, one entry per side (a single [source] cannot join)"))
    if state_store is None:
        add((at, "needs a [state_store] (join buffers are persisted)"))
    queries = [s.get("query") for _, s in sources if isinstance(s.get("query"), str)]
    if data.get("sources") is not None:
        for side in ("left_source", "right_source"):
            name = join.get(side)
            if isinstance(name, str) and name not in queries:
                msg = f"'{name}' matches no [[sources]] query (expected one of {_quote_list(queries)})"
                near = nearest(name, [str(q) for q in queries])
                if near is not None:
                    msg += f"; did you mean '{near}'?"
                add((f"{at}.{side}", msg))
    if join.get("left_source") is not None and join.get("left_source") == join.get("right_source"):
        add((f"{at}.right_source", "must name a different source than left_source"))
    tw, lo, hi = join.get("time_window_ms"), join.get("min_delta_ms"), join.get("max_delta_ms")
    if tw is None and lo is None and hi is None:
        add((at, "missing the time bound: set time_window_ms, or min_delta_ms and max_delta_ms"))
    elif tw is not None and (lo is not None or hi is not None):
        add((f"{at}.time_window_ms", "exclusive with min_delta_ms / max_delta_ms; use one form"))
    elif tw is None and (lo is None) != (hi is None):
        missing = "max_delta_ms" if hi is None else "min_delta_ms"
        add((f"{at}.{missing}", "missing: min_delta_ms and max_delta_ms go together"))
    elif _ints(lo, hi) and cast(int, lo) > cast(int, hi):
        add((f"{at}.max_delta_ms", f"expected at least min_delta_ms ({lo}), got {hi}"))
    lk, rk = join.get("left_keys"), join.get("right_keys")
    for side, keys in (("left_keys", lk), ("right_keys", rk)):
        if isinstance(keys, list) and not keys:
            add((f"{at}.{side}", "expected at least one key column"))
    if isinstance(lk, list) and isinstance(rk, list) and lk and rk and len(lk) != len(rk):
        add(
            (
                f"{at}.right_keys",
                f"expected as many key columns as left_keys ({len(lk)}), got {len(rk)}",
            )
        )
    _check_late(join, at, add)
    if join.get("left_column_prefix", "left_") == join.get("right_column_prefix", "right_"):
        add((f"{at}.right_column_prefix", "must differ from left_column_prefix"))


def _check_cdc(cdc: dict[str, Any], targets: list[tuple[str, dict[str, Any]]], add: Any) -> None:
    at = "transform.cdc"
    envelope = cdc.get("envelope")
    if envelope == "custom":
        for key in ("key_field", "op_field", "op_map", "before_field", "after_field", "ts_field"):
            if cdc.get(key) is None:
                add(
                    (
                        f"{at}.{key}",
                        'missing: envelope = "custom" sets every path and op_map explicitly',
                    )
                )
    elif envelope in ("debezium", "maxwell") and cdc.get("key_field") is None:
        example = "after.id" if envelope == "debezium" else "data.id"
        add((f"{at}.key_field", f"missing required key (expected a path like '{example}')"))
    if cdc.get("delete_mode") == "soft" and not cdc.get("soft_delete_column"):
        add((f"{at}.soft_delete_column", 'missing: delete_mode = "soft" needs soft_delete_column'))
    cdc_kinds = registry.cdc_kinds()
    for t_at, t in targets:
        kind = t.get("kind")
        if isinstance(kind, str) and kind not in cdc_kinds:
            add(
                (
                    f"{t_at}.kind",
                    f"[transform.cdc] needs a table target ({_quote_list(cdc_kinds)}), got '{kind}'",
                )
            )
        _connector_rules("cdc", t, t_at, add)


def _dead_letter_holders(word: str) -> list[tuple[str, DeadLetters]]:
    """(kind, support) of every connector that holds dead letters as ``word``."""
    return [
        (kind, c.dead_letters)
        for c in registry.connectors()
        if c.dead_letters is not None and c.dead_letters.word == word
        for kind in c.kinds
    ]


def _dlq_forms() -> tuple[re.Pattern[str], str]:
    """The ``dlq_store`` pattern and its description, from the dead-letter connectors."""
    holders = [*_dead_letter_holders("topic"), *_dead_letter_holders("table")]
    forms = "|".join(f"{re.escape(kind)}:{s.pattern}" for kind, s in holders)
    names = ", ".join(f"{kind}:{s.destination}" for kind, s in holders)
    return re.compile(rf"^(auto|topic|table|{forms}|[^\s]+\.jsonl)$"), names


def _check_dlq(
    data: dict[str, Any],
    transform: dict[str, Any],
    window: Any,
    sources: list[tuple[str, dict[str, Any]]],
    targets: list[tuple[str, dict[str, Any]]],
    add: Any,
) -> None:
    # Sources whose brokers can hold dead letters in a topic (Kafka).
    topic_kinds = [kind for kind, s in _dead_letter_holders("topic") if s.role == "source"]
    kafka_sources = [s for _, s in sources if s.get("kind") in topic_kinds]
    has_dlq = bool(
        data.get("dead_letter_topic")
        or data.get("dlq_store")
        or any(s.get("dead_letter_topic") for s in kafka_sources)
    )
    if transform.get("on_error") == "dlq" and not has_dlq:
        add(
            (
                "transform.on_error",
                '"dlq" needs a dead-letter destination: set dead_letter_topic (Kafka source) or dlq_store',
            )
        )
    if isinstance(window, dict) and window.get("late_data") == "dlq" and not has_dlq:
        add(
            (
                "transform.window.late_data",
                '"dlq" needs a dead-letter destination: set dead_letter_topic (Kafka source) or dlq_store',
            )
        )
    if data.get("dead_letter_topic") and not kafka_sources:
        add(
            (
                "dead_letter_topic",
                "needs a kafka source (its brokers receive the DLQ); use dlq_store for other sources",
            )
        )
    store = data.get("dlq_store")
    pattern, forms = _dlq_forms()
    if isinstance(store, str) and not pattern.match(store):
        add(
            (
                "dlq_store",
                f'expected auto, topic, table, {forms} or a path ending in .jsonl, got "{redact_text(store)}"',
            )
        )
    elif isinstance(store, str):
        _check_dlq_store(data, store, kafka_sources, targets, add)


def _check_dlq_store(
    data: dict[str, Any],
    store: str,
    kafka_sources: list[dict[str, Any]],
    targets: list[tuple[str, dict[str, Any]]],
    add: Any,
) -> None:
    """The destination a dlq_store form names must exist in the pipeline.

    A ``<kind>:`` form needs a source / target of that kind (the role its
    connector reaches dead letters through); ``table`` needs any table
    holder. A state store of a dead-letter connector's kind holds the table too.
    """
    table_kinds = [kind for kind, _ in _dead_letter_holders("table")]
    state_store = data.get("state_store")
    has_table = any(t.get("kind") in table_kinds for _, t in targets) or (
        isinstance(state_store, dict) and state_store.get("kind") in table_kinds
    )
    topics = data.get("dead_letter_topic") or any(s.get("dead_letter_topic") for s in kafka_sources)
    prefix, colon, _ = store.partition(":")
    holders = dict(_dead_letter_holders("topic") + _dead_letter_holders("table"))
    if store == "topic" and not topics:
        add(("dlq_store", '"topic" needs dead_letter_topic (on the pipeline or a kafka source)'))
    elif colon and prefix in holders and holders[prefix].word == "topic" and not kafka_sources:
        add(("dlq_store", f'"{store}" needs a {prefix} source (its brokers receive the DLQ)'))
    elif (store == "table" or (colon and prefix in table_kinds)) and not has_table:
        add(
            (
                "dlq_store",
                f'"{store}" needs a {" or ".join(table_kinds)} target or [state_store] (its database holds the table)',
            )
        )


# ---------------------------------------------------------------------------
# SQL


def check_sql(data: dict[str, Any]) -> list[Problem]:
    """Parse every SQL statement of the file with DataFusion's parser.

    Only syntax is checked here: the input schema is known once data
    arrives, so a statement that parses but names an unknown column fails
    when the stage first plans it. A syntax error is reported now, with
    DataFusion's message.
    """
    problems: list[Problem] = []
    transform = data.get("transform")
    if not isinstance(transform, dict):
        return problems
    sql = transform.get("sql")
    if isinstance(sql, str) and sql.strip():
        message = _sql_syntax_error(sql)
        if message is not None:
            problems.append(("transform.sql", f"invalid SQL: {message}"))
    return problems


def _sql_syntax_error(sql: str) -> str | None:
    """DataFusion's parser or tokenizer error for ``sql``, or None when it parses.

    Planning errors (unknown tables or columns: nothing is registered in
    this context) are not syntax errors and are ignored.
    """
    import datafusion  # lazily: validation of files without SQL stays light

    try:
        datafusion.SessionContext().sql(sql)
    except Exception as exc:  # datafusion raises a plain Exception subclass
        text = str(exc)
        if "only supports a single SQL statement" in text:
            return "expected one statement (the stage runs a single SELECT), got several"
        for marker in ("ParserError(", "TokenizerError("):
            if marker in text:
                detail = text.split(marker, 1)[1].rsplit(")", 1)[0].strip('"')
                return " ".join(detail.split())
    return None


# ---------------------------------------------------------------------------
# Local paths


def resolve_paths(data: Any, spec_type: Any, base: str) -> None:
    """Make every relative :data:`~sluice.config.base.LocalPath` value in
    ``data`` absolute, relative to the folder ``base``, in place.

    Runs on data that passed :func:`check_types`, so the walk may trust the
    shapes. URLs and ``:memory:`` stay as they are.
    """
    _resolve(data, mi.type_info(spec_type), base)


def _is_local_path(t: mi.Type) -> bool:
    while isinstance(t, mi.Metadata):
        if t.extra and t.extra.get("local_path"):
            return True
        t = t.type
    return False


def _resolve(value: Any, t: mi.Type, base: str) -> Any:
    if _is_local_path(t):
        if isinstance(value, str) and _relative_file(value):
            return os.path.normpath(os.path.join(base, value))
        return value
    t = _unwrap(t)
    if isinstance(t, mi.UnionType):
        members = [_unwrap(m) for m in t.types if not isinstance(_unwrap(m), mi.NoneType)]
        if isinstance(value, dict):
            for m in members:
                if isinstance(m, mi.StructType) and (
                    not m.tag_field or value.get(m.tag_field) == m.tag
                ):
                    return _resolve(value, m, base)
        elif len(members) == 1:
            return _resolve(value, members[0], base)
        return value
    if isinstance(t, mi.StructType) and isinstance(value, dict):
        for f in t.fields:
            if f.encode_name in value:
                value[f.encode_name] = _resolve(value[f.encode_name], f.type, base)
    elif isinstance(t, mi.ListType) and isinstance(value, list):
        value[:] = [_resolve(v, t.item_type, base) for v in value]
    elif isinstance(t, mi.DictType) and isinstance(value, dict):
        for k in value:
            value[k] = _resolve(value[k], t.value_type, base)
    return value


def _relative_file(path: str) -> bool:
    return not (os.path.isabs(path) or "://" in path or path.startswith(":memory:"))


def resolve_dlq_store(data: dict[str, Any], base: str) -> None:
    """A ``dlq_store`` that names a ``.jsonl`` file resolves like any local path."""
    store = data.get("dlq_store")
    if (
        isinstance(store, str)
        and store.endswith(".jsonl")
        and ":" not in store
        and _relative_file(store)
    ):
        data["dlq_store"] = os.path.normpath(os.path.join(base, store))


def convert(data: dict[str, Any], spec_type: type[Any]) -> Any:
    """Build the frozen spec from data that passed both checks."""
    return msgspec.convert(data, spec_type, strict=True)
