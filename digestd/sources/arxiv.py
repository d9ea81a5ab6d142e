"""arXiv: the announcement RSS feed (the ``arxiv`` source) and the API (one paper by id).

``{base_url}/rss/cs.LG+cs.AI`` lists the day's announcements; entries announced as ``new``
are kept, ``cross`` ones only with ``include_cross``, replacements never. The same parser
reads Atom, so the API layout (and rss.arxiv.org's Atom variant) work too.

arXiv asks for at most one request every 3 seconds: every arXiv request made through one
client (all ``arxiv`` sources and :func:`fetch_arxiv_paper`, retries included) passes one
:class:`~digestd.sources.client.IntervalLimiter`.
"""

from __future__ import annotations

from urllib.parse import quote
from weakref import WeakKeyDictionary

import httpx
import structlog

from ..config import ArxivSource, FetchConfig
from ..models import Paper
from .client import DEFAULT_RETRY, HttpStatusError, IntervalLimiter, RetryPolicy, get
from .feed import FEED_ACCEPT, ErrorEntry, parse_feed

log = structlog.get_logger(__name__)

ARXIV_API = "https://export.arxiv.org/api/query"
ARXIV_INTERVAL = 3.0

_LIMITERS: WeakKeyDictionary[httpx.AsyncClient, IntervalLimiter] = WeakKeyDictionary()


def arxiv_limiter(client: httpx.AsyncClient, interval: float) -> IntervalLimiter:
    """The limiter shared by every arXiv request made through ``client``."""
    limiter = _LIMITERS.get(client)
    if limiter is None:
        limiter = _LIMITERS[client] = IntervalLimiter(interval)
    limiter.interval = interval
    return limiter


def rss_url(config: ArxivSource) -> str:
    """``{base_url}/rss/cat1+cat2`` (each category URL-quoted)."""
    cats = "+".join(quote(cat.strip(), safe=".-") for cat in config.categories)
    return f"{config.base_url.rstrip('/')}/rss/{cats}"


async def fetch_arxiv(
    client: httpx.AsyncClient,
    config: ArxivSource,
    fetch: FetchConfig,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> list[Paper]:
    """The ``arxiv`` source: today's announcements in the configured categories."""
    url = rss_url(config)
    limiter = arxiv_limiter(client, config.min_interval)
    reply = await get(client, url, fetch=fetch, accept=FEED_ACCEPT, retry=retry, limiter=limiter)
    announce = frozenset({"new", "cross"} if config.include_cross else {"new"})
    parsed = parse_feed(reply.body, config.name, f"{config.name}: {url}", announce_types=announce)
    if parsed.skipped:
        log.warning("items skipped", source=config.name, skipped=parsed.skipped, reason="no title")
    return parsed.papers


async def fetch_arxiv_paper(
    client: httpx.AsyncClient,
    arxiv_id: str,
    fetch: FetchConfig,
    *,
    api: str = ARXIV_API,
    interval: float = ARXIV_INTERVAL,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> Paper | None:
    """One paper from the API (``id_list``); None when arXiv does not know the id."""
    limiter = arxiv_limiter(client, interval)
    params = {"id_list": arxiv_id, "max_results": "1"}
    try:
        reply = await get(
            client,
            api,
            fetch=fetch,
            params=params,
            accept=FEED_ACCEPT,
            retry=retry,
            limiter=limiter,
        )
        parsed = parse_feed(reply.body, "arxiv", f"arXiv API id_list={arxiv_id}")
    except HttpStatusError as exc:
        if exc.status in (400, 404):
            return None  # arXiv answers a malformed id with 400 and an error entry
        raise
    except ErrorEntry:
        return None
    return next((paper for paper in parsed.papers if paper.id == arxiv_id), None)
