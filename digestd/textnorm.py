"""Text normalisation for matching subscriber phrases and names against papers.

Everything here is pure and deterministic. The rules (the spec's "Selection semantics"):

* **Unicode forms and accents** are ignored: text goes through NFKD (so full-width letters,
  ligatures and superscripts become plain ones), non-spacing marks are dropped
  (``é`` → ``e``, ``ö`` → ``o``) and a few letters that do not decompose are spelled out
  (``ø`` → ``o``, ``æ`` → ``ae``, ``ł`` → ``l``, ``ß`` → ``ss`` …). Soft hyphens and
  zero-width characters are removed.
* **Case** is ignored (``str.casefold``).
* **Words** are runs of letters and digits; everything else separates words. So hyphens,
  underscores and spaces are equivalent (``State-Space`` = ``state_space`` =
  ``state space``), and matching is whole-word only (``RL`` never matches ``IntRL``).
  Additionally, a hyphen/underscore compound also counts as one joined word
  (``pre-training`` also reads as ``pretraining``), and a multi-word phrase also matches
  its words written together (``state space model`` matches ``StateSpaceModel``).
* **Phrases do not cross punctuation**: text is cut into segments at ``, ; : ! ? ( ) [ ] { }``,
  quotes, and a full stop followed by a space, so ``…learning. Models…`` does not match
  ``learning models``.
* **Singular and plural** are equivalent: every word is reduced to a singular form by
  :func:`singular` (``models`` → ``model``, ``policies`` → ``policy``, ``patches`` →
  ``patch``, ``LLMs``/``LMs`` → ``llm``/``lm``, ``indices`` → ``index``), leaving words
  that only look plural alone (``bias``, ``analysis``, ``corpus``, ``news``, ``physics``).
  Words of three letters or fewer are left alone unless they are an acronym plural
  (``IDs``, ``LMs``). Applying it to every word (not only the last one) makes matching
  symmetric; it is a superset of "the last word of a phrase".
* **Possessives** are dropped (``Bayes's`` → ``bayes``, ``LLM's`` → ``llm``) and other
  apostrophes join their word (``don't`` → ``dont``).

Author names (:func:`name_key`, :func:`names_match`) ignore case, accents and middle
names/initials; see :func:`names_match`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "STOPWORDS",
    "NameKey",
    "Seq",
    "compile_phrase",
    "contains",
    "content_tokens",
    "fold",
    "name_key",
    "names_match",
    "prefold",
    "segments",
    "singular",
    "tokens",
]

# Letters that NFKD does not decompose into a base letter + mark.
_SPECIAL = str.maketrans(
    {
        "ø": "o",
        "Ø": "O",
        "æ": "ae",
        "Æ": "AE",
        "œ": "oe",
        "Œ": "OE",
        "ł": "l",
        "Ł": "L",
        "đ": "d",
        "Đ": "D",
        "ð": "d",
        "Ð": "D",
        "þ": "th",
        "Þ": "Th",
        "ı": "i",
        "ß": "ss",
        "ẞ": "SS",
        "ħ": "h",
        "Ħ": "H",
        "ŧ": "t",
        "Ŧ": "T",
        # invisible characters that must not split or glue words differently
        "\u00ad": None,  # soft hyphen
        "\u200b": None,  # zero-width space
        "\u200c": None,  # zero-width non-joiner
        "\u200d": None,  # zero-width joiner
        "\u2060": None,  # word joiner
        "\ufeff": None,  # byte-order mark / zero-width no-break space
    }
)

# Possessive 's (straight, curly and modifier apostrophes) and other in-word apostrophes.
_POSSESSIVE = re.compile(r"(?<=[^\W_])['\u2019\u02bc]s\b")
_APOSTROPHE = re.compile(r"(?<=[^\W_])['\u2019\u02bc](?=[^\W_])")
# Where phrases stop: list/clause punctuation, brackets, quotes, or ". " (sentence end).
_BREAK = re.compile(r"""[,;:!?()\[\]{}<>"\u201c\u201d\u00ab\u00bb|\u2022\u2026]|\.(?=\s|$)""")
_WORD = re.compile(r"[^\W_]+")
# The characters that glue a compound (after NFKD, the minus/dash forms stay distinct).
_JOINER = re.compile(r"[-_\u2010-\u2015\u2212\u2043\ufe58\ufe63\uff0d]+")


def prefold(text: str) -> str:
    """Accent-strip and compatibility-normalise ``text``, keeping case (for acronyms)."""
    if not text.isascii():
        text = unicodedata.normalize("NFKD", text)
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        text = text.translate(_SPECIAL)
    if "'" in text or "\u2019" in text or "\u02bc" in text:
        text = _POSSESSIVE.sub("", text)
        text = _APOSTROPHE.sub("", text)
    return text


def fold(text: str) -> str:
    """Case-, accent- and Unicode-form-insensitive form of ``text`` (spacing kept as is)."""
    return prefold(text).casefold()


# --- singular / plural --------------------------------------------------------------------

_IRREGULAR: dict[str, str] = {
    # Latin and Greek plurals common in papers
    "indices": "index",
    "matrices": "matrix",
    "vertices": "vertex",
    "appendices": "appendix",
    "simplices": "simplex",
    "analyses": "analysis",
    "hypotheses": "hypothesis",
    "syntheses": "synthesis",
    "diagnoses": "diagnosis",
    "theses": "thesis",
    "crises": "crisis",
    "parentheses": "parenthesis",
    "axes": "axis",
    "criteria": "criterion",
    "phenomena": "phenomenon",
    "automata": "automaton",
    "polyhedra": "polyhedron",
    "optima": "optimum",
    "maxima": "maximum",
    "minima": "minimum",
    "extrema": "extremum",
    "spectra": "spectrum",
    "curricula": "curriculum",
    "corpora": "corpus",
    "radii": "radius",
    "nuclei": "nucleus",
    "stimuli": "stimulus",
    "foci": "focus",
    "loci": "locus",
    "formulae": "formula",
    "children": "child",
    "mice": "mouse",
    # -es after a vowel/-us/-as where plain "-s" stripping would go wrong
    "biases": "bias",
    "aliases": "alias",
    "atlases": "atlas",
    "canvases": "canvas",
    "gases": "gas",
    "lenses": "lens",
    "viruses": "virus",
    "statuses": "status",
    "bonuses": "bonus",
    "focuses": "focus",
    "corpuses": "corpus",
    "buses": "bus",
    "campuses": "campus",
    "censuses": "census",
    "consensuses": "consensus",
    "heroes": "hero",
    "potatoes": "potato",
    "tomatoes": "tomato",
    "echoes": "echo",
    "vetoes": "veto",
    "torpedoes": "torpedo",
    "volcanoes": "volcano",
    # -ches / -ies that are really -che / -ie + s
    "niches": "niche",
    "avalanches": "avalanche",
    "moustaches": "moustache",
    "movies": "movie",
    "cookies": "cookie",
    "zombies": "zombie",
    "rookies": "rookie",
    "selfies": "selfie",
    "calories": "calorie",
    "genies": "genie",
    "goalies": "goalie",
    "smoothies": "smoothie",
    "brownies": "brownie",
    "newbies": "newbie",
    "freebies": "freebie",
}


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Words that end in "s" but are not plurals (or whose "singular" would mean something else).
_INVARIANT = _wordset(
    """
    news series species means always perhaps whereas thus towards lens bias alias atlas canvas
    chaos ethos pathos kudos cosmos thermos pancreas yes its has was does goes this plus less
    across various pandas sometimes besides anyways afterwards physics mathematics economics
    ethics linguistics robotics genomics proteomics metabolomics transcriptomics electronics
    optics photonics politics logistics semantics pragmatics phonetics acoustics dynamics
    thermodynamics kinematics informatics bioinformatics mechanics analytics graphics haptics
    forensics statistics athletics aerodynamics hydrodynamics electrodynamics cybernetics
    """
)


@lru_cache(maxsize=1 << 17)
def singular(word: str) -> str:
    """Lower-cased singular form of one word (``word`` may keep its case, for acronyms).

    ``LLMs`` → ``llm``, ``IDs`` → ``id``, ``models`` → ``model``, ``policies`` → ``policy``,
    ``patches`` → ``patch``, ``boxes`` → ``box``, ``caches`` → ``cache``, ``bias`` → ``bias``.
    Words with digits or non-ASCII letters are only lower-cased.
    """
    low = word.casefold()
    if not (low.isascii() and low.isalpha()):
        return low
    # Acronym plural: at least two capitals then a lower-case "s" (LLMs, LMs, IDs, GPUs).
    if len(word) >= 3 and word[-1] == "s" and word[:-1].isupper():
        return low[:-1]
    irregular = _IRREGULAR.get(low)
    if irregular is not None:
        return irregular
    if len(low) < 4 or low in _INVARIANT or low[-1] != "s":
        return low
    if low.endswith(("ss", "us", "is")):
        return low
    if low.endswith("ies"):
        return low[:-3] + "y" if len(low) > 4 else low[:-1]
    if low.endswith(("caches", "headaches")) or low == "aches":  # cache + s, not cach + es
        return low[:-1]
    if low.endswith(("sses", "xes", "ches", "shes")):
        return low[:-2]
    return low[:-1]


# --- segments and tokens ------------------------------------------------------------------

Seq = tuple[str, ...]


def _segment_streams(segment: str) -> tuple[Seq, Seq | None]:
    """Tokens of one segment, and (when it has hyphen compounds) the joined stream."""
    words: list[str] = []
    joined: list[str] = []
    compound: list[str] = []
    has_join = False
    prev_end = -1
    for match in _WORD.finditer(segment):
        raw = match.group()
        words.append(singular(raw))
        if prev_end >= 0 and _JOINER.fullmatch(segment, prev_end, match.start()):
            compound.append(raw)
            has_join = True
        else:
            if compound:
                joined.append(singular("".join(compound)))
            compound = [raw]
        prev_end = match.end()
    if not has_join:
        return tuple(words), None
    joined.append(singular("".join(compound)))
    return tuple(words), tuple(joined)


def segments(text: str) -> tuple[Seq, ...]:
    """The token sequences a phrase may match in ``text``.

    One sequence per punctuation-delimited segment, plus, for segments with hyphen or
    underscore compounds, the same segment with each compound joined into one word.
    Tokens are folded and singular (see the module docstring).
    """
    if not text:
        return ()
    out: list[Seq] = []
    for part in _BREAK.split(prefold(text)):
        words, joined = _segment_streams(part)
        if words:
            out.append(words)
            if joined is not None and joined != words:
                out.append(joined)
    return tuple(out)


def tokens(text: str) -> list[str]:
    """All folded, singular word tokens of ``text`` in order (hyphens split words)."""
    return [singular(m.group()) for m in _WORD.finditer(prefold(text))]


@lru_cache(maxsize=1 << 16)
def compile_phrase(phrase: str) -> tuple[Seq, ...]:
    """The token sequences that count as an occurrence of ``phrase`` (empty: matches nothing).

    ``"State-Space Models"`` → ``(("state", "space", "model"), ("statespace", "model"),
    ("statespacemodel",))``. Punctuation inside a phrase is treated like a space.
    """
    text = prefold(phrase)
    words, joined = _segment_streams(_BREAK.sub(" ", text))
    if not words:
        return ()
    variants: list[Seq] = [words]
    if joined is not None and joined not in variants:
        variants.append(joined)
    if len(words) > 1:
        whole = ("".join(words),)
        if whole not in variants:
            variants.append(whole)
    return tuple(variants)


def contains(sequence: Seq, phrase: Seq) -> bool:
    """True when ``phrase`` occurs contiguously in ``sequence``."""
    n = len(phrase)
    if n == 1:
        return phrase[0] in sequence
    first = phrase[0]
    start = 0
    last_start = len(sequence) - n
    while start <= last_start:
        try:
            i = sequence.index(first, start, last_start + 1)
        except ValueError:
            return False
        if sequence[i : i + n] == phrase:
            return True
        start = i + 1
    return False


# --- similarity tokens --------------------------------------------------------------------

# Compared after singular(), so stored in that form ("shows" -> "show", "ourselves" -> ...).
STOPWORDS = frozenset(
    singular(word)
    for word in _wordset(
        """
    a about above after again against all also am an and any are aren as at be because been
    before being below between both but by can cannot could did do doe doing don down during
    each few for from further had has have having he her here hers herself him himself his how
    i if in into is it its itself just let me more most my myself no nor not now of off on once
    only or other ought our ours ourselves out over own same she should so some such than that
    the their theirs them themselves then there these they this those through to too under
    until up upon very via was we were what when where which while who whom why will with
    within without would you your yours yourself yourselves
    et al e g ie eg etc thus however therefore moreover furthermore although though yet whether
    may might must shall one two three first second new novel propose proposed present
    introduce paper work show shows shown demonstrate result achieve achieves using use used
    based approach method well across like even many much often well make makes made
    """
    )
)


def content_tokens(text: str) -> list[str]:
    """Tokens for tf-idf similarity: :func:`tokens` minus stop words, numbers, 1-letter words."""
    return [t for t in tokens(text) if len(t) > 1 and t not in STOPWORDS and not t.isdigit()]


# --- author names ---------------------------------------------------------------------------

_PARTICLES = _wordset(
    "van von der den de del della di da du dos das le la lo ter ten bin ibn al el st"
)
_SUFFIXES = _wordset("jr sr ii iii iv phd md")
_NAME_SPLIT = re.compile(r"[\s.,]+")
_NAME_GLUE = re.compile(r"[^\w]|_")


@dataclass(frozen=True, slots=True)
class NameKey:
    """A person's name reduced for matching: surname, and given names (may be initials)."""

    last: str
    given: tuple[str, ...]


def name_key(name: str) -> NameKey | None:
    """Reduce a name to its :class:`NameKey`; None when it has no letters.

    ``"Adá K. Lovelace"`` → ``NameKey("lovelace", ("ada", "k"))``; ``"Lovelace, Ada"`` is
    read as ``"Ada Lovelace"``; hyphenated names stay one word (``Schmidt-Hieber`` →
    ``schmidthieber``); particles stay with the surname (``van der Berg`` →
    ``vanderberg``); ``Jr.``/``III`` are dropped.
    """
    text = fold(name)
    if text.count(",") == 1:
        surname, _, given = text.partition(",")
        if given.strip().strip(".") not in _SUFFIXES and given.strip():
            text = f"{given} {surname}"
    parts = [_NAME_GLUE.sub("", p) for p in _NAME_SPLIT.split(text)]
    parts = [p for p in parts if p]
    while len(parts) > 1 and parts[-1] in _SUFFIXES:
        parts.pop()
    if not parts:
        return None
    last_start = len(parts) - 1
    while last_start > 1 and parts[last_start - 1] in _PARTICLES:
        last_start -= 1
    return NameKey("".join(parts[last_start:]), tuple(parts[:last_start]))


def _given_compatible(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    if not a or not b:
        return not a and not b
    first_a, first_b = a[0], b[0]
    if first_a == first_b:
        return True
    if len(first_a) == 1 or len(first_b) == 1:  # an initial: "A. Lovelace"
        return first_a[0] == first_b[0]
    # "Jean Pierre Dupont" vs "Jean-Pierre Dupont" (one given name spelled in two words)
    return "".join(a) == first_b or "".join(b) == first_a


def names_match(followed: NameKey, author: NameKey) -> bool:
    """True when the followed name denotes this author.

    Same surname (exactly, after folding), and compatible given names: the first given
    names are equal, or one is an initial of the other; middle names and initials are
    ignored. A followed name of one word matches any author with that surname.
    """
    if followed.last != author.last:
        return False
    if not followed.given:
        return True
    return _given_compatible(followed.given, author.given)
