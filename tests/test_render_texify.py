"""TeX → readable text (digestd.texify): conversions, untouched plain text, fallbacks."""

from __future__ import annotations

import pytest

from digestd.texify import MAX_TEX_CHARS, tex_to_text


@pytest.mark.parametrize(
    ("tex", "text"),
    [
        (r"$\alpha$", "α"),
        (r"\textbf{x}", "x"),
        (r"$\alpha$-Net: \textbf{Fast} and \emph{Exact}", "α-Net: Fast and Exact"),
        (r"$O(n^2)$ time, $\mathbb{R}^d$", "O(n^2) time, ℝ^d"),
        (r"$\le$ $\ge$ $\times$ $\infty$ $\rightarrow$", "≤ ≥ × ∞ →"),
        (r"\emph{``quoted''} -- en --- em", "“quoted” – en — em"),
        (r"Caf\'e na\"ive", "Café naïve"),
        (r"as shown \cite{smith2020} in Eq.~\eqref{e1}", "as shown in Eq."),
        (r"\LaTeX\ and \TeX", "LaTeX and TeX"),
        (r"costs \$5 with $x$", "costs $5 with x"),
    ],
)
def test_tex_becomes_readable_text(tex: str, text: str) -> None:
    """Common TeX in titles and abstracts turns into the text a reader expects."""
    assert tex_to_text(tex) == text


@pytest.mark.parametrize(
    "plain",
    [
        "Plain title with 50% gains & R&D #1 ~ fine",
        "A title_with_underscores and {braces}",
        "Emoji 🚀 and Ελληνικά and العربية",
    ],
)
def test_text_without_tex_is_untouched(plain: str) -> None:
    """No backslash or dollar: the text is returned as is (whitespace collapsed)."""
    assert tex_to_text(plain) == plain
    assert tex_to_text(f"  {plain}\n\n") == plain


def test_percent_ampersand_and_hash_survive_in_tex_text() -> None:
    """In an abstract, "12%" is a percentage, not a TeX comment that eats the rest."""
    assert tex_to_text(r"$\alpha$ improves 12% over R&D baseline #3") == (
        "α improves 12% over R&D baseline #3"
    )


def test_urls_are_left_alone() -> None:
    """URLs keep their ~, _ and % even when the text around them is TeX."""
    out = tex_to_text(r"$x$ code at https://github.com/a_b/c~d%20e and \textbf{more}")
    assert out == "x code at https://github.com/a_b/c~d%20e and more"


@pytest.mark.parametrize(
    "broken",
    [
        r"\href{http://x}{text}",  # pylatexenc raises on this
        "{" * 5000 + r"\alpha",  # recursion depth
        r"\frac{" * 400 + "x",  # exponential backtracking without the token budget
        r"\sqrt[" * 400 + "x",
        r"\begin{equation}\frac{" * 200,
    ],
)
def test_parser_failures_fall_back_to_the_raw_text(broken: str) -> None:
    """Parser errors and pathological nesting return the raw text (bounded work)."""
    out = tex_to_text(broken)
    assert out == " ".join(broken[:MAX_TEX_CHARS].split())


def test_huge_input_is_cut_before_parsing() -> None:
    """A 20,000-word abstract is cut to MAX_TEX_CHARS before the parser sees it."""
    huge = r"$\alpha$ " + "word " * 20_000
    out = tex_to_text(huge)
    assert out.startswith("α word word")
    assert len(out) <= MAX_TEX_CHARS
