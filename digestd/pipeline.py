"""The one module that knows the order: fetch → select → render → send → record.

``run_once`` is one pass for one digest date. It is safe to repeat: the run lock keeps a
second process out while a pass is in progress, and the ledger skips every digest that the
server already accepted, so a date is never sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import gc
import os
import random
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast
from zoneinfo import ZoneInfo

import structlog

from .compose import message_size
from .config import Settings, read_secret
from .errors import ConfigError
from .models import Delivery, Digest, Paper, RenderedDigest, Subscriber
from .runlock import RunLock
from .schedule import cadence_due
from .store import Store

if TYPE_CHECKING:
    from .selection import PreparedDay

log = structlog.get_logger(__name__)

SUBSCRIBER_BATCH = 500
# Selection + rendering run in a process pool when this many subscribers are active (and
# delivery.render_workers is not 0): below it, starting the workers costs more than it saves.
POOL_MIN_SUBSCRIBERS = 2000
RENDER_CHUNK = 50  # subscribers per task handed to a worker
WORKER_GC_THRESHOLD = 50_000  # allocations between young collections in a render worker
# A render worker's niceness above the main process. Each message holds its connection slot
# for its round trips and the ledger commit, so the run is bound by how soon the event
# loop (and the SMTP server) get the CPU: at 100,000 subscribers +15 made the send stage
# ~2.0 ms a message instead of ~3.1 with +5, and the run ~5 % faster (+19: the same).
WORKER_NICE = 15
RUN_GC_THRESHOLD = 20_000  # … in the process running run_once, while it runs
MAX_CHUNKS_SENDING = 4  # chunks of finished messages in the sender at once (memory bound)
# How long replies gather before a ledger commit (unless every connection's is waiting).
GROUP_COMMIT_WINDOW = 0.002
# This many 5.7.x (policy) rejections in a row pause the run: nothing more is sent.
POLICY_PAUSE_AFTER = 5
# Keep a deferred digest's retries well inside the day so they never meet the next digest.
MAX_RETRY_WINDOW = dt.timedelta(hours=12)
Progress = Callable[[str], None]


class ProgressText(str):
    """A progress line ("1,500 of 10,000 subscribers, 1,480 sent") that also carries its
    numbers, so a terminal can draw a bar; everywhere else it is just the text."""

    done: int
    total: int
    sent: int

    @classmethod
    def of(cls, summary: RunSummary) -> ProgressText:
        total = max(summary.active, summary.subscribers)
        text = cls(
            f"{summary.subscribers:,} of {total:,} subscribers, {summary.sent:,} sent"
            if total
            else f"{summary.subscribers:,} subscribers, {summary.sent:,} sent"
        )
        text.done, text.total, text.sent = summary.subscribers, total, summary.sent
        return text


@dataclass(slots=True)
class RunSummary:
    date: dt.date
    state: str = "ok"  # ok | partial | failed
    reason: str = ""
    fetched: int = 0
    subscribers: int = 0
    sent: int = 0
    skipped: int = 0
    failed: int = 0
    deferred: int = 0
    seconds: float = 0.0
    source_failures: list[tuple[str, str]] = field(default_factory=list)
    dry_run_messages: list[RenderedDigest] = field(default_factory=list)  # dry runs only
    sent_bytes: int = 0  # size of the accepted messages
    active: int = 0  # active subscribers when the run started (for progress)
    # Busy seconds per stage, summed over calls (cheap monotonic-clock accumulators).
    # "send" sums every transaction's duration over the parallel connections, so stages
    # that overlap can add up to more than ``seconds``.
    stages: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("select", "render", "send", "ledger"), 0.0)
    )

    def counts(self) -> dict[str, float]:
        return {
            "fetched": self.fetched,
            "subscribers": self.subscribers,
            "sent": self.sent,
            "skipped": self.skipped,
            "failed": self.failed + self.deferred,
            "seconds": self.seconds,
        }

    @property
    def exit_code(self) -> int:
        return {"ok": 0, "partial": 3}.get(self.state, 1)


class _WhileRunning:
    """The process's settings while any run is in progress, put back when the last one
    ends (the daemon runs a slot at a time, but the count keeps it exact). A run allocates
    many short-lived objects per message (futures, replies, ledger rows): young objects
    are collected less often; and freed message buffers stay in the heap
    (:func:`tune_malloc`, then :func:`release_malloc`)."""

    active = 0
    saved: tuple[int, int, int] = (700, 10, 10)

    @classmethod
    def enter(cls) -> None:
        if cls.active == 0:
            cls.saved = gc.get_threshold()
            gc.set_threshold(max(RUN_GC_THRESHOLD, cls.saved[0]), *cls.saved[1:])
            tune_malloc()
        cls.active += 1

    @classmethod
    def leave(cls) -> None:
        cls.active -= 1
        if cls.active == 0:
            gc.set_threshold(*cls.saved)
            release_malloc()


# glibc malloc while a run is in progress (and for good in a render worker). Each message
# is ~28 KB allocated and freed several times, and a chunk of 50 crosses between processes
# as ~1.4 MB: with glibc's defaults the chunk buffers are mmap'ed and unmapped every time
# and the heap top is trimmed and grown again, so every message costs fresh pages: about
# 10-15 page faults per message in a worker and 8 in the main process at 30,000
# subscribers, some 20 µs of kernel time per message in each (bench figures, README).
RUN_MMAP_THRESHOLD = 16 << 20  # below this, blocks come from the heap, not mmap
RUN_TRIM_THRESHOLD = 64 << 20  # free space kept at the heap top before giving it back
RUN_TOP_PAD = 16 << 20  # extra heap asked for at a time (address space, not memory)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters
_GLIBC_TRIM_THRESHOLD = 128 << 10  # glibc's default, put back after a run


def _libc() -> Any:
    """glibc's allocator controls, or None (another libc, another platform)."""
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    # musl and others have no mallopt / malloc_trim
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def tune_malloc(libc: Any = None) -> bool:
    """Keep freed memory in the heap for reuse instead of giving it back to the kernel and
    faulting it in again (see :data:`RUN_MMAP_THRESHOLD`); False where that is not
    possible. Memory in use is unchanged; what is freed stays mapped until
    :func:`release_malloc`."""
    libc = libc if libc is not None else _libc()
    if libc is None:
        return False
    return all(
        libc.mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, RUN_TRIM_THRESHOLD),
            (_M_TOP_PAD, RUN_TOP_PAD),
        )
    )


def release_malloc(libc: Any = None) -> bool:
    """After a run: glibc's trimming back, and the heap's free memory given back now (a
    daemon then waits for hours with what it needs, not with a run's peak)."""
    libc = libc if libc is not None else _libc()
    if libc is None:
        return False
    libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
    libc.mallopt(_M_TOP_PAD, 0)
    libc.malloc_trim(0)
    return True


def today_in(timezone: str, now: dt.datetime | None = None) -> dt.date:
    moment = now or dt.datetime.now(dt.UTC)
    return moment.astimezone(ZoneInfo(timezone)).date()


def due_on(subscriber: Subscriber, date: dt.date) -> bool:
    """Cadence: daily every day, weekdays Monday–Friday, weekly on Mondays."""
    return cadence_due(subscriber.prefs.cadence, date)


async def fetch_papers(
    settings: Settings, date: dt.date
) -> tuple[list[Paper], list[tuple[str, str]]]:
    """Every configured source; failures are logged and returned, never raised."""
    from . import sources

    if not settings.sources:
        raise ConfigError(
            f"{settings.source_path or 'configuration'}: sources: no [[sources]] configured"
        )
    async with sources.make_client(settings.fetch) as client:
        result = await sources.fetch_all(settings.sources, date, client, settings.fetch)
    # Each source logs its own outcome (sources.fetch_all).
    return list(result.papers), list(result.failures)


async def ensure_seed_papers(settings: Settings, store: Store, ids: Sequence[str]) -> None:
    """Every seed paper must be known, so an unknown id fails at add/set time, not at send.

    Looked up in the store, then in the configured ``file`` sources (offline use), then
    fetched once (Hugging Face, else the arXiv API) and cached in the store.
    """
    from . import sources
    from .config import FileSource, HfDailySource
    from .errors import SourceError, ValidationError

    known = await store.get_papers(ids)
    missing = [pid for pid in ids if pid not in known]
    for source in settings.sources:
        if not missing or not isinstance(source, FileSource):
            continue
        try:
            found = {p.id: p for p in sources.load_papers_file(source.path)}
        except (SourceError, OSError):
            continue  # a broken file is reported when the run fetches it
        hits = [found[pid] for pid in missing if pid in found]
        if hits:
            await store.upsert_papers(hits)
            missing = [pid for pid in missing if pid not in found]
    if not missing:
        return
    hf_base = next(
        (s.base_url for s in settings.sources if isinstance(s, HfDailySource)),
        "https://huggingface.co",
    )
    problems = []
    async with sources.make_client(settings.fetch) as client:
        for pid in missing:
            try:
                paper = await sources.fetch_paper(client, pid, hf_base=hf_base)
            except SourceError as exc:
                problems.append(f"seed paper {pid!r}: could not be looked up ({exc})")
                continue
            if paper is None:
                problems.append(f"seed paper {pid!r}: no such paper on Hugging Face or arXiv")
            else:
                await store.upsert_papers([paper])
    if problems:
        raise ValidationError(problems)


class Engine:
    """Selection and rendering for one run: papers prepared once, templates loaded once."""

    def __init__(
        self,
        settings: Settings,
        papers: Sequence[Paper],
        seen: Sequence[Paper],
        now: dt.datetime,
        *,
        day: PreparedDay | None = None,
    ) -> None:
        from .render import RenderContext, Renderer
        from .selection import prepare_day

        self.settings = settings
        self.now = now
        self.day = day if day is not None else prepare_day(papers, seen)
        self.renderer = Renderer()
        self.ctx = RenderContext.from_settings(settings, now)
        self._dkim_key: bytes | None = None
        if settings.dkim.enabled:
            key = read_secret(
                "dkim-private-key", settings.dkim.private_key_file, "DIGESTD_DKIM_KEY"
            )
            if not key:
                raise ConfigError("dkim.private_key_file: no DKIM private key found")
            self._dkim_key = key.encode()

    def select(
        self,
        subscriber: Subscriber,
        date: dt.date,
        already_sent: AbstractSet[str],
        seeds: Mapping[str, Paper],
    ) -> tuple[Digest, str]:
        from .selection import empty_reason, select

        digest = select(self.day, subscriber, date, already_sent=already_sent, seeds=seeds)
        reason = (
            ""
            if digest.picks
            else empty_reason(self.day, subscriber, already_sent=already_sent, seeds=seeds)
        )
        return digest, reason

    def render(self, digest: Digest, *, parts: bool = True) -> RenderedDigest:
        # Without parts the caller is the SMTP sender, which needs only the DATA payload;
        # a DKIM signature is made over the message, so then the message is built.
        payload = not parts and self._dkim_key is None
        rendered = self.renderer.render(digest, self.ctx, parts=parts, payload=payload)
        if self._dkim_key is not None:
            from .signing import dkim_sign

            signed = dkim_sign(
                rendered.message,
                domain=self.settings.dkim.domain,
                selector=self.settings.dkim.selector,
                private_key=self._dkim_key,
                algorithm=self.settings.dkim.algorithm,
            )
            rendered = replace(rendered, message=signed)
        return rendered


async def _seed_papers(store: Store, subscribers: Sequence[Subscriber]) -> dict[str, Paper]:
    ids = {pid for sub in subscribers for pid in sub.prefs.seed_papers}
    return await store.get_papers(ids) if ids else {}


async def _subscriber_batches(store: Store, only: str | None) -> AsyncIterator[list[Subscriber]]:
    if only is not None:
        sub = await store.get_subscriber(only)
        if sub.status == "active":
            yield [sub]
        else:
            log.info("subscriber not active", email=only, status=sub.status)
        return
    async for batch in store.iter_subscribers(batch=SUBSCRIBER_BATCH):
        yield batch


def backoff(attempt: int, base: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [base/2, base·2^(attempt-1)]."""
    ceiling = base * (2 ** max(0, attempt - 1))
    return rng.uniform(base / 2, max(base / 2, ceiling))


async def run_once(
    settings: Settings,
    store: Store,
    date: dt.date,
    *,
    dry_run: bool = False,
    only: str | None = None,
    trigger: str = "run-once",
    papers: Sequence[Paper] | None = None,
    now: dt.datetime | None = None,
    stop: asyncio.Event | None = None,
    progress: Progress | None = None,
    retry_base: float | None = None,
    include: Callable[[Subscriber], bool] | None = None,
    why: str = "",
) -> RunSummary:
    """One pass for ``date``. ``papers`` bypasses the sources (demo, tests); ``include``
    limits the pass to the subscribers it accepts (the daemon's per-timezone slots);
    ``why`` is recorded with the run (e.g. the reason for a catch-up)."""
    started = time.monotonic()
    summary = RunSummary(date=date)
    now = now or dt.datetime.now(dt.UTC)
    structlog.contextvars.bind_contextvars(digest_date=date.isoformat())
    _WhileRunning.enter()
    try:
        one_pass = functools.partial(
            _run,
            settings,
            store,
            date,
            summary,
            only=only,
            papers=papers,
            now=now,
            stop=stop,
            progress=progress,
            retry_base=retry_base,
            include=include,
        )
        if dry_run:
            await one_pass(dry_run=True, run_id=None)
        else:
            async with RunLock(store.path):
                await store.mark_interrupted_runs()
                run_id = await store.start_run(date, trigger)
                try:
                    await one_pass(dry_run=False, run_id=run_id)
                except BaseException as exc:
                    summary.state = "failed"
                    summary.reason = summary.reason or f"{type(exc).__name__}: {exc}"
                    raise
                finally:
                    summary.seconds = round(time.monotonic() - started, 3)
                    await asyncio.shield(
                        store.finish_run(
                            run_id,
                            summary.state,
                            summary.counts(),
                            "; ".join(r for r in (why, summary.reason) if r),
                        )
                    )
    finally:
        summary.seconds = round(time.monotonic() - started, 3)
        log.info(
            "run finished",
            state=summary.state,
            reason=summary.reason or None,
            fetched=summary.fetched,
            subscribers=summary.subscribers,
            sent=summary.sent,
            skipped=summary.skipped,
            failed=summary.failed,
            deferred=summary.deferred,
            seconds=summary.seconds,
            sent_bytes=summary.sent_bytes,
            stages={k: round(v, 3) for k, v in summary.stages.items()},
            dry_run=dry_run,
        )
        structlog.contextvars.unbind_contextvars("digest_date")
        _WhileRunning.leave()
    return summary


async def _run(
    settings: Settings,
    store: Store,
    date: dt.date,
    summary: RunSummary,
    *,
    dry_run: bool,
    only: str | None,
    papers: Sequence[Paper] | None,
    now: dt.datetime,
    stop: asyncio.Event | None,
    progress: Progress | None,
    retry_base: float | None,
    run_id: int | None,
    include: Callable[[Subscriber], bool] | None = None,
) -> None:
    from .deliver import make_transport

    transport = None if dry_run else make_transport(settings)
    if transport is not None:
        # Login / TLS problems are found before any paper is fetched.
        await transport.__aenter__()
    try:
        if transport is not None:
            await transport.check()
        if papers is None:
            fetched, failures = await fetch_papers(settings, date)
            summary.source_failures = failures
            if not fetched and failures and len(failures) >= len(settings.sources):
                summary.state = "failed"
                summary.reason = "every source failed: " + "; ".join(
                    f"{name}: {why}" for name, why in failures
                )
                log.error("no papers: every source failed", reasons=summary.reason)
                return
        else:
            fetched = list(papers)
        summary.fetched = len(fetched)
        if not dry_run:
            await store.upsert_papers(fetched, now)
        seen = await store.recent_papers()
        engine = Engine(settings, fetched, seen, now)
        sender = _Sender(settings, store, date, summary, transport, run_id, retry_base, stop=stop)
        paper_ids = [p.id for p in fetched]
        summary.active = (
            1 if only is not None else (await store.count_subscribers()).get("active", 0)
        )
        workers = _pool_size(settings, summary.active, only)
        # The sender needs only the message bytes: the HTML and text parts stay in the
        # workers unless a dry run prints them or a Maildir keeps an .html copy.
        keep_parts = dry_run or settings.delivery.transport != "smtp"
        work = _Work(settings, engine, date, now, workers, keep_parts)
        sending: set[asyncio.Task[None]] = set()

        async def take(ready: list[RenderedDigest]) -> None:
            """Hand one chunk's finished messages on: record (dry run) or send."""
            if dry_run:
                summary.dry_run_messages.extend(ready)
                summary.sent += len(ready)
                return
            if sender.halted():
                sender.released += len(ready)  # never claimed: the next run sends them
                return
            # Sending overlaps the rendering of the next chunks; a bounded number of
            # chunks is in the sender at once (memory), all sharing one connection limit.
            task = asyncio.create_task(sender.send_batch(ready))
            sending.add(task)
            task.add_done_callback(sending.discard)
            while len(sending) > MAX_CHUNKS_SENDING:
                await asyncio.wait(sending, return_when=asyncio.FIRST_COMPLETED)

        async def finish_one() -> None:
            ready: list[RenderedDigest] = []
            empty: list[tuple[int, str]] = []
            for outcome in await work.next_result(summary.stages):
                if isinstance(outcome, RenderedDigest):
                    ready.append(outcome)
                elif outcome[0] == "empty":
                    summary.skipped += 1
                    log.info("nothing to send", email=outcome[2], reason=outcome[3])
                    empty.append((outcome[1], outcome[3]))
                else:  # one reader's render failure never aborts the run
                    summary.failed += 1
                    log.error("render failed", email=outcome[2], error=outcome[3])
                    if not dry_run:
                        tick = time.perf_counter()
                        await store.set_state(
                            outcome[1], date, "failed", f"render failed: {outcome[3]}"
                        )
                        summary.stages["ledger"] += time.perf_counter() - tick
            if empty and not dry_run:
                await store.record_skips(date, empty)
            await take(ready)

        try:
            async for batch in _subscriber_batches(store, only):
                if sender.paused_reason or sender.fatal:
                    break
                if stop is not None and stop.is_set():
                    summary.state = "interrupted"
                    summary.reason = "stopped before every subscriber was processed"
                    break
                ids = [s.id for s in batch]
                states = {} if dry_run else await store.ledger_states(date, ids)
                sent_before = await store.sent_papers(ids, paper_ids)
                seeds = await _seed_papers(store, batch)
                if include is not None:
                    batch = [s for s in batch if include(s)]
                todo: list[_Item] = []
                for sub in batch:
                    summary.subscribers += 1
                    state = states.get(sub.id, ("", 0))[0]
                    if state in ("accepted", "failed", "suppressed"):
                        summary.skipped += 1
                        continue
                    if not due_on(sub, date):
                        summary.skipped += 1
                        continue
                    # Only accepted digests add to papers_sent, so a retry sees the same papers.
                    mine = {pid: seeds[pid] for pid in sub.prefs.seed_papers if pid in seeds}
                    todo.append((sub, frozenset(sent_before.get(sub.id, ())), mine))
                for start in range(0, len(todo), work.chunk):
                    work.submit(todo[start : start + work.chunk])
                    while work.backlog() > work.max_backlog:
                        await finish_one()
                if progress is not None:
                    progress(ProgressText.of(summary))
            while work.backlog():
                await finish_one()
        finally:
            work.close()
            outcomes = await asyncio.gather(*list(sending), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if progress is not None:
            progress(ProgressText.of(summary))
        if not dry_run:
            await sender.retry_deferred(stop)
        if sender.released:
            summary.state = "interrupted"
            summary.reason = f"stopped: {sender.released} digests left for the next run"
        if sender.paused_reason:
            summary.state = "partial"
            summary.reason = sender.paused_reason
        if summary.state != "interrupted" and (summary.failed or summary.deferred):
            summary.state = "partial"
            summary.reason = summary.reason or (
                f"{summary.failed} failed, {summary.deferred} deferred"
            )
    finally:
        if transport is not None:
            await transport.__aexit__(None, None, None)


# ------------------------------------------------------------ selection + rendering work

_Item = tuple[Subscriber, frozenset[str], dict[str, Paper]]  # subscriber, already sent, seeds
# A finished message, or ("empty", subscriber id, email, why) / ("error", id, email, why).
_Outcome = RenderedDigest | tuple[str, int, str, str]
_ChunkResult = tuple[list[_Outcome], float, float]  # outcomes, select s, render s


def _select_render(
    engine: Engine, items: Sequence[_Item], date: dt.date, keep_parts: bool = True
) -> _ChunkResult:
    """Select and render one chunk of subscribers (in the main process or a worker).

    ``keep_parts=False`` (SMTP): the messages come back as their DATA payloads
    (:class:`~digestd.compose.DataPayload`) and without their HTML and text parts."""
    from .compose import as_data_payload
    from .deliver import wire_checked

    send_empty = engine.settings.digest.send_empty
    out: list[_Outcome] = []
    select_s = render_s = 0.0
    clock = time.perf_counter
    for sub, already, seeds in items:
        tick = clock()
        digest, why = engine.select(sub, date, already, seeds)
        tock = clock()
        select_s += tock - tick
        if not digest.picks and not send_empty:
            out.append(("empty", sub.id, sub.email, why))
            continue
        try:
            rendered = engine.render(digest, parts=keep_parts)
            message = wire_checked(rendered.message)
            if not keep_parts:  # for the SMTP sender: the DATA payload is all it needs
                message = as_data_payload(message)
            if message is not rendered.message:
                rendered = replace(rendered, message=message)
            out.append(rendered)
        except Exception as exc:  # one reader's render never aborts the run
            out.append(("error", sub.id, sub.email, str(exc)))
        render_s += clock() - tock
    return out, select_s, render_s


_WORKER_ENGINE: Engine | None = None


def _worker_start(
    settings: Settings, day: PreparedDay, now: dt.datetime, json_logs: bool, parent: int
) -> None:
    """Process-pool initializer: templates loaded and papers prepared once per worker."""
    global _WORKER_ENGINE
    import signal

    from . import logs

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides about stopping
    _die_with_parent(parent)
    # Rendering is throughput work; the main process's event loop (SMTP replies) and its
    # SQLite thread are latency work: let them win the CPU when both cores are busy.
    with contextlib.suppress(OSError, AttributeError):
        os.nice(WORKER_NICE)
    tune_malloc()  # a worker lives for one run
    logs.configure(json=json_logs)
    _WORKER_ENGINE = Engine(settings, (), (), now, day=day)
    # The worker allocates many short-lived, acyclic objects per message and keeps large
    # caches: collect young objects less often, and never rescan what start-up made.
    gc.freeze()
    gc.set_threshold(WORKER_GC_THRESHOLD, 20, 100)


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive a main process killed with SIGKILL (it would wait for work
    forever): on Linux the kernel sends it SIGKILL when its parent dies."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _worker_chunk(items: Sequence[_Item], date: dt.date, keep_parts: bool) -> _ChunkResult:
    assert _WORKER_ENGINE is not None, "worker not initialised"
    return _select_render(_WORKER_ENGINE, items, date, keep_parts)


def _pool_size(settings: Settings, active: int, only: str | None) -> int:
    """Worker processes for selection + rendering: ``delivery.render_workers`` if set, else
    one per CPU for lists of at least POOL_MIN_SUBSCRIBERS; 0 renders in this process."""
    wanted = settings.delivery.render_workers
    if only is not None or wanted == 0:
        return 0
    if wanted is None:
        return (os.cpu_count() or 1) if active >= POOL_MIN_SUBSCRIBERS else 0
    return wanted


class _Work:
    """Selection + rendering of chunks of subscribers, in order: in a process pool (both
    cores busy, the event loop free for the SMTP connections) or inline."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        date: dt.date,
        now: dt.datetime,
        workers: int,
        keep_parts: bool = True,
    ) -> None:
        self.engine = engine
        self.date = date
        self.keep_parts = keep_parts
        self.workers = workers
        self.pool: Executor | None = None
        self.queue: deque[Future[_ChunkResult] | _ChunkResult] = deque()
        self.chunk = RENDER_CHUNK
        self.max_backlog = 2 * workers + 1
        if workers:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # "spawn": clean workers (no copy of this process's threads and connections),
            # direct children of this one, so they can die with it (_die_with_parent).
            self.pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_start,
                initargs=(settings, engine.day, now, _json_logs(), os.getpid()),
            )
            _widen_result_pipe(self.pool)
            log.info("render pool started", workers=workers)
        else:
            from concurrent.futures import ThreadPoolExecutor

            # Inline, but off the event loop (DKIM signing, templates): one thread keeps
            # chunks in order and the loop free for SMTP and the HTTP endpoint.
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="digestd-render")

    def backlog(self) -> int:
        return len(self.queue)

    def submit(self, items: Sequence[_Item]) -> None:
        if self.pool is None:
            self.queue.append(_select_render(self.engine, items, self.date, self.keep_parts))
        elif not self.workers:
            self.queue.append(
                self.pool.submit(_select_render, self.engine, items, self.date, self.keep_parts)
            )
        else:
            self.queue.append(
                self.pool.submit(_worker_chunk, list(items), self.date, self.keep_parts)
            )

    async def next_result(self, stages: dict[str, float]) -> list[_Outcome]:
        head = self.queue.popleft()
        if isinstance(head, Future):
            head = await asyncio.wrap_future(head)
        outcomes, select_s, render_s = head
        stages["select"] += select_s
        stages["render"] += render_s
        return outcomes

    def close(self) -> None:
        self.queue.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


RESULT_PIPE_BYTES = 1 << 20  # a chunk's finished messages (~1.4 MB) in one or two fills


def _widen_result_pipe(pool: Executor) -> None:
    """Give the pipe that brings finished messages back from the workers 1 MiB instead of
    64 KiB, so a chunk crosses in a couple of fills instead of ~20 (each a wake-up on both
    sides). Best effort: Linux only, and the pool's queue is not public API."""
    import fcntl

    set_size = getattr(fcntl, "F_SETPIPE_SZ", 1031)
    try:
        reader = cast(Any, pool)._result_queue._reader
        fcntl.fcntl(reader.fileno(), set_size, RESULT_PIPE_BYTES)
    except (AttributeError, OSError, ValueError) as exc:
        log.debug("result pipe left as it is", reason=str(exc))


def _json_logs() -> bool:
    """Whether this process logs JSON lines (so pool workers log the same way)."""
    processors = structlog.get_config().get("processors") or [None]
    return isinstance(processors[-1], structlog.processors.JSONRenderer)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _GroupCommit:
    """Commits the server's replies to the ledger in groups (one transaction each).

    ``record`` returns once *its* reply is on disk. A group is gathered for at most
    ``window`` seconds, or until ``full`` replies wait (every connection's), and replies
    that arrive while a commit runs join the next one. Each commit is a hop to SQLite's
    thread (tens of µs of handing over); waiting a millisecond or two makes the groups
    several times larger while the connections wait for nothing else. Since every sender
    keeps its connection slot until ``record`` returns, at most ``delivery.concurrency``
    messages are ever with the server without their outcome committed: grouping does not
    raise the number of duplicates a crash can cause.
    """

    def __init__(
        self,
        store: Store,
        stages: dict[str, float],
        *,
        full: int = 1,
        window: float = GROUP_COMMIT_WINDOW,
    ) -> None:
        self.store = store
        self.stages = stages
        self.full = max(1, full)
        self.window = window
        self.pending: list[tuple[Delivery, asyncio.Future[None]]] = []
        self.leader: asyncio.Task[None] | None = None
        self.wake: asyncio.Future[None] | None = None
        self.groups = 0

    async def record(self, delivery: Delivery) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((delivery, done))
        if self.leader is None:
            self.leader = asyncio.create_task(self._commit_all())
        elif self.wake is not None and len(self.pending) >= self.full and not self.wake.done():
            self.wake.set_result(None)
        await done

    async def _gather(self) -> None:
        """Wait until ``full`` replies are pending or ``window`` has passed."""
        if self.window <= 0 or len(self.pending) >= self.full:
            return
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()
        self.wake = wake
        timer = loop.call_later(self.window, _settle, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self.wake = None

    async def _commit_all(self) -> None:
        try:
            while self.pending:
                await self._gather()
                group, self.pending = self.pending, []
                tick = time.perf_counter()
                try:
                    await self.store.record_many([(d, None) for d, _ in group])
                except BaseException as exc:
                    for _, done in group:
                        if not done.done():
                            done.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                finally:
                    self.stages["ledger"] += time.perf_counter() - tick
                self.groups += 1
                for _, done in group:
                    if not done.done():
                        done.set_result(None)
        finally:
            self.leader = None
            for _, done in self.pending:  # only left when cancelled
                if not done.done():
                    done.cancel()
            self.pending = []


class _Sender:
    """Claims, sends and records digests with bounded concurrency."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        date: dt.date,
        summary: RunSummary,
        transport: Any,
        run_id: int | None,
        retry_base: float | None,
        *,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.released = 0  # claimed, then not sent because of ``stop``
        self.store = store
        self.date = date
        self.summary = summary
        self.transport = transport
        self.run_id = run_id
        self.retry_base = 30.0 if retry_base is None else retry_base
        self.deferred: dict[int, tuple[RenderedDigest, int]] = {}
        self.envelope_from = settings.digest.from_address
        self.rng = random.Random()
        self.unknown_seen: set[int] = set()  # "unknown" is retried once, then final
        self.policy_streak = 0  # consecutive 5.7.x rejections
        self.paused_reason = ""
        self.fatal: BaseException | None = None  # a transport error that hits every message
        self.stages = summary.stages
        self.ledger = _GroupCommit(store, summary.stages, full=settings.delivery.concurrency)
        # Shared by every batch in flight: never more than ``concurrency`` messages handed to
        # the server without their reply committed (the crash bound).
        self.limit = asyncio.Semaphore(settings.delivery.concurrency)

    def halted(self) -> bool:
        return bool(
            (self.stop is not None and self.stop.is_set()) or self.paused_reason or self.fatal
        )

    async def _send(self, message: RenderedDigest) -> Delivery | None:
        """One transaction; a setup-level failure (TLS, login, sender refused) halts the run."""
        from .errors import ConfigError, TransportSetupError

        tick = time.perf_counter()
        try:
            return cast(Delivery, await self.transport.send(message, self.envelope_from))
        except (TransportSetupError, ConfigError) as exc:
            if self.fatal is None:
                self.fatal = exc
                log.error("transport failed; stopping the run", error=str(exc))
            return None
        finally:
            self.stages["send"] += time.perf_counter() - tick

    async def send_batch(self, messages: Sequence[RenderedDigest]) -> None:
        if not messages:
            return
        tick = time.perf_counter()
        claimed = await self.store.claim_many(
            [(m.subscriber_id, m.message_id, m.paper_ids) for m in messages], self.date, self.run_id
        )
        self.stages["ledger"] += time.perf_counter() - tick
        todo = [m for m in messages if m.subscriber_id in claimed]
        self.summary.skipped += len(messages) - len(todo)
        limit = self.limit
        unsent: list[RenderedDigest] = []

        async def one(message: RenderedDigest) -> None:
            # The slot is held until the reply is committed, so at most ``concurrency``
            # messages are ever handed to the server without their outcome on disk: that
            # bounds the duplicates a crash can cause.
            async with limit:
                if self.halted():
                    unsent.append(message)  # stopping: start no new transaction
                    return
                delivery = await self._send(message)
                if delivery is None:
                    unsent.append(message)
                    return
                await self._record(message, delivery, attempt=1)

        await asyncio.gather(*(one(m) for m in todo))
        for message in unsent:
            # Never handed to the server: back to pending for the next run.
            await self.store.set_state(message.subscriber_id, self.date, "pending")
        self.released += len(unsent)
        if self.fatal is not None:
            raise self.fatal

    async def _record(self, message: RenderedDigest, delivery: Delivery, attempt: int) -> None:
        """Commit the server's reply, then act on it.

        4xx → deferred, retried with backoff up to ``max_attempts``; ``unknown`` (the
        connection was lost after the body) → retried once; 5.1.x → hard bounce, the
        subscriber is suppressed; 5.7.x (policy) → deferred, never suppressed, and the run
        pauses when they pile up (the sender's reputation or authentication is the problem,
        not the reader).
        """
        from .deliver import is_hard_bounce, is_policy

        sub_id = message.subscriber_id
        max_attempts = self.settings.delivery.max_attempts
        policy = delivery.state == "failed" and is_policy(delivery.reply)
        if policy:
            delivery = replace(delivery, state="deferred")
            self.policy_streak += 1
            log.error(
                "policy rejection (5.7.x): check SPF, DKIM and the sending IP's reputation",
                email=message.email,
                reply=delivery.reply,
                streak=self.policy_streak,
            )
            if self.policy_streak >= POLICY_PAUSE_AFTER and not self.paused_reason:
                self.paused_reason = (
                    f"paused after {self.policy_streak} policy rejections in a row"
                    f" (last: {delivery.reply})"
                )
                log.error("run paused", reason=self.paused_reason)
        elif delivery.state == "accepted":
            self.policy_streak = 0
        state = delivery.state
        if state == "unknown" and sub_id in self.unknown_seen:
            delivery = replace(delivery, state="failed", reply=f"unknown twice: {delivery.reply}")
        elif state == "deferred" and attempt >= max_attempts:
            delivery = replace(
                delivery,
                state="failed",
                reply=f"gave up after {attempt} attempts: {delivery.reply}",
            )
        state = delivery.state
        await self.ledger.record(delivery)
        if state == "accepted":
            self.summary.sent += 1
            self.summary.sent_bytes += message_size(message.message)
            self.deferred.pop(sub_id, None)
        elif state in ("deferred", "unknown"):
            if state == "unknown":
                self.unknown_seen.add(sub_id)
            self.deferred[sub_id] = (message, attempt)
            log.warning(
                "delivery deferred", email=message.email, reply=delivery.reply, attempt=attempt
            )
        else:
            self.deferred.pop(sub_id, None)
            self.summary.failed += 1
            log.error("delivery failed", email=message.email, reply=delivery.reply)
            if is_hard_bounce(delivery.reply):
                await self.store.suppress(sub_id, f"hard bounce: {delivery.reply}")
                log.warning("subscriber suppressed", email=message.email, reply=delivery.reply)

    async def retry_deferred(self, stop: asyncio.Event | None) -> None:
        """Retry 4xx/unknown digests with jittered exponential backoff, up to max_attempts."""
        deadline = time.monotonic() + MAX_RETRY_WINDOW.total_seconds()
        while self.deferred:
            if self.halted():
                break
            attempt = max(a for _, a in self.deferred.values()) + 1
            wait = backoff(attempt - 1, self.retry_base, self.rng)
            if time.monotonic() + wait > deadline:
                break
            log.info("retrying deferred digests", count=len(self.deferred), wait=round(wait, 2))
            if stop is not None:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=wait)
                    break
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(wait)
            batch = list(self.deferred.values())
            self.deferred.clear()
            for index, (message, tries) in enumerate(batch):
                if self.halted():
                    # Not retried now; their rows stay deferred for the next run.
                    self.deferred.update({m.subscriber_id: (m, t) for m, t in batch[index:]})
                    break
                if not await self.store.claim(
                    message.subscriber_id,
                    self.date,
                    message.message_id,
                    message.paper_ids,
                    self.run_id,
                ):
                    continue
                delivery = await self._send(message)
                if delivery is None:
                    await self.store.set_state(message.subscriber_id, self.date, "pending")
                    continue
                await self._record(
                    message, replace(delivery, attempts=tries + 1), attempt=tries + 1
                )
        if self.fatal is not None:
            raise self.fatal
        self.summary.deferred = len(self.deferred)
