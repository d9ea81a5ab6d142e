"""MaildirTransport on real files in tmp_path, and make_transport."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import mailbox
import stat
from pathlib import Path

import pytest
from smtpserver import digest_message

from digestd.compose import as_data_payload
from digestd.config import settings_from_dict
from digestd.deliver import MaildirTransport, SmtpTransport, make_transport, wire_checked
from digestd.errors import TransportSetupError

SENDER = "bounces@example.org"


def files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file()) if path.exists() else []


async def test_message_lands_in_new_and_parses_back(tmp_path: Path) -> None:
    """A delivered message is one 0600 file in new/, nothing left in tmp/, and parses back."""
    box = tmp_path / "outbox"
    message = digest_message("ada@example.org")
    async with MaildirTransport(box) as t:
        delivery = await t.send(message, SENDER)
    assert delivery.state == "accepted"
    assert delivery.reply.startswith("250 2.0.0 (local) delivered as new/")
    [path] = files(box / "new")
    assert delivery.reply.endswith(path.name)
    assert files(box / "tmp") == [] and files(box / "cur") == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((box / "new").stat().st_mode) == 0o700
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert parsed["Message-ID"] == message.message_id
    assert parsed["To"] == "ada@example.org"
    assert b"\r\n" not in path.read_bytes()  # local (LF) line endings
    assert path.read_bytes() == message.message.replace(b"\r\n", b"\n")
    # The stdlib's Maildir reader sees exactly this one message.
    [(_key, msg)] = list(mailbox.Maildir(box, create=False).items())
    assert msg["Subject"] == message.subject


async def test_a_data_payload_lands_as_its_message(tmp_path: Path) -> None:
    """Handed a message as its SMTP DATA payload (dot-stuffed), the Maildir file still
    holds the message itself."""
    box = tmp_path / "outbox"
    message = digest_message("ada@example.org")
    assert b"\r\n." in message.message  # a line starting with "." (stuffed in the payload)
    as_payload = dataclasses.replace(
        message, message=as_data_payload(wire_checked(message.message))
    )
    assert bytes(as_payload.message) != message.message
    async with MaildirTransport(box) as t:
        assert (await t.send(as_payload, SENDER)).state == "accepted"
    [path] = files(box / "new")
    assert path.read_bytes() == message.message.replace(b"\r\n", b"\n")


async def test_concurrent_writers_get_unique_names(tmp_path: Path) -> None:
    """Two transports writing 100 messages each, concurrently, never collide."""
    box = tmp_path / "outbox"
    a, b = MaildirTransport(box), MaildirTransport(box)
    messages = [digest_message(f"u{i}@example.org", subscriber_id=i) for i in range(200)]
    results = await asyncio.gather(
        *(([a, b][i % 2]).send(m, SENDER) for i, m in enumerate(messages))
    )
    assert {r.state for r in results} == {"accepted"}
    written = files(box / "new")
    assert len(written) == 200
    assert len({p.name for p in written}) == 200
    ids = {email.message_from_bytes(p.read_bytes())["Message-ID"] for p in written}
    assert ids == {m.message_id for m in messages}
    assert files(box / "tmp") == []


async def test_html_copy(tmp_path: Path) -> None:
    """write_html_copy puts the HTML part at html/<date>_<email>.html, mode 0600."""
    box = tmp_path / "outbox"
    message = digest_message("ada@example.org", html="<h1>Papers for Ada</h1>")
    t = MaildirTransport(box, write_html_copy=True)
    await t.send(message, SENDER)
    target = box / "html" / "2025-11-24_ada@example.org.html"
    assert t.html_copy_path("ada@example.org", message.date) == target
    assert target.read_text(encoding="utf-8") == "<h1>Papers for Ada</h1>"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in (box / "html").iterdir()] == [target.name]  # no temp files


async def test_html_copy_name_cannot_escape_the_directory(tmp_path: Path) -> None:
    """An address with path characters is flattened into a plain file name under html/."""
    box = tmp_path / "outbox"
    hostile = dataclasses.replace(digest_message(), email="../../../etc/x@example.org")
    await MaildirTransport(box, write_html_copy=True).send(hostile, SENDER)
    [copy] = list((box / "html").iterdir())
    assert copy.parent == box / "html"
    assert "/" not in copy.name and copy.name.endswith("_x@example.org.html")
    assert not (tmp_path / "etc").exists()


async def test_no_html_copy_by_default(tmp_path: Path) -> None:
    """Without write_html_copy there is no html/ directory."""
    box = tmp_path / "outbox"
    await MaildirTransport(box).send(digest_message(), SENDER)
    assert not (box / "html").exists()


async def test_check_creates_the_maildir(tmp_path: Path) -> None:
    """check() creates tmp/, new/ and cur/ and leaves them empty."""
    box = tmp_path / "a" / "b"
    await MaildirTransport(box).check()
    for sub in ("tmp", "new", "cur"):
        assert (box / sub).is_dir() and files(box / sub) == []


async def test_unusable_path_is_a_setup_error(tmp_path: Path) -> None:
    """A Maildir path under a regular file: check() and send() raise a clear setup error."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    t = MaildirTransport(blocker / "outbox")
    with pytest.raises(TransportSetupError, match=r"maildir .*outbox"):
        await t.check()
    with pytest.raises(TransportSetupError):
        await t.send(digest_message(), SENDER)


def test_make_transport_picks_the_configured_one(tmp_path: Path) -> None:
    """[delivery] transport selects MaildirTransport or SmtpTransport with its settings."""
    base = {"digest": {"from_address": "digest@example.org"}}
    maildir = make_transport(
        settings_from_dict(
            {
                **base,
                "delivery": {
                    "transport": "maildir",
                    "maildir": str(tmp_path / "box"),
                    "write_html_copy": True,
                },
            }
        )
    )
    assert isinstance(maildir, MaildirTransport)
    assert maildir.path == tmp_path / "box" and maildir.write_html_copy
    smtp = make_transport(
        settings_from_dict({**base, "smtp": {"host": "mail.example.org", "port": 465}})
    )
    assert isinstance(smtp, SmtpTransport)
    assert smtp.settings.host == "mail.example.org" and smtp.settings.port == 465
