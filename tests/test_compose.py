"""The message bytes: every header, MIME structure, encodings, line lengths, injection."""

from __future__ import annotations

import dataclasses
import datetime as dt
import email
import email.policy
import re

import pytest
from test_render_samples import (
    NOW,
    TOKEN,
    context,
    digest,
    fixture_papers,
    parse,
    parts,
    renderer,
    subscriber,
)

from digestd.compose import MessageHeaders, build_message, encoded_size, header_text
from digestd.errors import RenderError

UNSUB = f"https://digest.example.org/unsubscribe/{TOKEN}"
MAILTO = f"mailto:papers@example.org?subject=unsubscribe-{TOKEN}"


def headers(**changes: object) -> MessageHeaders:
    values: dict[str, object] = {
        "from_address": "papers@example.org",
        "from_name": "Daily Papers",
        "to_address": "ada@example.org",
        "to_name": "Ada",
        "subject": "Your papers",
        "date": NOW,
        "message_id": "<digest.2026-08-21.abc@example.org>",
        "list_id": "digest.example.org",
        "list_name": "Daily Papers",
        "unsubscribe_url": UNSUB,
        "unsubscribe_mailto": MAILTO,
    }
    values.update(changes)
    return MessageHeaders(**values)  # type: ignore[arg-type]


def test_every_header_parses_back() -> None:
    """From, To, Subject, Date, Message-ID, MIME-Version, List-*, Auto-Submitted,
    Precedence, Feedback-ID and Reply-To are all present and exact."""
    rendered = renderer().render(
        digest(10), context(feedback_id="daily:papers:digestd", reply_to="help@example.org")
    )
    msg = parse(rendered.message)
    assert str(msg["From"]) == "Daily Papers <papers@example.org>"
    assert msg["From"].addresses[0].display_name == "Daily Papers"
    assert [a.addr_spec for a in msg["To"].addresses] == ["ada@example.org"]
    assert msg["To"].addresses[0].display_name == "Ada Lovelace"
    assert msg["Subject"] == "Your papers for 21 August 2026" == rendered.subject
    assert msg["Date"].datetime == NOW
    assert msg["Message-ID"] == rendered.message_id
    assert re.fullmatch(r"<digest\.2026-08-21\.[0-9a-f]{32}@example\.org>", rendered.message_id)
    assert msg["MIME-Version"] == "1.0"
    assert msg["List-Id"] == "Daily Papers <digest.example.org>"
    assert msg["List-Unsubscribe"] == f"<{UNSUB}>, <{MAILTO}>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Precedence"] == "bulk"
    assert msg["Feedback-ID"] == "daily:papers:digestd"
    assert str(msg["Reply-To"]) == "help@example.org"
    assert not msg.defects


def test_optional_headers_are_left_out_when_not_configured() -> None:
    """No Precedence when it is "", no Feedback-ID or Reply-To when unset."""
    msg = parse(renderer().render(digest(2), context(precedence="")).message)
    assert msg["Precedence"] is None and msg["Feedback-ID"] is None and msg["Reply-To"] is None


def test_multipart_alternative_text_first_utf8_qp() -> None:
    """multipart/alternative; text/plain then text/html; UTF-8; QP for Latin text;
    both parts decode back to the rendered strings."""
    rendered = renderer().render(digest(10), context())
    text, html = parts(parse(rendered.message))
    for part, expected in ((text, rendered.text), (html, rendered.html)):
        assert part.get_content_charset() == "utf-8"
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
        assert part.get_content().replace("\r\n", "\n") == expected
    assert fixture_papers()[0].title in text.get_content()


def test_mostly_non_latin_content_is_base64() -> None:
    """When base64 is smaller (CJK text), that encoding is chosen, and it decodes back."""
    papers = tuple(
        dataclasses.replace(p, title="深層学習による" * 20, summary="大規模言語モデル" * 40)
        for p in fixture_papers()
    )
    rendered = renderer().render(digest(5, papers=papers), context())
    text, html = parts(parse(rendered.message))
    assert text["Content-Transfer-Encoding"] == "base64"
    assert text.get_content().replace("\r\n", "\n") == rendered.text
    assert html.get_content().replace("\r\n", "\n") == rendered.html


def test_lines_are_crlf_and_at_most_998_octets() -> None:
    """Every line ends in CRLF (no bare CR or LF) and none exceeds 998 octets."""
    data = renderer().render(digest(17), context()).message
    assert b"\r\n" in data
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_long_unsubscribe_token_is_folded_not_encoded() -> None:
    """A long List-Unsubscribe folds between its two URIs and is never RFC 2047-encoded
    (the stdlib folder would do that to a long URL)."""
    token = "T" * 200
    rendered = renderer().render(digest(1, sub=subscriber(token=token)), context())
    raw = rendered.message.split(b"\r\n\r\n", 1)[0].decode("ascii")
    block = re.search(r"^List-Unsubscribe: .*?(?=\r\n\S)", raw, re.M | re.S)
    assert block is not None
    assert "=?" not in block.group(0)
    assert f"https://digest.example.org/unsubscribe/{token}" in block.group(0)
    assert parse(rendered.message)["List-Unsubscribe"] == (
        f"<https://digest.example.org/unsubscribe/{token}>, "
        f"<mailto:papers@example.org?subject=unsubscribe-{token}>"
    )


def test_non_ascii_names_are_encoded_properly() -> None:
    """Non-ASCII display names and list descriptions are RFC 2047-encoded and decode back."""
    rendered = renderer().render(
        digest(2, sub=subscriber(name="Zoë Ångström 😀")),
        context(
            from_name="Papiers du jour — Labo", list_id="Papiers — quotidiens <digest.example.org>"
        ),
    )
    raw_head = rendered.message.split(b"\r\n\r\n", 1)[0]
    assert raw_head.isascii()
    msg = parse(rendered.message)
    assert msg["From"].addresses[0].display_name == "Papiers du jour — Labo"
    assert msg["To"].addresses[0].display_name == "Zoë Ångström 😀"
    assert msg["List-Id"] == "Papiers — quotidiens <digest.example.org>"


def test_specials_in_display_names_are_quoted_not_parsed() -> None:
    """A name that looks like an address list stays one display name."""
    rendered = renderer().render(
        digest(1, sub=subscriber(name='Eve <eve@evil.example>, "x" <y@evil.example>')),
        context(from_name='Dr. "Papers", Inc.'),
    )
    msg = parse(rendered.message)
    assert [a.addr_spec for a in msg["To"].addresses] == ["ada@example.org"]
    assert [a.addr_spec for a in msg["From"].addresses] == ["papers@example.org"]
    assert msg["From"].addresses[0].display_name == 'Dr. "Papers", Inc.'


@pytest.mark.parametrize(
    "field", ["subject", "from_name", "to_name", "list_name", "message_id", "feedback_id"]
)
def test_crlf_in_any_field_cannot_inject_headers(field: str) -> None:
    """CR/LF/NUL/U+2028 in a header field never create a new header line."""
    evil = "x\r\nBcc: victim@example.com\nX-Injected: 1\r\n\r\nbody\x00\u2028y"
    data = build_message(headers(**{field: evil}), text="hi", html="<p>hi</p>")
    msg = parse(data)
    assert msg["Bcc"] is None and msg["X-Injected"] is None
    head = data.split(b"\r\n\r\n", 1)[0]
    assert not re.search(rb"^(Bcc|X-Injected):", head, re.M | re.I)


def test_crlf_in_subscriber_and_paper_fields_cannot_inject_headers() -> None:
    """Hostile subscriber name and paper title through the full renderer: same guarantee."""
    evil = "Ada\r\nBcc: victim@example.com\r\nX-Injected: yes"
    paper = dataclasses.replace(fixture_papers()[0], title=evil)
    dig = digest(1, sub=subscriber(name=evil), papers=(paper,))
    rendered = renderer().render(dig, context(from_name=evil, subject_template=evil + " {date}"))
    msg = parse(rendered.message)
    assert msg["Bcc"] is None and msg["X-Injected"] is None
    assert "\n" not in msg["Subject"] and "\r" not in msg["Subject"]
    assert [a.addr_spec for a in msg["To"].addresses] == ["ada@example.org"]


def test_unsafe_unsubscribe_uri_is_rejected() -> None:
    """A URI with spaces or angle brackets can't be put in List-Unsubscribe."""
    with pytest.raises(RenderError, match="unsubscribe"):
        build_message(headers(unsubscribe_url="https://x.example/a b"), text="t", html="h")
    with pytest.raises(RenderError, match="unsubscribe"):
        build_message(headers(unsubscribe_url="https://x.example/>"), text="t", html="h")


def test_naive_date_is_rejected() -> None:
    """The Date header needs an aware datetime."""
    with pytest.raises(RenderError, match="timezone-aware"):
        build_message(headers(date=dt.datetime(2026, 1, 1)), text="t", html="h")


def test_idn_domain_becomes_punycode_and_utf8_local_part_uses_smtputf8() -> None:
    """IDN domains are IDNA-encoded; a non-ASCII local part gets an SMTPUTF8 message."""
    data = build_message(headers(to_address="ada@bücher.example"), text="t", html="h")
    assert [a.addr_spec for a in parse(data)["To"].addresses] == ["ada@xn--bcher-kva.example"]
    data = build_message(headers(to_address="josé@example.org"), text="t", html="h")
    assert "josé@example.org".encode() in data
    msg = email.message_from_string(data.decode("utf-8"), policy=email.policy.SMTPUTF8)
    assert [a.addr_spec for a in msg["To"].addresses] == ["josé@example.org"]


def test_boundary_is_deterministic_and_cannot_occur_in_bodies() -> None:
    """The boundary starts with "=_" (impossible in QP/base64) and is stable per message."""
    first = build_message(headers(), text="t", html="h")
    again = build_message(headers(), text="t", html="h")
    assert first == again
    assert b'boundary="=_digestd_' in first


def test_encoded_size_matches_the_real_encoding() -> None:
    """The size estimate used by the budget search is the real encoded size."""
    rendered = renderer().render(digest(10), context())
    _, html = parts(parse(rendered.message))
    payload = html.get_payload()
    assert isinstance(payload, str)
    assert encoded_size(rendered.html) == len(payload.replace("\r\n", "\n").replace("\n", "\r\n"))


def test_header_text_strips_controls_and_bounds_length() -> None:
    """header_text removes control/format characters and cuts long values."""
    assert header_text("a\r\nb\tc\x00d\u202ee\u2028f") == "a b cde f"
    assert header_text("x" * 600, 10) == "x" * 9 + "…"


def test_strip_controls_fast_path_never_skips_a_control() -> None:
    """The printable shortcut is exact: every character the control patterns match is one
    that str.isprintable() refuses, over all of Unicode."""
    from digestd.compose import _controls

    spaces, others = _controls()
    matched = [
        code for code in range(0x110000) if spaces.match(chr(code)) or others.match(chr(code))
    ]
    assert len(matched) > 2000  # Cc, Cf, Zl, Zp and the surrogates
    assert not [code for code in matched if chr(code).isprintable()]


def test_strip_controls_matches_the_regex_path_on_random_text() -> None:
    """Random mixes of letters, spaces, controls, format characters, ZWJ and surrogates:
    the result is what the two regex passes give."""
    import random

    from digestd.compose import _controls, strip_controls

    spaces, others = _controls()
    alphabet = "aZ 9é日\t\n\r\x0b\x00\x1f\x7f\x85\u00ad\u200b\u200c\u200d\u2028\u2029\ufeff\ud800"
    rng = random.Random(20261125)
    for _ in range(5000):
        value = "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
        assert strip_controls(value) == others.sub("", spaces.sub(" ", value)), repr(value)
    assert strip_controls("Reader 7 <r@example.org>") == "Reader 7 <r@example.org>"
    assert strip_controls("a\u200db") == "a\u200db"  # ZWJ is kept
    assert strip_controls("a\u2028b\u00adc") == "a bc"


def test_segment_of_a_run_equals_its_lines_encoded_one_by_one() -> None:
    """``segment(text, keep=False)`` encodes a run in one call; that is exactly the lines
    encoded one by one (as the cached path does) and joined, on hostile random runs:
    trailing blanks, "=", dots, control and non-ASCII characters, lines around the 76-octet
    soft-break limit, and an unterminated last line."""
    import binascii
    import random

    from test_wire import reference_payload

    from digestd.compose import segment

    def reference(text: str) -> tuple[bytes, int, int]:
        data = text.encode("utf-8")
        lines = data.split(b"\n")
        if text.endswith("\n"):
            lines.pop()
        qp = b"".join(binascii.b2a_qp(line + b"\n", istext=True) for line in lines)
        return qp.replace(b"\n", b"\r\n"), len(data), data.count(b"\n")

    pieces = [" ", "\t", "=", ".", "a", "é", "—", "😀", "\n", "\n", " \n", "=\n", "\x00", "\x7f"]
    pieces += ["y" * n for n in (70, 73, 74, 75, 76, 77)]
    rng = random.Random(20261125)
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 30)))
        got = segment(text, False)
        assert got is not None
        assert got[:3] == reference(text), repr(text)
        stuffed = reference_payload(got[0])[0][: -len(b".\r\n")]
        assert got[3] == (None if stuffed == got[0] else stuffed), repr(text)
