"""Benchmark: what the SQLite ledger costs per message, next to plain sqlite3 doing the same writes.

Usage::

    .venv/bin/python bench/ledger.py [--n 100000] [--history-days 0] [--busy-loop] [--seed 1]

A fresh store (``Store.open`` on a temporary file) with N generated subscribers
(bench/_population.py, built in a child process so its memory is not counted here), then the
ledger pattern of one ``run-once`` where every digest is accepted, as digestd/pipeline.py
drives it:

- ``iter_subscribers`` in batches of 500, and per batch ``ledger_states`` and ``sent_papers``
  (against the day's 45 paper ids);
- ``claim_many`` in groups of 50;
- ``record_many`` in groups of 20, each digest accepted with 10 paper ids (so 10
  ``papers_sent`` rows per message).

``--history-days D`` first gives every subscriber D earlier days of accepted digests
(10 papers each, written with plain sqlite3), to see how the reads and the index grow with
history. ``--busy-loop`` keeps the event loop busy meanwhile (a loopback socket ping-pong
with a little Python per round trip, as the sender keeps it in a real run): SQLite's thread
then competes with it for the GIL, and the loop's lost round trips per message are printed.

Printed: wall-clock µs per message for each call kind and in total; process CPU µs per
message, split into the calling (event-loop) thread and aiosqlite's SQLite thread (from
/proc, with that thread's context switches per message); peak RSS after the store run. The
reference, measured in the same run on a copy of the same database: the same reads (ids
only, no Subscriber objects) and the same rows written with plain synchronous ``sqlite3``
(same pragmas: WAL, synchronous=NORMAL), ``executemany`` in one transaction per group,
parameter tuples built outside the timer — the floor for these writes. Both databases are
checked to hold N accepted rows and 10·N ``papers_sent`` rows for the day.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _population import PAPER_FILES, populate  # noqa: E402

from digestd.models import Delivery  # noqa: E402
from digestd.store import Store  # noqa: E402

DATE = dt.date(2026, 11, 23)
BATCH = 500  # pipeline.SUBSCRIBER_BATCH
CLAIM_GROUP = 50
RECORD_GROUP = 20
PAPERS_PER_MESSAGE = 10
KINDS = ("iter_subscribers", "ledger_states", "sent_papers", "claim_many", "record_many")


def day_paper_ids() -> list[str]:
    """The day's paper ids: every recorded daily_papers item (45), as bench/delivery uses."""
    ids: dict[str, None] = {}
    for path in PAPER_FILES:
        for item in json.loads(path.read_text("utf-8")):
            pid = item.get("paper", {}).get("id")
            if pid:
                ids[pid] = None
    return list(ids)


def pick_table(papers: list[str], seed: int) -> list[tuple[str, ...]]:
    """Distinct paper choices to cycle through (precomputed: the bench's own per-message
    work stays out of the measured CPU as far as it can)."""
    rng = random.Random(seed)
    return [tuple(rng.sample(papers, PAPERS_PER_MESSAGE)) for _ in range(997)]


def add_history(path: Path, days: int) -> None:
    """``days`` earlier days of accepted digests per subscriber, 10 papers each."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    ids = [row[0] for row in con.execute("SELECT id FROM subscribers ORDER BY id")]
    stamp = "2026-11-01T07:00:00+00:00"
    for back in range(days, 0, -1):
        day = (DATE - dt.timedelta(days=back)).isoformat()
        table = pick_table([f"old.{back}.{k}" for k in range(45)], back)
        con.execute("BEGIN")
        con.executemany(
            "INSERT INTO deliveries (subscriber_id, digest_date, message_id, state, attempts,"
            " reply, paper_ids, created_at, updated_at)"
            " VALUES (?, ?, ?, 'accepted', 1, '250 ok', ?, ?, ?)",
            (
                (
                    sid,
                    day,
                    f"<{sid}.{day}@bench>",
                    json.dumps(table[sid % len(table)]),
                    stamp,
                    stamp,
                )
                for sid in ids
            ),
        )
        con.executemany(
            "INSERT INTO papers_sent (subscriber_id, paper_id, digest_date) VALUES (?, ?, ?)",
            ((sid, pid, day) for sid in ids for pid in table[sid % len(table)]),
        )
        con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def build_template(path: Path, n: int, seed: int, history_days: int) -> None:
    populate(path, n, seed)
    if history_days:
        add_history(path, history_days)


# ---------------------------------------------------------------------------- digestd's Store
def sqlite_thread() -> int:
    """The native id of aiosqlite's worker thread (the only other thread here)."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    assert len(others) == 1, others
    assert others[0].native_id is not None
    return others[0].native_id


def thread_stats(tid: int) -> tuple[float, int]:
    """(CPU seconds, context switches) of one thread of this process, from /proc."""
    task = Path(f"/proc/self/task/{tid}")
    cpu_ns = int((task / "schedstat").read_text().split()[0])
    switches = sum(
        int(line.split()[1])
        for line in (task / "status").read_text().splitlines()
        if "ctxt_switches:" in line  # voluntary_… and nonvoluntary_…
    )
    return cpu_ns / 1e9, switches


class Traffic:
    """Stand-in for the sender's event-loop work: a loopback socket ping-pong with a little
    Python per round trip, run beside the ledger calls (``--busy-loop``)."""

    def __init__(self) -> None:
        self.round_trips = 0
        self.stop = False

    async def run(self) -> None:
        left, right = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=left)
        echo_reader, echo_writer = await asyncio.open_connection(sock=right)
        line = b"250 2.0.0 Ok: queued as 4F2B71C0E2 " * 6 + b"\n"
        try:
            while not self.stop:
                writer.write(line)
                got = await echo_reader.readline()
                echo_writer.write(got)
                await reader.readline()
                sum(range(600))  # ~10 µs of Python per round trip
                self.round_trips += 1
        finally:
            writer.close()
            echo_writer.close()

    async def rate_alone(self, seconds: float = 1.0) -> float:
        task = asyncio.create_task(self.run())
        await asyncio.sleep(0.2)
        start, t0 = self.round_trips, time.perf_counter()
        await asyncio.sleep(seconds)
        rate = (self.round_trips - start) / (time.perf_counter() - t0)
        self.stop = True
        await task
        self.stop, self.round_trips = False, 0
        return rate


async def run_store(
    path: Path, papers: list[str], table: list[tuple[str, ...]], busy_loop: bool = False
) -> dict[str, float]:
    """The pipeline's ledger calls, timed per kind (wall clock). With ``busy_loop`` a
    socket ping-pong keeps the event loop busy meanwhile, as the sender does in a run."""
    spent: dict[str, float] = defaultdict(float)
    messages = 0
    pending: list[tuple[Delivery, dt.datetime | None]] = []
    traffic = Traffic()
    if busy_loop:
        spent["traffic_alone"] = await traffic.rate_alone()
    async with Store.open(path) as store:
        run_id = await store.start_run(DATE, "bench")
        tid = sqlite_thread()
        traffic_task = asyncio.create_task(traffic.run()) if busy_loop else None
        await asyncio.sleep(0)
        sql0 = thread_stats(tid)
        main_sw0 = thread_stats(threading.get_native_id())[1]
        cpu0, main0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()

        async def flush(group: list[tuple[Delivery, dt.datetime | None]]) -> None:
            tick = time.perf_counter()
            await store.record_many(group)
            spent["record_many"] += time.perf_counter() - tick

        batches = store.iter_subscribers(batch=BATCH)
        while True:
            tick = time.perf_counter()
            batch = await anext(batches, None)
            spent["iter_subscribers"] += time.perf_counter() - tick
            if batch is None:
                break
            ids = [s.id for s in batch]
            tick = time.perf_counter()
            states = await store.ledger_states(DATE, ids)
            spent["ledger_states"] += time.perf_counter() - tick
            tick = time.perf_counter()
            before = await store.sent_papers(ids, papers)
            spent["sent_papers"] += time.perf_counter() - tick
            assert not states and all(not (set(papers) & v) for v in before.values())
            for start in range(0, len(batch), CLAIM_GROUP):
                group = batch[start : start + CLAIM_GROUP]
                picks = {s.id: table[s.id % len(table)] for s in group}
                items = [(s.id, f"<{s.id}.{DATE}@bench>", picks[s.id]) for s in group]
                tick = time.perf_counter()
                claimed = await store.claim_many(items, DATE, run_id)
                spent["claim_many"] += time.perf_counter() - tick
                assert claimed == set(picks)
                for s in group:
                    pending.append(
                        (
                            Delivery(
                                s.id,
                                s.email,
                                DATE,
                                f"<{s.id}.{DATE}@bench>",
                                "accepted",
                                "250 2.0.0 Ok: queued as 4F2B71C0E2",
                                picks[s.id],
                            ),
                            None,
                        )
                    )
                    messages += 1
                    if len(pending) == RECORD_GROUP:
                        await flush(pending)
                        pending = []
        if pending:
            await flush(pending)
        spent["cpu"] = time.process_time() - cpu0
        spent["main_cpu"] = time.thread_time() - main0
        spent["wall"] = time.perf_counter() - wall0
        sql1 = thread_stats(tid)
        spent["sqlite_cpu"] = sql1[0] - sql0[0]
        spent["switches"] = sql1[1] - sql0[1]
        spent["main_switches"] = thread_stats(threading.get_native_id())[1] - main_sw0
        if traffic_task is not None:
            spent["traffic_with"] = traffic.round_trips / spent["wall"]
            traffic.stop = True
            await traffic_task
    spent["messages"] = messages
    return spent


# ---------------------------------------------------------------------------- plain sqlite3
def run_reference(path: Path, papers: list[str], table: list[tuple[str, ...]]) -> dict[str, float]:
    """The same reads and writes with synchronous sqlite3: the floor."""
    spent: dict[str, float] = defaultdict(float)
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    con.execute("PRAGMA foreign_keys = ON")
    day = DATE.isoformat()
    stamp = "2026-11-23T07:00:00+00:00"
    run_id = con.execute(
        "INSERT INTO runs (digest_date, trigger, started_at) VALUES (?, 'bench', ?)", (day, stamp)
    ).lastrowid
    pmarks = ",".join("?" * len(papers))
    last = 0
    messages = 0
    pending_up: list[tuple[object, ...]] = []
    pending_sent: list[tuple[object, ...]] = []

    def flush() -> None:
        tick = time.perf_counter()
        con.execute("BEGIN IMMEDIATE")
        con.executemany(
            "UPDATE deliveries SET state = 'accepted', reply = ?, updated_at = ?"
            " WHERE subscriber_id = ? AND digest_date = ?",
            pending_up,
        )
        con.executemany(
            "INSERT INTO papers_sent (subscriber_id, paper_id, digest_date) VALUES (?, ?, ?)",
            pending_sent,
        )
        con.execute("COMMIT")
        spent["record_many"] += time.perf_counter() - tick
        pending_up.clear()
        pending_sent.clear()

    cpu0, wall0 = time.process_time(), time.perf_counter()
    while True:
        tick = time.perf_counter()
        ids = [
            row[0]
            for row in con.execute(
                "SELECT id FROM subscribers WHERE id > ? AND status = 'active' ORDER BY id LIMIT ?",
                (last, BATCH),
            )
        ]
        spent["iter_subscribers"] += time.perf_counter() - tick
        if not ids:
            break
        last = ids[-1]
        marks = ",".join("?" * len(ids))
        tick = time.perf_counter()
        con.execute(
            "SELECT subscriber_id, state, attempts FROM deliveries WHERE digest_date = ?"
            f" AND subscriber_id IN ({marks})",
            (day, *ids),
        ).fetchall()
        spent["ledger_states"] += time.perf_counter() - tick
        tick = time.perf_counter()
        con.execute(
            f"SELECT subscriber_id, paper_id FROM papers_sent WHERE subscriber_id IN ({marks})"
            f" AND paper_id IN ({pmarks})",
            (*ids, *papers),
        ).fetchall()
        spent["sent_papers"] += time.perf_counter() - tick
        for start in range(0, len(ids), CLAIM_GROUP):
            group = ids[start : start + CLAIM_GROUP]
            picks = {sid: table[sid % len(table)] for sid in group}
            rows = [
                (sid, day, f"<{sid}.{day}@bench>", json.dumps(picks[sid]), run_id, stamp, stamp)
                for sid in group
            ]
            tick = time.perf_counter()
            con.execute("BEGIN IMMEDIATE")
            con.executemany(
                "INSERT INTO deliveries (subscriber_id, digest_date, message_id, state, attempts,"
                " paper_ids, run_id, created_at, updated_at)"
                " VALUES (?, ?, ?, 'sending', 1, ?, ?, ?, ?)",
                rows,
            )
            con.execute("COMMIT")
            spent["claim_many"] += time.perf_counter() - tick
            for sid in group:
                pending_up.append(("250 2.0.0 Ok: queued as 4F2B71C0E2", stamp, sid, day))
                pending_sent.extend((sid, pid, day) for pid in picks[sid])
                messages += 1
                if len(pending_up) == RECORD_GROUP:
                    flush()
    if pending_up:
        flush()
    spent["cpu"] = time.process_time() - cpu0
    spent["main_cpu"] = spent["cpu"]
    spent["wall"] = time.perf_counter() - wall0
    spent["messages"] = messages
    con.close()
    return spent


def check(path: Path, n: int) -> str:
    con = sqlite3.connect(path)
    day = DATE.isoformat()
    states = dict(
        con.execute(
            "SELECT state, COUNT(*) FROM deliveries WHERE digest_date = ? GROUP BY state", (day,)
        ).fetchall()
    )
    sent = con.execute("SELECT COUNT(*) FROM papers_sent WHERE digest_date = ?", (day,)).fetchone()
    con.close()
    ok = states == {"accepted": n} and sent[0] == n * PAPERS_PER_MESSAGE
    return f"{states}, papers_sent {sent[0]:,}" + ("" if ok else "  ** MISMATCH **")


def report(name: str, spent: dict[str, float]) -> None:
    n = spent["messages"]
    parts = "  ".join(f"{k} {spent[k] / n * 1e6:6.1f}" for k in KINDS)
    calls = sum(spent[k] for k in KINDS)
    print(f"{name:<10} µs/msg wall: {parts}  | sum {calls / n * 1e6:6.1f}")
    line = (
        f"{'':<10} total wall {spent['wall'] / n * 1e6:6.1f} µs/msg ({spent['wall']:.2f} s);"
        f" process CPU {spent['cpu'] / n * 1e6:6.1f} µs/msg: calling thread"
        f" {spent['main_cpu'] / n * 1e6:6.1f}"
    )
    if "sqlite_cpu" in spent:
        line += (
            f", SQLite thread {spent['sqlite_cpu'] / n * 1e6:6.1f}"
            f" ({spent['switches'] / n:.2f} context switches/msg; calling thread"
            f" {spent['main_switches'] / n:.2f})"
        )
    print(line)
    if "traffic_with" in spent:
        alone, with_ = spent["traffic_alone"], spent["traffic_with"]
        lost = (alone - with_) * spent["wall"] / n
        print(
            f"{'':<10} busy loop: {alone:,.0f} round trips/s alone, {with_:,.0f} beside the"
            f" ledger: {lost:.2f} round trips ({lost / alone * 1e6:.0f} µs of event loop)"
            " lost per message (the process CPU above includes the loop's work)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="subscribers (= messages)")
    parser.add_argument("--history-days", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--busy-loop",
        action="store_true",
        help="keep the event loop busy with socket ping-pong during the Store run",
    )
    parser.add_argument("--build-template", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_template:  # the child process: population memory stays out of our RSS
        build_template(args.build_template, args.n, args.seed, args.history_days)
        return
    papers = day_paper_ids()
    with tempfile.TemporaryDirectory(prefix="digestd-bench-ledger-") as tmp:
        template = Path(tmp) / "template.sqlite3"
        tick = time.perf_counter()
        subprocess.run(
            [
                *(sys.executable, __file__, "--build-template", str(template)),
                *("--n", str(args.n), "--seed", str(args.seed)),
                *("--history-days", str(args.history_days)),
            ],
            check=True,
        )
        print(
            f"N = {args.n:,} subscribers, {args.history_days} earlier days, {len(papers)} papers"
            f" today, {PAPERS_PER_MESSAGE} per message; populated in"
            f" {time.perf_counter() - tick:.1f} s; SQLite {sqlite3.sqlite_version}",
            flush=True,
        )
        ours, ref = Path(tmp) / "store.sqlite3", Path(tmp) / "reference.sqlite3"
        shutil.copyfile(template, ours)
        shutil.copyfile(template, ref)
        template.unlink()
        table = pick_table(papers, args.seed)
        spent = asyncio.run(run_store(ours, papers, table, args.busy_loop))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report("Store", spent)
        print(f"{'':<10} peak RSS {rss:.1f} MiB; ledger: {check(ours, args.n)}")
        reference = run_reference(ref, papers, table)
        report("sqlite3", reference)
        print(f"{'':<10} ledger: {check(ref, args.n)}")
        print(
            f"Store / sqlite3 floor: process CPU {spent['cpu'] / reference['cpu']:.2f}x,"
            f" wall {spent['wall'] / reference['wall']:.2f}x"
        )


if __name__ == "__main__":
    main()
