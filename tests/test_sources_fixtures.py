"""Every recorded payload in tests/fixtures replayed through a real HTTP server on 127.0.0.1.

hf/*.json through the ``hf_daily`` source, arxiv/rss_*.xml and the API Atom files through
the ``arxiv`` source, arxiv.py recordings with their recorded status codes through
``fetch_paper`` and the ``feed`` source, other/*.xml through the ``feed`` source.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path

import httpx
import pytest
from conftest import FIXTURES
from httpserver import Reply, ScriptedServer

from digestd.config import ArxivSource, FeedSource, FetchConfig, HfDailySource
from digestd.models import Paper
from digestd.sources import FetchResult, RetryPolicy, fetch_all, fetch_paper
from digestd.validation import has_control_chars

DATE = dt.date(2026, 4, 28)
HF_FILES = sorted((FIXTURES / "hf").glob("daily_papers_*.json"))
RSS_FILES = sorted((FIXTURES / "arxiv").glob("rss_*.xml"))
API_FILES = sorted((FIXTURES / "arxiv").glob("api_query_*.xml"))
RECORDINGS = FIXTURES / "arxiv" / "arxiv.py-recordings"
OTHER_FILES = sorted((FIXTURES / "other").glob("*.xml"))
XML = "application/xml"


async def _no_sleep(seconds: float) -> None:
    return None


RETRY = RetryPolicy(base_delay=0.01, max_delay=0.01, sleep=_no_sleep)


async def fetch_one(client: httpx.AsyncClient, source: object) -> FetchResult:
    result = await fetch_all([source], DATE, client, FetchConfig(), retry=RETRY)  # type: ignore[list-item]
    assert result.failures == (), result.failures
    return result


def assert_clean(paper: Paper) -> None:
    """Normalisation invariants every paper must meet."""
    assert paper.title and paper.title == " ".join(paper.title.split())
    assert isinstance(paper.abstract, str) and paper.abstract == " ".join(paper.abstract.split())
    assert not re.search(r"v\d+$", paper.id)
    for value in (paper.title, paper.abstract, *paper.authors, *paper.categories, *paper.keywords):
        assert not has_control_chars(value), value
        assert "&amp;" not in value and "&lt;" not in value
    assert paper.published is None or paper.published.tzinfo is not None


def test_every_fixture_is_covered():
    """Guard: the globs below see every recorded payload (hf/, arxiv/, other/), so a new
    recording cannot be forgotten."""
    payloads = {
        p
        for folder in ("hf", "arxiv", "other")
        for p in (FIXTURES / folder).rglob("*")
        if p.is_file() and p.name != "SOURCE.md"
    }
    covered = set(HF_FILES) | set(RSS_FILES) | set(API_FILES) | set(OTHER_FILES)
    covered |= set(RECORDINGS.glob("*"))
    covered.add(FIXTURES / "hf" / "error_body_not_found.json")
    assert payloads == covered


# --- Hugging Face ------------------------------------------------------------------------


@pytest.mark.parametrize("path", HF_FILES, ids=lambda p: p.name)
async def test_hf_daily_replays_fixture_and_maps_every_field(server, client, path: Path):
    """Each HF schema (2024 → 2026) yields every item, with each field mapped from the JSON."""
    items = json.loads(path.read_text())
    server.add("/api/daily_papers", Reply.file(path))
    result = await fetch_one(client, HfDailySource(kind="hf_daily", base_url=server.url))
    assert [p.id for p in result.papers] == [i["paper"]["id"] for i in items]
    assert result.counts == (("hf_daily", len(items)),)
    assert server.requests[0].query == {"date": "2026-04-27", "p": "0", "limit": "100"}
    for item, paper in zip(items, result.papers):
        raw = item["paper"]
        assert_clean(paper)
        assert paper.title == " ".join(raw["title"].split())
        assert paper.abstract == " ".join(raw["summary"].split())
        assert paper.authors == tuple(" ".join(a["name"].split()) for a in raw["authors"])
        assert paper.upvotes == raw["upvotes"]
        assert paper.comments == item["numComments"]
        assert paper.url == f"https://huggingface.co/papers/{raw['id']}"
        assert paper.pdf_url == f"https://arxiv.org/pdf/{raw['id']}"
        assert paper.code_url == raw.get("githubRepo")
        assert paper.project_url == raw.get("projectPage")
        assert paper.keywords == tuple(dict.fromkeys(raw.get("ai_keywords", [])))
        assert paper.summary == (
            " ".join(raw["ai_summary"].split()) if "ai_summary" in raw else None
        )
        assert paper.published == dt.datetime.fromisoformat(
            raw["publishedAt"].replace("Z", "+00:00")
        )
        assert paper.sources == ("hf_daily",)


async def test_hf_old_schema_has_no_ai_fields(server, client):
    """The 2024 schema (mediaUrl, no AI fields) still parses, with those fields empty."""
    server.add(
        "/api/daily_papers",
        Reply.file(FIXTURES / "hf" / "daily_papers_date-2024-05-27_oldformat.json"),
    )
    result = await fetch_one(client, HfDailySource(kind="hf_daily", base_url=server.url))
    assert len(result.papers) == 13
    assert all(p.summary is None and p.keywords == () and p.code_url is None for p in result.papers)


async def test_hf_error_body_fixture_with_its_404(server, client):
    """The recorded 62-byte error object, served as a 404: a failure with its message."""
    server.add(
        "/api/daily_papers", Reply.file(FIXTURES / "hf" / "error_body_not_found.json", status=404)
    )
    result = await fetch_all(
        [HfDailySource(kind="hf_daily", base_url=server.url)],
        DATE,
        client,
        FetchConfig(),
        retry=RETRY,
    )
    assert result.papers == ()
    assert result.failures == (
        (
            "hf_daily",
            f"HTTP 404 from {server.url}/api/daily_papers:"
            " Sorry, we can't find the page you are looking for.",
        ),
    )


# --- arXiv RSS and Atom ------------------------------------------------------------------


@pytest.mark.parametrize("path", RSS_FILES, ids=lambda p: p.name)
async def test_arxiv_rss_replays_fixture(server, client, path: Path):
    """Each category feed: its 3 `new` items, prefix-free abstracts, <category> list, authors."""
    category = path.name.split("_")[1]
    server.add(f"/rss/{category}", Reply.file(path))
    source = ArxivSource(kind="arxiv", categories=[category], base_url=server.url, min_interval=0)
    result = await fetch_one(client, source)
    text = path.read_text()
    ids = re.findall(r"<link>https://arxiv.org/abs/([\d.]+)</link>", text)
    assert [p.id for p in result.papers] == ids and len(ids) == 3
    for paper in result.papers:
        assert_clean(paper)
        assert not paper.abstract.startswith(("arXiv:", "Abstract"))
        assert "Announce Type" not in paper.abstract
        assert category in paper.categories
        assert paper.authors and all("," not in a for a in paper.authors)
        assert paper.url == f"https://arxiv.org/abs/{paper.id}"
        assert paper.published == dt.datetime(
            2026, 4, 27, tzinfo=dt.timezone(dt.timedelta(hours=-4))
        )
    first = result.papers[0]
    if category == "cs.AI":
        assert first.title.startswith("Math Takes Two")
        assert first.abstract.startswith("Although language models demonstrate")
        assert first.authors == ("Michael Cooper", "Samuel Cooper")
        assert first.categories == ("cs.AI", "cs.LG")


async def test_arxiv_categories_are_joined_with_plus(server, client):
    """Several categories make one request to /rss/cs.AI+cs.LG."""
    server.add("/rss/cs.AI+cs.LG", Reply.file(RSS_FILES[0]))
    source = ArxivSource(
        kind="arxiv", categories=["cs.AI", "cs.LG"], base_url=server.url, min_interval=0
    )
    result = await fetch_one(client, source)
    assert len(result.papers) == 3
    assert [r.path for r in server.requests] == ["/rss/cs.AI+cs.LG"]


@pytest.mark.parametrize(("include_cross", "expected"), [(False, 1), (True, 2)])
async def test_arxiv_keeps_new_and_optionally_cross(server, client, include_cross, expected):
    """Of new / cross / replace items, `new` is kept, `cross` only with include_cross."""
    text = (FIXTURES / "arxiv" / "rss_cs.LG_2026-04-27_trimmed-3-items.xml").read_text()
    types = iter(["new", "cross", "replace-cross"])
    text = re.sub(
        "<arxiv:announce_type>new</arxiv:announce_type>",
        lambda m: f"<arxiv:announce_type>{next(types)}</arxiv:announce_type>",
        text,
    )
    server.add("/rss/cs.LG", Reply(body=text.encode(), content_type=XML))
    source = ArxivSource(
        kind="arxiv",
        categories=["cs.LG"],
        base_url=server.url,
        include_cross=include_cross,
        min_interval=0,
    )
    result = await fetch_one(client, source)
    assert len(result.papers) == expected


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
async def test_arxiv_atom_api_layouts_parse_by_namespace(server, client, path: Path):
    """Both Atom layouts (2016 inline namespaces, 2026 root ones) give the same fields."""
    server.add("/rss/cs.LG", Reply.file(path, content_type="application/atom+xml"))
    source = ArxivSource(kind="arxiv", categories=["cs.LG"], base_url=server.url, min_interval=0)
    result = await fetch_one(client, source)
    entries = path.read_text().count("<entry>")
    assert len(result.papers) == entries > 0
    for paper in result.papers:
        assert_clean(paper)
        assert paper.authors and paper.categories and paper.abstract
        assert paper.pdf_url == f"https://arxiv.org/pdf/{paper.id}"
    if "oldformat" in path.name:
        (paper,) = result.papers
        assert paper.id == "cond-mat/0603029"
        assert paper.title == (
            "From stripe to checkerboard order on the square lattice in the"
            " presence of quenched disorder"
        )
        assert paper.abstract.startswith("We discuss the effects of quenched disorder")
        assert paper.authors == ("Adrian Del Maestro", "Bernd Rosenow", "Subir Sachdev")
        assert paper.categories == ("cond-mat.str-el", "cond-mat.supr-con")
    else:
        assert result.papers[0].id == "2604.26951"
        assert result.papers[0].categories == ("cs.CL", "cs.AI", "cs.LG")


# --- arxiv.py recordings (with their recorded status codes) ------------------------------


def recording(stem: str) -> Path:
    (path,) = RECORDINGS.glob(f"{stem}_*.json")
    return path


def serve_recording(server: ScriptedServer, stem: str, id_list: str) -> None:
    server.add("/api/query", Reply.recording(recording(stem)), query={"id_list": id_list})


async def test_fetch_paper_falls_back_to_arxiv_recording(server, client):
    """HF has no page (404): the recorded arXiv answer for 2104.12255v1 gives the paper."""
    serve_recording(server, "id_2104.12255v1", "2104.12255")
    paper = await fetch_paper(
        client,
        "2104.12255v1",
        hf_base=server.url,
        arxiv_api=server.url + "/api/query",
        retry=RETRY,
        arxiv_interval=0,
    )
    assert paper is not None
    assert paper.id == "2104.12255"
    assert paper.authors == ("Quan Thoi Minh Nguyen",)
    assert paper.sources == ("arxiv",)
    assert [r.path for r in server.requests] == ["/api/papers/2104.12255", "/api/query"]


async def test_fetch_paper_unknown_id_is_none(server, client):
    """arXiv's recorded 200-with-no-entry for 0000.0000 means: unknown, None."""
    serve_recording(server, "id_0000.0000", "0000.0000")
    paper = await fetch_paper(
        client,
        "0000.0000",
        hf_base=server.url,
        arxiv_api=server.url + "/api/query",
        retry=RETRY,
        arxiv_interval=0,
    )
    assert paper is None
    assert len(server.requests) == 2


async def test_recorded_400_error_entry_is_a_failure_with_its_message(server, client):
    """The recorded HTTP 400 Atom error for id_list=abc: a failure naming arXiv's message."""
    serve_recording(server, "id_abc", "abc")
    source = FeedSource(kind="feed", name="api", url=server.url + "/api/query?id_list=abc")
    result = await fetch_all([source], DATE, client, FetchConfig(), retry=RETRY)
    assert result.failures == (
        ("api", f"HTTP 400 from {server.url}/api/query: incorrect id format for abc"),
    )
    assert len(server.requests) == 1  # a 400 is not retried


async def test_fetch_paper_with_malformed_id_is_none_without_requests(server, client):
    """'abc' is not an arXiv id: None, and no request is made."""
    assert (
        await fetch_paper(client, "abc", hf_base=server.url, arxiv_api=server.url + "/api/query")
        is None
    )
    assert server.requests == []


async def test_recorded_search_results_parse_as_a_feed(server, client):
    """The recorded 10-entry search answer read through the generic feed source."""
    server.add(
        "/api/query", Reply.recording(recording("q_testing")), query={"search_query": "testing"}
    )
    source = FeedSource(kind="feed", url=server.url + "/api/query?search_query=testing")
    result = await fetch_one(client, source)
    assert len(result.papers) == 10
    assert result.papers[0].id == "2202.12139"
    assert all(re.fullmatch(r"\d{4}\.\d{4,5}", p.id) for p in result.papers)
    for paper in result.papers:
        assert_clean(paper)


# --- other feeds -------------------------------------------------------------------------


@pytest.mark.parametrize("path", OTHER_FILES, ids=lambda p: p.name)
async def test_other_feeds_replay(server, client, path: Path):
    """Both HF mirror feeds: every item, ids from the link, HTML stripped from abstracts."""
    server.add("/feed.xml", Reply.file(path, content_type="application/rss+xml"))
    result = await fetch_one(client, FeedSource(kind="feed", url=server.url + "/feed.xml"))
    assert len(result.papers) == path.read_text().count("<item>")
    for paper in result.papers:
        assert_clean(paper)
        assert re.fullmatch(r"\d{4}\.\d{4,5}", paper.id)
        assert not re.search(r"<[a-zA-Z/!]", paper.abstract), paper.abstract
        assert "Paper thumbnail" not in paper.abstract
        assert paper.abstract


async def test_huangboming_feed_extracts_authors_upvotes_summary(server, client):
    """The escaped-HTML description yields Authors:, Upvotes: and Summary: as fields."""
    path = FIXTURES / "other" / "hf-mirror_github-huangboming_rss_2026-04-30.xml"
    server.add("/feed.xml", Reply.file(path))
    result = await fetch_one(client, FeedSource(kind="feed", url=server.url + "/feed.xml"))
    first = result.papers[0]
    assert first.id == "2604.21003"
    assert first.authors == ("Haebin Seong", "Li Yin", "Haoran Zhang")
    assert first.upvotes == 1
    assert first.abstract.startswith("AI agents are increasingly deployed")
    assert "Authors:" not in first.abstract and "Upvotes:" not in first.abstract
    assert first.url == "https://arxiv.org/abs/2604.21003"
    assert all(p.upvotes is not None for p in result.papers)


async def test_feed_items_without_arxiv_ids_get_stable_hashed_ids(server, client):
    """Links without an arXiv id become feed:<sha1(link)[:12]>, the same on every fetch."""
    path = FIXTURES / "other" / "hf-mirror_takara-tldr_rss_2026-04-30.xml"
    text = re.sub(
        r"https://tldr\.takara\.ai/p/(\d{4})\.(\d+)",
        r"https://blog.example.org/posts/\1-\2",
        path.read_text(),
    )
    server.add("/feed.xml", Reply(body=text.encode(), content_type=XML))
    source = FeedSource(kind="feed", url=server.url + "/feed.xml")
    first = await fetch_one(client, source)
    again = await fetch_one(client, source)
    assert [p.id for p in first.papers] == [p.id for p in again.papers]
    link = "https://blog.example.org/posts/2604-26238"
    assert first.papers[0].id == "feed:" + hashlib.sha1(link.encode()).hexdigest()[:12]
    assert first.papers[0].url == link and first.papers[0].pdf_url is None
