"""The whole pipeline on real parts: a papers file, a SQLite file, a real SMTP server.

`digestd run-once` is driven both in-process and as a subprocess; the bytes the server
received are parsed back with email.policy.default.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner
from conftest import FIXTURES, free_port

from digestd.cli import cli

PAPERS = FIXTURES / "hf" / "daily_papers_month-2025-11_items-for-2025-11-07_final.json"
DAY = "2025-11-07"


class Recorder:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        )
        return "250 2.0.0 Ok: queued"


@pytest.fixture
def smtp() -> Iterator[tuple[Recorder, int]]:
    recorder = Recorder()
    port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield recorder, port
    finally:
        controller.stop()


@pytest.fixture
def config(tmp_path: Path, smtp: tuple[Recorder, int]) -> Path:
    path = tmp_path / "digestd.toml"
    path.write_text(
        f"""
[digest]
from_address = "papers@example.org"
from_name = "Daily Papers"
base_url = "https://papers.example.org"
postal_address = "1 Example Street, Example City"
[store]
path = "{tmp_path / "d.sqlite3"}"
[delivery]
transport = "smtp"
concurrency = 2
[smtp]
host = "127.0.0.1"
port = {smtp[1]}
security = "none"
timeout = 10
[[sources]]
kind = "file"
name = "saved"
path = "{PAPERS}"
"""
    )
    return path


def invoke(config: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        cli, ["--config", str(config), "--log-format", "json", *args], catch_exceptions=False
    )
    return result.exit_code, result.stdout, result.stderr


def add(config: Path, email_: str, *args: str) -> None:
    code, _, err = invoke(config, "subscribers", "add", email_, *args)
    assert code == 0, err


def test_run_once_sends_parsable_digests_with_every_header(
    config: Path, smtp: tuple[Recorder, int]
) -> None:
    """Each active subscriber gets one multipart/alternative message with the required headers."""
    recorder, _ = smtp
    add(config, "ada@example.org", "--name", "Ada", "--keyword", "reinforcement learning")
    add(config, "alan@example.org", "--max-papers", "3")
    code, out, err = invoke(config, "run-once", "--date", DAY)
    assert code == 0, out + err
    assert len(recorder.messages) == 2
    seen_ids = set()
    for mail_from, rcpts, data in recorder.messages:
        assert mail_from == "papers@example.org"
        msg = email.message_from_bytes(data, policy=email.policy.default)
        assert msg["To"] and rcpts == [msg["To"].addresses[0].addr_spec]
        assert msg["From"].addresses[0].addr_spec == "papers@example.org"
        assert msg["Subject"] and msg["Date"]
        assert msg["Message-ID"].endswith("@example.org>")
        seen_ids.add(msg["Message-ID"])
        assert msg["List-Id"]
        unsub = msg["List-Unsubscribe"]
        assert "<https://papers.example.org/unsubscribe/" in unsub and "mailto:" in unsub
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert msg.get_content_type() == "multipart/alternative"
        parts = [p.get_content_type() for p in msg.iter_parts()]
        assert parts == ["text/plain", "text/html"]
        assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    assert len(seen_ids) == 2
    ada = next(d for _, r, d in recorder.messages if r == ["ada@example.org"])
    text = (
        email.message_from_bytes(ada, policy=email.policy.default)
        .get_body(("plain",))
        .get_content()
    )
    assert "reinforcement learning" in text.lower()


def test_second_run_for_same_date_sends_nothing(config: Path, smtp: tuple[Recorder, int]) -> None:
    """The ledger makes run-once safe to repeat; a new paper-less day sends nothing either."""
    recorder, _ = smtp
    add(config, "ada@example.org", "--max-papers", "50")  # every paper goes out on day one
    assert invoke(config, "run-once", "--date", DAY)[0] == 0
    assert len(recorder.messages) == 1
    code, out, _ = invoke(config, "run-once", "--date", DAY)
    assert code == 0 and "0 sent" in out
    assert len(recorder.messages) == 1
    # Next day, same papers: all already sent to this subscriber, so no mail.
    code, out, _ = invoke(config, "run-once", "--date", "2025-11-08")
    assert code == 0 and "0 sent" in out
    assert len(recorder.messages) == 1


def test_paused_and_unsubscribed_get_nothing(config: Path, smtp: tuple[Recorder, int]) -> None:
    """Only active subscribers receive mail."""
    recorder, _ = smtp
    add(config, "paused@example.org")
    add(config, "active@example.org")
    assert invoke(config, "subscribers", "pause", "paused@example.org")[0] == 0
    assert invoke(config, "run-once", "--date", DAY)[0] == 0
    assert [r for _, r, _ in recorder.messages] == [["active@example.org"]]


def test_dry_run_sends_and_records_nothing(config: Path, smtp: tuple[Recorder, int]) -> None:
    """--dry-run reports what it would send, sends nothing, and a real run still sends."""
    recorder, _ = smtp
    add(config, "ada@example.org")
    code, out, _ = invoke(config, "run-once", "--date", DAY, "--dry-run")
    assert code == 0 and "would send to ada@example.org" in out
    assert recorder.messages == []
    assert invoke(config, "run-once", "--date", DAY)[0] == 0
    assert len(recorder.messages) == 1


def test_only_sends_to_one(config: Path, smtp: tuple[Recorder, int]) -> None:
    """--only EMAIL limits the pass to that subscriber."""
    recorder, _ = smtp
    add(config, "a@example.org")
    add(config, "b@example.org")
    assert invoke(config, "run-once", "--date", DAY, "--only", "b@example.org")[0] == 0
    assert [r for _, r, _ in recorder.messages] == [["b@example.org"]]


def test_preview_json_matches_spec(config: Path, smtp: tuple[Recorder, int]) -> None:
    """preview --format json prints exactly the spec's object, sending and recording nothing."""
    recorder, _ = smtp
    add(config, "ada@example.org", "--keyword", "reinforcement learning", "--max-papers", "3")
    code, out, err = invoke(config, "preview", "ada@example.org", "--date", DAY, "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"email", "date", "subject", "papers"}
    assert data["email"] == "ada@example.org" and data["date"] == DAY
    assert 1 <= len(data["papers"]) <= 3
    for paper in data["papers"]:
        assert set(paper) == {"id", "title", "score", "reasons"}
        assert paper["reasons"]
    for fmt, marker in (("html", "<html"), ("text", "reinforcement"), ("eml", "List-Unsubscribe:")):
        code, out, _ = invoke(config, "preview", "ada@example.org", "--date", DAY, "--format", fmt)
        assert code == 0 and marker.lower() in out.lower(), fmt
    assert recorder.messages == []
    code, out, _ = invoke(config, "status", "--json")
    assert json.loads(out)["runs"] == []


def test_status_after_run(config: Path, smtp: tuple[Recorder, int]) -> None:
    """status shows the run and the accepted delivery."""
    add(config, "ada@example.org")
    assert invoke(config, "run-once", "--date", DAY)[0] == 0
    _, out, _ = invoke(config, "status", "--json")
    info = json.loads(out)
    assert info["deliveries"] == {"accepted": 1}
    assert info["runs"][0]["state"] == "ok" and info["runs"][0]["sent"] == 1


def test_every_source_failing_fails_the_run(
    tmp_path: Path, config: Path, smtp: tuple[Recorder, int]
) -> None:
    """No papers because every source failed: nothing sent, run recorded failed, exit 1."""
    recorder, _ = smtp
    broken = tmp_path / "broken.json"
    broken.write_text('{"error": "Not Found"}')
    config.write_text(config.read_text().replace(str(PAPERS), str(broken)))
    add(config, "ada@example.org")
    code, out, _ = invoke(config, "run-once", "--date", DAY)
    assert code == 1, out
    assert recorder.messages == []
    info = json.loads(invoke(config, "status", "--json")[1])
    assert (
        info["runs"][0]["state"] == "failed" and "every source failed" in info["runs"][0]["reason"]
    )


def test_run_once_subprocess_json_summary(config: Path, smtp: tuple[Recorder, int]) -> None:
    """As a subprocess: JSON log lines on a non-terminal, one summary line with the counts."""
    recorder, _ = smtp
    add(config, "ada@example.org")
    proc = subprocess.run(
        [sys.executable, "-m", "digestd", "--config", str(config), "run-once", "--date", DAY],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    summary = [e for e in events if e["event"] == "run finished"]
    assert len(summary) == 1
    for key in ("fetched", "subscribers", "sent", "skipped", "failed", "seconds"):
        assert key in summary[0]
    assert summary[0]["sent"] == 1 and len(recorder.messages) == 1


def test_a_paper_is_never_sent_twice_across_days(config: Path, smtp: tuple[Recorder, int]) -> None:
    """Day one sends the top 10 of 15 papers; day two sends only the 5 others; day three none."""
    recorder, _ = smtp
    add(config, "ada@example.org")  # no interests: the most upvoted, max 10

    def ids_in(data: bytes) -> set[str]:
        msg = email.message_from_bytes(data, policy=email.policy.default)
        text = msg.get_body(("plain",)).get_content()
        return {word.rstrip("/.,)") for word in text.split() if "huggingface.co/papers/" in word}

    for day in ("2025-11-07", "2025-11-08", "2025-11-09"):
        assert invoke(config, "run-once", "--date", day)[0] == 0
    assert len(recorder.messages) == 2
    first, second = (ids_in(data) for _, _, data in recorder.messages)
    assert len(first) == 10 and len(second) == 5
    assert not first & second


def test_render_workers_hand_the_sender_payloads_that_arrive_as_messages(
    config: Path, smtp: tuple[Recorder, int]
) -> None:
    """With a render worker process (``render_workers = 1``), the messages cross to the
    sender as DATA payloads: the server receives each message byte for byte as the same
    digest renders in this process, and the run's ``sent_bytes`` counts the messages, not
    their stuffed payloads."""
    import datetime as dt

    from digestd import pipeline
    from digestd.config import load_config
    from digestd.models import Subscriber
    from digestd.sources import load_papers_file
    from digestd.store import Store

    recorder, _ = smtp
    config.write_text(
        config.read_text().replace("concurrency = 2", "concurrency = 2\nrender_workers = 1")
    )
    names = ["ada@example.org", "alan@example.org", "grace@example.org"]
    for name in names:
        add(config, name, "--keyword", "learning")
    code, out, err = invoke(config, "run-once", "--date", DAY)
    assert code == 0, out + err
    assert len(recorder.messages) == 3
    [summary] = [
        json.loads(line)
        for line in err.splitlines()
        if line.startswith("{") and json.loads(line)["event"] == "run finished"
    ]
    assert summary["sent_bytes"] == sum(len(data) for _, _, data in recorder.messages)
    assert any(b"\r\n." in data for _, _, data in recorder.messages)  # stuffed on the way

    settings = load_config(config)

    async def subscribers() -> list[Subscriber]:
        async with Store.open(settings.store.path) as store:
            return [s async for batch in store.iter_subscribers() for s in batch]

    received = {rcpts[0]: data for _, rcpts, data in recorder.messages}
    day = dt.date.fromisoformat(DAY)
    for sub in asyncio.run(subscribers()):
        msg = email.message_from_bytes(received[sub.email], policy=email.policy.default)
        now = email.utils.parsedate_to_datetime(msg["Date"])
        engine = pipeline.Engine(settings, load_papers_file(PAPERS), (), now)
        digest, _ = engine.select(sub, day, frozenset(), {})
        assert engine.render(digest).message == received[sub.email]
