"""``distillm prepare``: read, validate, template, tokenize and cache a dataset, or write the bundled tasks.

    distillm prepare --data train.jsonl --tokenizer gpt2 --out prepared/train
    distillm prepare --bundled-tasks --out data/tasks --seed 0

Nothing is written to ``--out`` unless the whole run succeeds: the result is built in a temporary folder
beside it and renamed into place.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from distillm.config import DataConfig
from distillm.data.cache import TokenizedDataset, write_tokenized
from distillm.data.formats import FORMATS, read_examples
from distillm.data.tasks import FAMILIES, write_task_suite
from distillm.data.template import TEMPLATES
from distillm.errors import UserError
from distillm.storage import atomic_folder

logger = logging.getLogger(__name__)

_DEFAULTS = DataConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", help="Instruction data: a .jsonl / .json file, or a hub dataset name[:split]."
    )
    parser.add_argument(
        "--format", default="auto", choices=("auto", *FORMATS), help="Row format (default: auto)."
    )
    parser.add_argument("--tokenizer", help="Tokenizer folder or hub name.")
    parser.add_argument(
        "--out", required=True, help="Output folder (created; must not exist unless --force)."
    )
    parser.add_argument(
        "--max-length", type=int, default=_DEFAULTS.max_length, help="Max prompt + response tokens."
    )
    parser.add_argument(
        "--max-prompt-length",
        type=int,
        default=_DEFAULTS.max_prompt_length,
        help="Max prompt tokens (tail kept).",
    )
    parser.add_argument("--template", default=_DEFAULTS.template, choices=TEMPLATES, help="Prompt template.")
    parser.add_argument(
        "--strict", action="store_true", help="Fail on rows with an empty prompt or response."
    )
    parser.add_argument("--force", action="store_true", help="Replace --out if it exists.")
    tasks = parser.add_argument_group("bundled task suite")
    tasks.add_argument("--bundled-tasks", action="store_true", help="Write the bundled task suite instead.")
    tasks.add_argument("--seed", type=int, default=0, help="Seed of the task suite.")
    tasks.add_argument("--n-train", type=int, default=4000, help="Training rows of the task suite.")
    tasks.add_argument("--n-dev", type=int, default=240, help="Dev rows of the task suite.")
    tasks.add_argument("--n-test", type=int, default=240, help="Test rows of the task suite.")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.force and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; pass --force to replace it")
    if args.bundled_tasks:
        if args.data:
            raise UserError("--bundled-tasks writes its own data; drop --data (or drop --bundled-tasks)")
        return _write_tasks(args, out)
    if not args.data or not args.tokenizer:
        raise UserError("--data and --tokenizer are required (or pass --bundled-tasks)")
    return _prepare(args, out)


def _write_tasks(args: argparse.Namespace, out: Path) -> int:
    for flag in ("n_train", "n_dev", "n_test"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')}={getattr(args, flag)} is invalid: must be >= 0")
    with atomic_folder(out, replace=True) as temporary:
        paths = write_task_suite(
            temporary, seed=args.seed, n_train=args.n_train, n_dev=args.n_dev, n_test=args.n_test
        )
    for split, path in paths.items():
        rows = sum(1 for _ in open(out / path.name, encoding="utf-8"))
        print(f"{split}: {rows} rows -> {out / path.name}")
    print(f"{len(FAMILIES)} task families: {', '.join(FAMILIES)} (seed {args.seed})")
    return 0


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as error:  # missing folder, no network, bad files: one line for the user either way
        raise UserError(f"cannot load the tokenizer {name!r}: {error}") from None


def _percentiles(lengths: np.ndarray) -> str:
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return f"min {lengths.min()}, p50 {p50:.0f}, p90 {p90:.0f}, p99 {p99:.0f}, max {lengths.max()}"


def _prepare(args: argparse.Namespace, out: Path) -> int:
    DataConfig(max_length=args.max_length, max_prompt_length=args.max_prompt_length).validate("data")
    examples, report = read_examples(args.data, format=args.format, strict=args.strict)
    tokenizer = _load_tokenizer(args.tokenizer)
    with atomic_folder(out, replace=True) as temporary:
        meta = write_tokenized(
            temporary,
            examples,
            tokenizer,
            args.template,
            args.max_length,
            args.max_prompt_length,
            progress=True,
        )
    dataset = TokenizedDataset(out)
    for line in report.lines():
        print(line)
    print(f"prompt tokens:   {_percentiles(dataset.prompt_lengths)}")
    print(f"response tokens: {_percentiles(dataset.response_lengths)} (EOS included)")
    print(
        f"truncated: {meta['prompt_truncated']} prompts (their start cut, the end kept) and "
        f"{meta['response_truncated']} responses (cut to --max-length, no EOS added)"
    )
    categories = Counter(example.category for example in dataset.examples if example.category)
    if categories:
        print("categories: " + ", ".join(f"{name} {count}" for name, count in sorted(categories.items())))
    print(f"wrote {len(dataset)} examples ({args.template} template) to {out}")
    return 0
