"""Helpers shared by the daemon, crash and concurrency tests (no tests in here).

A config writer, a subscriber loader, a ``digestd`` subprocess launcher, a real
``NOTIFY_SOCKET`` listener, and a zone/send_at pair whose send time today is already past
(so a freshly started daemon catches up at once).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from conftest import FIXTURES

from digestd.models import Preferences
from digestd.store import Store

PAPERS = FIXTURES / "hf" / "daily_papers_month-2025-11_items-for-2025-11-07_final.json"
ROOT = Path(__file__).resolve().parent.parent


def past_send_zone(now: dt.datetime | None = None) -> tuple[str, str, dt.date]:
    """(timezone, send_at, local date) such that send_at today has passed by some hours and
    local midnight is hours away: a daemon started now catches up on that date."""
    now = now or dt.datetime.now(dt.UTC)
    offset = max(-12, min(14, 12 - now.hour))  # local time ≈ noon
    name = "UTC" if offset == 0 else f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"
    local = now + dt.timedelta(hours=offset)
    return name, "00:00", local.date()


def write_config(
    path: Path,
    *,
    store: Path,
    smtp_port: int | None = None,
    maildir: Path | None = None,
    timezone: str = "UTC",
    send_at: str = "07:00",
    concurrency: int = 2,
    http_port: int | None = None,
    smtp_timeout: float = 10,
    extra: str = "",
) -> Path:
    delivery = (
        f'transport = "maildir"\nmaildir = "{maildir}"'
        if maildir is not None
        else 'transport = "smtp"'
    )
    http = (
        f'enabled = true\nlisten = "127.0.0.1:{http_port}"'
        if http_port is not None
        else "enabled = false"
    )
    path.write_text(
        f"""
[digest]
from_address = "papers@example.org"
from_name = "Daily Papers"
base_url = "https://papers.example.org"
postal_address = "1 Example Street, Example City"
send_at = "{send_at}"
timezone = "{timezone}"
[store]
path = "{store}"
[delivery]
{delivery}
concurrency = {concurrency}
max_attempts = 2
[smtp]
host = "127.0.0.1"
port = {smtp_port or 2}
security = "none"
timeout = {smtp_timeout}
[http]
{http}
[fetch]
retries = 0
[[sources]]
kind = "file"
name = "saved"
path = "{PAPERS}"
{extra}
"""
    )
    return path


def add_subscribers(
    store: Path, emails: Iterable[str], prefs: Preferences | None = None
) -> list[str]:
    async def go() -> list[str]:
        out = []
        async with Store.open(store) as s:
            for email in emails:
                await s.add_subscriber(email, prefs=prefs or Preferences(max_papers=3))
                out.append(email)
        return out

    return asyncio.run(go())


def ledger(store: Path, date: dt.date) -> dict[str, str]:
    """email → ledger state on ``date`` for every subscriber with a row."""

    async def go() -> dict[str, str]:
        async with Store.open(store) as s:
            subs = await s.list_subscribers()
            states = await s.ledger_states(date, [x.id for x in subs])
            return {x.email: states[x.id][0] for x in subs if x.id in states}

    return asyncio.run(go())


def runs(store: Path) -> list[Any]:
    async def go() -> list[Any]:
        async with Store.open(store) as s:
            return list(await s.recent_runs(100))

    return asyncio.run(go())


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DIGESTD_", "NOTIFY_SOCKET", "WATCHDOG_", "CREDENTIALS_"))
    }
    env.update(extra)
    return env


def spawn(
    config: Path, *args: str, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m digestd --config CONFIG --log-format json ARGS`` with output to ``log``."""
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "digestd",
                "--config",
                str(config),
                "--log-format",
                "json",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env or clean_env(),
            cwd=ROOT,
        )
    finally:
        out.close()


def log_events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll an external condition (another process's files/sockets) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class NotifyListener:
    """A real NOTIFY_SOCKET: a bound AF_UNIX datagram socket, read by a thread."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="dn-", dir="/tmp")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self.times: list[float] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            with self._cond:
                self.messages.append(fields)
                self.times.append(time.monotonic())
                self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[dict[str, str]], bool], timeout: float = 30, start: int = 0
    ) -> int:
        """Index of the first message (from ``start``) matching ``predicate``."""

        def found() -> int | None:
            for i in range(start, len(self.messages)):
                if predicate(self.messages[i]):
                    return i
            return None

        with self._cond:
            ok = self._cond.wait_for(lambda: found() is not None, timeout)
            if not ok:
                raise AssertionError(
                    f"no matching notify message in {timeout}s; got {self.messages[start:]}"
                )
            index = found()
            assert index is not None
            return index

    def count(self, key: str) -> int:
        with self._cond:
            return sum(1 for m in self.messages if key in m)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Make sure a process we started is gone (by its pid)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout)
