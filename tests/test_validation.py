"""Validation of subscriber data shared by CLI, import and the preference page."""

from __future__ import annotations

import pytest

from digestd.errors import ValidationError
from digestd.models import Preferences
from digestd.validation import (
    check_hhmm,
    check_preferences,
    check_timezone,
    normalize_arxiv_id,
    normalize_email,
)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "plain",
        "a@b",
        "a b@example.org",
        "a@example.org\r\nBcc: x@evil.org",
        "a@example.org\n",
        "\x00a@example.org",
        "a" * 300 + "@example.org",
        "@example.org",
        "a@-example.org",
    ],
)
def test_bad_addresses_rejected(bad: str) -> None:
    """Syntax errors, control characters and huge values are refused."""
    with pytest.raises(ValidationError):
        normalize_email(bad)


def test_good_address_normalised() -> None:
    """Domain lower-cased, surrounding space dropped; IDN allowed."""
    assert normalize_email(" Ada@Example.ORG ") == "Ada@example.org"
    assert normalize_email("ada@exämple.org") == "ada@exämple.org"


@pytest.mark.parametrize("tz", ["UTC", "Europe/London", "Asia/Kolkata", "Pacific/Kiritimati"])
def test_timezones_ok(tz: str) -> None:
    """Real IANA names pass."""
    assert check_timezone(tz) == tz


@pytest.mark.parametrize("tz", ["Mars/Base", "../../etc/passwd", "", "Europe/London\n", "x" * 100])
def test_timezones_bad(tz: str) -> None:
    """Anything else, including path tricks, is refused."""
    with pytest.raises(ValidationError):
        check_timezone(tz)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("07:30", True),
        ("00:00", True),
        ("23:59", True),
        ("24:00", False),
        ("7:30", False),
        ("07:60", False),
        ("0730", False),
        ("07:30\n", False),
    ],
)
def test_hhmm(value: str, ok: bool) -> None:
    """Only zero-padded 24-hour HH:MM."""
    if ok:
        assert check_hhmm(value) == value
    else:
        with pytest.raises(ValidationError):
            check_hhmm(value)


def test_preferences_all_problems_reported() -> None:
    """Every bad field is listed, and nothing is applied."""
    with pytest.raises(ValidationError) as info:
        check_preferences(
            Preferences(),
            {
                "keywords": ["ok", "bad\r\nvalue"],
                "max_papers": 0,
                "timezone": "Nowhere/City",
                "cadence": "hourly",
                "categories": ["not a category!"],
                "seed_papers": ["abc"],
            },
        )
    text = " | ".join(info.value.problems)
    for fragment in ("keyword", "max_papers", "timezone", "cadence", "category", "seed paper"):
        assert fragment in text


def test_preferences_applied_and_deduplicated() -> None:
    """Valid values are cleaned (whitespace collapsed, duplicates dropped, versions stripped)."""
    prefs = check_preferences(
        Preferences(),
        {
            "keywords": ["  state   space model ", "state space model"],
            "seed_papers": ["2511.04570v3"],
            "max_papers": "8",
            "min_upvotes": 5,
            "send_at": "07:30",
            "cadence": "weekdays",
        },
    )
    assert prefs.keywords == ("state space model",)
    assert prefs.seed_papers == ("2511.04570",)
    assert (prefs.max_papers, prefs.min_upvotes, prefs.send_at, prefs.cadence) == (
        8,
        5,
        "07:30",
        "weekdays",
    )


def test_too_many_items_refused() -> None:
    """A list of thousands of keywords is refused, not stored."""
    with pytest.raises(ValidationError, match="more than"):
        check_preferences(Preferences(), {"keywords": [f"k{i}" for i in range(5000)]})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2511.04570", "2511.04570"),
        ("arXiv:2511.04570v2", "2511.04570"),
        ("https://arxiv.org/abs/2104.12255v1", "2104.12255"),
        ("hep-th/9901001", "hep-th/9901001"),
        ("abc", None),
        ("1234.5", None),
    ],
)
def test_arxiv_ids(raw: str, expected: str | None) -> None:
    """Ids lose their version suffix and prefixes; non-ids give None."""
    assert normalize_arxiv_id(raw) == expected
