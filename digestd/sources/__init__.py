"""The ``sources`` stage: fetch the day's papers from every configured source.

::

    fetch_all(sources, date, client, fetch) ──▶ FetchResult(papers, failures, counts)

Kinds: ``hf_daily`` (:mod:`.hf`), ``arxiv`` (:mod:`.arxiv`), ``feed`` (:mod:`.feed`) and
``file`` (:mod:`.file`). All HTTP goes through one shared client (:func:`make_client`) and
:func:`.client.get` (capped bodies, retries honouring ``Retry-After``/``RateLimit``). Every
paper is normalised (:mod:`.normalize`) and the same paper from several sources is merged
into one. A source that fails is logged and recorded in ``failures``; the others go on —
:func:`fetch_all` never raises for a source failure.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import structlog

from ..config import (
    ArxivSource,
    FeedSource,
    FetchConfig,
    FileSource,
    HfDailySource,
    SourceConfig,
)
from ..errors import SourceError
from ..models import Paper
from ..validation import normalize_arxiv_id
from .arxiv import ARXIV_API, ARXIV_INTERVAL, fetch_arxiv, fetch_arxiv_paper
from .client import DEFAULT_RETRY, HttpStatusError, RetryPolicy, make_client
from .feed import fetch_feed
from .file import load_papers_file
from .hf import fetch_hf_daily, fetch_hf_paper
from .normalize import clean_text, merge_papers

__all__ = [
    "FetchResult",
    "RetryPolicy",
    "fetch_all",
    "fetch_paper",
    "load_papers_file",
    "make_client",
    "merge_papers",
]

log = structlog.get_logger(__name__)

MAX_REASON = 300


@dataclass(frozen=True, slots=True)
class FetchResult:
    """What a fetch produced: merged papers, per-source failures and per-source counts."""

    papers: tuple[Paper, ...]  # merged + normalised across sources
    failures: tuple[tuple[str, str], ...]  # (source name, one-line reason)
    counts: tuple[tuple[str, int], ...]  # (source name, papers it returned); 0 when it failed


async def _fetch_one(
    config: SourceConfig,
    date: dt.date,
    client: httpx.AsyncClient,
    fetch: FetchConfig,
    retry: RetryPolicy,
) -> list[Paper]:
    if isinstance(config, HfDailySource):
        return await fetch_hf_daily(client, config, date, fetch, retry)
    if isinstance(config, ArxivSource):
        return await fetch_arxiv(client, config, fetch, retry)
    if isinstance(config, FeedSource):
        return await fetch_feed(client, config, fetch, retry)
    if isinstance(config, FileSource):
        return await asyncio.to_thread(load_papers_file, config.path, source=config.name)
    raise SourceError(f"unknown source kind {type(config).__name__}")


async def _fetch_guarded(
    config: SourceConfig,
    date: dt.date,
    client: httpx.AsyncClient,
    fetch: FetchConfig,
    retry: RetryPolicy,
) -> list[Paper] | str:
    """The source's papers, or the one-line reason it failed (logged here)."""
    started = time.monotonic()
    try:
        papers = merge_papers(await _fetch_one(config, date, client, fetch, retry))
    except SourceError as exc:
        reason = clean_text(str(exc), MAX_REASON) or type(exc).__name__
        log.warning("source failed", source=config.name, kind=config.kind, reason=reason)
        return reason
    except Exception as exc:  # an unforeseen payload or a bug must not stop the other sources
        reason = clean_text(f"internal error: {type(exc).__name__}: {exc}", MAX_REASON)
        log.exception("source failed", source=config.name, kind=config.kind, reason=reason)
        return reason
    seconds = round(time.monotonic() - started, 3)
    log.info(
        "source fetched", source=config.name, kind=config.kind, papers=len(papers), seconds=seconds
    )
    return papers


async def fetch_all(
    sources: Sequence[SourceConfig],
    date: dt.date,
    client: httpx.AsyncClient,
    fetch: FetchConfig,
    *,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> FetchResult:
    """Fetch every source concurrently (arXiv requests stay spaced), then merge.

    ``date`` is the digest date; ``hf_daily`` asks for ``date - days_back``, ``arxiv`` and
    ``feed`` return what they list now, ``file`` ignores it. Papers come in source order.
    """
    outcomes = await asyncio.gather(
        *(_fetch_guarded(config, date, client, fetch, retry) for config in sources)
    )
    papers: list[Paper] = []
    failures: list[tuple[str, str]] = []
    counts: list[tuple[str, int]] = []
    for config, outcome in zip(sources, outcomes, strict=True):
        if isinstance(outcome, str):
            failures.append((config.name, outcome))
            counts.append((config.name, 0))
        else:
            papers.extend(outcome)
            counts.append((config.name, len(outcome)))
    return FetchResult(tuple(merge_papers(papers)), tuple(failures), tuple(counts))


async def fetch_paper(
    client: httpx.AsyncClient,
    arxiv_id: str,
    *,
    hf_base: str = "https://huggingface.co",
    arxiv_api: str = ARXIV_API,
    fetch: FetchConfig | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    arxiv_interval: float = ARXIV_INTERVAL,
) -> Paper | None:
    """One paper by arXiv id (for seed papers): Hugging Face first, else the arXiv API.

    Returns None for an id that is not an arXiv id or that neither knows; raises
    :class:`SourceError` when arXiv cannot be reached (after retries).
    """
    wanted = normalize_arxiv_id(arxiv_id)
    if wanted is None:
        return None
    fetch = fetch or FetchConfig()
    try:
        paper = await fetch_hf_paper(client, wanted, hf_base, fetch, retry)
    except HttpStatusError as exc:
        if exc.status != 404:
            log.info("hf paper lookup failed", arxiv_id=wanted, reason=str(exc))
        paper = None
    except SourceError as exc:
        log.info("hf paper lookup failed", arxiv_id=wanted, reason=str(exc))
        paper = None
    if paper is not None:
        return paper
    return await fetch_arxiv_paper(
        client, wanted, fetch, api=arxiv_api, interval=arxiv_interval, retry=retry
    )
