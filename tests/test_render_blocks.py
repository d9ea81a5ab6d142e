"""Entry blocks rendered once and reused (render.py ``_EntryBlocks``, issue 6): the output is
byte for byte what the whole templates give, and the shortcut switches itself off when a
template's loop body needs more than its entry."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from test_render_samples import context, digest, fixture_papers, subscriber

import digestd.render as render_module
from digestd.models import Digest, Pick, RenderedDigest
from digestd.render import Renderer

ROOT = Path(__file__).resolve().parent.parent


def whole_templates_only(renderer: Renderer) -> Renderer:
    """The same renderer with the entry-block shortcut off (the reference)."""
    renderer._html_blocks.skeleton = None
    renderer._text_blocks.skeleton = None
    return renderer


def variety() -> list[Digest]:
    """Digests covering every branch of the entry loop: none, one, many, repeated papers at
    other ranks, different reasons, markup in fields, shortened and title-only entries with
    "N more", non-ASCII names."""
    papers = fixture_papers()
    hostile = tuple(
        dataclasses.replace(p, title=f'"><script>x</script> {p.title} & <b>', summary=None)
        for p in papers
    )
    huge = " ".join(f"token{i % 977}" for i in range(20_000))
    long_abstracts = tuple(dataclasses.replace(p, summary=None, abstract=huge) for p in papers)
    long_titles = tuple(
        dataclasses.replace(p, title=" ".join(["漢字タイトル"] * 60), summary=None) for p in papers
    )
    out = [digest(n) for n in (0, 1, 3, 10, 17, 20)]
    out += [digest(5, papers=hostile), digest(30, papers=long_abstracts)]
    out += [digest(60, papers=long_titles), digest(60)]
    zoe = subscriber(id=8, email="zoe@example.org", name="Zoë Ünïcode — <b>")
    reordered = tuple(reversed(papers))
    out += [digest(8, sub=zoe, papers=reordered), digest(8, sub=zoe)]
    other_reasons = Digest(
        zoe,
        out[0].date,
        tuple(Pick(p, 1.0, ("matches “diffusion”", f"by {p.authors[0]}")) for p in papers[:6]),
    )
    return [*out, other_reasons, out[3], out[2]]  # the last two repeat: blocks come from cache


def test_blocks_are_used_with_the_shipped_templates() -> None:
    """With the shipped templates the shortcut stays on and caches entry blocks."""
    renderer = Renderer()
    for d in variety():
        renderer.render(d, context())
    assert renderer._html_blocks.skeleton is not None
    assert renderer._text_blocks.skeleton is not None
    assert renderer._html_blocks.blocks and renderer._text_blocks.blocks


def test_blocks_give_the_same_bytes_as_the_whole_templates() -> None:
    """Every digest of the variety renders to the same html, text and message bytes with the
    shortcut as with the whole templates (checks past the built-in first-message check)."""
    fast, slow = Renderer(), whole_templates_only(Renderer())
    for d in variety():
        got: RenderedDigest = fast.render(d, context())
        want: RenderedDigest = slow.render(d, context())
        assert got == want, (len(d.picks), d.subscriber.email)
    assert fast._html_blocks.skeleton is not None  # it really was the shortcut


def copy_templates(tmp_path: Path) -> Path:
    target = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", target)
    return target


def test_a_body_that_needs_more_than_its_entry_switches_the_shortcut_off(
    tmp_path: Path,
) -> None:
    """A loop body using a per-subscriber value (here the preferences link) cannot be
    cached per entry: the shortcut turns itself off and the output stays right."""
    templates = copy_templates(tmp_path)
    html = templates / "digest.html"
    source = html.read_text("utf-8")
    marker = '<h2 class="title"'
    assert marker in source
    html.write_text(source.replace(marker, "<i>{{ preferences_url }}</i>" + marker, 1), "utf-8")
    renderer = Renderer(templates)
    d = digest(3)
    first = renderer.render(d, context())
    assert renderer._html_blocks.skeleton is None
    assert first == whole_templates_only(Renderer(templates)).render(d, context())
    assert "/preferences/" in first.html.split('class="card"')[1]


def test_a_template_without_the_entries_loop_renders_whole(tmp_path: Path) -> None:
    """No ``{% for e in entries %}`` in a template: it is simply rendered whole."""
    templates = copy_templates(tmp_path)
    (templates / "digest.txt").write_text("{{ heading }}\n{{ unsubscribe_url }}\n", "utf-8")
    renderer = Renderer(templates)
    rendered = renderer.render(digest(2), context())
    assert renderer._text_blocks.skeleton is None
    assert rendered.text.startswith("Your papers for")


def test_block_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache starts over when it reaches ENTRY_BLOCKS_MAX (memory stays flat)."""
    monkeypatch.setattr(render_module, "ENTRY_BLOCKS_MAX", 5)
    renderer = Renderer()
    for n in (10, 17, 20):
        renderer.render(digest(n), context())
        assert len(renderer._html_blocks.blocks) <= 5
