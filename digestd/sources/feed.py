"""RSS 2.0, RSS 1.0 and Atom feeds → papers (the ``feed`` source, and arXiv's feeds).

XML is parsed with defusedxml only (entity declarations and external references are
refused, so a "billion laughs" bomb is a :class:`PayloadError`), and read by namespace, so
both of arXiv's Atom layouts (2016 inline namespaces, 2025+ root declarations) parse alike.

An entry's id is the arXiv id found in its link, guid or Atom id; otherwise
``feed:<first 12 hex digits of sha1(link)>``. Descriptions are HTML-stripped; the
"Authors: / Upvotes: / Summary:" paragraphs of HF mirror feeds and the
"arXiv:… Announce Type: new Abstract:" prefix of arXiv's RSS are recognised.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element, ParseError

import httpx
import structlog
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as defused_fromstring

from ..config import FeedSource, FetchConfig
from ..errors import PayloadError
from ..models import Paper
from .client import DEFAULT_RETRY, RetryPolicy, get
from .normalize import Parsed, arxiv_urls, build_paper, clean_text, find_arxiv_id, html_lines

log = structlog.get_logger(__name__)

ATOM = "{http://www.w3.org/2005/Atom}"
ARXIV = "{http://arxiv.org/schemas/atom}"
DC = "{http://purl.org/dc/elements/1.1/}"
CONTENT = "{http://purl.org/rss/1.0/modules/content/}"
RSS1 = "{http://purl.org/rss/1.0/}"
RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"

FEED_ACCEPT = (
    "application/rss+xml, application/atom+xml, application/rdf+xml;q=0.9,"
    " application/xml;q=0.8, text/xml;q=0.8, */*;q=0.1"
)

_ANNOUNCE_PREFIX = re.compile(
    r"^arXiv:\S+\s+Announce\s+Type:\s*[\w-]+\s*(?:Abstract:\s*)?", re.IGNORECASE
)
_ARXIV_HOST = re.compile(r"^https?://(?:www\.|export\.)?arxiv\.org/", re.IGNORECASE)
_LABEL = re.compile(r"^(Authors?|Upvotes|Summary|Abstract|TL;?DR)\s*:\s*(.*)$", re.IGNORECASE)


class ErrorEntry(PayloadError):
    """The feed carried an error entry (arXiv's API answers bad queries this way)."""


@dataclass(slots=True)
class Entry:
    """The fields of one RSS item or Atom entry, as text, before normalisation."""

    title: str = ""
    link: str = ""
    guid: str = ""
    description: str = ""
    authors: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    published: str = ""
    announce_type: str = ""
    pdf_link: str = ""


def parse_xml(body: bytes, what: str) -> Element:
    """Untrusted bytes → the root element, through defusedxml; PayloadError on anything odd."""
    head = body[:200].lstrip()
    if not head:
        raise PayloadError(f"{what}: empty response, expected an RSS or Atom feed")
    try:
        root: Element = defused_fromstring(
            body, forbid_dtd=False, forbid_entities=True, forbid_external=True
        )
    except DefusedXmlException as exc:
        raise PayloadError(
            f"{what}: refused XML that declares entities or external references"
            f" ({type(exc).__name__})"
        ) from None
    except (ParseError, ValueError, LookupError) as exc:
        if head.startswith((b"{", b"[")):
            raise PayloadError(f"{what}: expected an RSS or Atom feed, got JSON") from None
        raise PayloadError(f"{what}: not well-formed XML ({clean_text(str(exc), 120)})") from None
    return root


def _text(element: Element | None) -> str:
    return "".join(element.itertext()) if element is not None else ""


def _first_text(element: Element, *tags: str) -> str:
    for tag in tags:
        text = _text(element.find(tag))
        if text.strip():
            return text
    return ""


def _split_names(text: str) -> list[str]:
    names = [part.strip() for part in re.split(r",|;|\band\b", text)]
    return [name for name in names if name]


def _rss_entry(item: Element, ns: str) -> Entry:
    """An RSS 2.0 item (``ns`` = "") or an RSS 1.0 item (``ns`` = the RSS 1.0 namespace)."""
    creators = [_text(c) for c in item.findall(DC + "creator")]
    authors = [name for c in creators for name in _split_names(c)]
    if not authors:
        authors = _split_names(_first_text(item, ns + "author"))
    categories = [_text(c) for c in item.findall(ns + "category")]
    categories += [_text(c) for c in item.findall(DC + "subject")]
    return Entry(
        title=_first_text(item, ns + "title", DC + "title"),
        link=_first_text(item, ns + "link").strip() or item.get(RDF + "about", ""),
        guid=_first_text(item, ns + "guid").strip(),
        description=_first_text(item, ns + "description", CONTENT + "encoded"),
        authors=authors,
        categories=categories,
        published=_first_text(item, ns + "pubDate", DC + "date"),
        announce_type=_first_text(item, ARXIV + "announce_type").strip().lower(),
    )


def _atom_entry(entry: Element) -> Entry:
    link = pdf = ""
    for el in entry.findall(ATOM + "link"):
        href = el.get("href", "").strip()
        if el.get("title") == "pdf" or el.get("type") == "application/pdf":
            pdf = pdf or href
        elif el.get("rel", "alternate") == "alternate":
            link = link or href
    return Entry(
        title=_first_text(entry, ATOM + "title"),
        link=link,
        guid=_first_text(entry, ATOM + "id").strip(),
        description=_first_text(entry, ATOM + "summary", ATOM + "content"),
        authors=[_text(a.find(ATOM + "name")) for a in entry.findall(ATOM + "author")],
        categories=[c.get("term", "") for c in entry.findall(ATOM + "category")],
        published=_first_text(entry, ATOM + "published", ATOM + "updated"),
        announce_type=_first_text(entry, ARXIV + "announce_type").strip().lower(),
        pdf_link=pdf,
    )


def iter_entries(root: Element, what: str) -> Iterator[Entry]:
    """The entries of an RSS 2.0, RSS 1.0 (RDF) or Atom document."""
    if root.tag == "rss":
        for item in root.iterfind("channel/item"):
            yield _rss_entry(item, "")
    elif root.tag == RDF + "RDF":
        for item in root.iterfind(RSS1 + "item"):
            yield _rss_entry(item, RSS1)
    elif root.tag == ATOM + "feed":
        for entry in root.iterfind(ATOM + "entry"):
            if "/api/errors" in _first_text(entry, ATOM + "id"):
                message = clean_text(_first_text(entry, ATOM + "summary"), 200)
                raise ErrorEntry(f"{what}: the server answered an error: {message}")
            yield _atom_entry(entry)
    else:
        tag = clean_text(root.tag.rpartition("}")[2], 40)
        raise PayloadError(f"{what}: not an RSS or Atom feed (root element <{tag}>)")


def _description(markup: str) -> tuple[str, dict[str, str]]:
    """The abstract of a description, and any labelled fields (authors, upvotes, summary)."""
    lines = html_lines(markup)
    if lines:
        lines[0] = _ANNOUNCE_PREFIX.sub("", lines[0])
    fields: dict[str, str] = {}
    rest: list[str] = []
    for line in lines:
        match = _LABEL.match(line)
        if match:
            label = match.group(1).lower().rstrip("s").replace(";", "")
            fields.setdefault(label, match.group(2))
        else:
            rest.append(line)
    abstract = fields.get("summary") or fields.get("abstract") or " ".join(rest)
    return abstract, fields


def feed_id(entry: Entry) -> tuple[str, bool]:
    """The paper id of an entry and whether it is an arXiv id."""
    arxiv_id = find_arxiv_id(entry.link, entry.guid)
    if arxiv_id is not None:
        return arxiv_id, True
    basis = entry.link or entry.guid or clean_text(entry.title, 1000)
    return "feed:" + hashlib.sha1(
        basis.encode("utf-8", "replace"), usedforsecurity=False
    ).hexdigest()[:12], False


def paper_from_entry(entry: Entry, source: str) -> Paper | None:
    """A normalised Paper from a feed entry, or None without a title."""
    paper_id, is_arxiv = feed_id(entry)
    abstract, fields = _description(entry.description)
    authors: Sequence[str] = entry.authors or _split_names(fields.get("author", ""))
    url, pdf_url = entry.link, entry.pdf_link
    if is_arxiv:
        # arXiv's own links become the canonical https, version-less ones; mirrors stay.
        abs_url, arxiv_pdf = arxiv_urls(paper_id)
        url = abs_url if not url or _ARXIV_HOST.match(url) else url
        pdf_url = arxiv_pdf if not pdf_url or _ARXIV_HOST.match(pdf_url) else pdf_url
    return build_paper(
        id=paper_id,
        title=entry.title,
        abstract=abstract,
        authors=authors,
        url=url,
        source=source,
        categories=entry.categories,
        upvotes=fields.get("upvote"),
        pdf_url=pdf_url or None,
        published=entry.published,
    )


def parse_feed(
    body: bytes, source: str, what: str, *, announce_types: frozenset[str] | None = None
) -> Parsed:
    """Parse a feed. With ``announce_types``, entries announced otherwise are left out
    (entries without an ``arxiv:announce_type`` are kept)."""
    root = parse_xml(body, what)
    papers: list[Paper] = []
    skipped = 0
    for entry in iter_entries(root, what):
        kind = entry.announce_type
        if announce_types is not None and kind and kind not in announce_types:
            continue
        paper = paper_from_entry(entry, source)
        if paper is None:
            skipped += 1
        else:
            papers.append(paper)
    return Parsed(papers, skipped)


async def fetch_feed(
    client: httpx.AsyncClient,
    config: FeedSource,
    fetch: FetchConfig,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> list[Paper]:
    """The ``feed`` source: any RSS/Atom feed at ``config.url``."""
    reply = await get(client, config.url, fetch=fetch, accept=FEED_ACCEPT, retry=retry)
    parsed = parse_feed(reply.body, config.name, f"{config.name}: {reply.url}")
    if parsed.skipped:
        log.warning("items skipped", source=config.name, skipped=parsed.skipped, reason="no title")
    return parsed.papers
