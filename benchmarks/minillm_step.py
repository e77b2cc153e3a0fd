"""Seconds per MiniLLM rollout cycle and per PPO step (generation / teacher / student) on the vs-TRL tiny pair.

    .venv/bin/python benchmarks/minillm_step.py                      # vocabularies 1,024 and 50,257, 3 repeats
    .venv/bin/python benchmarks/minillm_step.py --vocabs 1024 --repeats 5

The pair is ``benchmarks/vs_trl.py``'s (built by its ``prepare``): a GPT-2-shaped teacher (4 layers, hidden
256) and student (2 layers, hidden 128), random weights, dropout 0, a BPE tokenizer of 1,024 tokens on the
bundled task suite, and models whose embedding and head have ``--model-vocab`` rows (50,257: GPT-2's size;
the extra rows are never produced by the tokenizer but every position scores and samples over all of them).

Each (vocabulary, repeat) is one ``distillm train`` run of ``loop: minillm`` in its own process: cycles of
``--rollouts`` teacher-mixed rollouts (a = 0.2, up to ``--max-new-tokens`` new tokens, ``--rollouts`` prompts
per sampling call), each followed by 4 PPO epochs of micro-batch ``--batch-size``; fp32 on CPU, no pretraining
term, no evaluation. From its metrics.jsonl: a cycle's ``generation_s`` (both models decoding with their KV
caches) and, per PPO step, the teacher's forward (``teacher_s``: the single-step term's logits) and the
student's forward + backward + optimizer step (``student_s``). The first cycle and its steps are warm-up and
dropped. Printed: the median over the remaining cycles / steps of all repeats, with ``uptime``'s load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_once(paths: dict[str, str], out: Path, args: argparse.Namespace, chunk_size: int) -> list[dict]:
    steps_per_cycle = 4 * args.rollouts // args.batch_size
    overrides = {
        "loop": "minillm",
        "model.student": paths["student"],
        "model.teacher": paths["teacher"],
        "data.train": paths["train"],
        "data.dev": paths["train"],
        "data.max_length": 192,
        "data.max_prompt_length": 128,
        "data.cache_dir": out.parent / "cache",
        "train.output_dir": out,
        "train.max_steps": steps_per_cycle * args.cycles,
        "train.batch_size": args.batch_size,
        "train.eval_every": 10**6,
        "train.save_every": 10**6,
        "train.log_every": 1,
        "train.progress": False,
        "train.lr": 5e-4,
        "train.scheduler": "constant",
        "minillm.num_rollouts": args.rollouts,
        "minillm.lm_coef": 0.0,
        "objective.chunk_size": chunk_size,
        "generation.max_new_tokens": args.max_new_tokens,
        "generation.batch_size": args.rollouts,
        "seed": 1,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "distillm", "train", *[f"{k}={v}" for k, v in overrides.items()]]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def figures(rows: list[dict]) -> dict[str, list[float]]:
    """Per cycle (after the first): generation seconds; per PPO step of those cycles: teacher, student."""
    steps = [r for r in rows if "loss" in r and r["cycle"] > 0]
    return {
        "cycle_generation": [r["generation_s"] for r in steps if "rollout_tokens" in r],
        "rollout_tokens": [r["rollout_tokens"] for r in steps if "rollout_tokens" in r],
        "step_teacher": [r["teacher_s"] for r in steps],
        "step_student": [r["student_s"] for r in steps],
        "step_total": [r["teacher_s"] + r["student_s"] for r in steps],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocabs", type=int, nargs="+", default=[1024, 50257], help="model vocabularies")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=3, help="rollout cycles per run (the first is warm-up)")
    parser.add_argument("--rollouts", type=int, default=16, help="minillm.num_rollouts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=128,
        help="objective.chunk_size at vocabularies above 1,024 (0: dense)",
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vs_trl import prepare

    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    print(f"CPU: {cpu[0].split(':', 1)[1].strip() if cpu else '?'}, {os.cpu_count()} logical cores")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        base = args.workdir or Path(scratch)
        for vocab in args.vocabs:
            setup = argparse.Namespace(rows=256, vocab=1024, model_vocab=vocab)
            paths = prepare(base / f"pair-{vocab}", setup)
            chunk = args.chunk_size if vocab > 1024 else 0
            merged: dict[str, list[float]] = {}
            for repeat in range(args.repeats):
                rows = run_once(paths, base / f"run-{vocab}-{repeat}" / "run", args, chunk)
                for key, values in figures(rows).items():
                    merged.setdefault(key, []).extend(values)
            results[vocab] = (chunk, merged)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(
        f"\n{args.rollouts} rollouts per cycle (up to {args.max_new_tokens} new tokens), 4 PPO epochs of batch "
        f"{args.batch_size} = {4 * args.rollouts // args.batch_size} steps per cycle; {args.repeats} repeats x "
        f"{args.cycles - 1} timed cycles; medians\n"
    )
    print(
        "| model vocab | chunk_size | rollout cycle s (generation) | rollout tokens | PPO step s | teacher s | student s |"
    )
    print("|---|---|---|---|---|---|---|")
    for vocab, (chunk, merged) in results.items():
        median = {key: statistics.median(values) for key, values in merged.items()}
        print(
            f"| {vocab:,} | {chunk} | {median['cycle_generation']:.2f} | {median['rollout_tokens']:.0f} | "
            f"{median['step_total']:.3f} | {median['step_teacher']:.3f} | {median['step_student']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
