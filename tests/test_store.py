"""The SQLite store: migrations, file mode, subscribers, the ledger."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from digestd.errors import NotFoundError, StoreError, ValidationError
from digestd.models import Delivery, Paper, Preferences
from digestd.store import MIGRATIONS, Store

DAY = dt.date(2026, 11, 24)


async def test_new_store_is_private_wal_with_foreign_keys(tmp_path: Path) -> None:
    """The file is created 0600, in WAL mode, with every migration recorded by name."""
    path = tmp_path / "state" / "d.sqlite3"
    async with Store.open(path) as store:
        assert await store.applied_migrations() == [name for name, _ in MIGRATIONS]
        assert len(MIGRATIONS) >= 2
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


async def test_migrations_run_once(tmp_path: Path) -> None:
    """Opening an existing store applies nothing again."""
    path = tmp_path / "d.sqlite3"
    async with Store.open(path) as store:
        await store.add_subscriber("a@example.org")
    async with Store.open(path) as store:
        assert await store.migrate() == []
        assert len(await store.list_subscribers()) == 1


async def test_not_a_database_is_a_clean_error(tmp_path: Path) -> None:
    """A garbage file gives StoreError, not a traceback from sqlite."""
    path = tmp_path / "d.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not usable"):
        async with Store.open(path):
            pass


async def test_subscriber_round_trip(tmp_path: Path) -> None:
    """Preferences survive a write and a read, lists in order."""
    prefs = Preferences(
        keywords=("b", "a"),
        exclude=("survey",),
        categories=("cs.LG",),
        authors=("Ada Lovelace",),
        seed_papers=("2511.04570",),
        max_papers=8,
        min_upvotes=3,
        timezone="Europe/London",
        send_at="07:30",
        cadence="weekdays",
    )
    async with Store.open(tmp_path / "d.sqlite3") as store:
        sub = await store.add_subscriber("ada@example.org", "Ada", prefs)
        assert sub.prefs == prefs
        assert len(sub.token) >= 32
        again = await store.get_subscriber("ADA@example.org")
        assert again == sub
        with pytest.raises(ValidationError, match="already subscribed"):
            await store.add_subscriber("ada@example.org")
        with pytest.raises(NotFoundError):
            await store.get_subscriber("nobody@example.org")


async def test_remove_cascades(tmp_path: Path) -> None:
    """Removing a subscriber removes preferences, interests and ledger rows (foreign keys on)."""
    async with Store.open(tmp_path / "d.sqlite3") as store:
        sub = await store.add_subscriber("a@example.org", prefs=Preferences(keywords=("x",)))
        await store.claim(sub.id, DAY, "<m@x>", ("p1",), None)
        await store.remove_subscriber("a@example.org")
        assert await store.delivery_counts() == {}
        assert await store.list_subscribers() == []


async def test_ledger_claim_record_and_never_twice(tmp_path: Path) -> None:
    """A digest is claimed, accepted once, and never claimed again; papers are recorded."""
    async with Store.open(tmp_path / "d.sqlite3") as store:
        sub = await store.add_subscriber("a@example.org")
        assert await store.claim(sub.id, DAY, "<m@x>", ("p1", "p2"), None)
        assert (await store.ledger_states(DAY, [sub.id]))[sub.id] == ("sending", 1)
        await store.record(
            Delivery(sub.id, sub.email, DAY, "<m@x>", "accepted", "250 ok", ("p1", "p2"))
        )
        assert not await store.claim(sub.id, DAY, "<m@x>", ("p1",), None)
        assert await store.sent_papers([sub.id], ["p1", "p2", "p3"]) == {sub.id: {"p1", "p2"}}


async def test_deferred_and_crashed_rows_are_retried(tmp_path: Path) -> None:
    """'deferred' and a 'sending' left by a crash can be claimed again; attempts count up."""
    async with Store.open(tmp_path / "d.sqlite3") as store:
        a = await store.add_subscriber("a@example.org")
        b = await store.add_subscriber("b@example.org")
        await store.claim(a.id, DAY, "<a@x>", (), None)
        await store.record(Delivery(a.id, a.email, DAY, "<a@x>", "deferred", "451 later"))
        await store.claim(b.id, DAY, "<b@x>", (), None)  # then the process dies
    async with Store.open(tmp_path / "d.sqlite3") as store:
        assert await store.claim_many([(a.id, "<a@x>", ()), (b.id, "<b@x>", ())], DAY, None) == {
            a.id,
            b.id,
        }
        states = await store.ledger_states(DAY, [a.id, b.id])
        assert states == {a.id: ("sending", 2), b.id: ("sending", 2)}


async def test_iter_subscribers_streams_active_in_batches(tmp_path: Path) -> None:
    """Keyset batches cover every active subscriber once, paused ones left out."""
    async with Store.open(tmp_path / "d.sqlite3") as store:
        for i in range(25):
            await store.add_subscriber(f"u{i}@example.org")
        await store.set_status("u3@example.org", "paused")
        batches = [b async for b in store.iter_subscribers(batch=10)]
        assert [len(b) for b in batches] == [10, 10, 4]
        emails = [s.email for b in batches for s in b]
        assert "u3@example.org" not in emails and len(set(emails)) == 24


async def test_unsubscribe_by_token_idempotent(tmp_path: Path) -> None:
    """The token unsubscribes once and keeps answering; an unknown token gives None."""
    async with Store.open(tmp_path / "d.sqlite3") as store:
        sub = await store.add_subscriber("a@example.org")
        first = await store.unsubscribe_by_token(sub.token)
        second = await store.unsubscribe_by_token(sub.token)
        assert first is not None and second is not None
        assert first.status == second.status == "unsubscribed"
        assert await store.unsubscribe_by_token("forged") is None


async def test_papers_round_trip_and_secret(tmp_path: Path) -> None:
    """Papers (with unicode and dates) survive the store; secrets are stable."""
    paper = Paper(
        id="2511.04570",
        title="Thinking with Vídeo 🎥",
        abstract="a" * 5000,
        authors=("Ada",),
        upvotes=3,
        published=dt.datetime(2025, 11, 7, tzinfo=dt.UTC),
    )
    async with Store.open(tmp_path / "d.sqlite3") as store:
        await store.upsert_papers([paper])
        assert (await store.get_papers(["2511.04570", "missing"])) == {"2511.04570": paper}
        key = await store.secret("links")
        assert len(key) == 32 and key == await store.secret("links")


async def test_import_is_all_or_nothing(tmp_path: Path) -> None:
    """replace_all rolls back every row when one fails; dry_run changes nothing."""
    async with Store.open(tmp_path / "d.sqlite3") as store:
        rows = [("a@example.org", "A", Preferences()), ("b@example.org", "B", Preferences())]
        assert await store.replace_all(rows, dry_run=True) == {"added": 2, "updated": 0}
        assert await store.list_subscribers() == []
        await store.replace_all(rows)
        bad = [
            ("c@example.org", "C", Preferences()),
            ("d@example.org", "D", Preferences(cadence="hourly")),
        ]  # type: ignore[arg-type]
        with pytest.raises(sqlite3.IntegrityError):
            await store.replace_all(bad)
        assert [s.email for s in await store.list_subscribers()] == [
            "a@example.org",
            "b@example.org",
        ]


async def test_skipped_subscribers_count_as_done_for_the_slot(tmp_path: Path) -> None:
    """A subscriber with nothing to send that day counts as done, so catch-up is not re-run."""
    slot, defaults = ("UTC", "07:00", "daily"), ("UTC", "07:00")
    async with Store.open(tmp_path / "d.sqlite3") as store:
        a = await store.add_subscriber("a@example.org")
        b = await store.add_subscriber("b@example.org")
        assert await store.slot_progress(DAY, slot, defaults) == (2, 0)
        await store.claim(a.id, DAY, "<a@x>", ("p1",), None)
        await store.record(Delivery(a.id, a.email, DAY, "<a@x>", "accepted", "250 ok", ("p1",)))
        assert await store.slot_progress(DAY, slot, defaults) == (2, 1)
        await store.record_skips(DAY, [(b.id, "no paper matched"), (a.id, "counted once")])
        assert await store.slot_progress(DAY, slot, defaults) == (2, 2)
        assert await store.slot_progress(DAY + dt.timedelta(days=1), slot, defaults) == (2, 0)
