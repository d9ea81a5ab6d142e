"""Benchmark: selection for many subscribers over one day's papers.

Usage::

    .venv/bin/python bench/selection.py [--subscribers 100000] [--papers 100]
                                        [--naive-sample 1000] [--seed 1]

The day is built from the recorded real papers in ``tests/fixtures`` (the labelled eval
corpus plus the takara.ai RSS mirror), topped up to ``--papers``; subscribers get mixed,
realistic preferences (keywords drawn Zipf-like from a vocabulary of real topic phrases
plus a long tail of one-off phrases, excludes, categories, followed authors, seed papers,
min_upvotes, max_papers, already-sent histories; 15 % have no interests).

Printed, all measured in this run on one core:

* ``prepare_day`` once (all text normalised and indexed);
* ``select`` for every subscriber: total and per subscriber;
* the naive baseline — normalising every paper for every subscriber, i.e. ``prepare_day``
  + ``select`` per subscriber — on a sample, extrapolated to all subscribers and labelled
  as such; the sample's digests are checked to be identical to the fast path's;
* the ratio, and peak memory (``getrusage`` max RSS).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import resource
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from digestd.models import Digest, Paper, Preferences, Subscriber  # noqa: E402
from digestd.selection import PreparedDay, prepare_day, select  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TARGET_SECONDS = 10.0
DATE = dt.date(2026, 4, 30)

TOPICS = [
    "reinforcement learning",
    "LLM",
    "large language model",
    "diffusion",
    "video generation",
    "agent",
    "mixture of experts",
    "quantization",
    "RLHF",
    "state space model",
    "KV cache",
    "sparse attention",
    "benchmark",
    "multimodal",
    "vision-language model",
    "VLM",
    "RL",
    "speech recognition",
    "world model",
    "distillation",
    "long context",
    "retrieval",
    "in-context learning",
    "chain of thought",
    "reasoning",
    "code generation",
    "robotics",
    "Gaussian splatting",
    "3D reconstruction",
    "video understanding",
    "self-supervised learning",
    "graph neural network",
    "transformer",
    "pre-training",
    "fine-tuning",
    "LoRA",
    "alignment",
    "hallucination",
    "safety",
    "interpretability",
    "sparse autoencoder",
    "optimal transport",
    "federated learning",
    "medical imaging",
    "time series",
    "recommender system",
    "tokenizer",
    "speculative decoding",
    "inference serving",
    "GUI agent",
    "terminal agent",
    "curriculum",
    "data curation",
    "synthetic data",
    "evaluation",
    "image editing",
    "text-to-image",
    "audio",
    "music generation",
    "molecule",
    "protein",
    "weather forecasting",
    "theorem proving",
]
EXCLUDES = ["survey", "benchmark", "medical", "robot", "quantum", "position paper", "dataset"]
CATEGORIES = ["cs.LG", "cs.AI", "cs.CL", "cs.CV", "cs.RO", "stat.ML", "cs", "math.OC", "eess.SY"]
RANDOM_NAMES = [
    "Ada Lovelace",
    "Alan Turing",
    "Grace Hopper",
    "Katherine Johnson",
    "Edsger Dijkstra",
]


def load_papers(count: int) -> tuple[list[Paper], list[Paper]]:
    """The day (``count`` papers) and the rest as the 'seen' corpus."""
    rng = random.Random(7)
    papers: list[Paper] = []
    for item in json.loads((FIXTURES / "eval" / "papers.json").read_text("utf-8")):
        papers.append(
            Paper(
                id=item["id"],
                title=item["title"],
                abstract=item["abstract"],
                authors=tuple(item["authors"]),
                categories=tuple(item["categories"]),
                keywords=tuple(item["keywords"]),
                upvotes=item["upvotes"],
            )
        )
    rss = FIXTURES / "other" / "hf-mirror_takara-tldr_rss_2026-04-30.xml"
    for item in ElementTree.parse(rss).getroot().iter("item"):
        link = item.findtext("link") or ""
        papers.append(
            Paper(
                id=link.rsplit("/", 1)[-1],
                title=item.findtext("title") or "",
                abstract=item.findtext("description") or "",
                authors=(rng.choice(RANDOM_NAMES),),
                categories=tuple(rng.sample(CATEGORIES[:6], 2)),
                upvotes=rng.choice([None, 0, 1, 3, 8, 20, 45]),
            )
        )
    unique: list[Paper] = []
    known: set[str] = set()
    for p in papers:
        if p.id not in known:
            known.add(p.id)
            unique.append(p)
    while len(unique) < count:  # top up with shuffled copies under new ids
        base = unique[len(unique) % 85]
        words = base.abstract.split()
        rng.shuffle(words)
        unique.append(
            Paper(
                id=f"bench:{len(unique)}",
                title=base.title + " II",
                abstract=" ".join(words),
                authors=base.authors,
                categories=base.categories,
                upvotes=base.upvotes,
            )
        )
    return unique[:count], unique[count:]


def make_subscribers(
    n: int, day: list[Paper], corpus: list[Paper], seed: int
) -> list[tuple[Subscriber, frozenset[str], dict[str, Paper]]]:
    rng = random.Random(seed)
    vocabulary = TOPICS + sorted({k for p in day for k in p.keywords})
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(vocabulary))]
    authors = sorted({a for p in day for a in p.authors}) + RANDOM_NAMES
    seed_pool = corpus + day
    out = []
    for i in range(n):
        kind = rng.random()
        keywords: list[str] = []
        categories: list[str] = []
        followed: list[str] = []
        seeds: list[str] = []
        if kind >= 0.15:
            keywords = rng.choices(vocabulary, weights, k=rng.randint(1, 8))
            if rng.random() < 0.2:  # long tail: a phrase nobody else uses
                keywords.append(f"topic {rng.randrange(10**6)} model")
            if rng.random() < 0.3:
                categories = rng.sample(CATEGORIES, rng.randint(1, 3))
            if rng.random() < 0.2:
                followed = rng.sample(authors, rng.randint(1, 3))
            if rng.random() < 0.1:
                seeds = [p.id for p in rng.sample(seed_pool, rng.randint(1, 2))]
        prefs = Preferences(
            keywords=tuple(dict.fromkeys(keywords)),
            exclude=tuple(rng.sample(EXCLUDES, rng.randint(1, 2))) if rng.random() < 0.3 else (),
            categories=tuple(categories),
            authors=tuple(followed),
            seed_papers=tuple(seeds),
            max_papers=rng.choice([5, 8, 10, 10, 10, 15, 20]),
            min_upvotes=rng.choice([1, 5, 10]) if rng.random() < 0.15 else None,
        )
        sent: frozenset[str] = frozenset()
        if rng.random() < 0.5:
            sent = frozenset(p.id for p in rng.sample(seed_pool, rng.randint(0, 30)))
        seed_map = {p.id: p for p in seed_pool if p.id in set(seeds)}
        out.append((Subscriber(id=i, email=f"s{i}@example.org", prefs=prefs), sent, seed_map))
    return out


def fingerprint(digest: Digest) -> tuple[tuple[str, float, tuple[str, ...]], ...]:
    return tuple((p.paper.id, p.score, p.reasons) for p in digest.picks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=100_000)
    parser.add_argument("--papers", type=int, default=100)
    parser.add_argument("--naive-sample", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    papers, seen_corpus = load_papers(args.papers)
    subscribers = make_subscribers(args.subscribers, papers, seen_corpus, args.seed)
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"day: {len(papers)} papers, seen corpus: {len(seen_corpus)} papers, "
        f"subscribers: {len(subscribers):,} (generated; max RSS so far {rss_inputs / 1024:.0f} MiB)"
    )

    start = time.perf_counter()
    day: PreparedDay = prepare_day(papers, seen_corpus)
    prepare_s = time.perf_counter() - start

    fast: dict[int, tuple[tuple[str, float, tuple[str, ...]], ...]] = {}
    sample_ids = set(range(min(args.naive_sample, len(subscribers))))
    picks = 0
    empty = 0
    start = time.perf_counter()
    for subscriber, sent, seeds in subscribers:
        digest = select(day, subscriber, DATE, already_sent=sent, seeds=seeds)
        picks += len(digest.picks)
        empty += not digest.picks
        if subscriber.id in sample_ids:
            fast[subscriber.id] = fingerprint(digest)
    select_s = time.perf_counter() - start
    total_s = prepare_s + select_s

    sample = subscribers[: len(sample_ids)]
    start = time.perf_counter()
    mismatches = 0
    for subscriber, sent, seeds in sample:
        naive_day = prepare_day(papers, seen_corpus)  # every paper normalised again
        digest = select(naive_day, subscriber, DATE, already_sent=sent, seeds=seeds)
        mismatches += fingerprint(digest) != fast[subscriber.id]
    naive_s = time.perf_counter() - start
    naive_per = naive_s / max(len(sample), 1)
    naive_all = naive_per * len(subscribers)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    n = len(subscribers)
    print(f"prepare_day (once):            {prepare_s * 1000:9.1f} ms")
    print(
        f"select, all {n:,} subscribers: {select_s:9.2f} s  "
        f"({select_s / n * 1e6:.1f} µs per subscriber)"
    )
    print(
        f"fast path total:               {total_s:9.2f} s  "
        f"(target < {TARGET_SECONDS:.0f} s: {'MET' if total_s < TARGET_SECONDS else 'MISSED'})"
    )
    print(
        f"naive baseline, measured on {len(sample):,} subscribers: {naive_s:.2f} s "
        f"({naive_per * 1e3:.2f} ms per subscriber)"
    )
    print(f"naive baseline, EXTRAPOLATED to {n:,}: {naive_all:9.1f} s")
    print(
        f"speed-up (naive / fast, per subscriber incl. prepare share): {naive_all / total_s:,.0f}x"
    )
    print(f"sample digests identical to the fast path: {len(sample) - mismatches}/{len(sample)}")
    print(f"picks: {picks:,} total, {picks / n:.1f} per subscriber, {empty:,} empty digests")
    print(f"peak memory (max RSS): {peak:.0f} MiB (inputs alone: {rss_inputs / 1024:.0f} MiB)")
    if mismatches:
        raise SystemExit("fast path and naive baseline disagree")


if __name__ == "__main__":
    main()
