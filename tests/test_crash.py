"""Crash test: the daemon sending a few thousand digests to a slow SMTP sink is SIGKILLed at
random moments and restarted until done.

Asserted: no recipient is missed; every duplicate is a message that was *in flight* at a kill
(handed to the server during that trial, its reply never committed: ledger still "sending");
at most ``delivery.concurrency`` such messages per kill. The figures are printed for the
report (run with ``-s`` to see them).

Knobs (environment): DIGESTD_CRASH_SEED, DIGESTD_CRASH_TRIALS, DIGESTD_CRASH_SUBSCRIBERS.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest
from test_daemon_support import (
    ROOT,
    clean_env,
    ledger,
    past_send_zone,
    runs,
    spawn,
    stop_process,
    wait_until,
    write_config,
)

from digestd.models import Preferences
from digestd.store import Store

SEED = int(os.environ.get("DIGESTD_CRASH_SEED", "20261124"))
TRIALS = int(os.environ.get("DIGESTD_CRASH_TRIALS", "6"))
SUBSCRIBERS = int(os.environ.get("DIGESTD_CRASH_SUBSCRIBERS", "2000"))
CONCURRENCY = 4
SINK_DELAY = 0.004  # seconds before each 250: a slow-ish server


class Sink:
    """tests/smtpserver.py as a subprocess, logging one JSON line per accepted message."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "smtpserver.py"),
                "--port",
                "0",
                "--log",
                str(log),
                "--delay",
                str(SINK_DELAY),
            ],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        out: IO[bytes] = self.proc.stdout
        line = out.readline().decode()
        assert line.startswith("READY "), line
        self.port = int(line.split()[1])

    def received(self) -> list[str]:
        """Recipients, one per accepted message, in order. The sink may be writing a line
        while this reads: only whole lines (ending in a newline) count."""
        if not self.log.exists():
            return []
        out = []
        whole = self.log.read_text().split("\n")[:-1]  # the last piece is unfinished or ""
        for line in whole:
            if line.strip():
                out.extend(json.loads(line)["rcpt"])
        return out

    def settle(self) -> None:
        """A full SMTP round trip: by the time it is answered, the sink has handled the
        hang-ups of the killed client (aiosmtpd cancels their unfinished transactions)."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as probe:
            probe.ehlo("probe")
            probe.noop()
            probe.noop()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        finally:
            stop_process(self.proc)


def add_many(store: Path, emails: list[str]) -> None:
    async def go() -> None:
        async with Store.open(store) as s:
            prefs = Preferences(max_papers=3)
            await s.replace_all([(e, "", prefs) for e in emails])

    asyncio.run(go())


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL the sending daemon at random moments, restart until done: nobody missed, each
    duplicate was in flight at a kill, ≤ concurrency per kill."""
    rng = random.Random(SEED)
    zone, send_at, day = past_send_zone()
    sink = Sink(tmp_path / "sink.jsonl")
    started = time.monotonic()
    try:
        store = tmp_path / "d.sqlite3"
        config = write_config(
            tmp_path / "digestd.toml",
            store=store,
            smtp_port=sink.port,
            timezone=zone,
            send_at=send_at,
            concurrency=CONCURRENCY,
            smtp_timeout=10,
        )
        everyone = [f"reader{i:05d}@example.org" for i in range(SUBSCRIBERS)]
        add_many(store, everyone)

        in_flight_per_kill: list[int] = []
        in_flight_all: set[str] = set()
        mid_send_kills = 0
        for trial in range(TRIALS):
            before = len(sink.received())
            proc = spawn(config, "run", log=tmp_path / f"daemon{trial}.log", env=clean_env())
            try:
                # Leave work for the later trials: no trial may send more than a share of
                # what is left (a fast machine would otherwise finish in the first one).
                left = SUBSCRIBERS - len(set(sink.received()))
                cap = before + max(1, left // (TRIALS - trial + 1))
                if trial % 2 == 0:
                    # Anywhere from start-up to well into the sending.
                    until = time.monotonic() + rng.uniform(0.2, 3.0)
                    wait_until(
                        lambda: time.monotonic() >= until or len(sink.received()) >= cap,
                        10,
                        "the random kill moment",
                    )
                else:
                    # Once sending is under way, after a random number of messages.
                    target = min(cap, before + rng.randint(1, 300))

                    def progressed() -> bool:
                        got = sink.received()
                        return (
                            len(got) >= target
                            or len(set(got)) >= SUBSCRIBERS  # finished before the target
                            or proc.poll() is not None
                        )

                    wait_until(progressed, 60, "progress")
                    time.sleep(rng.uniform(0, 0.05))
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            finally:
                stop_process(proc)
            sink.settle()
            got = sink.received()
            during = set(got[before:])
            states = ledger(store, day)
            sending = {e for e, s in states.items() if s == "sending"}
            in_flight = sending & during  # handed over in this trial, reply not committed
            in_flight_per_kill.append(len(in_flight))
            in_flight_all |= in_flight
            if len(got) > before and len(set(got)) < SUBSCRIBERS:
                mid_send_kills += 1
            assert len(in_flight) <= CONCURRENCY, (trial, sorted(in_flight))

        # The last start runs to completion.
        final_log = tmp_path / "final.log"
        proc = spawn(config, "run", log=final_log, env=clean_env())
        try:
            # SIGTERM only once the daemon is up (the earlier trials may have sent everything).
            wait_until(
                lambda: final_log.exists() and b"digestd ready" in final_log.read_bytes(),
                60,
                "the daemon to be ready",
            )
            wait_until(lambda: len(set(sink.received())) >= SUBSCRIBERS, 120, "every digest")
            wait_until(lambda: set(ledger(store, day).values()) == {"accepted"}, 30, "ledger final")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            stop_process(proc)
        sink.settle()
        received = sink.received()
    finally:
        sink.stop()

    counts = collections.Counter(received)
    missed = sorted(set(everyone) - set(counts))
    extra = {e: n - 1 for e, n in counts.items() if n > 1}
    seconds = time.monotonic() - started
    interrupted = sum(1 for r in runs(store) if r.state == "interrupted")
    print(
        f"\ncrash test: seed={SEED} trials={TRIALS} kills_mid_send={mid_send_kills}"
        f" subscribers={SUBSCRIBERS} concurrency={CONCURRENCY} received={len(received)}"
        f" missed={len(missed)} duplicates={sum(extra.values())}"
        f" in_flight_per_kill={in_flight_per_kill} interrupted_runs={interrupted}"
        f" seconds={seconds:.1f}"
    )
    assert missed == []
    assert set(counts) == set(everyone)
    assert set(extra) <= in_flight_all, sorted(set(extra) - in_flight_all)
    assert sum(extra.values()) <= sum(in_flight_per_kill) <= TRIALS * CONCURRENCY
    assert mid_send_kills >= TRIALS // 2  # the kills really hit the sending
