"""The daemon's scheduler in-process: a real SQLite store, time passed in, and the pipeline
replaced by a recorder (the unit seam) so each run's date, trigger and subscribers are seen."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from digestd.config import Settings, settings_from_dict
from digestd.daemon import Daemon, Slot, resolve_slots
from digestd.errors import StoreError
from digestd.models import Delivery, Preferences, Subscriber
from digestd.notify import Notifier
from digestd.pipeline import RunSummary
from digestd.store import Store


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.UTC)  # type: ignore[misc]


@dataclass
class Call:
    date: dt.date
    trigger: str
    why: str
    emails: set[str]


@dataclass
class Recorder:
    """Stands in for pipeline.run_once; records what the daemon asked for."""

    store: Store
    calls: list[Call] = field(default_factory=list)
    outcomes: list[str | Exception] = field(default_factory=list)  # "ok" | "failed" | exc

    async def __call__(
        self, settings: Settings, store: Store, date: dt.date, **kw: Any
    ) -> RunSummary:
        include = kw["include"]
        subs: list[Subscriber] = []
        async for batch in store.iter_subscribers():
            subs.extend(batch)
        self.calls.append(
            Call(date, kw["trigger"], kw.get("why", ""), {s.email for s in subs if include(s)})
        )
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if isinstance(outcome, Exception):
            raise outcome
        return RunSummary(date=date, state=outcome, reason="" if outcome == "ok" else "boom")


def make_settings(tmp_path: Path, **digest: str) -> Settings:
    return settings_from_dict(
        {
            "digest": {
                "from_address": "papers@example.org",
                "send_at": "07:00",
                "timezone": "UTC",
                **digest,
            },
            "store": {"path": str(tmp_path / "d.sqlite3")},
            "delivery": {"transport": "maildir", "maildir": str(tmp_path / "outbox")},
        }
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "d.sqlite3") as s:
        yield s


async def add(
    store: Store,
    email: str,
    tz: str | None = None,
    send_at: str | None = None,
    cadence: str = "daily",
    status: str = "active",
) -> Subscriber:
    prefs = Preferences(timezone=tz, send_at=send_at, cadence=cadence)  # type: ignore[arg-type]
    sub = await store.add_subscriber(email, prefs=prefs)
    if status != "active":
        await store.set_status(email, status)
    return sub


class FakeClock:
    def __init__(self) -> None:
        self.now = utc(2000, 1, 1)

    def __call__(self) -> dt.datetime:
        return self.now


class Driven(Daemon):
    """A Daemon whose clock is set by step(now)."""

    fake: FakeClock

    async def step(self, now: dt.datetime | None = None) -> dt.datetime | None:
        if now is not None:
            self.fake.now = now
        return await super().step(now)

    async def catch_up(self, now: dt.datetime | None = None) -> int:
        if now is not None:
            self.fake.now = now
        return await super().catch_up(now)


def daemon_for(settings: Settings, store: Store, rec: Recorder) -> Driven:
    clock = FakeClock()
    daemon = Driven(settings, store, Notifier(None), run=rec, clock=clock)
    daemon.fake = clock
    return daemon


async def walk(daemon: Daemon, start: dt.datetime, until: dt.datetime) -> list[dt.datetime]:
    """Drive the scheduler like run_forever does: step, jump to the wake-up it asks for."""
    wakes = []
    daemon._cursor = start
    now = start
    while now < until:
        wake = await daemon.step(now)
        assert wake is not None and wake > now
        wakes.append(wake)
        now = wake
    return wakes


async def test_slots_resolve_defaults_and_skip_inactive(tmp_path: Path, store: Store) -> None:
    """Distinct slots come from active subscribers, NULL meaning the configured default."""
    settings = make_settings(tmp_path)
    await add(store, "a@example.org")  # default UTC 07:00
    await add(store, "b@example.org", tz="UTC", send_at="07:00")  # the same slot, spelled out
    await add(store, "c@example.org", tz="Europe/Berlin")
    await add(store, "d@example.org", send_at="06:00", cadence="weekly")
    await add(store, "e@example.org", tz="Asia/Tokyo", status="paused")
    slots = resolve_slots(await store.delivery_slots(), settings)
    assert slots == [
        Slot("Europe/Berlin", "07:00", "daily"),
        Slot("UTC", "06:00", "weekly"),
        Slot("UTC", "07:00", "daily"),
    ]


async def test_each_slot_runs_at_its_local_time_for_its_local_date(
    tmp_path: Path, store: Store
) -> None:
    """Walking two days: every slot fires once a day at its own local time, for its own local
    date, with exactly its subscribers; weekly only on Mondays; paused never."""
    settings = make_settings(tmp_path)
    await add(store, "utc@example.org")
    await add(store, "berlin@example.org", tz="Europe/Berlin")
    await add(store, "kiri@example.org", tz="Pacific/Kiritimati")
    await add(store, "ny-weekly@example.org", tz="America/New_York", cadence="weekly")
    await add(store, "kolkata@example.org", tz="Asia/Kolkata", send_at="06:30")
    await add(store, "paused@example.org", tz="Asia/Tokyo", status="paused")
    rec = Recorder(store)
    daemon = daemon_for(settings, store, rec)
    # Sunday 2026-11-29 12:00Z → Tuesday 12:00Z
    await walk(daemon, utc(2026, 11, 29, 12), utc(2026, 12, 1, 12))
    got = [(c.date.isoformat(), sorted(c.emails), c.trigger) for c in rec.calls]
    assert got == [
        ("2026-11-30", ["kiri@example.org"], "schedule"),  # 17:00Z Sunday
        ("2026-11-30", ["kolkata@example.org"], "schedule"),  # 01:00Z
        ("2026-11-30", ["berlin@example.org"], "schedule"),  # 06:00Z
        ("2026-11-30", ["utc@example.org"], "schedule"),  # 07:00Z
        ("2026-11-30", ["ny-weekly@example.org"], "schedule"),  # 12:00Z, Monday only
        ("2026-12-01", ["kiri@example.org"], "schedule"),
        ("2026-12-01", ["kolkata@example.org"], "schedule"),
        ("2026-12-01", ["berlin@example.org"], "schedule"),
        ("2026-12-01", ["utc@example.org"], "schedule"),
    ]


async def test_slots_due_together_share_one_run_per_date(tmp_path: Path, store: Store) -> None:
    """Slots due at the same instant for the same date run as one pass; a slot due at that
    instant for another local date gets its own pass."""
    settings = make_settings(tmp_path)
    await add(store, "utc@example.org")
    await add(store, "london@example.org", tz="Europe/London")  # = UTC in winter
    await add(store, "pago@example.org", tz="Pacific/Pago_Pago", send_at="20:00")  # 07:00Z
    rec = Recorder(store)
    daemon = daemon_for(settings, store, rec)
    daemon._cursor = utc(2026, 11, 30, 6, 59)
    await daemon.step(utc(2026, 11, 30, 7, 0, 1))
    got = sorted((c.date.isoformat(), sorted(c.emails)) for c in rec.calls)
    assert got == [
        ("2026-11-29", ["pago@example.org"]),  # still the evening before, in -11
        ("2026-11-30", ["london@example.org", "utc@example.org"]),
    ]


async def test_wake_up_is_the_next_send(tmp_path: Path, store: Store) -> None:
    """step() returns the next send across slots; nothing runs before it."""
    settings = make_settings(tmp_path)
    await add(store, "utc@example.org")
    await add(store, "berlin@example.org", tz="Europe/Berlin", send_at="07:30")
    rec = Recorder(store)
    daemon = daemon_for(settings, store, rec)
    daemon._cursor = utc(2026, 11, 30, 5)
    assert await daemon.step(utc(2026, 11, 30, 6)) == utc(2026, 11, 30, 6, 30)
    assert rec.calls == []
    assert await daemon.step(utc(2026, 11, 30, 6, 30)) == utc(2026, 11, 30, 7)
    assert [sorted(c.emails) for c in rec.calls] == [["berlin@example.org"]]


async def test_clock_going_back_does_not_run_a_slot_twice(tmp_path: Path, store: Store) -> None:
    """When the wall clock steps back over a send, the scheduler does not run it again."""
    settings = make_settings(tmp_path)
    await add(store, "utc@example.org")
    rec = Recorder(store)
    daemon = daemon_for(settings, store, rec)
    daemon._cursor = utc(2026, 11, 30, 6, 59)
    await daemon.step(utc(2026, 11, 30, 7, 0, 1))
    await daemon.step(utc(2026, 11, 30, 6, 30))  # NTP stepped the clock back
    await daemon.step(utc(2026, 11, 30, 7, 0, 2))
    assert len(rec.calls) == 1
    await daemon.step(utc(2026, 12, 1, 7, 0, 1))
    assert [c.date for c in rec.calls] == [dt.date(2026, 11, 30), dt.date(2026, 12, 1)]


async def test_clock_jumping_forward_runs_only_the_latest_missed_send(
    tmp_path: Path, store: Store
) -> None:
    """After a long suspend, a slot runs once, for its latest date, not once per missed day."""
    settings = make_settings(tmp_path)
    await add(store, "utc@example.org")
    rec = Recorder(store)
    daemon = daemon_for(settings, store, rec)
    daemon._cursor = utc(2026, 11, 30, 6)
    await daemon.step(utc(2026, 12, 3, 8))
    assert [c.date for c in rec.calls] == [dt.date(2026, 12, 3)]


async def mark_accepted(store: Store, sub: Subscriber, date: dt.date) -> None:
    assert await store.claim(sub.id, date, f"<{sub.id}@x>", [], None)
    await store.record(Delivery(sub.id, sub.email, date, f"<{sub.id}@x>", "accepted", "250 ok"))


async def test_catch_up_runs_past_incomplete_slots_once(tmp_path: Path, store: Store) -> None:
    """At start, today's sends that are past and not all final are run, trigger catch-up, with
    the reason; complete slots and slots not yet due today are left alone."""
    settings = make_settings(tmp_path)
    today = dt.date(2026, 11, 30)
    u1 = await add(store, "utc1@example.org")
    await add(store, "utc2@example.org")
    b1 = await add(store, "berlin@example.org", tz="Europe/Berlin")
    await add(store, "ny@example.org", tz="America/New_York")  # 12:00Z: not yet
    await add(store, "tue@example.org", cadence="weekly", send_at="05:00")  # Monday: due
    await add(store, "we@example.org", cadence="weekdays", tz="Asia/Tokyo")  # Mon 07:00 JST
    await mark_accepted(store, u1, today)
    await mark_accepted(store, b1, today)
    we = await store.get_subscriber("we@example.org")
    await mark_accepted(store, we, today)
    rec = Recorder(store)
    daemon = daemon_for(settings, store, rec)
    runs = await daemon.catch_up(utc(2026, 11, 30, 10))
    assert runs == 1
    (call,) = rec.calls
    assert call.trigger == "catch-up" and call.date == today
    assert call.emails == {"utc1@example.org", "utc2@example.org", "tue@example.org"}
    assert "catch-up" in call.why and "07:00 UTC" in call.why and "1 of 2" in call.why


async def test_catch_up_uses_the_local_date(tmp_path: Path, store: Store) -> None:
    """In +14 the catch-up is for the local date, which is already tomorrow in UTC."""
    settings = make_settings(tmp_path)
    await add(store, "kiri@example.org", tz="Pacific/Kiritimati")
    rec = Recorder(store)
    daemon = daemon_for(settings, store, rec)
    await daemon.catch_up(utc(2026, 11, 30, 20))  # 10:00 on 12-01 in Kiritimati
    assert [c.date for c in rec.calls] == [dt.date(2026, 12, 1)]


async def test_nothing_to_catch_up_when_everything_is_final(tmp_path: Path, store: Store) -> None:
    """A restart after today's digests went out runs nothing."""
    settings = make_settings(tmp_path)
    sub = await add(store, "utc@example.org")
    await mark_accepted(store, sub, dt.date(2026, 11, 30))
    rec = Recorder(store)
    daemon = daemon_for(settings, store, rec)
    assert await daemon.catch_up(utc(2026, 11, 30, 10)) == 0
    assert rec.calls == []


async def test_failed_run_is_retried_with_backoff(tmp_path: Path, store: Store) -> None:
    """A failed run is retried 5 min later (trigger retry); after success no more retries."""
    settings = make_settings(tmp_path)
    await add(store, "utc@example.org")
    rec = Recorder(store, outcomes=["failed", StoreError("disk full"), "ok"])
    daemon = daemon_for(settings, store, rec)
    daemon._cursor = utc(2026, 11, 30, 6)
    wake = await daemon.step(utc(2026, 11, 30, 7))
    assert wake == utc(2026, 11, 30, 7, 5)
    wake = await daemon.step(wake)
    assert wake == utc(2026, 11, 30, 7, 15)  # doubled after the exception
    wake = await daemon.step(wake)
    assert wake == utc(2026, 12, 1, 7)  # success: back to the schedule
    assert [c.trigger for c in rec.calls] == ["schedule", "retry", "retry"]
    assert {c.date for c in rec.calls} == {dt.date(2026, 11, 30)}


async def test_retries_stop_before_the_next_send(tmp_path: Path, store: Store) -> None:
    """A run that keeps failing is retried with growing delays, capped at an hour, and given
    up before the slot's next digest is due."""
    settings = make_settings(tmp_path)
    await add(store, "utc@example.org")
    rec = Recorder(store, outcomes=["failed"] * 100)
    daemon = daemon_for(settings, store, rec)
    wakes = await walk(daemon, utc(2026, 11, 30, 6), utc(2026, 12, 1, 7))
    retries = [c for c in rec.calls if c.trigger == "retry"]
    assert all(c.date == dt.date(2026, 11, 30) for c in retries)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(wakes)]
    assert gaps[:5] == [300, 600, 1200, 2400, 3600]
    assert max(gaps[:-1]) == 3600
    assert wakes[-1] == utc(2026, 12, 1, 7)  # next day's send; no retry after it
    assert len(retries) == 26  # 07:05, 07:15, 07:35, then hourly 08:15 … 06:15


async def test_stop_prevents_new_runs(tmp_path: Path, store: Store) -> None:
    """Once stopping, due sends are not started."""
    settings = make_settings(tmp_path)
    await add(store, "utc@example.org")
    rec = Recorder(store)
    daemon = daemon_for(settings, store, rec)
    daemon._cursor = utc(2026, 11, 30, 6)
    daemon.request_stop("test")
    await daemon.step(utc(2026, 11, 30, 8))
    assert await daemon.catch_up(utc(2026, 11, 30, 8)) == 0
    assert rec.calls == []


async def test_run_forever_returns_promptly_on_stop(tmp_path: Path, store: Store) -> None:
    """run_forever sleeps until the next send but wakes at once when asked to stop."""
    settings = make_settings(tmp_path)
    await add(store, "utc@example.org", send_at="07:00")
    rec = Recorder(store)
    daemon = Daemon(settings, store, Notifier(None), run=rec, clock=lambda: utc(2026, 11, 30, 6))
    task = asyncio.create_task(daemon.run_forever())
    await asyncio.sleep(0)  # let it reach its sleep
    daemon.request_stop("test")
    await asyncio.wait_for(task, 5)
    assert rec.calls == []
