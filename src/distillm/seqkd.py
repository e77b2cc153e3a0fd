"""``distillm generate``: sample a model's responses to a dataset's prompts and write them as training data.

This is how SeqKD gets its data: the teacher answers every training prompt, and the student is then
fine-tuned on those answers. The original code wrote the teacher's text to a field (``gen_answer``) that its
data preparation never read, so its "SeqKD" students were trained on the ground truth (see
docs/differences.md); here the generated text *is* the ``output`` field of the written file, and the ground
truth is kept only as ``reference``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from distillm.config import Config, GenerationConfig, load_config
from distillm.data import read_examples
from distillm.errors import UserError
from distillm.evaluate import generate_predictions
from distillm.models import load_causal_lm, load_tokenizer
from distillm.storage import atomic_write_text

logger = logging.getLogger(__name__)


def teacher_rows(examples, predictions: list[str]) -> list[dict]:
    """Training rows (instruction, input, output = generated text) for ``distillm prepare`` formats."""
    rows = []
    for example, prediction in zip(examples, predictions, strict=True):
        row = {"instruction": example.instruction, "input": example.input, "output": prediction}
        if example.prompt is not None:
            row["prompt"] = example.prompt
        row["reference"] = example.references[0]
        rows.append(row)
    return rows


def write_jsonl_atomic(rows: list[dict], path: Path) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="Model folder or hub name (the teacher, for SeqKD).")
    parser.add_argument("--data", required=True, help="Prompts: any file `distillm prepare` reads.")
    parser.add_argument("--out", required=True, help="Output JSON Lines file (instruction, input, output).")
    parser.add_argument("--format", default="auto", help="Input data format (default: detect).")
    parser.add_argument("--template", default="alpaca", choices=["alpaca", "chat"], help="Prompt template.")
    parser.add_argument("--max-prompt-length", type=int, default=256, help="Prompt tokens kept (the tail).")
    parser.add_argument("--limit", type=int, default=0, help="Only the first N rows (0: all).")
    parser.add_argument("--seed", type=int, default=10, help="Sampling seed.")
    parser.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="Model weights' dtype."
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow model code from the hub.")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Sampling settings as generation.KEY=VALUE (defaults: T 1, top-p 1, top-k off, 256 new tokens).",
    )


def run(args) -> int:
    for item in args.overrides:
        if not item.startswith("generation."):
            raise UserError(f"{item!r}: only generation.KEY=VALUE settings apply to `distillm generate`")
    generation: GenerationConfig = load_config(None, args.overrides, schema=Config, validate=False).generation
    generation.validate("generation")
    examples, report = read_examples(args.data, args.format)
    for line in report.lines():
        logger.info(line)
    if args.limit:
        examples = examples[: args.limit]
    if not examples:
        raise UserError(f"{args.data}: no usable rows to generate for")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    model = load_causal_lm(args.model, args.dtype, args.trust_remote_code, role="model").to(device)
    predictions = generate_predictions(
        model,
        tokenizer,
        examples,
        generation,
        seed=args.seed,
        template=args.template,
        max_prompt_length=args.max_prompt_length,
        progress=True,
    )
    out = Path(args.out)
    write_jsonl_atomic(teacher_rows(examples, predictions), out)
    empty = sum(not p.strip() for p in predictions)
    logger.info(
        "wrote %d generated responses to %s (%d empty, skipped when training)", len(predictions), out, empty
    )
    return 0
