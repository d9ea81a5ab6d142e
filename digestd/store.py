"""The SQLite store: subscribers, preferences, papers seen, runs and the delivery ledger.

This is the only module with SQL. One :class:`Store` wraps one aiosqlite connection (WAL,
foreign keys on, busy timeout); open it with ``async with Store.open(path) as store``.

Schema changes are named migrations, applied in order and recorded in ``_migrations``.

The ledger (``deliveries``, unique per subscriber and digest date) moves each message through
``pending → sending → accepted | deferred | failed | suppressed | unknown``; every change is
committed right after the server's reply, so a crash loses at most the messages in flight,
and those (left in ``sending``) are retried by the next run, never skipped. A paper is
recorded in ``papers_sent`` in the same transaction that marks its digest accepted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import json
import operator
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from .errors import NotFoundError, StoreError, ValidationError
from .models import Delivery, DeliveryState, Paper, Preferences, Subscriber

_T = TypeVar("_T")

# The ledger's statements use RETURNING (3.35), UPDATE … FROM (3.33) and the JSON functions.
MIN_SQLITE = (3, 35, 0)

# find_by_token: how many leading token characters are looked up through the index.
TOKEN_SELECTOR = 8

INTEREST_KINDS = {
    "keywords": "keyword",
    "exclude": "exclude",
    "categories": "category",
    "authors": "author",
    "seed_papers": "seed_paper",
}

MIGRATIONS: tuple[tuple[str, str], ...] = (
    (
        "0001_initial",
        """
        CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        CREATE TABLE subscribers (
            id             INTEGER PRIMARY KEY,
            email          TEXT NOT NULL UNIQUE COLLATE NOCASE,
            name           TEXT NOT NULL DEFAULT '',
            status         TEXT NOT NULL DEFAULT 'active'
                           CHECK (status IN ('active','paused','unsubscribed',
                                             'suppressed','pending')),
            status_reason  TEXT NOT NULL DEFAULT '',
            token          TEXT NOT NULL UNIQUE,
            consent_at     TEXT,
            consent_source TEXT NOT NULL DEFAULT '',
            created_at     TEXT NOT NULL,
            updated_at     TEXT NOT NULL
        );
        CREATE TABLE preferences (
            subscriber_id INTEGER PRIMARY KEY REFERENCES subscribers(id) ON DELETE CASCADE,
            max_papers    INTEGER NOT NULL DEFAULT 10,
            min_upvotes   INTEGER,
            timezone      TEXT,
            send_at       TEXT,
            cadence       TEXT NOT NULL DEFAULT 'daily'
                          CHECK (cadence IN ('daily','weekdays','weekly'))
        );
        CREATE TABLE interests (
            subscriber_id INTEGER NOT NULL REFERENCES subscribers(id) ON DELETE CASCADE,
            kind          TEXT NOT NULL
                          CHECK (kind IN ('keyword','exclude','category','author','seed_paper')),
            value         TEXT NOT NULL,
            position      INTEGER NOT NULL,
            PRIMARY KEY (subscriber_id, kind, value)
        );
        CREATE TABLE papers (
            id          TEXT PRIMARY KEY,
            title       TEXT NOT NULL,
            data        TEXT NOT NULL,
            first_seen  TEXT NOT NULL,
            last_seen   TEXT NOT NULL
        );
        CREATE TABLE runs (
            id           INTEGER PRIMARY KEY,
            digest_date  TEXT NOT NULL,
            trigger      TEXT NOT NULL DEFAULT '',
            state        TEXT NOT NULL DEFAULT 'running'
                         CHECK (state IN ('running','ok','partial','failed','interrupted')),
            reason       TEXT NOT NULL DEFAULT '',
            started_at   TEXT NOT NULL,
            finished_at  TEXT,
            fetched      INTEGER NOT NULL DEFAULT 0,
            subscribers  INTEGER NOT NULL DEFAULT 0,
            sent         INTEGER NOT NULL DEFAULT 0,
            skipped      INTEGER NOT NULL DEFAULT 0,
            failed       INTEGER NOT NULL DEFAULT 0,
            seconds      REAL NOT NULL DEFAULT 0
        );
        CREATE TABLE deliveries (
            id            INTEGER PRIMARY KEY,
            subscriber_id INTEGER NOT NULL REFERENCES subscribers(id) ON DELETE CASCADE,
            digest_date   TEXT NOT NULL,
            message_id    TEXT NOT NULL,
            state         TEXT NOT NULL
                          CHECK (state IN ('pending','sending','accepted','deferred',
                                           'failed','suppressed','unknown')),
            attempts      INTEGER NOT NULL DEFAULT 0,
            reply         TEXT NOT NULL DEFAULT '',
            paper_ids     TEXT NOT NULL DEFAULT '[]',
            run_id        INTEGER REFERENCES runs(id) ON DELETE SET NULL,
            next_attempt_at TEXT,
            created_at    TEXT NOT NULL,
            updated_at    TEXT NOT NULL,
            UNIQUE (subscriber_id, digest_date)
        );
        CREATE INDEX deliveries_by_date_state ON deliveries (digest_date, state);
        CREATE TABLE papers_sent (
            subscriber_id INTEGER NOT NULL REFERENCES subscribers(id) ON DELETE CASCADE,
            paper_id      TEXT NOT NULL,
            digest_date   TEXT NOT NULL,
            PRIMARY KEY (subscriber_id, paper_id)
        ) WITHOUT ROWID;
        """,
    ),
    (
        "0002_digest_skips",
        """
        CREATE TABLE digest_skips (
            subscriber_id INTEGER NOT NULL REFERENCES subscribers(id) ON DELETE CASCADE,
            digest_date   TEXT NOT NULL,
            reason        TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (subscriber_id, digest_date)
        ) WITHOUT ROWID;
        """,
    ),
)


# claim_many: one UPSERT for a whole group. Each JSON item is [subscriber id, message id,
# [paper ids]]; ``json_extract(…, '$[2]')`` gives the paper ids back as a JSON array text.
# Rows already final (accepted, failed, suppressed) are left alone and not RETURNed. The
# ``WHERE true`` tells SQLite's parser the ON CONFLICT belongs to the INSERT, not a join.
_CLAIM_COLUMNS = (
    "INSERT INTO deliveries (subscriber_id, digest_date, message_id, state, attempts,"
    " paper_ids, run_id, created_at, updated_at)"
)
_CLAIM_UPSERT = (
    " ON CONFLICT (subscriber_id, digest_date) DO UPDATE SET"
    " state = 'sending', attempts = attempts + 1, message_id = excluded.message_id,"
    " paper_ids = excluded.paper_ids, run_id = excluded.run_id,"
    " updated_at = excluded.updated_at"
    " WHERE deliveries.state NOT IN ('accepted', 'failed', 'suppressed')"
    " RETURNING subscriber_id"
)
_CLAIM_SQL = (
    _CLAIM_COLUMNS
    + " SELECT json_extract(j.value, '$[0]'), ?1, json_extract(j.value, '$[1]'), 'sending', 1,"
    " json_extract(j.value, '$[2]'), ?2, ?3, ?3 FROM json_each(?4) AS j WHERE true" + _CLAIM_UPSERT
)
# The same for one digest, its values bound directly (see _EXACT).
_CLAIM_ONE_SQL = _CLAIM_COLUMNS + " VALUES (?, ?, ?, 'sending', 1, ?, ?, ?, ?)" + _CLAIM_UPSERT

# SQLite's JSON functions cut a string at an escaped NUL ("\u0000"): a group whose JSON
# holds one (or the literal text "\u0000", which only looks like one) is written with
# its values bound one row at a time instead. Upstream cleaning keeps control characters
# out of ids and replies, so this is never the fast path's cost, only its guarantee.
_EXACT = "\\u0000"


# record_many: each JSON item is [subscriber id, digest date, state, reply, next attempt
# or null, [paper ids if accepted], 1 if it is the group's last reply for that digest].
# The UPDATE applies the last replies; the INSERT records the accepted ones' papers.
_RECORD_SQL = (
    "UPDATE deliveries SET state = json_extract(j.value, '$[2]'),"
    " reply = json_extract(j.value, '$[3]'), updated_at = ?1,"
    " next_attempt_at = json_extract(j.value, '$[4]')"
    " FROM (SELECT value FROM json_each(?2) WHERE json_extract(value, '$[6]') = 1) AS j"
    " WHERE deliveries.subscriber_id = json_extract(j.value, '$[0]')"
    " AND deliveries.digest_date = json_extract(j.value, '$[1]')"
)
_PAPERS_SENT_SQL = (
    "INSERT OR IGNORE INTO papers_sent (subscriber_id, paper_id, digest_date)"
    " SELECT json_extract(m.value, '$[0]'), p.value, json_extract(m.value, '$[1]')"
    " FROM json_each(?1) AS m, json_each(m.value, '$[5]') AS p"
)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: int
    digest_date: str
    trigger: str
    state: str
    reason: str
    started_at: str
    finished_at: str | None
    fetched: int
    subscribers: int
    sent: int
    skipped: int
    failed: int
    seconds: float


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    subscriber_id: int
    email: str
    digest_date: str
    state: str
    attempts: int
    reply: str
    updated_at: str


def paper_to_json(paper: Paper) -> str:
    data = asdict(paper)
    if paper.published is not None:
        data["published"] = paper.published.isoformat()
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def paper_from_json(text: str) -> Paper:
    data: dict[str, Any] = json.loads(text)
    for key in ("authors", "sources", "categories", "keywords"):
        data[key] = tuple(data.get(key) or ())
    if data.get("published"):
        data["published"] = dt.datetime.fromisoformat(data["published"])
    fields = set(Paper.__dataclass_fields__)
    return Paper(**{k: v for k, v in data.items() if k in fields})


def _create_private_file(path: Path) -> None:
    """Create the database file with mode 0600 before SQLite opens it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)


class Store:
    """Async access to the digestd database. Use :meth:`open`."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        # One connection, many tasks (the sender records replies concurrently): transactions
        # must not interleave, or SQLite refuses "a transaction within a transaction".
        self._tx_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path, *, migrate: bool = True) -> AsyncIterator[Store]:
        path = Path(path)
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old: digestd needs"
                f" {'.'.join(map(str, MIN_SQLITE))} or later (RETURNING, UPDATE … FROM, JSON)"
            )
        try:
            _create_private_file(path)
            db = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store {path}: {exc}") from None
        store = cls(db, path)
        try:
            try:
                await db.execute("PRAGMA busy_timeout = 30000")
                await db.execute("PRAGMA journal_mode = WAL")
                await db.execute("PRAGMA foreign_keys = ON")
                await db.execute("PRAGMA synchronous = NORMAL")
                if migrate:
                    await store.migrate()
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"the store {path} is not usable: {exc}") from None
            yield store
        finally:
            await db.close()

    async def migrate(self) -> list[str]:
        """Apply pending named migrations; return the names applied now."""
        db = self._db
        await db.execute(
            "CREATE TABLE IF NOT EXISTS _migrations"
            " (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        applied = {row[0] async for row in await db.execute("SELECT name FROM _migrations")}
        done: list[str] = []
        for name, sql in MIGRATIONS:
            if name in applied:
                continue
            await db.execute("BEGIN IMMEDIATE")
            try:
                # executescript would COMMIT on its own; run statements one by one instead.
                for statement in _split_sql(sql):
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                    (name, _iso(utcnow())),
                )
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            done.append(name)
        return done

    async def applied_migrations(self) -> list[str]:
        cur = await self._db.execute("SELECT name FROM _migrations ORDER BY name")
        return [row[0] for row in await cur.fetchall()]

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        async with self._tx_lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")

    async def _in_one_transaction(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` inside BEGIN IMMEDIATE … COMMIT in SQLite's thread, as *one* call.

        The same transaction as :meth:`transaction`, but one hop to aiosqlite's thread instead
        of one per statement: the sender's ledger writes (a claim and a group of replies per
        few messages) are dominated by those hops and the thread switches they cost. A task
        cancelled while ``work`` is queued or running does not stop it: it commits (or rolls
        back on error) in full, before anything queued after it.
        """

        def run() -> _T:
            conn: sqlite3.Connection = cast(Any, self._db)._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        async with self._tx_lock:
            # aiosqlite's own methods go through ``_execute`` (queue the call, await its result).
            return cast(_T, await cast(Any, self._db)._execute(run))

    async def _read(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run the read-only ``work`` in SQLite's thread as one call (one hop, no BEGIN)."""
        return cast(_T, await cast(Any, self._db)._execute(work, cast(Any, self._db)._conn))

    # ------------------------------------------------------------------ meta / secrets
    async def secret(self, name: str, nbytes: int = 32) -> bytes:
        """A random secret kept in the (mode 0600) database, created on first use."""
        key = f"secret:{name}"
        async with self.transaction():
            cur = await self._db.execute("SELECT value FROM meta WHERE key = ?", (key,))
            row = await cur.fetchone()
            if row is None:
                value = secrets.token_hex(nbytes)
                await self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
            else:
                value = row[0]
        return bytes.fromhex(value)

    # ------------------------------------------------------------------ subscribers
    async def add_subscriber(
        self,
        email: str,
        name: str = "",
        prefs: Preferences | None = None,
        *,
        status: str = "active",
        consent_source: str = "cli",
        now: dt.datetime | None = None,
    ) -> Subscriber:
        async with self.transaction():
            await self._insert_subscriber(
                email, name, prefs or Preferences(), status, consent_source, now or utcnow()
            )
        return await self.get_subscriber(email)

    async def _insert_subscriber(
        self,
        email: str,
        name: str,
        prefs: Preferences,
        status: str,
        consent_source: str,
        now: dt.datetime,
    ) -> int:
        stamp = _iso(now)
        try:
            cur = await self._db.execute(
                "INSERT INTO subscribers (email, name, status, token, consent_at, consent_source,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    email,
                    name,
                    status,
                    secrets.token_urlsafe(24),
                    stamp if status == "active" else None,
                    consent_source,
                    stamp,
                    stamp,
                ),
            )
        except sqlite3.IntegrityError:
            raise ValidationError(f"email {email!r}: already subscribed") from None
        sub_id = cur.lastrowid
        assert sub_id is not None
        await self._write_prefs(sub_id, prefs)
        return sub_id

    async def _write_prefs(self, sub_id: int, prefs: Preferences) -> None:
        db = self._db
        await db.execute(
            "INSERT INTO preferences (subscriber_id, max_papers, min_upvotes, timezone, send_at,"
            " cadence) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (subscriber_id) DO UPDATE SET"
            " max_papers = excluded.max_papers, min_upvotes = excluded.min_upvotes,"
            " timezone = excluded.timezone, send_at = excluded.send_at,"
            " cadence = excluded.cadence",
            (
                sub_id,
                prefs.max_papers,
                prefs.min_upvotes,
                prefs.timezone,
                prefs.send_at,
                prefs.cadence,
            ),
        )
        await db.execute("DELETE FROM interests WHERE subscriber_id = ?", (sub_id,))
        rows = [
            (sub_id, kind, value, i)
            for attr, kind in INTEREST_KINDS.items()
            for i, value in enumerate(getattr(prefs, attr))
        ]
        if rows:
            await db.executemany(
                "INSERT INTO interests (subscriber_id, kind, value, position) VALUES (?,?,?,?)",
                rows,
            )

    async def update_subscriber(
        self,
        email: str,
        *,
        name: str | None = None,
        prefs: Preferences | None = None,
        now: dt.datetime | None = None,
    ) -> Subscriber:
        async with self.transaction():
            sub = await self._get(email)
            if name is not None:
                await self._db.execute(
                    "UPDATE subscribers SET name = ?, updated_at = ? WHERE id = ?",
                    (name, _iso(now or utcnow()), sub.id),
                )
            if prefs is not None:
                await self._write_prefs(sub.id, prefs)
                await self._db.execute(
                    "UPDATE subscribers SET updated_at = ? WHERE id = ?",
                    (_iso(now or utcnow()), sub.id),
                )
        return await self.get_subscriber(email)

    async def set_status(
        self, email: str, status: str, reason: str = "", now: dt.datetime | None = None
    ) -> Subscriber:
        async with self.transaction():
            sub = await self._get(email)
            await self._set_status(sub.id, status, reason, now or utcnow())
        return await self.get_subscriber(email)

    async def _set_status(self, sub_id: int, status: str, reason: str, now: dt.datetime) -> None:
        await self._db.execute(
            "UPDATE subscribers SET status = ?, status_reason = ?, updated_at = ? WHERE id = ?",
            (status, reason, _iso(now), sub_id),
        )

    async def suppress(self, subscriber_id: int, reason: str) -> None:
        async with self.transaction():
            await self._set_status(subscriber_id, "suppressed", reason, utcnow())

    async def unsubscribe_by_token(
        self, token: str, reason: str = "one-click"
    ) -> Subscriber | None:
        """Mark the token's subscriber unsubscribed (idempotent); None for an unknown token."""
        async with self.transaction():
            cur = await self._db.execute("SELECT email FROM subscribers WHERE token = ?", (token,))
            row = await cur.fetchone()
            if row is None:
                return None
            await self._db.execute(
                "UPDATE subscribers SET status = 'unsubscribed', status_reason = ?,"
                " updated_at = ? WHERE token = ? AND status != 'unsubscribed'",
                (reason, _iso(utcnow()), token),
            )
        return await self.get_subscriber(str(row[0]))

    async def by_token(self, token: str) -> Subscriber | None:
        cur = await self._db.execute("SELECT email FROM subscribers WHERE token = ?", (token,))
        row = await cur.fetchone()
        return None if row is None else await self.get_subscriber(str(row[0]))

    # ------------------------------------------------------------------ web links (web.py)
    async def find_by_token(self, token: str) -> Subscriber | None:
        """The token's subscriber, without leaking through timing how much of a guess matched.

        A plain ``WHERE token = ?`` walks the unique index comparing bytes, and stops at the
        first difference: in principle the response time tells a guesser how many leading
        characters were right. Instead the index is searched only for the token's first
        :data:`TOKEN_SELECTOR` characters (a range scan), and each candidate's whole token is
        then compared with :func:`hmac.compare_digest`, whose time does not depend on where
        the strings differ. Timing can reveal at most the selector (48 bits); the remaining
        ≥ 144 bits of a 192-bit token are only ever compared in constant time.
        """
        if len(token) <= TOKEN_SELECTOR or not token.isascii():
            return None
        selector = token[:TOKEN_SELECTOR]
        cur = await self._db.execute(
            "SELECT email, token FROM subscribers WHERE token >= ? AND token < ? LIMIT 16",
            (selector, selector + "\x7f"),
        )
        found: str | None = None
        for email, stored in await cur.fetchall():
            # Every candidate is compared (no early exit), and compare_digest is constant-time.
            if hmac.compare_digest(str(stored).encode(), token.encode()):
                found = str(email)
        return None if found is None else await self.get_subscriber(found)

    async def activate_with_consent(
        self,
        email: str,
        source: str,
        *,
        allowed_from: Sequence[str] = ("pending",),
        issued_at: dt.datetime | None = None,
        now: dt.datetime | None = None,
    ) -> str:
        """Make a subscriber active, recording when and how they consented.

        Only from a status in ``allowed_from``. For an 'unsubscribed' subscriber,
        ``issued_at`` (when the confirmation was sent) must be later than their last change,
        so an old confirmation link cannot undo a later unsubscribe.
        Returns ``"activated"``, ``"already"`` (already active), ``"refused"`` or ``"missing"``.
        """
        stamp = now or utcnow()
        async with self.transaction():
            cur = await self._db.execute(
                "SELECT id, status, updated_at FROM subscribers WHERE email = ?", (email,)
            )
            row = await cur.fetchone()
            if row is None:
                return "missing"
            sub_id, status, updated_at = int(row[0]), str(row[1]), str(row[2])
            if status == "active":
                return "already"
            if status not in allowed_from:
                return "refused"
            if (
                status == "unsubscribed"
                and issued_at is not None
                and issued_at <= dt.datetime.fromisoformat(updated_at)
            ):
                return "refused"
            await self._db.execute(
                "UPDATE subscribers SET status = 'active', status_reason = '', consent_at = ?,"
                " consent_source = ?, updated_at = ? WHERE id = ?",
                (_iso(stamp), source, _iso(stamp), sub_id),
            )
        return "activated"

    async def consent_of(self, email: str) -> tuple[dt.datetime | None, str]:
        """(consent time, consent source) of a subscriber."""
        cur = await self._db.execute(
            "SELECT consent_at, consent_source FROM subscribers WHERE email = ?", (email,)
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFoundError(f"no subscriber {email!r}")
        return (dt.datetime.fromisoformat(row[0]) if row[0] else None, str(row[1]))

    async def remove_subscriber(self, email: str) -> None:
        async with self.transaction():
            sub = await self._get(email)
            await self._db.execute("DELETE FROM subscribers WHERE id = ?", (sub.id,))

    async def _get(self, email: str) -> Subscriber:
        subs = await self._load("WHERE s.email = ?", (email,))
        if not subs:
            raise NotFoundError(f"no subscriber {email!r}")
        return subs[0]

    async def get_subscriber(self, email: str) -> Subscriber:
        return await self._get(email)

    async def find_subscriber(self, email: str) -> Subscriber | None:
        subs = await self._load("WHERE s.email = ?", (email,))
        return subs[0] if subs else None

    async def list_subscribers(self) -> list[Subscriber]:
        return await self._load("", ())

    async def iter_subscribers(
        self, *, batch: int = 1000, statuses: Sequence[str] = ("active",)
    ) -> AsyncIterator[list[Subscriber]]:
        """Subscribers in id order, ``batch`` at a time (keyset pagination: flat memory)."""
        last = 0
        marks = ",".join("?" for _ in statuses)
        while True:
            subs = await self._load(
                f"WHERE s.id > ? AND s.status IN ({marks}) ORDER BY s.id LIMIT ?",
                (last, *statuses, batch),
            )
            if not subs:
                return
            yield subs
            last = subs[-1].id

    async def delivery_slots(self) -> list[tuple[str | None, str | None, str]]:
        """Distinct (timezone, send_at, cadence) of active subscribers; None = the default."""
        cur = await self._db.execute(
            "SELECT DISTINCT p.timezone, p.send_at, p.cadence FROM subscribers s"
            " JOIN preferences p ON p.subscriber_id = s.id WHERE s.status = 'active'"
        )
        return [(row[0], row[1], str(row[2])) for row in await cur.fetchall()]

    async def record_skips(self, digest_date: dt.date, skips: Sequence[tuple[int, str]]) -> None:
        """Subscribers who had nothing to send that day (so a catch-up need not run again)."""
        if not skips:
            return
        day = digest_date.isoformat()
        async with self.transaction():
            await self._db.executemany(
                "INSERT INTO digest_skips (subscriber_id, digest_date, reason) VALUES (?, ?, ?)"
                " ON CONFLICT (subscriber_id, digest_date) DO UPDATE SET reason = excluded.reason",
                [(sub_id, day, reason[:200]) for sub_id, reason in skips],
            )

    async def slot_progress(
        self,
        digest_date: dt.date,
        slot: tuple[str, str, str],
        defaults: tuple[str, str],
    ) -> tuple[int, int]:
        """(active subscribers in the slot, of whom are done on that date: a final ledger row,
        or nothing to send that day).

        ``slot`` is (timezone, send_at, cadence) with the defaults already applied; a NULL
        timezone/send_at in preferences means ``defaults`` (timezone, send_at).
        """
        timezone, send_at, cadence = slot
        cur = await self._db.execute(
            "SELECT COUNT(*), COUNT(d.subscriber_id) + COUNT(k.subscriber_id)"
            " FROM subscribers s"
            " JOIN preferences p ON p.subscriber_id = s.id"
            " LEFT JOIN deliveries d ON d.subscriber_id = s.id AND d.digest_date = ?"
            "  AND d.state IN ('accepted', 'failed', 'suppressed')"
            " LEFT JOIN digest_skips k ON k.subscriber_id = s.id AND k.digest_date = ?"
            "  AND d.subscriber_id IS NULL"
            " WHERE s.status = 'active' AND COALESCE(p.timezone, ?) = ?"
            " AND COALESCE(p.send_at, ?) = ? AND p.cadence = ?",
            (
                digest_date.isoformat(),
                digest_date.isoformat(),
                defaults[0],
                timezone,
                defaults[1],
                send_at,
                cadence,
            ),
        )
        row = await cur.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def count_subscribers(self) -> dict[str, int]:
        cur = await self._db.execute("SELECT status, COUNT(*) FROM subscribers GROUP BY status")
        return {str(status): int(n) for status, n in await cur.fetchall()}

    async def _load(self, where: str, params: tuple[Any, ...]) -> list[Subscriber]:
        """Subscribers matching ``where`` (which may end in ORDER BY s.id … LIMIT), in id
        order, with their preferences. One hop to SQLite's thread; each query returns its
        rows as one JSON array (see :func:`_json_rows`)."""
        inner = (
            "SELECT s.id, s.email, s.name, s.status, s.token, s.created_at, p.max_papers,"
            " p.min_upvotes, p.timezone, p.send_at, p.cadence FROM subscribers s"
            " JOIN preferences p ON p.subscriber_id = s.id " + where
        )
        sql = (
            "SELECT json_group_array(json_array(id, email, name, status, token, created_at,"
            f" max_papers, min_upvotes, timezone, send_at, cadence)) FROM ({inner})"
        )

        def work(conn: sqlite3.Connection) -> tuple[list[list[Any]], list[list[Any]]]:
            rows = _json_rows(conn, sql, params)
            rows.sort(key=_FIRST)  # already in order, as a rule: then this is one pass
            found: list[list[Any]] = []
            for chunk in _chunks([row[0] for row in rows], 500):
                marks = ",".join("?" for _ in chunk)
                found += _json_rows(
                    conn,
                    "SELECT json_group_array(json_array(subscriber_id, kind, value, position))"
                    f" FROM interests WHERE subscriber_id IN ({marks})",
                    chunk,
                )
            found.sort(key=_INTEREST_ORDER)
            return rows, found

        rows, found = await self._read(work)
        if not rows:
            return []
        interests: dict[int, dict[str, list[str]]] = {row[0]: {} for row in rows}
        for sub_id, kind, value, _ in found:
            interests[sub_id].setdefault(kind, []).append(value)
        out: list[Subscriber] = []
        for row in rows:
            got = interests[row[0]]
            prefs = Preferences(
                keywords=tuple(got.get("keyword", ())),
                exclude=tuple(got.get("exclude", ())),
                categories=tuple(got.get("category", ())),
                authors=tuple(got.get("author", ())),
                seed_papers=tuple(got.get("seed_paper", ())),
                max_papers=row[6],
                min_upvotes=row[7],
                timezone=row[8],
                send_at=row[9],
                cadence=row[10],
            )
            out.append(
                Subscriber(
                    id=row[0],
                    email=row[1],
                    name=row[2],
                    status=row[3],
                    token=row[4],
                    created_at=dt.datetime.fromisoformat(row[5]),
                    prefs=prefs,
                )
            )
        return out

    async def add_subscribers_bulk(
        self,
        entries: Sequence[tuple[str, str, Preferences]],
        *,
        consent_source: str = "bulk",
        now: dt.datetime | None = None,
    ) -> int:
        """Add many new, active subscribers (already-normalised emails) in one transaction
        with a few ``executemany`` calls: ~100,000 a second. All or nothing: an email that
        is already subscribed raises ValidationError and adds none. Returns how many."""
        stamp = _iso(now or utcnow())
        async with self.transaction():
            try:
                await self._db.executemany(
                    "INSERT INTO subscribers (email, name, status, token, consent_at,"
                    " consent_source, created_at, updated_at)"
                    " VALUES (?, ?, 'active', ?, ?, ?, ?, ?)",
                    [
                        (
                            email,
                            name,
                            secrets.token_urlsafe(24),
                            stamp,
                            consent_source,
                            stamp,
                            stamp,
                        )
                        for email, name, _ in entries
                    ],
                )
            except sqlite3.IntegrityError as exc:
                raise ValidationError(f"bulk add: {exc}") from None
            ids: dict[str, int] = {}
            for chunk in _chunks([e for e, _, _ in entries], 500):
                marks = ",".join("?" for _ in chunk)
                cur = await self._db.execute(
                    f"SELECT email, id FROM subscribers WHERE email IN ({marks})", tuple(chunk)
                )
                ids.update({str(email).lower(): int(sid) for email, sid in await cur.fetchall()})
            prefs_rows = []
            interest_rows = []
            for email, _, prefs in entries:
                sid = ids[email.lower()]
                prefs_rows.append(
                    (
                        sid,
                        prefs.max_papers,
                        prefs.min_upvotes,
                        prefs.timezone,
                        prefs.send_at,
                        prefs.cadence,
                    )
                )
                for attr, kind in INTEREST_KINDS.items():
                    for i, value in enumerate(dict.fromkeys(getattr(prefs, attr))):
                        interest_rows.append((sid, kind, value, i))
            await self._db.executemany(
                "INSERT INTO preferences (subscriber_id, max_papers, min_upvotes, timezone,"
                " send_at, cadence) VALUES (?, ?, ?, ?, ?, ?)",
                prefs_rows,
            )
            await self._db.executemany(
                "INSERT INTO interests (subscriber_id, kind, value, position) VALUES (?,?,?,?)",
                interest_rows,
            )
        return len(entries)

    async def replace_all(
        self, entries: Sequence[tuple[str, str, Preferences]], *, dry_run: bool = False
    ) -> dict[str, int]:
        """Import: upsert every (email, name, prefs) in one transaction (all or nothing)."""
        async with self._tx_lock:
            return await self._replace_all(entries, dry_run)

    async def _replace_all(
        self, entries: Sequence[tuple[str, str, Preferences]], dry_run: bool
    ) -> dict[str, int]:
        added = updated = 0
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            for email, name, prefs in entries:
                existing = await self.find_subscriber(email)
                if existing is None:
                    await self._insert_subscriber(email, name, prefs, "active", "import", utcnow())
                    added += 1
                else:
                    await self._db.execute(
                        "UPDATE subscribers SET name = ?, updated_at = ? WHERE id = ?",
                        (name, _iso(utcnow()), existing.id),
                    )
                    await self._write_prefs(existing.id, prefs)
                    updated += 1
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        await self._db.execute("ROLLBACK" if dry_run else "COMMIT")
        return {"added": added, "updated": updated}

    # ------------------------------------------------------------------ papers
    async def upsert_papers(self, papers: Iterable[Paper], now: dt.datetime | None = None) -> None:
        stamp = _iso(now or utcnow())
        rows = [(p.id, p.title, paper_to_json(p), stamp, stamp) for p in papers]
        async with self.transaction():
            await self._db.executemany(
                "INSERT INTO papers (id, title, data, first_seen, last_seen) VALUES (?,?,?,?,?)"
                " ON CONFLICT (id) DO UPDATE SET title = excluded.title, data = excluded.data,"
                " last_seen = excluded.last_seen",
                rows,
            )

    async def get_papers(self, ids: Iterable[str]) -> dict[str, Paper]:
        out: dict[str, Paper] = {}
        for chunk in _chunks(list(ids), 500):
            marks = ",".join("?" for _ in chunk)
            cur = await self._db.execute(
                f"SELECT id, data FROM papers WHERE id IN ({marks})", tuple(chunk)
            )
            for pid, data in await cur.fetchall():
                out[pid] = paper_from_json(data)
        return out

    async def recent_papers(self, limit: int = 5000) -> list[Paper]:
        cur = await self._db.execute(
            "SELECT data FROM papers ORDER BY last_seen DESC LIMIT ?", (limit,)
        )
        return [paper_from_json(row[0]) for row in await cur.fetchall()]

    # ------------------------------------------------------------------ runs
    async def start_run(self, digest_date: dt.date, trigger: str) -> int:
        async with self.transaction():
            cur = await self._db.execute(
                "INSERT INTO runs (digest_date, trigger, started_at) VALUES (?, ?, ?)",
                (digest_date.isoformat(), trigger, _iso(utcnow())),
            )
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def finish_run(
        self, run_id: int, state: str, counts: Mapping[str, float], reason: str = ""
    ) -> None:
        async with self.transaction():
            await self._db.execute(
                "UPDATE runs SET state = ?, reason = ?, finished_at = ?, fetched = ?,"
                " subscribers = ?, sent = ?, skipped = ?, failed = ?, seconds = ? WHERE id = ?",
                (
                    state,
                    reason,
                    _iso(utcnow()),
                    int(counts.get("fetched", 0)),
                    int(counts.get("subscribers", 0)),
                    int(counts.get("sent", 0)),
                    int(counts.get("skipped", 0)),
                    int(counts.get("failed", 0)),
                    float(counts.get("seconds", 0.0)),
                    run_id,
                ),
            )

    async def mark_interrupted_runs(self) -> int:
        """Runs left 'running' by a process that died; called under the run lock."""
        async with self.transaction():
            cur = await self._db.execute(
                "UPDATE runs SET state = 'interrupted', finished_at = ?,"
                " reason = 'process ended during the run' WHERE state = 'running'",
                (_iso(utcnow()),),
            )
        return cur.rowcount

    async def recent_runs(self, limit: int = 10) -> list[RunRecord]:
        cur = await self._db.execute(
            "SELECT id, digest_date, trigger, state, reason, started_at, finished_at, fetched,"
            " subscribers, sent, skipped, failed, seconds FROM runs ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [RunRecord(*row) for row in await cur.fetchall()]

    async def last_successful_date(self) -> dt.date | None:
        cur = await self._db.execute(
            "SELECT MAX(digest_date) FROM runs WHERE state IN ('ok', 'partial')"
        )
        row = await cur.fetchone()
        return dt.date.fromisoformat(row[0]) if row and row[0] else None

    # ------------------------------------------------------------------ ledger
    async def ledger_states(
        self, digest_date: dt.date, subscriber_ids: Sequence[int]
    ) -> dict[int, tuple[str, int]]:
        """subscriber id → (state, attempts) for those who have a ledger row on that date."""
        day = digest_date.isoformat()

        def work(conn: sqlite3.Connection) -> dict[int, tuple[str, int]]:
            out: dict[int, tuple[str, int]] = {}
            for chunk in _chunks(list(subscriber_ids), 500):
                marks = ",".join("?" for _ in chunk)
                for sub_id, state, attempts in _json_rows(
                    conn,
                    "SELECT json_group_array(json_array(subscriber_id, state, attempts))"
                    f" FROM deliveries WHERE digest_date = ? AND subscriber_id IN ({marks})",
                    (day, *chunk),
                ):
                    out[sub_id] = (state, attempts)
            return out

        return await self._read(work)

    async def sent_papers(
        self, subscriber_ids: Sequence[int], paper_ids: Sequence[str]
    ) -> dict[int, set[str]]:
        """Which of ``paper_ids`` each subscriber has already been sent."""
        if not subscriber_ids or not paper_ids:
            return {}
        pmarks = ",".join("?" for _ in paper_ids)

        def work(conn: sqlite3.Connection) -> dict[int, set[str]]:
            out: dict[int, set[str]] = {}
            for chunk in _chunks(list(subscriber_ids), 400):
                marks = ",".join("?" for _ in chunk)
                for sub_id, pid in _json_rows(
                    conn,
                    "SELECT json_group_array(json_array(subscriber_id, paper_id))"
                    f" FROM papers_sent WHERE subscriber_id IN ({marks})"
                    f" AND paper_id IN ({pmarks})",
                    (*chunk, *paper_ids),
                ):
                    out.setdefault(sub_id, set()).add(pid)
            return out

        return await self._read(work)

    async def claim(
        self,
        subscriber_id: int,
        digest_date: dt.date,
        message_id: str,
        paper_ids: Sequence[str],
        run_id: int | None,
    ) -> bool:
        """Move the digest to 'sending' (creating the row); False when it is already final.

        Commits before the message is handed to the server, so a crash leaves the row in
        'sending' and the next run retries it.
        """
        claimed = await self.claim_many(
            [(subscriber_id, message_id, tuple(paper_ids))], digest_date, run_id
        )
        return bool(claimed)

    async def claim_many(
        self,
        items: Sequence[tuple[int, str, tuple[str, ...]]],
        digest_date: dt.date,
        run_id: int | None,
    ) -> set[int]:
        """Claim several digests in one transaction; returns the subscriber ids claimed.

        One statement for the whole group: an UPSERT over the items (passed as one JSON
        document) that moves every row not already final to 'sending' and RETURNs the ones
        it inserted or moved. The final-state check is the UPSERT's own WHERE, evaluated
        under BEGIN IMMEDIATE's write lock, so no separate read is needed.
        """
        if not items:
            return set()
        stamp = _iso(utcnow())
        doc = json.dumps(
            [(sub_id, message_id, paper_ids) for sub_id, message_id, paper_ids in items],
            ensure_ascii=False,
            separators=(",", ":"),
        )
        day = digest_date.isoformat()

        def work(conn: sqlite3.Connection) -> set[int]:
            if _EXACT not in doc:
                rows = conn.execute(_CLAIM_SQL, (day, run_id, stamp, doc)).fetchall()
                return {int(row[0]) for row in rows}
            claimed: set[int] = set()
            for sub_id, message_id, paper_ids in items:
                papers = json.dumps(list(paper_ids), ensure_ascii=False, separators=(",", ":"))
                values = (sub_id, day, message_id, papers, run_id, stamp, stamp)
                claimed.update(int(row[0]) for row in conn.execute(_CLAIM_ONE_SQL, values))
            return claimed

        return await self._in_one_transaction(work)

    async def record(
        self, delivery: Delivery, *, next_attempt_at: dt.datetime | None = None
    ) -> None:
        await self.record_many([(delivery, next_attempt_at)])

    async def record_many(self, results: Sequence[tuple[Delivery, dt.datetime | None]]) -> None:
        """Commit the server's replies; accepted digests add their papers to papers_sent.

        The whole group is one JSON document and two set-based statements in one
        transaction (an UPDATE … FROM json_each and an INSERT … SELECT over the accepted
        digests' paper ids), so SQLite runs each in one step: ``executemany`` would step once
        per row, releasing and re-taking the GIL each time, and when the event loop is busy
        those hand-overs cost more than the rows themselves (bench/ledger.py --busy-loop).
        When one group holds several replies for the same digest, the last one is its state
        (as statement-per-row did), and every accepted one records its papers.
        """
        if not results:
            return
        last = {(d.subscriber_id, d.date): index for index, (d, _) in enumerate(results)}
        rows = []
        for index, (delivery, next_at) in enumerate(results):
            is_last = last[(delivery.subscriber_id, delivery.date)] == index
            accepted = delivery.state == "accepted"
            if is_last or accepted:  # else superseded in this group, with no papers
                rows.append(
                    (
                        delivery.subscriber_id,
                        delivery.date.isoformat(),
                        delivery.state,
                        delivery.reply[:500],
                        _iso(next_at) if next_at else None,
                        delivery.paper_ids if accepted else (),
                        int(is_last),
                    )
                )
        stamp = _iso(utcnow())
        doc = json.dumps(rows, ensure_ascii=False, separators=(",", ":"))

        def work(conn: sqlite3.Connection) -> None:
            if _EXACT not in doc:
                conn.execute(_RECORD_SQL, (stamp, doc))
                conn.execute(_PAPERS_SENT_SQL, (doc,))
                return
            conn.executemany(
                "UPDATE deliveries SET state = ?, reply = ?, updated_at = ?,"
                " next_attempt_at = ? WHERE subscriber_id = ? AND digest_date = ?",
                [(r[2], r[3], stamp, r[4], r[0], r[1]) for r in rows if r[6]],
            )
            conn.executemany(
                "INSERT OR IGNORE INTO papers_sent (subscriber_id, paper_id, digest_date)"
                " VALUES (?, ?, ?)",
                [(r[0], pid, r[1]) for r in rows for pid in r[5]],
            )

        await self._in_one_transaction(work)

    async def set_state(
        self, subscriber_id: int, digest_date: dt.date, state: DeliveryState, reply: str = ""
    ) -> None:
        """Record a state without a send (e.g. a rendering failure) creating the row if needed."""
        stamp = _iso(utcnow())
        async with self.transaction():
            await self._db.execute(
                "INSERT INTO deliveries (subscriber_id, digest_date, message_id, state, reply,"
                " created_at, updated_at) VALUES (?, ?, '', ?, ?, ?, ?)"
                " ON CONFLICT (subscriber_id, digest_date) DO UPDATE SET state = excluded.state,"
                " reply = excluded.reply, updated_at = excluded.updated_at",
                (subscriber_id, digest_date.isoformat(), state, reply[:500], stamp, stamp),
            )

    async def delivery_counts(self, digest_date: dt.date | None = None) -> dict[str, int]:
        if digest_date is None:
            cur = await self._db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state")
        else:
            cur = await self._db.execute(
                "SELECT state, COUNT(*) FROM deliveries WHERE digest_date = ? GROUP BY state",
                (digest_date.isoformat(),),
            )
        return {str(state): int(n) for state, n in await cur.fetchall()}

    async def recent_failures(self, limit: int = 10) -> list[LedgerEntry]:
        cur = await self._db.execute(
            "SELECT d.subscriber_id, s.email, d.digest_date, d.state, d.attempts, d.reply,"
            " d.updated_at FROM deliveries d JOIN subscribers s ON s.id = d.subscriber_id"
            " WHERE d.state IN ('failed', 'deferred', 'unknown', 'suppressed')"
            " ORDER BY d.updated_at DESC, d.id DESC LIMIT ?",
            (limit,),
        )
        return [LedgerEntry(*row) for row in await cur.fetchall()]

    async def ledger_for(self, email: str) -> list[LedgerEntry]:
        cur = await self._db.execute(
            "SELECT d.subscriber_id, s.email, d.digest_date, d.state, d.attempts, d.reply,"
            " d.updated_at FROM deliveries d JOIN subscribers s ON s.id = d.subscriber_id"
            " WHERE s.email = ? ORDER BY d.digest_date DESC",
            (email,),
        )
        return [LedgerEntry(*row) for row in await cur.fetchall()]


_FIRST = operator.itemgetter(0)
_INTEREST_ORDER = operator.itemgetter(0, 1, 3)  # subscriber, kind, position


def _json_rows(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[list[Any]]:
    """The rows of ``sql``, a SELECT of one ``json_group_array(json_array(…))``, as lists.

    The batch reads return their rows this way, as one value built in SQLite, because
    fetching row by row steps the statement once per row and releases the GIL each time:
    with the event loop busy, taking it back costs a thread switch per row (measured in
    bench/ledger.py --busy-loop). Rows come in no guaranteed order.
    """
    row = conn.execute(sql, params).fetchone()
    return cast(list[list[Any]], json.loads(row[0]))


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
