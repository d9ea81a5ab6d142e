"""Benchmark: `digestd run-once` end to end against Postfix's smtp-sink, next to smtp-source.

Usage::

    .venv/bin/python bench/delivery.py [--n 10000 100000] [--sessions 20]
                                       [--chart docs/bench-delivery.png] [--seed 1]

For each N: a fresh SQLite store with N generated subscribers (mixed preferences, see
bench/_population.py) and a realistic day of papers (every recorded Hugging Face
daily_papers item in tests/fixtures/hf plus the bundled sample, as a ``file`` source);
``smtp-sink`` on 127.0.0.1; ``digestd run-once`` as a subprocess (SMTP, security none,
``delivery.concurrency`` = sessions) whose peak RSS is measured for that process alone
(``/proc/PID/status`` VmHWM, polled; its process-pool workers separately); then, against the
same sink in the same run, ``smtp-source -d`` sends the same number of messages of the same
average size over the same number of sessions: the reference for what the wire and the sink
take on this machine.

Printed per N: digestd's messages per second (wall clock of the whole command, start-up
included), smtp-source's, their ratio, the busy seconds per pipeline stage (select, render,
send, ledger) from the run's summary log line, and peak RSS. Also `digestd --help` start-up
time. The figures are drawn into a PNG chart (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _population import merged_papers, populate  # noqa: E402

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
DATE = dt.date(2026, 11, 23)  # a Monday: daily, weekday and weekly subscribers are all due
SENDER = "papers@example.org"
# smtp-source adds its own headers (From, To, Date, Message-Id, …) to the -l payload.
SOURCE_HEADER_BYTES = 150
TARGET_RATIO = 0.5
TARGET_RSS_MB = 150.0
TARGET_RSS_GROWTH = 1.25
TARGET_HELP_S = 0.3


@dataclass
class Result:
    n: int
    sessions: int
    sent: int = 0
    subscribers: int = 0
    state: str = ""
    wall_s: float = 0.0  # the digestd command, start to exit
    run_s: float = 0.0  # run_once itself (from the summary line)
    sent_bytes: int = 0
    stages: dict[str, float] = field(default_factory=dict)
    rss_mb: float = 0.0  # digestd process VmHWM
    cpu_s: float = 0.0  # digestd's user+system CPU, its pool workers included
    sys_s: float = 0.0  # … of which in the kernel
    page_faults: int = 0  # digestd's minor page faults, its pool workers included
    main_cpu_s: float = 0.0  # … of which the main process (sampled every 20 ms)
    sink_cpu_s: float = 0.0  # smtp-sink's CPU during the digestd run
    workers_rss_mb: list[float] = field(default_factory=list)
    source_s: float = 0.0
    source_msgs: int = 0
    ledger: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.sent / self.wall_s if self.wall_s else 0.0

    @property
    def source_rate(self) -> float:
        return self.source_msgs / self.source_s if self.source_s else 0.0

    @property
    def ratio(self) -> float:
        return self.rate / self.source_rate if self.source_rate else 0.0

    @property
    def avg_size(self) -> int:
        return self.sent_bytes // self.sent if self.sent else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"smtp-sink did not listen on 127.0.0.1:{port}")


@contextlib.contextmanager
def smtp_sink(port: int) -> Iterator[subprocess.Popen[bytes]]:
    """Postfix's smtp-sink on 127.0.0.1:port; stopped by its PID whatever happens."""
    args = [SMTP_SINK]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]
    args += [f"127.0.0.1:{port}", "1024"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def write_config(
    directory: Path, port: int, sessions: int, papers: Path, extra: dict[str, str] | None = None
) -> Path:
    """The run's configuration; ``extra`` maps "section.key" to a TOML value (variants)."""
    extra = extra or {}
    sections: dict[str, list[str]] = {}
    for dotted, value in extra.items():
        section, key = dotted.split(".", 1)
        sections.setdefault(section, []).append(f"{key} = {value}")
    config = directory / "digestd.toml"
    config.write_text(
        f"""
[digest]
from_address = "{SENDER}"
from_name = "Daily Papers"
base_url = "https://papers.example.org"
postal_address = "1 Example Street, Example City"
timezone = "UTC"
[store]
path = "{directory / "bench.sqlite3"}"
[delivery]
transport = "smtp"
concurrency = {sessions}
messages_per_connection = 1000000
{chr(10).join(sections.get("delivery", []))}
[smtp]
host = "127.0.0.1"
port = {port}
security = "none"
timeout = 30
{chr(10).join(sections.get("smtp", []))}
[[sources]]
kind = "file"
name = "day"
path = "{papers}"
""",
        "utf-8",
    )
    return config


def digestd_command() -> list[str]:
    exe = Path(sys.executable).with_name("digestd")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "digestd"]


def _vmhwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """Children, grandchildren, … (pool workers are children of the forkserver)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children", encoding="ascii") as f:
                kids = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            kids = []
        found.extend(kids)
        todo.extend(kids)
    return found


class PeakWatcher(threading.Thread):
    """Polls VmHWM (the kernel's own peak-RSS mark) of a process and its descendants."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.main_kb = 0
        self.children_kb: dict[int, int] = {}
        self.main_cpu = 0.0  # CPU seconds of the process itself, last sampled
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.main_kb = max(self.main_kb, _vmhwm_kb(self.pid))
            self.main_cpu = max(self.main_cpu, cpu_seconds(self.pid))
            for child in _descendants(self.pid):
                self.children_kb[child] = max(self.children_kb.get(child, 0), _vmhwm_kb(child))
            self.stopped.wait(self.interval)


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a running process (from /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def run_digestd(config: Path, log: Path, result: Result) -> None:
    cmd = [
        *digestd_command(),
        "--config",
        str(config),
        "--log-format",
        "json",
        "run-once",
        "--date",
        DATE.isoformat(),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGESTD_")}
    with log.open("wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        watcher = PeakWatcher(proc.pid)
        watcher.start()
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # usage: this process and its workers
        result.wall_s = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        result.cpu_s = usage.ru_utime + usage.ru_stime
        result.sys_s = usage.ru_stime
        result.page_faults = usage.ru_minflt
        result.main_cpu_s = watcher.main_cpu
        watcher.stopped.set()
        watcher.join()
    result.rss_mb = watcher.main_kb / 1024
    result.workers_rss_mb = sorted(
        (kb / 1024 for kb in watcher.children_kb.values() if kb), reverse=True
    )
    if proc.returncode != 0:
        tail = log.read_text("utf-8", "replace")[-3000:]
        raise RuntimeError(f"digestd exited {proc.returncode}: {out.decode()}\n{tail}")
    summary = None
    for line in log.read_text("utf-8", "replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "run finished":
                summary = event
    if summary is None:
        raise RuntimeError(f"no 'run finished' line in {log}")
    result.state = summary["state"]
    result.sent = int(summary["sent"])
    result.subscribers = int(summary["subscribers"])
    result.run_s = float(summary["seconds"])
    result.sent_bytes = int(summary.get("sent_bytes", 0))
    result.stages = {k: float(v) for k, v in (summary.get("stages") or {}).items()}


def run_source(port: int, messages: int, sessions: int, size: int, result: Result) -> None:
    cmd = [
        SMTP_SOURCE,
        "-d",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(max(size - SOURCE_HEADER_BYTES, 100)),
        "-N",
        "-f",
        SENDER,
        "-t",
        "reader@example.org",
        f"127.0.0.1:{port}",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result.source_s = time.perf_counter() - start
    result.source_msgs = messages


def ledger_counts(store: Path) -> dict[str, int]:
    from digestd.store import Store

    async def go() -> dict[str, int]:
        async with Store.open(store) as s:
            return await s.delivery_counts(DATE)

    return asyncio.run(go())


def help_startup(runs: int = 7) -> float:
    """Median wall time of `digestd --help` (a fresh interpreter each time)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([*digestd_command(), "--help"], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(
    n: int, sessions: int, seed: int, keep: Path | None, extra: dict[str, str] | None = None
) -> Result:
    result = Result(n=n, sessions=sessions)
    directory = Path(tempfile.mkdtemp(prefix=f"digestd-bench-{n}-"))
    try:
        papers = directory / "papers.json"
        count = merged_papers(papers)
        start = time.perf_counter()
        populate(directory / "bench.sqlite3", n, seed)
        print(
            f"\n== N = {n:,}: {count} papers, {n:,} subscribers stored in"
            f" {time.perf_counter() - start:.1f} s",
            flush=True,
        )
        port = free_port()
        config = write_config(directory, port, sessions, papers, extra)
        with smtp_sink(port) as sink:
            before = cpu_seconds(sink.pid)
            run_digestd(config, directory / "digestd.log", result)
            result.sink_cpu_s = cpu_seconds(sink.pid) - before
            run_source(port, result.sent, sessions, result.avg_size, result)
        result.ledger = ledger_counts(directory / "bench.sqlite3")
        if keep is not None:
            shutil.copy(directory / "digestd.log", keep / f"digestd-{n}.log")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return result


def report(result: Result) -> None:
    r = result
    print(
        f"digestd run-once: {r.sent:,} sent of {r.subscribers:,} subscribers ({r.state}),"
        f" {r.wall_s:.2f} s wall ({r.run_s:.2f} s in run_once), avg {r.avg_size / 1024:.1f} KiB"
    )
    print(f"  ledger: {r.ledger}")
    print(f"  digestd     {r.rate:8.0f} msgs/s   ({r.sessions} sessions)")
    print(
        f"  smtp-source {r.source_rate:8.0f} msgs/s"
        f"   ({r.source_msgs:,} msgs in {r.source_s:.2f} s)"
    )
    verdict = "MET" if r.ratio >= TARGET_RATIO else "MISSED"
    print(f"  ratio       {r.ratio:8.2f}×          (target ≥ {TARGET_RATIO}×: {verdict})")
    stages = "  ".join(f"{k} {v:.2f}" for k, v in r.stages.items())
    print(f"  stages (busy s, summed over calls; send over {r.sessions} connections): {stages}")
    workers = ", ".join(f"{mb:.0f}" for mb in r.workers_rss_mb) or "none"
    print(f"  peak RSS: digestd {r.rss_mb:.0f} MiB; child processes (MiB): {workers}")
    per = 1e6 / r.sent if r.sent else 0.0
    print(
        f"  CPU: digestd {r.cpu_s:.1f} s ({r.cpu_s * per:.0f} µs/msg; main process"
        f" {r.main_cpu_s:.1f} s = {r.main_cpu_s * per:.0f} µs/msg, the rest in workers),"
        f" smtp-sink {r.sink_cpu_s:.1f} s ({r.sink_cpu_s * per:.0f} µs/msg);"
        f" {os.cpu_count()} cores × {r.wall_s:.1f} s = {(os.cpu_count() or 1) * r.wall_s:.1f} s"
    )
    print(
        f"  kernel: digestd {r.sys_s * per:.0f} µs/msg of that CPU,"
        f" {r.page_faults / r.sent if r.sent else 0:.1f} page faults per message"
        " (main process and workers)"
    )


def chart(results: list[Result], help_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.n:,}" for r in results]
    x = range(len(results))
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.6))
    width = 0.38
    ax = axes[0]
    ax.bar([i - width / 2 for i in x], [r.rate for r in results], width, label="digestd run-once")
    ax.bar(
        [i + width / 2 for i in x],
        [r.source_rate for r in results],
        width,
        label="smtp-source (reference)",
    )
    for i, r in zip(x, results, strict=True):
        ax.annotate(f"{r.ratio:.2f}×", (i - width / 2, r.rate), ha="center", va="bottom")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("subscribers")
    ax.set_ylabel("messages per second")
    ax.set_title(f"Throughput to smtp-sink ({results[0].sessions} sessions)")
    ax.legend(loc="lower right", fontsize=8)

    ax = axes[1]
    names = ["select", "render", "send", "ledger"]
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        # busy time per message; "send" per connection (transactions overlap)
        values = [
            r.stages.get(name, 0.0) / (r.sessions if name == "send" else 1) / max(r.sent, 1) * 1e6
            for r in results
        ]
        ax.bar([i - 0.4 + width * (k + 0.5) for i in x], values, width, label=name)
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("subscribers")
    ax.set_ylabel("µs per message")
    ax.set_title("Busy time per stage (send: per connection)")
    ax.legend(fontsize=8)

    ax = axes[2]
    main = [r.main_cpu_s / max(r.sent, 1) * 1e6 for r in results]
    workers = [(r.cpu_s - r.main_cpu_s) / max(r.sent, 1) * 1e6 for r in results]
    sink = [r.sink_cpu_s / max(r.sent, 1) * 1e6 for r in results]
    ax.bar(list(x), main, 0.5, label="digestd main process (SMTP, ledger)")
    ax.bar(list(x), workers, 0.5, bottom=main, label="render workers (select, render)")
    ax.bar(
        list(x),
        sink,
        0.5,
        bottom=[a + b for a, b in zip(main, workers, strict=True)],
        label="smtp-sink",
    )
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("subscribers")
    ax.set_ylabel("CPU µs per message")
    ax.set_title(f"CPU per message ({os.cpu_count()} cores)")
    ax.legend(fontsize=8)

    ax = axes[3]
    ax.bar(list(x), [r.rss_mb for r in results], 0.5, label="digestd process")
    workers_rss = [max(r.workers_rss_mb, default=0.0) for r in results]
    if any(workers_rss):
        ax.bar([i + 0.3 for i in x], workers_rss, 0.25, label="largest pool worker")
    ax.axhline(TARGET_RSS_MB, color="red", linestyle="--", linewidth=1, label="150 MB target")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("subscribers")
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_title("Memory")
    ax.legend(fontsize=8)
    fig.suptitle(
        f"digestd delivery benchmark — {os.cpu_count()} cores, `digestd --help` {help_s:.2f} s",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--chart", type=Path, default=ROOT / "docs" / "bench-delivery.png")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument("--keep-logs", type=Path, help="copy each run's JSON log here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=TOML",
        help="extra digestd setting for a variant, e.g. delivery.render_workers=0 or"
        " smtp.pipelining=false (repeatable)",
    )
    args = parser.parse_args(argv)
    for tool in (SMTP_SINK, SMTP_SOURCE):
        if not Path(tool).exists():
            raise SystemExit(f"{tool} is missing: apt-get install postfix")
    if args.keep_logs:
        args.keep_logs.mkdir(parents=True, exist_ok=True)

    extra = dict(item.split("=", 1) for item in args.set)
    if extra:
        print(f"variant: {extra}")
    help_s = help_startup()
    verdict = "MET" if help_s < TARGET_HELP_S else "MISSED"
    print(
        f"`digestd --help` start-up: {help_s * 1000:.0f} ms"
        f" (median of 7; target < 0.3 s: {verdict})"
    )
    results = []
    for n in args.n:
        result = bench(n, args.sessions, args.seed, args.keep_logs, extra)
        report(result)
        results.append(result)
    if len(results) >= 2:
        small, large = results[0], results[-1]
        growth = large.rss_mb / small.rss_mb if small.rss_mb else 0.0
        ok = large.rss_mb < TARGET_RSS_MB and growth <= TARGET_RSS_GROWTH
        print(
            f"\npeak RSS {large.n:,} vs {small.n:,}: {large.rss_mb:.0f} / {small.rss_mb:.0f} MiB"
            f" = {growth:.2f}× (targets < {TARGET_RSS_MB:.0f} MB and ≤ {TARGET_RSS_GROWTH}×:"
            f" {'MET' if ok else 'MISSED'})"
        )
    if not args.no_chart:
        chart(results, help_s, args.chart)
        print(f"chart: {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
