"""SpamAssassin (Debian's, with the rules it ships; local tests only, Bayes off) scores a
rendered 10-paper digest at most 1.0."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
from pathlib import Path

import pytest
from conftest import require_tool
from test_dkim import Key
from test_render_samples import context, digest, renderer

from digestd.signing import dkim_sign

MAX_SCORE = 1.0


def spamassassin(message: bytes, prefs: Path) -> tuple[float, list[str]]:
    """Run ``spamassassin -L -t`` and return (score, names of the rules that hit)."""
    exe = require_tool("spamassassin")
    result = subprocess.run(
        [exe, "-L", "-t", "-p", str(prefs)],
        input=message,
        capture_output=True,
        check=False,
        timeout=300,
    )
    report = result.stdout.decode("utf-8", "replace")
    match = re.search(r"Content analysis details:\s+\((-?[\d.]+) points", report)
    assert match, f"no SpamAssassin report (exit {result.returncode}): {result.stderr[-2000:]!r}"
    section = report[match.end() :]
    rules = re.findall(r"^\s*(-?[\d.]+)\s+([A-Z0-9_]+)\s", section, re.M)
    return float(match.group(1)), [f"{name} ({points})" for points, name in rules]


@pytest.fixture
def prefs(tmp_path: Path) -> Path:
    path = tmp_path / "user_prefs"
    path.write_text("use_bayes 0\nbayes_auto_learn 0\n")
    return path


@pytest.mark.slow
def test_ten_paper_digest_scores_at_most_one(
    prefs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 10-paper digest dated now (so no DATE_IN_PAST/FUTURE) scores ≤ 1.0."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    message = renderer().render(digest(10), context(now=now)).message
    score, rules = spamassassin(message, prefs)
    with capsys.disabled():
        print(f"\nSpamAssassin score {score}: {', '.join(rules)}")
    assert score <= MAX_SCORE, rules


@pytest.mark.slow
def test_dkim_signed_digest_scores_at_most_one(
    prefs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Signed with DKIM (which -L cannot check against DNS), still ≤ 1.0."""
    key = Key(tmp_path, "rsa-sha256")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    message = renderer().render(digest(10), context(now=now)).message
    signed = dkim_sign(message, domain="example.org", selector="s1", private_key=key.pem)
    score, rules = spamassassin(signed, prefs)
    with capsys.disabled():
        print(f"\nSpamAssassin score (DKIM-signed) {score}: {', '.join(rules)}")
    assert score <= MAX_SCORE, rules


@pytest.mark.slow
def test_spammy_message_scores_high(prefs: Path) -> None:
    """The harness can fail: a classic spam text scores far above the limit."""
    spam = (
        b"From: WINNER <winner@example.com>\r\nTo: you@example.org\r\n"
        b"Subject: FREE MONEY!!! ACT NOW - 100% GUARANTEED\r\n\r\n"
        b"Dear Friend, you have WON $1,000,000!!! Click here to claim your prize. "
        b"Cheap viagra, no prescription. 100% free, risk free, act now! "
        b"Earn money fast from home, work at home, be your own boss. "
        b"This is not spam. To be removed reply REMOVE.\r\n"
    )
    score, rules = spamassassin(spam, prefs)
    assert score > MAX_SCORE, rules
