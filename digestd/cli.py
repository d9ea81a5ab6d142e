"""The ``digestd`` command line. Thin: it parses, validates, calls the store or the pipeline,
and prints. Heavy modules are imported inside the commands so ``digestd --help`` is fast.

Exit codes: 0 success; 1 the job failed; 2 bad usage or configuration; 3 partial.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from .config import Settings
    from .models import Preferences, Subscriber
    from .store import Store

T = TypeVar("T")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


def _examples(*lines: str) -> str:
    """A help epilog showing example command lines (``\\b`` keeps click from rewrapping)."""
    label = "Example" if len(lines) == 1 else "Examples"
    return f"{label}:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"digestd: {message}", err=True)
    sys.exit(code)


LOOP_ENV = "DIGESTD_EVENT_LOOP"  # "asyncio": the standard library's loop, not uvloop


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop every command runs on: uvloop's when it is installed (a dependency
    on Linux and macOS), with which the process that sends a run spends about a tenth less
    CPU per message than with the standard loop; ``DIGESTD_EVENT_LOOP=asyncio`` or a
    missing uvloop gives the standard library's (None)."""
    import os

    wanted = os.environ.get(LOOP_ENV, "").strip().lower()
    if wanted not in ("", "uvloop", "asyncio"):
        _fail(f"{LOOP_ENV}={wanted[:40]!r}: expected 'uvloop' or 'asyncio'")
    if wanted == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if wanted == "uvloop":
            _fail(f"{LOOP_ENV}=uvloop, but uvloop is not installed")
        return None
    return uvloop.new_event_loop


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning digestd's errors into one line and an exit code."""
    from .errors import DigestdError, ValidationError

    try:
        factory = loop_factory()
    except BaseException:
        coro.close()  # never started: no "was never awaited" warning
        raise
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)
    except ValidationError as exc:
        for problem in exc.problems:
            click.echo(f"digestd: {problem}", err=True)
        sys.exit(EXIT_USAGE)
    except DigestdError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_FAILED)


class Ctx:
    def __init__(self, config: str | None, log_format: str | None) -> None:
        self.config_arg = config
        self.log_format = log_format
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from .config import load_config, resolve_path
            from .errors import ConfigError

            try:
                self._settings = load_config(resolve_path(self.config_arg))
            except ConfigError as exc:
                _fail(str(exc))
        return self._settings

    def setup_logging(self) -> None:
        from . import logs

        json_logs = None if self.log_format is None else self.log_format == "json"
        logs.configure(json=json_logs)

    def with_store(self, fn: Callable[[Store], Awaitable[T]]) -> T:
        from .store import Store

        settings = self.settings

        async def go() -> T:
            async with Store.open(settings.store.path) as store:
                return await fn(store)

        return _run(go())


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=_examples(
        "digestd --config /etc/digestd/digestd.toml run-once --dry-run",
    ),
)
@click.option(
    "--config",
    "config",
    metavar="PATH",
    help="Config file (else $DIGESTD_CONFIG, ./digestd.toml, /etc/digestd/digestd.toml).",
)
@click.option(
    "--log-format",
    type=click.Choice(["json", "console"]),
    default=None,
    help="Log format (default: JSON unless stderr is a terminal).",
)
@click.version_option(package_name="digestd")
@click.pass_context
def cli(ctx: click.Context, config: str | None, log_format: str | None) -> None:
    """digestd — a daily digest of trending research papers, by email."""
    ctx.obj = Ctx(config, log_format)
    ctx.obj.setup_logging()


# ---------------------------------------------------------------------------- run / run-once
@cli.command(
    epilog=_examples(
        "digestd --config /etc/digestd/digestd.toml run",
    )
)
@pass_ctx
def run(ctx: Ctx) -> None:
    """Run the daemon: schedule, HTTP endpoint, systemd notify, signals."""
    ctx.setup_logging()
    settings = ctx.settings
    from .daemon import serve

    code = _run(serve(settings, ctx.config_arg))
    sys.exit(code)


def _parse_date(value: str | None) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        _fail(f"--date {value!r}: expected YYYY-MM-DD")


@cli.command(
    "run-once",
    epilog=_examples(
        "digestd run-once",
        "digestd run-once --date 2026-11-24 --dry-run",
        "digestd run-once --only ada@example.org",
    ),
)
@click.option(
    "--date",
    "date_",
    metavar="YYYY-MM-DD",
    help="Digest date (default: today in the configured timezone).",
)
@click.option("--dry-run", is_flag=True, help="Select and render, but send and record nothing.")
@click.option("--only", metavar="EMAIL", help="Only this subscriber.")
@pass_ctx
def run_once(ctx: Ctx, date_: str | None, dry_run: bool, only: str | None) -> None:
    """One pipeline pass for a digest date. Safe to repeat: never sends the same digest twice."""
    ctx.setup_logging()
    settings = ctx.settings
    from .pipeline import run_once as do_run
    from .pipeline import today_in
    from .validation import normalize_email

    day = _parse_date(date_) or today_in(settings.digest.timezone)
    email = None
    if only is not None:
        email = _validated(lambda: normalize_email(only))
    progress = _progress_printer() if sys.stderr.isatty() else None

    async def go(store: Store) -> Any:
        # SIGTERM/SIGINT: finish the transactions in flight, start no new one, record the
        # rest as pending for the next run.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await do_run(
            settings, store, day, dry_run=dry_run, only=email, progress=progress, stop=stop
        )

    summary = ctx.with_store(go)
    if progress is not None:
        click.echo(err=True)  # end the progress line
    if dry_run:
        for msg in summary.dry_run_messages:
            click.echo(f"would send to {msg.email}: {msg.subject} ({len(msg.paper_ids)} papers)")
    click.echo(
        f"{summary.state}: {summary.sent} sent, {summary.skipped} skipped, {summary.failed} failed,"
        f" {summary.deferred} deferred ({summary.fetched} papers, {summary.subscribers}"
        f" subscribers, {summary.seconds:.1f} s)"
        + (f" — {summary.reason}" if summary.reason else "")
    )
    sys.exit(summary.exit_code)


def _progress_printer() -> Callable[[str], None]:
    """One self-rewriting line on the terminal: a bar, counts, rate and time left."""
    import time

    started = time.monotonic()
    width = 24

    def show(text: str) -> None:
        done, total = getattr(text, "done", 0), getattr(text, "total", 0)
        elapsed = max(time.monotonic() - started, 1e-6)
        line = str(text)
        if total:
            filled = min(width, width * done // total)
            rate = getattr(text, "sent", 0) / elapsed
            left = (total - done) * elapsed / done if done else 0.0
            line = (
                f"[{'#' * filled}{'.' * (width - filled)}] {100 * done // total:3d}%  {line}"
                f"  {rate:,.0f}/s  {int(left) // 60}:{int(left) % 60:02d} left"
            )
        click.echo(f"\r\x1b[2K{line}", nl=False, err=True)

    return show


def _validated(fn: Callable[[], T]) -> T:
    from .errors import ValidationError

    try:
        return fn()
    except ValidationError as exc:
        for problem in exc.problems:
            click.echo(f"digestd: {problem}", err=True)
        sys.exit(EXIT_USAGE)


# ---------------------------------------------------------------------------- demo / preview
@cli.command(
    epilog=_examples(
        "digestd demo --outbox ./demo-outbox",
    )
)
@click.option(
    "--outbox",
    default="demo-outbox",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Maildir to write into.",
)
def demo(outbox: Path) -> None:
    """Run the whole job once on bundled sample papers and subscribers, with no network."""
    from . import logs
    from .demo import prepare_outbox, print_report, run_demo

    logs.configure(json=False)
    outbox = prepare_outbox(outbox)
    summary = _run(run_demo(outbox))
    print_report(outbox, summary)
    sys.exit(summary.exit_code)


@cli.command(
    epilog=_examples(
        "digestd preview ada@example.org --format text",
        "digestd preview ada@example.org --format html --output /tmp/ada.html",
        "digestd preview ada@example.org --date 2026-11-24 --format json",
    )
)
@click.argument("email")
@click.option("--date", "date_", metavar="YYYY-MM-DD", help="Digest date (default: today).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["html", "text", "eml", "json"]),
    default="text",
    show_default=True,
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to FILE instead of stdout.",
)
@pass_ctx
def preview(ctx: Ctx, email: str, date_: str | None, fmt: str, output: Path | None) -> None:
    """Select and render one subscriber's digest, without sending or recording anything."""
    ctx.setup_logging()
    settings = ctx.settings
    from .pipeline import Engine, fetch_papers, today_in
    from .validation import normalize_email

    address = _validated(lambda: normalize_email(email))
    day = _parse_date(date_) or today_in(settings.digest.timezone)

    async def go(store: Store) -> tuple[Any, Any]:
        sub = await store.get_subscriber(address)
        papers, failures = await fetch_papers(settings, day)
        if not papers and failures:
            from .errors import SourceError

            raise SourceError("every source failed: " + "; ".join(f"{n}: {w}" for n, w in failures))
        engine = Engine(settings, papers, await store.recent_papers(), dt.datetime.now(dt.UTC))
        sent = await store.sent_papers([sub.id], [p.id for p in papers])
        seeds = await store.get_papers(sub.prefs.seed_papers)
        digest, why = engine.select(sub, day, sent.get(sub.id, set()), seeds)
        return digest, (engine.render(digest) if digest.picks or fmt == "json" else why)

    digest, rendered = ctx.with_store(go)
    if fmt == "json":
        out = (
            json.dumps(
                {
                    "email": digest.subscriber.email,
                    "date": digest.date.isoformat(),
                    "subject": rendered.subject,
                    "papers": [
                        {
                            "id": p.paper.id,
                            "title": p.paper.title,
                            "score": round(p.score, 4),
                            "reasons": list(p.reasons),
                        }
                        for p in digest.picks
                    ],
                },
                ensure_ascii=False,
                indent=2,
            )
            + "\n"
        )
    elif isinstance(rendered, str):
        _fail(f"no digest for {address} on {day}: {rendered}", EXIT_OK)
    else:
        out = {"html": rendered.html, "text": rendered.text}.get(fmt) or rendered.message.decode(
            "utf-8", "replace"
        )
    if output is not None:
        output.write_text(out, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(out, nl=False)


# ---------------------------------------------------------------------------- status / check-config
@cli.command(
    epilog=_examples(
        "digestd status --json",
    )
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def status(ctx: Ctx, as_json: bool) -> None:
    """Recent runs, delivery counts by state, and the last failures."""

    async def go(store: Store) -> dict[str, Any]:
        runs = await store.recent_runs(10)
        return {
            "subscribers": await store.count_subscribers(),
            "deliveries": await store.delivery_counts(),
            "runs": [r.__dict__ if hasattr(r, "__dict__") else _slots(r) for r in runs],
            "failures": [_slots(f) for f in await store.recent_failures(10)],
        }

    info = ctx.with_store(go)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    subs = info["subscribers"]
    click.echo("subscribers: " + (", ".join(f"{n} {s}" for s, n in sorted(subs.items())) or "none"))
    dels = info["deliveries"]
    click.echo("deliveries:  " + (", ".join(f"{n} {s}" for s, n in sorted(dels.items())) or "none"))
    click.echo("recent runs:")
    for r in info["runs"] or []:
        click.echo(
            f"  #{r['id']} {r['digest_date']} {r['state']:<11} sent {r['sent']},"
            f" skipped {r['skipped']},"
            f" failed {r['failed']} ({r['seconds']:.1f} s) {r['started_at']}"
            + (f" — {r['reason']}" if r["reason"] else "")
        )
    if not info["runs"]:
        click.echo("  none yet")
    if info["failures"]:
        click.echo("last failures:")
        for f in info["failures"]:
            click.echo(
                f"  {f['digest_date']} {f['email']} {f['state']}"
                f" (attempts {f['attempts']}): {f['reply']}"
            )


def _config_warnings(settings: Settings) -> list[str]:
    """Valid, but probably not what an operator wants in production."""
    out = []
    if not settings.digest.base_url.startswith("https://"):
        out.append(
            f"digest.base_url {settings.digest.base_url!r} is not https: Gmail and Yahoo"
            " ignore one-click unsubscribe links that are not https"
        )
    if not settings.digest.postal_address:
        out.append("digest.postal_address is empty: bulk-sender rules expect one in the footer")
    if settings.delivery.transport == "smtp" and settings.smtp.security == "none":
        host = settings.smtp.host
        if host not in ("localhost", "127.0.0.1", "::1"):
            out.append(f"smtp.security is 'none' for the remote host {host!r}: no TLS")
    if not settings.sources:
        out.append("no [[sources]]: run-once will have no papers")
    return out


def _slots(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


@cli.command(
    "check-config",
    epilog=_examples(
        "digestd --config /etc/digestd/digestd.toml check-config",
        "digestd check-config --connect",
    ),
)
@click.option(
    "--connect", is_flag=True, help="Also log in to the SMTP server over the configured TLS mode."
)
@pass_ctx
def check_config(ctx: Ctx, connect: bool) -> None:
    """Validate the configuration (and, with --connect, the SMTP login)."""
    settings = ctx.settings
    from .render import Renderer

    try:
        Renderer()
    except Exception as exc:  # a template problem is a configuration problem
        _fail(f"templates: {exc}")
    click.echo(f"configuration OK: {settings.source_path}")
    for warning in _config_warnings(settings):
        click.echo(f"warning: {warning}", err=True)
    if connect:
        from .deliver import make_transport

        async def go() -> None:
            async with make_transport(settings) as transport:
                await transport.check()

        _run(go())
        click.echo(f"SMTP OK: {settings.smtp.host}:{settings.smtp.port} ({settings.smtp.security})")


# ---------------------------------------------------------------------------- subscribers
@cli.group()
def subscribers() -> None:
    """Add, change, inspect and bulk-edit subscribers."""


def _pref_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--name", help="Display name."),
        click.option(
            "--keyword",
            "keywords",
            multiple=True,
            metavar="PHRASE",
            help="Interest phrase (repeatable).",
        ),
        click.option(
            "--exclude",
            "exclude",
            multiple=True,
            metavar="PHRASE",
            help="Phrase that removes a paper (repeatable).",
        ),
        click.option(
            "--category",
            "categories",
            multiple=True,
            metavar="CAT",
            help="arXiv category, e.g. cs.LG (repeatable).",
        ),
        click.option(
            "--author",
            "authors",
            multiple=True,
            metavar="NAME",
            help="Followed author (repeatable).",
        ),
        click.option(
            "--seed-paper",
            "seed_papers",
            multiple=True,
            metavar="ARXIV_ID",
            help="A paper you liked: more like this (repeatable).",
        ),
        click.option(
            "--max-papers", type=int, metavar="N", help="At most N papers per digest (default 10)."
        ),
        click.option(
            "--min-upvotes", type=int, metavar="N", help="Leave out papers with fewer upvotes."
        ),
        click.option("--timezone", metavar="IANA", help="e.g. Europe/London."),
        click.option("--send-at", metavar="HH:MM", help="Local send time."),
        click.option(
            "--cadence", type=click.Choice(["daily", "weekdays", "weekly"]), help="How often."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


_LIST_OPTS = ("keywords", "exclude", "categories", "authors", "seed_papers")
_SCALAR_OPTS = ("max_papers", "min_upvotes", "timezone", "send_at", "cadence")


def _changes(opts: dict[str, Any], *, replace_lists: bool) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for key in _LIST_OPTS:
        if opts.get(key):
            changes[key] = list(opts[key])
    for key in _SCALAR_OPTS:
        if opts.get(key) is not None:
            changes[key] = opts[key]
    return changes


async def _check_seeds(settings: Settings, store: Store, prefs: Preferences) -> None:
    from .pipeline import ensure_seed_papers

    await ensure_seed_papers(settings, store, prefs.seed_papers)


def _print_subscriber(sub: Subscriber, as_json: bool) -> None:
    from .subscribers_file import subscriber_dict

    data = {**subscriber_dict(sub), "status": sub.status}
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False, indent=2))
        return
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(value) if value else "—"
        click.echo(f"{key:<12} {value}")


@subscribers.command(
    "add",
    epilog=_examples(
        "digestd subscribers add ada@example.org --name Ada --keyword 'mixture of experts'",
        "digestd subscribers add bob@example.org --category cs.LG --max-papers 8",
    ),
)
@click.argument("email")
@_pref_options
@click.option("--json", "as_json", is_flag=True, help="Print the new subscriber as JSON.")
@pass_ctx
def sub_add(ctx: Ctx, /, email: str, as_json: bool, **opts: Any) -> None:
    """Add a subscriber."""
    from .models import Preferences
    from .validation import check_name, check_preferences, normalize_email

    address = _validated(lambda: normalize_email(email))
    name = _validated(lambda: check_name(opts.get("name") or ""))
    prefs = _validated(lambda: check_preferences(Preferences(), _changes(opts, replace_lists=True)))
    settings = ctx.settings

    async def go(store: Store) -> Subscriber:
        await _check_seeds(settings, store, prefs)
        return await store.add_subscriber(address, name, prefs)

    sub = ctx.with_store(go)
    if as_json:
        _print_subscriber(sub, True)
    else:
        click.echo(f"added {sub.email}")


@subscribers.command(
    "set",
    epilog=_examples(
        "digestd subscribers set ada@example.org --keyword 'state space model' --max-papers 5",
        "digestd subscribers set ada@example.org --clear exclude",
    ),
)
@click.argument("email")
@_pref_options
@click.option(
    "--clear",
    multiple=True,
    type=click.Choice(
        [
            "keywords",
            "exclude",
            "categories",
            "authors",
            "seed-papers",
            "min-upvotes",
            "timezone",
            "send-at",
        ]
    ),
    help="Clear a preference (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_ctx
def sub_set(ctx: Ctx, /, email: str, clear: tuple[str, ...], as_json: bool, **opts: Any) -> None:
    """Change a subscriber's preferences. List options given replace the whole list."""
    from .validation import check_name, check_preferences, normalize_email

    address = _validated(lambda: normalize_email(email))
    name = None if opts.get("name") is None else _validated(lambda: check_name(opts["name"]))
    changes = _changes(opts, replace_lists=True)
    for field in clear:
        key = field.replace("-", "_")
        changes[key] = [] if key in _LIST_OPTS else None
    settings = ctx.settings

    async def go(store: Store) -> Subscriber:
        sub = await store.get_subscriber(address)
        prefs = check_preferences(sub.prefs, changes)
        await _check_seeds(settings, store, prefs)
        return await store.update_subscriber(address, name=name, prefs=prefs)

    sub = ctx.with_store(go)
    if as_json:
        _print_subscriber(sub, True)
    else:
        click.echo(f"updated {sub.email}")


@subscribers.command(
    "show",
    epilog=_examples(
        "digestd subscribers show ada@example.org --json",
    ),
)
@click.argument("email")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def sub_show(ctx: Ctx, email: str, as_json: bool) -> None:
    """Show one subscriber."""
    from .validation import normalize_email

    address = _validated(lambda: normalize_email(email))
    sub = ctx.with_store(lambda store: store.get_subscriber(address))
    _print_subscriber(sub, as_json)


@subscribers.command(
    "list",
    epilog=_examples(
        "digestd subscribers list --json",
    ),
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def sub_list(ctx: Ctx, as_json: bool) -> None:
    """List every subscriber."""
    from .subscribers_file import subscriber_dict

    subs = ctx.with_store(lambda store: store.list_subscribers())
    if as_json:
        click.echo(
            json.dumps(
                [{**subscriber_dict(s), "status": s.status} for s in subs],
                ensure_ascii=False,
                indent=2,
            )
        )
        return
    for s in subs:
        interests = (
            ", ".join((*s.prefs.keywords, *s.prefs.categories, *s.prefs.authors)) or "(everything)"
        )
        click.echo(f"{s.email:<40} {s.status:<12} {interests}")
    if not subs:
        click.echo("no subscribers", err=True)


def _status_command(name: str, status: str, verb: str) -> None:
    @subscribers.command(
        name,
        help=f"{verb.capitalize()} a subscriber.",
        epilog=f"Example:\n\n\b\n  digestd subscribers {name} ada@example.org",
    )
    @click.argument("email")
    @pass_ctx
    def command(ctx: Ctx, email: str) -> None:
        from .validation import normalize_email

        address = _validated(lambda: normalize_email(email))
        if status == "removed":
            ctx.with_store(lambda store: store.remove_subscriber(address))
        else:
            ctx.with_store(lambda store: store.set_status(address, status, reason=f"cli {name}"))
        click.echo(f"{verb} {address}")


_status_command("remove", "removed", "removed")
_status_command("pause", "paused", "paused")
_status_command("resume", "active", "resumed")


@subscribers.command(
    "import",
    epilog=_examples(
        "digestd subscribers import subscribers.toml --dry-run",
    ),
)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate and report, change nothing.")
@pass_ctx
def sub_import(ctx: Ctx, file: Path, dry_run: bool) -> None:
    """Add or update subscribers from a TOML file, all or nothing."""
    from .errors import ValidationError
    from .subscribers_file import parse

    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        _fail(f"{file}: not UTF-8 text")
    rows = _validated(lambda: parse(text, str(file)))
    settings = ctx.settings

    async def go(store: Store) -> dict[str, int]:
        problems: list[str] = []
        for row in rows:
            try:
                await _check_seeds(settings, store, row.prefs)
            except ValidationError as exc:
                problems.extend(f"{file}:{row.line}: {row.email!r}: {p}" for p in exc.problems)
        if problems:
            raise ValidationError(problems)
        return await store.replace_all([(r.email, r.name, r.prefs) for r in rows], dry_run=dry_run)

    result = ctx.with_store(go)
    prefix = "would import" if dry_run else "imported"
    click.echo(
        f"{prefix} {len(rows)} subscribers: {result['added']} added, {result['updated']} updated"
    )


@subscribers.command(
    "export",
    epilog=_examples(
        "digestd subscribers export --format toml > subscribers.toml",
    ),
)
@click.option(
    "--format", "fmt", type=click.Choice(["toml", "json"]), default="toml", show_default=True
)
@pass_ctx
def sub_export(ctx: Ctx, fmt: str) -> None:
    """Write every subscriber as a subscribers file (stdout)."""
    from .subscribers_file import export_json, export_toml

    subs = ctx.with_store(lambda store: store.list_subscribers())
    click.echo(export_toml(subs) if fmt == "toml" else export_json(subs), nl=False)


def main() -> None:
    cli(prog_name="digestd")
