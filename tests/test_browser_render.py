"""The digest's HTML in headless Chromium (Debian's, driven by Playwright; no download):
no horizontal scroll at phone and desktop widths, every title visible, readable contrast
in light and dark mode. Screenshots go to tests/artifacts/."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool
from playwright.sync_api import Browser, Page, sync_playwright
from test_render_samples import context, digest, fixture_papers, renderer, subscriber

from digestd.models import Digest, Pick

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WIDTHS = (375, 600)

pytestmark = pytest.mark.slow

# Titles (full cards and compact entries) and their rectangles, from inside the page.
TITLES_JS = """() => [...document.querySelectorAll('h2.title, p.compact-title')].map(e => {
  const r = e.getBoundingClientRect(); const s = getComputedStyle(e);
  return {text: e.innerText, left: r.left, right: r.right, width: r.width, height: r.height,
          visible: s.visibility !== 'hidden' && s.display !== 'none' && r.height > 0};
})"""

# WCAG contrast of an element's text against the nearest opaque background.
CONTRAST_JS = """(selector) => {
  const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
  const lum = (c) => { const [r, g, b] = rgb(c).slice(0, 3).map(v => { v /= 255;
      return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const el = document.querySelector(selector);
  let bg = el, color;
  while (bg) { color = getComputedStyle(bg).backgroundColor;
    if (rgb(color).length < 4 || rgb(color)[3] > 0) break; bg = bg.parentElement; }
  const a = lum(getComputedStyle(el).color), b = lum(color || 'rgb(255,255,255)');
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = require_tool("chromium", "/usr/bin/chromium")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser: Browser, html: str, width: int, scheme: str = "light") -> Page:
    page = browser.new_page(viewport={"width": width, "height": 900}, color_scheme=scheme)  # type: ignore[arg-type]
    page.set_content(html, wait_until="load")
    return page


def assert_layout(page: Page, expected_titles: list[str]) -> None:
    width = page.evaluate("innerWidth")
    scroll_width = page.evaluate("document.scrollingElement.scrollWidth")
    assert scroll_width <= width, f"horizontal scroll: {scroll_width} > {width}"
    titles = page.evaluate(TITLES_JS)
    assert len(titles) == len(expected_titles)
    for box, expected in zip(titles, expected_titles, strict=True):
        assert box["visible"] and box["width"] > 0, box
        assert box["left"] >= 0 and box["right"] <= width + 0.5, box
        assert " ".join(box["text"].split()).endswith(expected), (box["text"], expected)


@pytest.mark.parametrize("width", WIDTHS)
def test_digest_fits_and_shows_every_title(
    browser: Browser, artifacts_dir: Path, width: int
) -> None:
    """A 10-paper digest at 375 and 600 px: no horizontal scroll, every title visible."""
    html = renderer().render(digest(10), context()).html
    page = open_page(browser, html, width)
    try:
        assert_layout(page, [p.title for p in fixture_papers()[:10]])
        page.screenshot(path=str(artifacts_dir / f"email-{width}.png"), full_page=True)
        page.screenshot(path=str(artifacts_dir / f"email-{width}-top.png"))
    finally:
        page.close()


@pytest.mark.parametrize("width", WIDTHS)
def test_hostile_long_words_do_not_scroll(
    browser: Browser, artifacts_dir: Path, width: int
) -> None:
    """Unbroken 300-character titles, author names and URLs wrap instead of scrolling."""
    long_word = "Supercalifragilistic" * 15
    papers = tuple(
        dataclasses.replace(
            p,
            title=long_word,
            authors=(long_word, "B"),
            summary=long_word + " " + "ملخص باللغة العربية " * 5,
        )
        for p in fixture_papers()[:3]
    )
    sub = subscriber(name=long_word, email="a" * 60 + "@example.org")
    rendered = renderer().render(
        digest(3, papers=papers, sub=sub), context(postal_address=long_word)
    )
    page = open_page(browser, rendered.html, width)
    try:
        assert_layout(page, [long_word] * 3)
        page.screenshot(path=str(artifacts_dir / f"email-{width}-hostile.png"), full_page=True)
    finally:
        page.close()


def test_sixty_paper_digest_with_compact_entries_fits(browser: Browser) -> None:
    """A budget-shortened 60-paper digest (full, short and title-only entries) fits at 375 px."""
    papers = tuple(
        dataclasses.replace(p, title=p.title + " " + "x" * 120) for p in fixture_papers()
    )
    rendered = renderer().render(digest(60, papers=papers), context())
    assert 'class="compact"' in rendered.html
    page = open_page(browser, rendered.html, 375)
    try:
        titles = page.evaluate(TITLES_JS)
        assert len(titles) == len(rendered.paper_ids)
        assert page.evaluate("document.scrollingElement.scrollWidth") <= 375
        assert all(t["visible"] and t["right"] <= 375.5 for t in titles)
    finally:
        page.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_text_is_readable_in_light_and_dark_mode(
    browser: Browser, artifacts_dir: Path, scheme: str
) -> None:
    """prefers-color-scheme: the background follows the scheme, and titles, summaries,
    reasons and the footer keep WCAG AA contrast (4.5:1) in both."""
    html = renderer().render(digest(10), context()).html
    page = open_page(browser, html, 600, scheme)
    try:
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        dark = scheme == "dark"
        assert (background == "rgb(15, 17, 21)") is dark, background
        for selector in ("h1", "a.title-link", "p.summary", "p.why", "p.authors", "td.footer p"):
            ratio = page.evaluate(CONTRAST_JS, selector)
            assert ratio >= 4.5, (scheme, selector, ratio)
        name = "email-600-dark" if dark else "email-600-light"
        page.screenshot(path=str(artifacts_dir / f"{name}.png"))
    finally:
        page.close()


def test_empty_digest_renders_in_the_browser(browser: Browser) -> None:
    """An empty digest still lays out (no titles, no scroll)."""
    html = renderer().render(Digest(subscriber(), digest(1).date, ()), context()).html
    page = open_page(browser, html, 375)
    try:
        assert_layout(page, [])
        assert "no new papers" in page.inner_text("body")
    finally:
        page.close()


def test_picks_reasons_are_visible(browser: Browser) -> None:
    """The "Picked because" reasons are rendered visibly under each title."""
    paper = fixture_papers()[0]
    dig = Digest(subscriber(), digest(1).date, (Pick(paper, 1.0, ("follows author Ada",)),))
    page = open_page(browser, renderer().render(dig, context()).html, 375)
    try:
        assert page.is_visible("text=Picked because:")
        assert page.is_visible("text=follows author Ada")
    finally:
        page.close()
