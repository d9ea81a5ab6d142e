"""Inputs for bench/delivery.py: a realistic day of papers and N subscribers with mixed
preferences, loaded into a fresh SQLite store through the Store API."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

from digestd.models import Preferences
from digestd.store import Store

ROOT = Path(__file__).resolve().parent.parent
PAPER_FILES = [
    *sorted((ROOT / "tests" / "fixtures" / "hf").glob("daily_papers_*.json")),
    ROOT / "digestd" / "data" / "sample_papers.json",
]

TOPICS = [
    "reinforcement learning",
    "large language model",
    "LLM",
    "diffusion",
    "video generation",
    "agent",
    "mixture of experts",
    "quantization",
    "state space model",
    "KV cache",
    "multimodal",
    "vision-language model",
    "world model",
    "distillation",
    "long context",
    "retrieval",
    "reasoning",
    "code generation",
    "robotics",
    "3D reconstruction",
    "benchmark",
    "alignment",
    "speech",
    "image editing",
    "text-to-image",
    "tokenizer",
    "speculative decoding",
    "GUI agent",
    "synthetic data",
    "evaluation",
]
EXCLUDES = ["survey", "benchmark", "medical", "robot", "dataset"]
CATEGORIES = ["cs.LG", "cs.AI", "cs.CL", "cs.CV", "cs.RO", "stat.ML"]
ZONES = [None, None, None, "Europe/London", "America/New_York", "Asia/Tokyo", "Europe/Berlin"]


def merged_papers(target: Path) -> int:
    """Every recorded Hugging Face daily_papers item, de-duplicated by paper id, written as
    one daily_papers JSON array (what a ``file`` source reads). Returns the paper count."""
    items: dict[str, object] = {}
    for path in PAPER_FILES:
        for item in json.loads(path.read_text("utf-8")):
            paper_id = item.get("paper", {}).get("id")
            if paper_id and paper_id not in items:
                items[paper_id] = item
    target.write_text(json.dumps(list(items.values()), ensure_ascii=False), "utf-8")
    return len(items)


def paper_vocabulary() -> tuple[list[str], list[str]]:
    """Keywords and author names that occur in the day's papers."""
    keywords: set[str] = set()
    authors: set[str] = set()
    for path in PAPER_FILES:
        for item in json.loads(path.read_text("utf-8")):
            paper = item.get("paper", {})
            keywords.update(k for k in paper.get("ai_keywords") or [] if 3 <= len(k) <= 40)
            authors.update(a["name"] for a in paper.get("authors") or [] if a.get("name"))
    return sorted(keywords), sorted(authors)


def subscribers(n: int, seed: int = 1) -> list[tuple[str, str, Preferences]]:
    """``n`` (email, name, prefs): 15 % with no interests (they get the day's top papers),
    the rest with Zipf-weighted keywords, some categories, followed authors and excludes,
    max_papers from 5 to 20, a few timezones and cadences (all due on a Monday)."""
    rng = random.Random(seed)
    paper_keywords, authors = paper_vocabulary()
    vocabulary = TOPICS + paper_keywords
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(vocabulary))]
    out: list[tuple[str, str, Preferences]] = []
    for i in range(n):
        keywords: list[str] = []
        categories: list[str] = []
        followed: list[str] = []
        if rng.random() >= 0.15:
            keywords = rng.choices(vocabulary, weights, k=rng.randint(1, 6))
            if rng.random() < 0.3:
                categories = rng.sample(CATEGORIES, rng.randint(1, 2))
            if rng.random() < 0.15 and authors:
                followed = rng.sample(authors, rng.randint(1, 2))
        prefs = Preferences(
            keywords=tuple(dict.fromkeys(keywords)),
            exclude=tuple(rng.sample(EXCLUDES, 1)) if rng.random() < 0.2 else (),
            categories=tuple(categories),
            authors=tuple(followed),
            max_papers=rng.choice([5, 8, 10, 10, 10, 15, 20]),
            min_upvotes=rng.choice([1, 5]) if rng.random() < 0.1 else None,
            timezone=rng.choice(ZONES),
            cadence=rng.choice(["daily"] * 8 + ["weekdays", "weekly"]),  # type: ignore[arg-type]
        )
        out.append((f"reader{i:06d}@example.org", f"Reader {i}", prefs))
    return out


def populate(store_path: Path, n: int, seed: int = 1) -> None:
    """A fresh store holding ``n`` generated subscribers (one transaction)."""

    async def go() -> None:
        async with Store.open(store_path) as store:
            await store.add_subscribers_bulk(subscribers(n, seed), consent_source="bench")

    asyncio.run(go())
