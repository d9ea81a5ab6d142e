"""Normalisation shared by every source: clean text, arXiv ids, URLs, dates, merging.

Every :class:`~digestd.models.Paper` a source returns is built by :func:`build_paper`, so
the guarantees hold whatever the payload held:

* text has HTML entities decoded, control/format characters replaced, whitespace collapsed,
  and is capped (title 1000, abstract 20000 characters, 500 authors, …);
* titles and abstracts are strings, never ``None``;
* ids are strings without a version suffix (``2511.04570v2`` → ``2511.04570``);
* URLs are plain ``http(s)`` URLs or absent (never ``javascript:``);
* dates are timezone-aware.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import html
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser

from ..models import Paper
from ..validation import normalize_arxiv_id

MAX_TITLE = 1000
MAX_ABSTRACT = 20_000
MAX_SUMMARY = 5000
MAX_AUTHORS = 500
MAX_AUTHOR = 300
MAX_TAGS = 100
MAX_TAG = 200
MAX_URL = 2000

_ELLIPSIS = "…"


@dataclass(frozen=True, slots=True)
class Parsed:
    """Papers parsed from one payload, and how many of its items were unusable."""

    papers: list[Paper]
    skipped: int


# New-style arXiv id as a whole URL/guid segment: ".../abs/2511.04570v2", "arXiv:2511.04570",
# "https://tldr.takara.ai/p/2604.26238", ".../pdf/2511.04570v1.pdf".
_NEW_ID_IN_TEXT = re.compile(
    r"(?:^|[/:=])(\d{2}(?:0[1-9]|1[0-2])\.\d{4,5})(?:v\d+)?(?:\.pdf)?(?=$|[/?#&])"
)
# Old-style id, only after an arXiv marker: "arxiv.org/abs/cond-mat/0603029v1".
_OLD_ID_IN_TEXT = re.compile(
    r"arxiv(?:\.org)?(?:/abs|/pdf)?[/:]([a-z-]+(?:\.[A-Z]{2})?/\d{7})(?:v\d+)?", re.IGNORECASE
)


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp")


def _is_invisible(ch: str) -> bool:
    # Format characters (bidi overrides, zero-width spaces, soft hyphens) and lone
    # surrogates are dropped; the zero-width joiner is kept (emoji sequences).
    return unicodedata.category(ch) in ("Cf", "Cs") and ch != "\u200d"


def clean_text(value: object, max_len: int) -> str:
    """Any value → one line of plain text: entities decoded, controls removed, ≤ ``max_len``."""
    if value is None or isinstance(value, bool):
        return ""
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str):
        return ""
    # Cheap guard before the per-character work: hostile payloads can be megabytes long.
    text = html.unescape(value[: max_len * 4 + 1000])
    if not text.isascii() or not text.isprintable():
        text = "".join(" " if _is_control(ch) else "" if _is_invisible(ch) else ch for ch in text)
    text = " ".join(text.split())
    if len(text) > max_len:
        text = text[: max_len - 1].rstrip() + _ELLIPSIS
    return text


class _TextExtractor(HTMLParser):
    """HTML → text, one line per block element; script/style contents dropped."""

    _BLOCKS = frozenset(
        {"p", "div", "br", "li", "ul", "ol", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5"}
        | {"h6", "blockquote", "pre", "section", "article", "hr", "table", "dt", "dd"}
    )
    _SKIP = frozenset({"script", "style", "template"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data.replace("\n", " "))


_HTML_TAG = re.compile(
    r"</?(?:p|br|div|span|a|b|i|u|s|em|strong|img|ul|ol|li|h[1-6]|table|tr|td|th|pre|code"
    r"|sup|sub|blockquote|hr|section|article|figure|font|small|tt|dl|dt|dd)\b[^<>]*>",
    re.IGNORECASE,
)


def html_lines(markup: str, max_len: int = 4 * MAX_ABSTRACT) -> list[str]:
    """The text lines of an HTML fragment (tags stripped, entities decoded, blanks dropped)."""
    if not _HTML_TAG.search(markup):  # plain text, maybe with "<" in maths: keep it all
        return [line for line in (" ".join(markup.split()),) if line]
    parser = _TextExtractor()
    parser.feed(markup[:max_len])
    parser.close()
    lines = "".join(parser.parts).split("\n")
    return [" ".join(line.split()) for line in lines if line.strip()]


def find_arxiv_id(*candidates: str | None) -> str | None:
    """The first arXiv id found in links/guids such as ``https://arxiv.org/abs/2511.04570v2``."""
    for text in candidates:
        if not text:
            continue
        text = text.strip()
        direct = normalize_arxiv_id(text)
        if direct is not None:
            return direct
        match = _NEW_ID_IN_TEXT.search(text) or _OLD_ID_IN_TEXT.search(text)
        if match is not None:
            return match.group(1)
    return None


def clean_url(value: object) -> str | None:
    """An absolute ``http(s)`` URL without spaces or control characters, else ``None``."""
    if not isinstance(value, str):
        return None
    url = value.strip()
    if not url or len(url) > MAX_URL or not url.lower().startswith(("https://", "http://")):
        return None
    if any(ch.isspace() or _is_control(ch) or _is_invisible(ch) for ch in url):
        return None
    return url


def parse_datetime(value: object) -> dt.datetime | None:
    """ISO 8601 (``2025-11-06T13:00:34.000Z``) or RFC 822 (RSS ``pubDate``) → aware datetime."""
    if not isinstance(value, str) or not value.strip() or len(value) > 100:
        return None
    text = value.strip()
    parsed: dt.datetime | None
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed


def as_count(value: object) -> int | None:
    """A non-negative whole number (upvotes, comments), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit() and len(value) < 12:
        value = int(value)
    if isinstance(value, int) and 0 <= value < 10**12:
        return value
    return None


def _unique(values: Iterable[str], key_casefold: bool = False) -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    for value in values:
        key = value.casefold() if key_casefold else value
        if value and key not in seen:
            seen.add(key)
            out.append(value)
    return tuple(out)


def clean_list(values: Iterable[object], max_items: int, max_len: int) -> tuple[str, ...]:
    """Cleaned, non-empty, de-duplicated strings, at most ``max_items`` of them."""
    out: list[str] = []
    for value in values:
        text = clean_text(value, max_len)
        if text:
            out.append(text)
        if len(out) >= max_items * 2:
            break
    return _unique(out)[:max_items]


def arxiv_urls(arxiv_id: str) -> tuple[str, str]:
    """The abstract page and PDF URLs of an arXiv id."""
    return f"https://arxiv.org/abs/{arxiv_id}", f"https://arxiv.org/pdf/{arxiv_id}"


def build_paper(
    *,
    id: str,
    title: object,
    abstract: object = "",
    authors: Sequence[object] = (),
    url: object = "",
    source: str,
    categories: Sequence[object] = (),
    keywords: Sequence[object] = (),
    upvotes: object = None,
    comments: object = None,
    summary: object = None,
    pdf_url: object = None,
    code_url: object = None,
    project_url: object = None,
    published: object = None,
) -> Paper | None:
    """A normalised :class:`Paper`, or ``None`` when the id or the title is empty."""
    paper_id = clean_text(id, 200)
    clean_title = clean_text(title, MAX_TITLE)
    if not paper_id or not clean_title:
        return None
    summary_text = clean_text(summary, MAX_SUMMARY)
    return Paper(
        id=paper_id,
        title=clean_title,
        abstract=clean_text(abstract, MAX_ABSTRACT),
        authors=clean_list(authors, MAX_AUTHORS, MAX_AUTHOR),
        url=clean_url(url) or "",
        sources=(source,),
        categories=clean_list(categories, MAX_TAGS, 64),
        keywords=_unique(clean_list(keywords, MAX_TAGS, MAX_TAG), key_casefold=True),
        upvotes=as_count(upvotes),
        comments=as_count(comments),
        summary=summary_text or None,
        pdf_url=clean_url(pdf_url),
        code_url=clean_url(code_url),
        project_url=clean_url(project_url),
        published=published if isinstance(published, dt.datetime) else parse_datetime(published),
    )


def _richer(a: str, b: str) -> str:
    return b if len(b) > len(a) else a


def _max(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _merge_two(a: Paper, b: Paper) -> Paper:
    published = a.published
    if b.published is not None and (published is None or b.published < published):
        published = b.published
    return Paper(
        id=a.id,
        title=_richer(a.title, b.title),
        abstract=_richer(a.abstract, b.abstract),
        authors=a.authors if len(a.authors) >= len(b.authors) else b.authors,
        url=a.url or b.url,
        sources=_unique((*a.sources, *b.sources)),
        categories=_unique((*a.categories, *b.categories))[:MAX_TAGS],
        keywords=_unique((*a.keywords, *b.keywords), key_casefold=True)[:MAX_TAGS],
        upvotes=_max(a.upvotes, b.upvotes),
        comments=_max(a.comments, b.comments),
        summary=a.summary or b.summary,
        pdf_url=a.pdf_url or b.pdf_url,
        code_url=a.code_url or b.code_url,
        project_url=a.project_url or b.project_url,
        published=published,
    )


def merge_papers(papers: Iterable[Paper]) -> list[Paper]:
    """One paper per id, in first-seen order.

    Duplicates are folded together: sources, categories and keywords are united, the largest
    upvote/comment counts kept (a later fetch of the same day has grown), the longer title,
    abstract and author list preferred, the first non-empty URL kept, and the earliest
    publication date.
    """
    merged: dict[str, Paper] = {}
    for paper in papers:
        seen = merged.get(paper.id)
        merged[paper.id] = paper if seen is None else _merge_two(seen, paper)
    return list(merged.values())
