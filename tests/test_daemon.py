"""`digestd run` as a real subprocess: a real NOTIFY_SOCKET, a real SMTP server, a real store.

The daemon is started with a send time that is already past today in its zone, so it
catches up at once; signals are real signals.
"""

from __future__ import annotations

import email
import email.policy
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
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


def run_daemon(config: Path, tmp_path: Path, notify: NotifyListener) -> subprocess.Popen[bytes]:
    """``digestd run`` with ``config``, its log in tmp_path/daemon.log, notifying ``notify``."""
    return spawn(
        config, "run", log=tmp_path / "daemon.log", env=clean_env(NOTIFY_SOCKET=notify.path)
    )


@pytest.fixture
def notify() -> Iterator[NotifyListener]:
    listener = NotifyListener()
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


def emails(n: int, prefix: str = "reader") -> list[str]:
    return [f"{prefix}{i}@example.org" for i in range(n)]


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_notify_protocol_ready_status_watchdog_reload_stopping(
    tmp_path: Path, notify: NotifyListener, smtp: SmtpServer
) -> None:
    """READY=1 after the self-check, STATUS= with progress, WATCHDOG=1 at half WATCHDOG_USEC,
    RELOADING=1 + MONOTONIC_USEC then READY=1 on SIGHUP, STOPPING=1 on SIGTERM, exit 0;
    the catch-up run is persisted with its trigger and reason."""
    zone, send_at, day = past_send_zone()
    store = tmp_path / "d.sqlite3"
    config = write_config(
        tmp_path / "digestd.toml",
        store=store,
        smtp_port=smtp.port,
        timezone=zone,
        send_at=send_at,
    )
    add_subscribers(store, emails(3))
    env = clean_env(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="200000")
    log = tmp_path / "daemon.log"
    proc = spawn(config, "run", log=log, env=env)
    try:
        ready = notify.wait_for(lambda m: m.get("READY") == "1")
        # Nothing was sent before READY (the self-check comes first).
        sending = notify.wait_for(lambda m: "sending" in m.get("STATUS", ""), start=ready)
        assert sending > ready
        wait_until(lambda: len(smtp.received) == 3, 30, "3 digests")
        notify.wait_for(lambda m: m.get("STATUS", "").startswith("idle"), start=sending)
        # Progress was reported while sending.
        assert any("sent" in m.get("STATUS", "") for m in notify.messages[sending:])

        # WATCHDOG=1 every ~0.1 s (half of 0.2 s).
        first = notify.count("WATCHDOG")
        wait_until(lambda: notify.count("WATCHDOG") >= first + 5, 10, "watchdog pings")
        times = [t for m, t in zip(notify.messages, notify.times, strict=True) if "WATCHDOG" in m]
        gaps = [b - a for a, b in zip(times[-5:], times[-4:], strict=False)]
        assert max(gaps) < 0.5, gaps

        before = monotonic_usec()
        proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for(lambda m: m.get("RELOADING") == "1", start=ready + 1)
        stamp = int(notify.messages[reloading]["MONOTONIC_USEC"])
        assert before <= stamp <= monotonic_usec()
        notify.wait_for(lambda m: m.get("READY") == "1", start=reloading + 1)

        proc.send_signal(signal.SIGTERM)
        notify.wait_for(lambda m: m.get("STOPPING") == "1", start=reloading)
        assert proc.wait(15) == 0
    finally:
        stop_process(proc)
    assert set(ledger(store, day).values()) == {"accepted"}
    (run,) = [r for r in runs(store) if r.trigger == "catch-up"]
    assert (run.state, run.sent, run.digest_date) == ("ok", 3, day.isoformat())
    assert "catch-up" in run.reason and f"{send_at} {zone}" in run.reason
    assert any(e.get("event") == "catching up" for e in log_events(log))


def test_reload_with_a_bad_config_keeps_the_old_one(
    tmp_path: Path, notify: NotifyListener, smtp: SmtpServer
) -> None:
    """A broken config on SIGHUP is refused and logged; the daemon keeps running the old one,
    is READY again, and a later good config is applied (its new send_at shows in STATUS)."""
    zone, send_at, _ = past_send_zone()
    store = tmp_path / "d.sqlite3"
    config = tmp_path / "digestd.toml"
    write_config(config, store=store, smtp_port=smtp.port, timezone=zone, send_at=send_at)
    add_subscribers(store, emails(1))
    log = tmp_path / "daemon.log"
    proc = spawn(config, "run", log=log, env=clean_env(NOTIFY_SOCKET=notify.path))
    try:
        ready = notify.wait_for(lambda m: m.get("READY") == "1")
        idle = notify.wait_for(lambda m: m.get("STATUS", "").startswith("idle"), start=ready)
        assert f"{send_at} {zone}" in notify.messages[idle]["STATUS"]
        good = config.read_text()

        for broken in (
            good.replace('from_address = "papers@example.org"', 'from_address = "not mail"'),
            good + "\n[digest\n",  # TOML syntax error
            good.replace(f'path = "{store}"', f'path = "{tmp_path / "other.sqlite3"}"'),
        ):
            config.write_text(broken)
            mark = len(notify.messages)
            proc.send_signal(signal.SIGHUP)
            i = notify.wait_for(lambda m: m.get("RELOADING") == "1", start=mark)
            j = notify.wait_for(lambda m: m.get("READY") == "1", start=i)
            assert "reload refused" in notify.messages[j].get("STATUS", "")
            assert proc.poll() is None

        refusals = [e for e in log_events(log) if e.get("event", "").startswith("reload refused")]
        assert len(refusals) == 3
        assert "from_address" in refusals[0]["error"]
        assert "store.path" in refusals[2]["error"]

        config.write_text(good.replace(f'send_at = "{send_at}"', 'send_at = "23:59"'))
        mark = len(notify.messages)
        proc.send_signal(signal.SIGHUP)
        j = notify.wait_for(lambda m: m.get("STATUS") == "configuration reloaded", start=mark)
        assert notify.messages[j].get("READY") == "1"
        notify.wait_for(lambda m: f"23:59 {zone}" in m.get("STATUS", ""), start=j)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        stop_process(proc)
    assert len(smtp.received) == 1  # the catch-up; reloads sent nothing again


def test_sigterm_drains_in_flight_transactions(tmp_path: Path, notify: NotifyListener) -> None:
    """SIGTERM while two slow SMTP transactions are in flight: both complete (server has the
    whole messages, ledger says accepted), no new transaction starts, exit 0 within seconds;
    a later run-once sends the rest, each exactly once."""
    zone, send_at, day = past_send_zone()
    with SmtpServer(data_delay=2.0) as smtp:
        store = tmp_path / "d.sqlite3"
        config = write_config(
            tmp_path / "digestd.toml",
            store=store,
            smtp_port=smtp.port,
            timezone=zone,
            send_at=send_at,
            concurrency=2,
        )
        everyone = add_subscribers(store, emails(6))
        proc = run_daemon(config, tmp_path, notify)
        try:
            wait_until(lambda: smtp.commands["MAIL"] >= 2, 30, "two transactions in flight")
            assert smtp.received == []  # still waiting for the slow 250s
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            elapsed = time.monotonic() - started
        finally:
            stop_process(proc)
        assert elapsed < 8, elapsed
        assert smtp.commands["MAIL"] == 2  # nothing new after SIGTERM
        assert len(smtp.received) == 2
        for received in smtp.received:
            msg = email.message_from_bytes(received.data, policy=email.policy.default)
            assert msg["Message-ID"] and msg.get_body(("plain",)) is not None
        states = ledger(store, day)
        accepted = {e for e, s in states.items() if s == "accepted"}
        assert accepted == {r.rcpt_tos[0] for r in smtp.received}
        assert "sending" not in states.values()  # the unsent ones were released
        assert notify.count("STOPPING") == 1
        (run,) = runs(store)
        assert run.state == "interrupted" and "stopped" in run.reason

        # Nothing was lost: a run-once for the same date sends the other four, once each.
        once = spawn(config, "run-once", "--date", day.isoformat(), log=tmp_path / "once.log")
        assert once.wait(60) == 0
        got = sorted(r.rcpt_tos[0] for r in smtp.received)
        assert got == sorted(everyone)


def test_self_check_failure_exits_without_ready(tmp_path: Path, notify: NotifyListener) -> None:
    """SMTP unreachable at start: no READY=1, a STATUS saying why, exit code 1."""
    store = tmp_path / "d.sqlite3"
    config = write_config(tmp_path / "digestd.toml", store=store, smtp_port=free_port())
    log = tmp_path / "daemon.log"
    proc = spawn(config, "run", log=log, env=clean_env(NOTIFY_SOCKET=notify.path))
    try:
        assert proc.wait(30) == 1
    finally:
        stop_process(proc)
    assert not any("READY" in m for m in notify.messages)
    assert any(m.get("STATUS", "").startswith("failed") for m in notify.messages)
    assert any(e.get("event") == "cannot start" for e in log_events(log))


def test_unwritable_store_fails_the_self_check(tmp_path: Path, notify: NotifyListener) -> None:
    """A store that cannot be opened is found before READY: exit 1, no READY."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = write_config(
        tmp_path / "digestd.toml", store=blocker / "d.sqlite3", maildir=tmp_path / "out"
    )
    proc = run_daemon(config, tmp_path, notify)
    try:
        assert proc.wait(30) == 1
    finally:
        stop_process(proc)
    assert not any("READY" in m for m in notify.messages)


def test_http_endpoint_runs_alongside_the_scheduler(tmp_path: Path, notify: NotifyListener) -> None:
    """With [http] enabled the link endpoint answers while the daemon runs, and is closed
    after SIGTERM."""
    port = free_port()
    config = write_config(
        tmp_path / "digestd.toml",
        store=tmp_path / "d.sqlite3",
        maildir=tmp_path / "out",
        http_port=port,
    )
    proc = run_daemon(config, tmp_path, notify)
    try:
        notify.wait_for(lambda m: m.get("READY") == "1")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        stop_process(proc)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_http_port_in_use_fails_before_ready(tmp_path: Path, notify: NotifyListener) -> None:
    """If [http] listen cannot be bound the daemon never reports READY and exits 2."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(
            tmp_path / "digestd.toml",
            store=tmp_path / "d.sqlite3",
            maildir=tmp_path / "out",
            http_port=port,
        )
        proc = run_daemon(config, tmp_path, notify)
        try:
            assert proc.wait(30) == 2
        finally:
            stop_process(proc)
    assert not any("READY" in m for m in notify.messages)


def test_sigint_stops_like_sigterm(tmp_path: Path, notify: NotifyListener) -> None:
    """Ctrl-C (SIGINT) is a clean stop too: STOPPING=1, exit 0."""
    config = write_config(
        tmp_path / "digestd.toml", store=tmp_path / "d.sqlite3", maildir=tmp_path / "out"
    )
    proc = run_daemon(config, tmp_path, notify)
    try:
        notify.wait_for(lambda m: m.get("READY") == "1")
        os.kill(proc.pid, signal.SIGINT)
        notify.wait_for(lambda m: m.get("STOPPING") == "1")
        assert proc.wait(15) == 0
    finally:
        stop_process(proc)


def test_restart_after_catch_up_sends_nothing_twice(
    tmp_path: Path, notify: NotifyListener, smtp: SmtpServer
) -> None:
    """A restart (same day) finds today's digests final: no second catch-up run, no mail."""
    zone, send_at, _ = past_send_zone()
    store = tmp_path / "d.sqlite3"
    config = write_config(
        tmp_path / "digestd.toml",
        store=store,
        smtp_port=smtp.port,
        timezone=zone,
        send_at=send_at,
    )
    add_subscribers(store, emails(2))
    for attempt in range(2):
        mark = len(notify.messages)
        proc = spawn(
            config,
            "run",
            log=tmp_path / f"daemon{attempt}.log",
            env=clean_env(NOTIFY_SOCKET=notify.path),
        )
        try:
            notify.wait_for(lambda m: m.get("STATUS", "").startswith("idle"), start=mark)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            stop_process(proc)
    assert len(smtp.received) == 2
    assert [r.trigger for r in runs(store)] == ["catch-up"]


def test_catch_up_skips_a_date_not_yet_due(
    tmp_path: Path, notify: NotifyListener, smtp: SmtpServer
) -> None:
    """A slot whose send time today is still ahead is not caught up at start."""
    zone, _, _ = past_send_zone()
    store = tmp_path / "d.sqlite3"
    config = write_config(
        tmp_path / "digestd.toml",
        store=store,
        smtp_port=smtp.port,
        timezone=zone,
        send_at="23:59",
    )
    add_subscribers(store, emails(2))
    proc = run_daemon(config, tmp_path, notify)
    try:
        notify.wait_for(lambda m: m.get("STATUS", "").startswith("idle"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        stop_process(proc)
    assert smtp.received == [] and runs(store) == []
