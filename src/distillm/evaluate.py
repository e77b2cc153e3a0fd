"""``distillm evaluate``: sample responses on test sets over several seeds and score them with ROUGE-L.

The library half is reusable on its own: :func:`generate_predictions` samples one seed's responses for a list
of examples (the trainer calls it for in-training ROUGE-L on dev rows), :func:`score_predictions` scores them,
and :func:`evaluate_model` runs several seeds. The command half resolves test sets by name, loads each model
(a Hugging Face folder or a LoRA adapter on its base), and writes::

    OUT/predictions/<model>/<dataset>/seed<k>.jsonl   one row per example
    OUT/summary.json                                  per model, dataset and seed; mean and std over seeds
    OUT/results.md                                    one row per model, one column per dataset: mean (std)

    distillm evaluate --model runs/student/best --data dolly self-inst --out runs/eval

See docs/evaluation.md for the protocol and how it differs from the original.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from distillm import IGNORE_INDEX
from distillm.config import GenerationConfig
from distillm.data import Example, encode_prompt, read_examples, render_prompt, write_task_suite
from distillm.data.formats import format_choices
from distillm.errors import UserError
from distillm.generation import sample
from distillm.losses.reduction import token_cross_entropy
from distillm.metrics import exact_match, rouge_l, summarize
from distillm.models import load_causal_lm, load_tokenizer
from distillm.objective import supervised_logits
from distillm.storage import atomic_write_text

if TYPE_CHECKING:
    from distillm.config import Config
    from distillm.distributed import Distributed

logger = logging.getLogger(__name__)

# The paper's five test sets, in MiniLLM's data layout under --data-root; value: (file, row cap).
PAPER_TEST_SETS: dict[str, tuple[str, int | None]] = {
    "dolly": ("dolly/valid.jsonl", None),
    "self-inst": ("self-inst/valid.jsonl", None),
    "vicuna": ("vicuna/valid.jsonl", None),
    "sinst": ("sinst/11_/valid.jsonl", None),
    "uinst": ("uinst/11_/valid.jsonl", 10_000),  # the paper evaluates the first 10,000 of 23,916 rows
}
BUNDLED_TASKS = "tasks"  # the bundled task suite's test split, generated on the fly
PAPER_SEEDS = (10, 20, 30, 40, 50)
# The paper's final-evaluation sampling (method reference, section 9.2).
PAPER_GENERATION = GenerationConfig(
    max_new_tokens=256,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    no_repeat_ngram_size=6,
    do_sample=True,
    batch_size=16,
)
_GENERIC_STEMS = {"valid", "test", "dev", "train", "data", "eval"}


# --------------------------------------------------------------------------------------------------------
# Generation and scoring (library).


def _left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Prompts left-padded to the longest: ``(ids [B, P], attention_mask [B, P])``."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def render_prompts(examples: Sequence[Example], template: str, tokenizer) -> list[str]:
    """Each example's prompt text (its ready-made prompt when the file has one, else ``template``)."""
    return [render_prompt(example, template, tokenizer) for example in examples]


def generate_responses(
    model,
    tokenizer,
    examples: Sequence[Example],
    config: GenerationConfig,
    seed: int,
    template: str = "alpaca",
    max_prompt_length: int = 256,
    progress: bool = False,
    description: str = "generating",
) -> list[list[int]]:
    """Sampled response token ids per example, in the order of ``examples``, up to (without) EOS.

    Prompts are encoded as for training (no special tokens; an overlong prompt keeps its last
    ``max_prompt_length`` tokens), grouped longest first into batches of ``config.batch_size`` to waste
    little padding, left-padded and sampled with :func:`distillm.generation.sample`. All randomness comes
    from one ``torch.Generator`` seeded with ``seed``: the same seed, examples and batch size give the same
    responses.
    """
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    prompts = [
        encode_prompt(text, tokenizer, max_prompt_length)
        for text in render_prompts(examples, template, tokenizer)
    ]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # stable: ties keep their order
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)

    responses: list[list[int]] = [[] for _ in prompts]
    starts = range(0, len(order), config.batch_size)
    for start in tqdm(starts, desc=description, unit="batch", disable=not progress, leave=False):
        batch = order[start : start + config.batch_size]
        prompt_ids, prompt_mask = _left_pad([prompts[i] for i in batch], pad_id)  # [B, P]
        sampled = sample(
            model, prompt_ids.to(device), prompt_mask.to(device), config, eos_id, pad_id, generator
        )  # [B, N], padded after EOS
        for i, row in zip(batch, sampled.tolist()):
            responses[i] = row[: row.index(eos_id)] if eos_id in row else row
    return responses


def decode_response(tokenizer, response_ids: Sequence[int]) -> str:
    """Response text as the original scores it: special tokens dropped, cut at a literal end-of-text, stripped."""
    text = tokenizer.decode(response_ids, skip_special_tokens=True)
    return text.split("<|endoftext|>", 1)[0].strip()


def generate_predictions(
    model,
    tokenizer,
    examples: Sequence[Example],
    config: GenerationConfig,
    seed: int,
    template: str = "alpaca",
    max_prompt_length: int = 256,
    progress: bool = False,
) -> list[str]:
    """One sampled response text per example (see :func:`generate_responses` and :func:`decode_response`)."""
    responses = generate_responses(
        model, tokenizer, examples, config, seed, template, max_prompt_length, progress
    )
    return [decode_response(tokenizer, response) for response in responses]


def score_predictions(predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """Mean ROUGE-L and exact match (0-100, best reference per row) of ``predictions`` against ``examples``."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        return {"rougeL": 0.0, "exact_match": 0.0, "rows": 0}
    rouge = [rouge_l(p, e.references) for p, e in zip(predictions, examples)]
    match = [exact_match(p, e.references) for p, e in zip(predictions, examples)]
    return {"rougeL": sum(rouge) / len(rouge), "exact_match": sum(match) / len(match), "rows": len(rouge)}


@dataclass
class SeedResult:
    """One seed's predictions and per-row scores."""

    seed: int
    predictions: list[str]
    lengths: list[int]  # generated tokens per row, EOS excluded
    rougeL: list[float] = field(default_factory=list)
    exact_match: list[float] = field(default_factory=list)

    def means(self) -> dict[str, float]:
        n = max(len(self.predictions), 1)
        return {
            "rougeL": sum(self.rougeL) / n,
            "exact_match": sum(self.exact_match) / n,
            "length": sum(self.lengths) / n,
        }


def evaluate_model(
    model,
    tokenizer,
    examples: Sequence[Example],
    config: GenerationConfig,
    seeds: Sequence[int] = PAPER_SEEDS,
    template: str = "alpaca",
    max_prompt_length: int = 256,
    progress: bool = False,
    description: str = "",
) -> list[SeedResult]:
    """Sample and score ``examples`` once per seed; one :class:`SeedResult` per seed, in order."""
    results = []
    for seed in seeds:
        label = f"{description} seed {seed}".strip()
        responses = generate_responses(
            model, tokenizer, examples, config, seed, template, max_prompt_length, progress, description=label
        )
        predictions = [decode_response(tokenizer, response) for response in responses]
        results.append(
            SeedResult(
                seed=seed,
                predictions=predictions,
                lengths=[len(response) for response in responses],
                rougeL=[rouge_l(p, e.references) for p, e in zip(predictions, examples)],
                exact_match=[exact_match(p, e.references) for p, e in zip(predictions, examples)],
            )
        )
    return results


# --------------------------------------------------------------------------------------------------------
# Test sets and models by name.


@dataclass(frozen=True)
class EvalSet:
    """A named test set: its name in tables and file names, where it came from, and its rows."""

    name: str
    source: str
    examples: list[Example]


def load_eval_set(
    spec: str, data_root: str | Path = "data", format: str = "auto", limit: int = 0, task_seed: int = 0
) -> EvalSet:
    """Resolve ``spec``: a paper test set name, ``tasks`` (the bundled suite's test split) or a data file.

    ``limit`` keeps the first N rows (0: all; UnNI is capped at the paper's 10,000 either way).
    """
    if spec == BUNDLED_TASKS:
        examples = _bundled_test_split(task_seed)
        name, source, cap = BUNDLED_TASKS, f"bundled task suite, seed {task_seed}, test split", None
    else:
        if spec in PAPER_TEST_SETS:
            relative, cap = PAPER_TEST_SETS[spec]
            path = Path(data_root) / relative
            if not path.is_file():
                raise UserError(
                    f"test set {spec!r}: {path} not found; --data-root should hold MiniLLM's data layout "
                    f"(expected {relative} under it), or pass the file's path to --data"
                )
            name = spec
        else:
            path, cap = Path(spec), None
            if not path.exists():
                raise UserError(
                    f"--data {spec!r} is neither a file nor a known test set; use a path, {BUNDLED_TASKS!r} "
                    f"or one of: {', '.join(PAPER_TEST_SETS)}"
                )
            name = path.parent.name if path.stem in _GENERIC_STEMS and path.parent.name else path.stem
        examples, report = read_examples(str(path), format)
        examples = [example.for_evaluation() for example in examples]
        for line in report.lines():
            logger.info(line)
        source = str(path)
    caps = [n for n in (cap, limit) if n]
    if caps:
        examples = examples[: min(caps)]
    if not examples:
        raise UserError(f"test set {spec!r} ({source}) has no usable rows")
    return EvalSet(name=name, source=source, examples=examples)


def _bundled_test_split(task_seed: int) -> list[Example]:
    # The test split is drawn first from its own stream, so it does not depend on the other split sizes.
    with tempfile.TemporaryDirectory() as folder:
        paths = write_task_suite(folder, seed=task_seed, n_train=0, n_dev=0)
        examples, _ = read_examples(str(paths["test"]), "dolly")
    return examples


def unique_names(paths: Sequence[str]) -> list[str]:
    """Short names for model folders: the folder name, with parent folders added until all are unique."""
    parts = [Path(path).resolve().parts for path in paths]
    if len(set(parts)) != len(parts):
        raise UserError(f"the same model is given twice: {', '.join(paths)}")
    depth = 1
    while True:
        names = ["-".join(p[-depth:]).lstrip("/") or "model" for p in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1


def load_model_and_tokenizer(
    path: str, dtype: str = "fp32", device: str | None = None, trust_remote_code: bool = False
):
    """A model (a LoRA adapter folder is merged onto its base) and its tokenizer, on ``device``, in eval mode.

    An adapter folder's own tokenizer files are used when it has them, else its base model's.
    """
    tokenizer_path = path
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file() and not (Path(path) / "tokenizer_config.json").is_file():
        tokenizer_path = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
    model = load_causal_lm(path, dtype, trust_remote_code, role="model")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------------------------------------
# Evaluation on the dev split during training (every process takes part).


@torch.no_grad()
def dev_loss(
    model, dataset, collate, pad_token_id: int, batch_size: int, accelerator, vocab_size: int
) -> float:
    """Mean token cross-entropy of ``model`` on the ground-truth responses of ``dataset``; its rows are
    split over the processes of ``accelerator`` (an accelerate ``Accelerator``) and the sums reduced."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [sum CE, tokens]
    rows = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    for start in range(0, len(rows), batch_size):
        batch = collate([dataset[i] for i in rows[start : start + batch_size]], pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        labels = batch["labels"][batch["labels"] != IGNORE_INDEX]  # [N]
        logits = supervised_logits(model, batch, vocab_size)  # [N, V]
        total[0] += token_cross_entropy(logits, labels).double().sum()
        total[1] += labels.numel()
    total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    return float(total[0] / total[1].clamp_min(1))


def dev_rouge(model, tokenizer, examples, config: Config, distributed: Distributed, seed: int) -> float:
    """Mean ROUGE-L of sampled dev responses (rows sharded over processes, gathered in order)."""
    limit = config.train.eval_rouge_rows or len(examples)
    rows = examples[:limit]
    world_size = distributed.world_size
    mine = rows[distributed.rank :: world_size]
    predictions = generate_predictions(
        model,
        tokenizer,
        mine,
        config.generation,
        seed=seed,
        template=config.data.template,
        max_prompt_length=config.data.max_prompt_length,
        progress=False,
    )
    ordered: list[str] = [None] * len(rows)  # type: ignore[list-item]
    for rank, part in enumerate(distributed.gather(predictions)):  # rank order
        ordered[rank::world_size] = part
    return float(score_predictions(ordered, rows)["rougeL"])


# --------------------------------------------------------------------------------------------------------
# Outputs.


def prediction_rows(
    examples: Sequence[Example], prompts: Sequence[str], result: SeedResult
) -> list[dict[str, Any]]:
    """The rows of one ``seed<k>.jsonl`` file."""
    return [
        {
            "prompt": prompt,
            "references": list(example.references),
            "prediction": prediction,
            "rougeL": rouge,
            "exact_match": match,
            "length": length,
        }
        for example, prompt, prediction, rouge, match, length in zip(
            examples, prompts, result.predictions, result.rougeL, result.exact_match, result.lengths
        )
    ]


def summarize_dataset(results: Sequence[SeedResult]) -> dict[str, Any]:
    """Per-seed means, and mean and (sample) std over seeds, of ROUGE-L, exact match and generated length."""
    per_seed = {str(result.seed): result.means() for result in results}
    summary: dict[str, Any] = {"rows": len(results[0].predictions), "seeds": per_seed}
    for metric in ("rougeL", "exact_match", "length"):
        mean, std = summarize([means[metric] for means in per_seed.values()])
        summary[metric] = {"mean": mean, "std": std}
    return summary


def results_table(summary: dict[str, Any], metric: str = "rougeL") -> str:
    """A Markdown table: one row per model, one column per dataset, ``mean (std)`` over seeds."""
    models = summary["models"]
    datasets: list[str] = []
    for model in models.values():
        datasets += [name for name in model["datasets"] if name not in datasets]
    lines = [
        "| model | " + " | ".join(datasets) + " |",
        "|---|" + "---:|" * len(datasets),
    ]
    for model_name, model in models.items():
        cells = []
        for dataset in datasets:
            stats = model["datasets"].get(dataset)
            cells.append(f"{stats[metric]['mean']:.2f} ({stats[metric]['std']:.2f})" if stats else "-")
        lines.append(f"| {model_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# --------------------------------------------------------------------------------------------------------
# Command line.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    paper = PAPER_GENERATION
    parser.add_argument(
        "--model",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="Model folders (Hugging Face, or a LoRA adapter with adapter_config.json); repeatable.",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        action="extend",
        required=True,
        metavar="NAME_OR_PATH",
        help=f"Test sets: {', '.join(PAPER_TEST_SETS)} (under --data-root), {BUNDLED_TASKS!r} "
        "(the bundled suite's test split) or any file `distillm prepare` reads; repeatable.",
    )
    parser.add_argument(
        "--out", required=True, help="Output folder (predictions/, summary.json, results.md)."
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=list(PAPER_SEEDS), help="Sampling seeds.")
    parser.add_argument(
        "--data-root", default="data", help="Folder holding MiniLLM's data layout (dolly/...)."
    )
    parser.add_argument(
        "--limit", type=int, default=0, help="Evaluate the first N rows of each set (0: all)."
    )
    parser.add_argument(
        "--format", default="auto", help=f"Data format of file paths: {format_choices(', ')}."
    )
    parser.add_argument(
        "--template",
        choices=("alpaca", "chat"),
        default="alpaca",
        help="Prompt template for rows without a ready-made prompt.",
    )
    parser.add_argument(
        "--max-prompt-length", type=int, default=256, help="Prompt tokens kept (the last ones)."
    )
    parser.add_argument("--task-seed", type=int, default=0, help=f"Seed of the {BUNDLED_TASKS!r} suite.")
    generation = parser.add_argument_group("sampling (defaults: the paper's final evaluation)")
    generation.add_argument("--max-new-tokens", type=int, default=paper.max_new_tokens)
    generation.add_argument("--temperature", type=float, default=paper.temperature)
    generation.add_argument("--top-p", type=float, default=paper.top_p)
    generation.add_argument("--top-k", type=int, default=paper.top_k, help="0 turns it off.")
    generation.add_argument(
        "--no-repeat-ngram-size", type=int, default=paper.no_repeat_ngram_size, help="0 turns it off."
    )
    generation.add_argument("--greedy", action="store_true", help="Decode greedily (every seed then agrees).")
    generation.add_argument("--batch-size", type=int, default=paper.batch_size)
    generation.add_argument(
        "--no-pack-weights",
        dest="pack_weights",
        action="store_false",
        help="On CPU, decode with torch's own linear maps: no native kernel, no packed copy of the weights (slower).",
    )
    generation.add_argument(
        "--sampler",
        choices=("auto", "distillm", "generate"),
        default="auto",
        help="Decoding loop: distillm's, Hugging Face's model.generate, or auto (the faster one on the "
        "device type; generation.sampler).",
    )
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="Model weights' precision.")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="Default: cuda when available."
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="Allow model code from the hub to run."
    )


def _generation_config(args: argparse.Namespace) -> GenerationConfig:
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        do_sample=not args.greedy,
        batch_size=args.batch_size,
        pack_weights=args.pack_weights,
        sampler=args.sampler,
    )
    config.validate("generation")
    return config


def run(args: argparse.Namespace) -> int:
    evaluate_models(
        args.model,
        args.data,
        args.out,
        _generation_config(args),
        seeds=args.seeds,
        data_root=args.data_root,
        format=args.format,
        limit=args.limit,
        template=args.template,
        max_prompt_length=args.max_prompt_length,
        task_seed=args.task_seed,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    return 0


def evaluate_models(
    models: Sequence[str],
    data: Sequence[str],
    out: str | Path,
    generation: GenerationConfig = PAPER_GENERATION,
    seeds: Sequence[int] = PAPER_SEEDS,
    data_root: str | Path = "data",
    format: str = "auto",
    limit: int = 0,
    template: str = "alpaca",
    max_prompt_length: int = 256,
    task_seed: int = 0,
    dtype: str = "fp32",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """``distillm evaluate``: sample every model's responses to every test set over ``seeds``, score them and
    write ``out``/predictions/, summary.json (last) and results.md; returns the summary.

    ``models``: model folders; ``data``: test set names or files (``load_eval_set``); the other arguments
    are the command's options of the same names (their defaults too).
    """
    generation.validate("generation")
    seeds = list(seeds)
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {seeds} repeats a seed; give distinct seeds")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is available; use --device cpu")
    eval_sets = [load_eval_set(spec, data_root, format, limit, task_seed) for spec in data]
    set_names = [eval_set.name for eval_set in eval_sets]
    if len(set(set_names)) != len(set_names):
        raise UserError(f"two test sets share a name ({', '.join(set_names)}); give files distinct names")

    out = Path(out)
    summary: dict[str, Any] = {
        "settings": {
            "generation": asdict(generation),
            "seeds": seeds,
            "template": template,
            "max_prompt_length": max_prompt_length,
            "dtype": dtype,
            "std": "sample standard deviation over seeds (n - 1 denominator)",
        },
        "datasets": {
            eval_set.name: {"source": eval_set.source, "rows": len(eval_set.examples)}
            for eval_set in eval_sets
        },
        "models": {},
    }
    for model_name, path in tqdm(list(zip(unique_names(models), models)), desc="models", unit="model"):
        model, tokenizer = load_model_and_tokenizer(path, dtype, device, trust_remote_code)
        model_summary: dict[str, Any] = {"path": str(path), "datasets": {}}
        summary["models"][model_name] = model_summary
        for eval_set in eval_sets:
            results = evaluate_model(
                model,
                tokenizer,
                eval_set.examples,
                generation,
                seeds,
                template,
                max_prompt_length,
                progress=True,
                description=f"{model_name} / {eval_set.name}",
            )
            prompts = render_prompts(eval_set.examples, template, tokenizer)
            for result in results:
                rows = prediction_rows(eval_set.examples, prompts, result)
                _write_jsonl(
                    out / "predictions" / model_name / eval_set.name / f"seed{result.seed}.jsonl", rows
                )
            model_summary["datasets"][eval_set.name] = stats = summarize_dataset(results)
            logger.info(
                "%s on %s: ROUGE-L %.2f (%.2f) over %d seeds, %d rows",
                model_name,
                eval_set.name,
                stats["rougeL"]["mean"],
                stats["rougeL"]["std"],
                len(results),
                stats["rows"],
            )
        del model
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")  # last: the run is complete
    table = results_table(summary)
    atomic_write_text(
        out / "results.md", f"ROUGE-L, mean (std) over seeds {', '.join(map(str, seeds))}\n\n" + table
    )
    logger.info("wrote %s and %s\n%s", out / "summary.json", out / "results.md", table)
    return summary
