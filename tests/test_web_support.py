"""Shared helpers for the web endpoint tests: the app served by a real uvicorn on 127.0.0.1.

(No tests here; imported by test_web.py and test_browser_web.py.)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from conftest import free_port

from digestd.config import Settings, settings_from_dict
from digestd.models import Preferences, Subscriber
from digestd.store import Store
from digestd.web import bind_listener, create_app, serve_app


class Clock:
    """Real time plus an offset the test can advance."""

    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    def advance(self, **delta: float) -> None:
        self.offset += dt.timedelta(**delta)


class Outbox:
    """An injected ``send_confirmation``: records (email, url) and wakes waiters."""

    def __init__(self) -> None:
        self.mails: list[tuple[str, str]] = []
        self._changed = asyncio.Event()

    async def send(self, email: str, url: str) -> None:
        self.mails.append((email, url))
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[str, str]]:
        async with asyncio.timeout(timeout):
            while len(self.mails) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.mails


@dataclass
class Site:
    base: str
    settings: Settings
    store: Store
    client: httpx.AsyncClient
    clock: Clock
    outbox: Outbox
    extra: dict[str, Any] = field(default_factory=dict)


def make_settings(tmp_path: Path, port: int, **http: Any) -> Settings:
    return settings_from_dict(
        {
            "digest": {
                "from_address": "papers@example.org",
                "from_name": "Daily Papers",
                "base_url": f"http://127.0.0.1:{port}",
            },
            "store": {"path": str(tmp_path / "digestd.sqlite3")},
            "delivery": {"transport": "maildir", "maildir": str(tmp_path / "outbox")},
            "http": {"listen": f"127.0.0.1:{port}", "subscribe_page": True, **http},
        }
    )


@asynccontextmanager
async def running_site(tmp_path: Path, **http: Any) -> AsyncIterator[Site]:
    """create_app on a real SQLite store, served by uvicorn on 127.0.0.1:<free port>."""
    port = free_port()
    settings = make_settings(tmp_path, port, **http)
    clock = Clock()
    outbox = Outbox()
    async with Store.open(settings.store.path) as store:
        app = create_app(settings, store, now=clock, send_confirmation=outbox.send)
        sock = bind_listener(settings.http.listen)
        stop = asyncio.Event()
        server = asyncio.create_task(serve_app(app, sock, stop))
        base = settings.digest.base_url
        try:
            async with httpx.AsyncClient(base_url=base, follow_redirects=False, timeout=10) as c:
                yield Site(base, settings, store, c, clock, outbox)
        finally:
            stop.set()
            await server


async def add(store: Store, email: str, name: str = "", **prefs: Any) -> Subscriber:
    return await store.add_subscriber(email, name, Preferences(**prefs))


_CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    match = _CSRF_FIELD.search(html)
    assert match, "no CSRF field in the page"
    return match.group(1)


def pref_form(sub: Subscriber, csrf: str, **changes: str) -> dict[str, str]:
    """A complete preferences form as the page would submit it, with ``changes`` applied."""
    p = sub.prefs
    form = {
        "csrf": csrf,
        "name": sub.name,
        "keywords": "\n".join(p.keywords),
        "exclude": "\n".join(p.exclude),
        "categories": "\n".join(p.categories),
        "authors": "\n".join(p.authors),
        "max_papers": str(p.max_papers),
        "min_upvotes": "" if p.min_upvotes is None else str(p.min_upvotes),
        "cadence": p.cadence,
        "send_at": p.send_at or "",
        "timezone": p.timezone or "",
        "delivery": sub.status,
    }
    form.update(changes)
    return form
