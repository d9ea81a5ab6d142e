"""The pipeline against a fault-injecting SMTP server: every class of reply does the right thing
to the ledger, the subscriber and the run's exit state."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FIXTURES
from httpserver import Reply, ScriptedServer
from smtpserver import Fault, SmtpServer

from digestd.config import Settings, settings_from_dict
from digestd.pipeline import run_once
from digestd.store import Store

PAPERS = FIXTURES / "hf" / "daily_papers_month-2025-11_items-for-2025-11-07_final.json"
DAY = dt.date(2025, 11, 7)


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


def settings_for(tmp_path: Path, port: int, **smtp: object) -> Settings:
    return settings_from_dict(
        {
            "digest": {"from_address": "papers@example.org"},
            "store": {"path": str(tmp_path / "d.sqlite3")},
            "delivery": {"transport": "smtp", "concurrency": 2, "max_attempts": 3},
            "smtp": {"host": "127.0.0.1", "port": port, "security": "none", "timeout": 5, **smtp},
            "sources": [{"kind": "file", "path": str(PAPERS)}],
        }
    )


async def subscribe(settings: Settings, *emails: str) -> None:
    async with Store.open(settings.store.path) as store:
        for email in emails:
            await store.add_subscriber(email)


async def go(settings: Settings, **kw: object):  # type: ignore[no-untyped-def]
    async with Store.open(settings.store.path) as store:
        return await run_once(settings, store, DAY, retry_base=0.05, **kw)  # type: ignore[arg-type]


async def states(settings: Settings) -> dict[str, tuple[str, str]]:
    """email → (subscriber status, ledger state)."""
    async with Store.open(settings.store.path) as store:
        out = {}
        for sub in await store.list_subscribers():
            rows = await store.ledger_for(sub.email)
            out[sub.email] = (sub.status, rows[0].state if rows else "")
        return out


async def test_temporary_failures_are_retried_with_backoff(
    tmp_path: Path, smtp: SmtpServer
) -> None:
    """421/451/452 then success: delivered within the run, exactly once, run ok."""
    settings = settings_for(tmp_path, smtp.port)
    await subscribe(settings, "a@example.org", "b@example.org", "c@example.org")
    smtp.script("a@example.org", Fault("rcpt", "451 4.3.0 try later"))
    smtp.script(
        "b@example.org",
        Fault("rcpt", "452 4.2.2 mailbox busy"),
        Fault("data", "451 4.7.1 greylisted"),
    )
    smtp.script("c@example.org", Fault("data", "421 4.4.2 closing"))
    summary = await go(settings)
    assert summary.state == "ok", summary.reason
    assert sorted(r for m in smtp.received for r in m.rcpt_tos) == [
        "a@example.org",
        "b@example.org",
        "c@example.org",
    ]
    assert {s for s in (await states(settings)).values()} == {("active", "accepted")}


async def test_giving_up_after_max_attempts(tmp_path: Path, smtp: SmtpServer) -> None:
    """A 4xx that never clears becomes 'failed' after max_attempts; the run is partial (exit 3)."""
    settings = settings_for(tmp_path, smtp.port)
    await subscribe(settings, "a@example.org", "ok@example.org")
    smtp.script("a@example.org", *[Fault("rcpt", "450 4.2.0 nope")] * 5)
    summary = await go(settings)
    assert summary.state == "partial" and summary.exit_code == 3
    got = await states(settings)
    assert got["a@example.org"] == ("active", "failed")
    assert got["ok@example.org"] == ("active", "accepted")


async def test_hard_bounce_suppresses_the_subscriber(tmp_path: Path, smtp: SmtpServer) -> None:
    """550 5.1.1: failed, subscriber suppressed, never tried again; exit 3."""
    settings = settings_for(tmp_path, smtp.port)
    await subscribe(settings, "gone@example.org", "ok@example.org")
    smtp.script("gone@example.org", Fault("rcpt", "550 5.1.1 no such user"))
    summary = await go(settings)
    assert summary.exit_code == 3
    assert (await states(settings))["gone@example.org"] == ("suppressed", "failed")
    again = await go(settings)
    assert again.subscribers == 1  # the suppressed address is no longer considered


async def test_policy_rejections_pause_the_run_without_suppressing(
    tmp_path: Path, smtp: SmtpServer
) -> None:
    """550 5.7.1 piling up: the run pauses, nobody is suppressed, the rest waits for later."""
    settings = settings_for(tmp_path, smtp.port, timeout=5)
    emails = [f"u{i:02d}@example.org" for i in range(20)]
    await subscribe(settings, *emails)
    for email in emails:
        smtp.script(email, *[Fault("data", "550 5.7.1 rejected by policy")] * 5)
    summary = await go(settings)
    assert summary.state == "partial" and "policy" in summary.reason
    got = await states(settings)
    assert all(status == "active" for status, _ in got.values())
    assert smtp.received == []
    untried = [e for e, (_, ledger) in got.items() if ledger in ("", "pending")]
    assert untried, "the run should have stopped before trying everyone"


async def test_connection_lost_after_body_is_unknown_and_retried_once(
    tmp_path: Path, smtp: SmtpServer
) -> None:
    """Lost after the final '.': 'unknown', retried once; lost twice: failed, not suppressed."""
    settings = settings_for(tmp_path, smtp.port)
    await subscribe(settings, "once@example.org", "twice@example.org")
    smtp.script("once@example.org", Fault("data", drop=True))
    smtp.script(
        "twice@example.org",
        Fault("data", drop=True),
        Fault("data", drop=True),
        Fault("data", drop=True),
    )
    summary = await go(settings)
    got = await states(settings)
    assert got["once@example.org"] == ("active", "accepted")
    assert got["twice@example.org"] == ("active", "failed")
    assert summary.exit_code == 3
    assert smtp.commands["MAIL"] == 4  # once: 2 tries; twice: 2 tries (one retry only)


async def test_login_failure_fails_before_any_paper_is_fetched(tmp_path: Path) -> None:
    """A refused login fails the run loudly, and the paper source is never asked."""
    from digestd.errors import TransportSetupError

    with SmtpServer(auth=("user", "right"), auth_required=True) as smtp, ScriptedServer() as http:
        http.add("/api/daily_papers", Reply.file(PAPERS))
        settings = settings_from_dict(
            {
                "digest": {"from_address": "papers@example.org"},
                "store": {"path": str(tmp_path / "d.sqlite3")},
                "smtp": {
                    "host": "127.0.0.1",
                    "port": smtp.port,
                    "security": "none",
                    "username": "user",
                },
                "sources": [{"kind": "hf_daily", "base_url": http.url}],
            }
        )
        await subscribe(settings, "a@example.org")
        import os

        os.environ["DIGESTD_SMTP_PASSWORD"] = "wrong"
        try:
            with pytest.raises(TransportSetupError):
                await go(settings)
        finally:
            del os.environ["DIGESTD_SMTP_PASSWORD"]
        assert http.requests == []
        async with Store.open(settings.store.path) as store:
            run = (await store.recent_runs(1))[0]
        assert run.state == "failed" and "wrong" not in run.reason


async def test_one_render_failure_never_aborts_the_run(tmp_path: Path, smtp: SmtpServer) -> None:
    """A subscriber whose digest cannot be rendered is recorded failed; the others are sent."""
    settings = settings_for(tmp_path, smtp.port)
    await subscribe(settings, "bad@example.org", "good@example.org")
    con = sqlite3.connect(settings.store.path)
    con.execute(
        "UPDATE subscribers SET token = 'x' WHERE email = 'bad@example.org'"
    )  # unusable link
    con.commit()
    con.close()
    summary = await go(settings)
    assert summary.exit_code == 3
    got = await states(settings)
    assert got["good@example.org"][1] == "accepted"
    assert got["bad@example.org"][1] == "failed"
    async with Store.open(settings.store.path) as store:
        assert "render failed" in (await store.ledger_for("bad@example.org"))[0].reply


async def test_dkim_configured_run_signs_every_message(tmp_path: Path, smtp: SmtpServer) -> None:
    """With [dkim] set, the bytes the server received verify against the published key."""
    import dkim
    from test_dkim import DOMAIN, SELECTOR, Key

    key = Key(tmp_path, "rsa-sha256")
    base = settings_for(tmp_path, smtp.port)
    settings = settings_from_dict(
        {
            **base.model_dump(exclude={"source_path"}, mode="json"),
            "dkim": {"domain": DOMAIN, "selector": SELECTOR, "private_key_file": str(key.path)},
        }
    )
    await subscribe(settings, "a@example.org", "b@example.org")
    summary = await go(settings)
    assert summary.state == "ok" and len(smtp.received) == 2
    for received in smtp.received:
        assert received.data.startswith(b"DKIM-Signature:")
        assert dkim.verify(received.data, dnsfunc=key.dns)
