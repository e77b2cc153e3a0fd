"""ROUGE-L, exact match and seed statistics against hand-worked values."""

from __future__ import annotations

import math
import statistics

import pytest

from distillm.metrics import exact_match, normalize_answer, rouge_l, summarize


def f_measure(lcs: int, prediction_tokens: int, reference_tokens: int) -> float:
    """ROUGE-L F x 100 straight from its definition."""
    precision, recall = lcs / prediction_tokens, lcs / reference_tokens
    return 100 * 2 * precision * recall / (precision + recall)


def test_rouge_l_of_a_one_word_substitution_is_the_lcs_f_measure():
    # the cat [sat|is] on the mat: LCS "the cat on the mat" = 5 of 6 tokens on both sides.
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(f_measure(5, 6, 6))
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(100 * 5 / 6)


def test_rouge_l_with_unequal_lengths_weighs_precision_and_recall():
    # prediction a b c d, reference a c e: LCS "a c" = 2; P = 2/4, R = 2/3.
    assert rouge_l("a b c d", ["a c e"]) == pytest.approx(f_measure(2, 4, 3))
    assert rouge_l("a b c d", ["a c e"]) == pytest.approx(100 * 4 / 7)


def test_rouge_l_counts_a_subsequence_not_a_substring():
    # LCS of "one two three four" and "one three four two": "one three four" = 3 (order matters, gaps allowed).
    assert rouge_l("one two three four", ["one three four two"]) == pytest.approx(f_measure(3, 4, 4))


def test_rouge_l_stems_words_so_inflections_match():
    # Porter stems: dogs -> dog, running -> run; "were"/"was" stay different. LCS "the dog run" = 3 of 4.
    assert rouge_l("the dogs were running", ["the dog was run"]) == pytest.approx(f_measure(3, 4, 4))
    assert rouge_l("running", ["run"]) == pytest.approx(100.0)


def test_rouge_l_ignores_case_and_punctuation():
    assert rouge_l("Hello, World!", ["hello world"]) == pytest.approx(100.0)


def test_rouge_l_takes_the_maximum_over_references():
    # red green blue vs "red": P 1/3, R 1 -> 50; vs "green yellow": P 1/3, R 1/2 -> 40.
    assert rouge_l("red green blue", ["red", "green yellow"]) == pytest.approx(f_measure(1, 3, 1))
    assert rouge_l("red green blue", ["green yellow", "red"]) == pytest.approx(50.0)
    assert rouge_l("red green blue", ["red", "red green blue"]) == pytest.approx(100.0)


def test_empty_prediction_or_no_reference_scores_zero():
    assert rouge_l("", ["the cat"]) == 0.0
    assert rouge_l("   ", ["the cat"]) == 0.0
    assert rouge_l("the cat", []) == 0.0


def test_exact_match_normalises_case_punctuation_and_whitespace():
    assert normalize_answer("  The  Cat,\nsat! ") == "the cat sat"
    assert exact_match("The cat sat.", ["the  cat sat"]) == 100.0
    assert exact_match("the cat sat", ["the cat sat down"]) == 0.0
    assert exact_match("blue", ["red", "Blue!"]) == 100.0
    assert exact_match("blue", []) == 0.0


def test_summarize_gives_the_mean_and_sample_std():
    values = [10.0, 20.0, 30.0, 40.0, 50.0]
    mean, std = summarize(values)
    assert mean == pytest.approx(30.0)
    # sample variance: sum of squared deviations 400 + 100 + 0 + 100 + 400 = 1000, over n - 1 = 4.
    assert std == pytest.approx(math.sqrt(1000 / 4))
    assert std == pytest.approx(statistics.stdev(values))


def test_summarize_of_one_value_has_zero_std_and_of_none_is_an_error():
    assert summarize([42.5]) == (42.5, 0.0)
    with pytest.raises(ValueError):
        summarize([])
