"""HTTP for the sources: one shared client, capped bodies, retries with polite back-off.

:func:`get` is the only way the sources talk HTTP. It

* streams the body and stops at ``FetchConfig.max_bytes`` (a declared ``Content-Length``
  above the cap is refused before reading), so a huge or endless body is a clean
  :class:`~digestd.errors.PayloadError`, never a memory blow-up;
* retries 429, 408 and 5xx answers, transport errors and timeouts, up to
  ``FetchConfig.retries`` times, with exponential back-off and jitter;
* honours the server's hints: ``Retry-After`` (seconds or HTTP-date), ``RateLimit``
  (``t=``/``reset=``), ``RateLimit-Reset`` and ``X-RateLimit-Reset``. A hint longer than
  :attr:`RetryPolicy.max_wait` gives up at once instead of hammering the server early;
* gives each attempt a deadline of ``4 × FetchConfig.timeout`` from connect to last byte
  (``timeout`` itself bounds each connect/read/write), so a slow drip cannot hang a run.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import json
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import httpx
import structlog

from ..config import FetchConfig
from ..errors import PayloadError, SourceError
from .normalize import clean_text

log = structlog.get_logger(__name__)

RETRY_STATUSES = frozenset({408, 425, 429})
ERROR_BODY_BYTES = 64 * 1024
DEADLINE_FACTOR = 4.0

_RATELIMIT_RESET = re.compile(r"(?:^|[;,\s])(?:t|reset)\s*=\s*(\d+(?:\.\d+)?)")
_HTML_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_ATOM_SUMMARY = re.compile(rb"<summary[^>]*>(.*?)</summary>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long to wait between attempts. Tests inject ``sleep``/``jitter`` to stay fast.

    ``jitter`` returns a number in [0, 1); ``max_wait`` caps any single wait, including one
    a server asks for."""

    base_delay: float = 1.0
    max_delay: float = 30.0
    max_wait: float = 60.0
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep)
    jitter: Callable[[], float] = field(default=random.random)

    def backoff(self, attempt: int) -> float:
        """Exponential back-off with jitter: ``base · 2^attempt`` (capped), times 0.5–1."""
        delay = min(self.max_delay, self.base_delay * 2.0 ** min(attempt, 30))
        return delay * (0.5 + 0.5 * self.jitter())


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete HTTP answer whose body fitted under the cap."""

    url: str
    status: int
    headers: httpx.Headers
    body: bytes


class HttpStatusError(SourceError):
    """A final non-success answer (after retries, or one that is not worth retrying)."""

    def __init__(self, status: int, where: str, detail: str = "") -> None:
        self.status = status
        super().__init__(f"HTTP {status} from {where}" + (f": {detail}" if detail else ""))


class IntervalLimiter:
    """At most one request start per ``interval`` seconds (arXiv asks for one every 3 s)."""

    def __init__(
        self,
        interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._sleep = sleep
        self._next = -math.inf
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        """Return when the next request may start, and reserve that slot."""
        async with self._lock:
            delay = self._next - self._clock()
            if delay > 0:
                await self._sleep(delay)
            self._next = self._clock() + self.interval


def make_client(fetch: FetchConfig) -> httpx.AsyncClient:
    """The one client a run shares: timeouts, a User-Agent, bounded pools, redirects."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(fetch.timeout),
        headers={"User-Agent": clean_text(fetch.user_agent, 300) or "digestd"},
        limits=httpx.Limits(max_connections=8, max_keepalive_connections=4),
        follow_redirects=True,
        max_redirects=5,
    )


def where(url: str | httpx.URL) -> str:
    """``scheme://host/path`` of a URL: enough to debug, no query (it may hold a token)."""
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii', 'replace')}{parsed.path}"


def retry_hint(headers: Mapping[str, str], now: dt.datetime | None = None) -> float | None:
    """Seconds the server asks us to wait, from Retry-After or RateLimit-style headers."""
    now = now or dt.datetime.now(dt.UTC)
    retry_after = headers.get("retry-after", "").strip()
    if retry_after:
        if retry_after.isdigit():
            return float(retry_after)
        try:
            when = email.utils.parsedate_to_datetime(retry_after)
        except (TypeError, ValueError, IndexError, OverflowError):
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.UTC)
            return max(0.0, (when - now).total_seconds())
    match = _RATELIMIT_RESET.search(headers.get("ratelimit", ""))
    if match:
        return float(match.group(1))
    for name in ("ratelimit-reset", "x-ratelimit-reset"):
        value = headers.get(name, "").strip()
        try:
            seconds = float(value)
        except ValueError:
            continue
        if not math.isfinite(seconds) or seconds < 0:
            continue
        if seconds > 1e9:  # an epoch timestamp, not a delay
            return max(0.0, seconds - now.timestamp())
        return seconds
    return None


def error_detail(body: bytes) -> str:
    """A one-line message from an error body: JSON ``error``/``message``, arXiv's Atom error
    entry, or an HTML page's title."""
    head = body[:ERROR_BODY_BYTES]
    try:
        data = json.loads(head)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        for key in ("error", "message", "detail"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("message")
            if isinstance(value, str) and value.strip():
                return clean_text(value, 200)
        return ""
    pattern = _ATOM_SUMMARY if b"/api/errors" in head else _HTML_TITLE
    match = pattern.search(head)
    if match:
        return clean_text(match.group(1).decode("utf-8", "replace"), 200)
    return ""


async def _get_once(
    client: httpx.AsyncClient,
    url: str,
    params: Mapping[str, str] | None,
    headers: Mapping[str, str],
    max_bytes: int,
) -> Reply:
    async with client.stream("GET", url, params=params, headers=headers) as response:
        ok = response.is_success
        limit = max_bytes if ok else ERROR_BODY_BYTES
        declared = response.headers.get("content-length", "")
        if ok and declared.isdigit() and int(declared) > max_bytes:
            raise PayloadError(
                f"{where(response.url)}: response of {int(declared)} bytes is larger than"
                f" the {max_bytes}-byte limit (fetch.max_bytes)"
            )
        chunks: list[bytes] = []
        total = 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > limit:
                if ok:
                    raise PayloadError(
                        f"{where(response.url)}: response is larger than the {max_bytes}-byte"
                        " limit (fetch.max_bytes)"
                    )
                break
            chunks.append(chunk)
        return Reply(str(response.url), response.status_code, response.headers, b"".join(chunks))


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return f"timed out ({type(exc).__name__}, timeout {timeout:g} s)"
    text = clean_text(str(exc), 200)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def get(
    client: httpx.AsyncClient,
    url: str,
    *,
    fetch: FetchConfig,
    params: Mapping[str, str] | None = None,
    accept: str = "*/*",
    retry: RetryPolicy = DEFAULT_RETRY,
    limiter: IntervalLimiter | None = None,
) -> Reply:
    """GET ``url`` with retries; a 2xx :class:`Reply` or a :class:`SourceError`.

    Raises :class:`PayloadError` (not retried) when the body exceeds ``fetch.max_bytes``,
    :class:`HttpStatusError` for a final non-2xx status, :class:`SourceError` for anything
    else (transport errors, timeouts, retries exhausted).
    """
    attempts = fetch.retries + 1
    headers = {"Accept": accept}
    site = where(url)
    reason = ""
    for attempt in range(attempts):
        if limiter is not None:
            await limiter.wait()
        hint: float | None = None
        try:
            async with asyncio.timeout(fetch.timeout * DEADLINE_FACTOR):
                reply = await _get_once(client, url, params, headers, fetch.max_bytes)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise SourceError(f"{site}: bad URL: {_describe(exc, fetch.timeout)}") from None
        except (httpx.TransportError, TimeoutError) as exc:
            reason = f"{site}: {_describe(exc, fetch.timeout)}"
        except (httpx.TooManyRedirects, httpx.DecodingError) as exc:
            raise SourceError(f"{site}: {_describe(exc, fetch.timeout)}") from None
        else:
            if reply.status < 300:
                return reply
            if reply.status not in RETRY_STATUSES and reply.status < 500:
                raise HttpStatusError(reply.status, site, error_detail(reply.body))
            detail = error_detail(reply.body)
            reason = f"HTTP {reply.status} from {site}" + (f": {detail}" if detail else "")
            hint = retry_hint(reply.headers)
        if attempt == attempts - 1:
            break
        wait = hint if hint is not None else retry.backoff(attempt)
        if wait > retry.max_wait:
            raise SourceError(
                f"{reason}; the server asks to wait {wait:.0f} s, longer than"
                f" {retry.max_wait:.0f} s: giving up for this run"
            )
        log.info("http retry", url=site, attempt=attempt + 1, wait=round(wait, 3), reason=reason)
        await retry.sleep(wait)
    raise SourceError(f"{reason} (gave up after {attempts} attempts)")
