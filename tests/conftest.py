"""Shared fixtures: a tiny tokenizer and tiny models built offline and loaded through ``from_pretrained``."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_WORDS = (
    "alpha beta gamma delta apple banana cherry river mountain ocean red green blue one two three four five "
    "six seven eight nine ten reverse sort list words sum count upper lower first last number answer "
    "instruction response input below task write request completes appropriately describes paired context"
).split()


def tokenizer_training_texts() -> list[str]:
    """Deterministic text covering the template, digits and common words."""
    import random

    rng = random.Random(0)
    texts = [
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\n{x}\n\n### Response:\n",
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n\n### Input:\n",
    ] * 20
    for _ in range(400):
        texts.append(" ".join(rng.choice(_WORDS) for _ in range(12)) + " " + str(rng.randint(0, 999)))
    return texts


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """Folder of a byte-level BPE tokenizer (vocab 512) saved with ``save_pretrained``."""
    from distillm.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(tokenizer_training_texts(), vocab_size=512, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def _save_model(out, family, tokenizer_dir, seed, **kwargs):
    from transformers import AutoTokenizer

    from distillm.models import build_small_model

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = build_small_model(
        family, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, seed=seed, **kwargs
    )
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A 2-layer, 32-wide GPT-2 student with the tiny tokenizer, saved with ``save_pretrained``."""
    return _save_model(
        tmp_path_factory.mktemp("student"), "gpt2", tiny_tokenizer_dir, seed=1, layers=2, hidden=32, heads=2
    )


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A 2-layer, 64-wide GPT-2 teacher sharing the student's tokenizer."""
    return _save_model(
        tmp_path_factory.mktemp("teacher"), "gpt2", tiny_tokenizer_dir, seed=2, layers=2, hidden=64, heads=4
    )


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tiny_tokenizer_dir):
    """``make(family, **sizes) -> folder`` of a small random model of any supported family."""

    def make(family: str, seed: int = 0, **kwargs):
        return _save_model(tmp_path_factory.mktemp(family), family, tiny_tokenizer_dir, seed=seed, **kwargs)

    return make


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: they are skipped, never failed, on machines without one."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def task_data(tmp_path_factory):
    """A small slice of the bundled task suite (Dolly format): train.jsonl, dev.jsonl, test.jsonl."""
    from distillm.data import write_task_suite

    out = tmp_path_factory.mktemp("tasks")
    write_task_suite(out, seed=0, n_train=64, n_dev=16, n_test=8)
    return out


@pytest.fixture(scope="session")
def quiet_pair(tmp_path_factory, tiny_tokenizer_dir):
    """Tiny GPT-2 student and teacher folders without dropout, so that runs can be compared number for number."""
    folders = {}
    for name, hidden, seed in (("student", 32, 1), ("teacher", 48, 2)):
        folders[name] = _save_model(
            tmp_path_factory.mktemp(f"quiet-{name}"), "gpt2", tiny_tokenizer_dir, seed=seed, layers=2,
            hidden=hidden, heads=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
    return folders


def report_rouge_rows(markdown: str) -> dict[str, list[str]]:
    """The ROUGE-L table of report.md: model -> its cells."""
    section = markdown.split("## ROUGE-L on the test split", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "model":
            rows[cells[0]] = cells[1:]
    return rows
