"""The SQLite store: migrations, file mode, subscribers, the ledger."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

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


async def _vm_steps(store: Store, call: Any) -> int:
    """How many SQLite VM instructions ``await call()`` executes (a deterministic cost)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    await store._db.set_progress_handler(count, 1)
    try:
        await call()
    finally:
        await store._db.set_progress_handler(None, 1)
    return steps


async def test_claim_and_ledger_reads_do_not_scan_the_days_rows(tmp_path: Path) -> None:
    """Claiming 50 digests and reading their states cost the same SQLite work whether 100
    or 1,500 digests of that day are already accepted: no statement walks the day's rows
    (a plan through the (date, state) index made each claim scan them: quadratic per run)."""
    async with Store.open(tmp_path / "d.sqlite3") as store:
        entries = [(f"u{i}@example.org", "", Preferences()) for i in range(1700)]
        await store.add_subscribers_bulk(entries)
        ids = [s.id for b in [b async for b in store.iter_subscribers(batch=500)] for s in b]

        async def accept(chunk: list[int]) -> None:
            await store.claim_many([(i, f"<{i}@x>", ("p1",)) for i in chunk], DAY, None)
            await store.record_many(
                [
                    (Delivery(i, "", DAY, f"<{i}@x>", "accepted", "250 ok", ("p1",)), None)
                    for i in chunk
                ]
            )

        costs = []
        for done, fresh in ((100, ids[100:150]), (1500, ids[1500:1550])):
            accepted = (await store.delivery_counts(DAY)).get("accepted", 0)
            for start in range(accepted, done, 250):
                await accept(ids[start : min(start + 250, done)])
            assert (await store.delivery_counts(DAY))["accepted"] == done
            claim = await _vm_steps(
                store,
                lambda fresh=fresh: store.claim_many(
                    [(i, f"<{i}@x>", ("p2",)) for i in fresh], DAY, None
                ),
            )
            states = await _vm_steps(store, lambda fresh=fresh: store.ledger_states(DAY, fresh))
            costs.append((claim, states))
        (claim_small, states_small), (claim_big, states_big) = costs
        assert claim_big < claim_small * 1.2, costs
        assert states_big < states_small * 1.2, costs


async def test_claim_many_skips_final_digests_and_counts_attempts(tmp_path: Path) -> None:
    """claim_many returns exactly the digests it moved to 'sending': new and retryable rows
    (attempts counted up), never accepted, failed or suppressed ones; an empty list is a
    no-op; a subscriber listed twice is claimed once, with both attempts counted."""
    async with Store.open(tmp_path / "d.sqlite3") as store:
        subs = [await store.add_subscriber(f"{n}@example.org") for n in "abcdef"]
        a, b, c, d, e, f = (s.id for s in subs)
        await store.claim_many([(i, f"<{i}@x>", ()) for i in (a, b, c, d)], DAY, None)
        await store.record_many(
            [
                (Delivery(a, "", DAY, "<a@x>", "accepted", "250 ok"), None),
                (Delivery(b, "", DAY, "<b@x>", "failed", "550 5.1.1 no"), None),
                (Delivery(c, "", DAY, "<c@x>", "deferred", "451 later"), None),
            ]
        )
        await store.set_state(f, DAY, "suppressed", "bounced")
        assert await store.claim_many([], DAY, None) == set()
        items = [(i, f"<{i}@y>", ("p1",)) for i in (a, b, c, d, e, f, e)]
        assert await store.claim_many(items, DAY, None) == {c, d, e}
        states = await store.ledger_states(DAY, [a, b, c, d, e, f])
        assert states == {
            a: ("accepted", 1),
            b: ("failed", 1),
            c: ("sending", 2),
            d: ("sending", 2),
            e: ("sending", 2),
            f: ("suppressed", 0),
        }


HOSTILE = [
    pytest.param(
        '<"]},\\ \t😀 \u202ertl@x>',
        ('p"1', "p\\2", "p]3", "é😀4", '{"a":[1]}', "p\n6"),
        '451 4.7.1 "try" \\ later ]}\r\n 😀 ' + "x" * 10_000,
        id="json-syntax",
    ),
    pytest.param(
        "<a\x00b@x>",
        ("p\x001", "p\x002", "p\n3"),
        "451 4.7.1 nul\x00 in\r\n reply " + "y" * 10_000,
        id="nul",
    ),
    pytest.param(
        "<a\\u0000b@x>",
        ("p\\u00001", "p\\u00002"),
        "451 4.7.1 \\u0000 " + "z" * 10_000,
        id="text-backslash-u0000",
    ),
]


@pytest.mark.parametrize(("mid", "papers", "reply"), HOSTILE)
async def test_hostile_values_survive_claim_and_record(
    tmp_path: Path, mid: str, papers: tuple[str, ...], reply: str
) -> None:
    """Message ids, paper ids and replies full of quotes, backslashes, JSON syntax, NUL,
    newlines and non-BMP characters are stored exactly (the reply cut at 500 characters),
    and two paper ids that differ only after a NUL stay two papers."""
    later = dt.datetime(2026, 11, 24, 9, 30, tzinfo=dt.UTC)
    path = tmp_path / "d.sqlite3"
    async with Store.open(path) as store:
        a = await store.add_subscriber("a@example.org")
        b = await store.add_subscriber("b@example.org")
        assert await store.claim_many([(a.id, mid, papers), (b.id, mid, papers)], DAY, None) == {
            a.id,
            b.id,
        }
        await store.record_many(
            [
                (Delivery(a.id, a.email, DAY, mid, "accepted", reply, papers), None),
                (Delivery(b.id, b.email, DAY, mid, "deferred", reply, papers), later),
            ]
        )
        sent = await store.sent_papers([a.id, b.id], [*papers, "other"])
        assert sent == {a.id: set(papers)}
    con = sqlite3.connect(path)
    rows = con.execute(
        "SELECT subscriber_id, message_id, paper_ids, state, reply, next_attempt_at"
        " FROM deliveries ORDER BY subscriber_id"
    ).fetchall()
    con.close()
    assert [(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5]) for r in rows] == [
        (a.id, mid, list(papers), "accepted", reply[:500], None),
        (b.id, mid, list(papers), "deferred", reply[:500], later.isoformat()),
    ]


async def test_record_many_last_reply_wins_and_papers_only_when_accepted(
    tmp_path: Path,
) -> None:
    """In one group, the last reply for a digest is its state (as one statement per reply
    would leave it); papers are recorded for accepted replies only, in that transaction."""
    async with Store.open(tmp_path / "d.sqlite3") as store:
        a = await store.add_subscriber("a@example.org")
        b = await store.add_subscriber("b@example.org")
        await store.claim_many([(a.id, "<a@x>", ("p1",)), (b.id, "<b@x>", ("p2",))], DAY, None)
        await store.record_many(
            [
                (Delivery(a.id, a.email, DAY, "<a@x>", "deferred", "451 later", ("p1",)), None),
                (Delivery(b.id, b.email, DAY, "<b@x>", "unknown", "lost", ("p2",)), None),
                (Delivery(a.id, a.email, DAY, "<a@x>", "accepted", "250 ok", ("p1",)), None),
            ]
        )
        assert await store.ledger_states(DAY, [a.id, b.id]) == {
            a.id: ("accepted", 1),
            b.id: ("unknown", 1),
        }
        assert await store.sent_papers([a.id, b.id], ["p1", "p2"]) == {a.id: {"p1"}}
        await store.record_many([])  # nothing to commit


async def test_batch_reads_cover_every_chunk(tmp_path: Path) -> None:
    """ledger_states, sent_papers and iter_subscribers return every row for id lists longer
    than one chunk (500 / 400), interests in their saved order."""
    prefs = Preferences(keywords=("zeta", "alpha", "mid"), authors=("B", "A"))
    async with Store.open(tmp_path / "d.sqlite3") as store:
        await store.add_subscribers_bulk(
            [(f"u{i}@example.org", f"U{i}", prefs) for i in range(1100)]
        )
        subs = [s for b in [b async for b in store.iter_subscribers(batch=1100)] for s in b]
        assert len(subs) == 1100 and all(s.prefs == prefs for s in subs)
        assert [s.id for s in subs] == sorted(s.id for s in subs)
        ids = [s.id for s in subs]
        await store.claim_many([(i, f"<{i}@x>", ("p1", "p2")) for i in ids], DAY, None)
        await store.record_many(
            [
                (Delivery(i, "", DAY, f"<{i}@x>", "accepted", "250", ("p1", "p2")), None)
                for i in ids[::3]
            ]
        )
        states = await store.ledger_states(DAY, ids)
        assert len(states) == 1100
        assert {i for i, (state, _) in states.items() if state == "accepted"} == set(ids[::3])
        sent = await store.sent_papers(ids, ["p2", "p3"])
        assert sent == {i: {"p2"} for i in ids[::3]}


def test_ledger_bench_runs_and_checks_its_ledgers(tmp_path: Path) -> None:
    """bench/ledger.py on a small N prints every figure and finds both ledgers complete."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, str(root / "bench" / "ledger.py"), "--n", "1200"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for kind in ("iter_subscribers", "ledger_states", "sent_papers", "claim_many", "record_many"):
        assert out.count(kind) == 2, out
    assert out.count("{'accepted': 1200}, papers_sent 12,000") == 2, out
    assert "MISMATCH" not in out and "peak RSS" in out and "floor" in out
