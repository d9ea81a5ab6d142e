"""SMTP PIPELINING (RFC 2920) in SmtpTransport, against servers that do and do not offer it.

Two kinds of real servers on 127.0.0.1:

* ``Wire``: a hand-written SMTP server that logs every command with the number of replies it
  had sent when the command arrived, can hold its replies until a whole MAIL/RCPT/DATA group
  is in (so a client that waits for each reply would stall), answers a group's replies in
  one write, and can play a broken server that says 354 to DATA after refusing RCPT;
* ``SmtpServer`` (aiosmtpd, tests/smtpserver.py) with ``extra_extensions=("PIPELINING",)``
  or without it, for faults, TLS and AUTH: every outcome must be classified exactly as
  without pipelining.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from conftest import require_tool
from smtpserver import CertFiles, Fault, SmtpServer, digest_message, make_cert

from digestd.config import DeliveryConfig, SmtpConfig
from digestd.deliver import SmtpTransport, is_hard_bounce

SENDER = "bounces@example.org"
PIPELINING = ("PIPELINING",)


def transport(port: int, **options: Any) -> SmtpTransport:
    smtp_keys = set(SmtpConfig.model_fields)
    smtp: dict[str, Any] = {"host": "127.0.0.1", "port": port, "security": "none", "timeout": 5}
    delivery: dict[str, Any] = {}
    for key, value in options.items():
        (smtp if key in smtp_keys else delivery)[key] = value
    return SmtpTransport(SmtpConfig(**smtp), DeliveryConfig(**delivery))


# ------------------------------------------------------------------------ the wire server

Reply = Callable[[str], str]  # command line -> reply line(s), CRLF-terminated


@dataclasses.dataclass
class Seen:
    command: str  # the command line as received (without CRLF)
    replies_before: int  # replies the server had written on this session when it arrived


class Wire:
    """A minimal SMTP server on 127.0.0.1 that records how the client talks (see module doc).

    ``hold_group``: replies to MAIL/RCPT are held until DATA arrives, then written at once.
    ``rcpt_reply`` / ``data_reply``: what RCPT and DATA get (DATA's 354 starts a body).
    ``extra_after_end``: an unsolicited reply line written right after the end-of-data reply.
    """

    def __init__(
        self,
        *,
        pipelining: bool = True,
        hold_group: bool = False,
        rcpt_reply: str = "250 2.1.5 OK",
        data_reply: str = "354 go ahead",
        extra_after_end: str = "",
    ) -> None:
        self.pipelining = pipelining
        self.hold_group = hold_group
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self.extra_after_end = extra_after_end
        self.seen: list[Seen] = []
        self.bodies: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Wire:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def commands(self) -> list[str]:
        return [s.command.split(" ")[0].split(":")[0].upper() for s in self.seen]

    @staticmethod
    async def _body(reader: asyncio.StreamReader) -> bytes:
        """Up to and including the end-of-data line (a lone "." counts from the start)."""
        first = await reader.readline()
        if first == b".\r\n":
            return first
        return first + await reader.readuntil(b"\r\n.\r\n")

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = 0
        held: list[str] = []

        def reply(text: str) -> None:
            held.append(text)

        async def flush() -> None:
            nonlocal sent
            if held:
                writer.write("".join(f"{line}\r\n" for line in held).encode())
                sent += len(held)
                held.clear()
                await writer.drain()

        try:
            reply("220 wire.test ESMTP")
            await flush()
            while True:
                line = await reader.readline()
                if not line:
                    return
                command = line.decode().rstrip("\r\n")
                self.seen.append(Seen(command, sent))
                verb = command.split(" ")[0].split(":")[0].upper()
                if verb == "EHLO":
                    ext = ["250-wire.test", "250-8BITMIME", "250-ENHANCEDSTATUSCODES"]
                    if self.pipelining:
                        ext.append("250-PIPELINING")
                    for text in [*ext[:-1], ext[-1].replace("250-", "250 ", 1)]:
                        reply(text)
                elif verb == "MAIL":
                    reply("250 2.1.0 OK")
                elif verb == "RCPT":
                    reply(self.rcpt_reply)
                elif verb == "DATA":
                    reply(self.data_reply)
                    await flush()
                    if self.data_reply.startswith("354"):
                        body = await self._body(reader)
                        self.bodies.append(body)
                        reply("250 2.0.0 queued")
                        if self.extra_after_end:
                            reply(self.extra_after_end)
                elif verb in ("RSET", "NOOP"):
                    reply("250 2.0.0 OK")
                elif verb == "QUIT":
                    reply("221 2.0.0 bye")
                    await flush()
                    return
                else:
                    reply("502 5.5.2 unknown command")
                if self.hold_group and verb in ("MAIL", "RCPT"):
                    continue  # answered with the group, once DATA is in
                await flush()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


# ------------------------------------------------------------------------------- wire tests


async def test_group_is_sent_before_any_reply_when_offered() -> None:
    """With PIPELINING offered, MAIL, RCPT and DATA all arrive before the server has answered
    any of them (the server holds its replies until DATA: a waiting client would stall)."""
    async with Wire(hold_group=True) as wire:
        async with transport(wire.port) as t:
            first = await t.send(digest_message("ada@example.org"), SENDER)
            second = await t.send(digest_message("bob@example.org", subscriber_id=2), SENDER)
    assert (first.state, second.state) == ("accepted", "accepted")
    groups = [s for s in wire.seen if s.command.split(" ")[0] in ("MAIL", "RCPT", "DATA")]
    assert len(groups) == 6
    for start in (0, 3):
        mail, rcpt, data = groups[start : start + 3]
        assert mail.command.startswith("MAIL FROM:<bounces@example.org>")
        assert rcpt.command.startswith("RCPT TO:<")
        assert data.command == "DATA"
        assert mail.replies_before == rcpt.replies_before == data.replies_before
    assert wire.bodies[0].endswith(b"\r\n.\r\n") and b"Message-ID" in wire.bodies[0]


async def test_commands_wait_for_replies_when_not_offered() -> None:
    """Without PIPELINING in EHLO, each command goes out only after the previous reply."""
    async with Wire(pipelining=False) as wire:
        async with transport(wire.port) as t:
            delivery = await t.send(digest_message(), SENDER)
    assert delivery.state == "accepted"
    mail, rcpt, data = (s for s in wire.seen if s.command.split(" ")[0] in ("MAIL", "RCPT", "DATA"))
    assert rcpt.replies_before == mail.replies_before + 1
    assert data.replies_before == rcpt.replies_before + 1


async def test_pipelining_can_be_turned_off_in_config() -> None:
    """smtp.pipelining = false: one command per round trip even when the server offers it."""
    async with Wire() as wire:
        async with transport(wire.port, pipelining=False) as t:
            assert (await t.send(digest_message(), SENDER)).state == "accepted"
    mail, rcpt, _ = (s for s in wire.seen if s.command.split(" ")[0] in ("MAIL", "RCPT", "DATA"))
    assert rcpt.replies_before == mail.replies_before + 1


async def test_refused_rcpt_with_354_to_data_sends_no_content() -> None:
    """A broken server refuses RCPT yet says 354 to DATA: the client sends a lone "." (no
    content), classifies the RCPT refusal (hard bounce), resets, and the connection goes on."""
    async with Wire(rcpt_reply="550 5.1.1 no such user") as wire:
        async with transport(wire.port) as t:
            refused = await t.send(digest_message("gone@example.org"), SENDER)
            wire.rcpt_reply = "250 2.1.5 OK"
            accepted = await t.send(digest_message("ada@example.org"), SENDER)
    assert refused.state == "failed"
    assert refused.reply.startswith("550 5.1.1 no such user")
    assert is_hard_bounce(refused.reply)
    assert wire.bodies[0] == b".\r\n"  # the empty transaction: not one byte of the message
    assert accepted.state == "accepted" and b"Message-ID" in wire.bodies[1]
    assert wire.commands().count("EHLO") == 1  # same session
    assert "RSET" in wire.commands()


async def test_refused_rcpt_and_refused_data_keep_the_connection_in_step() -> None:
    """RCPT 452 and DATA 554 arrive together: deferred on RCPT's reply, then the next
    transaction on the same connection pairs its replies correctly."""
    async with Wire(rcpt_reply="452 4.2.2 mailbox busy", data_reply="554 5.5.1 no recipients") as w:
        async with transport(w.port) as t:
            deferred = await t.send(digest_message(), SENDER)
            w.rcpt_reply, w.data_reply = "250 2.1.5 OK", "354 go ahead"
            accepted = await t.send(digest_message("bob@example.org"), SENDER)
    assert deferred.state == "deferred" and deferred.reply.startswith("452 4.2.2")
    assert accepted.state == "accepted" and accepted.reply.startswith("250 2.0.0 queued")
    assert w.bodies and len(w.bodies) == 1
    assert w.commands().count("EHLO") == 1


async def test_unsolicited_reply_is_never_paired_with_a_later_command() -> None:
    """An extra reply line after the end-of-data reply is dropped, not read as the next
    transaction's MAIL reply."""
    async with Wire(extra_after_end="550 5.7.1 unsolicited") as wire:
        async with transport(wire.port) as t:
            results = [
                await t.send(digest_message(f"u{i}@example.org", subscriber_id=i), SENDER)
                for i in range(3)
            ]
    assert [r.state for r in results] == ["accepted"] * 3
    assert len(wire.bodies) == 3


# --------------------------------------------------------------- aiosmtpd: faults, TLS, AUTH


@pytest.fixture(params=[True, False], ids=["offered", "not-offered"])
def offered(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def server(offered: bool) -> Iterator[SmtpServer]:
    with SmtpServer(extra_extensions=PIPELINING if offered else ()) as srv:
        yield srv


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    require_tool("openssl")
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def sender(server: SmtpServer) -> AsyncIterator[SmtpTransport]:
    async with transport(server.port) as t:
        yield t


FAULTS = [
    # (fault, expected state, reply prefix)
    (Fault("rcpt", "550 5.1.1 unknown user"), "failed", "550 5.1.1"),
    (Fault("rcpt", "452 4.2.2 over quota"), "deferred", "452 4.2.2"),
    (Fault("rcpt", "550 5.7.1 blocked by policy"), "failed", "550 5.7.1"),
    (Fault("data_cmd", "554 5.6.0 no thanks"), "failed", "554 5.6.0"),
    (Fault("data", "451 4.3.0 try later"), "deferred", "451 4.3.0"),
    (Fault("data", "550 5.7.1 spam"), "failed", "550 5.7.1"),
    (Fault("data_cmd", drop=True), "deferred", "451 4.4.2 (local)"),
    (Fault("rcpt", drop=True), "deferred", "451 4.4.2 (local)"),
]


@pytest.mark.parametrize(("fault", "state", "prefix"), FAULTS)
async def test_faults_are_classified_the_same_with_and_without_pipelining(
    server: SmtpServer, sender: SmtpTransport, fault: Fault, state: str, prefix: str
) -> None:
    """Each scripted fault gives the same state and reply whether or not PIPELINING is
    offered; nothing is received for a refused message, and the next message goes through."""
    server.script("bob@example.org", fault)
    delivery = await sender.send(digest_message("bob@example.org"), SENDER)
    assert delivery.state == state, delivery.reply
    assert delivery.reply.startswith(prefix), delivery.reply
    assert server.messages_to("bob@example.org") == []
    after = await sender.send(digest_message("ada@example.org", subscriber_id=2), SENDER)
    assert after.state == "accepted"
    assert len(server.messages_to("ada@example.org")) == 1


async def test_rcpt_refusal_resets_and_reuses_the_connection(
    server: SmtpServer, sender: SmtpTransport
) -> None:
    """A 550 to RCPT costs no new session: RSET, then the next transaction on the same one."""
    server.script("gone@example.org", Fault("rcpt", "550 5.1.1 gone"))
    assert (await sender.send(digest_message("gone@example.org"), SENDER)).state == "failed"
    for i in range(3):
        message = digest_message(f"u{i}@example.org", subscriber_id=i)
        assert (await sender.send(message, SENDER)).state == "accepted"
    assert server.sessions == 1
    assert server.commands["RSET"] == 1
    assert len(server.received) == 3


async def test_421_to_mail_drops_the_connection(server: SmtpServer, sender: SmtpTransport) -> None:
    """421 to MAIL: deferred with the server's reply; the next message opens a new session."""
    server.script(SENDER, Fault("mail", "421 4.3.2 shutting down"))
    delivery = await sender.send(digest_message(), SENDER)
    assert delivery.state == "deferred" and delivery.reply.startswith("421 4.3.2")
    assert (await sender.send(digest_message("bob@example.org"), SENDER)).state == "accepted"
    assert server.sessions == 2


async def test_many_concurrent_messages_arrive_once_each(server: SmtpServer) -> None:
    """Two hundred messages over four pipelined connections: each arrives exactly once,
    byte for byte."""
    messages = [digest_message(f"u{i}@example.org", subscriber_id=i) for i in range(200)]
    async with transport(server.port, concurrency=4, messages_per_connection=1000) as t:
        results = await asyncio.gather(*(t.send(m, SENDER) for m in messages))
    assert {r.state for r in results} == {"accepted"}
    assert sorted(r.data for r in server.received) == sorted(m.message for m in messages)
    assert server.sessions == 4


async def test_starttls_and_auth_with_pipelining(cert: CertFiles, offered: bool) -> None:
    """STARTTLS, then AUTH, then pipelined transactions: mail arrives over TLS, logged in."""
    with SmtpServer(
        security="starttls",
        cert=cert,
        auth=("digest", "pw"),
        extra_extensions=PIPELINING if offered else (),
    ) as server:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DIGESTD_SMTP_PASSWORD", "pw")
            async with transport(
                server.port, security="starttls", ca_file=cert.cert, username="digest"
            ) as t:
                await t.check()
                server.script("bob@example.org", Fault("rcpt", "550 5.1.1 unknown"))
                bob = await t.send(digest_message("bob@example.org"), SENDER)
                ada = await t.send(digest_message("ada@example.org"), SENDER)
    assert bob.state == "failed" and ada.state == "accepted"
    [got] = server.received
    assert got.tls is True and got.login == "digest"
    assert server.sessions == 1


async def test_implicit_tls_with_pipelining(cert: CertFiles) -> None:
    """security = tls (port 465 style) with PIPELINING offered: messages arrive intact."""
    with SmtpServer(security="tls", cert=cert, extra_extensions=PIPELINING) as server:
        async with transport(server.port, security="tls", ca_file=cert.cert) as t:
            messages = [digest_message(f"u{i}@example.org", subscriber_id=i) for i in range(5)]
            results = [await t.send(m, SENDER) for m in messages]
    assert {r.state for r in results} == {"accepted"}
    assert [r.data for r in server.received] == [m.message for m in messages]
    assert all(r.tls for r in server.received)


TIMEOUTS = [
    # (fault, expected state, words in the reply)
    (Fault("rcpt", delay=3.0), "deferred", ("no reply within 0.5s", "not sent")),
    (Fault("data", delay=2.0), "unknown", ("no reply within 0.5s", "may have accepted")),
]


@pytest.mark.parametrize(("fault", "state", "words"), TIMEOUTS)
async def test_timeouts_are_classified_the_same_with_and_without_pipelining(
    server: SmtpServer, fault: Fault, state: str, words: tuple[str, ...]
) -> None:
    """No reply within smtp.timeout: deferred before the body, unknown after it, with or
    without PIPELINING; the connection is dropped and the next message takes a new one."""
    server.script("bob@example.org", fault)
    async with transport(server.port, timeout=0.5) as t:
        slow = await t.send(digest_message("bob@example.org"), SENDER)
        after = await t.send(digest_message("ada@example.org", subscriber_id=2), SENDER)
    assert slow.state == state, slow.reply
    assert all(word in slow.reply for word in words), slow.reply
    assert after.state == "accepted"
    assert server.sessions == 2


async def test_deadline_is_per_transaction_not_per_connection(server: SmtpServer) -> None:
    """smtp.timeout bounds each transaction: a connection whose transactions each take half
    of it carries them all, however long the connection lives."""
    server.script("bob@example.org", *[Fault("data", delay=0.25) for _ in range(5)])
    async with transport(server.port, timeout=0.6, concurrency=1) as t:
        results = [await t.send(digest_message("bob@example.org"), SENDER) for _ in range(5)]
    assert [r.state for r in results] == ["accepted"] * 5, [r.reply for r in results]
    assert server.sessions == 1


# ------------------------------------------------------------------------ reply parsing

REPLY_STREAMS = [
    b"250 2.0.0 OK queued\r\n354 go ahead\n",
    b"250-first\r\n250-second line\r\n250 last\r\n221 bye\r\n",
    b"550-5.1.1 a\r\n550 5.1.1 b\r\n250 ok\r\n",
    b"250\r\n250 \r\n250-\r\n250 x\r\n",
    b"2\n250 ok\r\n",
    b"25\r\n",
    b" 250 leading space\r\n",
    b"+25 sign\r\n",
    b"2_5 underscore\r\n",
    b"abc not a reply\r\n",
    b"250 caf\xc3\xa9 \xff\xfe raw\tbytes \x00\r\n",
    b"250 " + b"x" * 9000 + b"\r\n",
    b"250-" + b"x" * 9000 + b"\r\n250 end\r\n",
    b"250 no line end yet",
]


@pytest.mark.parametrize("stream", REPLY_STREAMS, ids=range(len(REPLY_STREAMS)))
async def test_reply_parser_reads_what_aiosmtplib_reads(stream: bytes) -> None:
    """The connection's own reply parser gives the same replies, and the same errors for
    malformed or oversized lines, as aiosmtplib's, reply after reply."""
    from aiosmtplib.protocol import SMTPProtocol

    from digestd.deliver import _reply_queue_class

    def replies(take: Callable[[], Any]) -> list[Any]:
        out: list[Any] = []
        for _ in range(10):
            try:
                reply = take()
            except Exception as exc:
                return [*out, (type(exc), str(exc))]
            if reply is None:
                return out
            out.append(tuple(reply))
        return out

    loop = asyncio.get_running_loop()
    reference = SMTPProtocol(loop=loop)
    reference._buffer = bytearray(stream)
    ours = _reply_queue_class()(SMTPProtocol(loop=loop))
    ours._buffer = bytearray(stream)
    expected = replies(reference._read_response_from_buffer)
    assert bool(expected) == stream.endswith(b"\n")  # nothing until a line is complete
    assert replies(ours._next_reply) == expected
    assert ours._buffer == reference._buffer


# ------------------------------------------------------------------- DATA payload marking


def test_wire_checked_attaches_the_data_payload() -> None:
    """wire_checked returns bytes equal to the message that carry the DATA payload (dot-
    stuffed when needed) through pickling; messages with bare CR or LF stay plain, and
    every variant gives the same payload as an unmarked message."""
    import pickle

    from digestd.deliver import _data_payload, wire_checked

    clean = digest_message(text="Today's papers:\n").message
    dotted = digest_message().message  # has lines starting with "."
    assert b"\r\n." in dotted and b"\n." not in clean
    for message in (clean, dotted):
        marked = pickle.loads(pickle.dumps(wire_checked(message)))  # as from a worker
        assert marked == message and type(marked) is not bytes
        assert _data_payload(marked) == _data_payload(message)
        assert wire_checked(marked) is marked
    for dirty in (clean.replace(b"\r\n", b"\n"), clean.replace(b"papers:\r\n", b"papers:\r")):
        assert type(wire_checked(dirty)) is bytes
    for variant in (clean[:-2], b"." + clean, dotted.replace(b"\r\n", b"\n")):
        assert _data_payload(wire_checked(variant)) == _data_payload(variant)


async def test_marked_message_arrives_byte_for_byte(server: SmtpServer) -> None:
    """wire_checked messages, with and without dot-lines, are received exactly as rendered."""
    from digestd.deliver import wire_checked

    messages = [digest_message(text="Today's papers:\n"), digest_message("bob@example.org")]
    async with transport(server.port) as t:
        for message in messages:
            marked = dataclasses.replace(message, message=wire_checked(message.message))
            assert (await t.send(marked, SENDER)).state == "accepted"
    assert [r.data for r in server.received] == [m.message for m in messages]
