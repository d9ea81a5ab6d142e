"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, recording everything, injecting faults.

In-process (its own event loop in a thread)::

    with SmtpServer() as server:                       # plain SMTP on an ephemeral port
        ... send to 127.0.0.1:server.port ...
        server.received[0].data                        # the exact bytes of the message
        server.sessions, server.max_concurrent         # connections seen, most at once

    SmtpServer(security="starttls", cert=make_cert(tmp_path))   # or "tls" (implicit TLS)
    SmtpServer(auth=("user", "secret"))                # AUTH PLAIN/LOGIN (also without TLS)

Scripted faults, consumed one per transaction that involves the address::

    server.script("bob@example.org", Fault("rcpt", "451 4.3.0 try later"))   # then success
    server.script("bob@example.org", Fault("data_cmd", drop=True))           # close on DATA
    server.script("sender@example.org", Fault("mail", delay=2.0))            # slow MAIL reply

Stages: ``mail`` (keyed by the sender), ``rcpt``, ``data_cmd`` (the DATA command, before
354), ``body`` (after 354: read ``after_bytes`` of the body, then act), ``data`` (after the
final ".", instead of the 250). A ``421`` reply also closes the connection, as real servers
do. ``reply`` may be ``bytes`` for hostile replies (huge lines, non-UTF-8).

As a process (for crash tests): ``python tests/smtpserver.py --port 0 --log FILE
[--delay 0.01]`` prints ``READY <port>`` and appends one JSON line per accepted message
(``{"rcpt": [...], "message_id": ..., "bytes": N, "session": S}``), flushed at once.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import email.policy
import email.utils
import json
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from digestd.models import RenderedDigest

Stage = Literal["mail", "rcpt", "data_cmd", "body", "data"]
Security = Literal["none", "starttls", "tls"]


@dataclass(frozen=True)
class Fault:
    """What the server does instead of the normal reply at one stage of one transaction."""

    stage: Stage
    reply: str | bytes | None = None  # None: the normal reply (after any delay)
    delay: float = 0.0  # seconds to wait before acting
    drop: bool = False  # close the connection without replying
    after_bytes: int = 0  # stage "body": read this much of the body before acting


@dataclass(frozen=True)
class Received:
    """One message the server accepted."""

    session: int
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # exactly as received (dot-unstuffed, CRLF line endings)
    mail_options: tuple[str, ...]
    tls: bool
    login: str | None
    at: float  # time.monotonic() when the end of data arrived


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def make_cert(directory: Path, name: str = "server") -> CertFiles:
    """A self-signed certificate for 127.0.0.1 / localhost, made with the openssl CLI."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return CertFiles(cert, key)


def digest_message(
    to: str = "ada@example.org",
    *,
    subscriber_id: int = 1,
    text: str = "Today's papers:\n\n.A line that starts with a dot\n..and two\n",
    html: str = "<p>Today's papers</p>",
    padding: int = 0,
    eight_bit: bool = False,
    date: dt.date = dt.date(2025, 11, 24),
) -> RenderedDigest:
    """A small multipart/alternative RenderedDigest built with the stdlib (CRLF bytes).

    ``padding`` adds that many bytes of text (72-character lines); ``eight_bit`` sends the
    text part as raw UTF-8 (``Content-Transfer-Encoding: 8bit``).
    """
    msg = EmailMessage()
    msg["From"] = "Digest <digest@example.org>"
    msg["To"] = to
    msg["Subject"] = f"Your papers for {date.isoformat()}"
    msg["Date"] = email.utils.format_datetime(dt.datetime(2025, 11, 24, 7, 0, tzinfo=dt.UTC))
    message_id = email.utils.make_msgid(domain="example.org")
    msg["Message-ID"] = message_id
    if padding:
        line = "x" * 71 + "\n"
        text += line * (padding // len(line) + 1)
    if eight_bit:
        text += "Zoë, naïve café — ünïcödé\n"
        msg.set_content(text, cte="8bit")
    else:
        msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    return RenderedDigest(
        subscriber_id=subscriber_id,
        email=to,
        date=date,
        message_id=message_id,
        subject=str(msg["Subject"]),
        html=html,
        text=text,
        message=msg.as_bytes(policy=email.policy.SMTP),
        paper_ids=("2511.04570",),
    )


def _server_tls(cert: CertFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


class _Handler:
    """aiosmtpd hooks: apply scripted faults, record accepted messages."""

    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_EHLO(
        self, smtp: _FaultSMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        hidden = {ext.upper() for ext in self.server.hide_extensions}
        kept = [r for r in responses if r[4:].split(" ")[0].upper() not in hidden]
        extra = [f"250-{ext}" for ext in self.server.extra_extensions]
        return kept[:-1] + extra + kept[-1:]

    async def handle_MAIL(
        self, smtp: _FaultSMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str | bytes:
        self.server._note("MAIL", smtp)
        fault = self.server._take(address, ("mail",))
        status = await smtp.apply(fault)
        if status is not None:
            return status
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, smtp: _FaultSMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str | bytes:
        self.server._note("RCPT", smtp)
        fault = self.server._take(address, ("rcpt", "data_cmd", "body", "data"))
        if fault is not None and fault.stage != "rcpt":
            smtp.pending_fault = fault
            fault = None
        status = await smtp.apply(fault)
        if status is not None:
            return status
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, smtp: _FaultSMTP, session: Any, envelope: Any) -> str | bytes:
        fault, smtp.pending_fault = smtp.pending_fault, None
        if fault is not None and fault.stage == "data":
            status = await smtp.apply(fault)
            if status is not None:
                return status
        data = envelope.original_content or b""
        if self.server.data_delay:
            await asyncio.sleep(self.server.data_delay)
        number = self.server._record(
            Received(
                session=smtp.number,
                mail_from=envelope.mail_from,
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=data,
                mail_options=tuple(envelope.mail_options),
                tls=self.server.security == "tls" or session.ssl is not None,
                login=_login_name(session),
                at=time.monotonic(),
            )
        )
        return f"250 2.0.0 OK queued as Q{number}"

    async def handle_QUIT(self, smtp: _FaultSMTP, session: Any, envelope: Any) -> str:
        self.server._note("QUIT", smtp)
        return "221 2.0.0 Bye"

    async def handle_RSET(self, smtp: _FaultSMTP, session: Any, envelope: Any) -> str:
        self.server._note("RSET", smtp)
        smtp.pending_fault = None
        if self.server.rset_delay:
            await asyncio.sleep(self.server.rset_delay)
        return "250 2.0.0 OK"


def _login_name(session: Any) -> str | None:
    data = getattr(session, "auth_data", None)
    if isinstance(data, LoginPassword):
        return data.login.decode("utf-8", "replace")
    return None


class _FaultSMTP(SMTP):  # type: ignore[misc]
    """aiosmtpd's SMTP with session counting and faults at the DATA command and in the body."""

    def __init__(self, server: SmtpServer, **kwargs: Any) -> None:
        super().__init__(_Handler(server), **kwargs)
        self.server = server
        self.number = 0
        self.pending_fault: Fault | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None and not self._counted:  # not the STARTTLS re-entry
            self._counted = True
            self.number = self.server._session_started(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.server._session_ended(self)
        super().connection_lost(error)

    async def apply(self, fault: Fault | None) -> str | bytes | None:
        """Act out ``fault``; the reply to send instead of the normal one, or None."""
        if fault is None:
            return None
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.drop:
            await self.hang_up()
        if fault.reply is not None:
            reply = fault.reply
            text = reply if isinstance(reply, bytes) else reply.encode()
            if text.startswith(b"421"):
                await self.push(reply)
                await self.hang_up()
            return reply
        return None

    async def hang_up(self) -> None:
        """Close the connection and never return (the session task is cancelled)."""
        if self.transport is not None:
            self.transport.close()
        await asyncio.Event().wait()

    async def smtp_DATA(self, arg: str) -> None:
        fault = self.pending_fault
        if fault is not None and fault.stage == "data_cmd":
            self.pending_fault = None
            status = await self.apply(fault)
            if status is not None:
                await self.push(status)
                return
        elif fault is not None and fault.stage == "body" and self.envelope.rcpt_tos:
            self.pending_fault = None
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            if fault.after_bytes:
                await self._reader.readexactly(fault.after_bytes)
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.reply is not None:
                await self.push(fault.reply)
            # Abort (RST) so unread body bytes are not drained first.
            if self.transport is not None:
                self.transport.abort()
            await asyncio.Event().wait()
        await super().smtp_DATA(arg)


class SmtpServer:
    """aiosmtpd on 127.0.0.1 (ephemeral port) in a thread; see the module docstring."""

    def __init__(
        self,
        *,
        security: Security = "none",
        cert: CertFiles | None = None,
        auth: tuple[str, str] | None = None,
        auth_required: bool = False,
        data_size_limit: int | None = 33_554_432,
        data_delay: float = 0.0,
        smtputf8: bool = True,
        hide_extensions: tuple[str, ...] = (),
        extra_extensions: tuple[str, ...] = (),
        port: int = 0,
        on_message: Callable[[Received, bytes], None] | None = None,
    ) -> None:
        if security != "none" and cert is None:
            raise ValueError("a TLS server needs cert=make_cert(tmp_path)")
        self.security = security
        self.cert = cert
        self.auth = auth
        self.auth_required = auth_required
        self.data_size_limit = data_size_limit
        self.data_delay = data_delay
        self.smtputf8 = smtputf8
        self.hide_extensions = hide_extensions
        self.extra_extensions = extra_extensions
        self.host = "127.0.0.1"
        self.port = port
        self.on_message = on_message
        self.rset_delay = 0.0  # seconds before answering RSET

        self.received: list[Received] = []
        self.sessions = 0
        self.active = 0
        self.max_concurrent = 0
        self.commands: collections.Counter[str] = collections.Counter()
        self.mail_times: list[float] = []
        self.auth_attempts: list[tuple[str, bool]] = []
        self._live: set[_FaultSMTP] = set()
        self._scripts: dict[str, collections.deque[Fault | None]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> SmtpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(
                        self._factory,
                        host=self.host,
                        port=self.port,
                        ssl=_server_tls(self.cert)
                        if self.security == "tls" and self.cert
                        else None,
                    )
                )
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                return
            self.port = self._server.sockets[0].getsockname()[1]
            loop.call_soon(ready.set)
            loop.run_forever()
            self._server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(asyncio.sleep(0.01))  # let aborted transports finish
            loop.close()

        self._thread = threading.Thread(target=run, name="smtpserver", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("SMTP test server did not start")
        if failure:
            raise failure[0]

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._close_all_and_stop)
        self._thread.join(10)
        self._thread = None
        self._loop = None

    def _close_all_and_stop(self) -> None:
        for smtp in list(self._live):
            if smtp.transport is not None:
                smtp.transport.abort()
        assert self._loop is not None
        self._loop.stop()

    def _factory(self) -> _FaultSMTP:
        kwargs: dict[str, Any] = {
            "hostname": "smtp.test",
            "ident": "digestd test server",
            "data_size_limit": self.data_size_limit,
            "enable_SMTPUTF8": self.smtputf8,
            "timeout": 60,
            "loop": self._loop,
        }
        if self.security == "starttls" and self.cert is not None:
            kwargs["tls_context"] = _server_tls(self.cert)
            kwargs["require_starttls"] = True
        if self.auth is not None:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_require_tls"] = self.security == "starttls"
            kwargs["auth_required"] = self.auth_required
        return _FaultSMTP(self, **kwargs)

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            self.auth is not None
            and isinstance(data, LoginPassword)
            and data.login == self.auth[0].encode()
            and data.password == self.auth[1].encode()
        )
        login = data.login.decode("utf-8", "replace") if isinstance(data, LoginPassword) else "?"
        with self._lock:
            self.auth_attempts.append((login, ok))
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    # ------------------------------------------------------------------ scripting

    def script(self, address: str, *faults: Fault | None) -> None:
        """Queue faults for the next transactions with ``address`` (None: a normal one)."""
        with self._lock:
            self._scripts.setdefault(address.lower(), collections.deque()).extend(faults)

    def drop_sessions(self) -> int:
        """Close every open connection from the server side; returns how many."""
        assert self._loop is not None

        async def close_all() -> int:
            live = list(self._live)
            for smtp in live:
                if smtp.transport is not None:
                    smtp.transport.close()
            return len(live)

        return asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(10)

    def messages_to(self, address: str) -> list[Received]:
        return [r for r in self.received if address in r.rcpt_tos]

    # ------------------------------------------------------------------ from the server thread

    def _take(self, address: str, stages: tuple[Stage, ...]) -> Fault | None:
        with self._lock:
            queue = self._scripts.get(address.lower())
            if not queue:
                return None
            head = queue[0]
            if head is not None and head.stage not in stages:
                return None
            queue.popleft()
            return head

    def _note(self, command: str, smtp: _FaultSMTP) -> None:
        with self._lock:
            self.commands[command] += 1
            if command == "MAIL":
                self.mail_times.append(time.monotonic())

    def _record(self, received: Received) -> int:
        with self._lock:
            self.received.append(received)
            number = len(self.received)
        if self.on_message is not None:
            self.on_message(received, received.data)
        return number

    def _session_started(self, smtp: _FaultSMTP) -> int:
        with self._lock:
            self.sessions += 1
            self.active += 1
            self.max_concurrent = max(self.max_concurrent, self.active)
            self._live.add(smtp)
            return self.sessions

    def _session_ended(self, smtp: _FaultSMTP) -> None:
        with self._lock:
            self.active -= 1
            self._live.discard(smtp)


# ---------------------------------------------------------------------- as a process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="digestd's recording SMTP test server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", type=Path, required=True, help="JSON line per accepted message")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each 250")
    args = parser.parse_args(argv)
    log_file = args.log.open("a", buffering=1, encoding="utf-8")
    parse = BytesHeaderParser().parsebytes

    def on_message(received: Received, data: bytes) -> None:
        headers = parse(data)
        line = {
            "rcpt": list(received.rcpt_tos),
            "message_id": headers.get("Message-ID", ""),
            "bytes": len(data),
            "session": received.session,
        }
        log_file.write(json.dumps(line) + "\n")
        log_file.flush()

    server = SmtpServer(port=args.port, data_delay=args.delay, on_message=on_message)
    server.start()
    print(f"READY {server.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()
    log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
