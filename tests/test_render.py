"""Rendering a Digest: content of both parts, escaping, links, size budget, errors."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path

import pytest
from test_render_samples import (
    DATE,
    NOW,
    TOKEN,
    collect,
    context,
    digest,
    encoded_html_size,
    fixture_papers,
    parse,
    parts,
    renderer,
    subscriber,
)

import digestd
from digestd.config import settings_from_dict
from digestd.errors import RenderError
from digestd.models import Digest, Pick
from digestd.render import (
    HTML_SIZE_BUDGET,
    RenderContext,
    Renderer,
    message_id_for,
    preferences_url,
    safe_url,
    unsubscribe_url,
)

# Every tag the template itself uses; anything else in a rendered digest was injected.
TEMPLATE_TAGS = {"html", "head", "meta", "title", "style", "body", "div", "table", "tbody"}
TEMPLATE_TAGS |= {"tr", "td", "p", "h1", "h2", "a", "span", "em"}


def one_paper(**fields: object) -> Digest:
    base = fixture_papers()[0]
    paper = dataclasses.replace(base, **fields)  # type: ignore[arg-type]
    return Digest(subscriber(), DATE, (Pick(paper, 1.0, ("because of a test",)),))


def test_links_follow_the_http_endpoint_contract() -> None:
    """Links are {base}/unsubscribe/{token} and {base}/preferences/{token}."""
    assert unsubscribe_url("https://d.example", TOKEN) == f"https://d.example/unsubscribe/{TOKEN}"
    assert preferences_url("https://d.example/", TOKEN) == f"https://d.example/preferences/{TOKEN}"


def test_message_id_is_deterministic_unguessable_and_on_the_sender_domain() -> None:
    """Same subscriber+date → same id; other date or token → other id; no token inside."""
    sub = subscriber()
    first = message_id_for(sub, DATE, "example.org")
    assert first == message_id_for(sub, DATE, "example.org")
    assert re.fullmatch(r"<digest\.2026-08-21\.[0-9a-f]{32}@example\.org>", first)
    assert first != message_id_for(sub, DATE + dt.timedelta(days=1), "example.org")
    assert first != message_id_for(dataclasses.replace(sub, token="x" * 40), DATE, "example.org")
    assert TOKEN not in first
    assert message_id_for(sub, DATE, "bücher.example").endswith("@xn--bcher-kva.example>")


def test_ten_paper_digest_has_every_element_in_html_and_text() -> None:
    """Titles, shortened authors, votes, AI summary, reasons, links, header and footer."""
    rendered = renderer().render(digest(10), context())
    papers = fixture_papers()[:10]
    html, text = rendered.html, rendered.text
    assert rendered.subject == "Your papers for 21 August 2026"
    assert "Your papers for Friday, 21 August 2026" in html and "10 papers picked" in html
    assert "Your papers for Friday, 21 August 2026" in text and "10 papers picked" in text
    for paper in papers:
        assert paper.title in html
        assert f'href="{paper.url}"' in html
        assert paper.url in text
        assert f"https://arxiv.org/pdf/{paper.id}" in html and f"arxiv.org/pdf/{paper.id}" in text
        assert paper.summary is not None
        assert paper.summary[:60] in html
        assert paper.summary[:30] in " ".join(text.split())
    first = papers[0]
    # 17 authors → "A, B, C et al."
    assert f"{first.authors[0]}, {first.authors[1]}, {first.authors[2]} et al." in html
    assert first.authors[5] not in html
    assert "▲ 163" in html and "163 upvotes · 1 comment" in text
    assert "matches keyword “agents” in the title" in html
    assert "Picked because: matches keyword “agents”" in " ".join(text.split())
    assert f'href="{first.code_url}"' in html and f'href="{first.project_url}"' in html
    assert f"Code: {first.code_url}" in text
    # Footer: why, manage preferences, unsubscribe, postal address.
    for part in (html, text):
        assert "ada@example.org subscribed to Daily Papers" in " ".join(part.split())
        assert f"https://digest.example.org/preferences/{TOKEN}" in part
        assert f"https://digest.example.org/unsubscribe/{TOKEN}" in part
        assert "Example Research Lab, 1 Main Street, Springfield 12345" in part
        assert "agents, video generation, cs.LG" in part
    assert ">Manage preferences</a>" in html and ">Unsubscribe</a>" in html
    assert rendered.paper_ids == tuple(p.id for p in papers)
    assert rendered.subscriber_id == 7 and rendered.email == "ada@example.org"


def test_html_is_email_safe_table_layout_with_inlined_css() -> None:
    """Tables for layout, max 600 px, styles inlined, dark-mode and mobile rules kept."""
    html = renderer().render(digest(3), context()).html
    assert 'role="presentation"' in html and 'width="600"' in html
    assert "max-width: 600px" in html or "max-width:600px" in html
    assert 'class="card"' in html and 'style="' in html
    # Only @media rules stay in <style>; plain rules were inlined at construction.
    style = re.search(r"<style>(.*?)</style>", html, re.S)
    assert style is not None
    assert style.group(1).lstrip().startswith("@media")
    assert "prefers-color-scheme:dark" in style.group(1).replace(" ", "")
    assert '<meta name="color-scheme" content="light dark">' in html
    assert "{{" not in html and "{%" not in html


def test_preheader_previews_the_top_titles() -> None:
    """A hidden preheader carries the first titles, for the inbox preview line."""
    html = renderer().render(digest(5), context()).html
    match = re.search(r'<div class="preheader"[^>]*>(.*?)</div>', html, re.S)
    assert match is not None
    assert fixture_papers()[0].title.split(":")[0] in match.group(1)
    assert "display: none" in html or "display:none" in html


def test_text_part_is_wrapped_and_keeps_urls_whole() -> None:
    """Text lines stay within 72 columns, except lines that are (or end in) one URL."""
    rendered = renderer().render(digest(10), context())
    for line in rendered.text.splitlines():
        if len(line) > 72:
            assert re.search(r"https?://\S+$", line), line
    for paper in fixture_papers()[:10]:
        assert paper.url in rendered.text.split()


def test_summary_falls_back_to_a_trimmed_abstract() -> None:
    """Without an AI summary the abstract is shown, trimmed with an ellipsis."""
    long_abstract = " ".join(f"word{i}" for i in range(400))
    rendered = renderer().render(one_paper(summary=None, abstract=long_abstract), context())
    assert "word0 word1 word2" in rendered.html
    assert "word399" not in rendered.html
    assert "…" in rendered.html


def test_tex_in_titles_and_abstracts_becomes_text() -> None:
    """$\\alpha$ → α, \\textbf{x} → x, in both parts."""
    rendered = renderer().render(
        one_paper(
            title=r"$\alpha$-Net: \textbf{Fast} $O(n^2)$ Attention",
            summary=None,
            abstract=r"We show $\beta \le \gamma$ with \emph{no} loss (12% better).",
        ),
        context(),
    )
    for part in (rendered.html, rendered.text):
        assert "α-Net: Fast O(n^2) Attention" in part
        assert "We show β≤γ with no loss (12% better)." in part
        assert "\\textbf" not in part


def test_markup_in_paper_and_subscriber_fields_stays_text() -> None:
    """<script>, "><img onerror>, and quotes are escaped everywhere they appear."""
    evil = '"><img src=x onerror=alert(1)><script>alert("t")</script>'
    sub = subscriber(name=evil)
    paper = dataclasses.replace(
        fixture_papers()[0], title=evil, authors=(evil, "B"), summary=evil, abstract=evil
    )
    dig = Digest(sub, DATE, (Pick(paper, 1.0, (evil,)),))
    rendered = renderer().render(dig, context(postal_address=evil, from_name=evil))
    found = collect(rendered.html)
    assert found.tags <= TEMPLATE_TAGS, found.tags - TEMPLATE_TAGS
    assert not any(name.startswith("on") for _, name, _ in found.attrs)
    assert "<script" not in rendered.html and "<img" not in rendered.html
    assert "&lt;script&gt;" in rendered.html
    assert evil in "".join(found.text)  # shown, as text
    assert evil in rendered.text  # the text part is plain text: shown as is


def test_reason_phrases_are_emphasised_and_still_escaped() -> None:
    """Selection's *phrase* becomes <em> in HTML and “phrase” in text; markup stays text."""
    paper = fixture_papers()[0]
    reasons = ("title matches *mixture of experts*", "by *<b>Ada</b>*")
    dig = Digest(subscriber(), DATE, (Pick(paper, 1.0, reasons),))
    rendered = renderer().render(dig, context())
    assert "<em>mixture of experts</em>" in rendered.html
    assert "<em>&lt;b&gt;Ada&lt;/b&gt;</em>" in rendered.html
    assert "*mixture" not in rendered.html
    assert "\u201cmixture of experts\u201d" in rendered.text
    assert "*" not in rendered.text.split("Picked because:")[1].split("\n\n")[0]


def test_unsafe_links_are_never_put_in_href() -> None:
    """javascript:, data:, credentials-in-host and spaced URLs are dropped; arXiv abs is used."""
    rendered = renderer().render(
        one_paper(
            url="javascript:alert(1)",
            pdf_url="data:text/html,<script>",
            code_url="https://github.com@evil.example/x",
            project_url="https://ok.example/a b",
        ),
        context(),
    )
    hrefs = [value for _, name, value in collect(rendered.html).attrs if name == "href"]
    assert hrefs and all(h.startswith("https://") for h in hrefs)
    assert not any("evil.example" in h or "ok.example" in h for h in hrefs)
    paper_id = fixture_papers()[0].id
    assert f"https://arxiv.org/abs/{paper_id}" in hrefs  # title falls back to arXiv abs
    assert "javascript" not in rendered.text and "data:text" not in rendered.text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://huggingface.co/papers/2511.04570", "https://huggingface.co/papers/2511.04570"),
        ("http://x.example/a?b=1&c=2#f", "http://x.example/a?b=1&c=2#f"),
        ('https://x.example/"><b>', "https://x.example/%22%3E%3Cb%3E"),
        ("https://bücher.example/ä", "https://xn--bcher-kva.example/%C3%A4"),
        ("JAVASCRIPT:alert(1)", ""),
        ("https://a.example\r\nX: y", ""),
        ("ftp://a.example/x", ""),
        ("https://", ""),
        ("https://a.example:99999/", ""),
        ("https://" + "a" * 3000 + ".example", ""),
        (None, ""),
    ],
)
def test_safe_url(raw: str | None, expected: str) -> None:
    """Only http(s) URLs survive, percent-encoded where needed."""
    assert safe_url(raw) == expected


def test_subject_template_is_filled_without_str_format() -> None:
    """{date}, {weekday}, {count} are filled; other braces and CR/LF cannot do harm."""
    rendered = renderer().render(
        digest(3),
        context(subject_template="{count} papers · {weekday} {date} {0.__class__}\r\nBcc: x"),
    )
    assert rendered.subject == "3 papers · Friday 21 August 2026 {0.__class__} Bcc: x"
    assert parse(rendered.message)["Subject"] == rendered.subject


def test_same_input_gives_the_same_bytes() -> None:
    """Rendering is pure: the same digest and context give identical messages."""
    first = renderer().render(digest(10), context())
    again = Renderer().render(digest(10), context())
    assert first.message == again.message and first.html == again.html


def test_empty_digest_renders_without_crashing() -> None:
    """The pipeline skips empty digests, but rendering one still works."""
    rendered = renderer().render(Digest(subscriber(), DATE, ()), context())
    assert rendered.paper_ids == ()
    assert "no new papers" in rendered.html and "no new papers" in rendered.text
    parts(parse(rendered.message))


def test_sixty_papers_with_huge_abstracts_stay_under_budget() -> None:
    """60 papers, 20,000-word abstracts, no summaries: the HTML part stays under 90 KB,
    the top entries keep their full text and lower ones are shortened first."""
    huge = " ".join(f"token{i % 977}" for i in range(20_000))
    papers = tuple(
        dataclasses.replace(p, summary=None, abstract=huge, title=p.title + " " + "x" * 150)
        for p in fixture_papers()
    )
    rendered = renderer().render(digest(60, papers=papers), context())
    msg = parse(rendered.message)
    assert encoded_html_size(msg) < HTML_SIZE_BUDGET
    cards = rendered.html.split('class="card"')[1:]
    assert 'class="summary"' in cards[0]  # rank 1: full
    assert 'class="summary"' not in cards[-1] or len(cards) < 60


def test_budget_degrades_to_titles_then_n_more() -> None:
    """With enormous titles nothing fits in full: entries become titles, then "N more"
    with a link to the preferences page; paper_ids lists only the papers shown."""
    papers = tuple(
        dataclasses.replace(p, title=" ".join(["漢字タイトル"] * 60), summary=None)
        for p in fixture_papers()
    )
    rendered = renderer().render(digest(60, papers=papers), context())
    msg = parse(rendered.message)
    assert encoded_html_size(msg) < HTML_SIZE_BUDGET
    shown = len(rendered.paper_ids)
    assert 0 < shown < 60
    assert f"{60 - shown} more papers matched today" in rendered.html
    assert f"{60 - shown} more papers matched today" in rendered.text
    assert 'class="compact"' in rendered.html
    assert f"https://digest.example.org/preferences/{TOKEN}" in rendered.html


def test_ten_and_sixty_paper_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    """Reports the encoded HTML size of a 10- and a 60-paper digest (both under budget)."""
    sizes = {}
    for n in (10, 60):
        msg = parse(renderer().render(digest(n), context()).message)
        sizes[n] = encoded_html_size(msg)
        assert sizes[n] < HTML_SIZE_BUDGET
    with capsys.disabled():
        print(f"\nencoded HTML part: 10 papers {sizes[10]:,} B, 60 papers {sizes[60]:,} B")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"token": ""}, "no usable link token"),
        ({"token": "short"}, "no usable link token"),
        ({"token": "a/b" * 10}, "no usable link token"),
        ({"email": "not an address"}, "to address"),
    ],
)
def test_bad_subscriber_values_raise_render_error(change: dict[str, str], message: str) -> None:
    """A subscriber without a usable token or address fails with RenderError, clearly."""
    with pytest.raises(RenderError, match=message):
        renderer().render(digest(2, sub=subscriber(**change)), context())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"now": dt.datetime(2026, 8, 21, 7, 0)}, "timezone-aware"),
        ({"base_url": "javascript:alert(1)"}, "base_url"),
        ({"list_id": "not a list id"}, "list_id"),
        ({"from_address": "nobody"}, "from address"),
    ],
)
def test_bad_context_values_raise_render_error(change: dict[str, object], message: str) -> None:
    """A bad context fails with RenderError naming the problem."""
    with pytest.raises(RenderError, match=message):
        renderer().render(digest(2), context(**change))


def test_template_bug_becomes_render_error(tmp_path: Path) -> None:
    """An undefined template variable (StrictUndefined) surfaces as RenderError."""
    source = Path(digestd.__file__).parent.parent / "templates"
    for name in ("digest.html", "digest.txt"):
        (tmp_path / name).write_text((source / name).read_text())
    (tmp_path / "digest.txt").write_text("{{ no_such_variable }}")
    with pytest.raises(RenderError, match="no_such_variable"):
        Renderer(tmp_path).render(digest(1), context())


def test_missing_templates_raise_render_error(tmp_path: Path) -> None:
    """A templates directory without the templates fails at construction."""
    with pytest.raises(RenderError, match="templates"):
        Renderer(tmp_path)


def test_context_from_settings() -> None:
    """RenderContext.from_settings copies the [digest] section and the given time."""
    settings = settings_from_dict(
        {
            "digest": {
                "from_address": "papers@example.org",
                "from_name": "Papers",
                "base_url": "https://d.example.org/",
                "postal_address": "1 Road",
                "feedback_id": "daily:digestd",
                "subject": "Papers {date}",
                "reply_to": "help@example.org",
            }
        }
    )
    ctx = RenderContext.from_settings(settings, NOW)
    assert ctx.from_address == "papers@example.org" and ctx.from_name == "Papers"
    assert ctx.base_url == "https://d.example.org" and ctx.list_id == "digest.example.org"
    assert ctx.postal_address == "1 Road" and ctx.feedback_id == "daily:digestd"
    assert ctx.subject_template == "Papers {date}" and ctx.precedence == "bulk"
    assert ctx.reply_to == "help@example.org" and ctx.now == NOW
    assert ctx.list_name == "Papers"


def test_css_is_inlined_once_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendering never calls css-inline again: it ran once, in Renderer()."""
    rend = Renderer()

    class Forbidden:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"css_inline.{name} used while rendering")

    monkeypatch.setattr("digestd.render.css_inline", Forbidden())
    html = rend.render(digest(2), context()).html
    assert 'style="' in html
