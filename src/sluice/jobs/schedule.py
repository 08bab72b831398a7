"""Schedules: cron expressions in an IANA time zone, and the shorthand kinds.

Accepted forms (the zone applies to all but the ``every`` kinds, which
count from the Unix epoch):

- a cron expression, five fields (``*/5 * * * *``) or six with seconds
  first, evaluated by croniter in the zone, so ``0 9 * * *`` in
  ``America/New_York`` is 14:00 UTC in winter and 13:00 UTC in summer;
- ``@hourly``, ``@daily``, ``@weekly``, ``@monthly``, ``@yearly``;
- ``daily at HH:MM``, ``hourly at :MM``;
- ``every N seconds`` / ``minutes`` / ``hours``.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sluice.errors import ConfigError, ConfigProblem

_EVERY = re.compile(r"every\s+(\d+)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?)$")
_DAILY = re.compile(r"daily\s+at\s+(\d{1,2}):(\d{2})$")
_HOURLY = re.compile(r"hourly\s+at\s+:?(\d{1,2})$")
_UNIT = {"s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True)
class Schedule:
    """When something fires: ``cron`` in ``zone``, or every ``every_s`` seconds."""

    text: str
    zone: str = "UTC"
    cron: str | None = None
    every_s: int | None = None

    @staticmethod
    def parse(text: str, zone: str | None = None, where: str = "schedule") -> Schedule:
        """Parse ``text``; raises :class:`ConfigError` naming ``where``."""
        tz = zone or "UTC"
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                [ConfigProblem(where, "timezone", f"unknown IANA time zone {tz!r}")]
            ) from None
        s = " ".join(text.strip().lower().split())
        if m := _EVERY.match(s):
            n = int(m.group(1)) * _UNIT[m.group(2)[0]]
            if n < 1:
                raise ConfigError([ConfigProblem(where, "schedule", "every N needs N >= 1")])
            return Schedule(text, tz, every_s=n)
        cron = s
        if m := _DAILY.match(s):
            h, mi = int(m.group(1)), int(m.group(2))
            if h > 23 or mi > 59:
                raise ConfigError([ConfigProblem(where, "schedule", f"no such time {text!r}")])
            cron = f"{mi} {h} * * *"
        elif m := _HOURLY.match(s):
            mi = int(m.group(1))
            if mi > 59:
                raise ConfigError([ConfigProblem(where, "schedule", f"no such minute {text!r}")])
            cron = f"{mi} * * * *"
        from croniter import croniter

        if not croniter.is_valid(cron):
            raise ConfigError(
                [
                    ConfigProblem(
                        where,
                        "schedule",
                        f"expected a cron expression, @hourly / @daily, 'daily at HH:MM', "
                        f"'hourly at :MM' or 'every N minutes', got {text!r}",
                    )
                ]
            )
        return Schedule(text, tz, cron=cron)

    def latest(self, now: dt.datetime) -> dt.datetime:
        """The last tick at or before ``now`` (aware, UTC)."""
        now = now.astimezone(dt.UTC)
        if self.every_s is not None:
            ts = int(now.timestamp()) // self.every_s * self.every_s
            return dt.datetime.fromtimestamp(ts, dt.UTC)
        from croniter import croniter

        local = now.astimezone(ZoneInfo(self.zone))
        prev = croniter(self.cron, local).get_prev(dt.datetime)
        nxt = croniter(self.cron, prev).get_next(dt.datetime)
        tick: dt.datetime = nxt if nxt <= local else prev
        return tick.astimezone(dt.UTC)

    def next_after(self, t: dt.datetime) -> dt.datetime:
        """The first tick strictly after ``t`` (aware, UTC)."""
        t = t.astimezone(dt.UTC)
        if self.every_s is not None:
            ts = (int(t.timestamp()) // self.every_s + 1) * self.every_s
            return dt.datetime.fromtimestamp(ts, dt.UTC)
        from croniter import croniter

        local = t.astimezone(ZoneInfo(self.zone))
        nxt: dt.datetime = croniter(self.cron, local).get_next(dt.datetime)
        return nxt.astimezone(dt.UTC)

    def describe(self) -> str:
        return self.text if self.zone == "UTC" else f"{self.text} {self.zone}"
