"""Selection: which of the day's papers each subscriber gets, in what order, and why.

PURE: no I/O, no clock, no logging; everything comes in as arguments. Used as::

    day = prepare_day(papers, seen_corpus)           # once per run: all text normalised here
    for subscriber in subscribers:                   # per subscriber: index look-ups only
        digest = select(day, subscriber, date, already_sent=sent_ids, seeds=seed_papers)
        if not digest.picks:
            log.info("digest.empty", reason=empty_reason(day, subscriber, ...))

Rules (spec "Selection semantics", issue 4):

* **Keywords / excludes** match a paper's title, abstract or source keywords with the
  normalisation of :mod:`digestd.textnorm` (case, accents, Unicode forms, hyphen/underscore/
  space, singular/plural, whole words only).
* **Categories** match ``Paper.categories`` ignoring case. A code without a dot is an
  archive and matches all of it: ``cs`` matches ``cs.LG`` and ``cs.CV``; ``astro-ph``
  matches ``astro-ph`` and ``astro-ph.GA``.
* **Authors** match with :func:`digestd.textnorm.names_match` (case, accents, middle
  names and initials ignored; never part of another name).
* **Seed papers**: tf-idf over title (counted three times) + abstract, with document
  frequencies fitted on ``seen_corpus`` ∪ the day; similarity is the cosine between the
  seed's 25 strongest terms and each paper (see :meth:`PreparedDay.similarity`). A
  paper with similarity ≥
  :data:`SEED_MIN_SIMILARITY` to a seed is a candidate. A seed is never recommended as
  "like itself". Seed ids missing from ``seeds`` are ignored.
* **Candidates**: any keyword, category, author or seed match. With no interests set at
  all, every paper is a candidate, ranked by upvotes ("popular today"). A subscriber who
  set interests but matched nothing gets nothing (never filler).
* **Removed**: any exclude match; ``upvotes < min_upvotes`` (unknown upvotes count as 0,
  so they are removed by any ``min_upvotes`` ≥ 1 and kept by ``min_upvotes = 0``);
  anything in ``already_sent`` (version-less ids).
* **Score** = sum over the distinct interests a paper matches of the interest's strength:
  keyword in title 1.0, keyword in source keywords 0.8, keyword in abstract only 0.6,
  followed author 1.0, categories 0.5 (+0.1 per further matching category; all the
  subscriber's categories count as one interest), each seed ``0.42 + similarity`` (max 1.0).
  So a title match beats an abstract-only match, two interests beat one, closer seed
  matches rank higher. Ties: more upvotes first (unknown below 0), then paper id.
* **Relevance floor**: a candidate needs a score of at least :data:`RELEVANCE_FLOOR`; an
  explicit keyword/author/category match always reaches it, a seed match only from
  :data:`SEED_MIN_SIMILARITY` on, so weak "sort of similar" papers never pad the mail.
* **Diversity**: when there are more candidates than ``max_papers``, one interest (the
  strongest one a paper matched) gets at most ``ceil(max_papers / 2)`` slots while papers
  from other interests are available; leftover slots are then filled in rank order.
* **Reasons**: one per matched interest, strongest first: ``title matches *x*``,
  ``keywords include *x*``, ``abstract matches *x*``, ``by *Ada Lovelace*``,
  ``in *cs.LG*``, ``like your seed paper *Title*``; ``popular today (N upvotes)`` for the
  no-interest digest. Phrases and names are shown as the subscriber typed them.

Performance: :func:`prepare_day` tokenises every paper once and builds inverted indexes
(token → bitmask of papers, per field). Per subscriber, each phrase / author / category
set / seed is resolved against the day at most once (memoised on the :class:`PreparedDay`)
and then costs a dict look-up, so selecting for many subscribers is mostly set arithmetic.
:class:`PreparedDay` pickles without its memo, for process pools.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from . import textnorm
from .models import Digest, Paper, Pick, Subscriber
from .textnorm import NameKey, Seq

__all__ = [
    "EMPTY_ALL_SENT",
    "EMPTY_NO_MATCH",
    "EMPTY_NO_PAPERS",
    "RELEVANCE_FLOOR",
    "SEED_MIN_SIMILARITY",
    "PreparedDay",
    "empty_reason",
    "prepare_day",
    "select",
]

TITLE_STRENGTH = 1.0
KEYWORDS_STRENGTH = 0.8
ABSTRACT_STRENGTH = 0.6
AUTHOR_STRENGTH = 1.0
CATEGORY_STRENGTH = 0.5
EXTRA_CATEGORY_STRENGTH = 0.1
RELEVANCE_FLOOR = 0.5
SEED_MIN_SIMILARITY = 0.08
SEED_QUERY_TERMS = 25
SEED_BASE = RELEVANCE_FLOOR - SEED_MIN_SIMILARITY
TITLE_TF_WEIGHT = 3
MAX_SEED_TITLE = 100

EMPTY_NO_PAPERS = "no papers fetched"
EMPTY_NO_MATCH = "no paper matched"
EMPTY_ALL_SENT = "all matching papers already sent"

_FIELD_STRENGTH = (TITLE_STRENGTH, KEYWORDS_STRENGTH, ABSTRACT_STRENGTH)
_FIELD_REASON = ("title matches *{}*", "keywords include *{}*", "abstract matches *{}*")
_EPSILON = 1e-9
_NO_SEEDS: Mapping[str, Paper] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class _Hits:
    """One resolved interest: the papers it matches, with strength and reason per paper."""

    key: str
    strength: dict[int, float]
    reason: dict[int, str]
    keys: dict[int, str] | None = None  # per-paper diversity key (category sets)

    def key_for(self, idx: int) -> str:
        return self.keys[idx] if self.keys is not None else self.key


_NO_HITS = _Hits("", {}, {})


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class PreparedDay:
    """The day's papers, normalised once, with the indexes selection needs.

    Build it with :func:`prepare_day`. ``papers`` holds the day's papers after removing
    duplicates (same id, or same normalised title: the one with an arXiv id is kept).
    """

    __slots__ = (
        "_authors",
        "_categories",
        "_default_idf",
        "_fields",
        "_idf",
        "_ids",
        "_inv",
        "_memo",
        "_pop_order",
        "_pop_rank",
        "_popular",
        "_upvotes",
        "_vectors",
        "papers",
    )

    papers: tuple[Paper, ...]
    _ids: tuple[str, ...]
    _upvotes: tuple[int, ...]  # None -> 0 (for min_upvotes)
    _pop_rank: tuple[int, ...]
    _pop_order: tuple[int, ...]
    _popular: tuple[Pick, ...]
    _fields: tuple[tuple[tuple[Seq, ...], tuple[Seq, ...], tuple[Seq, ...]], ...]
    _inv: tuple[dict[str, int], dict[str, int], dict[str, int]]
    _categories: dict[str, int]  # folded category or archive -> mask
    _authors: dict[str, list[tuple[int, NameKey]]]  # surname -> (paper, name)
    _idf: dict[str, float]
    _default_idf: float
    _vectors: tuple[dict[str, float], ...]
    _memo: dict[tuple[str, Any], Any]

    def __init__(self, papers: Sequence[Paper], seen_corpus: Iterable[Paper] = ()) -> None:
        kept = _dedupe(papers)
        self.papers = tuple(kept)
        self._ids = tuple(p.id for p in kept)
        self._upvotes = tuple(p.upvotes if p.upvotes is not None else 0 for p in kept)
        popularity = [p.upvotes if p.upvotes is not None else -1 for p in kept]
        order = sorted(range(len(kept)), key=lambda i: (-popularity[i], kept[i].id))
        rank = [0] * len(kept)
        for position, idx in enumerate(order):
            rank[idx] = position
        self._pop_order = tuple(order)
        self._pop_rank = tuple(rank)
        self._popular = tuple(_popular_pick(p) for p in kept)

        fields = []
        inv: tuple[dict[str, int], dict[str, int], dict[str, int]] = ({}, {}, {})
        categories: dict[str, int] = {}
        authors: dict[str, list[tuple[int, NameKey]]] = {}
        for idx, paper in enumerate(kept):
            bit = 1 << idx
            title = textnorm.segments(paper.title)
            keywords = tuple(seq for kw in paper.keywords for seq in textnorm.segments(kw))
            abstract = textnorm.segments(paper.abstract)
            fields.append((title, keywords, abstract))
            for index, seqs in zip(inv, (title, keywords, abstract), strict=True):
                for token in {t for seq in seqs for t in seq}:
                    index[token] = index.get(token, 0) | bit
            for category in paper.categories:
                folded = textnorm.fold(category).strip()
                for key in {folded, folded.split(".", 1)[0]}:
                    categories[key] = categories.get(key, 0) | bit
            for author in paper.authors:
                name = textnorm.name_key(author)
                if name is not None:
                    authors.setdefault(name.last, []).append((idx, name))
        self._fields = tuple(fields)
        self._inv = inv
        self._categories = categories
        self._authors = authors
        self._fit_tfidf(kept, seen_corpus)
        self._memo = {}

    # -- pickling (process pools): the memo is rebuilt on demand --------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__ if name != "_memo"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self._memo = {}

    def __len__(self) -> int:
        return len(self.papers)

    def __repr__(self) -> str:
        return f"<PreparedDay papers={len(self.papers)} vocabulary={len(self._idf)}>"

    # -- tf-idf ---------------------------------------------------------------------------

    def _fit_tfidf(self, kept: Sequence[Paper], seen_corpus: Iterable[Paper]) -> None:
        day_ids = set(self._ids)
        df: Counter[str] = Counter()
        docs = 0
        day_counts = [_term_counts(p) for p in kept]
        for counts in day_counts:
            df.update(counts.keys())
            docs += 1
        seen_ids: set[str] = set()
        for paper in seen_corpus:
            if paper.id in day_ids or paper.id in seen_ids:
                continue
            seen_ids.add(paper.id)
            df.update(_term_counts(paper).keys())
            docs += 1
        self._idf = {t: math.log((docs + 1) / (n + 1)) + 1.0 for t, n in df.items()}
        self._default_idf = math.log(docs + 1) + 1.0
        self._vectors = tuple(self._vector(counts) for counts in day_counts)

    def _vector(self, counts: Mapping[str, int]) -> dict[str, float]:
        idf = self._idf
        default = self._default_idf
        vector = {t: (1.0 + math.log(c)) * idf.get(t, default) for t, c in counts.items()}
        norm = math.sqrt(sum(w * w for w in vector.values()))
        return {t: w / norm for t, w in vector.items()} if norm else {}

    def similarity(self, seed: Paper) -> list[float]:
        """Similarity of ``seed`` to each of the day's papers, in order (0 … 1).

        Cosine between the seed's :data:`SEED_QUERY_TERMS` strongest tf-idf terms ("more
        like this" query; rarer words weigh more, words the corpus never saw included, so
        an off-topic seed stays dissimilar) and each paper's full tf-idf vector.
        """
        full = self._vector(_term_counts(seed))
        top = sorted(full.items(), key=lambda tw: (-tw[1], tw[0]))[:SEED_QUERY_TERMS]
        norm = math.sqrt(sum(w * w for _, w in top))
        if not norm:
            return [0.0] * len(self._vectors)
        query = [(t, w / norm) for t, w in top]
        return [sum(w * other.get(t, 0.0) for t, w in query) for other in self._vectors]

    # -- phrase matching ------------------------------------------------------------------

    def _phrase_fields(self, variants: tuple[Seq, ...]) -> dict[int, int]:
        """Paper index -> best field (0 title, 1 keywords, 2 abstract) where the phrase occurs."""
        memo_key = ("fields", variants)
        cached: dict[int, int] | None = self._memo.get(memo_key)
        if cached is not None:
            return cached
        best: dict[int, int] = {}
        for field, index in enumerate(self._inv):
            for variant in variants:
                mask = -1
                for token in variant:
                    mask &= index.get(token, 0)
                    if not mask:
                        break
                if mask <= 0:
                    continue
                for idx in _bits(mask):
                    if idx in best:
                        continue
                    if len(variant) == 1 or any(
                        textnorm.contains(seq, variant) for seq in self._fields[idx][field]
                    ):
                        best[idx] = field
        self._memo[memo_key] = best
        return best

    def keyword_hits(self, phrase: str) -> _Hits:
        memo_key = ("keyword", phrase)
        cached: _Hits | None = self._memo.get(memo_key)
        if cached is not None:
            return cached
        best = self._phrase_fields(textnorm.compile_phrase(phrase))
        reasons = [template.format(phrase) for template in _FIELD_REASON]
        hits = _Hits(
            f"keyword:{phrase}",
            {idx: _FIELD_STRENGTH[field] for idx, field in best.items()},
            {idx: reasons[field] for idx, field in best.items()},
        )
        self._memo[memo_key] = hits
        return hits

    def exclude_mask(self, phrase: str) -> int:
        memo_key = ("exclude", phrase)
        cached: int | None = self._memo.get(memo_key)
        if cached is not None:
            return cached
        mask = 0
        for idx in self._phrase_fields(textnorm.compile_phrase(phrase)):
            mask |= 1 << idx
        self._memo[memo_key] = mask
        return mask

    # -- authors, categories, seeds -------------------------------------------------------

    def author_hits(self, name: str) -> _Hits:
        memo_key = ("author", name)
        cached: _Hits | None = self._memo.get(memo_key)
        if cached is not None:
            return cached
        followed = textnorm.name_key(name)
        hits = _NO_HITS
        if followed is not None:
            matched = {
                idx
                for idx, author in self._authors.get(followed.last, ())
                if textnorm.names_match(followed, author)
            }
            if matched:
                reason = f"by *{name}*"
                hits = _Hits(
                    f"author:{name}",
                    dict.fromkeys(matched, AUTHOR_STRENGTH),
                    dict.fromkeys(matched, reason),
                )
        self._memo[memo_key] = hits
        return hits

    def category_hits(self, codes: Sequence[str]) -> _Hits:
        memo_key = ("categories", tuple(codes))
        cached: _Hits | None = self._memo.get(memo_key)
        if cached is not None:
            return cached
        wanted = [textnorm.fold(c).strip() for c in codes]
        wanted = [c for c in wanted if c]
        mask = 0
        for code in wanted:
            mask |= self._categories.get(code, 0)
        strength: dict[int, float] = {}
        reason: dict[int, str] = {}
        keys: dict[int, str] = {}
        exact = {c for c in wanted if "." in c}
        archives = {c for c in wanted if "." not in c}
        for idx in _bits(mask):
            shown = []
            for category in self.papers[idx].categories:
                folded = textnorm.fold(category).strip()
                wanted_here = (
                    folded in exact or folded in archives or folded.split(".", 1)[0] in archives
                )
                if wanted_here and category not in shown:
                    shown.append(category)
            if not shown:
                continue
            strength[idx] = CATEGORY_STRENGTH + EXTRA_CATEGORY_STRENGTH * (len(shown) - 1)
            reason[idx] = "in " + ", ".join(f"*{c}*" for c in shown)
            keys[idx] = "category:" + textnorm.fold(shown[0])
        hits = _Hits("categories", strength, reason, keys) if strength else _NO_HITS
        self._memo[memo_key] = hits
        return hits

    def seed_hits(self, seed: Paper) -> _Hits:
        memo_key = ("seed", (seed.id, seed.title, seed.abstract))
        cached: _Hits | None = self._memo.get(memo_key)
        if cached is not None:
            return cached
        title = " ".join(seed.title.split()) or seed.id
        if len(title) > MAX_SEED_TITLE:
            title = title[: MAX_SEED_TITLE - 1].rstrip() + "…"
        reason = f"like your seed paper *{title}*"
        strength: dict[int, float] = {}
        for idx, sim in enumerate(self.similarity(seed)):
            if sim >= SEED_MIN_SIMILARITY - _EPSILON and self._ids[idx] != seed.id:
                strength[idx] = min(1.0, SEED_BASE + sim)
        hits = (
            _Hits(f"seed:{seed.id}", strength, dict.fromkeys(strength, reason))
            if strength
            else _NO_HITS
        )
        self._memo[memo_key] = hits
        return hits


def _term_counts(paper: Paper) -> Counter[str]:
    counts = Counter(textnorm.content_tokens(paper.abstract))
    for token in textnorm.content_tokens(paper.title):
        counts[token] += TITLE_TF_WEIGHT
    return counts


def _popular_pick(paper: Paper) -> Pick:
    if paper.upvotes is None:
        return Pick(paper, 0.0, ("trending today",))
    noun = "upvote" if paper.upvotes == 1 else "upvotes"
    return Pick(paper, float(paper.upvotes), (f"popular today ({paper.upvotes} {noun})",))


def _dedupe(papers: Sequence[Paper]) -> list[Paper]:
    """Drop repeated ids, and repeated titles (keeping the copy with an arXiv id)."""
    by_title: dict[Seq, int] = {}
    kept: list[Paper | None] = []
    ids: set[str] = set()
    for paper in papers:
        if paper.id in ids:
            continue
        title = tuple(textnorm.tokens(paper.title))
        if title and title in by_title:
            position = by_title[title]
            previous = kept[position]
            if previous is not None and ":" in previous.id and ":" not in paper.id:
                kept[position] = paper
                ids.add(paper.id)
            continue
        ids.add(paper.id)
        if title:
            by_title[title] = len(kept)
        kept.append(paper)
    return [p for p in kept if p is not None]


def prepare_day(papers: Sequence[Paper], seen_corpus: Iterable[Paper] = ()) -> PreparedDay:
    """Normalise and index the day's papers once per run.

    ``seen_corpus``: papers digestd has seen before (from the store), used only for the
    tf-idf document frequencies; the day's papers are always included.
    """
    return PreparedDay(papers, seen_corpus)


# --- per subscriber ---------------------------------------------------------------------


def _interests(day: PreparedDay, subscriber: Subscriber, seeds: Mapping[str, Paper]) -> list[_Hits]:
    prefs = subscriber.prefs
    out: list[_Hits] = []
    seen_phrases: set[tuple[Seq, ...]] = set()
    for phrase in prefs.keywords:
        compiled = textnorm.compile_phrase(phrase)
        if not compiled or compiled in seen_phrases:
            continue
        seen_phrases.add(compiled)
        hits = day.keyword_hits(phrase)
        if hits.strength:
            out.append(hits)
    for name in prefs.authors:
        hits = day.author_hits(name)
        if hits.strength:
            out.append(hits)
    if prefs.categories:
        hits = day.category_hits(prefs.categories)
        if hits.strength:
            out.append(hits)
    for seed_id in prefs.seed_papers:
        seed = seeds.get(seed_id)
        if seed is not None:
            hits = day.seed_hits(seed)
            if hits.strength:
                out.append(hits)
    return out


def _removed_mask(day: PreparedDay, subscriber: Subscriber) -> int:
    mask = 0
    for phrase in subscriber.prefs.exclude:
        mask |= day.exclude_mask(phrase)
    return mask


def _ranked(
    day: PreparedDay,
    subscriber: Subscriber,
    seeds: Mapping[str, Paper],
    already_sent: AbstractSet[str] | None,
) -> tuple[list[int], dict[int, float], list[_Hits]]:
    """Candidates in rank order (excludes, min_upvotes and — unless None — already_sent applied)."""
    prefs = subscriber.prefs
    removed = _removed_mask(day, subscriber)
    min_upvotes = prefs.min_upvotes
    upvotes = day._upvotes
    ids = day._ids
    sent = already_sent if already_sent is not None else frozenset()
    if not prefs.has_interests:
        order = [
            idx
            for idx in day._pop_order
            if not (removed >> idx) & 1
            and (min_upvotes is None or upvotes[idx] >= min_upvotes)
            and ids[idx] not in sent
        ]
        return order, {}, []
    interests = _interests(day, subscriber, seeds)
    scores: dict[int, float] = {}
    for hits in interests:
        for idx, strength in hits.strength.items():
            scores[idx] = scores.get(idx, 0.0) + strength
    floor = RELEVANCE_FLOOR - _EPSILON
    rank = day._pop_rank
    candidates = [
        idx
        for idx, score in scores.items()
        if score >= floor
        and not (removed >> idx) & 1
        and (min_upvotes is None or upvotes[idx] >= min_upvotes)
        and ids[idx] not in sent
    ]
    candidates.sort(key=lambda i: (-round(scores[i], 6), rank[i]))
    return candidates, scores, interests


def _diverse(ranked: list[int], interests: list[_Hits], limit: int) -> list[int]:
    """Take ``limit`` papers in rank order, at most ceil(limit/2) per strongest interest
    while papers of other interests remain; then fill up in rank order."""
    if len(ranked) <= limit:
        return ranked
    cap = math.ceil(limit / 2)
    counts: dict[str, int] = {}
    chosen: list[int] = []
    deferred: list[int] = []
    for idx in ranked:
        best: _Hits | None = None
        best_strength = -1.0
        for hits in interests:
            strength = hits.strength.get(idx)
            if strength is not None and strength > best_strength:
                best, best_strength = hits, strength
        key = best.key_for(idx) if best is not None else ""
        if counts.get(key, 0) >= cap:
            deferred.append(idx)
            continue
        counts[key] = counts.get(key, 0) + 1
        chosen.append(idx)
        if len(chosen) == limit:
            return chosen
    chosen.extend(deferred[: limit - len(chosen)])
    position = {idx: n for n, idx in enumerate(ranked)}
    chosen.sort(key=position.__getitem__)
    return chosen


def _picks(
    day: PreparedDay,
    subscriber: Subscriber,
    already_sent: AbstractSet[str],
    seeds: Mapping[str, Paper],
) -> tuple[Pick, ...]:
    limit = subscriber.prefs.max_papers
    if not day.papers or limit <= 0:
        return ()
    ranked, scores, interests = _ranked(day, subscriber, seeds, already_sent)
    if not subscriber.prefs.has_interests:  # no interests set: the day's most upvoted papers
        return tuple(day._popular[idx] for idx in ranked[:limit])
    out = []
    papers = day.papers
    for idx in _diverse(ranked, interests, limit):
        reasons = sorted(
            (
                (-hits.strength[idx], n, hits.reason[idx])
                for n, hits in enumerate(interests)
                if idx in hits.strength
            ),
        )
        out.append(Pick(papers[idx], round(scores[idx], 4), tuple(r[2] for r in reasons)))
    return tuple(out)


def select(
    day: PreparedDay,
    subscriber: Subscriber,
    date: dt.date,
    *,
    already_sent: AbstractSet[str] = frozenset(),
    seeds: Mapping[str, Paper] = _NO_SEEDS,
) -> Digest:
    """The subscriber's digest for ``date``: at most ``max_papers`` picks, in email order.

    ``already_sent``: version-less ids of papers this subscriber has already received;
    they are never picked. ``seeds``: the subscriber's seed paper id → Paper (text), ids
    missing from it are ignored.
    """
    return Digest(subscriber, date, _picks(day, subscriber, already_sent, seeds))


def empty_reason(
    day: PreparedDay,
    subscriber: Subscriber,
    *,
    already_sent: AbstractSet[str] = frozenset(),
    seeds: Mapping[str, Paper] = _NO_SEEDS,
) -> str:
    """Why the digest is empty: :data:`EMPTY_NO_PAPERS`, :data:`EMPTY_NO_MATCH` or
    :data:`EMPTY_ALL_SENT`; ``""`` when it is not empty."""
    if not day.papers:
        return EMPTY_NO_PAPERS
    if _ranked(day, subscriber, seeds, already_sent)[0]:
        return ""
    if _ranked(day, subscriber, seeds, None)[0]:
        return EMPTY_ALL_SENT
    return EMPTY_NO_MATCH
