"""SmtpTransport against a real aiosmtpd server on 127.0.0.1 (tests/smtpserver.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import free_port, require_tool
from smtpserver import CertFiles, Fault, SmtpServer, digest_message, make_cert

from digestd.config import DeliveryConfig, SmtpConfig
from digestd.deliver import SmtpTransport, is_hard_bounce, is_policy
from digestd.errors import ConfigError, TransportSetupError

SENDER = "bounces@example.org"


@pytest.fixture
def server() -> Iterator[SmtpServer]:
    with SmtpServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    require_tool("openssl")
    return make_cert(tmp_path_factory.mktemp("tls"))


def transport(server: SmtpServer, **options: Any) -> SmtpTransport:
    smtp_keys = set(SmtpConfig.model_fields)
    smtp = {"host": "127.0.0.1", "port": server.port, "security": "none", "timeout": 5.0}
    delivery: dict[str, Any] = {}
    for key, value in options.items():
        (smtp if key in smtp_keys else delivery)[key] = value
    return SmtpTransport(SmtpConfig(**smtp), DeliveryConfig(**delivery))


async def send_one(t: SmtpTransport, to: str = "ada@example.org", **kw: Any) -> Any:
    return await t.send(digest_message(to, **kw), SENDER)


# ---------------------------------------------------------------------------- the basics


async def test_received_bytes_equal_sent(server: SmtpServer) -> None:
    """The server receives exactly the message bytes (dot-stuffing undone), with the envelope."""
    message = digest_message("ada@example.org")
    assert b"\r\n.A line that starts with a dot" in message.message
    async with transport(server) as t:
        delivery = await t.send(message, SENDER)
    assert delivery.state == "accepted"
    assert delivery.reply.startswith("250 2.0.0 OK queued as Q1")
    assert (delivery.email, delivery.message_id, delivery.paper_ids) == (
        "ada@example.org",
        message.message_id,
        ("2511.04570",),
    )
    [got] = server.received
    assert got.data == message.message
    assert got.mail_from == SENDER and got.rcpt_tos == ("ada@example.org",)
    assert f"SIZE={len(message.message)}" in got.mail_options
    parsed = email.message_from_bytes(got.data, policy=email.policy.default)
    assert parsed["Message-ID"] == message.message_id
    assert parsed.get_body(("plain",)).get_content().startswith("Today's papers")  # type: ignore[union-attr]


async def test_lf_only_message_is_sent_with_crlf(server: SmtpServer) -> None:
    """A message with bare LF line endings goes out with CRLF, content unchanged."""
    base = digest_message()
    lf = base.message.replace(b"\r\n", b"\n")
    async with transport(server) as t:
        delivery = await t.send(dataclasses.replace(base, message=lf), SENDER)
    assert delivery.state == "accepted"
    assert server.received[0].data == base.message


async def test_eight_bit_body_uses_8bitmime(server: SmtpServer) -> None:
    """An 8-bit body is announced with BODY=8BITMIME and arrives byte for byte."""
    message = digest_message(eight_bit=True)
    assert not message.message.isascii()
    async with transport(server) as t:
        delivery = await t.send(message, SENDER)
    assert delivery.state == "accepted"
    assert "BODY=8BITMIME" in server.received[0].mail_options
    assert server.received[0].data == message.message


async def test_one_connection_is_reused_for_many_messages(server: SmtpServer) -> None:
    """Twenty sequential messages travel over a single SMTP session."""
    async with transport(server, messages_per_connection=100) as t:
        states = [(await send_one(t, f"u{i}@example.org")).state for i in range(20)]
    assert states == ["accepted"] * 20
    assert server.sessions == 1
    assert server.commands["MAIL"] == 20
    assert server.commands["QUIT"] == 1  # closed politely on exit


async def test_reconnects_after_messages_per_connection(server: SmtpServer) -> None:
    """A connection carries at most messages_per_connection transactions."""
    async with transport(server, messages_per_connection=3) as t:
        for i in range(7):
            assert (await send_one(t, f"u{i}@example.org")).state == "accepted"
    assert server.sessions == 3
    assert server.commands["QUIT"] == 3


async def test_pool_size_is_respected() -> None:
    """With concurrency 3, forty concurrent sends use exactly three sessions at once."""
    with SmtpServer(data_delay=0.02) as server:
        async with transport(server, concurrency=3, messages_per_connection=1000) as t:
            results = await asyncio.gather(
                *(send_one(t, f"u{i}@example.org", subscriber_id=i) for i in range(40))
            )
        assert {r.state for r in results} == {"accepted"}
        assert server.max_concurrent == 3
        assert server.sessions == 3
        assert sorted(r.rcpt_tos[0] for r in server.received) == sorted(
            f"u{i}@example.org" for i in range(40)
        )


async def test_rate_limit_is_not_exceeded(server: SmtpServer) -> None:
    """rate_per_second=20: no window holds more transactions than the rate allows (+1)."""
    rate, count = 20.0, 24
    async with transport(server, concurrency=4, rate_per_second=rate) as t:
        results = await asyncio.gather(*(send_one(t, f"u{i}@example.org") for i in range(count)))
    assert {r.state for r in results} == {"accepted"}
    times = sorted(server.mail_times)
    assert len(times) == count
    # k+1 consecutive transactions never start within less than k intervals; allow two
    # intervals of scheduling jitter on a busy machine (an unlimited sender takes ~0 s).
    for k in (5, 10, count - 1):
        for i in range(count - k):
            assert times[i + k] - times[i] >= (k - 2) / rate, (k, i)


async def test_unlimited_rate_does_not_wait(server: SmtpServer) -> None:
    """rate_per_second=0 means unlimited: the limiter never sleeps."""
    async with transport(server, rate_per_second=0) as t:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await t._limiter.wait()
        await t._limiter.wait()
        assert loop.time() - start < 0.01


async def test_concurrent_sends_deliver_each_message_once(server: SmtpServer) -> None:
    """Sixty concurrent sends over four connections: every message arrives exactly once."""
    messages = [digest_message(f"u{i}@example.org", subscriber_id=i) for i in range(60)]
    async with transport(server, concurrency=4) as t:
        results = await asyncio.gather(*(t.send(m, SENDER) for m in messages))
    assert [r.subscriber_id for r in results] == list(range(60))
    assert {r.state for r in results} == {"accepted"}
    got = sorted(r.data for r in server.received)
    assert got == sorted(m.message for m in messages)


async def test_invalid_recipient_fails_without_contacting_server(server: SmtpServer) -> None:
    """A recipient with CR/LF or angle brackets is refused locally as a bad address."""
    async with transport(server) as t:
        for bad in ("evil\r\nRCPT TO:<x@y>@example.org", "a>b@example.org", "no-at-sign", ""):
            delivery = await t.send(dataclasses.replace(digest_message(), email=bad), SENDER)
            assert delivery.state == "failed"
            assert delivery.reply.startswith("553 5.1.3 (local)")
            assert "\r" not in delivery.reply and "\n" not in delivery.reply
    assert server.commands["MAIL"] == 0


async def test_invalid_sender_is_a_setup_error(server: SmtpServer) -> None:
    """A malformed envelope sender would fail every message: TransportSetupError."""
    async with transport(server) as t:
        with pytest.raises(TransportSetupError, match="envelope sender"):
            await t.send(digest_message(), "bad\nsender@example.org")


async def test_send_after_close_is_refused(server: SmtpServer) -> None:
    """A closed transport refuses to send rather than opening a stray connection."""
    t = transport(server)
    async with t:
        pass
    with pytest.raises(Exception, match="closed"):
        await send_one(t)


# ---------------------------------------------------------------------------- TLS and AUTH


async def test_starttls_self_signed_rejected_by_default(cert: CertFiles) -> None:
    """STARTTLS to a self-signed certificate fails verification: a clear setup error."""
    with SmtpServer(security="starttls", cert=cert) as server:
        async with transport(server, security="starttls") as t:
            with pytest.raises(TransportSetupError) as info:
                await t.check()
        assert "certificate" in str(info.value)
        assert "\n" not in str(info.value)
        assert server.received == []


async def test_starttls_accepted_with_ca_file(cert: CertFiles) -> None:
    """With smtp.ca_file naming the certificate, STARTTLS verifies and mail flows."""
    with SmtpServer(security="starttls", cert=cert) as server:
        async with transport(server, security="starttls", ca_file=cert.cert) as t:
            await t.check()
            delivery = await send_one(t)
        assert delivery.state == "accepted"
        assert server.received[0].tls is True
        assert server.sessions == 1  # check()'s connection was reused


async def test_starttls_required_but_not_offered(server: SmtpServer) -> None:
    """security=starttls refuses a server that does not offer STARTTLS (no silent downgrade)."""
    async with transport(server, security="starttls") as t:
        with pytest.raises(TransportSetupError, match="does not offer STARTTLS"):
            await t.check()
        with pytest.raises(TransportSetupError, match="does not offer STARTTLS"):
            await send_one(t)
    assert server.commands["MAIL"] == 0


async def test_implicit_tls(cert: CertFiles) -> None:
    """security=tls speaks TLS from the first byte; verified against ca_file."""
    with SmtpServer(security="tls", cert=cert) as server:
        async with transport(server, security="tls") as t:
            with pytest.raises(TransportSetupError, match="certificate"):
                await t.check()
        async with transport(server, security="tls", ca_file=cert.cert) as t:
            delivery = await send_one(t)
        assert delivery.state == "accepted"
        assert server.received[0].tls is True


async def test_implicit_tls_to_plain_server_fails_clearly(server: SmtpServer) -> None:
    """security=tls against a plain-text server is a one-line TLS setup error."""
    async with transport(server, security="tls", timeout=3.0) as t:
        with pytest.raises(TransportSetupError, match=r"TLS failed.*starttls"):
            await t.check()


async def test_unverified_tls_when_disabled(cert: CertFiles) -> None:
    """verify_certificates=false accepts the self-signed certificate."""
    with SmtpServer(security="starttls", cert=cert) as server:
        async with transport(server, security="starttls", verify_certificates=False) as t:
            assert (await send_one(t)).state == "accepted"


async def test_auth_success(cert: CertFiles, tmp_path: Path) -> None:
    """AUTH after STARTTLS with the password from smtp.password_file."""
    secret = tmp_path / "pw"
    secret.write_text("s3cret-pässword\n")
    with SmtpServer(security="starttls", cert=cert, auth=("digest", "s3cret-pässword")) as server:
        async with transport(
            server,
            security="starttls",
            ca_file=cert.cert,
            username="digest",
            password_file=secret,
        ) as t:
            await t.check()
            assert (await send_one(t)).state == "accepted"
        assert server.received[0].login == "digest"
        assert server.auth_attempts == [("digest", True)]


async def test_auth_failure_is_setup_error_without_password(
    cert: CertFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused login raises TransportSetupError naming the user, never the password."""
    monkeypatch.setenv("DIGESTD_SMTP_PASSWORD", "wrong-horse-battery")
    with SmtpServer(security="starttls", cert=cert, auth=("digest", "right")) as server:
        with structlog.testing.capture_logs() as logs:
            async with transport(
                server, security="starttls", ca_file=cert.cert, username="digest"
            ) as t:
                with pytest.raises(TransportSetupError) as info:
                    await t.check()
                with pytest.raises(TransportSetupError):
                    await send_one(t)
    message = str(info.value)
    assert "login as 'digest' refused: 535" in message
    assert "wrong-horse-battery" not in message
    assert "wrong-horse-battery" not in repr(logs)
    assert server.received == []


async def test_auth_not_offered(server: SmtpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """username set but the server has no AUTH: setup error, not a silent unauthenticated send."""
    monkeypatch.setenv("DIGESTD_SMTP_PASSWORD", "pw")
    async with transport(server, username="digest") as t:
        with pytest.raises(TransportSetupError, match="does not offer AUTH"):
            await t.check()


async def test_missing_password_is_config_error(
    server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """username without any password source is a configuration error (exit 2)."""
    monkeypatch.delenv("DIGESTD_SMTP_PASSWORD", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    async with transport(server, username="digest") as t:
        with pytest.raises(ConfigError, match="no password"):
            await t.check()


async def test_check_reports_refused_connection() -> None:
    """check() against a closed port says so on one line."""
    port = free_port()
    t = SmtpTransport(
        SmtpConfig(host="127.0.0.1", port=port, security="none", timeout=2), DeliveryConfig()
    )
    async with t:
        with pytest.raises(TransportSetupError) as info:
            await t.check()
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "refused" in str(info.value).lower()
    assert "\n" not in str(info.value)


async def test_send_to_unreachable_server_is_deferred() -> None:
    """A connection that cannot be made defers the message (nothing was sent)."""
    t = SmtpTransport(
        SmtpConfig(host="127.0.0.1", port=free_port(), security="none", timeout=2),
        DeliveryConfig(),
    )
    async with t:
        delivery = await t.send(digest_message(), SENDER)
    assert delivery.state == "deferred"
    assert delivery.reply.startswith("421 4.4.1 (local)")


# ---------------------------------------------------------------------------- scripted faults

FAULTS = [
    # (fault, sender-keyed?, expected state, hard bounce, policy)
    pytest.param(Fault("rcpt", "451 4.3.0 try again later"), False, "deferred", False, False),
    pytest.param(Fault("rcpt", "452 4.2.2 over quota"), False, "deferred", False, False),
    pytest.param(Fault("rcpt", "421 4.3.2 shutting down"), False, "deferred", False, False),
    pytest.param(Fault("mail", "451 4.3.0 local problem"), True, "deferred", False, False),
    pytest.param(Fault("mail", "421 4.7.0 too many"), True, "deferred", False, False),
    pytest.param(Fault("rcpt", "550 5.1.1 user unknown"), False, "failed", True, False),
    pytest.param(Fault("rcpt", "550 no such user here"), False, "failed", True, False),
    pytest.param(Fault("rcpt", "550 5.7.1 relaying denied"), False, "failed", False, True),
    pytest.param(Fault("rcpt", "552 5.2.2 mailbox full"), False, "deferred", False, False),
    pytest.param(Fault("data_cmd", "554 5.5.1 no valid recipients"), False, "failed", False, False),
    pytest.param(Fault("data_cmd", "451 4.3.0 later"), False, "deferred", False, False),
    pytest.param(Fault("data", "550 5.7.1 message rejected as spam"), False, "failed", False, True),
    pytest.param(Fault("data", "451 4.7.1 greylisted"), False, "deferred", False, False),
    pytest.param(Fault("data", "554 5.6.0 content rejected"), False, "failed", False, False),
    pytest.param(Fault("data", "421 4.3.2 bye"), False, "deferred", False, False),
    pytest.param(Fault("data_cmd", drop=True), False, "deferred", False, False),
    pytest.param(Fault("rcpt", drop=True), False, "deferred", False, False),
    pytest.param(Fault("data", drop=True), False, "unknown", False, False),
    pytest.param(Fault("body", after_bytes=200), False, "unknown", False, False),
]


@pytest.mark.parametrize(("fault", "by_sender", "state", "hard", "policy"), FAULTS)
async def test_scripted_fault_gives_the_right_state(
    server: SmtpServer, fault: Fault, by_sender: bool, state: str, hard: bool, policy: bool
) -> None:
    """Each scripted fault maps to its state; the next message then goes through."""
    server.script(SENDER if by_sender else "bob@example.org", fault)
    async with transport(server) as t:
        first = await send_one(t, "bob@example.org")
        second = await send_one(t, "bob@example.org")
    assert first.state == state, first.reply
    assert is_hard_bounce(first.reply) is hard
    assert is_policy(first.reply) is policy
    assert "\n" not in first.reply and len(first.reply) <= 500
    if fault.reply is not None:
        assert first.reply.startswith(fault.reply.split(" ")[0] + " ")
    assert second.state == "accepted", second.reply
    closes = fault.drop or fault.stage == "body" or str(fault.reply).startswith("421")
    assert server.sessions == (2 if closes else 1)
    if not closes and state != "accepted" and fault.stage != "data":
        assert server.commands["RSET"] == 1  # the refused transaction was reset


async def test_slow_rset_keeps_the_refusal(server: SmtpServer) -> None:
    """A hard bounce stays a hard bounce even when the RSET after it times out."""
    server.rset_delay = 3.0
    server.script("bob@example.org", Fault("rcpt", "550 5.1.1 user unknown"))
    async with transport(server, timeout=0.5) as t:
        delivery = await send_one(t, "bob@example.org")
        after = await send_one(t, "carol@example.org")
    assert delivery.state == "failed" and is_hard_bounce(delivery.reply)
    assert after.state == "accepted"
    assert server.sessions == 2  # the connection whose RSET hung was dropped


async def test_421_then_451_then_success(server: SmtpServer) -> None:
    """A scripted 421, 451, 452 sequence defers three times, then the message is accepted."""
    server.script(
        "bob@example.org",
        Fault("rcpt", "421 4.3.2 closing"),
        Fault("rcpt", "451 4.3.0 later"),
        Fault("rcpt", "452 4.5.3 too many recipients"),
    )
    async with transport(server) as t:
        states = [(await send_one(t, "bob@example.org")).state for _ in range(4)]
    assert states == ["deferred", "deferred", "deferred", "accepted"]
    assert len(server.messages_to("bob@example.org")) == 1


async def test_refused_sender_is_a_setup_error(server: SmtpServer) -> None:
    """The server refusing the envelope sender (5xx to MAIL) would fail every message."""
    server.script(SENDER, Fault("mail", "553 5.7.1 sender not owned by user"))
    async with transport(server) as t:
        with pytest.raises(TransportSetupError, match=r"refused the sender: 553 5\.7\.1"):
            await send_one(t)
        assert (await send_one(t)).state == "accepted"
    assert server.sessions == 1


async def test_message_too_big_for_server_fails_locally() -> None:
    """A message above the server's SIZE fails without sending it (and not as a bounce)."""
    with SmtpServer(data_size_limit=2000) as server:
        async with transport(server) as t:
            delivery = await send_one(t, padding=5000)
        assert delivery.state == "failed"
        assert delivery.reply.startswith("552 5.3.4 (local)")
        assert not is_hard_bounce(delivery.reply)
        assert server.commands["MAIL"] == 0


async def test_smtputf8_address(server: SmtpServer) -> None:
    """A non-ASCII address is sent with SMTPUTF8 when the server offers it."""
    async with transport(server) as t:
        delivery = await send_one(t, "zoë@example.org")
    assert delivery.state == "accepted"
    assert server.received[0].rcpt_tos == ("zoë@example.org",)
    assert "SMTPUTF8" in server.received[0].mail_options


async def test_mail_options_follow_each_message_on_one_connection(server: SmtpServer) -> None:
    """MAIL FROM's options are worked out per message even on one reused connection: SMTPUTF8
    only for the non-ASCII address, BODY=8BITMIME only for the 8-bit body, SIZE each time."""
    messages = [
        digest_message("zoë@example.org"),
        digest_message("ada@example.org", padding=3000),
        digest_message("bob@example.org", eight_bit=True),
        digest_message("zoë@example.org", eight_bit=True, padding=100),
    ]
    async with transport(server, concurrency=1) as t:
        for message in messages:
            assert (await t.send(message, SENDER)).state == "accepted"
    assert server.sessions == 1
    options = [set(got.mail_options) for got in server.received]
    assert [("SMTPUTF8" in o, "BODY=8BITMIME" in o) for o in options] == [
        (True, False),
        (False, False),
        (False, True),
        (True, True),
    ]
    for got, message in zip(server.received, messages, strict=True):
        assert f"SIZE={len(message.message)}" in got.mail_options


async def test_smtputf8_address_without_server_support() -> None:
    """Without SMTPUTF8 on the server, a non-ASCII address fails locally (no suppression)."""
    with SmtpServer(smtputf8=False) as server:
        async with transport(server) as t:
            delivery = await send_one(t, "zoë@example.org")
        assert delivery.state == "failed"
        assert delivery.reply.startswith("553 5.6.7 (local)")
        assert not is_hard_bounce(delivery.reply)
        assert server.commands["MAIL"] == 0


# ---------------------------------------------------------------------------- connections


async def test_stale_pooled_connection_is_replaced_once(server: SmtpServer) -> None:
    """A pooled connection that dies at MAIL is replaced transparently, but only once."""
    async with transport(server) as t:
        assert (await send_one(t)).state == "accepted"
        server.script(SENDER, Fault("mail", drop=True))
        assert (await send_one(t)).state == "accepted"
        assert server.sessions == 2
        server.script(SENDER, Fault("mail", drop=True), Fault("mail", drop=True))
        delivery = await send_one(t)
    assert delivery.state == "deferred"
    assert "before the transaction started" in delivery.reply
    assert len(server.received) == 2
    assert server.sessions == 3  # A; B replacing A; C replacing B (dropped too)


async def test_fresh_connection_dying_at_mail_is_not_retried(server: SmtpServer) -> None:
    """On a brand-new connection, a drop at MAIL defers (no retry loop)."""
    server.script(SENDER, Fault("mail", drop=True))
    async with transport(server) as t:
        delivery = await send_one(t)
    assert delivery.state == "deferred"
    assert server.sessions == 1


async def test_server_closing_idle_connections(server: SmtpServer) -> None:
    """Connections the server closed while idle (e.g. during the fetch) are replaced."""
    async with transport(server) as t:
        await t.check()
        assert server.drop_sessions() == 1
        assert (await send_one(t)).state == "accepted"
        assert server.drop_sessions() == 1
        assert (await send_one(t)).state == "accepted"
    assert server.sessions == 3


async def test_slow_reply_beyond_timeout_is_deferred(server: SmtpServer) -> None:
    """A server slower than smtp.timeout before the body: deferred, connection replaced."""
    server.script("bob@example.org", Fault("rcpt", delay=3.0))
    async with transport(server, timeout=0.5) as t:
        slow = await send_one(t, "bob@example.org")
        after = await send_one(t, "bob@example.org")
    assert slow.state == "deferred"
    assert "no reply within 0.5s" in slow.reply and "not sent" in slow.reply
    assert after.state == "accepted"
    assert server.sessions == 2


async def test_slow_final_reply_is_unknown(server: SmtpServer) -> None:
    """No reply to the final '.' within smtp.timeout: unknown (it may have been accepted)."""
    server.script("bob@example.org", Fault("data", delay=2.0))
    async with transport(server, timeout=0.5) as t:
        delivery = await send_one(t, "bob@example.org")
    assert delivery.state == "unknown"
    assert "may have accepted" in delivery.reply


async def test_drop_during_large_body_is_deferred() -> None:
    """The server hangs up while a large body is still leaving us: deferred, not unknown."""
    with SmtpServer(data_size_limit=None) as server:
        server.script("bob@example.org", Fault("body", after_bytes=65536))
        async with transport(server, timeout=20.0) as t:
            delivery = await send_one(t, "bob@example.org", padding=16_000_000)
            after = await send_one(t, "bob@example.org")
        assert delivery.state == "deferred", delivery.reply
        assert "not sent" in delivery.reply
        assert after.state == "accepted"


async def test_cancelled_send_leaves_no_broken_connection(server: SmtpServer) -> None:
    """Cancelling a send mid-transaction drops that connection; later sends still work."""
    server.script("bob@example.org", Fault("data", delay=5.0))
    async with transport(server, concurrency=1) as t:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(send_one(t, "bob@example.org"), timeout=0.5)
        assert server.commands["RCPT"] == 1  # it was cancelled mid-transaction
        assert (await send_one(t, "carol@example.org")).state == "accepted"
    assert server.sessions == 2


# ---------------------------------------------------------------------------- hostile replies

HOSTILE = [
    pytest.param(Fault("rcpt", b"451 4.3.0 " + b"x" * 10_000), "deferred", id="10KB-line-rcpt"),
    pytest.param(Fault("data", b"250 2.0.0 " + b"y" * 10_000), "unknown", id="10KB-line-data"),
    pytest.param(
        Fault("rcpt", b"".join(b"451-4.3.0 line %d\r\n" % i for i in range(4000)) + b"451 end"),
        "deferred",
        id="endless-multiline",
    ),
    pytest.param(Fault("rcpt", b"hello there, not SMTP"), "deferred", id="not-smtp"),
    pytest.param(Fault("data", b"OK"), "unknown", id="not-smtp-after-data"),
    pytest.param(Fault("rcpt", b"354 go ahead"), "deferred", id="out-of-step-354"),
]


@pytest.mark.parametrize(("fault", "state"), HOSTILE)
async def test_hostile_replies_are_contained(server: SmtpServer, fault: Fault, state: str) -> None:
    """Huge, endless or non-SMTP replies: a safe state, a short reply, a fresh connection."""
    server.script("bob@example.org", fault)
    async with transport(server) as t:
        delivery = await send_one(t, "bob@example.org")
        after = await send_one(t, "bob@example.org")
    assert delivery.state == state, delivery.reply
    assert len(delivery.reply) <= 500 and "\n" not in delivery.reply
    assert after.state == "accepted"


async def test_non_ascii_and_control_bytes_in_reply(server: SmtpServer) -> None:
    """Non-UTF-8 bytes, UTF-8 text and terminal escapes in a reply end up as safe text."""
    raw = "550 5.1.1 Üser unbekannt ".encode() + b"\xff\xfe \x1b[31mred\x1b[0m \x00nul"
    server.script("bob@example.org", Fault("rcpt", raw))
    async with transport(server) as t:
        delivery = await send_one(t, "bob@example.org")
    assert delivery.state == "failed" and is_hard_bounce(delivery.reply)
    assert "Üser unbekannt" in delivery.reply
    assert "\x1b" not in delivery.reply and "\x00" not in delivery.reply
    delivery.reply.encode("utf-8")  # no lone surrogates


async def test_multiline_reply_is_one_line(server: SmtpServer) -> None:
    """A multi-line reply is joined into one line with one status."""
    server.script("bob@example.org", Fault("rcpt", b"452-4.2.2 mailbox\r\n452 4.2.2 is full"))
    async with transport(server) as t:
        delivery = await send_one(t, "bob@example.org")
    assert delivery.reply == "452 4.2.2 mailbox is full"


def test_smtpserver_runs_as_a_process(tmp_path: Path) -> None:
    """`python tests/smtpserver.py` serves, logs one JSON line per message, stops on SIGTERM."""
    log_file = tmp_path / "received.jsonl"
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "smtpserver.py"), "--log", str(log_file)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[0] == "READY"
        port = int(ready[1])
        message = digest_message("ada@example.org")

        async def go() -> str:
            t = SmtpTransport(
                SmtpConfig(host="127.0.0.1", port=port, security="none", timeout=5),
                DeliveryConfig(),
            )
            async with t:
                return (await t.send(message, SENDER)).state

        assert asyncio.run(go()) == "accepted"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    [line] = log_file.read_text().splitlines()
    assert json.loads(line) == {
        "rcpt": ["ada@example.org"],
        "message_id": message.message_id,
        "bytes": len(message.message),
        "session": 1,
    }
