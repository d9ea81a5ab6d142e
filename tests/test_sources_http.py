"""Sources over real HTTP: retries, server hints, timeouts, body caps and hostile payloads.

Every test talks to a real :class:`ScriptedServer` on 127.0.0.1. Retry waits go through an
injected ``sleep`` that records them (so Retry-After of 7 s is asserted, not slept); the
arXiv limiter test measures real spacing on the server's clock.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import itertools
import json
import tracemalloc

import httpx
import pytest
from conftest import FIXTURES, free_port
from httpserver import Reply, ScriptedServer, repeat

from digestd.config import ArxivSource, FeedSource, FetchConfig, HfDailySource
from digestd.errors import PayloadError, SourceError
from digestd.sources import FetchResult, RetryPolicy, fetch_all, make_client
from digestd.sources.client import IntervalLimiter, get, retry_hint

DATE = dt.date(2026, 8, 22)
HF_2026 = FIXTURES / "hf" / "daily_papers_date-2026-08-21_snapshot-0815utc.json"
RSS_AI = FIXTURES / "arxiv" / "rss_cs.AI_2026-04-27_trimmed-3-items.xml"
HF_PATH = "/api/daily_papers"


class Naps:
    """A ``RetryPolicy.sleep`` that records each wait instead of sleeping."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def naps() -> Naps:
    return Naps()


@pytest.fixture
def retry(naps: Naps) -> RetryPolicy:
    # jitter fixed at its top so back-off is exactly base · 2^attempt
    return RetryPolicy(base_delay=0.5, max_delay=8.0, max_wait=60.0, sleep=naps, jitter=lambda: 1.0)


def hf(server: ScriptedServer, **kwargs: object) -> HfDailySource:
    return HfDailySource(kind="hf_daily", base_url=server.url, **kwargs)  # type: ignore[arg-type]


async def run(
    client: httpx.AsyncClient,
    source: object,
    retry: RetryPolicy,
    fetch: FetchConfig | None = None,
) -> FetchResult:
    return await fetch_all([source], DATE, client, fetch or FetchConfig(), retry=retry)  # type: ignore[list-item]


def only_failure(result: FetchResult) -> str:
    assert result.papers == ()
    assert len(result.failures) == 1, result.failures
    return result.failures[0][1]


# --- retries and hints -------------------------------------------------------------------


async def test_429_with_retry_after_seconds_waits_that_long_then_succeeds(
    server, client, retry, naps
):
    """A 429 with Retry-After: 7 makes the client wait exactly 7 s, then it gets the papers."""
    server.add(
        HF_PATH,
        Reply.json({"error": "slow down"}, 429, headers={"Retry-After": "7"}),
        Reply.file(HF_2026),
    )
    result = await run(client, hf(server), retry)
    assert result.failures == ()
    assert len(result.papers) == 17
    assert naps.waits == [7.0]
    assert len(server.requests) == 2


async def test_429_with_retry_after_http_date_is_honoured(server, client, retry, naps):
    """Retry-After as an HTTP-date 20 s ahead becomes a wait of about 20 s."""
    when = email.utils.format_datetime(
        dt.datetime.now(dt.UTC) + dt.timedelta(seconds=20), usegmt=True
    )
    server.add(HF_PATH, Reply(status=429, headers={"Retry-After": when}), Reply.file(HF_2026))
    result = await run(client, hf(server), retry)
    assert result.failures == ()
    assert len(naps.waits) == 1 and 17 <= naps.waits[0] <= 20


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"RateLimit": '"api";r=0;t=12'}, 12.0),
        ({"RateLimit": "limit=100, remaining=0, reset=9"}, 9.0),
        ({"RateLimit-Reset": "5"}, 5.0),
        ({"X-RateLimit-Reset": "3"}, 3.0),
    ],
)
async def test_ratelimit_headers_set_the_wait(server, client, retry, naps, headers, expected):
    """RateLimit-style reset hints on a 429 decide how long the client waits."""
    server.add(HF_PATH, Reply(status=429, headers=headers), Reply.file(HF_2026))
    result = await run(client, hf(server), retry)
    assert result.failures == ()
    assert naps.waits == [expected]


def test_retry_hint_parses_every_form():
    """retry_hint reads seconds, HTTP-dates, RateLimit t=/reset= and epoch resets; junk is None."""
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert retry_hint({"retry-after": "0"}, now) == 0.0
    assert retry_hint({"retry-after": "Thu, 01 Jan 2026 12:00:30 GMT"}, now) == 30.0
    assert retry_hint({"retry-after": "Thu, 01 Jan 2026 11:00:00 GMT"}, now) == 0.0  # past
    assert retry_hint({"x-ratelimit-reset": str(now.timestamp() + 42)}, now) == pytest.approx(42)
    assert retry_hint({"retry-after": "soon"}, now) is None
    assert retry_hint({"ratelimit-reset": "nan"}, now) is None
    assert retry_hint({}, now) is None


async def test_hint_longer_than_cap_gives_up_without_hammering(server, client, retry, naps):
    """Retry-After: 3600 exceeds the 60 s cap: one request, no wait, a clear failure."""
    server.add(HF_PATH, Reply(status=429, headers={"Retry-After": "3600"}))
    reason = only_failure(await run(client, hf(server), retry))
    assert "3600" in reason and "HTTP 429" in reason
    assert naps.waits == []
    assert len(server.requests) == 1


async def test_503_then_success_backs_off_once(server, client, retry, naps):
    """A 503 is retried after the base back-off, and the second answer is used."""
    server.add(HF_PATH, Reply(status=503), Reply.file(HF_2026))
    result = await run(client, hf(server), retry)
    assert result.failures == () and len(result.papers) == 17
    assert naps.waits == [0.5]


async def test_500_forever_records_a_failure_after_all_retries(server, client, retry, naps):
    """500 on every attempt: retries+1 requests, exponential waits, then a failure entry."""
    server.add(HF_PATH, Reply.json({"error": "boom"}, 500))
    reason = only_failure(await run(client, hf(server), retry, FetchConfig(retries=3)))
    assert "HTTP 500" in reason and "boom" in reason and "4 attempts" in reason
    assert len(server.requests) == 4
    assert naps.waits == [0.5, 1.0, 2.0]


async def test_backoff_is_capped_and_jittered():
    """Back-off doubles up to max_delay and jitter scales it into [50 %, 100 %]."""
    low = RetryPolicy(base_delay=1, max_delay=5, jitter=lambda: 0.0)
    high = RetryPolicy(base_delay=1, max_delay=5, jitter=lambda: 0.999999)
    assert [low.backoff(n) for n in range(5)] == [0.5, 1.0, 2.0, 2.5, 2.5]
    assert [round(high.backoff(n), 3) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


async def test_404_is_not_retried(server, client, retry, naps):
    """A plain 4xx is final: one request, the server's error message in the reason."""
    server.add(HF_PATH, Reply.file(FIXTURES / "hf" / "error_body_not_found.json", status=404))
    reason = only_failure(await run(client, hf(server), retry))
    assert "HTTP 404" in reason and "can't find the page" in reason
    assert len(server.requests) == 1 and naps.waits == []


async def test_timeout_is_retried_then_reported(server, client, retry, naps):
    """A server that answers after the client's timeout: retried, then 'timed out'."""
    server.add(HF_PATH, Reply(delay=5.0, body=b"[]"))
    fetch = FetchConfig(timeout=0.2, retries=1)
    async with make_client(fetch) as short:
        reason = only_failure(await run(short, hf(server), retry, fetch))
    assert "timed out" in reason
    assert len(server.requests) == 2


async def test_slow_drip_body_hits_the_attempt_deadline(server, retry):
    """A body trickling in forever (each byte within the read timeout) is cut by the deadline."""
    server.add(HF_PATH, Reply(stream=repeat(b" ", -1), drip=0.05))
    fetch = FetchConfig(timeout=0.25, retries=0)
    async with make_client(fetch) as short:
        reason = only_failure(await run(short, hf(server), retry, fetch))
    assert "timed out" in reason


async def test_connection_refused_is_a_failure(client, retry, naps):
    """Nothing listening: ConnectError after the retries, recorded as a failure."""
    source = HfDailySource(kind="hf_daily", base_url=f"http://127.0.0.1:{free_port()}")
    reason = only_failure(await run(client, source, retry, FetchConfig(retries=1)))
    assert "ConnectError" in reason
    assert naps.waits == [0.5]


async def test_user_agent_and_accept_are_sent(server, retry):
    """Requests carry the configured User-Agent and a JSON Accept header."""
    server.add(HF_PATH, Reply.json([]))
    fetch = FetchConfig(user_agent="digestd-test/9 (+mailto:ops@example.org)")
    async with make_client(fetch) as c:
        await run(c, hf(server), retry, fetch)
    assert server.requests[0].headers["user-agent"] == "digestd-test/9 (+mailto:ops@example.org)"
    assert server.requests[0].headers["accept"] == "application/json"


# --- body cap ----------------------------------------------------------------------------


async def test_declared_huge_body_is_refused_before_reading(server, client, retry):
    """A 12 MB body with Content-Length against a 1 MB cap: PayloadError, not retried."""
    big = b"[" + b"0," * 6_000_000 + b"0]"
    server.add(HF_PATH, Reply(body=big))
    reason = only_failure(await run(client, hf(server), retry, FetchConfig(max_bytes=1_000_000)))
    assert "larger than the 1000000-byte limit" in reason
    assert len(server.requests) == 1


async def test_endless_chunked_body_stops_at_the_cap_in_bounded_memory(server, client, retry):
    """A chunked 64 MB body with no length stops at the cap, in bounded memory."""
    server.add(HF_PATH, Reply(stream=repeat(b"x" * 65536, 1024)))
    tracemalloc.start()
    try:
        result = await run(client, hf(server), retry, FetchConfig(max_bytes=2_000_000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    reason = only_failure(result)
    assert "larger than the 2000000-byte limit" in reason
    assert peak < 12_000_000
    assert server.streamed_bytes < 40_000_000


async def test_get_returns_a_body_just_under_the_cap(server, client):
    """A body of exactly max_bytes is accepted (the cap is inclusive)."""
    server.add("/blob", Reply(body=b"a" * 5000, content_type="text/plain"))
    reply = await get(client, server.url + "/blob", fetch=FetchConfig(max_bytes=5000))
    assert reply.body == b"a" * 5000


# --- hostile and broken payloads ---------------------------------------------------------


async def test_truncated_json_content_is_a_payload_error(server, client, retry, naps):
    """A complete HTTP answer holding half a JSON array: PayloadError, not retried."""
    body = HF_2026.read_bytes()
    server.add(HF_PATH, Reply(body=body[: len(body) // 2]))
    reason = only_failure(await run(client, hf(server), retry))
    assert "not valid JSON" in reason
    assert len(server.requests) == 1 and naps.waits == []


async def test_connection_cut_mid_body_is_retried_then_reported(server, client, retry, naps):
    """Content-Length promises more than is sent, then the server hangs up: retried, reported."""
    server.add(HF_PATH, Reply(body=HF_2026.read_bytes(), truncate=1000))
    reason = only_failure(await run(client, hf(server), retry, FetchConfig(retries=2)))
    assert "RemoteProtocolError" in reason or "ReadError" in reason
    assert len(server.requests) == 3


async def test_truncated_xml_is_a_payload_error(server, client, retry):
    """The arXiv RSS cut in half: 'not well-formed XML'."""
    body = RSS_AI.read_bytes()
    server.add("/rss/cs.AI", Reply(body=body[: len(body) // 2], content_type="application/xml"))
    source = ArxivSource(kind="arxiv", categories=["cs.AI"], base_url=server.url, min_interval=0)
    reason = only_failure(await run(client, source, retry))
    assert "not well-formed XML" in reason


async def test_empty_list_is_zero_papers_not_a_failure(server, client, retry):
    """An empty JSON array is a quiet day: no papers, no failure, a zero count."""
    server.add(HF_PATH, Reply.json([]))
    result = await run(client, hf(server), retry)
    assert result == FetchResult((), (), (("hf_daily", 0),))


async def test_error_object_with_200_is_a_failure_naming_the_message(server, client, retry):
    """HF's {"error": ...} object in a 200 answer is a failure carrying that message."""
    server.add(HF_PATH, Reply.file(FIXTURES / "hf" / "error_body_not_found.json"))
    reason = only_failure(await run(client, hf(server), retry))
    assert "Sorry, we can't find the page you are looking for." in reason


async def test_other_json_object_is_a_failure(server, client, retry):
    """A JSON object that is not an error is still not a list of papers."""
    server.add(HF_PATH, Reply.json({"papers": []}))
    reason = only_failure(await run(client, hf(server), retry))
    assert "expected a JSON array" in reason and "papers" in reason


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<rss version="2.0"><channel><item><title>&lol9;</title><link>https://arxiv.org/abs/2604.00001</link></item></channel></rss>
"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE rss [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<rss version="2.0"><channel><item><title>&xxe;</title><link>https://example.org/x</link></item></channel></rss>
"""


@pytest.mark.parametrize("body", [BILLION_LAUGHS, XXE], ids=["billion-laughs", "xxe"])
async def test_xml_with_entity_declarations_is_refused(server, client, retry, body):
    """Entity bombs and external entities are refused by defusedxml, as a failure."""
    server.add("/feed.xml", Reply(body=body, content_type="application/rss+xml"))
    source = FeedSource(kind="feed", url=server.url + "/feed.xml")
    reason = only_failure(await run(client, source, retry))
    assert "refused XML that declares entities" in reason


GARBAGE = bytes(range(128, 256)) * 40 + b"\x00\xff\xfe"


async def test_non_utf8_garbage_as_json_is_a_payload_error(server, client, retry):
    """Random high bytes where JSON belongs: a clean failure."""
    server.add(HF_PATH, Reply(body=GARBAGE))
    assert "not valid JSON" in only_failure(await run(client, hf(server), retry))


async def test_non_utf8_garbage_as_xml_is_a_payload_error(server, client, retry):
    """Random high bytes where a feed belongs: a clean failure."""
    server.add("/feed.xml", Reply(body=GARBAGE, content_type="application/xml"))
    source = FeedSource(kind="feed", url=server.url + "/feed.xml")
    assert "not well-formed XML" in only_failure(await run(client, source, retry))


async def test_html_page_instead_of_json_says_so(server, client, retry):
    """A captive-portal style HTML page where JSON belongs: 'expected JSON, got an HTML page'."""
    page = b"<!DOCTYPE html><html><head><title>Hello</title></head><body>Log in</body></html>"
    server.add(HF_PATH, Reply(body=page, content_type="text/html"))
    assert "expected JSON, got an HTML page" in only_failure(await run(client, hf(server), retry))


async def test_html_page_instead_of_feed_names_the_root(server, client, retry):
    """Well-formed XHTML where a feed belongs: 'not an RSS or Atom feed (root element <html>)'."""
    page = b"<html><head><title>Hi</title></head><body><p>not a feed</p></body></html>"
    server.add("/feed.xml", Reply(body=page, content_type="text/html"))
    source = FeedSource(kind="feed", url=server.url + "/feed.xml")
    assert "root element <html>" in only_failure(await run(client, source, retry))


async def test_json_nesting_bomb_is_a_payload_error(server, client, retry):
    """Deeply nested arrays (a RecursionError trap) are a clean failure."""
    server.add(HF_PATH, Reply(body=b"[" * 200_000 + b"]" * 200_000))
    assert "nested too deeply" in only_failure(await run(client, hf(server), retry))


async def test_json_instead_of_feed_says_so(server, client, retry):
    """A JSON body where a feed belongs: 'expected an RSS or Atom feed, got JSON'."""
    server.add("/feed.xml", Reply.json([1, 2]))
    source = FeedSource(kind="feed", url=server.url + "/feed.xml")
    assert "got JSON" in only_failure(await run(client, source, retry))


async def test_bad_url_scheme_fails_without_retries(client, retry, naps):
    """A feed URL with an unsupported scheme is a failure at once."""
    source = FeedSource(kind="feed", url="ftp://example.org/feed.xml")
    assert "bad URL" in only_failure(await run(client, source, retry))
    assert naps.waits == []


# --- hf paging ---------------------------------------------------------------------------


async def test_hf_pages_until_a_short_page(server, client, retry):
    """page_size 10 over 17 items: p=0 (10 items) then p=1 (7) and stop; the day before is asked."""
    items = json.loads(HF_2026.read_text())
    server.add(HF_PATH, Reply.json(items[:10]), query={"p": "0"})
    server.add(HF_PATH, Reply.json(items[10:]), query={"p": "1"})
    result = await run(client, hf(server, page_size=10), retry)
    assert result.failures == ()
    assert [p.id for p in result.papers] == [i["paper"]["id"] for i in items]
    assert [(r.query["date"], r.query["p"], r.query["limit"]) for r in server.requests] == [
        ("2026-08-21", "0", "10"),
        ("2026-08-21", "1", "10"),
    ]


async def test_hf_paging_stops_at_max_pages(server, client, retry):
    """Full pages forever: at most max_pages requests."""
    items = json.loads(HF_2026.read_text())
    for page in range(5):
        server.add(HF_PATH, Reply.json(items[page * 3 : page * 3 + 3]), query={"p": str(page)})
    result = await run(client, hf(server, page_size=3, max_pages=2), retry)
    assert len(server.requests) == 2
    assert len(result.papers) == 6


async def test_hf_paging_stops_when_the_server_ignores_p(server, client, retry):
    """A server that repeats the same full page for every p: stop after the first repeat."""
    items = json.loads(HF_2026.read_text())
    server.add(HF_PATH, Reply.json(items[:5]))
    result = await run(client, hf(server, page_size=5, max_pages=10), retry)
    assert len(server.requests) == 2
    assert len(result.papers) == 5


async def test_hf_days_back_picks_the_date(server, client, retry):
    """days_back=0 asks for the digest date itself, days_back=3 for three days earlier."""
    server.add(HF_PATH, Reply.json([]))
    await run(client, hf(server, days_back=0), retry)
    await run(client, hf(server, days_back=3), retry)
    assert [r.query["date"] for r in server.requests] == ["2026-08-22", "2026-08-19"]


# --- arXiv politeness --------------------------------------------------------------------


async def test_arxiv_requests_are_spaced_by_min_interval(server, client, retry):
    """Two arXiv sources and a 503 retry: every arXiv request starts ≥ min_interval apart."""
    body = RSS_AI.read_bytes()
    server.add("/rss/cs.AI", Reply(status=503), Reply(body=body, content_type="application/xml"))
    server.add("/rss/cs.LG", Reply(body=body, content_type="application/xml"))
    sources = [
        ArxivSource(
            kind="arxiv", name=f"arxiv-{c}", categories=[c], base_url=server.url, min_interval=0.3
        )
        for c in ("cs.AI", "cs.LG")
    ]
    result = await fetch_all(sources, DATE, client, FetchConfig(), retry=retry)
    assert result.failures == ()
    times = sorted(r.at for r in server.requests)
    assert len(times) == 3
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.3 - 0.03, gaps


async def test_interval_limiter_spaces_calls_on_its_clock():
    """The limiter sleeps exactly the remainder of the interval since the previous start."""
    now = [100.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = IntervalLimiter(3.0, clock=lambda: now[0], sleep=sleep)
    await limiter.wait()
    now[0] += 1.0
    await limiter.wait()
    now[0] += 5.0
    await limiter.wait()
    assert slept == [2.0]


async def test_get_raises_payload_error_type(server, client):
    """The low-level get() raises PayloadError (a SourceError) for an over-cap body."""
    server.add("/big", Reply(body=b"x" * 3000))
    with pytest.raises(PayloadError):
        await get(client, server.url + "/big", fetch=FetchConfig(max_bytes=1000))
    with pytest.raises(SourceError):
        await get(client, server.url + "/missing", fetch=FetchConfig(retries=0))
