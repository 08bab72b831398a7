"""Generated change histories for the CDC tests, and their expected final state.

The expected table is computed here by folding the events in order — plain
Python over the generated events, nothing of sluice — so the tests compare
sluice's mirror against an independent answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import msgspec

BASE_MS = 1_700_000_000_000
COLUMNS = ["id", "name", "amount", "qty", "active", "note"]

#: Strings that trip up quoting, CSV, JSON escaping and collations.
NASTY = ["plain", "quote's", 'dq"x', "back\\slash", "new\nline", "tab\t", "é✓🎉", "", "NULL", "a,b"]

_enc = msgspec.json.Encoder()


@dataclass(frozen=True)
class Event:
    """One change of the source table."""

    op: str  # c (insert), u (update), d (delete), r (snapshot read)
    key: int
    ts_ms: int
    before: dict[str, Any] | None
    after: dict[str, Any] | None


@dataclass(frozen=True)
class History:
    """Events in commit order; ``tombstones`` = indexes of deletes followed by a tombstone."""

    events: list[Event]
    tombstones: frozenset[int]

    def counts(self) -> dict[str, int]:
        """Events per metric: creates (c + r), updates, deletes."""
        ops = [e.op for e in self.events]
        return {
            "creates": ops.count("c") + ops.count("r"),
            "updates": ops.count("u"),
            "deletes": ops.count("d"),
        }


def _row(key: int, version: int, rng: random.Random) -> dict[str, Any]:
    return {
        "id": key,
        "name": f"{rng.choice(NASTY)}-{key}-{version}",
        "amount": round(rng.uniform(-1000, 1000), 3),
        "qty": rng.randint(-(2**40), 2**40),
        "active": rng.random() < 0.5,
        "note": None if rng.random() < 0.3 else f"v{version}",
    }


def generate(keys: int, events: int, *, seed: int = 7, snapshot: int = 0) -> History:
    """``snapshot`` snapshot reads, then random inserts, updates, deletes and
    re-inserts over ``keys`` keys until there are ``events`` events. Change
    times rise by 0-2 ms, so some changes to a key share a millisecond."""
    rng = random.Random(seed)
    live: dict[int, dict[str, Any]] = {}
    out: list[Event] = []
    tombstones: set[int] = set()
    ts = BASE_MS
    for key in range(snapshot):
        ts += 1
        live[key] = _row(key, len(out), rng)
        out.append(Event("r", key, ts, None, live[key]))
    while len(out) < events:
        key = rng.randrange(keys)
        ts += rng.choice((0, 1, 1, 2))
        current = live.get(key)
        if current is None:
            live[key] = _row(key, len(out), rng)
            out.append(Event("c", key, ts, None, live[key]))
        elif rng.random() < 0.15:
            del live[key]
            out.append(Event("d", key, ts, current, None))
            if rng.random() < 0.8:
                tombstones.add(len(out) - 1)
        else:
            live[key] = _row(key, len(out), rng)
            out.append(Event("u", key, ts, current, live[key]))
    return History(out, frozenset(tombstones))


def expected(events: list[Event]) -> dict[int, dict[str, Any]]:
    """The source table after ``events`` (applied in order): key -> row."""
    table: dict[int, dict[str, Any]] = {}
    for e in events:
        if e.op == "d":
            table.pop(e.key, None)
        else:
            assert e.after is not None
            table[e.key] = dict(e.after)
    return table


# -- envelopes ----------------------------------------------------------------------


def debezium(h: History, *, wrapped: bool = False) -> list[tuple[bytes, bytes | None]]:
    """(Kafka key, value) per message, Debezium-style; a tombstone (null value)
    after most deletes. ``wrapped``: the JSON converter's schema + payload form."""
    out: list[tuple[bytes, bytes | None]] = []
    for i, e in enumerate(h.events):
        payload = {
            "before": e.before,
            "after": e.after,
            "op": e.op,
            "source": {
                "version": "2.5.0.Final",
                "connector": "postgresql",
                "name": "dbz",
                "ts_ms": e.ts_ms,
                "db": "src",
                "schema": "public",
                "table": "customers",
                "lsn": 1000 + i,
            },
            "ts_ms": e.ts_ms + 7,
            "transaction": None,
        }
        value: Any = payload
        if wrapped:
            value = {
                "schema": {"type": "struct", "name": "dbz.public.customers.Envelope"},
                "payload": payload,
            }
        key = _enc.encode({"id": e.key})
        out.append((key, _enc.encode(value)))
        if i in h.tombstones:
            out.append((key, None))
    return out


_MAXWELL_TYPE = {"c": "insert", "r": "bootstrap-insert", "u": "update", "d": "delete"}


def maxwell(h: History) -> list[tuple[bytes, bytes | None]]:
    """(Kafka key, value) per message, Maxwell-style: ``ts`` in seconds, ``old``
    holding the changed columns' previous values."""
    out: list[tuple[bytes, bytes | None]] = []
    for i, e in enumerate(h.events):
        value: dict[str, Any] = {
            "database": "src",
            "table": "customers",
            "type": _MAXWELL_TYPE[e.op],
            "ts": e.ts_ms // 1000,
            "xid": 5000 + i,
            "commit": True,
        }
        if e.op == "d":
            value["data"] = e.before
        else:
            value["data"] = e.after
            if e.op == "u" and e.before is not None and e.after is not None:
                value["old"] = {c: v for c, v in e.before.items() if e.after.get(c) != v}
        key = _enc.encode({"database": "src", "table": "customers", "pk.id": e.key})
        out.append((key, _enc.encode(value)))
    return out


def encode(h: History, envelope: str) -> list[tuple[bytes, bytes | None]]:
    """The messages of ``h`` in ``envelope`` (debezium, debezium_wrapped, maxwell)."""
    if envelope == "maxwell":
        return maxwell(h)
    return debezium(h, wrapped=envelope == "debezium_wrapped")


def key_field(envelope: str) -> str:
    """The key_field of ``envelope``."""
    return "data.id" if envelope == "maxwell" else "after.id"


def normalise(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Rows read back from a target as key -> row with Python values (booleans
    stored as 0 / 1 by SQLite and MySQL become bool)."""
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        row = {c: r[c] for c in COLUMNS}
        if row["active"] is not None:
            row["active"] = bool(row["active"])
        out[int(row["id"])] = row
    return out


def diff(got: dict[int, dict[str, Any]], want: dict[int, dict[str, Any]], limit: int = 5) -> str:
    """A short description of how two tables differ (for assertion messages)."""
    keys = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    shown = "; ".join(f"{k}: got {got.get(k)} want {want.get(k)}" for k in keys[:limit])
    return f"{len(keys)} key(s) differ ({len(got)} rows, {len(want)} expected): {shown}"
