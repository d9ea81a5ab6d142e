"""The small frozen types that flow one way through the pipeline.

::

    sources ──list[Paper]──▶ selection ──Digest──▶ render ──RenderedDigest──▶
    deliver ──Delivery──▶ store

Nothing here does I/O. Every stage takes these values and returns new ones.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, fields
from typing import Any, Literal

Cadence = Literal["daily", "weekdays", "weekly"]
CADENCES: tuple[Cadence, ...] = ("daily", "weekdays", "weekly")

SubscriberStatus = Literal["active", "paused", "unsubscribed", "suppressed", "pending"]

# The ledger's per-message states (see store.py and deliver.py).
DeliveryState = Literal[
    "pending", "sending", "accepted", "deferred", "failed", "suppressed", "unknown"
]
FINAL_STATES: frozenset[str] = frozenset({"accepted", "failed", "suppressed"})


@dataclass(frozen=True, slots=True)
class Paper:
    """One paper, normalised: whitespace collapsed, id without version suffix.

    ``id`` is the arXiv id (``"2511.04570"``) when one is known, otherwise a stable
    ``"<source>:<hash>"`` id built from the entry's link.
    """

    id: str
    title: str
    abstract: str
    authors: tuple[str, ...] = ()
    url: str = ""
    sources: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    upvotes: int | None = None
    comments: int | None = None
    summary: str | None = None
    pdf_url: str | None = None
    code_url: str | None = None
    project_url: str | None = None
    published: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Preferences:
    """What a subscriber wants. ``None`` for timezone/send_at means "the configured default"."""

    keywords: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    authors: tuple[str, ...] = ()
    seed_papers: tuple[str, ...] = ()
    max_papers: int = 10
    min_upvotes: int | None = None
    timezone: str | None = None
    send_at: str | None = None
    cadence: Cadence = "daily"

    @property
    def has_interests(self) -> bool:
        return bool(self.keywords or self.categories or self.authors or self.seed_papers)

    def __reduce__(self) -> tuple[Any, ...]:
        # Positional fields: pickles faster than the dataclass state (these cross to
        # the render workers and back once per subscriber).
        return (type(self), tuple(getattr(self, name) for name in _FIELDS[type(self)]))


@dataclass(frozen=True, slots=True)
class Subscriber:
    id: int
    email: str
    name: str = ""
    prefs: Preferences = field(default_factory=Preferences)
    status: SubscriberStatus = "active"
    token: str = ""  # unguessable per-subscriber token for unsubscribe/preference links
    created_at: dt.datetime | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # Positional fields: pickles faster than the dataclass state (these cross to
        # the render workers and back once per subscriber).
        return (type(self), tuple(getattr(self, name) for name in _FIELDS[type(self)]))


@dataclass(frozen=True, slots=True)
class Pick:
    """A paper chosen for one subscriber, with its score and the human-readable reasons."""

    paper: Paper
    score: float
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Digest:
    subscriber: Subscriber
    date: dt.date
    picks: tuple[Pick, ...]


@dataclass(frozen=True, slots=True)
class RenderedDigest:
    """A finished message: its parts and the exact bytes to hand to the transport."""

    subscriber_id: int
    email: str
    date: dt.date
    message_id: str
    subject: str
    html: str
    text: str
    message: bytes
    paper_ids: tuple[str, ...]

    def __reduce__(self) -> tuple[Any, ...]:
        # Positional fields: pickles faster than the dataclass state (these cross to
        # the render workers and back once per subscriber).
        return (type(self), tuple(getattr(self, name) for name in _FIELDS[type(self)]))


@dataclass(frozen=True, slots=True)
class Delivery:
    """The outcome of handing one message to the transport."""

    subscriber_id: int
    email: str
    date: dt.date
    message_id: str
    state: DeliveryState
    reply: str = ""
    paper_ids: tuple[str, ...] = ()
    attempts: int = 1


_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in (Preferences, Subscriber, RenderedDigest)
}
