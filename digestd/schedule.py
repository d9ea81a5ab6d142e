"""When digests are sent: pure functions of (now, send_at, timezone, cadence). No clock, no I/O.

A subscriber's digest for local date D is sent at ``send_at`` on D in their timezone:

- ``send_at`` inside a spring-forward gap (e.g. 02:30 on the night clocks jump from 02:00 to
  03:00) → the first valid instant after the gap (03:00 local, the moment of the transition);
- ``send_at`` inside a fall-back overlap (e.g. 01:30 twice) → the first occurrence, once;
- cadence ``daily`` every day, ``weekdays`` Monday–Friday, ``weekly`` on Mondays
  (:func:`cadence_due`, which :func:`digestd.pipeline.due_on` also uses).

Every datetime returned is timezone-aware UTC.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import lru_cache
from zoneinfo import ZoneInfo

from .models import Cadence

# Long enough to pass a weekly cadence plus a whole skipped calendar day (Samoa, 2011).
_SEARCH_DAYS = 10


@dataclass(frozen=True, slots=True, order=True)
class Send:
    """One scheduled send: the UTC instant ``at`` of the digest for local ``date``."""

    at: dt.datetime
    date: dt.date


def cadence_due(cadence: Cadence | str, date: dt.date) -> bool:
    """Whether a digest is due on local ``date``: daily, weekdays (Mon–Fri), weekly (Mon)."""
    if cadence == "weekdays":
        return date.weekday() < 5
    if cadence == "weekly":
        return date.weekday() == 0
    return True


def parse_hhmm(send_at: str) -> dt.time:
    """``"07:30"`` → ``time(7, 30)``; ValueError for anything else."""
    hours, sep, minutes = send_at.partition(":")
    if not sep or len(hours) != 2 or len(minutes) != 2 or not (hours + minutes).isdigit():
        raise ValueError(f"send_at {send_at!r}: expected HH:MM")
    return dt.time(int(hours), int(minutes))


@lru_cache(maxsize=512)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def send_instant(date: dt.date, send_at: str, timezone: str) -> dt.datetime:
    """The UTC instant of the send for local ``date`` (gap → end of the gap; overlap → first)."""
    tz = _zone(timezone)
    wall = dt.datetime.combine(date, parse_hhmm(send_at))
    first = wall.replace(tzinfo=tz, fold=0)  # fold=0: the earlier offset in an overlap
    instant = first.astimezone(dt.UTC)
    if instant.astimezone(tz).replace(tzinfo=None) == wall:
        return instant
    # ``wall`` does not exist: it lies in a gap. fold=1 maps it before the transition and
    # fold=0 after it; the transition itself is the first valid instant after the gap.
    return _transition(tz, wall.replace(tzinfo=tz, fold=1).astimezone(dt.UTC), instant)


def _transition(tz: ZoneInfo, before: dt.datetime, after: dt.datetime) -> dt.datetime:
    """The first instant in (before, after] whose UTC offset is the one in force at ``after``."""
    target = after.astimezone(tz).utcoffset()
    lo, hi = int(before.timestamp()), int(after.timestamp())
    while hi - lo > 1:  # offsets change on whole seconds
        mid = (lo + hi) // 2
        if dt.datetime.fromtimestamp(mid, dt.UTC).astimezone(tz).utcoffset() == target:
            hi = mid
        else:
            lo = mid
    return dt.datetime.fromtimestamp(hi, dt.UTC)


def _local_date(now: dt.datetime, timezone: str) -> dt.date:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(_zone(timezone)).date()


def next_send(now: dt.datetime, send_at: str, timezone: str, cadence: Cadence | str) -> Send:
    """The first send strictly after ``now`` (with the local digest date it is for)."""
    start = _local_date(now, timezone) - dt.timedelta(days=1)
    for offset in range(_SEARCH_DAYS):
        date = start + dt.timedelta(days=offset)
        if not cadence_due(cadence, date):
            continue
        at = send_instant(date, send_at, timezone)
        if at > now:
            return Send(at, date)
    raise AssertionError(f"no send within {_SEARCH_DAYS} days of {now}")  # pragma: no cover


def next_run(now: dt.datetime, send_at: str, timezone: str, cadence: Cadence | str) -> dt.datetime:
    """The UTC instant of the first send strictly after ``now``."""
    return next_send(now, send_at, timezone, cadence).at


def last_send(now: dt.datetime, send_at: str, timezone: str, cadence: Cadence | str) -> Send:
    """The latest send at or before ``now``."""
    start = _local_date(now, timezone) + dt.timedelta(days=1)
    for offset in range(_SEARCH_DAYS):
        date = start - dt.timedelta(days=offset)
        if not cadence_due(cadence, date):
            continue
        at = send_instant(date, send_at, timezone)
        if at <= now:
            return Send(at, date)
    raise AssertionError(f"no send within {_SEARCH_DAYS} days of {now}")  # pragma: no cover


def sends_between(
    after: dt.datetime, upto: dt.datetime, send_at: str, timezone: str, cadence: Cadence | str
) -> list[Send]:
    """Every send in the half-open window (after, upto], oldest first."""
    out: list[Send] = []
    cursor = after
    while True:
        send = next_send(cursor, send_at, timezone, cadence)
        if send.at > upto:
            return out
        out.append(send)
        cursor = send.at


def today_send(
    now: dt.datetime, send_at: str, timezone: str, cadence: Cadence | str
) -> Send | None:
    """Today's (local) send when one is due today and its time has passed, else None.

    This is what the daemon catches up on at start.
    """
    today = _local_date(now, timezone)
    if not cadence_due(cadence, today):
        return None
    at = send_instant(today, send_at, timezone)
    return Send(at, today) if at <= now else None
