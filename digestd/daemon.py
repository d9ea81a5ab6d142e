"""``digestd run``: the scheduler daemon.

Subscribers fall into *slots* — distinct (timezone, send_at, cadence), with the configured
``[digest]`` defaults filled in. The daemon sleeps until the next send of any slot, then runs
one pipeline pass per local digest date for the slots that came due, limited (``include=``)
to their subscribers. It wakes at least every :data:`MAX_SLEEP` seconds to pick up new slots
and to survive wall-clock jumps: every iteration handles the sends in the window
``(previous iteration, now]``, so a send is neither skipped nor run twice by the scheduler
(and the ledger makes a second run harmless anyway).

On start it *catches up*: a slot whose send time today (local) has passed and whose digests
for today are not all final gets one run, trigger ``catch-up``, with the reason recorded.
A failed run (sources down, SMTP refused the login…) is retried with backoff until the
slot's next send.

systemd (``Type=notify``): ``READY=1`` after the self-check (store, templates, transport),
``STATUS=`` with progress, ``WATCHDOG=1`` from the event loop, SIGHUP reloads the config
file and templates (``RELOADING=1`` … ``READY=1``; a bad config is refused and the running
one kept), SIGTERM/SIGINT send ``STOPPING=1``, start no new SMTP transaction, let the ones
in flight finish and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import signal
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from .config import Settings, load_config, read_secret, resolve_path
from .errors import ConfigError, DigestdError
from .models import Cadence, Subscriber
from .notify import Notifier
from .pipeline import RunSummary, run_once
from .schedule import Send, next_send, sends_between, today_send
from .store import Store

log = structlog.get_logger(__name__)

# Wake at least this often: new subscribers' slots, wall-clock jumps, config reloads.
MAX_SLEEP = 60.0
# A failed run is retried after 5, 10, 20, 40, 60, 60 … minutes, until the slot's next send.
RETRY_FIRST = 300.0
RETRY_MAX = 3600.0
# Upper bound on the SIGTERM drain beyond the SMTP transaction deadline.
DRAIN_MARGIN = 10.0

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True, order=True)
class Slot:
    """Subscribers who get their digest at the same local time in the same timezone."""

    timezone: str
    send_at: str
    cadence: Cadence

    def __str__(self) -> str:
        return f"{self.send_at} {self.timezone} {self.cadence}"

    def key(self) -> tuple[str, str, str]:
        return (self.timezone, self.send_at, self.cadence)


def slot_of(sub: Subscriber, settings: Settings) -> Slot:
    prefs = sub.prefs
    return Slot(
        prefs.timezone or settings.digest.timezone,
        prefs.send_at or settings.digest.send_at,
        prefs.cadence,
    )


def resolve_slots(
    rows: Iterable[tuple[str | None, str | None, str]], settings: Settings
) -> list[Slot]:
    """Store rows (None = the default) → distinct slots, sorted."""
    out: set[Slot] = set()
    for timezone, send_at, cadence in rows:
        if cadence not in ("daily", "weekdays", "weekly"):
            continue  # the schema forbids it; never schedule garbage
        out.add(
            Slot(
                timezone or settings.digest.timezone,
                send_at or settings.digest.send_at,
                cadence,  # type: ignore[arg-type]
            )
        )
    return sorted(out)


@dataclass(frozen=True, slots=True)
class Due:
    """A send that came due: ``slot``'s digest for ``send.date``."""

    slot: Slot
    send: Send


def due_between(slots: Sequence[Slot], after: dt.datetime, upto: dt.datetime) -> list[Due]:
    """For each slot, its latest send in (after, upto] (older missed sends are superseded)."""
    out: list[Due] = []
    for slot in slots:
        sends = sends_between(after, upto, slot.send_at, slot.timezone, slot.cadence)
        if sends:
            out.append(Due(slot, sends[-1]))
    return out


def next_due(slots: Sequence[Slot], now: dt.datetime) -> Due | None:
    """The first send strictly after ``now`` across all slots."""
    dues = [Due(s, next_send(now, s.send_at, s.timezone, s.cadence)) for s in slots]
    return min(dues, key=lambda d: (d.send.at, d.slot)) if dues else None


def by_date(dues: Iterable[Due]) -> dict[dt.date, list[Due]]:
    groups: dict[dt.date, list[Due]] = {}
    for due in sorted(dues, key=lambda d: (d.send.date, d.slot)):
        groups.setdefault(due.send.date, []).append(due)
    return groups


def _describe(dues: Sequence[Due]) -> str:
    names = ", ".join(str(d.slot) for d in dues[:3])
    return names + (f" (+{len(dues) - 3} more)" if len(dues) > 3 else "")


async def self_check(settings: Settings, *, transport: bool = True) -> None:
    """Templates load, the DKIM key is readable, the transport connects (+TLS +login).

    Raises a :class:`DigestdError` with a one-line reason.
    """
    from .render import Renderer

    try:
        Renderer()
    except DigestdError:
        raise
    except Exception as exc:  # a template syntax error, a missing file …
        raise ConfigError(f"templates: {type(exc).__name__}: {exc}") from None
    if settings.dkim.enabled and not read_secret(
        "dkim-private-key", settings.dkim.private_key_file, "DIGESTD_DKIM_KEY"
    ):
        raise ConfigError("dkim.private_key_file: no DKIM private key found")
    if transport:
        from .deliver import make_transport

        conn = make_transport(settings)
        await conn.__aenter__()
        try:
            async with asyncio.timeout(settings.smtp.timeout + 5):
                await conn.check()
        except TimeoutError:
            raise DigestdError(f"{settings.delivery.transport}: check timed out") from None
        finally:
            await conn.__aexit__(None, None, None)


def _web_factory() -> Callable[[Settings, Store, asyncio.Event], Coroutine[Any, Any, Any]] | None:
    """``digestd.web.serve_http`` when that module exists (the one call site for it)."""
    try:
        module = importlib.import_module(".web", __package__)
    except ImportError:
        return None
    factory: Callable[[Settings, Store, asyncio.Event], Coroutine[Any, Any, Any]] | None
    factory = getattr(module, "serve_http", None)
    return factory


class Daemon:
    """The scheduler. Time enters only through ``clock`` (tests pass their own)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        notifier: Notifier,
        *,
        config_path: Path | None = None,
        clock: Clock = utcnow,
        run: Callable[..., Coroutine[Any, Any, RunSummary]] = run_once,
    ) -> None:
        self.settings = settings
        self.store = store
        self.notifier = notifier
        self.config_path = config_path
        self.clock = clock
        self._run_once = run
        self.stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._cursor: dt.datetime | None = None
        # (date, slot) → (attempts so far, retry at)
        self._retries: dict[tuple[dt.date, Slot], tuple[int, dt.datetime]] = {}
        self._reload_lock = asyncio.Lock()
        self._web_task: asyncio.Task[Any] | None = None
        self._web_stop: asyncio.Event | None = None

    # ------------------------------------------------------------------ schedule
    async def slots(self) -> list[Slot]:
        return resolve_slots(await self.store.delivery_slots(), self.settings)

    async def catch_up(self, now: dt.datetime | None = None) -> int:
        """Run today's sends that are past and not complete; returns the number of runs."""
        now = now or self.clock()
        defaults = (self.settings.digest.timezone, self.settings.digest.send_at)
        dues: list[Due] = []
        reasons: dict[Slot, str] = {}
        for slot in await self.slots():
            send = today_send(now, slot.send_at, slot.timezone, slot.cadence)
            if send is None:
                continue
            total, done = await self.store.slot_progress(send.date, slot.key(), defaults)
            if total == 0 or done >= total:
                continue
            reasons[slot] = (
                f"catch-up: started after the {slot.send_at} {slot.timezone} send time of"
                f" {send.date.isoformat()}; {total - done} of {total} digests not yet final"
            )
            log.info(
                "catching up",
                slot=str(slot),
                date=send.date.isoformat(),
                pending=total - done,
                total=total,
                reason=reasons[slot],
            )
            dues.append(Due(slot, send))
        runs = 0
        for date, group in by_date(dues).items():
            if self.stop.is_set():
                break
            why = "; ".join(reasons[d.slot] for d in group)
            await self._run_group(date, group, "catch-up", why)
            runs += 1
        return runs

    async def step(self, now: dt.datetime | None = None) -> dt.datetime | None:
        """Handle the sends (and retries) due in (last step, now]; return the next wake-up."""
        now = now or self.clock()
        after = self._cursor if self._cursor is not None else now
        # The cursor never moves back: if the wall clock does, the sends already handled
        # are not handled again when it passes them a second time.
        self._cursor = max(after, now)
        slots = await self.slots()
        groups = by_date(due_between(slots, after, now))
        for date, group in groups.items():
            if self.stop.is_set():
                return None
            await self._run_group(date, group, "schedule", "")
        await self._run_retries(now)
        upcoming = next_due(slots, now)
        wake = upcoming.send.at if upcoming else None
        for _, at in self._retries.values():
            wake = at if wake is None else min(wake, at)
        if upcoming is not None:
            self.notifier.status(
                f"idle; next digest {upcoming.send.date.isoformat()} at"
                f" {upcoming.send.at.isoformat(timespec='minutes')}"
                f" ({upcoming.slot}; {len(slots)} slots)"
            )
        else:
            self.notifier.status("idle; no active subscribers")
        return wake

    async def _run_retries(self, now: dt.datetime) -> None:
        due = [(key, n) for key, (n, at) in self._retries.items() if at <= now]
        for (date, slot), _ in sorted(due, key=lambda item: (item[0][0], item[0][1])):
            if self.stop.is_set():
                return
            dues = [Due(slot, Send(now, date))]
            await self._run_group(date, dues, "retry", "retry after a failed run")

    async def _run_group(self, date: dt.date, dues: Sequence[Due], trigger: str, why: str) -> None:
        settings = self.settings
        wanted = {d.slot for d in dues}
        label = f"{date.isoformat()} {_describe(dues)}"

        def include(sub: Subscriber) -> bool:
            return slot_of(sub, settings) in wanted

        def progress(text: str) -> None:
            self.notifier.status(f"sending {label}: {text}")

        self.notifier.status(f"sending {label}")
        log.info("run starting", trigger=trigger, date=date.isoformat(), slots=_describe(dues))
        failed = ""
        try:
            summary = await self._run_once(
                settings,
                self.store,
                date,
                include=include,
                trigger=trigger,
                stop=self.stop,
                progress=progress,
                why=why,
            )
            if summary.state == "failed":
                failed = summary.reason or "failed"
        except DigestdError as exc:
            failed = str(exc)
            log.error("run failed", trigger=trigger, date=date.isoformat(), error=failed)
        except Exception as exc:  # keep the daemon alive; the run is retried
            failed = f"{type(exc).__name__}: {exc}"
            log.exception("run crashed", trigger=trigger, date=date.isoformat())
        now = self.clock()
        for due in dues:
            key = (date, due.slot)
            if not failed or self.stop.is_set():
                self._retries.pop(key, None)
                continue
            attempts = self._retries.get(key, (0, now))[0] + 1
            delay = min(RETRY_FIRST * 2 ** (attempts - 1), RETRY_MAX)
            at = now + dt.timedelta(seconds=delay)
            nxt = next_send(now, due.slot.send_at, due.slot.timezone, due.slot.cadence)
            if at >= nxt.at:
                self._retries.pop(key, None)
                log.error(
                    "giving up on the digests of the day",
                    slot=str(due.slot),
                    date=date.isoformat(),
                    reason=failed,
                )
            else:
                self._retries[key] = (attempts, at)
                log.warning(
                    "run will be retried",
                    slot=str(due.slot),
                    date=date.isoformat(),
                    retry_at=at.isoformat(timespec="seconds"),
                    reason=failed,
                )

    async def run_forever(self) -> None:
        """Catch up, then loop: sleep until the next send (or a signal), handle what is due."""
        self._cursor = self.clock()
        await self.catch_up(self._cursor)
        while not self.stop.is_set():
            wake = await self.step()
            if self.stop.is_set():
                break
            delay = MAX_SLEEP
            if wake is not None:
                delay = min(MAX_SLEEP, max(0.0, (wake - self.clock()).total_seconds()) + 0.01)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    # ------------------------------------------------------------------ signals
    def request_stop(self, why: str = "SIGTERM") -> None:
        if self.stop.is_set():
            return
        log.info("stopping: no new messages; finishing those in flight", signal=why)
        self.notifier.stopping("stopping: finishing the messages in flight")
        self.stop.set()
        self._wake.set()
        if self._web_stop is not None:
            self._web_stop.set()

    async def reload(self) -> bool:
        """Re-read the config file and templates; keep the running ones if anything is wrong."""
        async with self._reload_lock:
            self.notifier.reloading()
            self.notifier.status("reloading configuration")
            old = self.settings
            path = self.config_path or old.source_path or resolve_path(None)
            try:
                new = await asyncio.to_thread(load_config, path)
                if Path(new.store.path) != Path(old.store.path):
                    raise ConfigError(
                        f"{path}: store.path: cannot change on reload; restart digestd"
                    )
                delivery_changed = (new.smtp, new.delivery) != (old.smtp, old.delivery)
                await self_check(new, transport=delivery_changed)
            except Exception as exc:
                reason = str(exc) if isinstance(exc, DigestdError) else repr(exc)
                log.error(
                    "reload refused; keeping the running configuration",
                    config=str(path),
                    error=reason,
                )
                self.notifier.ready(f"reload refused ({reason}); running the previous config")
                return False
            self.settings = new
            if new.http != old.http:
                await self._restart_web(old)
            self._wake.set()
            log.info("configuration reloaded", config=str(path))
            self.notifier.ready("configuration reloaded")
            return True

    # ------------------------------------------------------------------ web
    async def start_web(self) -> asyncio.Task[Any] | None:
        if not self.settings.http.enabled:
            return None
        factory = _web_factory()
        if factory is None:
            log.warning("HTTP endpoint not available in this build (no digestd.web)")
            return None
        self._web_stop = asyncio.Event()
        task = asyncio.create_task(
            factory(self.settings, self.store, self._web_stop), name="digestd-http"
        )
        await asyncio.sleep(0)  # it binds its socket before its first await
        if task.done():
            task.result()  # e.g. ConfigError: http.listen: cannot listen there
        self._web_task = task
        return task

    async def _restart_web(self, old: Settings) -> None:
        await self.stop_web()
        try:
            await self.start_web()
        except Exception as exc:
            log.error("new [http] settings failed; keeping the old endpoint", error=str(exc))
            self.settings = self.settings.model_copy(update={"http": old.http})
            await self.start_web()

    async def stop_web(self) -> None:
        task, self._web_task = self._web_task, None
        if self._web_stop is not None:
            self._web_stop.set()
        if task is not None:
            try:
                async with asyncio.timeout(5):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
            except Exception as exc:  # already logged by the task's owner
                log.warning("HTTP endpoint ended with an error", error=str(exc))

    @property
    def web_task(self) -> asyncio.Task[Any] | None:
        return self._web_task

    def forget_web(self) -> None:
        """The endpoint task ended on its own; stop watching it."""
        self._web_task = None


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """``WATCHDOG=1`` every ``interval`` s from the event loop: a stuck loop stops the pings."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


async def serve(
    settings: Settings,
    config_path: str | None,
    *,
    clock: Clock = utcnow,
    notifier: Notifier | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the process exit code."""
    notifier = notifier or Notifier.from_env()
    loop = asyncio.get_running_loop()
    background: list[asyncio.Task[Any]] = []
    interval = notifier.watchdog_interval()
    if interval:
        background.append(asyncio.create_task(_watchdog(notifier, interval), name="watchdog"))
    path = Path(config_path) if config_path else (settings.source_path or resolve_path(None))
    daemon: Daemon | None = None
    pending_signals: list[str] = []
    installed: list[signal.Signals] = []

    def on_stop(name: str) -> None:
        if daemon is None:
            pending_signals.append(name)
        else:
            daemon.request_stop(name)

    def on_hup() -> None:
        if daemon is None:
            log.info("SIGHUP before ready: ignored")
            return
        background.append(asyncio.create_task(daemon.reload(), name="reload"))

    for signum, handler in (
        (signal.SIGTERM, lambda: on_stop("SIGTERM")),
        (signal.SIGINT, lambda: on_stop("SIGINT")),
        (signal.SIGHUP, on_hup),
    ):
        loop.add_signal_handler(signum, handler)
        installed.append(signum)
    try:
        notifier.status("starting: self-check")
        async with Store.open(settings.store.path) as store:
            await self_check(settings)
            daemon = Daemon(settings, store, notifier, config_path=path, clock=clock)
            await daemon.start_web()
            notifier.ready("ready")
            log.info(
                "digestd ready",
                config=str(path),
                store=str(settings.store.path),
                transport=settings.delivery.transport,
                watchdog_interval=interval,
            )
            if pending_signals:
                daemon.request_stop(pending_signals[0])
            return await _supervise(daemon, settings)
    except ConfigError as exc:
        log.error("cannot start", error=str(exc))
        notifier.status(f"failed: {exc}")
        return exc.exit_code
    except DigestdError as exc:
        log.error("cannot start", error=str(exc))
        notifier.status(f"failed: {exc}")
        return 1
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)


async def _supervise(daemon: Daemon, settings: Settings) -> int:
    """Run the scheduler (and the HTTP endpoint) until stopped; drain on SIGTERM."""
    main = asyncio.create_task(daemon.run_forever(), name="scheduler")
    stopped = asyncio.create_task(daemon.stop.wait(), name="stop")
    code = 0
    try:
        while True:
            waiting: set[asyncio.Task[Any]] = {main, stopped}
            if daemon.web_task is not None:
                waiting.add(daemon.web_task)
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if main in done:
                if not main.cancelled() and main.exception() is not None:
                    exc = main.exception()
                    log.error(
                        "scheduler crashed", error=f"{type(exc).__name__}: {exc}", exc_info=exc
                    )
                    code = 1
                break
            web = daemon.web_task
            if web is not None and web in done:
                daemon.forget_web()
                if not daemon.stop.is_set():
                    exc = web.exception() if not web.cancelled() else None
                    log.error("HTTP endpoint stopped; exiting", error=str(exc) if exc else None)
                    daemon.request_stop("http")
                    code = 1
            if stopped in done:
                # Let the run in progress finish its transactions, but never past the deadline.
                grace = settings.smtp.timeout + DRAIN_MARGIN
                try:
                    async with asyncio.timeout(grace):
                        await asyncio.shield(main)
                except TimeoutError:
                    log.error("drain took too long; cancelling the run", seconds=grace)
                    main.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await main
                break
    finally:
        stopped.cancel()
        await daemon.stop_web()
    log.info("digestd stopped", exit_code=code)
    return code
