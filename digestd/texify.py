"""TeX in paper titles and abstracts → readable Unicode text (via pylatexenc).

``$\\alpha$-Net: \\textbf{fast}`` becomes ``α-Net: fast``. Text without a backslash or a
dollar sign is returned untouched (apart from whitespace), so plain titles never pay for
the parser and are never mangled by it. Bare ``%``, ``&`` and ``#`` are escaped before
parsing (in an abstract "12% better" is a percentage, not a TeX comment), URLs are left
alone, and any parser failure falls back to the raw text. Input is cut to ``max_chars``
first and the parser runs on a token budget, so hostile input costs bounded time.

The result is plain text, *not* markup: callers still escape it for HTML.
"""

from __future__ import annotations

import logging
import re
import threading

from pylatexenc.latex2text import (
    LatexNodes2Text,
    MacroTextSpec,
    get_default_latex_context_db,
)
from pylatexenc.latexwalker import LatexWalker
from pylatexenc.latexwalker import get_default_latex_context_db as _walker_context_db

# pylatexenc logs a WARNING for every malformed macro it meets; paper text is full of them
# and they say nothing an operator can act on.
logging.getLogger("pylatexenc").setLevel(logging.ERROR)

MAX_TEX_CHARS = 4_000

_URL = re.compile(r"https?://[^\s<>\"']+")
_BARE_SPECIAL = re.compile(r"(?<!\\)([%&#])")
_WS = re.compile(r"\s+")
# Citation and reference macros mean nothing outside the paper: drop them.
_DROPPED_MACROS = ("cite", "citep", "citet", "citealp", "ref", "eqref", "label", "footnote")

_local = threading.local()


class _TooComplex(Exception):
    """The parser needed more tokens than the input can justify (pathological nesting)."""


class _BudgetWalker(LatexWalker):  # type: ignore[misc]
    """pylatexenc's walker with a token budget.

    Tolerant parsing backtracks on unclosed groups (``\\frac{\\frac{…`` or ``\\sqrt[\\sqrt[…``),
    which is exponential in the nesting depth. Ordinary text reads under one token per
    character, so a budget proportional to the input bounds the time without rejecting
    real titles and abstracts.
    """

    def __init__(self, text: str, context: object) -> None:
        super().__init__(text, latex_context=context, tolerant_parsing=True)
        self._budget = 2 * len(text) + 100

    def get_token(self, *args: object, **kwargs: object) -> object:
        self._budget -= 1
        if self._budget < 0:
            raise _TooComplex
        return super().get_token(*args, **kwargs)


def _walker_context() -> object:
    context = getattr(_local, "walker_context", None)
    if context is None:
        context = _local.walker_context = _walker_context_db()
    return context


def _balanced(text: str) -> bool:
    """Braces balance (escaped ``\\{`` ignored): unbalanced input is where pylatexenc's
    tolerant parser backtracks, and it is never meant as TeX anyway."""
    depth = 0
    escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def _converter() -> LatexNodes2Text:
    # pylatexenc objects are not documented as thread-safe: one per thread (render runs in
    # the event loop, DKIM in a worker thread, tests anywhere).
    conv: LatexNodes2Text | None = getattr(_local, "conv", None)
    if conv is None:
        db = get_default_latex_context_db()
        db.add_context_category(
            "digestd",
            prepend=True,
            macros=[
                *(MacroTextSpec(name, simplify_repl="") for name in _DROPPED_MACROS),
                MacroTextSpec("LaTeX", simplify_repl="LaTeX"),
                MacroTextSpec("TeX", simplify_repl="TeX"),
            ],
        )
        conv = LatexNodes2Text(latex_context=db, math_mode="text", strict_latex_spaces=False)
        _local.conv = conv
    return conv


def collapse(text: str) -> str:
    """Whitespace runs (newlines included) → one space, ends stripped."""
    return _WS.sub(" ", text).strip()


def looks_like_tex(text: str) -> bool:
    return "\\" in text or "$" in text


def tex_to_text(text: str, *, max_chars: int = MAX_TEX_CHARS) -> str:
    """Readable text for ``text``; TeX is converted when present, whitespace is collapsed.

    Never raises: on any parser error the (whitespace-collapsed) raw text is returned.
    """
    if len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars)
        text = text[: cut if cut > max_chars // 2 else max_chars]
    if not looks_like_tex(text):
        return collapse(text)
    pieces: list[str] = []
    pos = 0
    for match in _URL.finditer(text):
        pieces.append(_convert(text[pos : match.start()]))
        pieces.append(match.group(0))
        pos = match.end()
    pieces.append(_convert(text[pos:]))
    return collapse("".join(pieces))


def _convert(chunk: str) -> str:
    if not looks_like_tex(chunk) or not _balanced(chunk):
        return chunk
    prepared = _BARE_SPECIAL.sub(r"\\\1", chunk)
    try:
        walker = _BudgetWalker(prepared, _walker_context())
        out = str(_converter().nodelist_to_text(walker.get_latex_nodes()[0]))
    except Exception:  # pylatexenc raises many kinds (RecursionError too): keep the raw text
        return chunk
    # Keep a space where the parser swallowed one between a word and a converted group.
    if chunk[:1].isspace():
        out = " " + out
    if chunk[-1:].isspace():
        out += " "
    return out
