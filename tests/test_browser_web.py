"""The web pages in a real headless Chromium (Debian's, driven by Playwright; no download).

The unsubscribe confirm page, the preferences form and the subscribe → confirm flow, on a
375 px phone viewport and a desktop one; each asserts what the reader sees, that the page
does not scroll sideways, that the CSP blocked nothing, and that the store changed.
Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import require_tool
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright
from test_web_support import Site, add, running_site

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PHONE = {"width": 375, "height": 740}
DESKTOP = {"width": 1024, "height": 800}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    path = require_tool("chromium", "/usr/bin/chromium")
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()


async def open_page(browser: Browser, viewport: dict[str, int]) -> tuple[Page, list[str]]:
    """A fresh context; the returned list collects console errors (CSP violations land there)."""
    context = await browser.new_context(viewport=viewport, java_script_enabled=True)
    page = await context.new_page()
    problems: list[str] = []
    # A form re-shown with errors is a 422 document; Chromium logs that, and it is expected.
    expected = "the server responded with a status of 422"

    def collect(msg: ConsoleMessage) -> None:
        if msg.type == "error" and expected not in msg.text:
            problems.append(msg.text)

    page.on("console", collect)
    return page, problems


async def assert_fits(page: Page) -> None:
    """No horizontal scrolling: the document is no wider than the viewport."""
    widths = await page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"page scrolls sideways: {widths}"


async def test_unsubscribe_confirm_page_on_a_phone(
    tmp_path: Path, browser: Browser, artifacts_dir: Path
) -> None:
    """375 px: the page fits, the button is a large tap target, clicking it unsubscribes."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org")
        page, problems = await open_page(browser, PHONE)
        await page.goto(f"{site.base}/unsubscribe/{sub.token}")
        await assert_fits(page)
        button = page.get_by_role("button", name="Unsubscribe")
        box = await button.bounding_box()
        assert box is not None and box["height"] >= 44 and box["width"] >= 300
        # The hashed inline style sheet applied (a CSP block would leave the default 0px).
        radius = await button.evaluate("b => getComputedStyle(b).borderTopLeftRadius")
        assert radius == "6px"
        await page.screenshot(path=str(artifacts_dir / "web-unsubscribe-375.png"), full_page=True)
        assert (await site.store.get_subscriber("ada@example.org")).status == "active"
        await button.click()
        await page.get_by_role("heading", name="You are unsubscribed").wait_for()
        await assert_fits(page)
        await page.screenshot(path=str(artifacts_dir / "web-unsubscribed-375.png"), full_page=True)
        assert (await site.store.get_subscriber("ada@example.org")).status == "unsubscribed"
        assert problems == []


async def test_preferences_form_change_and_error_on_a_phone(
    tmp_path: Path, browser: Browser, artifacts_dir: Path
) -> None:
    """375 px: change a keyword and max papers → "Saved" and stored; a bad zone shows an error."""
    async with running_site(tmp_path) as site:
        sub = await add(
            site.store, "ada@example.org", "Ada", keywords=("transformers",), max_papers=10
        )
        page, problems = await open_page(browser, PHONE)
        await page.goto(f"{site.base}/preferences/{sub.token}")
        await assert_fits(page)
        await page.get_by_label("Keywords").fill("state space model\nmixture of experts")
        await page.get_by_label("Papers per digest").fill("4")
        await page.get_by_label("Monday to Friday").check()
        await page.get_by_role("button", name="Save preferences").click()
        await page.locator("#saved").wait_for()
        assert "Saved" in await page.locator("#saved").inner_text()
        await assert_fits(page)
        await page.screenshot(path=str(artifacts_dir / "web-preferences-375.png"), full_page=True)
        got = await site.store.get_subscriber("ada@example.org")
        assert got.prefs.keywords == ("state space model", "mixture of experts")
        assert got.prefs.max_papers == 4
        assert got.prefs.cadence == "weekdays"

        await page.get_by_label("Time zone").fill("Europe/Atlantis")
        await page.get_by_role("button", name="Save preferences").click()
        error = page.locator("#timezone-error")
        await error.wait_for()
        assert "not an IANA timezone name" in await error.inner_text()
        assert await page.get_by_label("Time zone").input_value() == "Europe/Atlantis"
        assert await page.get_by_label("Time zone").get_attribute("aria-invalid") == "true"
        await assert_fits(page)
        await error.scroll_into_view_if_needed()
        await page.screenshot(path=str(artifacts_dir / "web-preferences-error-375.png"))
        assert (await site.store.get_subscriber("ada@example.org")).prefs.timezone is None
        assert problems == []


async def _confirm_flow(site: Site, page: Page, artifacts_dir: Path) -> str:
    await page.goto(f"{site.base}/subscribe")
    await page.get_by_label("Email address").fill("grace@example.org")
    await page.get_by_label("Keywords").fill("compilers")
    await page.get_by_role("button", name="Subscribe").click()
    await page.get_by_role("heading", name="Check your inbox").wait_for()
    [(to, url)] = await site.outbox.wait_for(1)
    assert to == "grace@example.org"
    assert (await site.store.get_subscriber(to)).status == "pending"
    await page.goto(url)
    await page.screenshot(path=str(artifacts_dir / "web-confirm-1024.png"))
    await page.get_by_role("button", name="Yes, subscribe me").click()
    await page.get_by_role("heading", name="You are subscribed").wait_for()
    return to


async def test_subscribe_then_confirm_in_the_browser(
    tmp_path: Path, browser: Browser, artifacts_dir: Path
) -> None:
    """Desktop: fill the sign-up form, open the mailed link, confirm → active with consent."""
    async with running_site(tmp_path) as site:
        page, problems = await open_page(browser, DESKTOP)
        to = await _confirm_flow(site, page, artifacts_dir)
        await assert_fits(page)
        sub = await site.store.get_subscriber(to)
        assert sub.status == "active"
        assert sub.prefs.keywords == ("compilers",)
        when, source = await site.store.consent_of(to)
        assert when is not None and source.startswith("web double opt-in")
        assert problems == []
