"""Benchmark: SmtpTransport alone against Postfix's smtp-sink, next to smtp-source.

Usage::

    .venv/bin/python bench/transport.py [--n 20000] [--sessions 20] [--size 28000]
                                        [--repeat 3] [--no-pipelining]

Builds one ~28 KB quoted-printable message (lines starting with "." included, so it needs
dot-stuffing), passes it through ``deliver.wire_checked`` and ``compose.as_data_payload``
as the render workers do (the sender gets the DATA payload), and makes N RenderedDigest of
it for N different recipients. Then ``--sessions`` asyncio tasks share one ``SmtpTransport``
(``delivery.concurrency`` = sessions, connections reused for the whole
run, PIPELINING as smtp-sink offers it unless ``--no-pipelining``) and send them all to
``smtp-sink`` on 127.0.0.1. Logging is configured as the daemon does (level info).

Printed for each run and as medians: messages per second and this process's CPU (user +
system, ``os.times``) per message while sending; then ``smtp-source -d`` sending the same
count of the same size over the same number of sessions to the same sink: the reference for
what the wire and the sink take here.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from delivery import SMTP_SINK, SMTP_SOURCE, SOURCE_HEADER_BYTES, free_port, smtp_sink  # noqa: E402

from digestd import logs  # noqa: E402
from digestd.compose import as_data_payload  # noqa: E402
from digestd.config import DeliveryConfig, SmtpConfig  # noqa: E402
from digestd.deliver import SmtpTransport, wire_checked  # noqa: E402
from digestd.models import RenderedDigest  # noqa: E402

SENDER = "papers@example.org"
DATE = dt.date(2026, 11, 23)


def message_bytes(size: int) -> bytes:
    """A MIME message of about ``size`` bytes: headers and a quoted-printable body of 76-
    character lines with soft breaks, every 9th line starting with "." (needs stuffing)."""
    head = (
        "From: Daily Papers <papers@example.org>\r\n"
        "To: reader@example.org\r\n"
        "Subject: Your papers for 2026-11-23\r\n"
        "Date: Mon, 23 Nov 2026 06:00:00 +0000\r\n"
        "Message-ID: <bench.1@example.org>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    ).encode("ascii")
    lines = []
    i = 0
    while len(head) + sum(len(line) for line in lines) < size:
        text = f"{i:05d} attention is all you need =E2=80=94 sparse mixture of experts, again"
        lines.append(("." if i % 9 == 0 else "") + text[:74] + "=\r\n")
        i += 1
    return head + "".join(lines).encode("ascii") + b"\r\n"


async def send_all(
    port: int, messages: list[RenderedDigest], sessions: int, pipelining: bool
) -> tuple[float, float, float, Counter[str]]:
    """Wall seconds, user and system CPU seconds and the delivery states of sending."""
    smtp = SmtpConfig(
        host="127.0.0.1", port=port, security="none", timeout=30, pipelining=pipelining
    )
    delivery = DeliveryConfig(concurrency=sessions, messages_per_connection=1_000_000)
    states: Counter[str] = Counter()
    queue = iter(messages)

    async def sender(transport: SmtpTransport) -> None:
        for message in queue:
            result = await transport.send(message, SENDER)
            states[result.state] += 1

    async with SmtpTransport(smtp, delivery) as transport:
        await transport.check()
        times0, start = os.times(), time.perf_counter()
        await asyncio.gather(*(sender(transport) for _ in range(sessions)))
        wall, times1 = time.perf_counter() - start, os.times()
    return wall, times1.user - times0.user, times1.system - times0.system, states


def smtp_source(port: int, messages: int, sessions: int, size: int) -> float:
    """smtp-source's messages per second for the same count, size and sessions."""
    cmd = [SMTP_SOURCE, "-d", "-s", str(sessions), "-m", str(messages)]
    cmd += ["-l", str(max(size - SOURCE_HEADER_BYTES, 100)), "-N"]
    cmd += ["-f", SENDER, "-t", "reader@example.org", f"127.0.0.1:{port}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return messages / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=28_000)
    parser.add_argument("--no-pipelining", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="runs; medians are printed")
    parser.add_argument("--no-source", action="store_true", help="skip the smtp-source run")
    args = parser.parse_args(argv)
    for tool in (SMTP_SINK, SMTP_SOURCE):
        if not Path(tool).exists():
            raise SystemExit(f"{tool} is missing: apt-get install postfix")
    logs.configure(json=True, level="info")

    body = as_data_payload(wire_checked(message_bytes(args.size)))
    messages = [
        RenderedDigest(i, f"reader{i}@example.org", DATE, f"<m{i}@example.org>", "", "", "",
                       body, ("2611.00001",))
        for i in range(args.n)
    ]  # fmt: skip
    port = free_port()
    pipelining = not args.no_pipelining
    print(
        f"SmtpTransport: {args.n:,} msgs of {len(body):,} B, {args.sessions} sessions,"
        f" pipelining {'off' if args.no_pipelining else 'on'}, {args.repeat} run(s)"
    )
    with smtp_sink(port):
        runs = []
        for _ in range(args.repeat):
            wall, user, system, states = asyncio.run(
                send_all(port, messages, args.sessions, pipelining)
            )
            runs.append((args.n / wall, (user + system) * 1e6 / args.n))
            print(
                f"  {runs[-1][0]:8.0f} msgs/s  {runs[-1][1]:6.1f} µs CPU/msg"
                f" (user {user * 1e6 / args.n:.1f}, system {system * 1e6 / args.n:.1f})"
                f"  {dict(states)}"
            )
        rate = statistics.median(rate for rate, _ in runs)
        cpu = statistics.median(cpu for _, cpu in runs)
        print(f"  median {rate:8.0f} msgs/s  {cpu:6.1f} µs CPU/msg")
        if not args.no_source:
            source = smtp_source(port, args.n, args.sessions, len(body))
            print(f"  smtp-source {source:8.0f} msgs/s   ratio {rate / source:.2f}×")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
