"""Hugging Face Daily Papers: ``GET /api/daily_papers?date=…`` and ``/api/papers/{id}``.

The parser accepts every recorded schema (2024 to 2026): outer ``mediaUrl`` or ``mediaUrls``,
with or without ``ai_summary``/``ai_keywords``/``githubRepo``/``projectPage``, comments on
the outer item, upvotes on the paper. Items without an id or title are skipped and counted;
an error object (``{"error": "…"}``) instead of an array is a :class:`PayloadError`.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

import httpx
import structlog

from ..config import FetchConfig, HfDailySource
from ..errors import PayloadError
from ..models import Paper
from ..validation import normalize_arxiv_id
from .client import DEFAULT_RETRY, RetryPolicy, get
from .normalize import Parsed, build_paper, clean_text

log = structlog.get_logger(__name__)

HF_PAPERS_URL = "https://huggingface.co/papers/"
JSON_ACCEPT = "application/json"


def decode_json(body: bytes, what: str) -> Any:
    """Bytes → JSON value, or a PayloadError that says what came instead."""
    try:
        return json.loads(body)
    except RecursionError:
        raise PayloadError(f"{what}: JSON nested too deeply") from None
    except ValueError as exc:
        head = body[:200].lstrip().lower()
        if head.startswith((b"<!doctype html", b"<html")):
            raise PayloadError(f"{what}: expected JSON, got an HTML page") from None
        if head.startswith(b"<"):
            raise PayloadError(f"{what}: expected JSON, got XML") from None
        if not body.strip():
            raise PayloadError(f"{what}: empty response, expected JSON") from None
        raise PayloadError(f"{what}: not valid JSON ({clean_text(str(exc), 120)})") from None


def _author_names(authors: object) -> list[object]:
    if not isinstance(authors, list):
        return []
    names: list[object] = []
    for author in authors:
        if isinstance(author, dict):
            names.append(author.get("name"))
        elif isinstance(author, str):
            names.append(author)
    return names


def paper_from_item(item: object, source: str) -> Paper | None:
    """One daily_papers item (``{"paper": {...}, ...}``) or a bare paper object → Paper."""
    if not isinstance(item, dict):
        return None
    inner = item.get("paper")
    paper: Mapping[str, Any] = inner if isinstance(inner, dict) else item
    raw_id = paper.get("id")
    arxiv_id = normalize_arxiv_id(raw_id) if isinstance(raw_id, str) else None
    if arxiv_id is None:
        return None
    keywords = paper.get("ai_keywords")
    return build_paper(
        id=arxiv_id,
        title=paper.get("title") or item.get("title"),
        abstract=paper.get("summary") or item.get("summary") or "",
        authors=_author_names(paper.get("authors")),
        url=HF_PAPERS_URL + arxiv_id,
        source=source,
        keywords=keywords if isinstance(keywords, list) else (),
        upvotes=paper.get("upvotes", item.get("upvotes")),
        comments=item.get("numComments", paper.get("numComments")),
        summary=paper.get("ai_summary"),
        pdf_url=f"https://arxiv.org/pdf/{arxiv_id}",
        code_url=paper.get("githubRepo"),
        project_url=paper.get("projectPage"),
        published=paper.get("publishedAt") or item.get("publishedAt"),
    )


def parse_daily_papers(data: object, source: str, what: str) -> Parsed:
    """A decoded daily_papers payload → papers; an object instead of a list is an error."""
    if isinstance(data, dict):
        message = data.get("error") or data.get("message")
        if isinstance(message, str) and message.strip():
            raise PayloadError(f"{what}: the server answered an error: {clean_text(message, 200)}")
        keys = ", ".join(clean_text(k, 40) for k in list(data)[:5])
        raise PayloadError(f"{what}: expected a JSON array of papers, got an object ({keys})")
    if not isinstance(data, list):
        raise PayloadError(f"{what}: expected a JSON array of papers, got {type(data).__name__}")
    papers: list[Paper] = []
    skipped = 0
    for item in data:
        paper = paper_from_item(item, source)
        if paper is None:
            skipped += 1
        else:
            papers.append(paper)
    return Parsed(papers, skipped)


async def fetch_hf_daily(
    client: httpx.AsyncClient,
    config: HfDailySource,
    date: dt.date,
    fetch: FetchConfig,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> list[Paper]:
    """The daily list for ``date - days_back``, page by page until a short or empty page."""
    day = (date - dt.timedelta(days=config.days_back)).isoformat()
    url = config.base_url.rstrip("/") + "/api/daily_papers"
    papers: list[Paper] = []
    seen: set[str] = set()
    skipped = 0
    for page in range(config.max_pages):
        params = {"date": day, "p": str(page), "limit": str(config.page_size)}
        reply = await get(client, url, fetch=fetch, params=params, accept=JSON_ACCEPT, retry=retry)
        what = f"{config.name}: {url}?date={day}&p={page}"
        data = decode_json(reply.body, what)
        parsed = parse_daily_papers(data, config.name, what)
        skipped += parsed.skipped
        new = [p for p in parsed.papers if p.id not in seen]
        seen.update(p.id for p in new)
        papers.extend(new)
        items = len(data) if isinstance(data, list) else 0
        if items < config.page_size or not new:
            break  # a short page is the last; a page of repeats means paging is ignored
    if skipped:
        log.warning(
            "items skipped", source=config.name, skipped=skipped, reason="no valid id or title"
        )
    return papers


async def fetch_hf_paper(
    client: httpx.AsyncClient,
    arxiv_id: str,
    hf_base: str,
    fetch: FetchConfig,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> Paper | None:
    """``GET {hf_base}/api/papers/{id}``; raises HttpStatusError (404 when HF has no page)."""
    url = f"{hf_base.rstrip('/')}/api/papers/{arxiv_id}"
    reply = await get(client, url, fetch=fetch, accept=JSON_ACCEPT, retry=retry)
    data = decode_json(reply.body, url)
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return None
    paper = paper_from_item(data, "hf")
    return paper if paper is not None and paper.id == arxiv_id else None
