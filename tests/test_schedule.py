"""The pure schedule: next_run / next_send and friends, as a table of cases plus invariants."""

from __future__ import annotations

import datetime as dt
import random
from zoneinfo import ZoneInfo

import pytest

from digestd.models import Preferences, Subscriber
from digestd.pipeline import due_on
from digestd.schedule import (
    cadence_due,
    last_send,
    next_run,
    next_send,
    send_instant,
    sends_between,
    today_send,
)


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.UTC)  # type: ignore[misc]


# (id, now, send_at, timezone, cadence, expected UTC instant, expected local digest date)
CASES = [
    # plain days
    ("before-send", utc(2026, 3, 2, 6), "07:00", "UTC", "daily", utc(2026, 3, 2, 7), "2026-03-02"),
    (
        "exactly-at-send-is-past",
        utc(2026, 3, 2, 7),
        "07:00",
        "UTC",
        "daily",
        utc(2026, 3, 3, 7),
        "2026-03-03",
    ),
    (
        "1us-before-send",
        utc(2026, 3, 2, 6, 59, 59, 999999),
        "07:00",
        "UTC",
        "daily",
        utc(2026, 3, 2, 7),
        "2026-03-02",
    ),
    (
        "midnight-send",
        utc(2026, 3, 2, 0, 0, 1),
        "00:00",
        "UTC",
        "daily",
        utc(2026, 3, 3, 0),
        "2026-03-03",
    ),
    (
        "23:59-send",
        utc(2026, 3, 2, 23, 58),
        "23:59",
        "UTC",
        "daily",
        utc(2026, 3, 2, 23, 59),
        "2026-03-02",
    ),
    # month and year ends, leap days
    ("month-end", utc(2026, 1, 31, 8), "07:00", "UTC", "daily", utc(2026, 2, 1, 7), "2026-02-01"),
    ("leap-day", utc(2028, 2, 28, 8), "07:00", "UTC", "daily", utc(2028, 2, 29, 7), "2028-02-29"),
    ("no-leap-day", utc(2027, 2, 28, 8), "07:00", "UTC", "daily", utc(2027, 3, 1, 7), "2027-03-01"),
    (
        "year-end",
        utc(2026, 12, 31, 23, 30),
        "00:15",
        "UTC",
        "daily",
        utc(2027, 1, 1, 0, 15),
        "2027-01-01",
    ),
    (
        "year-end-in-+14",
        utc(2026, 12, 31, 9),
        "07:00",
        "Pacific/Kiritimati",
        "daily",
        utc(2026, 12, 31, 17),
        "2027-01-01",
    ),
    (
        "year-end-in--10",
        utc(2026, 12, 31, 18),
        "07:00",
        "Pacific/Honolulu",
        "daily",
        utc(2027, 1, 1, 17),
        "2027-01-01",
    ),
    # far-east / far-west and half-hour zones
    (
        "+13-tonga",
        utc(2026, 6, 1, 0),
        "07:00",
        "Pacific/Tongatapu",
        "daily",
        utc(2026, 6, 1, 18),
        "2026-06-02",
    ),
    (
        "+14-kiritimati",
        utc(2026, 6, 1, 16, 59),
        "07:00",
        "Pacific/Kiritimati",
        "daily",
        utc(2026, 6, 1, 17),
        "2026-06-02",
    ),
    (
        "-11-pago-pago",
        utc(2026, 6, 1, 0),
        "07:00",
        "Pacific/Pago_Pago",
        "daily",
        utc(2026, 6, 1, 18),
        "2026-06-01",
    ),
    (
        "+5:30-kolkata",
        utc(2026, 6, 1, 0),
        "07:00",
        "Asia/Kolkata",
        "daily",
        utc(2026, 6, 1, 1, 30),
        "2026-06-01",
    ),
    (
        "+5:45-kathmandu",
        utc(2026, 6, 1, 1, 20),
        "07:00",
        "Asia/Kathmandu",
        "daily",
        utc(2026, 6, 2, 1, 15),
        "2026-06-02",
    ),
    (
        "+10:30-adelaide-summer",
        utc(2026, 1, 14, 0),
        "07:00",
        "Australia/Adelaide",
        "daily",
        utc(2026, 1, 14, 20, 30),
        "2026-01-15",
    ),
    (
        "-3:30-st-johns",
        utc(2026, 1, 14, 0),
        "07:00",
        "America/St_Johns",
        "daily",
        utc(2026, 1, 14, 10, 30),
        "2026-01-14",
    ),
    # spring forward: send_at inside the gap → the first valid instant after it (the transition)
    (
        "berlin-gap-02:30",
        utc(2026, 3, 28, 12),
        "02:30",
        "Europe/Berlin",
        "daily",
        utc(2026, 3, 29, 1),
        "2026-03-29",
    ),
    (
        "berlin-gap-02:00",
        utc(2026, 3, 28, 12),
        "02:00",
        "Europe/Berlin",
        "daily",
        utc(2026, 3, 29, 1),
        "2026-03-29",
    ),
    (
        "berlin-after-gap-03:00",
        utc(2026, 3, 28, 12),
        "03:00",
        "Europe/Berlin",
        "daily",
        utc(2026, 3, 29, 1),
        "2026-03-29",
    ),
    (
        "berlin-before-gap-01:59",
        utc(2026, 3, 28, 12),
        "01:59",
        "Europe/Berlin",
        "daily",
        utc(2026, 3, 29, 0, 59),
        "2026-03-29",
    ),
    (
        "berlin-day-after-gap",
        utc(2026, 3, 29, 1),
        "02:30",
        "Europe/Berlin",
        "daily",
        utc(2026, 3, 30, 0, 30),
        "2026-03-30",
    ),
    (
        "new-york-gap",
        utc(2026, 3, 8, 0),
        "02:15",
        "America/New_York",
        "daily",
        utc(2026, 3, 8, 7),
        "2026-03-08",
    ),
    (
        "lord-howe-30min-gap",
        utc(2026, 10, 3, 0),
        "02:15",
        "Australia/Lord_Howe",
        "daily",
        utc(2026, 10, 3, 15, 30),
        "2026-10-04",
    ),
    (
        "chatham-+12:45-gap",
        utc(2026, 9, 26, 0),
        "02:50",
        "Pacific/Chatham",
        "daily",
        utc(2026, 9, 26, 14),
        "2026-09-27",
    ),
    (
        "samoa-skipped-day",
        utc(2011, 12, 29, 18),
        "07:00",
        "Pacific/Apia",
        "daily",
        utc(2011, 12, 30, 10),
        "2011-12-30",
    ),
    (
        "samoa-day-after-skip",
        utc(2011, 12, 30, 10),
        "07:00",
        "Pacific/Apia",
        "daily",
        utc(2011, 12, 30, 17),
        "2011-12-31",
    ),
    # fall back: the first occurrence, and only once
    (
        "berlin-overlap-first",
        utc(2026, 10, 24, 12),
        "02:30",
        "Europe/Berlin",
        "daily",
        utc(2026, 10, 25, 0, 30),
        "2026-10-25",
    ),
    (
        "berlin-overlap-not-twice",
        utc(2026, 10, 25, 0, 30),
        "02:30",
        "Europe/Berlin",
        "daily",
        utc(2026, 10, 26, 1, 30),
        "2026-10-26",
    ),
    (
        "new-york-overlap-first",
        utc(2026, 10, 31, 12),
        "01:30",
        "America/New_York",
        "daily",
        utc(2026, 11, 1, 5, 30),
        "2026-11-01",
    ),
    (
        "new-york-overlap-not-twice",
        utc(2026, 11, 1, 5, 30),
        "01:30",
        "America/New_York",
        "daily",
        utc(2026, 11, 2, 6, 30),
        "2026-11-02",
    ),
    (
        "lord-howe-30min-overlap",
        utc(2026, 4, 4, 0),
        "01:45",
        "Australia/Lord_Howe",
        "daily",
        utc(2026, 4, 4, 14, 45),
        "2026-04-05",
    ),
    # weekdays (Mon–Fri)
    (
        "weekdays-friday-before",
        utc(2026, 11, 27, 6),
        "07:00",
        "UTC",
        "weekdays",
        utc(2026, 11, 27, 7),
        "2026-11-27",
    ),
    (
        "weekdays-friday-after",
        utc(2026, 11, 27, 8),
        "07:00",
        "UTC",
        "weekdays",
        utc(2026, 11, 30, 7),
        "2026-11-30",
    ),
    (
        "weekdays-saturday",
        utc(2026, 11, 28, 6),
        "07:00",
        "UTC",
        "weekdays",
        utc(2026, 11, 30, 7),
        "2026-11-30",
    ),
    (
        "weekdays-local-monday-is-utc-sunday",
        utc(2026, 11, 27, 18),
        "07:00",
        "Pacific/Kiritimati",
        "weekdays",
        utc(2026, 11, 29, 17),
        "2026-11-30",
    ),
    (
        "weekdays-over-year-end",
        utc(2027, 12, 31, 8),
        "07:00",
        "UTC",
        "weekdays",
        utc(2028, 1, 3, 7),
        "2028-01-03",
    ),
    # weekly (Mondays)
    (
        "weekly-monday-at-send",
        utc(2026, 11, 30, 7),
        "07:00",
        "UTC",
        "weekly",
        utc(2026, 12, 7, 7),
        "2026-12-07",
    ),
    (
        "weekly-tuesday",
        utc(2026, 12, 1, 0),
        "07:00",
        "UTC",
        "weekly",
        utc(2026, 12, 7, 7),
        "2026-12-07",
    ),
    (
        "weekly-sunday-evening",
        utc(2026, 12, 6, 23),
        "07:00",
        "UTC",
        "weekly",
        utc(2026, 12, 7, 7),
        "2026-12-07",
    ),
    (
        "weekly-+14",
        utc(2026, 11, 29, 12),
        "07:00",
        "Pacific/Kiritimati",
        "weekly",
        utc(2026, 11, 29, 17),
        "2026-11-30",
    ),
    (
        "weekly--11",
        utc(2026, 11, 30, 12),
        "07:00",
        "Pacific/Pago_Pago",
        "weekly",
        utc(2026, 11, 30, 18),
        "2026-11-30",
    ),
    (
        "weekly-on-dst-gap-monday",
        utc(2026, 3, 1, 0),
        "02:30",
        "Europe/Berlin",
        "weekly",
        utc(2026, 3, 2, 1, 30),
        "2026-03-02",
    ),
    (
        "weekly-over-year-end",
        utc(2026, 12, 29, 0),
        "07:00",
        "UTC",
        "weekly",
        utc(2027, 1, 4, 7),
        "2027-01-04",
    ),
]


@pytest.mark.parametrize(
    ("now", "send_at", "tz", "cadence", "expected", "date"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_next_run_table(
    now: dt.datetime, send_at: str, tz: str, cadence: str, expected: dt.datetime, date: str
) -> None:
    """next_run/next_send give the expected UTC instant and local digest date for each case."""
    got = next_run(now, send_at, tz, cadence)
    assert got == expected
    assert got.tzinfo is dt.UTC
    assert got > now
    send = next_send(now, send_at, tz, cadence)
    assert (send.at, send.date.isoformat()) == (expected, date)


@pytest.mark.parametrize(
    ("tz", "send_at"),
    [
        ("Europe/Berlin", "02:30"),
        ("Europe/Berlin", "01:30"),
        ("America/New_York", "01:30"),
        ("America/New_York", "02:30"),
        ("Australia/Lord_Howe", "02:15"),
        ("Australia/Lord_Howe", "01:45"),
        ("Pacific/Chatham", "02:50"),
        ("America/Santiago", "00:00"),
        ("Asia/Kolkata", "07:00"),
        ("Pacific/Kiritimati", "23:59"),
    ],
)
def test_one_send_per_local_day_over_a_year(tz: str, send_at: str) -> None:
    """Walking next_send through a year gives exactly one send per local date, in order,
    at send_at local time unless that wall time does not exist that day."""
    zone = ZoneInfo(tz)
    now = utc(2026, 1, 1)
    dates: list[dt.date] = []
    last = now
    while now < utc(2027, 1, 1):
        send = next_send(now, send_at, tz, "daily")
        assert send.at > last
        local = send.at.astimezone(zone)
        if local.strftime("%H:%M") != send_at:
            # only in a gap: the wall time does not exist, so we are at the transition
            wall = dt.datetime.combine(send.date, dt.time.fromisoformat(send_at), zone)
            assert wall.astimezone(dt.UTC).astimezone(zone).replace(tzinfo=None) != wall.replace(
                tzinfo=None
            )
            assert (local - dt.timedelta(seconds=1)).utcoffset() != local.utcoffset()
        dates.append(send.date)
        last = now = send.at
    assert dates == sorted(set(dates))
    assert len(dates) in (365, 366)


def test_random_instants_against_brute_force() -> None:
    """For random instants, zones and cadences, next_send is the earliest due send after now,
    found by brute force over the neighbouring local dates."""
    rng = random.Random(20261124)
    zones = [
        "UTC",
        "Europe/London",
        "Europe/Berlin",
        "America/New_York",
        "America/Sao_Paulo",
        "Asia/Tokyo",
        "Asia/Kolkata",
        "Asia/Kathmandu",
        "Australia/Lord_Howe",
        "Pacific/Chatham",
        "Pacific/Kiritimati",
        "Pacific/Pago_Pago",
        "America/St_Johns",
    ]
    for _ in range(3000):
        tz = rng.choice(zones)
        cadence = rng.choice(["daily", "weekdays", "weekly"])
        send_at = f"{rng.randrange(24):02d}:{rng.choice([0, 15, 30, 45, 59]):02d}"
        now = utc(2025, 1, 1) + dt.timedelta(seconds=rng.randrange(3 * 365 * 86400))
        local = now.astimezone(ZoneInfo(tz)).date()
        candidates = [
            send_instant(local + dt.timedelta(days=d), send_at, tz)
            for d in range(-9, 10)
            if cadence_due(cadence, local + dt.timedelta(days=d))
        ]
        expected = min(c for c in candidates if c > now)
        assert next_run(now, send_at, tz, cadence) == expected, (now, send_at, tz, cadence)
        previous = last_send(now, send_at, tz, cadence)
        assert previous.at <= now < expected
        assert previous.at == max(c for c in candidates if c <= now)


def test_sends_between_is_half_open() -> None:
    """sends_between(a, b) holds the sends in (a, b]: the send at a is excluded, at b included."""
    a, b = utc(2026, 3, 2, 7), utc(2026, 3, 5, 7)
    got = sends_between(a, b, "07:00", "UTC", "daily")
    assert [s.date.isoformat() for s in got] == ["2026-03-03", "2026-03-04", "2026-03-05"]
    assert sends_between(a, a, "07:00", "UTC", "daily") == []


def test_today_send_only_when_due_and_past() -> None:
    """today_send: today's send once its time has passed, None before it or on a non-due day."""
    assert today_send(utc(2026, 11, 30, 6), "07:00", "UTC", "daily") is None
    sent = today_send(utc(2026, 11, 30, 7), "07:00", "UTC", "daily")
    assert sent is not None and sent.date == dt.date(2026, 11, 30)
    assert today_send(utc(2026, 12, 1, 8), "07:00", "UTC", "weekly") is None  # Tuesday
    assert today_send(utc(2026, 11, 28, 8), "07:00", "UTC", "weekdays") is None  # Saturday
    # local today differs from UTC today in +14
    got = today_send(utc(2026, 11, 29, 18), "07:00", "Pacific/Kiritimati", "weekly")
    assert got is not None and got.date == dt.date(2026, 11, 30)


def test_cadence_matches_pipeline_due_on() -> None:
    """schedule.cadence_due and pipeline.due_on agree on every cadence and weekday."""
    for cadence in ("daily", "weekdays", "weekly"):
        sub = Subscriber(id=1, email="a@example.org", prefs=Preferences(cadence=cadence))
        for day in range(14):
            date = dt.date(2026, 11, 23) + dt.timedelta(days=day)
            assert due_on(sub, date) == cadence_due(cadence, date)
    assert [cadence_due("weekly", dt.date(2026, 11, 23) + dt.timedelta(d)) for d in range(7)] == [
        True,
        False,
        False,
        False,
        False,
        False,
        False,
    ]


@pytest.mark.parametrize("send_at", ["7:00", "24:00", "07:60", "0700", "", "07:00:00", "ab:cd"])
def test_bad_send_at_is_refused(send_at: str) -> None:
    """A malformed send_at raises ValueError instead of scheduling something odd."""
    with pytest.raises(ValueError):
        next_run(utc(2026, 1, 1), send_at, "UTC", "daily")


def test_naive_now_is_refused() -> None:
    """A naive datetime is ambiguous: refused."""
    with pytest.raises(ValueError, match="aware"):
        next_run(dt.datetime(2026, 1, 1), "07:00", "UTC", "daily")


def test_non_utc_aware_now_is_accepted() -> None:
    """An aware non-UTC 'now' means the same instant; the result is still UTC."""
    now = dt.datetime(2026, 3, 2, 8, tzinfo=ZoneInfo("Europe/Berlin"))  # 07:00Z
    assert next_run(now, "07:00", "UTC", "daily") == utc(2026, 3, 3, 7)
