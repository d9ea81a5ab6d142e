"""Validation of subscriber data, shared by the CLI, the import file and the preference page.

Everything that can reach a mail header or the database passes through here: no control
characters anywhere (CR/LF included), bounded lengths, real IANA timezones, ``HH:MM`` times,
syntactically valid addresses.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from email_validator import EmailNotValidError, validate_email

from .errors import ValidationError
from .models import CADENCES, Cadence, Preferences

MAX_EMAIL = 254
MAX_NAME = 200
MAX_PHRASE = 200
MAX_ITEMS = 100
MAX_PAPERS_LIMIT = 100

_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_CATEGORY = re.compile(r"^[A-Za-z][A-Za-z-]*(\.[A-Za-z][A-Za-z-]*)?$")
_ARXIV_NEW = re.compile(r"^\d{4}\.\d{4,5}$")
_ARXIV_OLD = re.compile(r"^[a-z-]+(\.[A-Z]{2})?/\d{7}$")
_VERSION = re.compile(r"v\d+$")

PREF_FIELDS = (
    "keywords",
    "exclude",
    "categories",
    "authors",
    "seed_papers",
    "max_papers",
    "min_upvotes",
    "timezone",
    "send_at",
    "cadence",
)


def has_control_chars(value: str) -> bool:
    """True when ``value`` holds any control or format-breaking character (CR, LF, NUL, …)."""
    return any(
        unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and ch != "\u200d" for ch in value
    )


def clean_text(value: object, what: str, max_len: int, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{what}: expected text, got {type(value).__name__}")
    if has_control_chars(value):
        raise ValidationError(f"{what}: contains a control character (CR, LF, tab, NUL, …)")
    text = " ".join(value.split())
    if not text and not allow_empty:
        raise ValidationError(f"{what}: must not be empty")
    if len(text) > max_len:
        raise ValidationError(f"{what}: longer than {max_len} characters")
    return text


def normalize_email(value: object) -> str:
    """Return the normalised address or raise ValidationError. No DNS look-ups."""
    text = value if isinstance(value, str) else ""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError("email: must not be empty")
    if has_control_chars(text):
        raise ValidationError("email: contains a control character (CR, LF, tab, NUL, …)")
    if len(text) > MAX_EMAIL:
        raise ValidationError(f"email: longer than {MAX_EMAIL} characters")
    try:
        info = validate_email(text.strip(), check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValidationError(f"email {text.strip()!r}: {exc}") from None
    return str(info.normalized)


def check_timezone(value: object) -> str:
    name = clean_text(value, "timezone", 64)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(f"timezone {name!r}: not an IANA timezone name") from None
    if name not in _zone_names() and name != "UTC":
        raise ValidationError(f"timezone {name!r}: not an IANA timezone name")
    return name


def _zone_names() -> set[str]:
    global _ZONES
    if _ZONES is None:
        _ZONES = available_timezones()
    return _ZONES


_ZONES: set[str] | None = None


def check_hhmm(value: object, what: str = "send_at") -> str:
    text = clean_text(value, what, 5)
    if not _HHMM.match(text):
        raise ValidationError(f"{what} {text!r}: expected a 24-hour time HH:MM, e.g. 07:30")
    return text


def check_cadence(value: object) -> Cadence:
    text = clean_text(value, "cadence", 16)
    for cadence in CADENCES:
        if text == cadence:
            return cadence
    raise ValidationError(f"cadence {text!r}: expected one of {', '.join(CADENCES)}")


def normalize_arxiv_id(value: str) -> str | None:
    """``"arXiv:2511.04570v2"`` → ``"2511.04570"``; None when it is not an arXiv id."""
    text = value.strip()
    for prefix in ("arxiv:", "arXiv:", "https://arxiv.org/abs/", "http://arxiv.org/abs/"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    text = _VERSION.sub("", text)
    if _ARXIV_NEW.match(text) or _ARXIV_OLD.match(text):
        return text
    return None


def _check_int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValidationError(f"{what}: expected a whole number")
    try:
        number = int(value)
    except ValueError:
        raise ValidationError(f"{what} {value!r}: expected a whole number") from None
    if not low <= number <= high:
        raise ValidationError(f"{what} {number}: must be between {low} and {high}")
    return number


def _check_list(value: object, what: str, check: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValidationError(f"{what}: expected a list")
    items = list(value)
    if len(items) > MAX_ITEMS:
        raise ValidationError(f"{what}: more than {MAX_ITEMS} entries")
    out: list[str] = []
    problems: list[str] = []
    for item in items:
        try:
            checked = check(item)
        except ValidationError as exc:
            problems.extend(exc.problems)
            continue
        if checked not in out:
            out.append(checked)
    if problems:
        raise ValidationError(problems)
    return tuple(out)


def _phrase(what: str) -> Any:
    return lambda v: clean_text(v, what, MAX_PHRASE)


def _category(value: object) -> str:
    text = clean_text(value, "category", 40)
    if not _CATEGORY.match(text):
        raise ValidationError(f"category {text!r}: expected an arXiv category such as cs.LG")
    return text


def _seed(value: object) -> str:
    text = clean_text(value, "seed paper", 64)
    arxiv_id = normalize_arxiv_id(text)
    if arxiv_id is None:
        raise ValidationError(f"seed paper {text!r}: expected an arXiv id such as 2511.04570")
    return arxiv_id


def check_preferences(base: Preferences, changes: Mapping[str, object]) -> Preferences:
    """Apply ``changes`` (field name → raw value) to ``base``; every problem is reported."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    checks: dict[str, Any] = {
        "keywords": lambda v: _check_list(v, "keyword", _phrase("keyword")),
        "exclude": lambda v: _check_list(v, "exclude", _phrase("exclude")),
        "categories": lambda v: _check_list(v, "category", _category),
        "authors": lambda v: _check_list(v, "author", _phrase("author")),
        "seed_papers": lambda v: _check_list(v, "seed paper", _seed),
        "max_papers": lambda v: _check_int(v, "max_papers", 1, MAX_PAPERS_LIMIT),
        "min_upvotes": lambda v: None if v is None else _check_int(v, "min_upvotes", 0, 10**6),
        "timezone": lambda v: None if v is None else check_timezone(v),
        "send_at": lambda v: None if v is None else check_hhmm(v),
        "cadence": check_cadence,
    }
    for key, raw in changes.items():
        if key not in checks:
            problems.append(f"{key}: unknown preference")
            continue
        try:
            values[key] = checks[key](raw)
        except ValidationError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ValidationError(problems)
    return replace(base, **values)


def check_name(value: object) -> str:
    return clean_text(value, "name", MAX_NAME, allow_empty=True)
