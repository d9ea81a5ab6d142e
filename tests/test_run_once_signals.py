"""`digestd run-once` on SIGTERM: in-flight transactions finish, nothing new starts, and the
next run sends exactly what is left — every recipient once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import FIXTURES

from digestd.cli import cli

PAPERS = FIXTURES / "hf" / "daily_papers_month-2025-11_items-for-2025-11-07_final.json"
N = 60


def test_sigterm_drains_and_next_run_completes(tmp_path: Path) -> None:
    """SIGTERM mid-run: exit non-zero, complete messages only; a rerun finishes the list."""
    from click.testing import CliRunner

    log = tmp_path / "received.jsonl"
    server = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).parent / "smtpserver.py"),
            "--port",
            "0",
            "--log",
            str(log),
            "--delay",
            "0.1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1])
        config = tmp_path / "digestd.toml"
        config.write_text(
            f"""
[digest]
from_address = "papers@example.org"
[store]
path = "{tmp_path / "d.sqlite3"}"
[delivery]
concurrency = 2
[smtp]
host = "127.0.0.1"
port = {port}
security = "none"
[[sources]]
kind = "file"
path = "{PAPERS}"
"""
        )
        subs = tmp_path / "subs.toml"
        subs.write_text(
            "".join(f'[[subscriber]]\nemail = "u{i}@example.org"\n\n' for i in range(N))
        )
        result = CliRunner().invoke(
            cli, ["--config", str(config), "subscribers", "import", str(subs)]
        )
        assert result.exit_code == 0, result.output
        cmd = [
            sys.executable,
            "-m",
            "digestd",
            "--config",
            str(config),
            "run-once",
            "--date",
            "2025-11-07",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            not log.exists() or len(log.read_text().splitlines()) < 5
        ):
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        first = [json.loads(line) for line in log.read_text().splitlines()]
        assert proc.returncode != 0, out + err
        assert 5 <= len(first) < N, "SIGTERM arrived too late to test the drain"
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert rerun.returncode == 0, rerun.stderr
        received = [json.loads(line) for line in log.read_text().splitlines()]
        rcpts = [r for entry in received for r in entry["rcpt"]]
        assert sorted(rcpts) == sorted(f"u{i}@example.org" for i in range(N))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
        if server.poll() is None:
            os.kill(server.pid, signal.SIGKILL)
