"""The web endpoint over real HTTP: uvicorn on 127.0.0.1, httpx, a real SQLite store.

One-click unsubscribe (RFC 8058), the preferences form (validation, CSRF), double opt-in,
security headers and hostile input.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email
import email.policy
import hashlib
import re
import socket
from pathlib import Path

import httpx
import pytest
from conftest import FIXTURES, free_port
from test_web_support import Site, add, csrf_of, make_settings, pref_form, running_site

from digestd.errors import ConfigError
from digestd.store import TOKEN_SELECTOR, Store
from digestd.web import confirmation_message, create_app, serve_http

ONE_CLICK = {"List-Unsubscribe": "One-Click"}


# ---------------------------------------------------------------------------- basics
async def test_healthz_answers_ok(tmp_path: Path) -> None:
    """GET /healthz is 200 "ok" for the operator's checks."""
    async with running_site(tmp_path) as site:
        r = await site.client.get("/healthz")
        assert r.status_code == 200
        assert r.text == "ok"


async def test_security_headers_on_every_response(tmp_path: Path) -> None:
    """CSP, nosniff, no-referrer and no-store on pages, errors and 413s alike."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org")
        responses = [
            await site.client.get(f"/unsubscribe/{sub.token}"),
            await site.client.get("/nothing-here"),
            await site.client.post(f"/preferences/{sub.token}", data={"x": "y" * 70_000}),
            await site.client.get("/healthz"),
            await site.client.put(f"/unsubscribe/{sub.token}"),
        ]
        assert [r.status_code for r in responses] == [200, 404, 413, 200, 405]
        for r in responses:
            csp = r.headers["content-security-policy"]
            assert "default-src 'none'" in csp
            assert "form-action 'self'" in csp
            assert "frame-ancestors 'none'" in csp
            assert "script-src" not in csp and "unsafe-inline" not in csp
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
            assert r.headers["cache-control"] == "no-store"
            assert "server" not in r.headers


async def test_inline_style_is_allowed_by_its_csp_hash(tmp_path: Path) -> None:
    """The page's one <style> element hashes to the sha256 the CSP names (so it applies)."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org")
        r = await site.client.get(f"/preferences/{sub.token}")
        styles = re.findall(r"<style>(.*?)</style>", r.text, re.S)
        assert len(styles) == 1
        digest = base64.b64encode(hashlib.sha256(styles[0].encode()).digest()).decode()
        assert f"style-src 'sha256-{digest}'" in r.headers["content-security-policy"]
        assert "<script" not in r.text
        assert 'name="viewport"' in r.text


# ---------------------------------------------------------------------------- unsubscribe
async def test_one_click_post_unsubscribes_before_responding(tmp_path: Path) -> None:
    """RFC 8058: POST List-Unsubscribe=One-Click → 200, no redirect, stored when we answer."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org")
        r = await site.client.post(f"/unsubscribe/{sub.token}", data=ONE_CLICK)
        # Read the store right after the response: the change must already be committed.
        after = await site.store.get_subscriber("ada@example.org")
        assert r.status_code == 200
        assert "location" not in r.headers
        assert "set-cookie" not in r.headers
        assert after.status == "unsubscribed"
        assert "unsubscribed" in r.text.lower()


async def test_one_click_accepts_multipart_body(tmp_path: Path) -> None:
    """The RFC 8058 example posts multipart/form-data; that unsubscribes too."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org")
        r = await site.client.post(
            f"/unsubscribe/{sub.token}", files={"List-Unsubscribe": (None, "One-Click")}
        )
        assert r.status_code == 200
        assert (await site.store.get_subscriber("ada@example.org")).status == "unsubscribed"


async def test_one_click_ignores_bodies_of_other_types(tmp_path: Path) -> None:
    """An empty POST or one with an unexpected content type still unsubscribes (RFC 8058
    senders vary); the token alone decides."""
    async with running_site(tmp_path) as site:
        ada = await add(site.store, "ada@example.org")
        alan = await add(site.store, "alan@example.org")
        assert (await site.client.post(f"/unsubscribe/{ada.token}")).status_code == 200
        r = await site.client.post(
            f"/unsubscribe/{alan.token}",
            content=b"List-Unsubscribe=One-Click",
            headers={"content-type": "text/plain"},
        )
        assert r.status_code == 200
        statuses = {s.email: s.status for s in await site.store.list_subscribers()}
        assert set(statuses.values()) == {"unsubscribed"}


async def test_one_click_is_idempotent(tmp_path: Path) -> None:
    """Repeating the one-click POST answers 200 again and leaves the subscriber unsubscribed."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org")
        first = await site.client.post(f"/unsubscribe/{sub.token}", data=ONE_CLICK)
        second = await site.client.post(f"/unsubscribe/{sub.token}", data=ONE_CLICK)
        assert first.status_code == second.status_code == 200
        assert "already unsubscribed" in second.text
        assert (await site.store.get_subscriber("ada@example.org")).status == "unsubscribed"


async def test_unsubscribe_get_only_shows_a_confirm_button(tmp_path: Path) -> None:
    """GET (and HEAD) never change state — link scanners prefetch GETs."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org")
        r = await site.client.get(f"/unsubscribe/{sub.token}")
        h = await site.client.head(f"/unsubscribe/{sub.token}")
        assert r.status_code == h.status_code == 200
        assert '<form method="post">' in r.text and "<button" in r.text
        assert (await site.store.get_subscriber("ada@example.org")).status == "active"


async def test_confirm_page_button_post_unsubscribes(tmp_path: Path) -> None:
    """The page's form (confirm=yes, no List-Unsubscribe field) unsubscribes as well."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org")
        r = await site.client.post(f"/unsubscribe/{sub.token}", data={"confirm": "yes"})
        assert r.status_code == 200
        assert (await site.store.get_subscriber("ada@example.org")).status == "unsubscribed"


async def test_unknown_or_malformed_token_is_refused(tmp_path: Path) -> None:
    """Unknown tokens 404, malformed 400; a near-miss of a real token changes nothing."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org")
        near = sub.token[:-1] + ("A" if sub.token[-1] != "A" else "B")
        for path, code in [
            (f"/unsubscribe/{near}", 404),
            (f"/unsubscribe/{sub.token[:TOKEN_SELECTOR]}" + "x" * 24, 404),
            ("/unsubscribe/%00abcdefghijklmnopqrstuvwxyz", 400),
            ("/unsubscribe/" + "a" * 300, 400),
            ("/unsubscribe/short", 400),
            (f"/preferences/{near}", 404),
        ]:
            assert (await site.client.post(path, data=ONE_CLICK)).status_code == code, path
            assert (await site.client.get(path)).status_code == code, path
        assert (await site.store.get_subscriber("ada@example.org")).status == "active"


async def test_unsubscribed_address_is_no_longer_selected_for_sending(tmp_path: Path) -> None:
    """The pipeline's subscriber query (status 'active' only) skips the unsubscribed address."""
    async with running_site(tmp_path) as site:
        ada = await add(site.store, "ada@example.org")
        await add(site.store, "alan@example.org")
        await site.client.post(f"/unsubscribe/{ada.token}", data=ONE_CLICK)
        emails = [s.email async for batch in site.store.iter_subscribers() for s in batch]
        assert emails == ["alan@example.org"]


async def test_run_once_sends_nothing_after_one_click(tmp_path: Path) -> None:
    """After a one-click unsubscribe, a real run-once (Maildir) mails only the others."""
    pytest.importorskip("digestd.render", reason="the renderer is not in this build yet")
    from digestd.pipeline import run_once
    from digestd.sources.file import load_papers_file

    papers = load_papers_file(
        FIXTURES / "hf" / "daily_papers_month-2025-11_items-for-2025-11-07_final.json"
    )
    async with running_site(tmp_path) as site:
        ada = await add(site.store, "ada@example.org")
        await add(site.store, "alan@example.org")
        await site.client.post(f"/unsubscribe/{ada.token}", data=ONE_CLICK)
        await run_once(site.settings, site.store, dt.date(2025, 11, 7), papers=papers)
    mails = list((tmp_path / "outbox" / "new").iterdir())
    recipients = [
        email.message_from_bytes(p.read_bytes(), policy=email.policy.default)["To"] for p in mails
    ]
    assert recipients == ["alan@example.org"]


# ---------------------------------------------------------------------------- preferences
async def test_preferences_page_shows_current_values(tmp_path: Path) -> None:
    """The form is filled with the stored preferences and carries a CSRF field and cookie."""
    async with running_site(tmp_path) as site:
        sub = await add(
            site.store, "ada@example.org", "Ada", keywords=("state space model",), max_papers=7
        )
        r = await site.client.get(f"/preferences/{sub.token}")
        assert r.status_code == 200
        assert "state space model</textarea>" in r.text
        assert 'name="max_papers" value="7"' in r.text
        assert '<option value="Europe/London">' in r.text
        csrf_of(r.text)
        cookie = r.headers["set-cookie"].lower()
        assert "samesite=strict" in cookie and "httponly" in cookie


async def test_preferences_valid_change_is_saved(tmp_path: Path) -> None:
    """Changing keywords, max papers, cadence, time, zone and name saves them all."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org", keywords=("transformers",))
        page = await site.client.get(f"/preferences/{sub.token}")
        form = pref_form(
            sub,
            csrf_of(page.text),
            keywords="mixture of experts\r\nstate space model\r\n\r\n",
            exclude="survey",
            categories="cs.LG\ncs.CL",
            authors="Ada Lovelace",
            max_papers="5",
            min_upvotes="3",
            cadence="weekdays",
            send_at="06:45",
            timezone="Europe/London",
            name="Ada L.",
        )
        r = await site.client.post(f"/preferences/{sub.token}", data=form)
        assert r.status_code == 200, r.text
        assert 'id="saved"' in r.text
        got = await site.store.get_subscriber("ada@example.org")
        assert got.prefs.keywords == ("mixture of experts", "state space model")
        assert got.prefs.exclude == ("survey",)
        assert got.prefs.categories == ("cs.LG", "cs.CL")
        assert got.prefs.authors == ("Ada Lovelace",)
        assert (got.prefs.max_papers, got.prefs.min_upvotes) == (5, 3)
        assert (got.prefs.cadence, got.prefs.send_at) == ("weekdays", "06:45")
        assert got.prefs.timezone == "Europe/London"
        assert got.name == "Ada L."


async def test_preferences_empty_optional_fields_mean_defaults(tmp_path: Path) -> None:
    """Emptying time zone, send time and min upvotes stores None (the configured default)."""
    async with running_site(tmp_path) as site:
        sub = await add(
            site.store, "ada@example.org", timezone="Asia/Tokyo", send_at="08:00", min_upvotes=4
        )
        page = await site.client.get(f"/preferences/{sub.token}")
        form = pref_form(sub, csrf_of(page.text), timezone="", send_at="", min_upvotes=" ")
        r = await site.client.post(f"/preferences/{sub.token}", data=form)
        assert r.status_code == 200
        got = await site.store.get_subscriber("ada@example.org")
        assert (got.prefs.timezone, got.prefs.send_at, got.prefs.min_upvotes) == (None,) * 3


async def test_preferences_invalid_values_show_inline_errors_and_save_nothing(
    tmp_path: Path,
) -> None:
    """Bad values → 422 with each error next to its field, submitted values kept, no change."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org", keywords=("transformers",))
        page = await site.client.get(f"/preferences/{sub.token}")
        form = pref_form(
            sub,
            csrf_of(page.text),
            keywords="diffusion",
            timezone="Mars/Olympus_Mons",
            max_papers="0",
            send_at="25:00",
            categories="not a category!",
            cadence="hourly",
        )
        r = await site.client.post(f"/preferences/{sub.token}", data=form)
        assert r.status_code == 422
        for field in ("timezone", "max_papers", "send_at", "categories", "cadence"):
            assert f'id="{field}-error"' in r.text, field
        assert "not an IANA timezone name" in r.text
        assert 'value="Mars/Olympus_Mons"' in r.text  # kept for correction
        assert "diffusion</textarea>" in r.text
        assert 'aria-invalid="true"' in r.text
        assert 'id="keywords-error"' not in r.text
        assert await site.store.get_subscriber("ada@example.org") == sub


async def test_preferences_csrf_missing_forged_or_expired_is_403(tmp_path: Path) -> None:
    """No token, a forged one, another subscriber's, a stale one, or no cookie: 403, no change."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org")
        other = await add(site.store, "alan@example.org")
        url = f"/preferences/{sub.token}"
        good = csrf_of((await site.client.get(url)).text)
        theirs = csrf_of((await site.client.get(f"/preferences/{other.token}")).text)
        ts, nonce, mac = good.split(".")
        forged = [
            "",
            "garbage",
            f"{ts}.{nonce}.{'A' * 43}",
            f"{int(ts) + 60}.{nonce}.{mac}",
            theirs,
        ]
        for value in forged:
            form = pref_form(sub, value, max_papers="3")
            if not value:
                form.pop("csrf")
            r = await site.client.post(url, data=form)
            assert r.status_code == 403, value
            assert "Nothing was saved" in r.text
        # The right hidden field without the SameSite cookie (a cross-site post): refused.
        async with httpx.AsyncClient(base_url=site.base) as cookieless:
            r = await cookieless.post(url, data=pref_form(sub, good, max_papers="3"))
            assert r.status_code == 403
        # The right field and cookie, but the form is older than the window: refused.
        site.clock.advance(hours=5)
        r = await site.client.post(url, data=pref_form(sub, good, max_papers="3"))
        assert r.status_code == 403
        assert (await site.store.get_subscriber("ada@example.org")).prefs.max_papers == 10


async def test_preferences_pause_and_resume(tmp_path: Path) -> None:
    """The delivery radio pauses and resumes the subscriber."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org")
        url = f"/preferences/{sub.token}"
        r = await site.client.post(
            url, data=pref_form(sub, csrf_of((await site.client.get(url)).text), delivery="paused")
        )
        assert r.status_code == 200
        paused = await site.store.get_subscriber("ada@example.org")
        assert paused.status == "paused"
        r = await site.client.post(url, data=pref_form(paused, csrf_of(r.text), delivery="active"))
        assert r.status_code == 200
        assert (await site.store.get_subscriber("ada@example.org")).status == "active"


async def test_preferences_can_subscribe_again_after_unsubscribing(tmp_path: Path) -> None:
    """An unsubscribed reader can choose "Subscribe again"; consent is recorded anew."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org")
        await site.client.post(f"/unsubscribe/{sub.token}", data=ONE_CLICK)
        gone = await site.store.get_subscriber("ada@example.org")
        url = f"/preferences/{sub.token}"
        page = await site.client.get(url)
        assert "You are unsubscribed" in page.text
        r = await site.client.post(url, data=pref_form(gone, csrf_of(page.text), delivery="active"))
        assert r.status_code == 200
        assert (await site.store.get_subscriber("ada@example.org")).status == "active"
        when, source = await site.store.consent_of("ada@example.org")
        assert source == "web preferences page (subscribed again)"
        assert when is not None and abs(when - site.clock()) < dt.timedelta(minutes=1)


async def test_preferences_cannot_resume_a_bounced_address(tmp_path: Path) -> None:
    """A suppressed (hard-bounced) address cannot be reactivated from the web page."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org")
        await site.store.suppress(sub.id, "hard bounce: 550 5.1.1 no such user")
        url = f"/preferences/{sub.token}"
        page = await site.client.get(url)
        assert "bounced" in page.text
        bounced = await site.store.get_subscriber("ada@example.org")
        r = await site.client.post(
            url, data=pref_form(bounced, csrf_of(page.text), delivery="active")
        )
        assert r.status_code == 422
        assert 'id="delivery-error"' in r.text
        assert (await site.store.get_subscriber("ada@example.org")).status == "suppressed"


async def test_pages_escape_stored_markup(tmp_path: Path) -> None:
    """A name or keyword holding markup is shown as text, never as markup."""
    async with running_site(tmp_path) as site:
        sub = await add(
            site.store, "ada@example.org", '"><script>alert(1)</script>', keywords=("<b>x</b>",)
        )
        r = await site.client.get(f"/preferences/{sub.token}")
        assert "<script>alert" not in r.text and "<b>x</b>" not in r.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
        assert "&lt;b&gt;x&lt;/b&gt;" in r.text


# ---------------------------------------------------------------------------- hostile input
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "Ada\r\nBcc: victim@example.org"}, "name"),
        ({"timezone": "UTC\r\nX-Evil: 1"}, "timezone"),
        ({"keywords": "fine\nbad\x00nul"}, "keywords"),
        ({"authors": "tab\there"}, "authors"),
        ({"exclude": "bidi\u202eoverride"}, "exclude"),
        ({"keywords": "x" * 201}, "keywords"),
        ({"keywords": "\n".join(f"k{i}" for i in range(101))}, "keywords"),
        ({"max_papers": "1e9"}, "max_papers"),
        ({"min_upvotes": "-1"}, "min_upvotes"),
        ({"send_at": "7:30am"}, "send_at"),
    ],
)
async def test_hostile_preference_values_are_refused(
    tmp_path: Path, changes: dict[str, str], field: str
) -> None:
    """Control characters, CR/LF, overlong or out-of-range values: 422, nothing stored."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org", "Ada")
        url = f"/preferences/{sub.token}"
        form = pref_form(sub, csrf_of((await site.client.get(url)).text), **changes)
        r = await site.client.post(url, data=form)
        assert r.status_code == 422
        assert f'id="{field}-error"' in r.text
        assert await site.store.get_subscriber("ada@example.org") == sub


@pytest.mark.parametrize(
    ("body", "content_type", "code"),
    [
        (b"keywords=%ff%fe", "application/x-www-form-urlencoded", 400),  # not UTF-8
        (b"keywords=\xff\xfe", "application/x-www-form-urlencoded", 400),  # raw bytes
        (b"just some text", "application/x-www-form-urlencoded", 400),  # malformed
        (b"max_papers=3&max_papers=4", "application/x-www-form-urlencoded", 400),  # repeated
        (b"max_papers=3&is_admin=1", "application/x-www-form-urlencoded", 400),  # unknown
        (b"&".join(b"f%d=1" % i for i in range(40)), "application/x-www-form-urlencoded", 400),
        (b'{"max_papers": 3}', "application/json", 415),
        (b"max_papers=3", "text/plain", 415),
        (b"keywords=" + b"a" * 1_000_000, "application/x-www-form-urlencoded", 413),
    ],
)
async def test_hostile_bodies_get_a_clear_4xx(
    tmp_path: Path, body: bytes, content_type: str, code: int
) -> None:
    """Non-UTF-8, malformed, repeated, unknown, too many, wrong type, 1 MB: 4xx, no change."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org")
        r = await site.client.post(
            f"/preferences/{sub.token}", content=body, headers={"content-type": content_type}
        )
        assert r.status_code == code
        assert await site.store.get_subscriber("ada@example.org") == sub


async def test_unsubscribe_refuses_file_uploads_and_huge_bodies(tmp_path: Path) -> None:
    """A multipart file or a 1 MB body to the unsubscribe URL is refused and changes nothing."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "ada@example.org")
        url = f"/unsubscribe/{sub.token}"
        r = await site.client.post(url, files={"List-Unsubscribe": ("x.txt", b"One-Click")})
        assert r.status_code == 400
        r = await site.client.post(url, data={"List-Unsubscribe": "One-Click" + "x" * 1_000_000})
        assert r.status_code == 413
        assert (await site.store.get_subscriber("ada@example.org")).status == "active"


# ---------------------------------------------------------------------------- subscribe
async def _subscribe(site: Site, **fields: str) -> httpx.Response:
    data = {"email": "", "name": "", "keywords": "", "categories": "", **fields}
    return await site.client.post("/subscribe", data=data)


async def test_subscribe_then_confirm_activates_and_stores_consent(tmp_path: Path) -> None:
    """POST /subscribe → pending + mail; GET link shows a button; POST activates with consent."""
    async with running_site(tmp_path) as site:
        form = await site.client.get("/subscribe")
        assert form.status_code == 200 and 'type="email"' in form.text
        r = await _subscribe(
            site, email="Grace@Example.org", name="Grace", keywords="compilers\nverification"
        )
        assert r.status_code == 200 and "Check your inbox" in r.text
        pending = await site.store.get_subscriber("Grace@example.org")
        assert pending.status == "pending"
        assert pending.prefs.keywords == ("compilers", "verification")
        assert await site.store.consent_of("Grace@example.org") == (None, "web double opt-in")
        [(to, url)] = await site.outbox.wait_for(1)
        assert to == "Grace@example.org"
        assert url.startswith(f"{site.base}/confirm/")
        path = url.removeprefix(site.base)
        page = await site.client.get(path)
        assert page.status_code == 200 and "<button" in page.text
        assert (await site.store.get_subscriber(to)).status == "pending"  # GET changes nothing
        done = await site.client.post(path, data={"confirm": "yes"})
        assert done.status_code == 200 and "You are subscribed" in done.text
        assert (await site.store.get_subscriber(to)).status == "active"
        when, source = await site.store.consent_of(to)
        assert when is not None and abs(when - site.clock()) < dt.timedelta(minutes=1)
        assert source.startswith("web double opt-in (requested 20")
        again = await site.client.post(path, data={"confirm": "yes"})
        assert again.status_code == 200 and "already subscribed" in again.text


async def test_subscribe_answers_the_same_for_known_addresses(tmp_path: Path) -> None:
    """A known active address gets the same page as a new one, and no mail is sent to it."""
    async with running_site(tmp_path) as site:
        await add(site.store, "ada@example.org")
        known = await _subscribe(site, email="ada@example.org")
        new = await _subscribe(site, email="new@example.org")
        assert known.status_code == new.status_code == 200
        assert known.text.replace("ada@example.org", "X") == new.text.replace(
            "new@example.org", "X"
        )
        mails = await site.outbox.wait_for(1)
        assert [to for to, _ in mails] == ["new@example.org"]
        assert (await site.store.get_subscriber("ada@example.org")).status == "active"


async def test_subscribe_invalid_input_shows_errors_and_stores_nothing(tmp_path: Path) -> None:
    """Bad address, header injection or bad category: 422 with inline errors, nothing stored."""
    async with running_site(tmp_path) as site:
        for fields, field in [
            ({"email": "not-an-address"}, "email"),
            ({"email": "a@example.org\r\nBcc: victim@example.org"}, "email"),
            ({"email": "a@example.org", "categories": "<script>"}, "categories"),
            ({"email": "a@example.org", "name": "x" * 201}, "name"),
        ]:
            r = await _subscribe(site, **fields)
            assert r.status_code == 422, fields
            assert f'id="{field}-error"' in r.text
        assert await site.store.list_subscribers() == []
        r = await site.client.post("/subscribe", data={"email": "a@example.org", "password": "x"})
        assert r.status_code == 400
        assert await site.store.list_subscribers() == []
        assert site.outbox.mails == []


async def test_confirmation_link_expires(tmp_path: Path) -> None:
    """After 48 hours the link answers 410 and the subscriber stays pending."""
    async with running_site(tmp_path) as site:
        await _subscribe(site, email="grace@example.org")
        [(_, url)] = await site.outbox.wait_for(1)
        site.clock.advance(hours=49)
        path = url.removeprefix(site.base)
        assert (await site.client.get(path)).status_code == 410
        assert (await site.client.post(path, data={"confirm": "yes"})).status_code == 410
        assert (await site.store.get_subscriber("grace@example.org")).status == "pending"


async def test_forged_confirmation_links_are_rejected(tmp_path: Path) -> None:
    """A changed signature, a payload for another address or a malformed link: 4xx."""
    async with running_site(tmp_path) as site:
        await _subscribe(site, email="grace@example.org")
        await _subscribe(site, email="eve@example.org")
        mails = await site.outbox.wait_for(2)
        signed = dict(mails)["grace@example.org"].rsplit("/", 1)[1]
        payload, mac = signed.split(".")
        ts = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).split(b"|")[0]
        other = base64.urlsafe_b64encode(ts + b"|eve@example.org").rstrip(b"=").decode()
        flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
        for bad, code in [
            (f"{payload}.{flipped}", 404),
            (f"{other}.{mac}", 404),
            ("not-a-link", 400),
            (f"{payload}.{mac}x", 400),
        ]:
            assert (await site.client.get(f"/confirm/{bad}")).status_code == code, bad
            r = await site.client.post(f"/confirm/{bad}", data={"confirm": "yes"})
            assert r.status_code == code, bad
        statuses = {s.email: s.status for s in await site.store.list_subscribers()}
        assert statuses == {"grace@example.org": "pending", "eve@example.org": "pending"}


async def test_old_confirmation_link_cannot_undo_an_unsubscribe(tmp_path: Path) -> None:
    """Confirm, unsubscribe, then replay the confirmation: refused (410), still unsubscribed."""
    async with running_site(tmp_path) as site:
        await _subscribe(site, email="grace@example.org")
        [(_, url)] = await site.outbox.wait_for(1)
        path = url.removeprefix(site.base)
        assert (await site.client.post(path, data={"confirm": "yes"})).status_code == 200
        sub = await site.store.get_subscriber("grace@example.org")
        await site.client.post(f"/unsubscribe/{sub.token}", data=ONE_CLICK)
        r = await site.client.post(path, data={"confirm": "yes"})
        assert r.status_code == 410
        assert (await site.store.get_subscriber("grace@example.org")).status == "unsubscribed"


async def test_unsubscribed_reader_can_sign_up_again(tmp_path: Path) -> None:
    """An unsubscribed address signing up later gets a new link, which reactivates it."""
    async with running_site(tmp_path) as site:
        sub = await add(site.store, "grace@example.org", keywords=("compilers",))
        await site.client.post(f"/unsubscribe/{sub.token}", data=ONE_CLICK)
        site.clock.advance(minutes=1)
        await _subscribe(site, email="grace@example.org", keywords="ignored")
        [(_, url)] = await site.outbox.wait_for(1)
        r = await site.client.post(url.removeprefix(site.base), data={"confirm": "yes"})
        assert r.status_code == 200
        back = await site.store.get_subscriber("grace@example.org")
        assert back.status == "active"
        assert back.prefs.keywords == ("compilers",)  # a sign-up never overwrites a known reader
        assert (await site.store.consent_of("grace@example.org"))[1].startswith("web double")


async def test_pending_subscriber_has_no_token_pages(tmp_path: Path) -> None:
    """Until confirmed, the subscriber's token opens no preferences page."""
    async with running_site(tmp_path) as site:
        await _subscribe(site, email="grace@example.org")
        pending = await site.store.get_subscriber("grace@example.org")
        assert (await site.client.get(f"/preferences/{pending.token}")).status_code == 404


async def test_subscribe_page_off_is_404(tmp_path: Path) -> None:
    """With subscribe_page = false the page, the form post and confirm links are all 404."""
    async with running_site(tmp_path, subscribe_page=False) as site:
        assert (await site.client.get("/subscribe")).status_code == 404
        assert (await _subscribe(site, email="a@example.org")).status_code == 404
        assert (await site.client.get("/confirm/abcdefgh.x")).status_code == 404
        assert await site.store.list_subscribers() == []


async def test_subscribe_is_rate_limited_per_client(tmp_path: Path) -> None:
    """The sixth sign-up within ten minutes from one IP gets 429; later it works again."""
    async with running_site(tmp_path) as site:
        for i in range(5):
            assert (await _subscribe(site, email=f"u{i}@example.org")).status_code == 200
        limited = await _subscribe(site, email="u5@example.org")
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) > 0
        assert await site.store.find_subscriber("u5@example.org") is None
        site.clock.advance(minutes=11)
        assert (await _subscribe(site, email="u5@example.org")).status_code == 200


async def test_confirmation_mails_per_address_are_limited(tmp_path: Path) -> None:
    """Signing the same address up again and again mails it at most three times a day."""
    async with running_site(tmp_path) as site:
        for _ in range(4):
            assert (await _subscribe(site, email="grace@example.org")).status_code == 200
        site.clock.advance(minutes=11)  # past the per-IP window
        await _subscribe(site, email="other@example.org")
        mails = await site.outbox.wait_for(4)
        assert [to for to, _ in mails].count("grace@example.org") == 3


# ---------------------------------------------------------------------------- keys, mail, server
async def test_links_are_signed_with_the_configured_secret(tmp_path: Path) -> None:
    """With http.secret_file, a link signed under another secret is rejected; short secrets fail."""
    secret = tmp_path / "link.secret"
    secret.write_text("a" * 64)
    async with running_site(tmp_path, secret_file=str(secret)) as site:
        await _subscribe(site, email="grace@example.org")
        [(_, url)] = await site.outbox.wait_for(1)
        path = url.removeprefix(site.base)
        secret.write_text("b" * 64)
        other = create_app(site.settings, site.store)
        transport = httpx.ASGITransport(app=other)
        async with httpx.AsyncClient(transport=transport, base_url=site.base) as c:
            assert (await c.get(path)).status_code == 404
        assert (await site.client.get(path)).status_code == 200
    secret.write_text("short")
    async with Store.open(tmp_path / "x.sqlite3") as store:
        with pytest.raises(ConfigError, match="at least 16"):
            create_app(site.settings, store)


async def test_find_by_token_needs_the_whole_token(tmp_path: Path) -> None:
    """The constant-time lookup matches only the full token, not its indexed selector."""
    async with Store.open(tmp_path / "d.sqlite3") as store:
        sub = await add(store, "ada@example.org")
        assert (await store.find_by_token(sub.token)) == sub
        assert await store.find_by_token(sub.token[:TOKEN_SELECTOR] + "A" * 24) is None
        assert await store.find_by_token(sub.token + "A") is None
        assert await store.find_by_token(sub.token[:TOKEN_SELECTOR]) is None
        assert await store.find_by_token("é" * 32) is None


def test_confirmation_message_is_a_clean_text_and_html_mail(tmp_path: Path) -> None:
    """The default confirmation mail: right headers, both parts carry the link, escaped HTML."""
    settings = make_settings(tmp_path, 8025)
    url = "https://papers.example.org/confirm/abc.def?x=1&y=2"
    msg = confirmation_message(settings, "grace@example.org", url, dt.datetime.now(dt.UTC))
    data = msg.as_bytes()
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["To"] == "grace@example.org"
    assert parsed["From"].addresses[0].addr_spec == "papers@example.org"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["Message-ID"].endswith("@example.org>")
    assert url in parsed.get_body(("plain",)).get_content()
    html = parsed.get_body(("html",)).get_content()
    assert 'href="https://papers.example.org/confirm/abc.def?x=1&amp;y=2"' in html
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


async def test_default_confirmation_goes_through_the_configured_transport(tmp_path: Path) -> None:
    """Without an injected sender, the confirmation lands in the configured Maildir."""
    async with running_site(tmp_path) as site:
        app = create_app(site.settings, site.store, now=site.clock)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=site.base) as c:
            r = await c.post(
                "/subscribe",
                data={"email": "grace@example.org", "name": "", "keywords": "", "categories": ""},
            )
        assert r.status_code == 200
    [mail] = list((tmp_path / "outbox" / "new").iterdir())
    msg = email.message_from_bytes(mail.read_bytes(), policy=email.policy.default)
    assert msg["To"] == "grace@example.org"
    assert f"{site.base}/confirm/" in msg.get_body(("plain",)).get_content()


async def test_serve_http_listens_on_the_configured_address_and_stops(tmp_path: Path) -> None:
    """serve_http binds [http] listen in this loop, answers, and returns once stop is set."""
    port = free_port()
    settings = make_settings(tmp_path, port)
    async with Store.open(settings.store.path) as store:
        sub = await add(store, "ada@example.org")
        stop = asyncio.Event()
        task = asyncio.create_task(serve_http(settings, store, stop))
        async with httpx.AsyncClient(base_url=settings.digest.base_url) as client:
            assert (await client.get("/healthz")).text == "ok"
            r = await client.post(f"/unsubscribe/{sub.token}", data=ONE_CLICK)
            assert r.status_code == 200
        assert (await store.get_subscriber("ada@example.org")).status == "unsubscribed"
        stop.set()
        async with asyncio.timeout(10):
            await task
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_serve_http_reports_a_busy_port_as_config_error(tmp_path: Path) -> None:
    """A port in use is a ConfigError naming http.listen, raised before serve_http's first
    await (the daemon checks its task after one loop step), not a process exit."""
    port = free_port()
    settings = make_settings(tmp_path, port)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        async with Store.open(settings.store.path) as store:
            task = asyncio.create_task(serve_http(settings, store, asyncio.Event()))
            await asyncio.sleep(0)  # one step, exactly what the daemon does
            assert task.done()
            with pytest.raises(ConfigError, match=r"http\.listen"):
                task.result()


async def test_serve_http_reports_a_short_link_secret_at_once(tmp_path: Path) -> None:
    """A too-short http.secret_file is a ConfigError before serve_http's first await."""
    secret = tmp_path / "link.secret"
    secret.write_text("short")
    settings = make_settings(tmp_path, free_port(), secret_file=str(secret))
    async with Store.open(settings.store.path) as store:
        task = asyncio.create_task(serve_http(settings, store, asyncio.Event()))
        await asyncio.sleep(0)
        assert task.done()
        with pytest.raises(ConfigError, match="secret_file"):
            task.result()
