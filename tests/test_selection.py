"""Selection behaviour (digestd.selection): ranking, floor, diversity, reasons, never twice,
empty reasons, purity, pickling, and hostile inputs."""

from __future__ import annotations

import datetime as dt
import math
import pickle
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any

import pytest

from digestd.models import Paper, Preferences, Subscriber
from digestd.selection import (
    EMPTY_ALL_SENT,
    EMPTY_NO_MATCH,
    EMPTY_NO_PAPERS,
    RELEVANCE_FLOOR,
    SEED_MIN_SIMILARITY,
    PreparedDay,
    empty_reason,
    prepare_day,
    select,
)

DATE = dt.date(2026, 5, 1)


def paper(pid: str, title: str = "", abstract: str = "", **kw: Any) -> Paper:
    return Paper(id=pid, title=title or f"Paper {pid}", abstract=abstract, **kw)


def sub(**prefs: Any) -> Subscriber:
    return Subscriber(id=1, email="r@example.org", prefs=Preferences(**prefs))


def ids(day: PreparedDay, subscriber: Subscriber, **kw: Any) -> list[str]:
    return [p.paper.id for p in select(day, subscriber, DATE, **kw).picks]


# --- ranking ----------------------------------------------------------------------------


def test_title_match_ranks_above_abstract_only_match() -> None:
    """A keyword in the title outranks the same keyword only in the abstract, despite upvotes."""
    day = prepare_day(
        [
            paper("a", "Something else", "We study diffusion models.", upvotes=500),
            paper("t", "Diffusion models at scale", "Nothing more.", upvotes=1),
        ]
    )
    picks = select(day, sub(keywords=("diffusion model",)), DATE).picks
    assert [p.paper.id for p in picks] == ["t", "a"]
    assert picks[0].reasons == ("title matches *diffusion model*",)
    assert picks[1].reasons == ("abstract matches *diffusion model*",)
    assert picks[0].score > picks[1].score


def test_several_interests_rank_above_one() -> None:
    """Two distinct matched interests (even abstract-only) beat a single title match."""
    day = prepare_day(
        [
            paper("one", "Mixture of experts routing", "", upvotes=100),
            paper("two", "A study", "We combine mixture of experts with state space models."),
        ]
    )
    got = ids(day, sub(keywords=("mixture of experts", "state space model")))
    assert got == ["two", "one"]


def test_upvotes_then_id_break_ties() -> None:
    """Equal relevance: more upvotes first, unknown upvotes after zero, then id order."""
    day = prepare_day(
        [
            paper("b", "Graph learning", upvotes=None),
            paper("c", "Graph learning II", upvotes=3),
            paper("a", "Graph learning III", upvotes=None),
            paper("d", "Graph learning IV", upvotes=0),
        ]
    )
    assert ids(day, sub(keywords=("graph",))) == ["c", "d", "a", "b"]


def test_source_keywords_rank_between_title_and_abstract() -> None:
    """A match in the source's keywords scores between a title and an abstract match."""
    day = prepare_day(
        [
            paper("abs", "X", "uses LoRA adapters"),
            paper("kw", "Y", "", keywords=("LoRA",)),
            paper("title", "LoRA for all"),
        ]
    )
    picks = select(day, sub(keywords=("LoRA",)), DATE).picks
    assert [p.paper.id for p in picks] == ["title", "kw", "abs"]
    assert picks[1].reasons == ("keywords include *LoRA*",)


def test_reasons_list_every_matched_interest_strongest_first() -> None:
    """A pick carries one reason per matched interest: title, author, category, abstract."""
    day = prepare_day(
        [
            paper(
                "p",
                "Sparse attention kernels",
                "Long context LLM serving.",
                authors=("Ada K. Lovelace",),
                categories=("cs.LG", "cs.DC"),
            )
        ]
    )
    prefs = {
        "keywords": ("sparse attention", "LLM serving"),
        "authors": ("Ada Lovelace",),
        "categories": ("cs.LG", "cs.DC"),
    }
    (pick,) = select(day, sub(**prefs), DATE).picks
    assert pick.reasons == (
        "title matches *sparse attention*",
        "by *Ada Lovelace*",
        "abstract matches *LLM serving*",
        "in *cs.LG*, *cs.DC*",
    )
    assert pick.score == pytest.approx(1.0 + 1.0 + 0.6 + 0.6)


def test_no_interests_gives_most_upvoted_with_popularity_reason() -> None:
    """Without interests the day's most upvoted papers come first, saying how popular they are."""
    day = prepare_day(
        [
            paper("low", upvotes=2),
            paper("top", upvotes=90),
            paper("one", upvotes=1),
            paper("unknown", upvotes=None),
        ]
    )
    picks = select(day, sub(max_papers=10), DATE).picks
    assert [p.paper.id for p in picks] == ["top", "low", "one", "unknown"]
    assert picks[0].reasons == ("popular today (90 upvotes)",)
    assert picks[2].reasons == ("popular today (1 upvote)",)
    assert picks[3].reasons == ("trending today",)


def test_interests_that_match_nothing_give_nothing_not_filler() -> None:
    """A subscriber with interests gets no popular filler when nothing matches."""
    day = prepare_day([paper("p", "Unrelated", upvotes=1000)])
    assert ids(day, sub(keywords=("quantum chromodynamics",))) == []


# --- floor and diversity ----------------------------------------------------------------


def test_relevance_floor_drops_weak_seed_similarity() -> None:
    """A paper sharing one word with a seed (similarity > 0 but under the floor) is not picked."""
    seed = paper("seed", "Speculative decoding for fast LLM inference", "draft model verify tokens")
    filler = " ".join(f"word{i}" for i in range(60))
    day = prepare_day(
        [
            paper(
                "close", "Faster speculative decoding", "a draft model proposes tokens to verify"
            ),
            paper("far", "Protein folding", f"amino acid structure prediction {filler} draft"),
            paper("none", "Bird migration", "we track birds"),
        ]
    )
    sims = dict(zip((p.id for p in day.papers), day.similarity(seed), strict=True))
    assert sims["close"] >= SEED_MIN_SIMILARITY > sims["far"] > sims["none"] == 0.0
    picks = select(day, sub(seed_papers=("seed",)), DATE, seeds={"seed": seed}).picks
    assert [p.paper.id for p in picks] == ["close"]
    assert picks[0].score >= RELEVANCE_FLOOR
    assert picks[0].reasons == (
        "like your seed paper *Speculative decoding for fast LLM inference*",
    )


def test_diversity_caps_one_interest_while_others_are_available() -> None:
    """With max 4, one interest gets at most ceil(4/2)=2 slots while others have papers."""
    papers = [paper(f"v{i}", f"Video paper {i}", upvotes=100 - i) for i in range(6)]
    papers += [paper(f"g{i}", f"Graph paper {i}", upvotes=10 - i) for i in range(3)]
    day = prepare_day(papers)
    got = ids(day, sub(keywords=("video", "graph"), max_papers=4))
    assert sorted(got) == ["g0", "g1", "v0", "v1"]
    assert got == ["v0", "v1", "g0", "g1"]  # still in rank order


def test_diversity_fills_leftover_slots_when_no_other_interest_remains() -> None:
    """When the other interests run out, the capped interest fills the remaining slots."""
    papers = [paper(f"v{i}", f"Video paper {i}", upvotes=100 - i) for i in range(6)]
    papers += [paper("g0", "Graph paper", upvotes=1)]
    day = prepare_day(papers)
    got = ids(day, sub(keywords=("video", "graph"), max_papers=5))
    assert got == ["v0", "v1", "v2", "v3", "g0"]


@pytest.mark.parametrize("limit", [1, 2, 3, 10])
def test_at_most_max_papers(limit: int) -> None:
    """Never more than max_papers picks, with or without interests."""
    day = prepare_day([paper(f"p{i}", f"Video {i}", upvotes=i) for i in range(20)])
    assert len(ids(day, sub(max_papers=limit))) == limit
    assert len(ids(day, sub(keywords=("video",), max_papers=limit))) == limit
    assert math.ceil(limit / 2) <= limit


# --- filters ------------------------------------------------------------------------------


def test_exclude_removes_a_paper_matched_by_anything() -> None:
    """An exclude phrase removes a paper even if it matched a keyword, author and category."""
    day = prepare_day(
        [paper("s", "A survey of agents", authors=("Ada Lovelace",), categories=("cs.AI",))]
    )
    prefs = {"keywords": ("agent",), "authors": ("Ada Lovelace",), "categories": ("cs.AI",)}
    assert ids(day, sub(**prefs)) == ["s"]
    assert ids(day, sub(exclude=("surveys",), **prefs)) == []


def test_min_upvotes_treats_unknown_as_zero() -> None:
    """min_upvotes removes papers below it; unknown upvotes count as 0."""
    day = prepare_day(
        [
            paper("u", "Agents", upvotes=None),
            paper("z", "Agents 2", upvotes=0),
            paper("h", "Agents 3", upvotes=7),
        ]
    )
    assert sorted(ids(day, sub(keywords=("agent",), min_upvotes=0))) == ["h", "u", "z"]
    assert ids(day, sub(keywords=("agent",), min_upvotes=1)) == ["h"]
    assert ids(day, sub(min_upvotes=7)) == ["h"]


def test_category_archive_prefix_and_exact_codes() -> None:
    """'cs' matches any cs.* (and 'CS' too); 'cs.L' is not a prefix of 'cs.LG'."""
    day = prepare_day(
        [
            paper("lg", categories=("cs.LG",)),
            paper("cv", categories=("cs.CV",)),
            paper("st", categories=("stat.ML",)),
            paper("ap", categories=("astro-ph.GA",)),
        ]
    )
    assert sorted(ids(day, sub(categories=("CS",)))) == ["cv", "lg"]
    assert ids(day, sub(categories=("cs.L",))) == []
    assert ids(day, sub(categories=("Cs.Lg",))) == ["lg"]
    assert ids(day, sub(categories=("astro-ph",))) == ["ap"]


def test_already_sent_is_never_picked_again() -> None:
    """Papers in already_sent never appear, with or without interests."""
    day = prepare_day([paper("a", "Video", upvotes=5), paper("b", "Video 2", upvotes=1)])
    assert ids(day, sub(), already_sent=frozenset({"a"})) == ["b"]
    assert ids(day, sub(keywords=("video",)), already_sent=frozenset({"a", "b"})) == []


def test_duplicate_papers_in_a_day_are_picked_once() -> None:
    """The same paper twice (same id, or same title from a feed) is picked once, arXiv id kept."""
    day = prepare_day(
        [
            paper("feed:abc", "Video Models Rock", upvotes=None),
            paper("2501.00001", "Video models rock", upvotes=5),
            paper("2501.00001", "Video models rock", upvotes=5),
        ]
    )
    assert [p.id for p in day.papers] == ["2501.00001"]
    assert ids(day, sub(keywords=("video",))) == ["2501.00001"]


def test_duplicate_keywords_count_once() -> None:
    """'LLM' and 'llms' are the same interest: one reason, one score share."""
    day = prepare_day([paper("p", "LLM serving")])
    (pick,) = select(day, sub(keywords=("LLM", "llms")), DATE).picks
    assert pick.reasons == ("title matches *LLM*",)
    assert pick.score == pytest.approx(1.0)


def test_missing_seed_ids_are_ignored() -> None:
    """Seed ids absent from ``seeds`` are skipped; the other interests still work."""
    day = prepare_day([paper("p", "Video")])
    got = ids(day, sub(keywords=("video",), seed_papers=("2501.99999",)), seeds={})
    assert got == ["p"]


def test_seen_corpus_changes_term_weights() -> None:
    """Document frequencies come from seen_corpus too: a word common there counts for less."""
    seed = paper("s", "Quasar lensing", "quasar lensing survey")
    papers = [paper("q", "Quasar", "quasar lensing"), paper("o", "Other", "unrelated text")]
    seen = [paper(f"seen{i}", "Quasar", "quasar everywhere") for i in range(50)]
    alone = prepare_day(papers).similarity(seed)[0]
    fitted = prepare_day(papers, seen).similarity(seed)[0]
    assert fitted != alone
    assert len(prepare_day(papers, papers).papers) == 2  # the day is not double-counted


# --- empty digests --------------------------------------------------------------------------


def test_empty_reasons() -> None:
    """empty_reason names why a digest is empty, and is '' when it is not."""
    assert empty_reason(prepare_day([]), sub()) == EMPTY_NO_PAPERS
    assert select(prepare_day([]), sub(), DATE).picks == ()
    day = prepare_day([paper("a", "Video")])
    assert empty_reason(day, sub(keywords=("graph",))) == EMPTY_NO_MATCH
    assert empty_reason(day, sub(keywords=("video",)), already_sent=frozenset({"a"})) == (
        EMPTY_ALL_SENT
    )
    assert empty_reason(day, sub(keywords=("video",))) == ""
    assert empty_reason(day, sub(keywords=("video",), exclude=("video",))) == EMPTY_NO_MATCH


# --- purity, pickling, process pools ----------------------------------------------------------


def _eval_day() -> tuple[PreparedDay, list[Subscriber]]:
    papers = [
        paper(
            f"p{i}",
            f"{topic} study {i}",
            f"We look at {topic} and more.",
            upvotes=i,
            authors=("Ada Lovelace",) if i % 3 == 0 else (),
            categories=("cs.LG",),
        )
        for i, topic in enumerate(["video", "graph", "agents", "diffusion", "RL"] * 4)
    ]
    subscribers = [
        sub(keywords=("video", "RL")),
        sub(authors=("Ada Lovelace",), max_papers=3),
        sub(categories=("cs",), exclude=("graph",)),
        sub(),
    ]
    return prepare_day(papers), subscribers


def test_select_is_repeatable_and_memo_does_not_change_results() -> None:
    """Selecting twice, or on a fresh day, gives identical digests (the memo is invisible)."""
    day, subscribers = _eval_day()
    first = [select(day, s, DATE) for s in subscribers]
    second = [select(day, s, DATE) for s in subscribers]
    fresh = [select(_eval_day()[0], s, DATE) for s in subscribers]
    assert first == second == fresh


def test_prepared_day_pickles_without_its_memo() -> None:
    """A PreparedDay round-trips through pickle (for process pools) and selects the same."""
    day, subscribers = _eval_day()
    before = [select(day, s, DATE) for s in subscribers]  # warms the memo
    clone = pickle.loads(pickle.dumps(day))
    assert clone._memo == {}
    assert [select(clone, s, DATE) for s in subscribers] == before
    assert len(pickle.dumps(day)) == len(pickle.dumps(clone))


def _select_in_worker(args: tuple[PreparedDay, Subscriber]) -> tuple[str, ...]:
    day, subscriber = args
    return tuple(p.paper.id for p in select(day, subscriber, DATE).picks)


def test_select_runs_in_a_process_pool() -> None:
    """select() works on a PreparedDay shipped to a worker process."""
    day, subscribers = _eval_day()
    local = [tuple(p.paper.id for p in select(day, s, DATE).picks) for s in subscribers]
    with ProcessPoolExecutor(max_workers=1) as pool:
        remote = list(pool.map(_select_in_worker, [(day, s) for s in subscribers]))
    assert remote == local


def test_select_does_not_mutate_its_inputs() -> None:
    """Papers, subscriber and already_sent are left untouched."""
    day, subscribers = _eval_day()
    papers_before = day.papers
    sent = {"p0"}
    for s in subscribers:
        before = replace(s)
        select(day, s, DATE, already_sent=sent)
        assert s == before
    assert sent == {"p0"}
    assert day.papers is papers_before


# --- hostile inputs ---------------------------------------------------------------------------


def test_huge_abstract_and_hostile_text() -> None:
    """20,000-word abstracts, emoji, RTL text and empty strings neither crash nor mismatch."""
    huge = " ".join(["filler words here and there"] * 4000) + " mixture of experts"
    day = prepare_day(
        [
            paper("huge", "Long one", huge),
            paper("emoji", "🚀🚀 LLM 🤖", "🔥" * 1000),
            paper("rtl", "نماذج اللغة الكبيرة", "עברית LLM"),
            paper("empty", "", ""),
            paper("blank", "   ", "\u200b"),
        ]
    )
    assert ids(day, sub(keywords=("mixture of experts",))) == ["huge"]
    assert sorted(ids(day, sub(keywords=("LLM",)))) == ["emoji", "rtl"]
    assert ids(day, sub(keywords=("اللغة",))) == ["rtl"]
    assert ids(day, sub(keywords=("🚀",))) == []
    assert len(ids(day, sub(max_papers=10))) == 5


def test_a_hundred_keywords_and_excludes() -> None:
    """100 keywords and 100 excludes (the validation maximum) work and respect excludes."""
    day = prepare_day([paper(f"p{i}", f"topic{i} paper") for i in range(100)])
    keywords = tuple(f"topic{i}" for i in range(100))
    excludes = tuple(f"topic{i}" for i in range(0, 100, 2))
    got = ids(day, sub(keywords=keywords, exclude=excludes, max_papers=100))
    assert sorted(got) == sorted(f"p{i}" for i in range(1, 100, 2))


def test_hostile_phrases_and_names_match_nothing_quietly() -> None:
    """Punctuation-only, emoji-only, control-character and huge phrases/names are harmless."""
    day = prepare_day([paper("p", "Normal paper", "text", authors=("Ada Lovelace",))])
    weird = ("", "   ", "***", "🙂", "\x00", "a" * 10_000, "-", "....")
    assert ids(day, sub(keywords=weird, authors=weird, categories=("...",))) == []
    assert ids(day, sub(exclude=weird)) == ["p"]


def test_seed_with_no_text_is_harmless() -> None:
    """A seed paper with an empty title and abstract matches nothing."""
    day = prepare_day([paper("p", "Video", "video")])
    empty_seed = Paper(id="s", title="", abstract="")
    assert day.similarity(empty_seed) == [0.0]
    assert ids(day, sub(seed_papers=("s",)), seeds={"s": empty_seed}) == []
