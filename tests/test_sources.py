"""The sources stage as the pipeline sees it: fetch_all, merging, the file source, fetch_paper,
and normalisation of hostile values."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import structlog
from conftest import FIXTURES
from httpserver import Reply

import digestd.sources as sources_module
from digestd.config import ArxivSource, FeedSource, FetchConfig, FileSource, HfDailySource
from digestd.errors import PayloadError, SourceError
from digestd.models import Paper
from digestd.sources import (
    RetryPolicy,
    fetch_all,
    fetch_paper,
    load_papers_file,
    merge_papers,
)
from digestd.sources.feed import parse_feed
from digestd.sources.normalize import (
    MAX_ABSTRACT,
    MAX_AUTHORS,
    MAX_TITLE,
    clean_text,
    find_arxiv_id,
    html_lines,
)
from digestd.validation import has_control_chars

DATE = dt.date(2025, 11, 8)
SNAPSHOT = FIXTURES / "hf" / "daily_papers_date-2025-11-07_snapshot-0749utc.json"
FINAL = FIXTURES / "hf" / "daily_papers_month-2025-11_items-for-2025-11-07_final.json"
HF_2026 = FIXTURES / "hf" / "daily_papers_date-2026-08-21_snapshot-0815utc.json"
RSS_AI = FIXTURES / "arxiv" / "rss_cs.AI_2026-04-27_trimmed-3-items.xml"


async def _no_sleep(seconds: float) -> None:
    return None


RETRY = RetryPolicy(base_delay=0.01, max_delay=0.01, sleep=_no_sleep)


def file_source(path: Path, name: str = "file") -> FileSource:
    return FileSource(kind="file", name=name, path=path)


# --- fetch_all ---------------------------------------------------------------------------


async def test_one_failing_source_does_not_stop_the_other(server, client):
    """hf_daily answers 500 forever, the file source works: its papers plus one failure entry."""
    server.add("/api/daily_papers", Reply(status=500))
    sources = [HfDailySource(kind="hf_daily", base_url=server.url), file_source(HF_2026)]
    with structlog.testing.capture_logs() as logs:
        result = await fetch_all(sources, DATE, client, FetchConfig(retries=1), retry=RETRY)
    assert len(result.papers) == 17
    assert [name for name, _ in result.failures] == ["hf_daily"]
    assert "HTTP 500" in result.failures[0][1]
    assert result.counts == (("hf_daily", 0), ("file", 17))
    failed = [e for e in logs if e["event"] == "source failed"]
    assert failed and failed[0]["source"] == "hf_daily" and "HTTP 500" in failed[0]["reason"]


async def test_all_sources_failing_still_returns(server, client):
    """Every source failing is reported, not raised (the pipeline decides what it means)."""
    server.add("/api/daily_papers", Reply(status=503))
    sources = [
        HfDailySource(kind="hf_daily", base_url=server.url),
        file_source(FIXTURES / "missing.json"),
    ]
    result = await fetch_all(sources, DATE, client, FetchConfig(retries=0), retry=RETRY)
    assert result.papers == ()
    assert [name for name, _ in result.failures] == ["hf_daily", "file"]
    assert "cannot read" in result.failures[1][1]


async def test_same_paper_from_hf_and_arxiv_is_merged(server, client):
    """An arXiv id listed by HF and by the arXiv RSS becomes one Paper with both sources."""
    item = json.loads(HF_2026.read_text())[0]
    item["paper"]["id"] = "2604.21935"
    server.add("/api/daily_papers", Reply.json([item]))
    server.add("/rss/cs.AI", Reply.file(RSS_AI))
    sources = [
        HfDailySource(kind="hf_daily", base_url=server.url),
        ArxivSource(kind="arxiv", categories=["cs.AI"], base_url=server.url, min_interval=0),
    ]
    result = await fetch_all(sources, DATE, client, FetchConfig(), retry=RETRY)
    assert result.failures == ()
    assert result.counts == (("hf_daily", 1), ("arxiv", 3))
    assert len(result.papers) == 3
    merged = next(p for p in result.papers if p.id == "2604.21935")
    assert merged.sources == ("hf_daily", "arxiv")
    assert merged.upvotes == 163  # from HF
    assert merged.categories == ("cs.AI", "cs.LG")  # from arXiv
    assert merged.url == "https://huggingface.co/papers/2604.21935"  # first source's link
    assert merged.code_url == "https://github.com/google-research/envharness"


async def test_snapshot_and_final_merge_keeps_the_larger_upvotes(client):
    """Same-morning snapshot and final list of 2025-11-07: union of papers, max upvotes."""
    snapshot = {i["paper"]["id"]: i["paper"]["upvotes"] for i in json.loads(SNAPSHOT.read_text())}
    final = {i["paper"]["id"]: i["paper"]["upvotes"] for i in json.loads(FINAL.read_text())}
    for order in ((SNAPSHOT, FINAL), (FINAL, SNAPSHOT)):
        sources = [file_source(order[0], "first"), file_source(order[1], "second")]
        result = await fetch_all(sources, DATE, client, FetchConfig(), retry=RETRY)
        by_id = {p.id: p for p in result.papers}
        assert set(by_id) == set(snapshot) | set(final)
        assert by_id["2511.04570"].upvotes == 242
        for pid, paper in by_id.items():
            assert paper.upvotes == max(snapshot.get(pid, 0), final.get(pid, 0))
        both = set(snapshot) & set(final)
        assert both and all(by_id[pid].sources == ("first", "second") for pid in both)


async def test_file_source_ignores_the_date(client):
    """The file source returns the same papers whatever the digest date."""
    sources = [file_source(SNAPSHOT)]
    a = await fetch_all(sources, dt.date(2020, 1, 1), client, FetchConfig())
    b = await fetch_all(sources, dt.date(2031, 12, 31), client, FetchConfig())
    assert a == b and len(a.papers) == 10


# --- merge_papers ------------------------------------------------------------------------


def test_merge_prefers_richer_fields_and_unites_lists():
    """Longer abstract, more authors, union of keywords (case-insensitive), earliest date."""
    early = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    late = dt.datetime(2025, 1, 3, tzinfo=dt.UTC)
    a = Paper(
        id="2501.00001",
        title="T",
        abstract="short",
        authors=("A",),
        sources=("x",),
        keywords=("MoE",),
        upvotes=None,
        comments=4,
        published=late,
        url="https://a",
    )
    b = Paper(
        id="2501.00001",
        title="T",
        abstract="a much longer abstract",
        authors=("A", "B"),
        sources=("y",),
        keywords=("moe", "SSM"),
        categories=("cs.LG",),
        upvotes=3,
        comments=2,
        published=early,
        summary="tl;dr",
        code_url="https://github.com/x/y",
    )
    c = Paper(id="2501.00002", title="Other", abstract="")
    merged = merge_papers([a, c, b])
    assert [p.id for p in merged] == ["2501.00001", "2501.00002"]
    m = merged[0]
    assert m.abstract == "a much longer abstract" and m.authors == ("A", "B")
    assert m.sources == ("x", "y") and m.keywords == ("MoE", "SSM") and m.categories == ("cs.LG",)
    assert (m.upvotes, m.comments, m.published, m.url) == (3, 4, early, "https://a")
    assert (m.summary, m.code_url) == ("tl;dr", "https://github.com/x/y")


# --- the file source ---------------------------------------------------------------------


def test_load_papers_file_reads_a_saved_response():
    """A saved daily_papers array loads as papers tagged with the source name."""
    papers = load_papers_file(HF_2026, source="demo")
    assert len(papers) == 17 and papers[0].sources == ("demo",)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty response"),
        (b'[{"paper": {"id": "2501.', "not valid JSON"),
        (b'{"error": "Invalid date"}', "the server answered an error: Invalid date"),
        (b'{"items": []}', "expected a JSON array"),
        (b'"just a string"', "got str"),
        (b"<html><body>oops</body></html>", "got an HTML page"),
        (b"\xff\xfe\x00\xd8garbage", "not valid JSON"),
    ],
)
def test_load_papers_file_bad_content_is_a_clear_payload_error(tmp_path, content, message):
    """Bad content raises PayloadError naming the file and the problem."""
    path = tmp_path / "papers.json"
    path.write_bytes(content)
    with pytest.raises(PayloadError) as info:
        load_papers_file(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_load_papers_file_missing_or_directory_is_a_source_error(tmp_path):
    """A missing file or a directory is a SourceError that says so."""
    with pytest.raises(SourceError, match="cannot read"):
        load_papers_file(tmp_path / "nope.json")
    with pytest.raises(SourceError, match="is a directory"):
        load_papers_file(tmp_path)


def test_items_without_id_or_title_are_skipped_and_counted(tmp_path):
    """Unusable items are skipped, the rest load, and one log line gives the count."""
    items = json.loads(HF_2026.read_text())[:3]
    items += [
        {"paper": {"title": "no id"}},
        {"paper": {"id": "2501.00001", "title": "   "}},
        {"paper": {"id": "not-an-id", "title": "x"}},
        "a string",
        None,
    ]
    path = tmp_path / "papers.json"
    path.write_text(json.dumps(items))
    with structlog.testing.capture_logs() as logs:
        papers = load_papers_file(path)
    assert len(papers) == 3
    skipped = [e for e in logs if e["event"] == "items skipped"]
    assert skipped and skipped[0]["skipped"] == 5


# --- normalisation of hostile values -----------------------------------------------------


def test_hostile_item_is_capped_and_cleaned(tmp_path):
    """Huge, controlling and wrongly-typed values are capped, replaced or dropped."""
    item = {
        "numComments": -3,
        "paper": {
            "id": "2511.04570v2",
            "title": "Evil\x00 title\u202e with\r\nCRLF &amp; entities " + "x" * 5000,
            "summary": None,
            "authors": [{"name": f"Author {n}\x07"} for n in range(10_000)] + ["bare", 5, None],
            "upvotes": True,
            "ai_summary": "\x1b[31mred\x1b[0m",
            "ai_keywords": ["a\nb", "A B", 7, "x" * 1000],
            "githubRepo": "javascript:alert(1)",
            "projectPage": "https://ok.example.org/\nSet-Cookie: x",
            "publishedAt": "yesterday",
        },
    }
    path = tmp_path / "hostile.json"
    path.write_text(
        json.dumps(
            [item, {"paper": {"id": "2501.00002", "title": "A" * 50_000, "summary": "s" * 100_000}}]
        )
    )
    paper, long = load_papers_file(path)
    assert paper.id == "2511.04570"
    assert paper.title.startswith("Evil title with CRLF & entities x")
    assert len(paper.title) == MAX_TITLE and paper.title.endswith("…")
    assert paper.abstract == ""
    assert len(paper.authors) == MAX_AUTHORS and paper.authors[0] == "Author 0"
    assert paper.upvotes is None and paper.comments is None
    assert paper.summary == "[31mred [0m"
    assert paper.keywords == ("a b", "7", "x" * 199 + "…")  # "A B" repeats "a b"
    assert paper.code_url is None and paper.project_url is None
    assert paper.published is None
    for value in (
        paper.title,
        paper.abstract,
        paper.summary or "",
        *paper.authors,
        *paper.keywords,
    ):
        assert not has_control_chars(value), repr(value)
    assert len(long.title) == MAX_TITLE and len(long.abstract) == MAX_ABSTRACT


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  a\t b\n\nc  ", "a b c"),
        ("Tom &amp; Jerry &lt;3 &#x2014; ok", "Tom & Jerry <3 — ok"),
        ("zero\u200bwidth soft\u00adhyphen", "zerowidth softhyphen"),
        ("bidi\u202eevil", "bidievil"),
        ("family 👨\u200d👩\u200d👧", "family 👨\u200d👩\u200d👧"),
        ("nul\x00here", "nul here"),
        ("lone \ud800 surrogate", "lone surrogate"),
        (None, ""),
        (42, "42"),
        (["list"], ""),
    ],
)
def test_clean_text(raw, expected):
    """clean_text decodes entities, drops invisibles, replaces controls, collapses spaces."""
    assert clean_text(raw, 100) == expected


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        (("https://arxiv.org/abs/2511.04570v2",), "2511.04570"),
        (("https://arxiv.org/pdf/2511.04570v1.pdf",), "2511.04570"),
        (("oai:arXiv.org:2604.21935v1",), "2604.21935"),
        (("arXiv:2604.21935",), "2604.21935"),
        (("https://tldr.takara.ai/p/2604.26238",), "2604.26238"),
        (("http://arxiv.org/abs/cond-mat/0603029v1",), "cond-mat/0603029"),
        (("https://example.org/x", "https://arxiv.org/abs/1706.03762"), "1706.03762"),
        (("https://example.org/2024.12345",), None),  # month 45 is no arXiv id
        (("https://example.org/v1.2.3456/release",), None),
        (("https://example.org/posts/99999",), None),
        (("", None), None),
    ],
)
def test_find_arxiv_id(candidates, expected):
    """arXiv ids are found in links and guids, without version; look-alikes are not."""
    assert find_arxiv_id(*candidates) == expected


def test_html_lines_strips_markup_but_keeps_maths():
    """Tags, scripts and styles go; a '<' in plain maths text stays."""
    assert html_lines("<p>Hi <b>there</b></p><script>alert(1)</script><p>x</p>") == [
        "Hi there",
        "x",
    ]
    assert html_lines("for n<k and k>m we bound it") == ["for n<k and k>m we bound it"]


def test_feed_description_html_and_entities():
    """An RSS item with entity-escaped HTML gives a clean abstract and a hashed id."""
    body = (
        b'<rss version="2.0"><channel><item><title>A &amp;amp; B</title>'
        b"<link>https://blog.example.org/a</link>"
        b"<description>&lt;p&gt;Line &amp;amp; one&lt;/p&gt;&lt;style&gt;p{}&lt;/style&gt;"
        b"&lt;p&gt;two&lt;/p&gt;</description>"
        b"<category>ml</category><pubDate>Tue, 10 Jun 2025 12:00:00 GMT</pubDate>"
        b"</item><item><description>no title</description></item></channel></rss>"
    )
    parsed = parse_feed(body, "blog", "test")
    (paper,) = parsed.papers
    assert parsed.skipped == 1
    assert paper.title == "A & B" and paper.abstract == "Line & one two"
    assert paper.id.startswith("feed:") and paper.categories == ("ml",)
    assert paper.published == dt.datetime(2025, 6, 10, 12, tzinfo=dt.UTC)


def test_rss1_rdf_feed_parses():
    """RSS 1.0 (RDF) items are read too, with dc:creator and dc:date."""
    body = b"""<?xml version="1.0"?>
<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" xmlns="http://purl.org/rss/1.0/"
  xmlns:dc="http://purl.org/dc/elements/1.1/">
 <channel rdf:about="https://example.org/"><title>x</title></channel>
 <item rdf:about="https://arxiv.org/abs/2501.01234v3"><title>RDF paper</title>
  <link>https://arxiv.org/abs/2501.01234v3</link><description>Abs.</description>
  <dc:creator>Ada Lovelace, Alan Turing</dc:creator><dc:date>2025-01-02T03:04:05Z</dc:date></item>
</rdf:RDF>"""
    (paper,) = parse_feed(body, "rdf", "test").papers
    assert paper.id == "2501.01234" and paper.authors == ("Ada Lovelace", "Alan Turing")
    assert paper.url == "https://arxiv.org/abs/2501.01234"


# --- fetch_paper -------------------------------------------------------------------------


async def test_fetch_paper_prefers_hugging_face(server, client):
    """HF /api/papers/{id} answers: that paper, and arXiv is not asked."""
    raw = json.loads(SNAPSHOT.read_text())[0]["paper"]
    server.add("/api/papers/2511.04570", Reply.json(raw))
    paper = await fetch_paper(
        client,
        "arXiv:2511.04570v1",
        hf_base=server.url,
        arxiv_api=server.url + "/api/query",
        retry=RETRY,
    )
    assert paper is not None and paper.id == "2511.04570" and paper.upvotes == 94
    assert [r.path for r in server.requests] == ["/api/papers/2511.04570"]


async def test_fetch_paper_hf_down_falls_back_to_arxiv(server, client):
    """HF failing with 503 does not stop the arXiv look-up."""
    server.add("/api/papers/2104.12255", Reply(status=503))
    recording = next((FIXTURES / "arxiv" / "arxiv.py-recordings").glob("id_2104*.json"))
    server.add("/api/query", Reply.recording(recording))
    paper = await fetch_paper(
        client,
        "2104.12255",
        hf_base=server.url,
        arxiv_api=server.url + "/api/query",
        retry=RETRY,
        fetch=FetchConfig(retries=1),
        arxiv_interval=0,
    )
    assert paper is not None and paper.id == "2104.12255"


async def test_fetch_paper_raises_when_arxiv_is_unreachable(server, client):
    """HF has no page and arXiv answers 500 forever: SourceError, not None."""
    server.add("/api/query", Reply(status=500))
    with pytest.raises(SourceError, match="HTTP 500"):
        await fetch_paper(
            client,
            "2104.12255",
            hf_base=server.url,
            arxiv_api=server.url + "/api/query",
            retry=RETRY,
            fetch=FetchConfig(retries=1),
            arxiv_interval=0,
        )


async def test_unexpected_exception_in_a_source_is_a_failure_not_a_crash(monkeypatch, client):
    """A bug inside one source (here: a RuntimeError) is recorded; the file source still works."""

    async def broken(*args: object, **kwargs: object) -> list[Paper]:
        raise RuntimeError("parser bug")

    monkeypatch.setattr(sources_module, "fetch_feed", broken)
    sources = [FeedSource(kind="feed", url="http://127.0.0.1:9/x"), file_source(SNAPSHOT)]
    result = await fetch_all(sources, DATE, client, FetchConfig(), retry=RETRY)
    assert result.failures == (("feed", "internal error: RuntimeError: parser bug"),)
    assert len(result.papers) == 10


async def test_hostile_error_message_becomes_one_clean_line(server, client):
    """A server error message with CR/LF, ANSI escapes and 10 kB of text is one short line."""
    message = "bad\r\nX-Injected: 1\x1b[2J" + "y" * 10_000
    server.add("/api/daily_papers", Reply.json({"error": message}, 400))
    result = await fetch_all(
        [HfDailySource(kind="hf_daily", base_url=server.url)], DATE, client, FetchConfig()
    )
    ((name, reason),) = result.failures
    assert name == "hf_daily" and "bad X-Injected: 1" in reason
    assert not has_control_chars(reason) and len(reason) <= 300
