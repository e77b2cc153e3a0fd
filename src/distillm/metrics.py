"""Scores of generated responses: ROUGE-L and exact match against a row's references, and seed statistics.

Both scores are on a 0-100 scale and take the maximum over a row's references, as the paper's evaluation does
(section 9.2 of the method reference).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from functools import lru_cache

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


@lru_cache(maxsize=1)
def _rouge_l_scorer():
    # Built once: the Porter stemmer and tokenizer setup is the slow part of a RougeScorer.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure x 100, the maximum over ``references``.

    Computed by ``rouge_score``'s ``RougeScorer(["rougeL"], use_stemmer=True)``: its tokenizer lowercases,
    replaces every non-alphanumeric character by a space and Porter-stems the words; F = 2PR / (P + R) with
    P = LCS / |prediction| and R = LCS / |reference| in tokens. An empty prediction (or no references)
    scores 0.
    """
    scorer = _rouge_l_scorer()
    return max(
        (100.0 * scorer.score(reference, prediction)["rougeL"].fmeasure for reference in references),
        default=0.0,
    )


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, collapse runs of whitespace to one space and strip the ends.

    The normalisation of the original evaluation's exact match (SQuAD-style, without removing articles).
    """
    return " ".join(_PUNCTUATION.sub("", text.lower()).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 if the normalised prediction equals any normalised reference (see ``normalize_answer``), else 0."""
    normalized = normalize_answer(prediction)
    return 100.0 if any(normalized == normalize_answer(reference) for reference in references) else 0.0


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, std)`` of per-seed scores; std is the **sample** standard deviation (n - 1 denominator).

    The seeds are a sample of all the seeds one could have drawn, and the std is meant to estimate the
    spread of a score over that whole population, so the unbiased-variance (Bessel-corrected) form is used.
    It is sqrt(n / (n - 1)) times numpy's default population std (1.118x for the paper's 5 seeds). One value
    has no spread: its std is reported as 0.
    """
    if not values:
        raise ValueError("summarize needs at least one value")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    variance = math.fsum((value - mean) ** 2 for value in values) / (n - 1)
    return mean, math.sqrt(variance)
