"""The DATA payload of a message (digestd.deliver: ``wire_checked`` / ``_data_payload``).

The fast path (CR/LF pairing checked by two translations, dot-stuffing by one split/join)
must give exactly the bytes of the straightforward version kept here as the reference, for
any input: lone CR, lone LF, LF CR, leading dots, ``.`` lines, huge lines, empty input.
"""

from __future__ import annotations

import dataclasses
import pickle
import random
import re

import pytest
from smtpserver import SmtpServer, digest_message

from digestd.compose import DataPayload, as_data_payload, message_bytes, message_size
from digestd.config import DeliveryConfig, SmtpConfig
from digestd.deliver import SmtpTransport, _data_payload, wire_checked

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def reference_payload(message: bytes) -> tuple[bytes, int]:
    """The payload and RFC 1870 size as computed before the fast path (kept verbatim)."""
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = _BARE.sub(b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    stuffed = message.replace(b"\n.", b"\n..") if b"\n." in message else message
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n", len(message)


def reference_clean(message: bytes) -> bool:
    """Whether the message has CRLF line ends only (no bare CR, no bare LF)."""
    crlf = message.count(b"\r\n")
    return message.count(b"\n") == crlf and message.count(b"\r") == crlf


HOSTILE = [
    b"",
    b".",
    b"\r",
    b"\n",
    b"\r\n",
    b"\n\r",
    b"\r\r\n\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"a\r\n.\r\nb\r\n",
    b"..\r\n...\r\n.x",
    b"a\rb\r\n",
    b"a\nb\r\n",
    b"a\r\nb\r",
    b"\nstarts with LF\r\n",
    b"ends with CR\r\n\r",
    b"lone\r\n.\rdot\r\n",
    b".\n.\n.\n",
    b"\r.\r.\r.",
    b"x" * 100_000,  # one huge line, no line end
    (b"y" * 70_000 + b"\r\n") * 3 + b".\r\n" * 1000,
    b"\r\n" * 50_000,
    b"\r\n." * 20_000,
    b"\x00\r\n\xff.\r\n\x0d\x0a.",
]


def fuzz_inputs(count: int = 2000) -> list[bytes]:
    """Seeded random messages over the bytes that matter (CR, LF, dot) and one other."""
    rng = random.Random(1870)
    alphabet = [b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n."]
    return [b"".join(rng.choices(alphabet, k=rng.randrange(0, 40))) for _ in range(count)]


@pytest.mark.parametrize("message", HOSTILE, ids=range(len(HOSTILE)))
def test_payload_matches_reference_on_hostile_inputs(message: bytes) -> None:
    """_data_payload gives the reference bytes and size for every hostile input."""
    assert _data_payload(message) == reference_payload(message)


def test_payload_matches_reference_on_random_inputs() -> None:
    """_data_payload gives the reference bytes and size for 2,000 random CR/LF/dot mixes."""
    for message in fuzz_inputs():
        assert _data_payload(message) == reference_payload(message), message


def test_wire_checked_matches_reference_on_all_inputs() -> None:
    """wire_checked keeps every message's bytes; it marks exactly the CRLF-clean ones, and a
    marked message (also after pickling) yields the reference payload and size."""
    for message in [*HOSTILE, *fuzz_inputs()]:
        checked = wire_checked(message)
        assert checked == message
        if not reference_clean(message):
            assert checked is message and type(checked) is bytes, message
            continue
        assert type(checked) is not bytes, message
        for marked in (checked, pickle.loads(pickle.dumps(checked))):
            assert _data_payload(marked) == reference_payload(message), message


def test_data_payload_form_gives_back_the_message_on_all_inputs() -> None:
    """The form the render workers hand to the SMTP sender: for every message that
    wire_checked marks, as_data_payload gives the reference payload and size; that form
    survives pickling (as itself: no scan on arrival), the transport and wire_checked take
    it as it is, and message_bytes / message_size give back the message as sent and its
    size.
    Anything else passes through unchanged."""
    for message in [*HOSTILE, *fuzz_inputs()]:
        checked = wire_checked(message)
        form = as_data_payload(checked)
        if type(checked) is bytes:
            assert form is checked, message
            continue
        payload, size = reference_payload(message)
        for item in (form, pickle.loads(pickle.dumps(form))):
            assert type(item) is DataPayload, message
            assert bytes(item) == payload and item.size == size, message
            assert _data_payload(item) == (payload, size), message
            assert wire_checked(item) is item, message
            # the message as sent: a missing final CRLF is added (RFC 5321 §4.1.1.4)
            sent = message if message.endswith(b"\r\n") else message + b"\r\n"
            assert message_bytes(item) == sent and message_size(item) == size == len(sent)
    plain = b"Subject: x\r\n\r\nbody\r\n"
    assert message_bytes(plain) is plain and message_size(plain) == len(plain)


def test_wire_checked_attaches_a_payload_only_when_it_differs() -> None:
    """A clean message without dot lines carries no second copy; one with them does."""
    plain = digest_message(text="Today's papers:\n").message
    dotted = digest_message().message
    assert getattr(wire_checked(plain), "payload", "absent") is None
    assert getattr(wire_checked(dotted), "payload", None) == reference_payload(dotted)[0]


def test_rendered_message_payload_matches_reference() -> None:
    """A real 30 KB rendered message (with QP soft line breaks) gets the reference payload."""
    for padding in (0, 30_000):
        message = digest_message(padding=padding).message
        assert _data_payload(wire_checked(message)) == reference_payload(message)


async def test_dot_lines_arrive_intact_over_smtp() -> None:
    """Messages full of "." lines, "..", and a leading dot are received byte for byte, sent
    as messages and as DATA payloads."""
    bodies = [
        b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\nend\r\n",
        b".leading: dot\r\n\r\n" + b".\r\n" * 500,
        b"Subject: huge\r\n\r\n" + (b"z" * 900 + b"\r\n.") * 200 + b"\r\n",
    ]
    messages = [
        dataclasses.replace(digest_message(subscriber_id=i), message=form(wire_checked(body)))
        for form in (lambda m: m, as_data_payload)  # as rendered; as the workers hand it on
        for i, body in enumerate(bodies)
    ]
    with SmtpServer() as server:
        smtp = SmtpConfig(host="127.0.0.1", port=server.port, security="none", timeout=5)
        async with SmtpTransport(smtp, DeliveryConfig()) as sender:
            for message in messages:
                result = await sender.send(message, "bounces@example.org")
                assert result.state == "accepted", result.reply
        assert [r.data for r in server.received] == bodies * 2


def _niceness_after_worker_start(parent: int) -> int:
    """In a fresh process: run the render workers' initializer (without an engine) and
    return the niceness it leaves the process at."""
    import os

    from digestd import pipeline

    pipeline.Engine = lambda *args, **kwargs: None  # type: ignore[assignment,misc]
    pipeline._worker_start(None, None, None, False, parent)  # type: ignore[arg-type]
    return os.nice(0)


def test_render_workers_yield_the_cpu_to_the_main_process() -> None:
    """A render worker runs at a higher niceness than the process that started it, so the
    event loop and the SQLite thread win the CPU when both cores are busy."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        niceness = pool.submit(_niceness_after_worker_start, os.getpid()).result(timeout=60)
    from digestd.pipeline import WORKER_NICE

    assert niceness == min(19, os.nice(0) + WORKER_NICE)
