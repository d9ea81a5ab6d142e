"""Digest shapes rendered once and personalised by slots (render.py ``_Shapes``, issue 6),
and compose.py's cheap per-message headers: the bytes are exactly what the uncached path
gives (whole templates, stdlib header folding) for hostile and varied subscribers, and the
shortcut switches itself off when a template does something it cannot reproduce."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_render_samples import DATE, context, digest, fixture_papers, subscriber

import digestd.compose as compose_module
import digestd.render as render_module
from digestd.errors import RenderError
from digestd.models import Digest, Pick, Preferences, RenderedDigest, Subscriber
from digestd.render import RenderContext, Renderer

ROOT = Path(__file__).resolve().parent.parent

NAMES = [
    "Ada Lovelace",
    "",
    "\"><script>alert(1)</script> & <b>Bob</b> 'quoted'",
    "\u202eevil\u202c \u2067RTL\u2069 مريم العربية",
    "דוד כהן",
    "👩‍💻 Zoë Ünïcode 🇺🇦 家族",
    "x" * 300,
    " ".join(["Longname"] * 40),
    "tab\tnew\nline\r\nname\x00\x1b[31m",
    "Qz0123456789abcdefS2x",  # looks like a slot
]
EMAILS = ["ada@example.org", "o'brien+tag@example.co.uk", "x" * 60 + "@example.org"]
TOKENS = [
    "tK3v9Qx_Lm2Rb8Zs-Wc4Np7Hd1Fg6Jy5Ae0Ut",
    "a" * 16,
    "Z9._~-" * 80,  # 480 characters of every allowed kind
]
PREFS = [
    Preferences(),
    Preferences(keywords=("agents", "video generation"), categories=("cs.LG",)),
    Preferences(keywords=('<b>bold</b> & "q"', "emoji 🤖", "מודל"), authors=("A. <X>",)),
    Preferences(keywords=tuple(f"keyword {i}" for i in range(9))),
]


def uncached_path(renderer: Renderer) -> Renderer:
    """The same renderer with every render shortcut off: whole templates, no shapes."""
    renderer._html_blocks.skeleton = None
    renderer._text_blocks.skeleton = None
    return renderer


def stdlib_header(name: str, value: str | dt.datetime, utf8: bool) -> bytes:
    """compose._header without its fast paths: the policy's header registry and folder."""
    policy = compose_module.POLICY_SMTPUTF8 if utf8 else compose_module.POLICY
    return policy.fold_binary(*policy.header_store_parse(name, value))


@pytest.fixture
def reference(monkeypatch: pytest.MonkeyPatch) -> Iterator[Renderer]:
    """An uncached-path renderer whose headers are folded by the stdlib only; the header
    caches are emptied around it so neither side reuses the other's folding."""

    def render(d: Digest, ctx: RenderContext) -> RenderedDigest:
        with monkeypatch.context() as patch:
            patch.setattr(compose_module, "_header", stdlib_header)
            compose_module._shared_header.cache_clear()
            try:
                return Renderer.render(slow, d, ctx)
            finally:
                compose_module._shared_header.cache_clear()

    slow = uncached_path(Renderer())
    slow.render = render  # type: ignore[method-assign]
    yield slow


def subscribers() -> Iterator[Subscriber]:
    combos = itertools.product(NAMES, EMAILS, TOKENS, PREFS)
    for i, (name, email, token, prefs) in enumerate(combos):
        if i % 3 == 0 or name in ("", NAMES[2], NAMES[9]):
            yield subscriber(id=i, name=name, email=email, token=token, prefs=prefs)


def varied_digests() -> Iterator[Digest]:
    """Digests of 0..60 picks (60 forces the size budget to shorten entries), hostile
    paper text, other reasons, for many subscribers."""
    papers = fixture_papers()
    hostile = tuple(
        dataclasses.replace(p, title=f'"><img src=x onerror=alert(1)> {p.title} & ‮', summary=None)
        for p in papers
    )
    sizes = [1, 3, 10, 17, 20, 5, 8, 60]
    for i, sub in enumerate(subscribers()):
        n = sizes[i % len(sizes)]
        if i % 11 == 5:
            yield digest(n, sub=sub, papers=hostile)
        elif i % 7 == 3:
            picks = tuple(Pick(p, 1.0, ("matches “diffusion”", "*you*")) for p in papers[:4])
            yield Digest(sub, DATE + dt.timedelta(days=i % 3), picks)
        else:
            yield digest(n, sub=sub)


CONTEXTS = [
    context(),
    context(now=dt.datetime(2026, 12, 31, 23, 59, 59, tzinfo=dt.timezone(dt.timedelta(hours=-9)))),
    context(postal_address="", subject_template="{weekday}: {count} papers <b>&</b>"),
    context(from_name="Bücher & Papers", reply_to="reply@example.org", feedback_id="a:b:c"),
]


def test_shapes_give_the_same_bytes_as_the_uncached_path(reference: Renderer) -> None:
    """Hundreds of digests — hostile, RTL, emoji, huge and empty names, tokens of 16 to 480
    characters, four contexts (dates, zones, subjects) — render to exactly the same html,
    text and message bytes through shapes as through whole templates and stdlib headers."""
    fast = Renderer()
    assert fast._shapes is not None
    renders = 0
    for i, d in enumerate(varied_digests()):
        ctx = CONTEXTS[i % len(CONTEXTS)]
        try:
            want = reference.render(d, ctx)
        except RenderError as exc:
            with pytest.raises(RenderError) as got_exc:
                fast.render(d, ctx)
            assert str(got_exc.value) == str(exc)
            continue
        got = fast.render(d, ctx)
        assert got == want, (i, d.subscriber.name, d.subscriber.token, len(d.picks))
        renders += 1
    assert renders > 150
    assert fast._shapes.on, "the self-check switched shapes off: some output differed"
    assert 0 < len(fast._shapes.cache) < renders / 4  # shapes really are shared


def test_shapes_are_used_past_the_self_check() -> None:
    """After the first checked messages, a known shape is filled without any template
    render (the block path is not called)."""
    renderer = Renderer()
    assert renderer._shapes is not None
    for n in (3, 3, 3, 3, 3):
        renderer.render(digest(n), context())
    assert renderer._shapes.checks == 0

    def boom(context: object) -> str:
        raise AssertionError("block path used")

    renderer._html_blocks.render = boom  # type: ignore[method-assign]
    renderer._text_blocks.render = boom  # type: ignore[method-assign]
    sub = subscriber(id=99, name="Other <Reader>", email="other@example.org", token="b" * 40)
    rendered = renderer.render(digest(3, sub=sub), context())
    assert "Hi Other &lt;Reader&gt; —" in rendered.html
    assert "/unsubscribe/" + "b" * 40 in rendered.text


def copy_templates(tmp_path: Path) -> Path:
    target = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", target)
    return target


def test_a_personal_value_through_another_filter_switches_shapes_off(
    tmp_path: Path, reference: Renderer
) -> None:
    """A template that transforms a personal value (``| upper``) cannot be filled from
    slots: the self-check notices, shapes switch off, and the output stays right."""
    templates = copy_templates(tmp_path)
    text = templates / "digest.txt"
    source = text.read_text("utf-8")
    assert "Unsubscribe:        {{ unsubscribe_url }}" in source
    text.write_text(source.replace("{{ unsubscribe_url }}", "{{ unsubscribe_url | upper }}"))
    fast = Renderer(templates)
    slow = uncached_path(Renderer(templates))
    d = digest(4)
    assert fast.render(d, context()) == slow.render(d, context())
    assert fast._shapes is not None and not fast._shapes.on


def test_a_skeleton_reading_entries_never_uses_shapes(tmp_path: Path) -> None:
    """A skeleton that reads ``entries`` outside the loop depends on more than the shape
    key: shapes are off from the start, and the output is the whole template's."""
    templates = copy_templates(tmp_path)
    text = templates / "digest.txt"
    text.write_text(text.read_text("utf-8") + "{{ entries | length }} entries\n", "utf-8")
    fast = Renderer(templates)
    assert fast._shapes is not None and not fast._shapes.on
    for n in (2, 5):
        got = fast.render(digest(n), context())
        assert got == uncached_path(Renderer(templates)).render(digest(n), context())
        assert got.text.endswith(f"{n} entries\n")


def test_shape_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache starts over when it reaches SHAPES_MAX (memory stays flat)."""
    monkeypatch.setattr(render_module, "SHAPES_MAX", 2)
    renderer = Renderer()
    assert renderer._shapes is not None
    for ctx in CONTEXTS:
        renderer.render(digest(3), ctx)
        assert len(renderer._shapes.cache) <= 2


@pytest.mark.parametrize("utf8", [False, True])
def test_fast_headers_fold_like_the_stdlib(utf8: bool) -> None:
    """To, List-Unsubscribe, List-Id and Message-ID folded by compose's fast paths are the
    stdlib's bytes, and bad values fail the same way."""
    values = [
        "Ada <ada@example.org>",
        '"x <!-- y" <a@b.example>',
        "=?utf-8?b?w6nDqQ==?= <e@example.org>",
        "é <é@example.org>",
        "a\nb",
        "x\u2028y",
        "  two  spaces ",
        "",
        ", ".join(f"<https://example.org/unsubscribe/{'t' * i}>" for i in range(1, 30)),
        "<" + "a" * 1200 + ">",
    ]

    def fold(fn: object, name: str, value: str) -> object:
        try:
            return fn(name, value, utf8)  # type: ignore[operator]
        except (ValueError, TypeError) as exc:
            return (type(exc), str(exc))

    for name, value in itertools.product(("To", "List-Unsubscribe", "List-Id"), values):
        assert fold(compose_module._header, name, value) == fold(stdlib_header, name, value)
    for i, domain in enumerate(["example.org", "a" * 70 + ".example.org", "0" * 40 + ".org"]):
        for day in range(3):
            hexdigits = hashlib.sha256(f"{i}{day}".encode()).hexdigest()[:32]
            value = f"<digest.2026-04-2{day}.{hexdigits}@{domain}>"
            got = compose_module._header("Message-ID", value, utf8)
            assert got == stdlib_header("Message-ID", value, utf8), value


def test_encode_parts_is_the_whole_body_encoding() -> None:
    """encode_parts over any split of a body gives _encode_body's bytes (cached runs,
    uncached personal runs, bodies with or without a final line end), and declines
    (None) a CR, a surrogate, an empty body or a body that base64 encodes smaller."""
    bodies = [
        "<p>Hi Ada</p>\n<table>\n  <tr><td>x = 1 </td></tr>\n</table>\n",
        "no final line end\n. \n.\nFrom me\n" + "long " * 60,
        "trailing space \nand tab\t\n" + "=" * 20 + "\n",
        "=" * 200 + "\n",  # base64 is smaller
        "Zoë — “quotes” 👩‍💻 " * 20 + "\n" + "漢字" * 5 + "\n",
    ]
    for body in bodies:
        want = compose_module._encode_body(body)
        for step in (1, 3, 7, 40, len(body)):
            parts = [body[i : i + step] for i in range(0, len(body), step)]
            for _ in range(2):  # the second time from the cache
                got = compose_module.encode_parts(parts)
                assert got == (None if want[0] == "base64" else want), (body[:20], step)
    for bad in ["a\r\nb\n", "x\ud800y\n", "", "漢字かな" * 400 + "\n"]:
        assert compose_module.encode_parts([bad[:3], bad[3:]]) is None, bad[:10]
    assert compose_module._encode_body("漢字かな" * 400 + "\n")[0] == "base64"
