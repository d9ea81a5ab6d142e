"""Sample digests for the render, compose, DKIM, spam and browser tests.

Real paper data comes from the recorded Hugging Face ``daily_papers`` response in
``tests/fixtures/hf/`` (newest schema: AI summary, GitHub repo, project page). The
converter here is deliberately tiny and independent of ``digestd.sources``, so these tests
exercise rendering only.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
from email.message import EmailMessage
from functools import cache
from html.parser import HTMLParser

from conftest import FIXTURES

from digestd.models import Digest, Paper, Pick, Preferences, Subscriber
from digestd.render import RenderContext, Renderer

HF_FILE = FIXTURES / "hf" / "daily_papers_date-2026-08-21_snapshot-0815utc.json"
DATE = dt.date(2026, 8, 21)
NOW = dt.datetime(2026, 8, 21, 7, 0, tzinfo=dt.UTC)
TOKEN = "tK3v9Qx_Lm2Rb8Zs-Wc4Np7Hd1Fg6Jy5Ae0Ut"


@cache
def fixture_papers() -> tuple[Paper, ...]:
    """The 17 papers of the 2026-08-21 Hugging Face snapshot as Paper values."""
    items = json.loads(HF_FILE.read_text(encoding="utf-8"))
    papers = []
    for item in items:
        p = item["paper"]
        papers.append(
            Paper(
                id=p["id"],
                title=" ".join(p["title"].split()),
                abstract=" ".join(p["summary"].split()),
                authors=tuple(a["name"] for a in p["authors"]),
                url=f"https://huggingface.co/papers/{p['id']}",
                sources=("hf_daily",),
                keywords=tuple(p.get("ai_keywords") or ()),
                upvotes=p.get("upvotes"),
                comments=item.get("numComments"),
                summary=p.get("ai_summary") or None,
                code_url=p.get("githubRepo") or None,
                project_url=p.get("projectPage") or None,
            )
        )
    return tuple(papers)


def subscriber(**overrides: object) -> Subscriber:
    values: dict[str, object] = {
        "id": 7,
        "email": "ada@example.org",
        "name": "Ada Lovelace",
        "token": TOKEN,
        "prefs": Preferences(keywords=("agents", "video generation"), categories=("cs.LG",)),
    }
    values.update(overrides)
    return Subscriber(**values)  # type: ignore[arg-type]


def digest(n: int = 10, *, sub: Subscriber | None = None, papers: tuple[Paper, ...] = ()) -> Digest:
    """A digest of ``n`` picks (fixture papers, repeated with new ids when n > 17)."""
    source = papers or fixture_papers()
    picks = []
    for i in range(n):
        paper = source[i % len(source)]
        if i >= len(source):
            paper = Paper(**{**_fields(paper), "id": f"{paper.id}-{i}"})
        reasons = ("matches keyword “agents” in the title", "popular today: top 10 on Hugging Face")
        picks.append(Pick(paper=paper, score=100.0 - i, reasons=reasons))
    return Digest(subscriber=sub or subscriber(), date=DATE, picks=tuple(picks))


def _fields(paper: Paper) -> dict[str, object]:
    return {name: getattr(paper, name) for name in Paper.__slots__}  # type: ignore[attr-defined]


def context(**overrides: object) -> RenderContext:
    values: dict[str, object] = {
        "from_address": "papers@example.org",
        "from_name": "Daily Papers",
        "base_url": "https://digest.example.org",
        "list_id": "digest.example.org",
        "postal_address": "Example Research Lab, 1 Main Street, Springfield 12345",
        "now": NOW,
    }
    values.update(overrides)
    return RenderContext(**values)  # type: ignore[arg-type]


@cache
def renderer() -> Renderer:
    return Renderer()


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> tuple[EmailMessage, EmailMessage]:
    """(text/plain, text/html) of a multipart/alternative message, checking the order."""
    assert msg.get_content_type() == "multipart/alternative"
    items = list(msg.iter_parts())
    assert [p.get_content_type() for p in items] == ["text/plain", "text/html"]
    return items[0], items[1]  # type: ignore[return-value]


def encoded_html_size(msg: EmailMessage) -> int:
    """Octets of the HTML part's encoded body as sent (CRLF line ends)."""
    payload = parts(msg)[1].get_payload()
    assert isinstance(payload, str)
    return len(payload.replace("\r\n", "\n").replace("\n", "\r\n").encode("ascii"))


class TagCollector(HTMLParser):
    """Every start tag and attribute of an HTML document, to prove nothing was injected."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.attrs: list[tuple[str, str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.extend((tag, name, value or "") for name, value in attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def collect(html: str) -> TagCollector:
    parser = TagCollector()
    parser.feed(html)
    parser.close()
    return parser


def test_fixture_papers_load() -> None:
    """The sample loader reads every paper of the recorded response, with its extras."""
    papers = fixture_papers()
    assert len(papers) == 17
    assert papers[0].summary and papers[0].code_url and papers[0].project_url
    assert all(p.title and p.authors for p in papers)
