"""The daemon's small web endpoint: one-click unsubscribe, preferences, double opt-in.

Starlette app served by uvicorn inside the daemon's event loop (``serve_http``)::

    GET  /healthz                    "ok"
    GET  /unsubscribe/{token}        a page with a confirm button (never changes anything)
    POST /unsubscribe/{token}        unsubscribes (RFC 8058 one-click, or the page's button)
    GET  /preferences/{token}        the preferences form
    POST /preferences/{token}        validate exactly as the CLI does, then save
    GET  /subscribe                  sign-up form (only with ``[http] subscribe_page = true``)
    POST /subscribe                  creates a 'pending' subscriber and mails a confirmation link
    GET  /confirm/{signed}           a page with a confirm button (link scanners prefetch GETs)
    POST /confirm/{signed}           activates, storing consent time and source

Credentials: ``{token}`` is the subscriber's random 192-bit token from the store, looked up
in constant time (:meth:`Store.find_by_token`); ``{signed}`` is an HMAC-signed, expiring
link. Keys come from the secret named by ``[http] secret_file`` (or ``$DIGESTD_LINK_SECRET``
or the systemd credential ``link-secret``), else from random secrets kept in the store.

Every response carries a strict Content-Security-Policy (no scripts at all; the one inline
style sheet is allowed by its hash), ``no-store`` caching and ``no-referrer``, so the token in
the URL never leaves through a Referer header. Request bodies are capped at 64 KB; malformed,
non-UTF-8, duplicated or unknown form fields are refused with a 4xx before anything is stored.
Tokens, links and CSRF values are never logged (uvicorn's access log, which would print the
path, is off).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import re
import secrets
import socket
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import contextmanager
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr, make_msgid
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl
from zoneinfo import available_timezones

import jinja2
import structlog
import uvicorn
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Settings, read_secret
from .errors import ConfigError, ValidationError
from .models import CADENCES, Preferences, RenderedDigest, Subscriber
from .store import Store
from .validation import check_name, check_preferences, normalize_email

log = structlog.get_logger(__name__)

Now = Callable[[], dt.datetime]
SendConfirmation = Callable[[str, str], Awaitable[None]]

MAX_BODY = 64 * 1024
MAX_FIELDS = 32
CSRF_TTL = dt.timedelta(hours=4)
CONFIRM_TTL = dt.timedelta(hours=48)
CLOCK_SKEW = dt.timedelta(minutes=5)
# POST /subscribe: per client IP, and confirmation mails per address (both in memory).
SUBSCRIBE_LIMIT = (5, 600.0)
CONFIRMATIONS_PER_ADDRESS = (3, 86400.0)
CSRF_COOKIE = "digestd_csrf"
LINK_SECRET_MIN = 16

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_B64 = re.compile(r"^[A-Za-z0-9_-]+$")
_SIGNED = re.compile(r"^([A-Za-z0-9_-]{8,1024})\.([A-Za-z0-9_-]{43})$")
_CSRF = re.compile(r"^(\d{1,12})\.([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{43})$")

PREF_FIELDS = (
    "name",
    "keywords",
    "exclude",
    "categories",
    "authors",
    "max_papers",
    "min_upvotes",
    "cadence",
    "send_at",
    "timezone",
    "delivery",
)
LIST_FIELDS = ("keywords", "exclude", "categories", "authors")
SUBSCRIBE_FIELDS = ("email", "name", "keywords", "categories")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---------------------------------------------------------------------------- small helpers
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not _B64.match(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, *parts: str) -> str:
    return _b64(hmac.new(key, "\x00".join(parts).encode(), hashlib.sha256).digest())


def _lines(text: str) -> list[str]:
    """A textarea, one entry per line. Only LF/CRLF separate; any other control character
    stays in the entry, where validation rejects it."""
    return [line for line in (ln.removesuffix("\r") for ln in text.split("\n")) if line.strip()]


def _blank_to_none(text: str) -> str | None:
    return text if text.strip() else None


def _template_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates" / "web", here.parent / "templates" / "web"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("templates/web: the web page templates are missing from the installation")


def link_keys(settings: Settings) -> tuple[bytes, bytes] | None:
    """(CSRF key, link key) derived from the configured link secret; None when there is none
    (the store's random secrets are used then). ConfigError when it is too short."""
    master = read_secret("link-secret", settings.http.secret_file, "DIGESTD_LINK_SECRET")
    if master is None:
        return None
    if len(master) < LINK_SECRET_MIN:
        raise ConfigError(
            f"http.secret_file: the link secret must be at least {LINK_SECRET_MIN}"
            " characters (e.g. `openssl rand -hex 32`)"
        )
    raw = master.encode()
    return (
        hmac.new(raw, b"digestd csrf", hashlib.sha256).digest(),
        hmac.new(raw, b"digestd links", hashlib.sha256).digest(),
    )


class _RateLimiter:
    """At most ``limit`` hits per ``window`` seconds per key; memory bounded by ``max_keys``."""

    def __init__(self, limit: int, window: float, max_keys: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def hit(self, key: str, now: float) -> float:
        """Record a hit; 0.0 when allowed, else the seconds until the next one would be."""
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = deque()
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        self._hits.move_to_end(key)
        if len(hits) >= self.limit:
            return max(1.0, hits[0] + self.window - now)
        hits.append(now)
        while len(self._hits) > self.max_keys:
            self._hits.popitem(last=False)
        return 0.0


class _SecurityHeaders:
    """Adds the security headers to every response, errors and 413s included."""

    def __init__(self, app: ASGIApp, headers: Sequence[tuple[str, str]]) -> None:
        self.app = app
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers:
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ---------------------------------------------------------------------------- the confirmation mail
def confirmation_message(
    settings: Settings, email: str, confirm_url: str, now: dt.datetime, pages: _Pages | None = None
) -> EmailMessage:
    """The double opt-in mail: plain text and HTML, with the expiring confirmation link."""
    pages = pages or _Pages(settings)
    digest = settings.digest
    hours = int(CONFIRM_TTL.total_seconds() // 3600)
    context = {"email": email, "confirm_url": confirm_url, "hours": hours}
    msg = EmailMessage(policy=SMTP)
    msg["From"] = formataddr((digest.from_name, digest.from_address))
    msg["To"] = email
    msg["Subject"] = f"Confirm your subscription to {digest.from_name}"
    msg["Date"] = format_datetime(now.astimezone(dt.UTC))
    msg["Message-ID"] = make_msgid(domain=digest.domain)
    msg["Auto-Submitted"] = "auto-generated"
    if digest.reply_to:
        msg["Reply-To"] = digest.reply_to
    msg.set_content(pages.env.get_template("confirm_email.txt").render(context))
    msg.add_alternative(
        pages.env.get_template("confirm_email.html").render(context), subtype="html"
    )
    return msg


def default_send_confirmation(settings: Settings, now: Now = utcnow) -> SendConfirmation:
    """Send the confirmation through the configured transport (``deliver.make_transport``)."""
    pages = _Pages(settings)

    async def send(email: str, confirm_url: str) -> None:
        from .deliver import make_transport  # lazy: deliver is only needed when mailing

        moment = now()
        msg = confirmation_message(settings, email, confirm_url, moment, pages)
        body = msg.get_body(("plain",))
        html = msg.get_body(("html",))
        rendered = RenderedDigest(
            subscriber_id=0,
            email=email,
            date=moment.date(),
            message_id=str(msg["Message-ID"]),
            subject=str(msg["Subject"]),
            html=html.get_content() if isinstance(html, EmailMessage) else "",
            text=body.get_content() if isinstance(body, EmailMessage) else "",
            message=msg.as_bytes(),
            paper_ids=(),
        )
        async with make_transport(settings) as transport:
            delivery = await transport.send(rendered, settings.digest.from_address)
        if delivery.state != "accepted":
            log.warning("confirmation mail not accepted", email=email, reply=delivery.reply)

    return send


# ---------------------------------------------------------------------------- pages
class _Pages:
    """The Jinja environment (autoescape, StrictUndefined) and the page CSS with its hash."""

    def __init__(self, settings: Settings) -> None:
        directory = _template_dir()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(directory)),
            autoescape=jinja2.select_autoescape(
                enabled_extensions=("html",), disabled_extensions=("txt",), default=True
            ),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,
        )
        css = (directory / "style.css").read_text(encoding="utf-8")
        # The CSP allows exactly this style sheet (by hash) and no script at all.
        self.style_hash = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
        self.env.globals.update(
            css=Markup(css),  # noqa: S704 - our own style sheet, not user input
            site_name=settings.digest.from_name,
            contact=settings.digest.reply_to or settings.digest.from_address,
        )

    def render(
        self,
        template: str,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None,
        **context: Any,
    ) -> HTMLResponse:
        html = self.env.get_template(template).render(context)
        return HTMLResponse(html, status_code=status_code, headers=headers, background=background)


_STATUS_MESSAGES = {
    404: "There is nothing at this address.",
    405: "This address does not accept that kind of request.",
    413: f"Requests are limited to {MAX_BODY // 1024} KB.",
}
_STATUS_TITLES = {
    400: "Bad request",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    410: "Link expired",
    413: "Too much data",
    415: "Unsupported form encoding",
    429: "Too many requests",
}


# ---------------------------------------------------------------------------- the app
class _Web:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        now: Now,
        send_confirmation: SendConfirmation | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.now = now
        self._send_confirmation = send_confirmation
        self.pages = _Pages(settings)
        self.zones = sorted(available_timezones())
        self.secure_cookie = settings.digest.base_url.startswith("https://")
        self.ip_limit = _RateLimiter(*SUBSCRIBE_LIMIT)
        self.address_limit = _RateLimiter(*CONFIRMATIONS_PER_ADDRESS)
        self._keys = link_keys(settings)

    # ------------------------------------------------------------------ keys
    async def keys(self) -> tuple[bytes, bytes]:
        """(CSRF key, link key): from the secret file, else random secrets in the store."""
        if self._keys is None:
            self._keys = (await self.store.secret("csrf"), await self.store.secret("links"))
        return self._keys

    # ------------------------------------------------------------------ request parsing
    async def form(
        self, request: Request, allowed: Sequence[str] | None, *, one_click: bool = False
    ) -> dict[str, str]:
        """The form fields, or a clear 4xx: wrong encoding, not UTF-8, malformed, repeated or
        unknown fields (``allowed=None`` ignores unknown fields).

        ``one_click`` (the unsubscribe URL) also takes multipart/form-data, as in RFC 8058's
        example, and ignores a body of any other type: the token alone decides what happens.
        """
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        pairs: list[tuple[str, str]]
        if media == "application/x-www-form-urlencoded":
            body = await request.body()
            try:
                text = body.decode("utf-8")
                pairs = parse_qsl(
                    text,
                    keep_blank_values=True,
                    strict_parsing=bool(text),
                    encoding="utf-8",
                    errors="strict",
                    max_num_fields=MAX_FIELDS,
                )
            except UnicodeDecodeError:
                raise HTTPException(400, "The form data is not valid UTF-8.") from None
            except ValueError:
                raise HTTPException(
                    400, "The form data is malformed or has too many fields."
                ) from None
        elif one_click and media == "multipart/form-data":
            data = await request.form(max_files=0, max_fields=MAX_FIELDS, max_part_size=MAX_BODY)
            pairs = []
            for key, value in data.multi_items():
                if isinstance(value, UploadFile):
                    raise HTTPException(400, "File uploads are not accepted.")
                pairs.append((key, value))
        elif one_click:
            pairs = []
        else:
            raise HTTPException(415, "Send the form as application/x-www-form-urlencoded.")
        out: dict[str, str] = {}
        for key, value in pairs:
            if key in out:
                raise HTTPException(400, f"The field {key!r} was sent more than once.")
            out[key] = value
        if allowed is not None:
            unknown = sorted(set(out) - set(allowed))
            if unknown:
                names = ", ".join(repr(u[:40]) for u in unknown[:5])
                raise HTTPException(400, f"Unknown form field(s): {names}.")
        return out

    async def subscriber(self, request: Request) -> Subscriber:
        token = request.path_params["token"]
        if not _TOKEN.match(token):
            raise HTTPException(400, "This link is malformed. Copy the whole link from the email.")
        sub = await self.store.find_by_token(token)
        if sub is None or sub.status == "pending":
            raise HTTPException(404, "This link is not valid. Use the link in your latest digest.")
        return sub

    # ------------------------------------------------------------------ health
    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    # ------------------------------------------------------------------ unsubscribe
    async def unsubscribe_page(self, request: Request) -> Response:
        sub = await self.subscriber(request)
        template = "unsubscribed.html" if sub.status == "unsubscribed" else "unsubscribe.html"
        return self.pages.render(
            template, email=sub.email, token=sub.token, already=True, title="Unsubscribe"
        )

    async def unsubscribe(self, request: Request) -> Response:
        """RFC 8058 one-click (body ``List-Unsubscribe=One-Click``) or the page's button.

        The change is committed before the response is sent; no redirect, no cookie, no CSRF
        token (the unguessable token in the URL is the credential); repeating it is harmless.
        """
        token = request.path_params["token"]
        if not _TOKEN.match(token):
            raise HTTPException(400, "This link is malformed. Copy the whole link from the email.")
        # Lenient about extra fields: a mail provider's one-click POST must never fail.
        form = await self.form(request, None, one_click=True)
        sub = await self.store.find_by_token(token)
        if sub is None:
            raise HTTPException(404, "This link is not valid. Use the link in your latest digest.")
        one_click = form.get("List-Unsubscribe") == "One-Click"
        already = sub.status == "unsubscribed"
        if not already:
            await self.store.unsubscribe_by_token(
                sub.token,
                "one-click (List-Unsubscribe-Post)" if one_click else "web unsubscribe page",
            )
            log.info("unsubscribed", subscriber_id=sub.id, one_click=one_click)
        return self.pages.render(
            "unsubscribed.html",
            email=sub.email,
            token=sub.token,
            already=already,
            title="Unsubscribed",
        )

    # ------------------------------------------------------------------ preferences
    async def _csrf_token(self, sub: Subscriber, nonce: str) -> str:
        key = (await self.keys())[0]
        ts = str(int(self.now().timestamp()))
        return f"{ts}.{nonce}.{_mac(key, 'prefs', sub.token, ts, nonce)}"

    async def _csrf_ok(self, request: Request, sub: Subscriber, value: str) -> bool:
        """The hidden field must be our HMAC over (subscriber token, time, nonce), not older
        than CSRF_TTL, and its nonce must equal the SameSite=Strict cookie's (double submit).

        Why both: the HMAC proves this server rendered the form for this subscriber recently;
        the cookie, which browsers never attach to a cross-site POST, proves the POST comes
        from our own page. An Origin check would not work here: with ``Referrer-Policy:
        no-referrer`` browsers send ``Origin: null`` on form posts.
        """
        match = _CSRF.match(value)
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if match is None or not cookie:
            return False
        ts, nonce, mac = match.groups()
        key = (await self.keys())[0]
        good_mac = hmac.compare_digest(mac, _mac(key, "prefs", sub.token, ts, nonce))
        good_cookie = hmac.compare_digest(cookie.encode(), nonce.encode())
        age = self.now() - dt.datetime.fromtimestamp(int(ts), dt.UTC)
        return good_mac and good_cookie and -CLOCK_SKEW <= age <= CSRF_TTL

    @staticmethod
    def _delivery_choices(status: str) -> list[tuple[str, str]]:
        if status in ("active", "paused"):
            return [("active", "Send me digests"), ("paused", "Pause for now")]
        if status == "unsubscribed":
            return [("unsubscribed", "Stay unsubscribed"), ("active", "Subscribe again")]
        return []  # suppressed: only the operator can resume a bounced address

    def _form_values(self, sub: Subscriber) -> dict[str, str]:
        p = sub.prefs
        return {
            "name": sub.name,
            "keywords": "\n".join(p.keywords),
            "exclude": "\n".join(p.exclude),
            "categories": "\n".join(p.categories),
            "authors": "\n".join(p.authors),
            "max_papers": str(p.max_papers),
            "min_upvotes": "" if p.min_upvotes is None else str(p.min_upvotes),
            "cadence": p.cadence,
            "send_at": p.send_at or "",
            "timezone": p.timezone or "",
            "delivery": sub.status,
        }

    async def _preferences_response(
        self,
        request: Request,
        sub: Subscriber,
        values: Mapping[str, str],
        *,
        errors: Mapping[str, list[str]] | None = None,
        saved: bool = False,
        status_code: int = 200,
    ) -> Response:
        cookie = request.cookies.get(CSRF_COOKIE, "")
        nonce = (
            cookie if re.fullmatch(r"[A-Za-z0-9_-]{22}", cookie) else _b64(secrets.token_bytes(16))
        )
        response = self.pages.render(
            "preferences.html",
            status_code=status_code,
            title="Your digest preferences",
            email=sub.email,
            token=sub.token,
            status=sub.status,
            values=values,
            errors=errors or {},
            saved=saved,
            csrf=await self._csrf_token(sub, nonce),
            choices=self._delivery_choices(sub.status),
            cadences=CADENCES,
            zones=self.zones,
            default_timezone=self.settings.digest.timezone,
            default_send_at=self.settings.digest.send_at,
        )
        response.set_cookie(
            CSRF_COOKIE,
            nonce,
            max_age=int(CSRF_TTL.total_seconds()),
            path="/",
            secure=self.secure_cookie,
            httponly=True,
            samesite="strict",
        )
        return response

    async def preferences_page(self, request: Request) -> Response:
        sub = await self.subscriber(request)
        return await self._preferences_response(request, sub, self._form_values(sub))

    async def preferences(self, request: Request) -> Response:
        sub = await self.subscriber(request)
        form = await self.form(request, (*PREF_FIELDS, "csrf"))
        if not await self._csrf_ok(request, sub, form.get("csrf", "")):
            raise HTTPException(
                403,
                "This form has expired or did not come from this site. Nothing was saved: "
                "open the preferences page again and resubmit.",
            )
        values = {key: form.get(key, "") for key in PREF_FIELDS}
        errors: dict[str, list[str]] = {}
        name = sub.name
        try:
            name = check_name(values["name"])
        except ValidationError as exc:
            errors["name"] = exc.problems
        changes: dict[str, object] = {key: _lines(values[key]) for key in LIST_FIELDS}
        changes["max_papers"] = values["max_papers"].strip()
        changes["min_upvotes"] = _blank_to_none(values["min_upvotes"].strip())
        changes["cadence"] = values["cadence"]
        changes["send_at"] = _blank_to_none(values["send_at"])
        changes["timezone"] = _blank_to_none(values["timezone"])
        # Field by field with the CLI's own validator, so each error sits next to its field.
        for key, raw in changes.items():
            try:
                check_preferences(sub.prefs, {key: raw})
            except ValidationError as exc:
                errors[key] = exc.problems
        choices = [value for value, _ in self._delivery_choices(sub.status)]
        delivery = values["delivery"] or sub.status
        if delivery != sub.status and delivery not in choices:
            errors["delivery"] = [
                "choose one of the options shown"
                if choices
                else "mail to this address bounced: only the operator can resume deliveries"
            ]
        if errors:
            log.info("preferences rejected", subscriber_id=sub.id, fields=sorted(errors))
            return await self._preferences_response(
                request, sub, values, errors=errors, status_code=422
            )
        prefs = check_preferences(sub.prefs, changes)
        now = self.now()
        updated = await self.store.update_subscriber(sub.email, name=name, prefs=prefs, now=now)
        if delivery != sub.status:
            if sub.status == "unsubscribed":
                await self.store.activate_with_consent(
                    sub.email,
                    "web preferences page (subscribed again)",
                    allowed_from=("unsubscribed",),
                    now=now,
                )
            else:
                await self.store.set_status(sub.email, delivery, "web preferences page", now=now)
            updated = await self.store.get_subscriber(sub.email)
        log.info("preferences saved", subscriber_id=sub.id, status=updated.status)
        return await self._preferences_response(
            request, updated, self._form_values(updated), saved=True
        )

    # ------------------------------------------------------------------ subscribe
    def _require_subscribe_page(self) -> None:
        if not self.settings.http.subscribe_page:
            raise HTTPException(404, "There is no sign-up page here.")

    def _subscribe_form(
        self, values: Mapping[str, str], errors: Mapping[str, list[str]], status_code: int = 200
    ) -> Response:
        return self.pages.render(
            "subscribe.html",
            status_code=status_code,
            title="Subscribe",
            values=values,
            errors=errors,
            hours=int(CONFIRM_TTL.total_seconds() // 3600),
        )

    async def subscribe_page(self, request: Request) -> Response:
        self._require_subscribe_page()
        return self._subscribe_form({key: "" for key in SUBSCRIBE_FIELDS}, {})

    async def subscribe(self, request: Request) -> Response:
        """Create a 'pending' subscriber and mail a confirmation link.

        The answer is the same whether or not the address is already known (no address
        enumeration), and the mail goes out after the response (no timing difference).
        """
        self._require_subscribe_page()
        client = request.client.host if request.client else "unknown"
        wait = self.ip_limit.hit(client, self.now().timestamp())
        if wait:
            raise HTTPException(
                429,
                "Too many sign-ups from your network. Try again later.",
                headers={"Retry-After": str(int(wait))},
            )
        form = await self.form(request, SUBSCRIBE_FIELDS)
        values = {key: form.get(key, "") for key in SUBSCRIBE_FIELDS}
        errors: dict[str, list[str]] = {}
        email = name = ""
        try:
            email = normalize_email(values["email"])
        except ValidationError as exc:
            errors["email"] = exc.problems
        try:
            name = check_name(values["name"])
        except ValidationError as exc:
            errors["name"] = exc.problems
        changes = {key: _lines(values[key]) for key in ("keywords", "categories")}
        for key, raw in changes.items():
            try:
                check_preferences(Preferences(), {key: raw})
            except ValidationError as exc:
                errors[key] = exc.problems
        if errors:
            return self._subscribe_form(values, errors, status_code=422)
        prefs = check_preferences(Preferences(), changes)
        now = self.now()
        existing = await self.store.find_subscriber(email)
        if existing is None:
            try:
                await self.store.add_subscriber(
                    email,
                    name,
                    prefs,
                    status="pending",
                    consent_source="web double opt-in",
                    now=now,
                )
            except ValidationError:  # added by a concurrent request a moment ago
                existing = await self.store.find_subscriber(email)
        elif existing.status == "pending":
            await self.store.update_subscriber(email, name=name, prefs=prefs, now=now)
        mail = existing is None or existing.status in ("pending", "unsubscribed")
        if mail and self.address_limit.hit(email.lower(), now.timestamp()):
            mail = False
            log.warning("confirmation mails for this address rate-limited", email=email)
        background = None
        if mail:
            url = f"{self.settings.digest.base_url}/confirm/{await self._confirm_link(email)}"
            background = BackgroundTask(self._send_quietly, email, url)
            log.info("sign-up", email=email, new=existing is None)
        return self.pages.render(
            "subscribe_sent.html",
            background=background,
            title="Check your inbox",
            email=email,
            hours=int(CONFIRM_TTL.total_seconds() // 3600),
        )

    async def _send_quietly(self, email: str, url: str) -> None:
        try:
            if self._send_confirmation is None:
                self._send_confirmation = default_send_confirmation(self.settings, self.now)
            await self._send_confirmation(email, url)
        except Exception as exc:
            log.error("confirmation mail failed", email=email, error=str(exc))

    async def _confirm_link(self, email: str) -> str:
        key = (await self.keys())[1]
        payload = _b64(f"{int(self.now().timestamp())}|{email}".encode())
        return f"{payload}.{_mac(key, 'confirm', payload)}"

    async def _check_link(self, signed: str) -> tuple[str, dt.datetime]:
        """(email, issued at) from a confirmation link; 400 malformed, 404 forged, 410 expired."""
        match = _SIGNED.match(signed)
        if match is None:
            raise HTTPException(400, "This link is malformed. Copy the whole link from the email.")
        payload, mac = match.groups()
        key = (await self.keys())[1]
        if not hmac.compare_digest(mac, _mac(key, "confirm", payload)):
            raise HTTPException(404, "This confirmation link is not valid.")
        try:
            ts, _, email = _unb64(payload).decode("utf-8").partition("|")
            issued = dt.datetime.fromtimestamp(int(ts), dt.UTC)
        except (ValueError, OverflowError):
            raise HTTPException(404, "This confirmation link is not valid.") from None
        age = self.now() - issued
        if age < -CLOCK_SKEW:
            raise HTTPException(404, "This confirmation link is not valid.")
        if age > CONFIRM_TTL:
            raise HTTPException(
                410, "This confirmation link has expired. Sign up again to get a new one."
            )
        return email, issued

    async def confirm_page(self, request: Request) -> Response:
        self._require_subscribe_page()
        email, _ = await self._check_link(request.path_params["signed"])
        sub = await self.store.find_subscriber(email)
        if sub is None:
            raise HTTPException(404, "This sign-up no longer exists. Sign up again.")
        if sub.status == "active":
            return self.pages.render(
                "confirmed.html", email=email, already=True, title="Subscribed"
            )
        return self.pages.render("confirm.html", email=email, title="Confirm your subscription")

    async def confirm(self, request: Request) -> Response:
        self._require_subscribe_page()
        email, issued = await self._check_link(request.path_params["signed"])
        await self.form(request, ("confirm",))
        source = f"web double opt-in (requested {issued.isoformat(timespec='seconds')})"
        result = await self.store.activate_with_consent(
            email,
            source,
            allowed_from=("pending", "unsubscribed"),
            issued_at=issued,
            now=self.now(),
        )
        if result == "missing":
            raise HTTPException(404, "This sign-up no longer exists. Sign up again.")
        if result == "refused":
            raise HTTPException(410, "This confirmation link can no longer be used. Sign up again.")
        if result == "activated":
            log.info("subscription confirmed", email=email)
        return self.pages.render(
            "confirmed.html", email=email, already=result == "already", title="Subscribed"
        )

    # ------------------------------------------------------------------ errors
    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        title = _STATUS_TITLES.get(exc.status_code, "Error")
        try:
            phrase = HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = ""
        message = "" if exc.detail in (phrase, title) else exc.detail
        if not message:
            message = _STATUS_MESSAGES.get(exc.status_code, "")
        return self.pages.render(
            "message.html",
            status_code=exc.status_code,
            headers=exc.headers,
            title=title,
            message=message,
            code=exc.status_code,
        )


def create_app(
    settings: Settings,
    store: Store,
    *,
    now: Now = utcnow,
    send_confirmation: SendConfirmation | None = None,
) -> Starlette:
    """The ASGI app. ``send_confirmation(email, url)`` mails the double opt-in link (default:
    a small text+HTML mail through ``deliver.make_transport(settings)``)."""
    web = _Web(settings, store, now, send_confirmation)
    csp = (
        "default-src 'none'; "
        f"style-src 'sha256-{web.pages.style_hash}'; "
        "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    headers = (
        ("Content-Security-Policy", csp),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("Cache-Control", "no-store"),
        ("X-Frame-Options", "DENY"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
    )
    routes = [
        Route("/healthz", web.healthz, methods=["GET"]),
        Route("/unsubscribe/{token}", web.unsubscribe_page, methods=["GET"]),
        Route("/unsubscribe/{token}", web.unsubscribe, methods=["POST"]),
        Route("/preferences/{token}", web.preferences_page, methods=["GET"]),
        Route("/preferences/{token}", web.preferences, methods=["POST"]),
        Route("/subscribe", web.subscribe_page, methods=["GET"]),
        Route("/subscribe", web.subscribe, methods=["POST"]),
        Route("/confirm/{signed}", web.confirm_page, methods=["GET"]),
        Route("/confirm/{signed}", web.confirm, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(_SecurityHeaders, headers=headers),
            Middleware(RequestBodyLimitMiddleware, max_body_size=MAX_BODY),
        ],
        exception_handlers={HTTPException: web.http_error},
    )


# ---------------------------------------------------------------------------- serving
class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the daemon owns SIGTERM/SIGINT."""

    @contextmanager
    def capture_signals(self) -> Any:
        yield


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def bind_listener(listen: str) -> socket.socket:
    """A listening TCP socket for ``HOST:PORT``; ConfigError naming the key when it fails."""
    host, port = parse_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise ConfigError(f"http.listen {listen!r}: cannot listen there: {exc}") from None
    sock.setblocking(False)
    return sock


async def serve_app(app: ASGIApp, sock: socket.socket, stop: asyncio.Event) -> None:
    """Serve ``app`` on the already-listening ``sock`` in the current loop until ``stop``."""
    config = uvicorn.Config(
        app,
        lifespan="off",
        http="h11",
        log_config=None,
        access_log=False,  # it would log the secret tokens in the paths
        server_header=False,
        proxy_headers=True,  # X-Forwarded-For from a local reverse proxy (127.0.0.1) only
        timeout_graceful_shutdown=3,
        limit_concurrency=200,
    )
    server = _Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        stopping.cancel()
        await asyncio.shield(serving)
        sock.close()


async def serve_http(settings: Settings, store: Store, stop: asyncio.Event) -> None:
    """Run the web endpoint on ``[http] listen`` in the current event loop until ``stop`` is set.

    It uses its own connection to the store's database file: the store's transactions are
    per connection, so sharing the pipeline's connection would let a web request begin a
    transaction inside a run's.
    """
    # Everything that can fail on configuration fails here, before the first await.
    link_keys(settings)
    _template_dir()
    sock = bind_listener(settings.http.listen)
    try:
        async with Store.open(store.path, migrate=False) as own:
            app = create_app(settings, own)
            log.info("http endpoint listening", listen=settings.http.listen)
            await serve_app(app, sock, stop)
    finally:
        sock.close()
