"""The bundled task suite: answers checked by solvers written here, determinism, splits, sizes."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from distillm.data import generate_task_suite, read_examples, write_task_suite
from distillm.data.tasks import FAMILIES
from distillm.errors import UserError

ORDINAL = {
    "first": 1,
    "second": 2,
    "third": 3,
    "fourth": 4,
    "fifth": 5,
    "sixth": 6,
    "seventh": 7,
    "eighth": 8,
}
ORDINAL |= {"ninth": 9, "tenth": 10}


def solve(instruction: str, context: str) -> tuple[str, str]:
    """(family, answer) computed from the instruction's wording alone, independently of the generator."""
    words = context.split()
    if instruction in ("Reverse the order of the words.", "Write the words in reverse order."):
        return "reverse", " ".join(words[::-1])
    if instruction in ("Sort the words in alphabetical order.", "Put the words in alphabetical order."):
        return "sort", " ".join(sorted(words))
    if instruction == "Remove the repeated words, keeping the first occurrence of each.":
        kept = []
        for word in words:
            if word not in kept:
                kept.append(word)
        return "dedupe", " ".join(kept)
    if match := re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", instruction):
        a, b = int(match[1]), int(match[3])
        return "arithmetic", str(a + b if match[2] == "+" else a - b)
    if instruction == "Write the words in upper case.":
        return "case", context.upper()
    if instruction == "Capitalize the first letter of each word.":
        return "case", " ".join(word.title() for word in words)
    if instruction == "What is the last word of the list?":
        return "nth_word", words[-1]
    if match := re.fullmatch(r"What is the (\w+) word of the list\?", instruction):
        return "nth_word", words[ORDINAL[match[1]] - 1]
    if instruction == "How many words are in the list?":
        return "count", str(len(words))
    if match := re.fullmatch(r'How many times does the word "(\w+)" appear\?', instruction):
        return "count", str(sum(word == match[1] for word in words))
    if instruction == "Join the words into a sentence.":
        listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
        return "join", f"We have {listed}."
    if instruction == "Spell each word letter by letter, one word per line.":
        return "spell", "\n".join(" ".join(list(word)) for word in words)
    if instruction == "Write the words as a numbered list.":
        return "numbered", "\n".join(f"{n + 1}. {word}" for n, word in enumerate(words))
    if instruction == "Write each word with its number of letters, one per line.":
        return "word_lengths", "\n".join(word + ": " + str(len(word)) for word in words)
    if match := re.fullmatch(r'Replace every "(\w+)" with "(\w+)"\.', instruction):
        assert match[1] in words and match[2] not in words
        return "replace", " ".join(match[2] if word == match[1] else word for word in words)
    if instruction in ("Which number is the largest?", "Which number is the smallest?"):
        numbers = [int(word) for word in words]
        return "extreme_number", str(max(numbers) if "largest" in instruction else min(numbers))
    raise AssertionError(f"no solver for {instruction!r}")


@pytest.fixture(scope="module")
def suite():
    return generate_task_suite(seed=0)


def test_every_answer_of_every_split_is_what_an_independent_solver_gives(suite):
    for split, rows in suite.items():
        for row in rows:
            family, answer = solve(row["instruction"], row["context"])
            assert row["category"] == family, (split, row)
            assert row["response"] == answer, (split, row)


def test_answers_are_also_correct_for_another_seed():
    for rows in generate_task_suite(seed=7, n_train=300, n_dev=50, n_test=50).values():
        for row in rows:
            assert solve(row["instruction"], row["context"]) == (row["category"], row["response"])


def test_the_suite_is_deterministic_for_a_seed_and_differs_between_seeds(suite):
    assert generate_task_suite(seed=0) == suite
    assert generate_task_suite(seed=1)["train"] != suite["train"]


def test_there_are_at_least_eight_families_each_equally_present_in_every_split(suite):
    assert len(FAMILIES) >= 8
    assert {"easy", "hard"} <= {family.difficulty for family in FAMILIES.values()}
    for split, rows in suite.items():
        counts = Counter(row["category"] for row in rows)
        assert set(counts) == set(FAMILIES), split
        assert max(counts.values()) - min(counts.values()) <= 1, split


def test_no_prompt_appears_twice_within_or_across_splits(suite):
    prompts = [(row["instruction"], row["context"]) for rows in suite.values() for row in rows]
    assert len(prompts) == len(set(prompts))


def test_the_held_out_splits_do_not_depend_on_the_training_size(suite):
    small = generate_task_suite(seed=0, n_train=100)
    assert small["test"] == suite["test"] and small["dev"] == suite["dev"]
    assert len(small["train"]) == 100


def test_the_vocabulary_is_small_and_responses_span_a_few_to_about_sixty_tokens(suite):
    from distillm.tokenizer import train_bpe_tokenizer

    rows = suite["train"]
    texts = [f"{row['instruction']}\n{row['context']}\n{row['response']}" for row in rows]
    distinct_words = {word.strip('.,?":') for text in texts for word in text.split()}
    # 41 words in three cases (123), numbers 0-198 (199), single letters (26), ~60 instruction words.
    assert len(distinct_words) < 420
    tokenizer = train_bpe_tokenizer(texts, vocab_size=2000)
    assert len(tokenizer) < 2000  # a BPE of a few thousand tokens covers the suite with room to spare
    lengths = Counter()
    longest = Counter()
    for row in rows:
        n = len(tokenizer.encode(row["response"], add_special_tokens=False)) + 1  # + EOS
        lengths[row["category"]] += n
        longest[row["category"]] = max(longest[row["category"]], n)
    assert max(longest.values()) <= 64
    per_family = {name: lengths[name] / sum(row["category"] == name for row in rows) for name in FAMILIES}
    assert min(per_family.values()) <= 3 and max(per_family.values()) >= 20


def test_written_splits_read_back_as_dolly_files(tmp_path):
    paths = write_task_suite(tmp_path, seed=3, n_train=40, n_dev=13, n_test=14)
    assert sorted(path.name for path in paths.values()) == ["dev.jsonl", "test.jsonl", "train.jsonl"]
    for split, size in (("train", 40), ("dev", 13), ("test", 14)):
        examples, report = read_examples(str(paths[split]))
        assert report.format == "dolly" and report.rows_kept == size  # no row has an empty prompt or response
        assert all(example.category in FAMILIES for example in examples)


def test_a_subset_of_families_can_be_asked_for_and_unknown_names_are_an_error():
    rows = generate_task_suite(seed=0, n_train=20, n_dev=0, n_test=0, families=["sort", "spell"])["train"]
    assert {row["category"] for row in rows} == {"sort", "spell"}
    with pytest.raises(UserError, match="unknown task families"):
        generate_task_suite(families=["sing"])
