"""Render a :class:`~digestd.models.Digest` into a :class:`~digestd.models.RenderedDigest`.

Pure apart from reading the templates once, in :class:`Renderer`'s constructor: the time
comes in through :class:`RenderContext`, and the same digest and context always give the
same bytes.

Safety: every piece of paper or subscriber text is cleaned (control, bidi-override and
surrogate characters removed), TeX is turned into text (:mod:`digestd.texify`), and the
HTML template autoescapes everything, so a title like ``"><script>`` stays text. Only
``http(s)`` links without credentials are ever put in an ``href``.

Size: the HTML part is kept under :data:`HTML_SIZE_BUDGET` encoded octets whatever the
number of papers — lower-ranked entries are shortened first, then reduced to their titles,
then left out behind an "N more" line (see :func:`_plan`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import operator
import re
import secrets
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urlsplit

import css_inline
import jinja2
import jinja2.meta
import markupsafe
import structlog

import digestd

from .compose import (
    EncodedText,
    MessageHeaders,
    Segment,
    assemble,
    build_message,
    encode_parts,
    encoded_size,
    header_text,
    list_id_value,
    segment,
    strip_controls,
)
from .errors import RenderError
from .models import Digest, Paper, Pick, RenderedDigest, Subscriber
from .texify import tex_to_text
from .validation import normalize_arxiv_id

if TYPE_CHECKING:
    from .config import Settings

log = structlog.get_logger(__name__)

HTML_SIZE_BUDGET = 90_000  # encoded octets; Gmail clips a message at about 102 KB
_SIZE_TARGET = HTML_SIZE_BUDGET - 2_000  # head-room for the boundary and part headers
TEXT_WIDTH = 72

MAX_TITLE = 300
MAX_AUTHOR = 80
MAX_SUMMARY = 420
MAX_SHORT_SUMMARY = 160
MAX_REASON = 140
MAX_REASONS = 4
MAX_URL = 2_000

_MONTHS = [
    *("January", "February", "March", "April", "May", "June", "July"),
    *("August", "September", "October", "November", "December"),
]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_TOKEN = re.compile(r"^[A-Za-z0-9._~-]{16,512}$")
_JINJA_COMMENT = re.compile(r"\{#.*?#\}", re.DOTALL)


# --------------------------------------------------------------------------- links


def unsubscribe_url(base_url: str, token: str) -> str:
    """The one-click unsubscribe link (RFC 8058 POST target, GET shows a confirm page)."""
    return f"{base_url.rstrip('/')}/unsubscribe/{quote(token, safe='')}"


def preferences_url(base_url: str, token: str) -> str:
    """The subscriber's preferences page."""
    return f"{base_url.rstrip('/')}/preferences/{quote(token, safe='')}"


def message_id_for(subscriber: Subscriber, date: dt.date, domain: str) -> str:
    """``<digest.YYYY-MM-DD.HASH@domain>``: the same for a subscriber and date every time
    (so a retried send is recognisable), unguessable without the subscriber's token."""
    secret = subscriber.token or f"{subscriber.id}:{subscriber.email}"
    digest = hashlib.sha256(
        f"digestd-message-id\0{secret}\0{date.isoformat()}".encode("utf-8", "replace")
    ).hexdigest()
    return f"<digest.{date.isoformat()}.{digest[:32]}@{_ascii_domain(domain)}>"


def _ascii_domain(domain: str) -> str:
    text = domain.strip().lower()
    try:
        ascii_domain = text if text.isascii() else text.encode("idna").decode("ascii")
    except UnicodeError:
        raise RenderError(f"domain {domain!r} is not a valid domain name") from None
    if not re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)*", ascii_domain):
        raise RenderError(f"domain {domain!r} is not a valid domain name")
    return ascii_domain


@functools.lru_cache(maxsize=4096)  # pure; papers' links recur in every digest
def safe_url(raw: str | None) -> str:
    """``raw`` if it is a usable http(s) link, percent-encoded where needed; else ``""``.

    Rejects other schemes (``javascript:``, ``data:``…), control characters and spaces,
    credentials in the authority (``https://huggingface.co@evil.example``) and huge URLs.
    """
    if not raw:
        return ""
    url = raw.strip()
    if not url or len(url) > MAX_URL or strip_controls(url) != url or len(url.split()) != 1:
        return ""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return ""
    if parts.scheme.lower() not in ("http", "https") or not host or "@" in parts.netloc:
        return ""
    if not host.isascii():
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return ""
        url = url.replace(parts.netloc, parts.netloc.lower().replace(host, ascii_host), 1)
    return quote(url, safe=":/?#[]@!$&'()*+,;=%~-._")


# --------------------------------------------------------------------------- context


@dataclass(frozen=True, slots=True, kw_only=True)
class RenderContext:
    """What a render needs besides the digest; ``now`` (aware) becomes the Date header."""

    from_address: str
    from_name: str
    base_url: str
    list_id: str
    postal_address: str = ""
    precedence: str = "bulk"
    feedback_id: str = ""
    subject_template: str = "Your papers for {date}"
    reply_to: str = ""
    now: dt.datetime

    @classmethod
    def from_settings(cls, settings: Settings, now: dt.datetime) -> RenderContext:
        d = settings.digest
        return cls(
            from_address=d.from_address,
            from_name=d.from_name,
            base_url=d.base_url,
            list_id=d.effective_list_id,
            postal_address=d.postal_address,
            precedence=d.precedence,
            feedback_id=d.feedback_id,
            subject_template=d.subject,
            reply_to=d.reply_to,
            now=now,
        )

    @property
    def domain(self) -> str:
        return self.from_address.rpartition("@")[2]

    @property
    def list_name(self) -> str:
        return _list_name(self.list_id, self.from_name)


# --------------------------------------------------------------------------- view model


@dataclass(frozen=True, slots=True)
class Link:
    label: str
    url: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One paper as the templates show it; every string is clean plain text."""

    rank: int
    paper_id: str
    title: str
    url: str
    authors: str
    upvotes_text: str
    comments_text: str
    categories: str
    summary: str
    reasons: tuple[str, ...]
    links: tuple[Link, ...]
    compact: bool = False
    # The same entry without reasons (None: this is one), which the blocks are made from.
    plain: Entry | None = field(default=None, repr=False, compare=False)
    # Entries key the block caches, two lookups per entry per message: hashed once.
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(_entry_values(self)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def stats_text(self) -> str:
        upvotes = ""
        if self.upvotes_text:
            upvotes = f"{self.upvotes_text} upvote" + ("" if self.upvotes_text == "1" else "s")
        return " · ".join(p for p in (upvotes, self.comments_text, self.categories) if p)


# The compared fields of an Entry as one tuple (C speed: entries are made per message).
_entry_values = operator.attrgetter(*(f.name for f in fields(Entry) if f.compare))


def _with_reasons(entry: Entry, reasons: tuple[str, ...]) -> Entry:
    """``replace(entry, reasons=reasons)``, without dataclasses.replace's per-call cost; an
    entry made from one without reasons keeps that one as its ``plain``."""
    e = entry
    return Entry(
        e.rank,
        e.paper_id,
        e.title,
        e.url,
        e.authors,
        e.upvotes_text,
        e.comments_text,
        e.categories,
        e.summary,
        reasons,
        e.links,
        e.compact,
        e.plain if e.plain is not None else e,
    )


@dataclass(frozen=True, slots=True)
class _Variants:
    full: Entry
    short: Entry
    compact: Entry


def clean_text(value: str, max_len: int) -> str:
    """Plain text safe to show: invisible/format/control characters dropped, whitespace
    collapsed, cut at a word boundary to ``max_len`` characters with an ellipsis."""
    if not value:
        return ""
    return _trim(" ".join(strip_controls(value[: max_len * 4 + 64]).split()), max_len)


def _trim(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    if cut < limit * 0.6:
        cut = limit - 1
    return text[:cut].rstrip(" ,;:.-–—(") + "…"


@functools.lru_cache(maxsize=8192)
def _tex(value: str, limit: int) -> str:
    """TeX → text on a bounded prefix, then cleaned and trimmed to ``limit``.

    Cached: in a run the same papers are rendered for many subscribers."""
    prefix = value[: limit * 2 + 100]
    return clean_text(tex_to_text(prefix), limit)


def _authors(names: Sequence[str]) -> str:
    shown = [_tex(n, MAX_AUTHOR) for n in names[:4]]
    shown = [n for n in shown if n]
    if len(names) > 4:
        return ", ".join(shown[:3]) + " et al."
    return ", ".join(shown)


def _count(n: int | None) -> str:
    return f"{n:,}" if n is not None and n >= 0 else ""


def _plural(n: int, word: str) -> str:
    if n < 0:
        return ""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


_VARIANTS_MAX = 8192
_FULL_MAX = 32768  # full entries with their reasons: the most distinct, and the hot path
# (rank, id(paper), reasons) -> (paper, variants): hashing a Paper (every field) for a
# cache key costs more than the lookup saves; the paper is kept in the value, so its id
# cannot be reused while the entry exists, and ``is`` confirms the hit.
_BY_IDENTITY: dict[tuple[int, int, tuple[str, ...]], tuple[Paper, _Variants]] = {}
# (rank, id(paper)) -> (paper, variants without reasons): what the above is made from.
_BASES: dict[tuple[int, int], tuple[Paper, _Variants]] = {}


_FULL: dict[tuple[int, int, tuple[str, ...]], tuple[Paper, Entry]] = {}


def _base_variants(rank: int, paper: Paper) -> _Variants:
    """The paper's entries at ``rank`` without reasons (cached by identity, see above)."""
    base_key = (rank, id(paper))
    base = _BASES.get(base_key)
    if base is None or base[0] is not paper:
        if len(_BASES) >= _VARIANTS_MAX:
            _BASES.clear()
        base = _BASES[base_key] = (paper, _variants(rank, paper))
    return base[1]


def _entry_full(rank: int, pick: Pick) -> Entry:
    """``_entry_variants(rank, pick).full``: all a digest that fits its budget needs."""
    key = (rank, id(pick.paper), pick.reasons)
    hit = _FULL.get(key)
    if hit is not None and hit[0] is pick.paper:
        return hit[1]
    base = _base_variants(rank, pick.paper)
    entry = _with_reasons(base.full, _clean_reasons(pick.reasons)[:MAX_REASONS])
    if len(_FULL) >= _FULL_MAX:
        _FULL.clear()
    _FULL[key] = (pick.paper, entry)
    return entry


def _entry_variants(rank: int, pick: Pick) -> _Variants:
    key = (rank, id(pick.paper), pick.reasons)
    hit = _BY_IDENTITY.get(key)
    if hit is not None and hit[0] is pick.paper:
        return hit[1]
    reasons = _clean_reasons(pick.reasons)
    plain = _base_variants(rank, pick.paper)
    variants = _Variants(
        full=_with_reasons(plain.full, reasons[:MAX_REASONS]),
        short=_with_reasons(plain.short, reasons[:1]),
        compact=_with_reasons(plain.compact, reasons[:1]),
    )
    if len(_BY_IDENTITY) >= _VARIANTS_MAX:
        _BY_IDENTITY.clear()
    _BY_IDENTITY[key] = (pick.paper, variants)
    return variants


@functools.lru_cache(maxsize=32768)
def _clean_reasons(pick_reasons: tuple[str, ...]) -> tuple[str, ...]:
    """A pick's reasons as shown: cleaned, the empty ones dropped (cached: they recur)."""
    return tuple(r for r in (clean_text(r, MAX_REASON) for r in pick_reasons) if r)


def _variants(rank: int, paper: Paper) -> _Variants:
    """An entry's three forms, without the pick's reasons (:func:`_entry_variants` adds
    them): the same for every subscriber who gets the paper at that rank."""
    arxiv_id = normalize_arxiv_id(paper.id) if paper.id else None
    url = safe_url(paper.url) or (f"https://arxiv.org/abs/{arxiv_id}" if arxiv_id else "")
    title = _tex(paper.title, MAX_TITLE) or clean_text(paper.id, 100) or "(untitled)"
    links: list[Link] = []
    abs_url = f"https://arxiv.org/abs/{arxiv_id}" if arxiv_id else ""
    if abs_url and url != abs_url:
        links.append(Link("arXiv", abs_url))
    pdf = safe_url(paper.pdf_url) or (f"https://arxiv.org/pdf/{arxiv_id}" if arxiv_id else "")
    for label, link in (
        ("PDF", pdf),
        ("Code", safe_url(paper.code_url)),
        ("Project page", safe_url(paper.project_url)),
    ):
        if link and link != url and all(link != seen.url for seen in links):
            links.append(Link(label, link))
    summary_source = paper.summary or paper.abstract or ""
    full = Entry(
        rank=rank,
        paper_id=paper.id,
        title=title,
        url=url,
        authors=_authors(paper.authors),
        upvotes_text=_count(paper.upvotes),
        comments_text=_plural(paper.comments, "comment") if paper.comments else "",
        categories=" ".join(clean_text(c, 20) for c in paper.categories[:2]),
        summary=_tex(summary_source, MAX_SUMMARY),
        reasons=(),
        links=tuple(links),
    )
    short = replace(
        full,
        summary=_trim(full.summary, MAX_SHORT_SUMMARY),
        links=tuple(link for link in links if link.label == "PDF"),
    )
    return _Variants(full=full, short=short, compact=replace(short, compact=True))


def _plan(variants: Sequence[_Variants], step: int) -> list[Entry]:
    """The entries shown at degradation ``step`` (0 = everything in full, 3n = nothing).

    Steps 1..n shorten entries from the bottom up, n+1..2n reduce them (again from the
    bottom) to titles, and 2n+1..3n leave the lowest-ranked ones out ("N more").
    """
    n = len(variants)
    if step <= n:
        return [v.full if i < n - step else v.short for i, v in enumerate(variants)]
    if step <= 2 * n:
        return [v.short if i < 2 * n - step else v.compact for i, v in enumerate(variants)]
    return [v.compact for v in variants[: max(0, 3 * n - step)]]


# --------------------------------------------------------------------------- rendering


def _find_templates() -> Path:
    here = Path(digestd.__file__).parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "digest.html").is_file():
            return candidate
    raise RenderError(f"templates not found in {here / 'templates'} or {here.parent / 'templates'}")


_EMPHASIS = re.compile(r"\*([^*]+)\*")
_HTML_SPECIAL = re.compile("[&<>\"']")  # what markupsafe.escape replaces


def escaped(value: str) -> str:
    """``str(markupsafe.escape(value))``, what autoescape writes for ``value``, without
    making a Markup for the usual value that has nothing to escape."""
    if _HTML_SPECIAL.search(value) is None:
        return value
    return str(markupsafe.escape(value))


def emphasis_html(text: str) -> markupsafe.Markup:
    """A reason's ``*phrase*`` as <em>phrase</em>; everything else escaped."""
    return markupsafe.Markup(_EMPHASIS.sub(r"<em>\1</em>", escaped(text)))  # noqa: S704 (escaped)


def emphasis_text(text: str) -> str:
    """A reason's ``*phrase*`` as “phrase” for the plain-text part."""
    return _EMPHASIS.sub("\u201c\\1\u201d", text)


@functools.lru_cache(maxsize=16384)
def _wrap(text: str, width: int = TEXT_WIDTH, indent: str = "", first: str | None = None) -> str:
    """Wrap for the plain-text part: never breaks URLs or words, keeps ``indent``.

    Cached: a paper's title, authors and summary are wrapped the same way for every
    subscriber who gets it (textwrap is slow: ~0.3 ms a digest)."""
    return _fill_text(text, width, indent, first)


def _fill_text(text: str, width: int, indent: str, first: str | None) -> str:
    """:func:`_wrap` uncached, for text that is personal (it would only evict).

    Text of printable characters and single spaces (what :func:`clean_text` gives) is
    wrapped by :func:`_greedy`, which is textwrap's algorithm for exactly that input at a
    tenth of the cost; anything else goes to textwrap itself."""
    initial = indent if first is None else first
    if text and text.isprintable() and "  " not in text and text[0] != " " != text[-1]:
        return _greedy(text, width, initial, indent)
    return textwrap.fill(
        text,
        width=width,
        initial_indent=initial,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


def _greedy(text: str, width: int, initial: str, indent: str) -> str:
    """``textwrap.fill(text, width, initial_indent=initial, subsequent_indent=indent,
    break_long_words=False, break_on_hyphens=False)`` for text of printable characters
    and single spaces: its chunks are then the words with one " " between them, and this
    is ``TextWrapper._wrap_chunks`` on them (a word longer than the line stands alone).
    Each line is cut at the last space that leaves it within the width (C-speed ``rfind``,
    not a loop over the words)."""
    if width <= 0:
        raise ValueError(f"invalid width {width!r} (must be > 0)")
    lines: list[str] = []
    pos, end = 0, len(text)
    prefix = initial
    while True:
        room = width - len(prefix)
        if end - pos <= room:
            lines.append(prefix + text[pos:])
            break
        # (a negative end would count from the end of the text: no room, no space)
        cut = text.rfind(" ", pos, pos + room + 1) if room >= 0 else -1
        if cut < pos:  # the next word alone is longer than the line
            cut = text.find(" ", pos)
            if cut < 0:
                lines.append(prefix + text[pos:])
                break
        lines.append(prefix + text[pos:cut])
        pos = cut + 1
        prefix = indent
    return "\n".join(lines)


def _long_date(date: dt.date) -> str:
    return f"{_WEEKDAYS[date.weekday()]}, {date.day} {_MONTHS[date.month - 1]} {date.year}"


@functools.lru_cache(maxsize=256)  # pure; a run has one date and a few counts
def _subject(template: str, date: dt.date, count: int) -> str:
    """Fill ``{date}``, ``{weekday}`` and ``{count}``; anything else stays literal (no
    str.format, so a template can never reach attributes)."""
    values = {
        "{date}": f"{date.day} {_MONTHS[date.month - 1]} {date.year}",
        "{weekday}": _WEEKDAYS[date.weekday()],
        "{count}": str(count),
    }
    text = re.sub(r"\{(date|weekday|count)\}", lambda m: values[m.group(0)], template)
    return header_text(text, 200) or f"Your papers for {values['{date}']}"


@functools.lru_cache(maxsize=8192)  # keywords recur across subscribers
def _clean_60(item: str) -> str:
    return clean_text(item, 60)


def _interests(subscriber: Subscriber) -> str:
    prefs = subscriber.prefs
    items = [
        *prefs.keywords,
        *prefs.categories,
        *(f"papers by {a}" for a in prefs.authors),
        *(f"papers like {s}" for s in prefs.seed_papers),
    ]
    items = [shown for shown in (_clean_60(i) for i in items) if shown]
    if len(items) > 5:
        return ", ".join(items[:5]) + f" and {len(items) - 5} more"
    return ", ".join(items)


_Piece = str | tuple[str, int]  # literal text, or a slot: ("S", field), ("W", wrap), ("B", 0)…
_Deferred = tuple[str, int, str, str | None]  # a ``wrap`` call: text, width, indent, first


class _Deferrals:
    """Sentinels for values filled in per message, and the ``wrap`` calls on them that have
    to wait for the real text (see :class:`_Shapes` and :class:`_EntryBlocks`).

    A sentinel is ``<prefix><kind><n>x``: letters and digits only, so escaping, emphasis
    and wrapping leave it whole. Kinds: S a personal value, B the entry blocks, W a
    deferred wrap, and for a pick's reasons R (as is), H (``emphasis_html``), T
    (``emphasis_text``).
    """

    REASONS = 8  # reason sentinels; an entry with more reasons is rendered by Jinja

    def __init__(self) -> None:
        self.prefix = "Qz" + secrets.token_hex(8)
        self.slot = re.compile(re.escape(self.prefix) + r"([SWBRHT])(\d+)x")
        self.reason = re.compile(re.escape(self.prefix) + r"R(\d+)x")
        self.reasons = tuple(f"{self.prefix}R{i}x" for i in range(self.REASONS))
        self.active: list[_Deferred] | None = None

    def wrap(self, text: str, width: int, indent: str, first: str | None) -> str | None:
        """A placeholder for ``wrap(text…)`` while collecting, if ``text`` has a sentinel."""
        if self.active is None or self.prefix not in text:
            return None
        self.active.append((text, width, indent, first))
        return f"{self.prefix}W{len(self.active) - 1}x"

    def emphasis(self, text: str, kind: str) -> str | None:
        """The H/T sentinel for a reason sentinel passed to an emphasis filter."""
        if self.active is None:
            return None
        found = self.reason.fullmatch(text)
        return f"{self.prefix}{kind}{found.group(1)}x" if found else None

    @contextlib.contextmanager
    def collecting(self) -> Iterator[list[_Deferred]]:
        """Defer sentinel-bearing wraps (and mark emphasised reasons) inside the block."""
        self.active = []
        try:
            yield self.active
        finally:
            self.active = None


def _reason_value(kind: str, reason: str) -> str:
    """What the template produced for ``reason`` at a sentinel of ``kind`` (unescaped)."""
    if kind == "H":
        return str(emphasis_html(reason))
    if kind == "T":
        return emphasis_text(reason)
    return reason


class _StaticRun:
    """Fixed text of whole lines with its encoding, worked out once."""

    __slots__ = ("segment", "text")

    def __init__(self, text: str, segment: Segment) -> None:
        self.text = text
        self.segment = segment


class _DynamicRun:
    """A run of lines holding slots, filled and encoded per message (or per set of reasons).

    ``shared`` numbers the run's content (its pieces, deferred wraps resolved): equal runs
    of different blocks (a reasons line is the same for every paper) share one number, so
    their filled forms are cached once per set of reasons."""

    __slots__ = ("pieces", "shared")

    def __init__(self, pieces: tuple[_Piece, ...]) -> None:
        self.pieces = pieces
        self.shared = -1


_Run = _StaticRun | _DynamicRun | None  # None: the entry blocks go here
_Runs = tuple[_Run, ...]
# A loop body rendered with reason sentinels: its pieces, deferred wraps and line runs.
_BlockTemplate = tuple[tuple[_Piece, ...], tuple[_Deferred, ...], _Runs | None]


def _resolved(piece: _Piece, wraps: Sequence[_Deferred]) -> object:
    """A piece with its deferred wrap written out (W numbers differ between blocks)."""
    if isinstance(piece, str):
        return piece
    kind, index = piece
    return (kind, wraps[index]) if kind == "W" else piece


class _BlockRuns:
    """A block template's line runs and deferred wraps (hashed by identity: a cache key)."""

    __slots__ = ("runs", "wraps")

    def __init__(self, made: _BlockTemplate) -> None:
        assert made[2] is not None
        self.runs = made[2]
        self.wraps = made[1]


def _compile_runs(pieces: Sequence[_Piece], whole_lines: bool) -> _Runs | None:
    """``pieces`` grouped into runs of lines: the fixed ones encoded now, those with slots
    left to fill. None if that cannot be done: the blocks slot not at a line start, a run
    that does not encode, or (``whole_lines``) text after the last line end."""
    runs: list[_Run] = []
    current: list[_Piece] = []

    def close() -> None:
        if not current:
            return
        if all(type(p) is str for p in current):
            text = "".join(cast("list[str]", current))
            encoded = segment(text, False)
            if encoded is None:
                raise ValueError("a run that cannot be encoded")
            runs.append(_StaticRun(text, encoded))
        else:
            runs.append(_DynamicRun(tuple(current)))
        current.clear()

    try:
        for piece in pieces:
            if type(piece) is not str:
                if piece == ("B", 0):
                    if current:
                        return None
                    runs.append(None)
                else:
                    current.append(piece)
                continue
            literal = piece
            first = literal.find("\n")
            if first < 0:
                current.append(literal)
                continue
            last = literal.rfind("\n")
            current.append(literal[: first + 1])
            close()
            if last > first:
                current.append(literal[first + 1 : last + 1])
                close()
            if literal[last + 1 :]:
                current.append(literal[last + 1 :])
        if current and whole_lines:
            return None
        close()
        return _merged(runs)
    except ValueError:
        return None


def _merged(runs: list[_Run]) -> _Runs:
    """Neighbouring fixed runs joined into one (encoded again), and neighbouring runs
    with slots joined into one: fewer, larger pieces to put together per message. Every
    run but the last ends a line, so joined runs are runs too."""
    out: list[_Run] = []
    for run in runs:
        last = out[-1] if out else None
        if type(run) is _StaticRun and type(last) is _StaticRun:
            text = last.text + run.text
            encoded = segment(text, False)
            if encoded is None:
                raise ValueError("a run that cannot be encoded")
            out[-1] = _StaticRun(text, encoded)
        elif type(run) is _DynamicRun and type(last) is _DynamicRun:
            out[-1] = _DynamicRun(last.pieces + run.pieces)
        else:
            out.append(run)
    return tuple(out)


_FOR_ENTRIES = re.compile(r"\{%-?\s*for\s+e\s+in\s+entries\s*-?%\}")
_LOOP_TAG = re.compile(r"\{%-?\s*(for|endfor)\b.*?-?%\}", re.DOTALL)
FILLED_RUNS_MAX = 8192  # reasons lines filled with a reader's reasons, encoded (~0.3 KB each)
FILLED_ENTRIES_MAX = 65536  # entries' blocks as references to encoded runs (~0.2 KB each)
ENTRY_BLOCKS_MAX = 8192  # cached entry blocks per template (~2 KB each), then start over


class _EntryBlocks:
    """A template whose ``{% for e in entries %}`` body is rendered once per distinct entry
    and reused for every subscriber who gets that paper at that rank for the same reasons.
    The rest of the template is rendered per message with the blocks joined in.

    The reasons differ most between readers, so the body is rendered by Jinja once per
    entry *without* them: with sentinels in their place (see :class:`_Deferrals`), kept as
    pieces; an entry's block is those pieces filled with its reasons. A new set of pieces
    is checked against Jinja with hostile probe reasons (markup, entities, emphasis,
    non-ASCII, a long word); any difference, or a sentinel that comes out changed, switches
    the pieces off and Jinja renders every block.

    For the SMTP path (:meth:`extend`) the pieces are also grouped into line runs, encoded
    once where fixed; a line holding reasons (the same for every paper) is filled once per
    set of reasons, and an entry's block is the references to its runs, cached by entry.
    Every cache here is bounded and starts over when full.

    Self-checking: the body is rendered with nothing but ``e`` in its context (a body that
    needs anything else fails and switches this off), and the first messages are also
    rendered with the whole template; any difference switches it off for good, so the
    output is always exactly the whole template's.
    """

    CHECKS = 2
    PROBES = ("<b>&amp; \"x\" *a* 'y'", "*one* and *two*", "日本語 — “q” <", "z" * 90, "a & b")

    def __init__(
        self,
        env: jinja2.Environment,
        source: str,
        whole: jinja2.Template,
        deferrals: _Deferrals | None = None,
    ) -> None:
        self.whole = whole
        self.html = bool(env.autoescape if not callable(env.autoescape) else True)
        self.blocks: dict[Entry, str] = {}
        # entry with reason sentinels -> (pieces, deferred wraps, runs or None), or None:
        # Jinja renders it
        self.templates: dict[Entry, _BlockTemplate | None] = {}
        # (plain entry, reason count) -> its template's runs and wraps (None: no runs)
        self.by_entry: dict[object, _BlockRuns | None] = {}
        # entry -> its block filled with its reasons: the runs' texts and encodings
        self.filled: dict[Entry, tuple[tuple[str, ...], tuple[Segment, ...]]] = {}
        # a dynamic run's content -> its number; (number, reasons) -> the run filled
        self.shared_runs: dict[tuple[object, ...], int] = {}
        self.run_cache: dict[tuple[int, tuple[str, ...]], tuple[str, Segment]] = {}
        self.deferrals = deferrals
        self.checks = self.CHECKS
        self.skeleton: jinja2.Template | None = None
        self.body: jinja2.Template | None = None
        self.skeleton_names: set[str] = set()
        found = _FOR_ENTRIES.search(source)
        if found is None:
            return
        depth, end = 1, None
        for tag in _LOOP_TAG.finditer(source, found.end()):
            depth += 1 if tag.group(1) == "for" else -1
            if depth == 0:
                end = tag
                break
        if end is None:
            return
        # "{% if true %}" stands where the loop tags stood, so trim_blocks/lstrip_blocks
        # strip the same whitespace around the blocks as around the loop.
        body = "{% if true %}" + source[found.end() : end.start()] + "{% endif %}"
        skeleton = (
            source[: found.start()]
            + "{% if true %}{{ __entry_blocks__ }}{% endif %}"
            + source[end.end() :]
        )
        try:
            self.body = env.from_string(body)
            self.skeleton = env.from_string(skeleton)
            self.skeleton_names = jinja2.meta.find_undeclared_variables(env.parse(skeleton))
        except jinja2.TemplateError:
            self.body = self.skeleton = None

    def joined(self, entries: Sequence[Entry]) -> str:
        """The entries' blocks, joined (cached per entry); needs ``body``."""
        return "".join(self.each(entries))

    def each(self, entries: Sequence[Entry]) -> list[str]:
        """The entries' blocks (cached per entry); needs ``body``."""
        assert self.body is not None
        parts = []
        for entry in entries:
            block = self.blocks.get(entry)
            if block is None:
                block = self._block(entry)
                if len(self.blocks) >= ENTRY_BLOCKS_MAX:
                    self.blocks.clear()
                self.blocks[entry] = block
            parts.append(block)
        return parts

    def extend(
        self,
        entries: Sequence[Entry],
        segments: list[Segment],
        texts: list[str] | None,
    ) -> bool:
        """Add the entries' encoded blocks to ``segments`` (and their text to ``texts``);
        False if an entry has no runs (the caller then uses :meth:`each`).

        An entry's block is its template's line runs with the reason lines filled in: a
        tuple of references to encoded runs that are shared (the fixed runs per template,
        a reasons line per set of reasons), cached per entry. Nothing is joined here: the
        body is joined once, whole (:func:`~digestd.compose.assemble`), so the cache holds
        a few pointers per entry and can hold every entry of a run."""
        filled = self.filled
        for entry in entries:
            # An entry (paper, rank, reasons) is hashed once and recurs as the same object.
            done = filled.get(entry)
            if done is None:
                done = self._entry_runs(entry)
                if done is None:
                    return False
                if len(filled) >= FILLED_ENTRIES_MAX:
                    filled.clear()
                filled[entry] = done
            segments += done[1]
            if texts is not None:
                texts += done[0]
        return True

    def _entry_runs(self, entry: Entry) -> tuple[tuple[str, ...], tuple[Segment, ...]] | None:
        """The entry's block as (texts, encoded runs), or None: it has no runs."""
        by_entry = self.by_entry
        reasons = entry.reasons
        key = (entry.plain, len(reasons)) if entry.plain is not None else entry
        if key in by_entry:
            found = by_entry[key]
        else:
            made = self._made(entry)
            found = None if made is None or made[2] is None else _BlockRuns(made)
            if len(by_entry) >= ENTRY_BLOCKS_MAX:
                by_entry.clear()
            by_entry[key] = found
        if found is None:
            return None
        texts: list[str] = []
        parts: list[Segment] = []
        for run in found.runs:
            if type(run) is _StaticRun:
                texts.append(run.text)
                parts.append(run.segment)
                continue
            dynamic = cast("_DynamicRun", run)
            run_key = (dynamic.shared, reasons)
            hit = self.run_cache.get(run_key)
            if hit is None:
                text = self._fill(dynamic.pieces, found.wraps, reasons)
                encoded = segment(text, False)
                if encoded is None:
                    return None
                hit = (text, encoded)
                if dynamic.shared >= 0:
                    if len(self.run_cache) >= FILLED_RUNS_MAX:
                        self.run_cache.clear()
                    self.run_cache[run_key] = hit
            texts.append(hit[0])
            parts.append(hit[1])
        return tuple(texts), tuple(parts)

    def _made(self, entry: Entry) -> _BlockTemplate | None:
        d = self.deferrals
        if self.body is None or d is None or len(entry.reasons) > len(d.reasons):
            return None
        key = _with_reasons(entry, d.reasons[: len(entry.reasons)])
        if key in self.templates:
            return self.templates[key]
        made = self._template(key, entry)
        if len(self.templates) >= ENTRY_BLOCKS_MAX:
            self.templates.clear()
        self.templates[key] = made
        return made

    def _block(self, entry: Entry) -> str:
        assert self.body is not None
        made = self._made(entry)
        if made is None:
            return self.body.render(e=entry)
        # Kept with its encoding (the block recurs in many messages).
        return EncodedText(self._fill(made[0], made[1], entry.reasons))

    def _template(self, key: Entry, entry: Entry) -> _BlockTemplate | None:
        """The body rendered for ``key`` (reason sentinels) as pieces, checked; or None."""
        assert self.body is not None and self.deferrals is not None
        d = self.deferrals
        try:
            with d.collecting() as wraps:
                rendered = self.body.render(e=key)
            pieces: list[_Piece] = []
            split = d.slot.split(rendered)
            for i in range(0, len(split), 3):
                if split[i]:
                    pieces.append(split[i])
                if i + 2 < len(split):
                    kind, index = split[i + 1], int(split[i + 2])
                    if kind in "SB" or index >= (len(wraps) if kind == "W" else len(key.reasons)):
                        raise ValueError(f"unexpected slot {kind}{index}")
                    pieces.append((kind, index))
            for text, *_ in wraps:
                if any(m.group(1) not in "RHT" for m in d.slot.finditer(text)):
                    raise ValueError("a wrap around another wrap")
            runs = _compile_runs(pieces, whole_lines=True)
            for run in runs or ():
                if isinstance(run, _DynamicRun):
                    content = tuple(_resolved(piece, wraps) for piece in run.pieces)
                    run.shared = self.shared_runs.setdefault(content, len(self.shared_runs))
            made = (tuple(pieces), tuple(wraps), runs)
            # Hostile probe reasons (markup, emphasis, entities, non-ASCII, a long word)
            # stand for every reader's: the pieces put any of them where Jinja would.
            n = len(entry.reasons)
            probes = tuple((self.PROBES * 2)[i] for i in range(n))
            for reasons in (probes,):
                filled = self._fill(made[0], made[1], reasons)
                if filled != self.body.render(e=_with_reasons(entry, reasons)):
                    raise ValueError("differs from the template")
                if runs is not None and filled != "".join(
                    r.text if isinstance(r, _StaticRun) else self._fill(r.pieces, made[1], reasons)
                    for r in cast("list[_StaticRun | _DynamicRun]", runs)
                ):
                    raise ValueError("runs differ from the template")
        except Exception as exc:
            log.warning("entry_block_pieces_disabled", reason=str(exc)[:200])
            self.deferrals = None  # Jinja renders every block from now on
            return None
        return made

    def _fill(
        self,
        pieces: tuple[_Piece, ...],
        wraps: tuple[_Deferred, ...],
        reasons: tuple[str, ...],
    ) -> str:
        assert self.deferrals is not None
        esc = self.html
        out: list[str] = []
        for piece in pieces:
            if type(piece) is str:
                out.append(piece)
                continue
            kind, index = cast("tuple[str, int]", piece)
            if kind == "W":
                text, width, indent, first = wraps[index]
                text = self.deferrals.slot.sub(
                    lambda m: _reason_value(m.group(1), reasons[int(m.group(2))]), text
                )
                wrapped = _wrap(text, width, indent, first)
                out.append(escaped(wrapped) if esc else wrapped)
            else:
                value = _reason_value(kind, reasons[index])
                out.append(escaped(value) if esc and kind != "H" else value)
        return "".join(out)

    def render(self, context: dict[str, object]) -> str:
        if self.skeleton is None or self.body is None:
            return self.whole.render(context)
        try:
            joined = self.joined(cast("list[Entry]", context["entries"]))
            if self.html:  # the blocks are the output of an autoescaping template
                blocks: str = markupsafe.Markup(joined)  # noqa: S704
            else:
                blocks = joined
            fast = self.skeleton.render(context, __entry_blocks__=blocks)
        except jinja2.TemplateError:
            self.skeleton = None  # the body needs more than ``e``: render whole templates
            return self.whole.render(context)
        if self.checks:
            self.checks -= 1
            if fast != self.whole.render(context):
                log.warning("entry_blocks_disabled", reason="differs from the whole template")
                self.skeleton = None
                return self.whole.render(context)
        return fast


PERSONAL_FIELDS = (
    "lede",
    "preheader",
    "recipient",
    "interests",
    "preferences_url",
    "unsubscribe_url",
)
SHAPES_MAX = 4096  # cached skeleton shapes (~10 KB each), then start over


@dataclass(frozen=True, slots=True)
class _Shape:
    html: tuple[_Piece, ...]
    text: tuple[_Piece, ...]
    wraps: tuple[_Deferred, ...]
    # The same as line runs (None: not possible, the parts are encoded from strings).
    html_runs: _Runs | None = None
    text_runs: _Runs | None = None


class _Shapes:
    """Both templates' skeletons (everything but the entry blocks) rendered once per
    *shape* and personalised by filling slots, not by running Jinja per message.

    A shape is everything the skeletons see except the per-subscriber values in
    :data:`PERSONAL_FIELDS` (and whether each is empty): the subject, heading, counts…, so
    a run has a handful of shapes. The skeletons are rendered with a random sentinel for
    each personal value and for the entry blocks; a ``wrap`` call whose text holds a
    sentinel is deferred (recorded, a placeholder output) and done per message on the real
    text. Per message, a slot becomes the value HTML-escaped exactly as autoescape would
    (HTML) or as is (text), a deferred wrap becomes ``wrap(real text)``, and the blocks
    slot the joined entry blocks.

    Self-checking like :class:`_EntryBlocks`: off unless both skeletons are in use and
    neither reads ``entries``; the first use of every new shape and the first
    :attr:`CHECKS` messages are compared with the block path's output, and any difference
    switches shapes off for good.
    """

    CHECKS = 3

    def __init__(self, html: _EntryBlocks, text: _EntryBlocks, deferrals: _Deferrals) -> None:
        self.parts = (html, text)
        self.deferrals = deferrals
        self.prefix = deferrals.prefix  # letters and digits: escape/wrap-neutral
        self.sentinels = tuple(f"{self.prefix}S{i}x" for i in range(len(PERSONAL_FIELDS)))
        self.slot = deferrals.slot
        self.cache: dict[tuple[object, ...], _Shape] = {}
        self.checks = self.CHECKS
        self.on = all(
            p.skeleton is not None and p.body is not None and "entries" not in p.skeleton_names
            for p in self.parts
        )

    def _key(self, context: dict[str, object]) -> tuple[list[str], tuple[object, ...]] | None:
        """The personal values of ``context`` and its shape's cache key: everything else
        in it, and which personal values are empty. None: shapes cannot be used."""
        if not self.on or any(p.skeleton is None for p in self.parts):
            return None
        personal = [context[f] for f in PERSONAL_FIELDS]
        if not all(type(v) is str for v in personal):
            return None
        rest = tuple(
            (k, v) for k, v in context.items() if k not in PERSONAL_FIELDS and k != "entries"
        )
        return cast("list[str]", personal), (rest, tuple(bool(v) for v in personal))

    def render(
        self, context: dict[str, object], entries: list[Entry]
    ) -> tuple[str, str, list[str], list[str]] | None:
        """(html, text, html's parts, text's parts) for ``context``, or None: use the block
        path. The parts join to the bodies; fixed text is split at line ends so that
        :func:`~digestd.compose.encode_parts` can reuse the encoding of each line run."""
        keyed = self._key(context)
        if keyed is None:
            return None
        personal, key = keyed
        try:
            shape = self.cache.get(key)
            new = shape is None
            if shape is None:
                shape = self._build(context)
                if len(self.cache) >= SHAPES_MAX:
                    self.cache.clear()
                self.cache[key] = shape
            html_parts = self._fill(shape.html, shape.wraps, personal, entries, self.parts[0])
            text_parts = self._fill(shape.text, shape.wraps, personal, entries, self.parts[1])
            html, text = "".join(html_parts), "".join(text_parts)
        except Exception:  # any surprise: the block path renders, as without shapes
            self._off("a skeleton cannot be rendered with placeholders")
            return None
        if new or self.checks:
            self.checks = max(0, self.checks - 1)
            if (html, text) != (self.parts[0].render(context), self.parts[1].render(context)):
                self._off("differs from the block path")
                return None
        return html, text, html_parts, text_parts

    def encoded(
        self, context: dict[str, object], entries: list[Entry], want_parts: bool
    ) -> tuple[tuple[str, bytes], tuple[str, bytes], str, str] | None:
        """(encoded text, encoded html, text, html) put together from encoded line runs —
        the shape's and the entries' — with no text joined and encoded per message but
        the lines that hold personal values; the text and html strings are only made for
        ``want_parts`` ("" otherwise). None: use :meth:`render`.

        The first messages are checked against :meth:`render`'s output, byte for byte.
        """
        keyed = self._key(context)
        if keyed is None:
            return None
        values, key = keyed
        shape = self.cache.get(key)
        if shape is None or shape.html_runs is None or shape.text_runs is None:
            return None
        checking = self.checks > 0
        want_parts = want_parts or checking
        out: list[tuple[str, bytes] | None] = []
        bodies: list[str] = []
        for runs, part in ((shape.text_runs, self.parts[1]), (shape.html_runs, self.parts[0])):
            segments: list[Segment] = []
            texts: list[str] | None = [] if want_parts else None
            last = ""
            for run in runs:
                if run is None:
                    if not part.extend(entries, segments, texts):
                        return None
                    last = "\n"
                elif type(run) is _StaticRun:
                    segments.append(run.segment)
                    if texts is not None:
                        texts.append(run.text)
                    last = run.text
                else:
                    pieces = cast("_DynamicRun", run).pieces
                    text = "".join(self._fill(pieces, shape.wraps, values, [], part))
                    encoded = segment(text, False)
                    if encoded is None:
                        return None
                    segments.append(encoded)
                    if texts is not None:
                        texts.append(text)
                    last = text
            out.append(assemble(segments, last.endswith("\n")))
            bodies.append("".join(texts) if texts is not None else "")
        if out[0] is None or out[1] is None:
            return None
        result = (out[0], out[1], bodies[0], bodies[1])
        if checking:
            self.checks -= 1
            shaped = self.render(context, entries)
            if shaped is None:
                return None
            want = (encode_parts(shaped[3]), encode_parts(shaped[2]), shaped[1], shaped[0])
            stuffing = [cast(Any, r[1]).stuffed for r in (out[0], out[1])]
            if result != want or stuffing != [
                cast(Any, w[1]).stuffed if w else None for w in (want[0], want[1])
            ]:
                self._off("line runs differ from the parts")
                return None
        return result

    def _off(self, reason: str) -> None:
        log.warning("digest_shapes_disabled", reason=reason)
        self.on = False
        self.cache.clear()

    def _build(self, context: dict[str, object]) -> _Shape:
        fake = dict(context)
        for name, sentinel in zip(PERSONAL_FIELDS, self.sentinels, strict=True):
            fake[name] = sentinel if context[name] else ""  # "if x" sees the same
        blocks = f"{self.prefix}B0x"
        with self.deferrals.collecting() as deferred:
            out = []
            for part in self.parts:
                assert part.skeleton is not None
                slot: str = markupsafe.Markup(blocks) if part.html else blocks  # noqa: S704
                out.append(part.skeleton.render(fake, __entry_blocks__=slot))
            wraps = tuple(deferred)
        for text, *_ in wraps:
            if any(m.group(1) != "S" for m in self.slot.finditer(text)):
                raise ValueError("a wrap around the entry blocks or another wrap")
        pieces = [self._pieces(o, len(wraps)) for o in out]
        return _Shape(
            html=pieces[0],
            text=pieces[1],
            wraps=wraps,
            html_runs=_compile_runs(pieces[0], whole_lines=False),
            text_runs=_compile_runs(pieces[1], whole_lines=False),
        )

    def _pieces(self, rendered: str, wraps: int) -> tuple[_Piece, ...]:
        split = self.slot.split(rendered)
        pieces: list[_Piece] = []
        for i in range(0, len(split), 3):
            literal = split[i]
            first, last = literal.find("\n") + 1, literal.rfind("\n") + 1
            # head up to its first line end, whole lines, the rest: see encode_parts
            for cut in (literal[:first], literal[first:last], literal[last:]):
                if cut:
                    pieces.append(cut)
            if i + 2 < len(split):
                kind, index = split[i + 1], int(split[i + 2])
                limit = {"S": len(PERSONAL_FIELDS), "W": wraps, "B": 1}[kind]
                if index >= limit:
                    raise ValueError(f"unknown slot {kind}{index}")
                pieces.append((kind, index))
        return tuple(pieces)

    def _fill(
        self,
        pieces: tuple[_Piece, ...],
        wraps: tuple[_Deferred, ...],
        personal: list[str],
        entries: list[Entry],
        part: _EntryBlocks,
    ) -> list[str]:
        esc = part.html
        out: list[str] = []
        for piece in pieces:
            if type(piece) is str:
                out.append(piece)
                continue
            kind, index = cast("tuple[str, int]", piece)
            if kind == "B":
                out += part.each(entries)
            elif kind == "S":
                value = personal[index]
                out.append(escaped(value) if esc else value)
            else:
                text, width, indent, first = wraps[index]
                # One pass: a value that happens to hold a sentinel is not scanned again.
                text = self.slot.sub(lambda m: personal[int(m.group(2))], text)
                wrapped = _fill_text(text, width, indent, first)
                out.append(escaped(wrapped) if esc else wrapped)
        return out


class Renderer:
    """Loads and prepares the templates once; :meth:`render` is then pure."""

    def __init__(self, templates_dir: Path | None = None) -> None:
        directory = templates_dir if templates_dir is not None else _find_templates()
        self.templates_dir = directory
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(directory),
            autoescape=jinja2.select_autoescape(
                enabled_extensions=("html", "htm", "xml"),
                disabled_extensions=("txt",),
                default_for_string=True,
                default=True,
            ),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        self._shapes: _Shapes | None = None
        deferrals = _Deferrals()

        def wrap(
            text: str, width: int = TEXT_WIDTH, indent: str = "", first: str | None = None
        ) -> str:
            deferred = deferrals.wrap(text, width, indent, first)
            if deferred is not None:
                return deferred
            return _wrap(text, width, indent, first)

        def emphasis_html_filter(text: str) -> markupsafe.Markup:
            marked = deferrals.emphasis(text, "H")
            if marked is not None:
                return markupsafe.Markup(marked)  # noqa: S704 (letters and digits)
            return emphasis_html(text)

        def emphasis_text_filter(text: str) -> str:
            marked = deferrals.emphasis(text, "T")
            return marked if marked is not None else emphasis_text(text)

        self._env.filters["wrap"] = wrap
        self._env.filters["emphasis_html"] = emphasis_html_filter
        self._env.filters["emphasis_text"] = emphasis_text_filter
        try:
            source = (directory / "digest.html").read_text(encoding="utf-8")
            # Inline once, here: the Jinja markup survives css-inline's HTML round trip as
            # text and attribute values (see the note at the top of digest.html).
            inliner = css_inline.CSSInliner(
                keep_at_rules=True, minify_css=True, load_remote_stylesheets=False
            )
            inlined = inliner.inline(_JINJA_COMMENT.sub("", source)).rstrip("\n") + "\n"
            self._html = self._env.from_string(inlined)
            self._text = self._env.get_template("digest.txt")
            # Each paper's block rendered once per run, not once per subscriber.
            self._html_blocks = _EntryBlocks(self._env, inlined, self._html, deferrals)
            text_env = self._env.overlay(autoescape=False)
            text_source = (directory / "digest.txt").read_text(encoding="utf-8")
            self._text_blocks = _EntryBlocks(text_env, text_source, self._text, deferrals)
            # The rest of both templates rendered once per shape, personalised by slots.
            self._shapes = _Shapes(self._html_blocks, self._text_blocks, deferrals)
        except (OSError, UnicodeError, jinja2.TemplateError, css_inline.InlineError) as exc:
            raise RenderError(f"cannot load the templates in {directory}: {exc}") from exc

    def render(
        self, digest: Digest, ctx: RenderContext, *, parts: bool = True, payload: bool = False
    ) -> RenderedDigest:
        """The finished message for ``digest``; raises RenderError (that subscriber only).

        ``parts=False``: the message bytes are all the caller needs; the ``html`` and
        ``text`` fields come back empty (the SMTP sender does not keep them).
        ``payload=True``: the message comes as its SMTP DATA payload, a
        :class:`~digestd.compose.DataPayload` (see :func:`~digestd.compose.build_message`)."""
        try:
            return self._render(digest, ctx, parts, payload)
        except RenderError:
            raise
        except Exception as exc:  # a template or data bug must not stop other subscribers
            raise RenderError(
                f"cannot render the digest for subscriber {digest.subscriber.id}: {exc!r}"
            ) from exc

    def _render(
        self, digest: Digest, ctx: RenderContext, parts: bool, payload: bool
    ) -> RenderedDigest:
        sub = digest.subscriber
        if not _TOKEN.match(sub.token):
            raise RenderError(f"subscriber {sub.id} has no usable link token")
        if ctx.now.tzinfo is None or ctx.now.utcoffset() is None:
            raise RenderError("RenderContext.now must be timezone-aware")
        base_url = safe_url(ctx.base_url).rstrip("/")
        if not base_url:
            raise RenderError(f"base_url {ctx.base_url!r} is not an http(s) URL")
        fulls = [_entry_full(i, pick) for i, pick in enumerate(digest.picks, start=1)]
        count = len(fulls)
        subject = _subject(ctx.subject_template, digest.date, count)
        list_name = _list_name(ctx.list_id, ctx.from_name)
        _list_id_value(ctx.list_id, list_name)  # a bad list_id fails before any rendering
        name = clean_text(sub.name, 60)
        common = {
            "subject": subject,
            "list_name": list_name,
            "heading": f"Your papers for {_long_date(digest.date)}",
            "recipient": clean_text(sub.email, 254),
            "interests": _interests(sub),
            "preferences_url": preferences_url(base_url, sub.token),
            "unsubscribe_url": unsubscribe_url(base_url, sub.token),
            "postal_address": clean_text(ctx.postal_address, 300),
        }

        def context(entries: list[Entry]) -> dict[str, object]:
            more = count - len(entries)
            greeting = f"Hi {name} — " if name else ""
            if count == 0:
                lede = f"{greeting}no new papers matched your interests today."
            else:
                lede = (
                    f"{greeting}{_plural(count, 'paper')} picked for you from the day’s "
                    "trending research."
                )
            titles = [e.title for e in entries[:3]]
            preheader = " · ".join(titles) + (f" and {more} more" if more else "")
            return {
                **common,
                "entries": entries,
                "more_count": more,
                "more_text": f"{_plural(more, 'more paper')} matched today but did not fit "
                "in this email.",
                "lede": lede,
                "preheader": _trim(preheader or lede, 140),
            }

        def html_for(step: int) -> tuple[str, list[Entry]]:
            variants = [_entry_variants(i, pick) for i, pick in enumerate(digest.picks, start=1)]
            entries = _plan(variants, step)
            return self._html_blocks.render(context(entries)), entries

        entries = fulls  # _plan(variants, 0)
        text: str | None = None
        encoded: tuple[tuple[str, bytes] | None, tuple[str, bytes] | None] = (None, None)
        first = context(entries)
        fast = self._shapes.encoded(first, entries, parts) if self._shapes else None
        if fast is not None:
            encoded, text, html = (fast[0], fast[1]), fast[2], fast[3]
        else:
            shaped = self._shapes.render(first, entries) if self._shapes else None
            if shaped is not None:
                html, text = shaped[0], shaped[1]
                encoded = (encode_parts(shaped[3]), encode_parts(shaped[2]))
            else:
                html, entries = html_for(0)
        size = len(encoded[1][1]) if encoded[1] is not None else encoded_size(html)
        if size > _SIZE_TARGET:
            text, encoded = None, (None, None)
            lo, hi = 1, 3 * count  # smallest step whose HTML fits; size falls with the step
            while lo < hi:
                mid = (lo + hi) // 2
                if encoded_size(html_for(mid)[0]) <= _SIZE_TARGET:
                    hi = mid
                else:
                    lo = mid + 1
            html, entries = html_for(lo)
            if encoded_size(html) > _SIZE_TARGET:
                raise RenderError(f"digest for subscriber {sub.id} cannot fit the size budget")
            log.info("digest_shortened", subscriber_id=sub.id, papers=count, step=lo)
        if text is None:
            text = self._text_blocks.render(context(entries))
        message_id = message_id_for(sub, digest.date, ctx.domain)
        headers = MessageHeaders(
            from_address=ctx.from_address,
            from_name=ctx.from_name,
            to_address=sub.email,
            to_name=name,
            subject=subject,
            date=ctx.now,
            message_id=message_id,
            list_id=ctx.list_id,
            list_name=list_name,
            unsubscribe_url=common["unsubscribe_url"],
            unsubscribe_mailto=_mailto(ctx.from_address, sub.token),
            reply_to=ctx.reply_to,
            precedence=ctx.precedence,
            feedback_id=ctx.feedback_id,
        )
        message = build_message(headers, text=text, html=html, encoded=encoded, payload=payload)
        return RenderedDigest(
            subscriber_id=sub.id,
            email=sub.email,
            date=digest.date,
            message_id=message_id,
            subject=subject,
            html=html if parts else "",
            text=text if parts else "",
            message=message,
            paper_ids=tuple(e.paper_id for e in entries),
        )


def _mailto(address: str, token: str) -> str:
    return f"{_mailto_prefix(address)}?subject=unsubscribe-{token}"


@functools.lru_cache(maxsize=16)
def _mailto_prefix(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"mailto:{quote(local, safe='.-_+')}@{_ascii_domain(domain)}"


@functools.lru_cache(maxsize=16)
def _list_name(list_id: str, from_name: str) -> str:
    """:attr:`RenderContext.list_name`, once per run."""
    match = re.fullmatch(r"\s*(.*?)\s*<[^<>]*>\s*", list_id)
    name = match.group(1) if match else ""
    return clean_text(name.strip('"') or from_name, 100) or "digestd"


@functools.lru_cache(maxsize=16)
def _list_id_value(list_id: str, list_name: str) -> str:
    return list_id_value(list_id, list_name)
