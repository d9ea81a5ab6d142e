"""The deliver stage: hand finished messages to an SMTP server or a Maildir.

``send`` returns a :class:`~digestd.models.Delivery` whose ``state`` says what happened;
it never raises for a per-message failure. The pipeline (not this module) decides retries.

SMTP (:class:`SmtpTransport`)
    aiosmtplib for the connection, TLS (``starttls`` required / implicit ``tls`` / ``none``,
    certificates verified by default) and AUTH; the transaction itself (MAIL, RCPT, DATA and
    the message body) is driven here so the outcome can be classified precisely:

    * a reply: 2xx ``accepted``, 4xx ``deferred``, 5xx ``failed`` (see :func:`classify`,
      :func:`is_hard_bounce`, :func:`is_policy`);
    * connection lost / timed out / garbled reply *before the whole body was handed to the
      kernel*: ``deferred`` (the server cannot have accepted it);
    * the same *after* the final ``.`` was sent but before its reply: ``unknown`` (the server
      may have accepted it; retry at most once).

    A pool of at most ``delivery.concurrency`` connections, each reused for up to
    ``delivery.messages_per_connection`` transactions; one global rate limit
    (``delivery.rate_per_second``); a deadline of ``smtp.timeout`` per transaction. A pooled
    connection found dead before its transaction started is replaced once, transparently.
    Failures that would hit every message alike (TLS verification, login refused, STARTTLS
    not offered, the envelope sender refused) raise :class:`TransportSetupError`.

Maildir (:class:`MaildirTransport`)
    ``tmp/`` → ``new/`` with unique names, files ``0600``, fsync'd; optionally an ``.html``
    copy of each message under ``<maildir>/html/`` (for the demo).

Replies are normalised to one line: ``"<code> <enhanced-status> <text>"`` (≤ 500 characters,
no control characters, valid UTF-8). Replies made up locally (no server reply to quote) say
``(local)`` right after the status, e.g. ``"421 4.4.2 (local) connection lost …"``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import errno
import itertools
import logging
import os
import re
import secrets
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, Self, cast

import structlog

from .compose import DataPayload, WireReady, dot_stuffed, message_bytes
from .errors import ConfigError, DeliveryError, TransportSetupError
from .models import Delivery, DeliveryState, RenderedDigest

if TYPE_CHECKING:
    import aiosmtplib

    from .config import DeliveryConfig, Settings, SmtpConfig

log = structlog.get_logger(__name__)

MAX_REPLY = 500
_FLUSH_POLL = 0.005  # seconds between write-buffer checks while a large body drains
# Replies are read into one buffer per connection: asyncio's default reading allocates (and
# frees) 256 KiB per recv(), ~12 µs for a 30-byte reply.
_READ_BUFFER = 16 * 1024

__all__ = [
    "MaildirTransport",
    "SmtpTransport",
    "Transport",
    "classify",
    "format_reply",
    "is_hard_bounce",
    "is_policy",
    "make_transport",
    "wire_checked",
]


class Transport(Protocol):
    """What the pipeline needs from a way of delivering mail."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def check(self) -> None:
        """Connect (+TLS, +login) once; raise TransportSetupError with a one-line reason."""
        ...

    async def send(self, message: RenderedDigest, envelope_from: str) -> Delivery:
        """Deliver one message; per-message failures come back as the Delivery's state."""
        ...


def make_transport(settings: Settings) -> Transport:
    """The transport ``[delivery] transport`` names."""
    if settings.delivery.transport == "maildir":
        return MaildirTransport(settings.delivery.maildir, settings.delivery.write_html_copy)
    return SmtpTransport(settings.smtp, settings.delivery)


# ------------------------------------------------------------------------------ replies

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_REPLY_STATUS = re.compile(r"^\d{3} ([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
# C0 and C1 controls, DEL, line/paragraph separators, bidi overrides and other format chars.
_UNPRINTABLE_CHARS = r"\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069"
_UNPRINTABLE = re.compile(f"[{_UNPRINTABLE_CHARS}]")
_NOT_IN_ADDRESS = re.compile(f"[<> {_UNPRINTABLE_CHARS}]")

Phase = Literal["connect", "mail", "rcpt", "data", "body", "end"]


def classify(code: int, message: str = "") -> DeliveryState:
    """The delivery state a server reply means.

    2xx ``accepted``; 4xx ``deferred``; 5xx ``failed`` — except ``5.2.2`` (mailbox full),
    which is ``deferred`` like the temporary condition it usually is. Hard bounces
    (:func:`is_hard_bounce`, the caller suppresses) and policy rejections (:func:`is_policy`,
    the caller alerts) are both ``failed``; tell them apart from the reply. Anything that is
    not a reply code (``-1`` for a garbled reply) is ``unknown``.
    """
    if 200 <= code < 300:
        return "accepted"
    if 400 <= code < 500:
        return "deferred"
    if 500 <= code < 600:
        match = _ENHANCED.match(message.lstrip())
        if match and match.group(2) == "2" and match.group(3) == "2":
            return "deferred"
        return "failed"
    return "unknown"


def _status(reply: str) -> tuple[int, int, int] | None:
    match = _REPLY_STATUS.match(reply)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def is_policy(reply: str) -> bool:
    """True for a permanent policy rejection (``5.7.x``: spam, blocklist, auth, DMARC…).

    The subscriber is not at fault: alert the operator, do not suppress.
    """
    status = _status(reply)
    return status is not None and status[0] == 5 and status[1] == 7


def is_hard_bounce(reply: str) -> bool:
    """True when the *recipient* address is permanently bad (``5.1.x``): suppress them.

    ``5.1.7``/``5.1.8`` are about the *sender* and do not count. A ``550``/``551``/``553``
    refusal of RCPT without an enhanced code reads as ``5.1.1``/``5.1.6``/``5.1.3`` (see
    :func:`format_reply`).
    """
    status = _status(reply)
    return status is not None and status[:2] == (5, 1) and status[2] not in (7, 8)


def _default_status(code: int, phase: Phase) -> str:
    klass = code // 100 if 2 <= code // 100 <= 5 else 4
    if klass == 3:
        klass = 5  # a 3xx where it makes no sense is a protocol error
    if phase == "rcpt" and klass == 5:
        return {550: "5.1.1", 551: "5.1.6", 553: "5.1.3"}.get(code, "5.0.0")
    if phase == "mail" and code == 552:
        return "5.3.4"
    return f"{klass}.0.0"


def format_reply(code: int, message: str, phase: Phase = "end") -> str:
    """``"<code> <enhanced-status> <text>"`` on one line, at most 500 characters.

    Multi-line replies are joined with spaces, repeated status codes dropped, control
    characters and undecodable bytes replaced. Without an enhanced status in the reply,
    one is derived from the code and the command it answered (RFC 3463).
    """
    status = ""
    if message.isascii() and message.isprintable():
        # The usual reply, one line of plain ASCII: what the loop below makes of it.
        line = message.strip()
        match = _ENHANCED.match(line)
        if match:
            status = match.group(0)
            line = line[match.end() :].strip()
        body = " ".join(line.split())
    else:
        text = message.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        parts: list[str] = []
        for raw in text.splitlines() or [""]:
            line = raw.strip()
            match = _ENHANCED.match(line)
            if match:
                status = status or match.group(0)
                line = line[match.end() :].strip()
            if line:
                parts.append(line)
        body = " ".join(_UNPRINTABLE.sub(" ", " ".join(parts)).split())
    shown = code if 100 <= code < 600 else 0
    reply = f"{shown:03d} {status or _default_status(code, phase)} {body}".rstrip()
    if len(reply) > MAX_REPLY:
        reply = reply[: MAX_REPLY - 1] + "…"
    return reply


def _local_reply(code: int, status: str, text: str) -> str:
    return format_reply(code, f"{status} (local) {text}")


def _delivery(message: RenderedDigest, state: DeliveryState, reply: str) -> Delivery:
    return Delivery(
        subscriber_id=message.subscriber_id,
        email=message.email,
        date=message.date,
        message_id=message.message_id,
        state=state,
        reply=reply,
        paper_ids=message.paper_ids,
    )


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(_UNPRINTABLE.sub(" ", str(text)).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ------------------------------------------------------------------------- message bytes

_BARE_LINE_ENDING = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# byte -> b"\n" for CR (resp. LF), b"\0" for any other byte: see _crlf_only.
_CR_MARKS = bytes(10 if byte == 13 else 0 for byte in range(256))
_LF_MARKS = bytes(10 if byte == 10 else 0 for byte in range(256))


# Message bytes whose DATA payload is already worked out (see :func:`wire_checked`):
# ``payload`` is the dot-stuffed form when it differs from the message itself, ``size`` the
# RFC 1870 size. The renderer makes them directly (compose.build_message).
_WireReady = WireReady


def wire_checked(message: bytes) -> bytes:
    """``message`` with its DATA payload (CRLF line ends, dot-stuffed) worked out and
    attached, so that sending it needs no scan. That costs ~50 µs for 30 KB (QP soft line
    breaks often start a line with "."); the pipeline does it in its render workers so the
    process driving the SMTP connections does not have to. The result is equal to
    ``message`` and survives pickling; plain bytes are still handled at send time, and so is
    a message with bare CR or LF (returned as it is: the send rewrites its line ends).
    """
    if type(message) is _WireReady or type(message) is DataPayload:
        return message
    if not _crlf_only(message):
        return message
    ready = _WireReady(message)
    payload, size, changed = _clean_payload(message)
    if changed:
        ready.payload, ready.size = payload, size
    return ready


def _crlf_only(message: bytes) -> bool:
    """Whether every CR in ``message`` is followed by LF and every LF follows a CR.

    Two C-speed translations and one comparison (~25 µs for 30 KB, against ~45 µs for
    counting CR, LF and CRLF): the CR marks, shifted by one, must be the LF marks.
    """
    if not message:
        return True
    if message[-1] == 13 or message[0] == 10:
        return False
    return message.translate(_CR_MARKS)[:-1] == message.translate(_LF_MARKS)[1:]


def _clean_payload(message: bytes) -> tuple[bytes, int, bool]:
    """:func:`_data_payload` for a message :func:`_crlf_only` has passed, and whether the
    payload is anything more than the message and the final dot."""
    changed = False
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
        changed = True
    size = len(message)
    stuffed = dot_stuffed(message)
    if stuffed is not None:
        message, changed = stuffed, True
    return message + b".\r\n", size, changed


def _data_payload(message: bytes) -> tuple[bytes, int]:
    """The DATA payload (CRLF line endings, dot-stuffed, ending in ``CRLF.CRLF``) and the
    message size as RFC 1870 counts it (CRLF line endings, without the stuffing and the dot).

    Byte-level operations only (no regex on the usual, already-CRLF message): ~50 µs for
    30 KB, which matters at 100,000 messages a run; nothing but the final dot for bytes
    :func:`wire_checked` has marked.
    """
    if type(message) is _WireReady:
        if message.payload is not None:
            return message.payload, message.size
        return message + b".\r\n", len(message)
    if type(message) is DataPayload:
        return message, message.size
    if not _crlf_only(message):
        message = _BARE_LINE_ENDING.sub(b"\r\n", message)  # now every LF is in a CRLF
    payload, size, _ = _clean_payload(message)
    return payload, size


def _address_problem(address: str, what: str) -> str | None:
    if not address or len(address) > 320:
        return f"{what} address is empty or too long"
    if _NOT_IN_ADDRESS.search(address):
        return f"{what} address contains a forbidden character"
    if address.count("@") != 1 or address.startswith("@") or address.endswith("@"):
        return f"{what} address is not local@domain"
    return None


# ------------------------------------------------------------------------- rate limiting


class _RateLimiter:
    """One global limit on transactions per second (a token bucket holding one token).

    Each caller reserves the next free slot, so sleeping late never lets a burst through:
    at most ``rate × window + 1`` transactions start in any window.
    """

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self.limited = rate > 0  # False: ``wait`` never waits (and need not be called)

    async def wait(self) -> None:
        if not self._interval:
            return
        now = asyncio.get_running_loop().time()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)


# ---------------------------------------------------------------------------- SMTP


class _Transient(Exception):
    """A connection could not be set up, for a reason that may pass (refused, timeout, 4xx)."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(eq=False)
class _Connection:
    smtp: aiosmtplib.SMTP
    transactions: int = 0
    # (sender, needs SMTPUTF8, 7-bit body) -> what MAIL FROM looks like on this connection
    mail_plans: dict[tuple[str, bool, bool], _MailPlan] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.smtp.is_connected

    def extension(self, name: str) -> str | None:
        return self.smtp.esmtp_extensions.get(name)

    def pipelining(self, enabled: bool) -> _ReplyQueue | None:
        """The connection's reply queue when MAIL, RCPT and DATA may go out together."""
        protocol = self.smtp.protocol
        if enabled and self.extension("pipelining") is not None and _is_reply_queue(protocol):
            return protocol  # type: ignore[return-value]
        return None


class _MailPlan(NamedTuple):
    """MAIL FROM for one sender on one connection; only SIZE changes from message to message."""

    head: bytes  # b"MAIL FROM:<sender>"
    size_limit: int | None  # the server's SIZE (0: no limit), None when it does not offer SIZE
    tail: bytes  # b" SMTPUTF8", b" BODY=8BITMIME" as needed and offered
    refusal: str | None  # why this can never go to this server (SMTPUTF8 needed, not offered)


# ------------------------------------------------------------------ PIPELINING (RFC 2920)


class _ReplyQueue(Protocol):
    """What the transaction needs from the connection's protocol (see _reply_queue_class)."""

    replies: collections.deque[aiosmtplib.SMTPResponse]

    @property
    def transport(self) -> asyncio.BaseTransport | None: ...

    @property
    def is_connected(self) -> bool: ...

    def expect(self, count: int) -> None: ...

    def write(self, data: bytes) -> None: ...

    def send(self, data: bytes, replies: int) -> None: ...

    def waiter(self) -> asyncio.Future[aiosmtplib.SMTPResponse]: ...

    def arm(self, seconds: float) -> None: ...

    def disarm(self) -> None: ...

    async def read_response(self) -> aiosmtplib.SMTPResponse: ...


_REPLY_QUEUE_CLASS: type | None = None


def _is_reply_queue(protocol: object) -> bool:
    return _REPLY_QUEUE_CLASS is not None and isinstance(protocol, _REPLY_QUEUE_CLASS)


def _reply_queue_class() -> type:
    """aiosmtplib's protocol, reading every reply that arrives, in order, cheaply.

    aiosmtplib's ``SMTPProtocol`` parses one reply per incoming chunk and ignores data that
    arrives while a parsed reply waits to be picked up: fine for one command at a time, but
    with PIPELINING several replies often arrive in one segment. This subclass parses every
    complete reply in each chunk into ``replies``; ``read_response`` hands them out in order.
    ``expect(n)`` (or ``send(data, n)``) announces how many replies the next write asks for;
    a reply nobody asked for (e.g. injected after a STARTTLS 220) is still dropped, as
    aiosmtplib does.

    The transaction's hot path (:meth:`SmtpTransport._transaction`) takes a reply from
    ``replies`` when one is there and otherwise awaits a plain future from ``waiter()``,
    completed straight from ``buffer_updated``; ``arm``/``disarm`` give it a deadline with
    one lazily re-armed timer per connection instead of one per transaction. Reading is a
    ``BufferedProtocol`` into one buffer per connection: asyncio's ``data_received`` path
    allocates and frees 256 KiB per ``recv()`` (~12 µs for a 30-byte reply).
    Defined lazily so that importing this module does not import aiosmtplib.
    """
    global _REPLY_QUEUE_CLASS
    if _REPLY_QUEUE_CLASS is not None:
        return _REPLY_QUEUE_CLASS

    from aiosmtplib import SMTPResponse, SMTPServerDisconnected
    from aiosmtplib.errors import SMTPReadTimeoutError, SMTPResponseException
    from aiosmtplib.protocol import MAX_LINE_LENGTH, MAX_RESPONSE_LENGTH, SMTPProtocol

    class ReplyQueueProtocol(SMTPProtocol, asyncio.BufferedProtocol):
        def __init__(self, old: SMTPProtocol) -> None:
            super().__init__(loop=old._loop, connection_lost_callback=None)
            self.replies: collections.deque[SMTPResponse] = collections.deque()
            self._expected = 0
            self._waiter: asyncio.Future[SMTPResponse] | None = None
            self._broken: BaseException | None = None
            self._deadline: float | None = None
            self._timer: asyncio.TimerHandle | None = None
            self._read_view = memoryview(bytearray(_READ_BUFFER))
            # Take over the live connection (the greeting has been read; nothing is pending).
            self.transport = old.transport
            self._over_ssl = old._over_ssl
            self._command_lock = old._command_lock
            self._response_waiter = self._loop.create_future()
            self._buffer = old._buffer
            self._connection_lost_callback = old._connection_lost_callback

        def expect(self, count: int) -> None:
            self._expected += count

        def send(self, data: bytes, replies: int) -> None:
            """``write`` (same checks) announcing the ``replies`` that ``data`` asks for."""
            transport = self.transport
            if transport is None or transport.is_closing():
                raise SMTPServerDisconnected("Connection lost")
            self._expected += replies
            transport.write(data)  # type: ignore[attr-defined]

        def waiter(self) -> asyncio.Future[SMTPResponse]:
            """A future for the next reply; look in ``replies`` first."""
            if self._broken is not None:
                raise self._broken
            if self.transport is None:
                raise SMTPServerDisconnected("Connection lost")
            if self._expected <= 0:
                self._expected = 1  # a single command, not announced with expect()
            waiter = self._loop.create_future()
            self._waiter = waiter
            return waiter

        def arm(self, seconds: float) -> None:
            """Fail the pending and every later read with TimeoutError ``seconds`` from now
            (until ``disarm``), as ``asyncio.timeout`` around the reads would."""
            deadline = self._loop.time() + seconds
            self._deadline = deadline
            timer = self._timer
            if timer is None or timer.when() > deadline:
                if timer is not None:
                    timer.cancel()
                self._timer = self._loop.call_at(deadline, self._on_timer)

        def disarm(self) -> None:
            self._deadline = None

        def _on_timer(self) -> None:
            self._timer = None
            deadline = self._deadline
            if deadline is None:
                return
            if deadline > self._loop.time():  # re-armed since: wait for the new deadline
                self._timer = self._loop.call_at(deadline, self._on_timer)
                return
            self._deadline = None
            self._fail(TimeoutError())

        def get_buffer(self, sizehint: int) -> memoryview:
            return self._read_view

        def buffer_updated(self, nbytes: int) -> None:
            self.data_received(self._read_view[:nbytes])  # type: ignore[arg-type]

        def data_received(self, data: bytes) -> None:
            if self.transport is None or self._broken is not None:
                return
            self._buffer.extend(data)
            while self._buffer:
                try:
                    reply = self._next_reply()
                except Exception as exc:
                    del self._buffer[:]
                    self._fail(exc)
                    return
                if reply is None:
                    break
                if self._expected <= 0:
                    continue  # unsolicited: never pair it with a later command
                self._expected -= 1
                waiter, self._waiter = self._waiter, None
                if waiter is not None and not waiter.done():
                    waiter.set_result(reply)
                else:
                    self.replies.append(reply)
            if len(self._buffer) > MAX_RESPONSE_LENGTH:
                del self._buffer[:]
                self._fail(SMTPResponseException(-1, "Response too long"))

        def _next_reply(self) -> SMTPResponse | None:
            """aiosmtplib's ``_read_response_from_buffer``, without its copies for the usual
            one-line reply (multi-line replies still go through it)."""
            buffer = self._buffer
            end = buffer.find(b"\n")
            if end < 0:
                return None
            if end > 3 and buffer[3] == 45:  # "250-…": more lines follow
                return self._read_response_from_buffer()
            if end >= MAX_LINE_LENGTH:
                raise SMTPResponseException(-1, "Response too long")
            try:
                code = int(buffer[: min(3, end + 1)])
            except ValueError:
                line = bytes(buffer[: end + 1]).decode("utf-8", errors="ignore")
                raise SMTPResponseException(-1, f"Malformed SMTP response line: {line}") from None
            text = buffer[4 : end + 1].strip(b" \t\r\n").decode("utf-8", "surrogateescape")
            del buffer[: end + 1]
            return SMTPResponse(code, text)

        def eof_received(self) -> bool:
            self._fail(SMTPServerDisconnected("Unexpected EOF received"))
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            if self._quit_sent and self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(SMTPResponse(221, ""))
            error = SMTPServerDisconnected("Connection lost")
            if exc is not None:
                error.__cause__ = exc
            self._fail(error)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            super().connection_lost(exc)

        def _fail(self, exc: BaseException) -> None:
            if self._broken is None:
                self._broken = exc
            waiter, self._waiter = self._waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
                waiter.exception()  # retrieved: nobody may be left to await it

        async def read_response(self, timeout: float | None = None) -> SMTPResponse:  # noqa: ASYNC109 (aiosmtplib's signature)
            if self.replies:
                return self.replies.popleft()
            waiter = self.waiter()
            try:
                if timeout is None:
                    return await waiter
                async with asyncio.timeout(timeout):
                    return await waiter
            except TimeoutError as exc:
                raise SMTPReadTimeoutError("Timed out waiting for server response") from exc
            finally:
                if self._waiter is waiter:
                    self._waiter = None

    _REPLY_QUEUE_CLASS = ReplyQueueProtocol
    return ReplyQueueProtocol


def _install_reply_queue(smtp: aiosmtplib.SMTP) -> None:
    """Swap the connected client's protocol for the reply-queue one (same transport)."""
    old = smtp.protocol
    if old is None or old.transport is None:
        return
    new = _reply_queue_class()(old)
    old.transport.set_protocol(new)
    smtp.protocol = new


class _Outcome(NamedTuple):
    state: DeliveryState
    reply: str
    keep: bool  # the connection can carry another transaction
    stale: bool = False  # dead before anything was sent: safe to replace and start over
    setup_error: str | None = None  # every message would fail alike: raise


class SmtpTransport:
    """Deliver over SMTP through a pool of reused connections (see the module docstring)."""

    def __init__(
        self,
        settings: SmtpConfig,
        delivery: DeliveryConfig,
        *,
        local_hostname: str | None = None,
    ) -> None:
        self.settings = settings
        self.delivery = delivery
        self._local_hostname = local_hostname or _local_hostname()
        self._slots = asyncio.Semaphore(delivery.concurrency)
        self._idle: list[_Connection] = []
        self._limiter = _RateLimiter(delivery.rate_per_second)
        self._tls: ssl.SSLContext | None = None
        self._password: str | None = None
        self._prepared = False
        self._prepare_lock = asyncio.Lock()
        self._closed = False
        self._where = f"{settings.host}:{settings.port}"
        self._sender_ok = ""  # the envelope sender last found well-formed
        self._debug = _debug_logging()

    async def __aenter__(self) -> Self:
        self._closed = False
        self._debug = _debug_logging()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """QUIT every idle connection (briefly) and refuse further sends."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(conn) for conn in idle))
        await asyncio.sleep(0)  # let the closed transports call connection_lost

    async def check(self) -> None:
        """Connect, STARTTLS/TLS and log in once; keep the connection for the first send."""
        try:
            async with self._slots:
                conn = await self._open()
        except _Transient as exc:
            raise TransportSetupError(
                f"SMTP {self._where}: {exc.reply.split('(local) ', 1)[-1]}"
            ) from None
        if self._closed:
            await self._quit(conn)
        else:
            self._idle.append(conn)

    async def send(self, message: RenderedDigest, envelope_from: str) -> Delivery:
        """Send one message; returns its Delivery (see the module docstring for the states)."""
        if self._closed:
            raise DeliveryError("the SMTP transport is closed")
        if envelope_from != self._sender_ok:
            problem = _address_problem(envelope_from, "sender")
            if problem:
                raise TransportSetupError(f"envelope sender {envelope_from!r}: {problem}")
            self._sender_ok = envelope_from
        problem = _address_problem(message.email, "recipient")
        if problem:
            return _delivery(message, "failed", _local_reply(553, "5.1.3", problem))
        payload, size = _data_payload(message.message)
        async with self._slots:
            for attempt in range(2):
                conn = self._pooled()
                pooled = conn is not None
                if conn is None:
                    try:
                        conn = await self._open()
                    except _Transient as exc:
                        return _delivery(message, "deferred", exc.reply)
                if attempt == 0 and self._limiter.limited:
                    await self._limiter.wait()
                try:
                    outcome = await self._transaction(conn, message, envelope_from, payload, size)
                except BaseException:
                    conn.smtp.close()  # cancelled mid-transaction: the connection is unusable
                    raise
                if (
                    outcome.keep
                    and conn.transactions < self.delivery.messages_per_connection
                    and not self._closed
                    and conn.alive
                ):
                    self._idle.append(conn)  # _checkin's usual case, without a coroutine
                else:
                    await self._checkin(conn, outcome.keep)
                if outcome.setup_error:
                    raise TransportSetupError(outcome.setup_error)
                if outcome.stale and pooled and attempt == 0:
                    log.info("smtp.stale_connection_replaced", server=self._where)
                    continue
                if self._debug:
                    log.debug(
                        "smtp.sent", email=message.email, state=outcome.state, reply=outcome.reply
                    )
                return _delivery(message, outcome.state, outcome.reply)
        raise AssertionError("unreachable")  # pragma: no cover

    # -------------------------------------------------------------- connections

    def _pooled(self) -> _Connection | None:
        """An idle connection that is still alive, if there is one."""
        while self._idle:
            conn = self._idle.pop()
            if conn.alive:
                return conn
            conn.smtp.close()
        return None

    async def _checkin(self, conn: _Connection, keep: bool) -> None:
        if not keep or not conn.alive:
            conn.smtp.close()
        elif conn.transactions >= self.delivery.messages_per_connection or self._closed:
            await self._quit(conn)
        else:
            self._idle.append(conn)

    async def _quit(self, conn: _Connection) -> None:
        """Say QUIT politely, but never wait long for it."""
        if conn.alive:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(min(self.settings.timeout, 5.0)):
                    await conn.smtp.quit()
        conn.smtp.close()

    async def _prepare(self) -> None:
        """Build the TLS context and read the password once, off the event loop."""
        async with self._prepare_lock:
            if self._prepared:
                return
            s = self.settings
            if s.security != "none":
                self._tls = await asyncio.to_thread(self._tls_context)
            if s.security == "none" and s.username:
                log.warning("smtp.password_without_tls", server=self._where, user=s.username)
            if s.username:
                password = await asyncio.to_thread(s.password)
                if password is None:
                    raise ConfigError(
                        "smtp.username is set but there is no password "
                        "(smtp.password_file, $DIGESTD_SMTP_PASSWORD or the "
                        "smtp-password credential)"
                    )
                self._password = password
            self._prepared = True

    def _tls_context(self) -> ssl.SSLContext:
        s = self.settings
        if not s.verify_certificates:
            log.warning("smtp.certificates_not_verified", server=self._where)
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            try:
                ctx = ssl.create_default_context(
                    cafile=str(s.ca_file) if s.ca_file is not None else None
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"smtp.ca_file: cannot load {s.ca_file}: {exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def _open(self) -> _Connection:
        """A new connection, greeted, TLS'd and logged in. Raises _Transient or setup errors."""
        import aiosmtplib

        await self._prepare()
        s = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            local_hostname=self._local_hostname,
            timeout=s.timeout,
            use_tls=s.security == "tls",
            start_tls=False,
            tls_context=self._tls,
            validate_certs=s.verify_certificates,
        )
        step = "connecting"
        try:
            async with asyncio.timeout(s.timeout):
                await smtp.connect()
                _install_reply_queue(smtp)
                step = "greeting"
                await _hello(smtp)
                if s.security == "starttls":
                    if not smtp.supports_extension("starttls"):
                        raise TransportSetupError(
                            f"SMTP {self._where} does not offer STARTTLS "
                            '(smtp.security = "starttls"; use "tls" for port 465)'
                        )
                    step = "STARTTLS"
                    await smtp.starttls()
                    await _hello(smtp)
                if s.username:
                    if not smtp.supports_extension("auth"):
                        raise TransportSetupError(
                            f"SMTP {self._where} does not offer AUTH (smtp.username is set)"
                        )
                    step = "login"
                    await self._login(smtp)
        except TransportSetupError:
            smtp.close()
            raise
        except Exception as exc:
            smtp.close()
            self._raise_setup(exc, step)
        except BaseException:
            smtp.close()
            raise
        conn = _Connection(smtp)
        log.debug(
            "smtp.connected",
            server=self._where,
            security=s.security,
            tls=smtp.get_transport_info("cipher") if s.security != "none" else None,
            extensions=sorted(smtp.esmtp_extensions),
        )
        return conn

    async def _login(self, smtp: aiosmtplib.SMTP) -> None:
        """AUTH with one mechanism (PLAIN, else LOGIN, else CRAM-MD5): a refused password is
        refused, and trying it again under another name only adds failed attempts."""
        user, password = self.settings.username, self._password or ""
        offered = smtp.server_auth_methods
        if "plain" in offered:
            await smtp.auth_plain(user, password)
        elif "login" in offered:
            await smtp.auth_login(user, password)
        elif "cram-md5" in offered:
            await smtp.auth_crammd5(user, password)
        else:
            raise TransportSetupError(
                f"SMTP {self._where} offers no AUTH mechanism digestd supports "
                f"(PLAIN, LOGIN, CRAM-MD5); it offers: {_one_line(' '.join(offered), 100)}"
            )

    def _raise_setup(self, exc: Exception, step: str) -> None:
        import aiosmtplib

        where = f"SMTP {self._where}"
        tls_error = _find_ssl_error(exc)
        if tls_error is not None:
            why = getattr(tls_error, "verify_message", None) or tls_error.reason or tls_error
            hint = ""
            if isinstance(tls_error, ssl.SSLCertVerificationError):
                hint = " (set smtp.ca_file to trust a private CA)"
            elif tls_error.reason == "WRONG_VERSION_NUMBER":
                hint = ' (the port speaks plain SMTP: use smtp.security = "starttls")'
            raise TransportSetupError(
                f"{where}: TLS failed during {step}: {_one_line(why)}{hint}"
            ) from None
        if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 0:
            reply = format_reply(exc.code, exc.message, "connect")
            if isinstance(exc, aiosmtplib.SMTPAuthenticationError) and exc.code >= 500:
                raise TransportSetupError(
                    f"{where}: login as {self.settings.username!r} refused: {reply}"
                ) from None
            if exc.code >= 500:
                raise TransportSetupError(f"{where}: {step} refused: {reply}") from None
            raise _Transient(
                format_reply(exc.code, f"{exc.message} (during {step})", "connect")
            ) from None
        if isinstance(exc, TimeoutError):
            text = f"timed out after {self.settings.timeout:g}s while {step}"
        elif isinstance(exc, (aiosmtplib.SMTPException, OSError)):
            text = f"{step} failed: {_os_reason(exc)}"
        else:
            raise TransportSetupError(f"{where}: {step} failed: {_one_line(exc)}") from exc
        raise _Transient(_local_reply(421, "4.4.1", text)) from None

    # -------------------------------------------------------------- transaction

    async def _transaction(
        self,
        conn: _Connection,
        message: RenderedDigest,
        envelope_from: str,
        payload: bytes,
        size: int,
    ) -> _Outcome:
        """One MAIL/RCPT/DATA/body exchange on ``conn``, classified.

        With PIPELINING (offered and enabled) MAIL, RCPT and DATA go out in one write (RFC
        2920) and each reply is then read in order: two round trips instead of four. Every
        reply is still checked on its own: the body goes out only after MAIL and RCPT were
        accepted *and* DATA got its 354; if DATA got a 354 anyway, a lone "." ends the empty
        transaction (RFC 2920 §3.1, see :meth:`_drain`). Without it, one command per round
        trip. Either way one write per step and one deadline for the whole transaction.
        """
        import aiosmtplib

        smtp = conn.smtp
        conn.transactions += 1
        recipient = message.email
        mail = self._mail_command(conn, envelope_from, recipient, size, payload.isascii())
        if isinstance(mail, _Outcome):
            return mail
        rcpt = b"RCPT TO:<" + _enc(recipient) + b">"
        pipe = conn.pipelining(self.settings.pipelining)
        phase: Phase = "mail"
        flushed = False  # the final "." has left this process (see _lost)
        draining: _Progress | None = None  # a large body still in the write buffer
        owed = 0  # replies of a refused pipelined group not read yet
        queue: _ReplyQueue | None = None
        try:
            protocol = smtp.protocol
            if not _is_reply_queue(protocol):
                raise aiosmtplib.SMTPServerDisconnected("Server not connected")
            queue = cast("_ReplyQueue", protocol)
            queue.arm(self.settings.timeout)
            replies = queue.replies
            if pipe is not None:
                queue.send(mail + b"\r\n" + rcpt + b"\r\nDATA\r\n", 3)
                reply = replies.popleft() if replies else await queue.waiter()
                if reply.code != 250:
                    owed = 2
                else:
                    phase = "rcpt"
                    reply = replies.popleft() if replies else await queue.waiter()
                    if reply.code not in (250, 251):
                        owed = 1
                    else:
                        phase = "data"
                        reply = replies.popleft() if replies else await queue.waiter()
            else:
                # As aiosmtplib's execute_command would: one command, one reply.
                _command(smtp, queue, mail)
                reply = replies.popleft() if replies else await queue.waiter()
                if reply.code == 250:
                    phase = "rcpt"
                    _command(smtp, queue, rcpt)
                    reply = replies.popleft() if replies else await queue.waiter()
                    if reply.code in (250, 251):
                        phase = "data"
                        _command(smtp, queue, b"DATA")
                        reply = replies.popleft() if replies else await queue.waiter()
            if phase == "data" and reply.code == 354:
                phase = "body"
                transport: asyncio.WriteTransport = queue.transport  # type: ignore[assignment]
                if smtp.protocol is None or transport is None or transport.is_closing():
                    raise aiosmtplib.SMTPServerDisconnected("Connection lost")
                transport.write(payload)
                if transport.get_write_buffer_size() == 0:
                    # The usual case: everything is in the kernel already; wait for the reply.
                    flushed = True
                    reply = replies.popleft() if replies else await queue.waiter()
                else:
                    draining = _Progress()
                    reply = await _body_reply(queue, transport, draining)
                phase = "end"
        except TimeoutError:
            smtp.close()
            why = f"no reply within {self.settings.timeout:g}s"
            return self._lost(phase, flushed or bool(draining and draining.flushed), why)
        except aiosmtplib.SMTPResponseException as exc:
            # A reply aiosmtplib could not parse (too long, not SMTP): the stream is unusable.
            smtp.close()
            why = f"invalid reply: {_one_line(exc.message, 120)}"
            return self._lost(phase, flushed or bool(draining and draining.flushed), why)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError, OSError) as exc:
            smtp.close()
            if phase == "mail":
                why = "connection was closed before the transaction started"
                return _Outcome("deferred", _local_reply(421, "4.4.2", why), False, stale=True)
            why = f"connection lost: {_one_line(exc, 120)}"
            return self._lost(phase, flushed or bool(draining and draining.flushed), why)
        finally:
            if queue is not None:
                queue.disarm()
        if phase != "end":
            if owed and pipe is not None:
                await self._drain(conn, pipe, owed, reply)
            return await self._refused(conn, reply, phase)
        code = reply.code
        if code == 421:
            smtp.close()
            return _Outcome(classify(code, reply.message), format_reply(code, reply.message), False)
        # keep: send() checks right away that the connection is still alive before reusing it.
        return _Outcome(classify(code, reply.message), format_reply(code, reply.message), True)

    def _mail_command(
        self, conn: _Connection, sender: str, recipient: str, size: int, seven_bit: bool
    ) -> bytes | _Outcome:
        """MAIL FROM with SIZE, SMTPUTF8, BODY=8BITMIME as the server offers them, or the
        outcome when the message cannot go to this server at all."""
        key = (sender, not (sender.isascii() and recipient.isascii()), seven_bit)
        plan = conn.mail_plans.get(key)
        if plan is None:
            plan = conn.mail_plans[key] = self._mail_plan(conn, *key)
        limit = plan.size_limit
        if limit is not None:
            if limit and size > limit:
                text = f"message is {size} bytes; the server takes at most {limit}"
                return _Outcome("failed", _local_reply(552, "5.3.4", text), True)
            if plan.refusal is None:
                return b"%s SIZE=%d%s" % (plan.head, size, plan.tail)
        if plan.refusal is not None:
            return _Outcome("failed", _local_reply(553, "5.6.7", plan.refusal), True)
        return plan.head + plan.tail

    @staticmethod
    def _mail_plan(conn: _Connection, sender: str, utf8: bool, seven_bit: bool) -> _MailPlan:
        size_ext = conn.extension("size")
        limit = None if size_ext is None else int(size_ext) if size_ext.isdigit() else 0
        tail = b""
        refusal = None
        if utf8:
            if conn.extension("smtputf8") is None:
                refusal = "the server does not offer SMTPUTF8, needed for this address"
            tail += b" SMTPUTF8"
        if not seven_bit and conn.extension("8bitmime") is not None:
            tail += b" BODY=8BITMIME"
        return _MailPlan(b"MAIL FROM:<" + _enc(sender) + b">", limit, tail, refusal)

    async def _refused(
        self, conn: _Connection, reply: aiosmtplib.SMTPResponse, phase: Phase
    ) -> _Outcome:
        """A refusal before the body: reset the transaction (or drop the connection on 421)."""
        text = format_reply(reply.code, reply.message, phase)
        state = classify(reply.code, reply.message)
        if state == "accepted" or state == "unknown":  # e.g. 354 to MAIL: out of step
            conn.smtp.close()
            return _Outcome("deferred", text, False)
        keep = reply.code != 421 and await self._rset(conn)
        if phase == "mail" and reply.code >= 500:
            status = _status(text)
            if reply.code == 552 or (status and status[1:] == (3, 4)):
                return _Outcome("failed", text, keep)  # this message is too big
            if reply.code == 503:
                conn.smtp.close()
                return _Outcome("deferred", text, False)
            return _Outcome(
                "failed", text, keep, setup_error=f"SMTP {self._where} refused the sender: {text}"
            )
        return _Outcome(state, text, keep)

    async def _drain(
        self,
        conn: _Connection,
        pipe: _ReplyQueue,
        count: int,
        refusal: aiosmtplib.SMTPResponse,
    ) -> None:
        """Read the ``count`` replies still owed after ``refusal`` in a pipelined group, so the
        connection stays in step. A 354 among them (DATA accepted although MAIL or RCPT was
        refused) gets a lone "." (RFC 2920 §3.1): no content is ever sent. A connection that
        cannot be brought back in step (421, lost, garbled, slow) is closed; the refusal
        stands either way."""
        if refusal.code == 421 or not conn.alive:
            conn.smtp.close()
            return
        try:
            async with asyncio.timeout(self.settings.timeout):
                for _ in range(count):
                    reply = await pipe.read_response()
                    if reply.code == 354:
                        pipe.expect(1)
                        pipe.write(b".\r\n")
                        await pipe.read_response()
        except Exception:
            conn.smtp.close()

    async def _rset(self, conn: _Connection) -> bool:
        """RSET after a refused transaction; False when the connection should be dropped."""
        if not conn.alive:
            return False
        try:
            async with asyncio.timeout(self.settings.timeout):
                reply = await conn.smtp.execute_command(b"RSET")
        except Exception:
            conn.smtp.close()
            return False
        return reply.code == 250

    def _lost(self, phase: Phase, flushed: bool, why: str) -> _Outcome:
        if phase == "end" or (phase == "body" and flushed):
            text = f"{why} after the message was sent; the server may have accepted it"
            return _Outcome("unknown", _local_reply(451, "4.4.2", text), False)
        text = f"{why} ({_PHASE_TEXT[phase]}); the message was not sent"
        return _Outcome("deferred", _local_reply(451, "4.4.2", text), False)


_PHASE_TEXT: dict[Phase, str] = {
    "connect": "while connecting",
    "mail": "after MAIL FROM",
    "rcpt": "after RCPT TO",
    "data": "after DATA",
    "body": "while sending the message",
    "end": "after the message",
}


def _enc(address: str) -> bytes:
    return address.encode("ascii") if address.isascii() else address.encode("utf-8")


async def _hello(smtp: aiosmtplib.SMTP) -> None:
    import aiosmtplib

    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not smtp.is_connected:
            raise
        await smtp.helo()


class _Progress:
    """How far the body got: ``flushed`` once the final "." has left this process."""

    flushed = False


def _command(smtp: aiosmtplib.SMTP, queue: _ReplyQueue, command: bytes) -> None:
    """Write one command asking for one reply, with aiosmtplib's checks: a client it has
    closed (lost connection, 421) is "not connected", a closing transport "lost"."""
    if smtp.protocol is None:
        import aiosmtplib

        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    queue.send(command + b"\r\n", 1)


async def _body_reply(
    queue: _ReplyQueue, writer: asyncio.WriteTransport, progress: _Progress
) -> aiosmtplib.SMTPResponse:
    """The reply to a body that is still draining from the write buffer.

    The reply is read concurrently (a server may refuse early) while watching whether the
    final "." gets out before the connection goes away: ``progress.flushed`` turns true
    once the whole payload has been handed to the kernel. A connection lost after that may
    have delivered the message ("unknown"), one lost before it cannot have ("deferred").
    """
    reply = asyncio.ensure_future(queue.read_response())
    try:
        while not reply.done():
            await asyncio.wait({reply}, timeout=_FLUSH_POLL)
            if reply.done() or not queue.is_connected:
                break
            if writer.get_write_buffer_size() == 0:
                progress.flushed = True
                break
        response = await reply
    finally:
        if not reply.done():
            reply.cancel()
    progress.flushed = True  # the server answered the body
    return response


def _find_ssl_error(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _os_reason(exc: BaseException) -> str:
    """``Connection refused`` rather than aiosmtplib's wrapping of it."""
    current: BaseException | None = exc
    for _ in range(5):
        if current is None:
            break
        if isinstance(current, OSError) and current.errno:
            return os.strerror(current.errno)
        current = current.__cause__ or current.__context__
    return _one_line(exc, 200)


def _debug_logging() -> bool:
    """Whether ``log.debug`` emits anything: checked once per transport, as a filtered
    structlog call still costs ~2 µs per message."""
    is_enabled_for = getattr(log.bind(), "is_enabled_for", None)
    return is_enabled_for is None or bool(is_enabled_for(logging.DEBUG))


def _local_hostname() -> str:
    name = socket.gethostname()
    return (
        name
        if re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,250}[A-Za-z0-9])?", name)
        else ("localhost")
    )


# ---------------------------------------------------------------------------- Maildir

_counter = itertools.count()
_SAFE_NAME = re.compile(r"[^A-Za-z0-9@._+-]")


class MaildirTransport:
    """Deliver into a Maildir (``tmp/`` → ``new/``), optionally with ``.html`` copies."""

    def __init__(self, path: Path, write_html_copy: bool = False) -> None:
        self.path = Path(path)
        self.write_html_copy = write_html_copy
        self._ready = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    @property
    def html_dir(self) -> Path:
        return self.path / "html"

    async def check(self) -> None:
        """Create the Maildir (mode 0700) and check it is writable."""
        try:
            await asyncio.to_thread(self._prepare, True)
        except OSError as exc:
            raise TransportSetupError(
                f"maildir {self.path}: {exc.strerror or exc} (delivery.maildir)"
            ) from None

    async def send(self, message: RenderedDigest, envelope_from: str) -> Delivery:
        """Write the message to ``new/``; ``accepted`` once it is there (and fsync'd)."""
        try:
            name = await asyncio.to_thread(self._deliver, message)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR):
                raise TransportSetupError(
                    f"maildir {self.path}: {exc.strerror or exc} (delivery.maildir)"
                ) from None
            text = f"cannot write to the maildir: {exc.strerror or exc}"
            return _delivery(message, "deferred", _local_reply(451, "4.3.0", text))
        return _delivery(
            message, "accepted", _local_reply(250, "2.0.0", f"delivered as new/{name}")
        )

    # ------------------------------------------------------------ in a worker thread

    def _prepare(self, probe: bool = False) -> None:
        if self._ready and not probe:
            return
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.write_html_copy:
            self.html_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if probe:
            name = self._unique_name()
            fd = os.open(self.path / "tmp" / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(self.path / "tmp" / name)
        self._ready = True

    @staticmethod
    def _unique_name() -> str:
        now = time.time()
        host = socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"
        return (
            f"{int(now)}.M{int(now % 1 * 1_000_000)}P{os.getpid()}"
            f"Q{next(_counter)}R{secrets.token_hex(8)}.{host}"
        )

    def _deliver(self, message: RenderedDigest) -> str:
        self._prepare()
        # Maildir files hold the message with local (LF) line endings.
        data = message_bytes(message.message).replace(b"\r\n", b"\n")
        for _ in range(5):
            name = self._unique_name()
            tmp = self.path / "tmp" / name
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            os.close(fd)
            try:
                _publish(tmp, self.path / "new" / name)
            except FileExistsError:
                os.unlink(tmp)
                continue
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(self.path / "new")
            if self.write_html_copy:
                self._write_html(message)
            return name
        raise OSError(errno.EEXIST, "could not find a unique file name")

    def _write_html(self, message: RenderedDigest) -> None:
        safe = _SAFE_NAME.sub("_", message.email)[:200]
        target = self.html_dir / f"{message.date.isoformat()}_{safe}.html"
        tmp = self.html_dir / f".{target.name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, message.html.encode("utf-8"))
        finally:
            os.close(fd)
        os.replace(tmp, target)

    def html_copy_path(self, email: str, date: dt.date) -> Path:
        """Where the ``.html`` copy of ``email``'s digest for ``date`` is written."""
        return self.html_dir / f"{date.isoformat()}_{_SAFE_NAME.sub('_', email)[:200]}.html"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _publish(tmp: Path, new: Path) -> None:
    """Move ``tmp`` to ``new`` without ever overwriting (link + unlink; rename as fallback)."""
    try:
        os.link(tmp, new)
    except FileExistsError:
        raise
    except OSError:
        if new.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(new)) from None
        os.rename(tmp, new)
        return
    os.unlink(tmp)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
