"""The bundled task suite: seeded, learnable instruction tasks for the offline demo and for tests.

No instruction dataset can be downloaded offline, and a model trained for minutes on a CPU cannot learn
facts about the world; it can learn rules. Each family below is a rule over a small vocabulary (41 words
and the numbers 0-198), so a byte-level BPE of a few thousand tokens covers it. Families differ in how hard
they are for a model of 1-2M parameters: copying with a fixed pattern is easy, while sorting, carrying in
addition or spelling a word needs capacity; that gap is what distillation is for. Rows are in the Dolly
format: ``instruction``, ``context``, ``response``, ``category`` (the family's name).

The splits are drawn from separate streams of one seed and never share a prompt (test first, then dev,
then train, each excluding the prompts of the ones before).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from distillm.errors import UserError

WORDS = (
    "cat dog bird fish cow horse sheep goat frog duck "
    "red blue green black white pink gray gold "
    "apple pear plum grape lemon melon peach lime "
    "tree river hill lake rock sand star moon book lamp cup door box hat key"
).split()

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")

SPLITS = ("train", "dev", "test")

Row = tuple[str, str, str]  # instruction, context, response


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    """``low``..``high`` distinct words in random order."""
    return rng.sample(WORDS, rng.randint(low, high))


def _reverse(rng: random.Random) -> Row:
    words = _words(rng, 3, 8)
    instruction = rng.choice(("Reverse the order of the words.", "Write the words in reverse order."))
    return instruction, " ".join(words), " ".join(reversed(words))


def _sort(rng: random.Random) -> Row:
    words = _words(rng, 3, 7)
    instruction = rng.choice(
        ("Sort the words in alphabetical order.", "Put the words in alphabetical order.")
    )
    return instruction, " ".join(words), " ".join(sorted(words))


def _dedupe(rng: random.Random) -> Row:
    pool = _words(rng, 2, 5)
    words = pool + [rng.choice(pool) for _ in range(rng.randint(1, 5))]  # at least one repeat
    rng.shuffle(words)
    unique = list(dict.fromkeys(words))
    return (
        "Remove the repeated words, keeping the first occurrence of each.",
        " ".join(words),
        " ".join(unique),
    )


def _arithmetic(rng: random.Random) -> Row:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", "", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", "", str(a - b)


def _case(rng: random.Random) -> Row:
    words = _words(rng, 2, 6)
    if rng.random() < 0.5:
        return "Write the words in upper case.", " ".join(words), " ".join(word.upper() for word in words)
    return (
        "Capitalize the first letter of each word.",
        " ".join(words),
        " ".join(word[0].upper() + word[1:] for word in words),
    )


def _nth_word(rng: random.Random) -> Row:
    words = _words(rng, 4, 9)
    if rng.random() < 0.2:
        return "What is the last word of the list?", " ".join(words), words[-1]
    n = rng.randint(1, len(words))
    return f"What is the {ORDINALS[n - 1]} word of the list?", " ".join(words), words[n - 1]


def _count(rng: random.Random) -> Row:
    if rng.random() < 0.5:
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 10))]
        return "How many words are in the list?", " ".join(words), str(len(words))
    pool = _words(rng, 3, 4)
    target = pool[0]
    words = [rng.choice(pool) for _ in range(rng.randint(4, 10))]
    return f'How many times does the word "{target}" appear?', " ".join(words), str(words.count(target))


def _join(rng: random.Random) -> Row:
    words = _words(rng, 2, 6)
    sentence = f"We have {', '.join(words[:-1])} and {words[-1]}."
    return "Join the words into a sentence.", " ".join(words), sentence


def _spell(rng: random.Random) -> Row:
    words = _words(rng, 1, 4)
    instruction = "Spell each word letter by letter, one word per line."
    return instruction, " ".join(words), "\n".join(" ".join(word) for word in words)


def _numbered(rng: random.Random) -> Row:
    words = _words(rng, 3, 12)
    lines = [f"{i}. {word}" for i, word in enumerate(words, start=1)]
    return "Write the words as a numbered list.", " ".join(words), "\n".join(lines)


def _word_lengths(rng: random.Random) -> Row:
    words = _words(rng, 3, 14)
    lines = [f"{word}: {len(word)}" for word in words]
    return "Write each word with its number of letters, one per line.", " ".join(words), "\n".join(lines)


def _replace(rng: random.Random) -> Row:
    pool = _words(rng, 3, 5)
    old, new = pool[0], rng.choice([word for word in WORDS if word not in pool])
    words = [old] + [rng.choice(pool) for _ in range(rng.randint(3, 8))]
    rng.shuffle(words)
    replaced = [new if word == old else word for word in words]
    return f'Replace every "{old}" with "{new}".', " ".join(words), " ".join(replaced)


def _extreme_number(rng: random.Random) -> Row:
    numbers = rng.sample(range(100), rng.randint(3, 6))
    context = " ".join(str(number) for number in numbers)
    if rng.random() < 0.5:
        return "Which number is the largest?", context, str(max(numbers))
    return "Which number is the smallest?", context, str(min(numbers))


@dataclass(frozen=True)
class TaskFamily:
    name: str
    difficulty: str  # easy / medium / hard, for a 1-2M parameter model trained for minutes
    make: Callable[[random.Random], Row]


FAMILIES: dict[str, TaskFamily] = {
    family.name: family
    for family in (
        TaskFamily("reverse", "medium", _reverse),
        TaskFamily("sort", "hard", _sort),
        TaskFamily("dedupe", "medium", _dedupe),
        TaskFamily("arithmetic", "hard", _arithmetic),
        TaskFamily("case", "easy", _case),
        TaskFamily("nth_word", "medium", _nth_word),
        TaskFamily("count", "hard", _count),
        TaskFamily("join", "easy", _join),
        TaskFamily("spell", "hard", _spell),
        TaskFamily("numbered", "easy", _numbered),
        TaskFamily("word_lengths", "medium", _word_lengths),
        TaskFamily("replace", "medium", _replace),
        TaskFamily("extreme_number", "medium", _extreme_number),
    )
}


def _generate_split(
    rng: random.Random, n: int, families: Sequence[str], seen: set[tuple[str, str]]
) -> list[dict[str, str]]:
    # Equal numbers per family (up to rounding), in a shuffled order.
    order = [families[i % len(families)] for i in range(n)]
    rng.shuffle(order)
    rows = []
    for name in order:
        for _ in range(1000):  # every family has far more than enough distinct prompts
            instruction, context, response = FAMILIES[name].make(rng)
            if (instruction, context) not in seen:
                break
        else:
            raise RuntimeError(f"task family {name!r} ran out of distinct prompts; ask for fewer rows")
        seen.add((instruction, context))
        rows.append({"instruction": instruction, "context": context, "response": response, "category": name})
    return rows


def generate_task_suite(
    seed: int = 0,
    n_train: int = 4000,
    n_dev: int = 240,
    n_test: int = 240,
    families: Sequence[str] | None = None,
) -> dict[str, list[dict[str, str]]]:
    """Train/dev/test rows in the Dolly format, the same for the same arguments.

    Each split holds every family (of ``families``, default all) equally often; no prompt (instruction and
    context) appears in two splits or twice in one.
    """
    names = list(FAMILIES) if families is None else list(families)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown or not names:
        raise UserError(f"unknown task families {unknown}; choose among: {', '.join(FAMILIES)}")
    sizes = {"test": n_test, "dev": n_dev, "train": n_train}
    seen: set[tuple[str, str]] = set()
    suite = {}
    for split in ("test", "dev", "train"):  # held-out splits first: they do not depend on n_train
        rng = random.Random(f"distillm-tasks/{seed}/{split}")  # str seeds are hashed deterministically
        suite[split] = _generate_split(rng, sizes[split], names, seen)
    return {split: suite[split] for split in SPLITS}


def write_task_suite(out_dir: str | Path, seed: int = 0, **sizes) -> dict[str, Path]:
    """Write ``train.jsonl``, ``dev.jsonl`` and ``test.jsonl`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in generate_task_suite(seed=seed, **sizes).items():
        paths[split] = out_dir / f"{split}.jsonl"
        with open(paths[split], "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return paths
