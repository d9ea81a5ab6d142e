"""Benchmark: selection + rendering per message, one core, next to the whole-template
reference measured in the same run.

Usage::

    .venv/bin/python bench/render.py [--subscribers 20000] [--warm 20000]
                                     [--reference-sample 1000] [--seed 1]

The day is every recorded Hugging Face paper (bench/_population.py), the subscribers are
the delivery bench's (mixed preferences). After ``--warm`` subscribers (the caches of a
long run), ``--subscribers`` *other* subscribers are selected and rendered as the render
workers do it (``pipeline._select_render``: each message as its SMTP DATA payload).
The reference renders a sample of the same digests with Jinja's whole templates (no entry
blocks, no shapes, no line runs) and checks that every message is byte for byte the
same. Printed: CPU µs per message for both, their ratio, and peak RSS (getrusage).
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _population import merged_papers, subscribers  # noqa: E402

from digestd import pipeline  # noqa: E402
from digestd.compose import message_bytes  # noqa: E402
from digestd.config import load_config  # noqa: E402
from digestd.deliver import wire_checked  # noqa: E402
from digestd.models import RenderedDigest, Subscriber  # noqa: E402
from digestd.render import Renderer  # noqa: E402
from digestd.sources import load_papers_file  # noqa: E402

DATE = dt.date(2026, 11, 23)
NOW = dt.datetime(2026, 11, 23, 7, 0, tzinfo=dt.UTC)
CHUNK = pipeline.RENDER_CHUNK


def engine(directory: Path) -> pipeline.Engine:
    papers = directory / "papers.json"
    merged_papers(papers)
    config = directory / "digestd.toml"
    config.write_text(
        f"""
[digest]
from_address = "papers@example.org"
from_name = "Daily Papers"
base_url = "https://papers.example.org"
postal_address = "1 Example Street, Example City"
[store]
path = "{directory / "bench.sqlite3"}"
[[sources]]
kind = "file"
path = "{papers}"
""",
        "utf-8",
    )
    return pipeline.Engine(load_config(config), load_papers_file(papers), (), NOW)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=20_000)
    parser.add_argument("--warm", type=int, default=20_000)
    parser.add_argument("--reference-sample", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="digestd-bench-render-") as tmp:
        eng = engine(Path(tmp))
        people = [
            Subscriber(id=i + 1, email=email, name=name, prefs=prefs, token=f"{i:032x}")
            for i, (email, name, prefs) in enumerate(
                subscribers(args.warm + args.subscribers, args.seed)
            )
        ]
        items = [(s, frozenset[str](), {}) for s in people]
        start = time.process_time()
        for i in range(0, args.warm, CHUNK):
            pipeline._select_render(eng, items[i : i + CHUNK], DATE, False)
        warm_s = time.process_time() - start

        measured = items[args.warm :]
        sample: list[RenderedDigest] = []  # kept for the reference; the rest is dropped
        messages = 0
        start = time.process_time()
        for i in range(0, len(measured), CHUNK):
            outcomes, _, _ = pipeline._select_render(eng, measured[i : i + CHUNK], DATE, False)
            done = [o for o in outcomes if isinstance(o, RenderedDigest)]
            messages += len(done)
            sample += done[: args.reference_sample - len(sample)]
        fast_s = time.process_time() - start

        # The reference: Jinja's whole templates for every message of a sample.
        whole = Renderer()
        whole._html_blocks.skeleton = whole._text_blocks.skeleton = None
        whole._shapes = None
        by_id = {s.id: s for s in people}
        start = time.process_time()
        reference = []
        for rendered in sample:
            digest, _ = eng.select(by_id[rendered.subscriber_id], DATE, frozenset(), {})
            reference.append(wire_checked(whole.render(digest, eng.ctx).message))
        ref_s = time.process_time() - start
        same = all(r == message_bytes(m.message) for r, m in zip(reference, sample, strict=True))

    n = len(measured)
    fast_us = fast_s / n * 1e6
    ref_us = ref_s / len(sample) * 1e6 if sample else 0.0
    print(f"day: 45 papers; warm-up: {args.warm:,} subscribers in {warm_s:.1f} s CPU")
    print(
        f"select + render (workers' path): {n:,} subscribers, {messages:,} messages,"
        f" {fast_s:.2f} s CPU = {fast_us:.0f} µs per subscriber"
    )
    print(
        f"whole-template reference (same run): {len(sample):,} messages,"
        f" {ref_s:.2f} s CPU = {ref_us:.0f} µs per message"
        f" — {'byte-identical' if same else 'DIFFERENT'}"
    )
    if fast_us:
        print(f"ratio: {ref_us / fast_us:.1f}× faster than the whole templates")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if not same:
        raise SystemExit("the fast path's messages differ from the whole templates'")


if __name__ == "__main__":
    main()
