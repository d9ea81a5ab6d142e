"""One sender per digest: concurrent `digestd run-once` / `digestd run` processes against one
store and one SMTP server send each digest exactly once."""

from __future__ import annotations

import collections
import datetime as dt
import signal
from pathlib import Path

from smtpserver import SmtpServer
from test_daemon_support import (
    NotifyListener,
    add_subscribers,
    clean_env,
    ledger,
    log_events,
    past_send_zone,
    runs,
    spawn,
    stop_process,
    wait_until,
    write_config,
)


def test_two_concurrent_run_once_send_each_digest_exactly_once(tmp_path: Path) -> None:
    """Two run-once processes started together: every subscriber receives exactly one digest,
    both exit 0, and the ledger has every digest accepted once."""
    day = "2025-11-07"
    with SmtpServer(data_delay=0.02) as smtp:
        store = tmp_path / "d.sqlite3"
        config = write_config(
            tmp_path / "digestd.toml", store=store, smtp_port=smtp.port, concurrency=4
        )
        everyone = add_subscribers(store, [f"r{i}@example.org" for i in range(40)])
        procs = [
            spawn(config, "run-once", "--date", day, log=tmp_path / f"once{i}.log")
            for i in range(2)
        ]
        try:
            codes = [p.wait(120) for p in procs]
        finally:
            for p in procs:
                stop_process(p)
        assert codes == [0, 0]
        counts = collections.Counter(r.rcpt_tos[0] for r in smtp.received)
        assert set(counts) == set(everyone)
        assert max(counts.values()) == 1, [e for e, n in counts.items() if n > 1]
    states = ledger(store, dt.date.fromisoformat(day))
    assert set(states.values()) == {"accepted"} and len(states) == 40
    finished = [r for r in runs(store) if r.digest_date == day]
    assert len(finished) == 2 and sorted(r.sent for r in finished) == [0, 40]
    # Both really ran: each logged a finished run.
    for i in range(2):
        assert any(e.get("event") == "run finished" for e in log_events(tmp_path / f"once{i}.log"))


def test_daemon_and_run_once_together_send_each_digest_once(tmp_path: Path) -> None:
    """A daemon catching up and an operator's run-once for the same date at the same time:
    still exactly one digest per subscriber."""
    zone, send_at, day = past_send_zone()
    listener = NotifyListener()
    try:
        with SmtpServer(data_delay=0.02) as smtp:
            store = tmp_path / "d.sqlite3"
            config = write_config(
                tmp_path / "digestd.toml",
                store=store,
                smtp_port=smtp.port,
                timezone=zone,
                send_at=send_at,
                concurrency=3,
            )
            everyone = add_subscribers(store, [f"r{i}@example.org" for i in range(30)])
            daemon = spawn(
                config,
                "run",
                log=tmp_path / "daemon.log",
                env=clean_env(NOTIFY_SOCKET=listener.path),
            )
            once = spawn(config, "run-once", "--date", day.isoformat(), log=tmp_path / "once.log")
            try:
                assert once.wait(120) == 0
                wait_until(lambda: len(smtp.received) >= 30, 60, "all digests")
                listener.wait_for(lambda m: m.get("STATUS", "").startswith("idle"), 60)
                daemon.send_signal(signal.SIGTERM)
                assert daemon.wait(15) == 0
            finally:
                stop_process(once)
                stop_process(daemon)
            counts = collections.Counter(r.rcpt_tos[0] for r in smtp.received)
            assert set(counts) == set(everyone) and max(counts.values()) == 1
    finally:
        listener.close()
    assert set(ledger(store, day).values()) == {"accepted"}
