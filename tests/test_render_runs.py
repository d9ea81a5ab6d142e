"""The per-message render path of issue 6 (render.py): entry blocks made once per paper and
rank with the reasons filled in, bodies put together from encoded line runs, the DATA
payload worked out with the message, and the fast word wrap. Each is checked against the
slow path it replaces, byte for byte."""

from __future__ import annotations

import random
import shutil
import textwrap
from pathlib import Path
from typing import Any

from test_render_blocks import variety
from test_render_samples import context, digest, fixture_papers, subscriber
from test_wire import reference_payload

from digestd.compose import (
    DataPayload,
    WireReady,
    as_data_payload,
    message_bytes,
    message_size,
)
from digestd.models import Digest, Paper, Pick
from digestd.render import Renderer, _fill_text

ROOT = Path(__file__).resolve().parent.parent


def parts_path_only(renderer: Renderer) -> Renderer:
    """The same renderer without the line-run path (bodies encoded from joined parts)."""
    assert renderer._shapes is not None
    renderer._shapes.encoded = lambda *args, **kwargs: None  # type: ignore[method-assign]
    return renderer


def many_reasons() -> list[Digest]:
    """Digests whose picks carry reasons with markup, emphasis, non-ASCII and long words,
    repeated so that blocks and filled runs come from the caches."""
    papers = fixture_papers()
    reasons = [
        ("matches *diffusion*",),
        ("matches *a & b* <i>", "by “Zoë”"),
        ("x" * 200, "*one* and *two*", "three", "four", "five"),
        (),
    ]
    out = []
    for i in range(12):
        picks = tuple(
            Pick(p, 1.0, reasons[(i + j) % len(reasons)]) for j, p in enumerate(papers[:8])
        )
        sub = subscriber(id=i + 1, email=f"r{i}@example.org", name=f"Reader {i}")
        out.append(Digest(sub, digest(1).date, picks))
    return out


def dotted_papers() -> tuple[Paper, ...]:
    """Four papers whose titles start lines with "." once wrapped: their bodies need
    dot-stuffing."""
    return tuple(
        type(p)(**{**{f: getattr(p, f) for f in p.__slots__}, "title": "." * 90 + " .x"})
        for p in fixture_papers()[:4]
    )


def test_runs_give_the_same_message_as_the_parts_path() -> None:
    """Every digest (the blocks' variety and many reason mixes), rendered twice so the
    second pass comes from the caches, gives the same message, html and text with line
    runs as without them."""
    fast, slow = Renderer(), parts_path_only(Renderer())
    digests = variety() + many_reasons()
    for d in digests + digests:
        got, want = fast.render(d, context()), slow.render(d, context())
        assert got == want, (len(d.picks), d.subscriber.email)
    assert fast._shapes is not None and fast._shapes.on
    assert fast._html_blocks.by_entry and fast._html_blocks.filled


def test_entry_cache_bound_and_parts_after_lean_renders(monkeypatch: Any) -> None:
    """The cache of entries' runs starts over when full and stays within its bound, and
    an entry first cached for a lean (SMTP) render still gives its text later: the same
    messages, html and text as without line runs."""
    import digestd.render as render_module

    monkeypatch.setattr(render_module, "FILLED_ENTRIES_MAX", 5)
    fast, slow = Renderer(), parts_path_only(Renderer())
    digests = many_reasons()
    for d in digests:
        fast.render(d, context(), parts=False)
    for d in digests + variety():
        assert fast.render(d, context()) == slow.render(d, context())
        assert len(fast._html_blocks.filled) <= 5
        assert len(fast._text_blocks.filled) <= 5
    assert fast._shapes is not None and fast._shapes.on


def test_without_parts_only_the_message_is_made() -> None:
    """parts=False: the same message bytes, and the html and text are not built."""
    fast, slow = Renderer(), Renderer()
    for d in many_reasons() * 2:
        lean = fast.render(d, context(), parts=False)
        full = slow.render(d, context())
        assert lean.message == full.message
    assert lean.html == "" and lean.text == ""


def test_the_message_carries_its_data_payload() -> None:
    """The payload built with the message is what dot-stuffing the whole message gives,
    including bodies with lines that start with "." (a title of dots)."""
    dotted = dotted_papers()
    renderer = Renderer()
    stuffed = 0
    for d in [*variety(), digest(4, papers=dotted), digest(4, papers=dotted)]:
        message = renderer.render(d, context()).message
        assert type(message) is WireReady
        payload = message.payload if message.payload is not None else message + b".\r\n"
        assert (payload, message.size) == reference_payload(message)
        stuffed += message.payload is not None
    assert stuffed, "no message needed stuffing: the test lost its point"


def test_payload_only_is_the_message_as_its_data_payload() -> None:
    """``payload=True`` gives the DataPayload of the very message ``payload=False`` gives
    (stuffed where a line starts with ".", the final dot, the message's size), without the
    message being built: on the blocks' variety, many reason mixes and dotted titles."""
    dotted = dotted_papers()
    lean, whole = Renderer(), Renderer()
    digests = [*variety(), *many_reasons(), digest(4, papers=dotted)]
    stuffed = 0
    for d in digests + digests:
        got = lean.render(d, context(), parts=False, payload=True).message
        message = whole.render(d, context(), parts=False).message
        assert type(got) is DataPayload
        assert got == as_data_payload(message) and got.size == message_size(message)
        assert message_bytes(got) == message
        stuffed += got != message + b".\r\n"
    assert stuffed, "no message needed stuffing: the test lost its point"


def test_reasons_used_another_way_switch_the_pieces_off(tmp_path: Path) -> None:
    """A loop body that shows a reason through another filter (here ``upper``) cannot be
    filled from sentinels: the pieces switch off and the output is still right."""
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    html = templates / "digest.html"
    source = html.read_text("utf-8")
    marker = "{{ r | emphasis_html }}"
    assert marker in source
    html.write_text(source.replace(marker, "{{ r | upper }}", 1), "utf-8")
    renderer = Renderer(templates)
    reference = Renderer(templates)
    reference._html_blocks.skeleton = reference._text_blocks.skeleton = None
    for d in many_reasons():
        assert renderer.render(d, context()) == reference.render(d, context())
    assert renderer._html_blocks.deferrals is None  # pieces off for the HTML part
    assert "MATCHES" in renderer.render(many_reasons()[0], context()).html


def test_fast_wrap_is_textwrap() -> None:
    """_fill_text equals textwrap.fill (no long-word or hyphen breaking) on 20,000 seeded
    random texts, widths and indents, long words and tiny widths included."""
    rng = random.Random(72)
    letters = "abcdefé漢-/.*“"
    for _ in range(20_000):
        words = [
            "".join(rng.choice(letters) for _ in range(rng.choice([1, 2, 3, 5, 8, 20, 80])))
            for _ in range(rng.randint(1, 30))
        ]
        text = " ".join(words)
        width = rng.choice([1, 2, 5, 10, 20, 40, 72, 80])
        indent = rng.choice(["", "   ", " " * 12])
        first = rng.choice([None, "", "  ", "x" * 15])
        want = textwrap.fill(
            text,
            width=width,
            initial_indent=indent if first is None else first,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
        assert _fill_text(text, width, indent, first) == want, (text, width, indent, first)


def test_fast_wrap_leaves_other_text_to_textwrap() -> None:
    """Tabs, runs of spaces, edge spaces and newlines take textwrap's own path."""
    for text in ("a\tb c", "a  b", " a b", "a b ", "a\nb", "a\xa0b " * 30):
        want = textwrap.fill(
            text, width=10, initial_indent="", subsequent_indent="  ",
            break_long_words=False, break_on_hyphens=False,
        )  # fmt: skip
        assert _fill_text(text, 10, "  ", "") == want


def test_messages_survive_the_trip_to_the_sender() -> None:
    """A message pickled in a render worker comes back in the sender equal, with the same
    DATA payload and size, whether only its payload travels or both; a payload that does
    not match its size is refused."""
    import pickle

    import pytest
    from test_wire import HOSTILE, fuzz_inputs

    from digestd.compose import _wire_from_payload
    from digestd.deliver import wire_checked

    rendered = [Renderer().render(d, context()).message for d in variety()]
    for message in [*rendered, *(wire_checked(m) for m in [*HOSTILE, *fuzz_inputs(500)])]:
        back = pickle.loads(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        assert back == message and type(back) is type(message)
        assert getattr(back, "payload", None) == getattr(message, "payload", None)
        assert getattr(back, "size", 0) == getattr(message, "size", 0)
    with pytest.raises(ValueError, match="size"):
        _wire_from_payload(b"a\r\n..b\r\n.\r\n", 99)
