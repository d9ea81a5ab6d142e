"""1,000 rendered messages from hostile, seeded-random input.

Markup and CR/LF in titles, authors, names and config strings; TeX; emoji; right-to-left
text and bidi overrides; lone surrogates; javascript: links; 20,000-word abstracts;
digests of up to 60 papers. For every message: no injected header, one recipient, CRLF
lines of at most 998 octets, text part first, an encoded HTML part under 90 KB, and no
markup but the template's own.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import pytest
from test_render import TEMPLATE_TAGS
from test_render_samples import (
    DATE,
    collect,
    context,
    encoded_html_size,
    fixture_papers,
    parse,
    parts,
    renderer,
    subscriber,
)

from digestd.models import Digest, Paper, Pick
from digestd.render import HTML_SIZE_BUDGET

MESSAGES = 1_000
EXPECTED_HEADERS = {
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "precedence",
    "auto-submitted",
    "feedback-id",
    "mime-version",
    "content-type",
}
INJECTION = "\r\nBcc: victim@example.com\r\nX-Injected: yes\r\n\r\n<html>owned"
HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "'><svg/onload=alert(1)>",
    "</td></tr></table><a href=javascript:alert(1)>click</a>",
    "<!-- comment --><style>body{display:none}</style>",
    "{{ 7*7 }} {% raw %} ${7*7}",
    "Title" + INJECTION,
    "CR\rLF\nNUL\x00TAB\tVT\x0bFF\x0c",
    r"$\alpha$-Net: \textbf{Bold} $\mathcal{O}(n^2)$ \frac{\frac{\frac{",
    r"\sqrt[\sqrt[\sqrt[\sqrt[\sqrt[\sqrt[\sqrt[\sqrt[\sqrt[\sqrt[x",
    "Emoji 🚀🔥👩‍🔬 and flags 🇫🇷",
    "עברית ימין לשמאל",
    "العربية من اليمين إلى اليسار",
    "Bidi \u202egnp.exe\u202c override \u2066isolate\u2069",
    "Zero\u200bwidth\u200c\u200djoiners\ufeff",
    "Line\u2028separator\u2029paragraph\x85next",
    "Lone surrogate \ud800 here",
    "A" * 3000,
    "ｆｕｌｌｗｉｄｔｈ　ｓｐａｃｅ",
    "=?utf-8?q?encoded=3F?= word",
    'quote " back\\slash',
    "Ελληνικά, кириллица, 中文, 日本語, 한국어",
    "",
]
URLS = [
    "https://huggingface.co/papers/2511.04570",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "data:text/html;base64,PHNjcmlwdD4=",
    'https://x.example/"><script>alert(1)</script>',
    "https://huggingface.co@evil.example/",
    "https://x.example/a\r\nb",
    "//evil.example/x",
    "https://bücher.example/ä?q=1&r=<2>",
    "http://[::1/",
    "https://" + "a" * 3000 + ".example",
    None,
    "",
]


def _words(rng: random.Random, n: int) -> str:
    pool = ["attention", "diffusion", "agent", "$x_i$", "<b>", "🚀", "שלום", "&amp;", "\\emph{a}"]
    return " ".join(rng.choice(pool) for _ in range(n))


def _text(rng: random.Random) -> str:
    parts = [rng.choice(HOSTILE) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.3:
        parts.append(_words(rng, rng.randint(1, 40)))
    return " ".join(parts)


def _paper(rng: random.Random, i: int, huge: list[str]) -> Paper:
    base = fixture_papers()[i % len(fixture_papers())]
    return Paper(
        id=rng.choice([base.id, f"feed:{i}<x>", f"{base.id}-{i}"]),
        title=_text(rng),
        abstract=rng.choice(huge) if rng.random() < 0.3 else _text(rng),
        authors=tuple(_text(rng) for _ in range(rng.choice([0, 1, 3, 4, 5, 40]))),
        url=rng.choice(URLS) or "",
        upvotes=rng.choice([None, 0, 1, 42, 10**12, -5]),
        comments=rng.choice([None, 0, 1, 7, 10**9]),
        categories=tuple(rng.choice(["cs.LG", _text(rng)]) for _ in range(rng.randint(0, 3))),
        summary=rng.choice([None, _text(rng), base.summary]),
        pdf_url=rng.choice(URLS),
        code_url=rng.choice(URLS),
        project_url=rng.choice(URLS),
    )


def _check(data: bytes, expect_to: str, html: str, check_html: Callable[[str], None]) -> None:
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r"), "bare CR or LF"
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    head = data.split(b"\r\n\r\n", 1)[0].decode("ascii")
    names = {m.group(1).lower() for m in re.finditer(r"^([^\s:]+):", head, re.M)}
    assert names <= EXPECTED_HEADERS, names - EXPECTED_HEADERS
    msg = parse(data)
    assert [a.addr_spec for a in msg["To"].addresses] == [expect_to]
    assert [a.addr_spec for a in msg["From"].addresses] == ["papers@example.org"]
    assert len(msg.get_all("Subject") or []) == 1
    _, html_part = parts(msg)
    assert encoded_html_size(msg) < HTML_SIZE_BUDGET
    assert html_part.get_content().replace("\r\n", "\n") == html
    check_html(html)


def _check_html(html: str) -> None:
    found = collect(html)
    assert found.tags <= TEMPLATE_TAGS, found.tags - TEMPLATE_TAGS
    for tag, name, value in found.attrs:
        assert not name.startswith("on"), (tag, name)
        if name == "href":
            assert re.match(r"https?://[^\s\"<>]+$", value), value
    for char in "\u202e\u2066\u2028\x00\ud800":
        assert char not in html


@pytest.mark.slow
def test_thousand_hostile_messages() -> None:
    """1,000 seeded-random hostile digests all render into safe, well-formed messages."""
    rng = random.Random(20261124)
    huge = [_words(rng, 20_000) for _ in range(3)]
    sizes = [0, 1, 2, 5, 10, 20, 60]
    emails = ["ada@example.org", "a.b+tag@sub.example.co.uk", "x@xn--bcher-kva.example"]
    for n in range(MESSAGES):
        count = rng.choice(sizes)
        picks = tuple(
            Pick(_paper(rng, i, huge), float(count - i), tuple(_text(rng) for _ in range(3)))
            for i in range(count)
        )
        address = rng.choice(emails)
        sub = subscriber(id=n, email=address, name=_text(rng))
        ctx = context(
            from_name=_text(rng),
            subject_template=_text(rng) + " {date} {count}",
            postal_address=_text(rng),
            feedback_id=rng.choice(["", _text(rng)]),
            precedence=rng.choice(["bulk", "list", ""]),
        )
        rendered = renderer().render(Digest(sub, DATE, picks), ctx)
        try:
            _check(rendered.message, address, rendered.html, _check_html)
            assert set(rendered.paper_ids) <= {p.paper.id for p in picks}
            assert "\r" not in rendered.text and "\x00" not in rendered.text
        except AssertionError as exc:
            raise AssertionError(f"message {n} (count={count}): {exc}") from exc


def test_escaped_is_what_autoescape_writes() -> None:
    """render.escaped agrees with markupsafe.escape on random mixes of the five special
    characters, entities, non-ASCII and plain text, and on Markup (never escaped twice)."""
    import markupsafe

    from digestd.render import escaped

    rng = random.Random(20261125)
    alphabet = ["a", " ", "&", "<", ">", '"', "'", "&amp;", "日", "\u00a0", "*", "=", ";"]
    for _ in range(5000):
        value = "".join(rng.choices(alphabet, k=rng.randint(0, 20)))
        assert escaped(value) == str(markupsafe.escape(value)), repr(value)
        marked = markupsafe.Markup(value)
        assert escaped(marked) == str(markupsafe.escape(marked)) == value
