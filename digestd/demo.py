"""``digestd demo``: the whole job once, on bundled sample papers, with no network.

It uses a fresh temporary store each time, adds a few sample subscribers, and delivers into a
Maildir (``./demo-outbox``) with an ``.html`` copy of every digest beside it.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from pathlib import Path

import click

from .config import settings_from_dict
from .models import Preferences
from .pipeline import RunSummary, run_once
from .store import Store

SAMPLE_PAPERS = Path(__file__).parent / "data" / "sample_papers.json"
MARKER = ".digestd-demo"

SAMPLE_SUBSCRIBERS: tuple[tuple[str, str, Preferences], ...] = (
    (
        "ada@example.org",
        "Ada",
        Preferences(
            keywords=("reinforcement learning", "mixture of experts", "agent"),
            exclude=("survey",),
            max_papers=6,
        ),
    ),
    (
        "grace@example.org",
        "Grace",
        Preferences(
            keywords=("video generation", "multimodal"),
            authors=("Ellis Brown",),
            max_papers=5,
        ),
    ),
    ("alan@example.org", "Alan", Preferences(max_papers=5)),
    (
        "linus@example.org",
        "Linus",
        Preferences(keywords=("coding agents", "benchmark", "LLM serving"), max_papers=8),
    ),
)


def prepare_outbox(outbox: Path) -> Path:
    """Start from an empty outbox, but never delete a directory the demo did not create."""
    if outbox.exists():
        if not (outbox / MARKER).exists() and any(outbox.iterdir()):
            raise click.UsageError(
                f"{outbox} exists and was not made by the demo; choose another --outbox"
            )
        shutil.rmtree(outbox)
    outbox.mkdir(parents=True)
    (outbox / MARKER).write_text("made by `digestd demo`; safe to delete\n")
    return outbox.resolve()


async def run_demo(outbox: Path) -> RunSummary:
    """Deliver the sample digests into ``outbox``; the caller has made it empty."""
    with tempfile.TemporaryDirectory(prefix="digestd-demo-") as state:
        settings = settings_from_dict(
            {
                "digest": {
                    "from_address": "digest@example.org",
                    "from_name": "digestd demo",
                    "base_url": "http://127.0.0.1:8025",
                    "postal_address": "digestd demo, 1 Example Street, Example City",
                },
                "store": {"path": str(Path(state) / "digestd.sqlite3")},
                "delivery": {
                    "transport": "maildir",
                    "maildir": str(outbox),
                    "write_html_copy": True,
                },
                "sources": [{"kind": "file", "name": "sample", "path": str(SAMPLE_PAPERS)}],
            }
        )
        async with Store.open(settings.store.path) as store:
            for email, name, prefs in SAMPLE_SUBSCRIBERS:
                await store.add_subscriber(email, name, prefs, consent_source="demo")
            today = dt.datetime.now(dt.UTC).date()
            return await run_once(settings, store, today, trigger="demo")


def print_report(outbox: Path, summary: RunSummary) -> None:
    messages = sorted((outbox / "new").glob("*"))
    html = sorted(outbox.rglob("*.html"))
    click.echo("")
    click.echo(f"digestd demo: {summary.sent} digests from {summary.fetched} sample papers")
    click.echo(f"  Maildir:   {outbox}  ({len(messages)} messages in new/)")
    for path in html:
        click.echo(f"  HTML copy: {path}")
    click.echo("Open an .html file in a browser (e.g. `xdg-open <file>`), or read the Maildir")
    click.echo(f"with `mutt -f {outbox}`; each file in new/ is a complete RFC 5322 message.")
