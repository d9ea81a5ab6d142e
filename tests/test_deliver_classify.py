"""Reply classification and formatting (pure functions of deliver.py)."""

from __future__ import annotations

import pytest

from digestd.deliver import _data_payload, classify, format_reply, is_hard_bounce, is_policy


@pytest.mark.parametrize(
    ("code", "message", "state"),
    [
        (250, "2.0.0 OK queued", "accepted"),
        (251, "2.1.5 will forward", "accepted"),
        (421, "4.3.2 shutting down", "deferred"),
        (450, "4.2.0 mailbox busy", "deferred"),
        (451, "4.7.1 greylisted", "deferred"),
        (452, "4.2.2 over quota", "deferred"),
        (550, "5.1.1 user unknown", "failed"),
        (550, "5.7.1 spam", "failed"),
        (551, "user not local", "failed"),
        (553, "mailbox name invalid", "failed"),
        (554, "5.6.0 content rejected", "failed"),
        (552, "5.2.2 mailbox full", "deferred"),
        (552, "5.3.4 message too big", "failed"),
        (-1, "Malformed SMTP response line", "unknown"),
        (0, "", "unknown"),
        (999, "", "unknown"),
    ],
)
def test_classify(code: int, message: str, state: str) -> None:
    """Reply codes map to ledger states (2xx/4xx/5xx, mailbox-full soft, garbage unknown)."""
    assert classify(code, message) == state


@pytest.mark.parametrize(
    ("reply", "hard", "policy"),
    [
        ("550 5.1.1 user unknown", True, False),
        ("550 5.1.2 bad destination domain", True, False),
        ("550 5.1.10 null MX", True, False),
        ("553 5.1.8 bad sender domain", False, False),
        ("550 5.7.1 rejected by policy", False, True),
        ("554 5.7.26 DMARC", False, True),
        ("451 4.7.1 greylisted", False, False),
        ("451 4.1.1 temporarily unknown", False, False),
        ("552 5.3.4 too big", False, False),
        ("421 4.4.2 (local) connection lost", False, False),
        ("garbage", False, False),
        ("", False, False),
    ],
)
def test_bounce_and_policy_helpers(reply: str, hard: bool, policy: bool) -> None:
    """Hard bounces are recipient 5.1.x; policy is 5.7.x; the two never overlap."""
    assert is_hard_bounce(reply) is hard
    assert is_policy(reply) is policy


@pytest.mark.parametrize(
    ("code", "message", "phase", "expected"),
    [
        (250, "2.0.0 Ok: queued as 4Bx", "end", "250 2.0.0 Ok: queued as 4Bx"),
        (250, "OK", "end", "250 2.0.0 OK"),
        (550, "no such user", "rcpt", "550 5.1.1 no such user"),
        (551, "user not local", "rcpt", "551 5.1.6 user not local"),
        (553, "bad mailbox", "rcpt", "553 5.1.3 bad mailbox"),
        (550, "content rejected", "end", "550 5.0.0 content rejected"),
        (451, "try later", "rcpt", "451 4.0.0 try later"),
        (452, "4.2.2 mailbox\n4.2.2 is full", "rcpt", "452 4.2.2 mailbox is full"),
        (550, "5.7.1 line one\nline two", "end", "550 5.7.1 line one line two"),
        (554, "", "end", "554 5.0.0"),
        (-1, "Response too long", "end", "000 4.0.0 Response too long"),
        (250, "2.0.0 tab\there\x1b[31m red \x00", "end", "250 2.0.0 tab here [31m red"),
        (250, "2.0.0 bidi \u202eevil\u2028x", "end", "250 2.0.0 bidi evil x"),
    ],
)
def test_format_reply(code: int, message: str, phase: str, expected: str) -> None:
    """Replies become one line: code, enhanced status (derived if absent), clean text."""
    assert format_reply(code, message, phase) == expected  # type: ignore[arg-type]


def test_format_reply_bounds_length_and_bytes() -> None:
    """A 10 KB reply with undecodable bytes becomes ≤ 500 characters of valid UTF-8."""
    raw = ("5.1.1 " + "ü" * 5000).encode() + b"\xff\xfe"
    text = raw.decode("utf-8", "surrogateescape")  # as aiosmtplib hands it over
    reply = format_reply(550, text, "rcpt")
    assert len(reply) <= 500
    assert reply.startswith("550 5.1.1 üüü") and reply.endswith("…")
    reply.encode("utf-8")
    assert is_hard_bounce(reply)


@pytest.mark.parametrize(
    ("message", "payload", "size"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n", 6),
        (b"a\nb", b"a\r\nb\r\n.\r\n", 6),
        (b"a\rb\r\n", b"a\r\nb\r\n.\r\n", 6),
        (b".top\r\n.\r\n..x\r\n", b"..top\r\n..\r\n...x\r\n.\r\n", 14),
        (b"x\n.\n", b"x\r\n..\r\n.\r\n", 6),
        (b"", b"\r\n.\r\n", 2),
    ],
)
def test_data_payload(message: bytes, payload: bytes, size: int) -> None:
    """DATA payload: CRLF everywhere, leading dots doubled, CRLF.CRLF end; SIZE as RFC 1870."""
    assert _data_payload(message) == (payload, size)
