"""Seconds per optimizer step: `distillm.train.train` against TRL's `GKDTrainer`, same models, data, settings.

    .venv/bin/pip install trl torch==2.13.0           # the optional `bench` extra; keep the CPU torch pin
    .venv/bin/python benchmarks/vs_trl.py          # both settings, 3 repeats of 3 warm-up + 20 timed steps
    .venv/bin/python benchmarks/vs_trl.py --settings gkd --steps 10 --repeats 2
    .venv/bin/python benchmarks/vs_trl.py --profile ours --settings gkd    # cProfile of our loop: hot spots
    .venv/bin/python benchmarks/vs_trl.py --model-vocab 50257 --steps 5 --warmup 1  # GPT-2's vocabulary size
    # what our options that TRL lacks buy (no longer equal settings):
    .venv/bin/python benchmarks/vs_trl.py --ours-overrides objective.chunk_size=512 model.teacher_dtype=bf16

Two settings:

- ``kd``: plain KD on the dataset's responses, no student generation. TRL ``lmbda=0, beta=0``; ours
  ``objective.divergence=forward_kl, sources.kind=dataset``. TRL's ``beta`` weighs the teacher in the
  mixture, m = beta p + (1 - beta) q, loss = beta KL(p || m) + (1 - beta) KL(q || m) (p teacher, q student),
  and special-cases beta=0 as KL(p || q), forward KL, and beta=1 as KL(q || p), reverse KL
  (`trl/experimental/gkd/gkd_trainer.py`, ``generalized_jsd_loss``). So both minimise KL(teacher || student).
- ``gkd``: student generation on half of the steps. TRL ``lmbda=0.5, beta=--beta``; ours
  ``sources.kind=mixed, sources.student_ratio=0.5, objective.divergence=generalized_jsd,
  objective.jsd_beta=--beta`` (the same mixture convention, so the same objective).

Common set-up, built once in ``--workdir``: the bundled task suite (train split), a byte-level BPE tokenizer
trained on it, a GPT-2-shaped teacher (4 layers, hidden 256) and student (2 layers, hidden 128) with random
weights and dropout 0 (TRL turns dropout off by itself; ours keeps the model's, so 0 makes the compute
equal). The models' embedding and head have the tokenizer's ``--vocab`` rows, or ``--model-vocab`` rows (a
real LM's size: GPT-2 50,257, Llama 32,000, SmolLM2 49,152) while the tokenizer stays the suite's: the extra
rows are never produced by the tokenizer, but both trainers score every row (ours reconciles to the models'
common size, ``models.shared_vocab_size``; TRL uses the logits as they come) and both sample from all of
them, so each side's work per position is what it would be with a real vocabulary. Both trainers: fp32 on CPU, batch ``--batch-size``, AdamW (lr 5e-4, weight decay 0.01), cosine
schedule, clipping at 1, gradient accumulation 1, no evaluation, no checkpoints until the end, progress bars
off, each trainer's default logging (ours: metrics.jsonl every 10 steps; TRL: logs every 10 steps).
TRL's own defaults of gradient checkpointing and bf16 are turned off to match.

Same data, same order: TRL reads a "messages" dataset ([user: the rendered Alpaca prompt, assistant: the
response]) through its default ``DataCollatorForChatML``; the tokenizer carries a chat template that renders
those messages verbatim followed by EOS, so TRL tokenizes exactly the text ours tokenizes. The TRL dataset is
put in the order of our first epoch's batches and read sequentially, so step k of both holds the same rows.
The set-up checks, row by row, that both tokenizations give the same prompt and response tokens and prints
the count of rows that differ. What remains different, by design of each trainer: TRL feeds the final EOS as
an input too (its sequences are one token wider), pads on the left (ours on the right), tokenizes each batch
inside the step (ours tokenizes once, before training), and generates with ``model.generate`` (ours with
``distillm.generation.sample``); which steps generate follows each trainer's own coin.

Timing: a global optimizer step hook records the end of each optimizer step; a step's time is the gap between
two ends (data, generation, teacher, student, optimizer, logging: everything). Each (setting, trainer,
repeat) runs in its own process; the two trainers run interleaved (A B B A ...) so background load on a
shared machine hits both alike. The table shows, per setting, the median over the timed steps of all repeats.
In ``gkd`` the steps with and without generation are timed separately, and the per-step figure is their
mixture at the configured ratio, 0.5 g + 0.5 d, so the coin's luck in 20 draws does not move it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = ("kd", "gkd")
TRAINERS = ("ours", "trl")
STUDENT_RATIO = 0.5  # the gkd setting's share of steps on student-generated outputs (TRL's lmbda)
# The chat template TRL's collator applies: the user message is the already rendered prompt, the assistant
# message the response; EOS closes the response, as our encoding does.
VERBATIM_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


# --------------------------------------------------------------------------------------------------------
# Set-up: data, tokenizer, models.


def prepare(workdir: Path, args: argparse.Namespace) -> dict[str, str]:
    """Write the task suite, train the tokenizer, build and save teacher and student; return their paths."""
    from distillm.data import read_examples, render_prompt, write_task_suite
    from distillm.models import build_small_model
    from distillm.tokenizer import train_bpe_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    paths = write_task_suite(workdir / "data", seed=0, n_train=args.rows, n_dev=16, n_test=16)
    examples, _ = read_examples(str(paths["train"]), "dolly")
    texts = [render_prompt(example, "alpaca") + example.response for example in examples]
    tokenizer = train_bpe_tokenizer(texts, args.vocab)
    tokenizer.chat_template = VERBATIM_TEMPLATE
    model_vocab = args.model_vocab or len(tokenizer)
    if model_vocab < len(tokenizer):
        raise SystemExit(f"--model-vocab {model_vocab} is below the tokenizer's {len(tokenizer)} tokens")
    shapes = {"teacher": (4, 256, 4, 1), "student": (2, 128, 4, 2)}  # layers, hidden, heads, seed
    out = {"train": str(paths["train"])}
    for role, (layers, hidden, heads, seed) in shapes.items():
        model = build_small_model(
            "gpt2",
            vocab_size=model_vocab,
            seed=seed,
            layers=layers,
            hidden=hidden,
            heads=heads,
            positions=256,
            eos_token_id=tokenizer.eos_token_id,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        folder = workdir / role
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        out[role] = str(folder)
    return out


def row_order(num_rows: int, batch_size: int, seed: int, steps: int) -> list[int]:
    """The dataset rows of our loop's first ``steps`` micro-batches, in order (one process)."""
    from distillm.train import BatchOrder

    order = BatchOrder(num_rows, batch_size, seed)
    if steps > order.batches_per_epoch:
        raise SystemExit(f"{steps} steps need more than one epoch of {num_rows} rows; raise --rows")
    return [i for index in range(steps) for i in order.indices(0, index)]


def messages_dataset(train_path: str, rows: list[int]):
    """TRL's input: a "messages" dataset of the given rows, in that order."""
    from datasets import Dataset

    from distillm.data import read_examples, render_prompt

    examples, _ = read_examples(train_path, "dolly")
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": render_prompt(examples[i], "alpaca")},
                    {"role": "assistant", "content": examples[i].response},
                ]
            }
            for i in rows
        ]
    )


def compare_tokenization(paths: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    """Row-by-row: do TRL's collator and our encoding give the same prompt and response tokens?"""
    from transformers import AutoTokenizer
    from trl.experimental.utils import DataCollatorForChatML

    from distillm.data import encode_example, read_examples, render_prompt

    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=args.max_length)
    examples, _ = read_examples(paths["train"], "dolly")
    rows = row_order(len(examples), args.batch_size, args.seed, args.warmup + args.steps)
    dataset = messages_dataset(paths["train"], rows)
    differ = 0
    prompt_tokens = response_tokens = 0
    for i, row in zip(rows, dataset):
        prompt, response = encode_example(
            render_prompt(examples[i], "alpaca"),
            examples[i].response,
            tokenizer,
            args.max_length,
            args.max_prompt_length,
        )
        batch = collator([row])
        ids = batch["input_ids"][0].tolist()  # one row: no padding
        theirs_prompt = batch["prompts"][0].tolist()
        theirs_response = ids[len(theirs_prompt) :]
        differ += int(theirs_prompt != prompt or theirs_response != response)
        prompt_tokens += len(prompt)
        response_tokens += len(response)
    return {
        "rows": len(rows),
        "rows_differing": differ,
        "mean_prompt_tokens": prompt_tokens / len(rows),
        "mean_response_tokens": response_tokens / len(rows),
    }


# --------------------------------------------------------------------------------------------------------
# Workers: one trainer, one setting, one process. Both record the same things through the same hooks.


class StepRecorder:
    """End time of every optimizer step, whether it trained on generated outputs, and the trained width."""

    def __init__(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.ends: list[float] = []
        self.generated: list[bool] = []
        self.widths: list[int] = []
        self._generated = False
        self._width = 0
        register_optimizer_step_post_hook(self._on_step)

    def _on_step(self, *_: object) -> None:
        self.ends.append(time.perf_counter())
        self.generated.append(self._generated)
        self.widths.append(self._width)
        self._generated = False

    def mark_generated(self) -> None:
        self._generated = True

    def mark_width(self, width: int) -> None:
        self._width = width

    def result(self, warmup: int) -> dict[str, list]:
        """Per timed step: seconds (gap to the previous step's end), generated?, trained sequence width."""
        seconds = [b - a for a, b in zip(self.ends, self.ends[1:])]  # seconds[k] belongs to step k + 2
        first = warmup  # step warmup + 1 is the first timed one, at seconds[warmup - 1]
        return {
            "seconds": seconds[first - 1 :],
            "generated": self.generated[first:],
            "widths": self.widths[first:],
        }


def run_ours(paths: dict[str, str], args: argparse.Namespace, recorder: StepRecorder, out: Path) -> None:
    import distillm.sources
    import distillm.train
    from distillm.config import load_config

    generate, teacher_forward = distillm.sources.Sources._generate, distillm.train.teacher_forward

    def recorded_generate(self, *a, **k):
        recorder.mark_generated()
        return generate(self, *a, **k)

    def recorded_teacher_forward(teacher, batch, *a, **k):
        recorder.mark_width(batch["input_ids"].shape[1])
        return teacher_forward(teacher, batch, *a, **k)

    distillm.sources.Sources._generate = recorded_generate
    distillm.train.teacher_forward = recorded_teacher_forward
    steps = args.warmup + args.steps
    divergence = ["objective.divergence=forward_kl"]
    if args.setting == "gkd":
        divergence = ["objective.divergence=generalized_jsd", f"objective.jsd_beta={args.beta}"]
    overrides = [
        f"seed={args.seed}",
        f"model.student={paths['student']}",
        f"model.teacher={paths['teacher']}",
        f"data.train={paths['train']}",
        "data.dev=null",
        "data.dev_size=0",
        f"data.max_length={args.max_length}",
        f"data.max_prompt_length={args.max_prompt_length}",
        f"data.cache_dir={out / 'cache'}",
        *divergence,
        "objective.kd_ratio=1.0",
        f"sources.kind={'mixed' if args.setting == 'gkd' else 'dataset'}",
        f"sources.student_ratio={STUDENT_RATIO}",
        f"generation.max_new_tokens={args.max_new_tokens}",
        f"train.output_dir={out / 'run'}",
        f"train.max_steps={steps}",
        f"train.batch_size={args.batch_size}",
        "train.lr=5e-4",
        "train.weight_decay=0.01",
        "train.clip_grad=1.0",
        "train.scheduler=cosine",
        f"train.eval_every={steps}",
        f"train.save_every={steps}",
        "train.precision=fp32",
        "train.progress=false",
        "train.resume=false",
        *args.ours_overrides,  # off the equal-settings comparison: say so when reporting
    ]
    distillm.train.train(load_config(None, overrides))


def run_trl(paths: dict[str, str], args: argparse.Namespace, recorder: StepRecorder, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    generate, compute_loss = GKDTrainer.generate_on_policy_outputs, GKDTrainer.compute_loss

    def recorded_generate(*a, **k):
        recorder.mark_generated()
        return generate(*a, **k)

    def recorded_compute_loss(self, model, inputs, *a, **k):
        recorder.mark_width(inputs["input_ids"].shape[1])
        return compute_loss(self, model, inputs, *a, **k)

    GKDTrainer.generate_on_policy_outputs = staticmethod(recorded_generate)
    GKDTrainer.compute_loss = recorded_compute_loss
    steps = args.warmup + args.steps
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    student = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32)
    rows = row_order(_num_rows(paths), args.batch_size, args.seed, steps)
    config = GKDConfig(
        output_dir=str(out / "run"),
        seed=args.seed,
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=5e-4,
        weight_decay=0.01,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        lmbda=STUDENT_RATIO if args.setting == "gkd" else 0.0,
        beta=args.beta if args.setting == "gkd" else 0.0,  # 0: forward KL, KL(teacher || student)
        temperature=1.0,  # sampling temperature (TRL's default is 0.9; ours samples at 1)
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",  # rows already in our loop's order
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=messages_dataset(paths["train"], rows),
        processing_class=tokenizer,
    )
    trainer.train()


def _num_rows(paths: dict[str, str]) -> int:
    from distillm.data import read_examples

    return len(read_examples(paths["train"], "dolly")[0])


def worker(args: argparse.Namespace) -> dict:
    paths = json.loads(args.paths)
    out = Path(tempfile.mkdtemp(prefix=f"vs-trl-{args.trainer}-{args.setting}-", dir=args.workdir))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    recorder = StepRecorder()
    runner = run_ours if args.trainer == "ours" else run_trl
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(runner, paths, args, recorder, out)
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(25)  # where the CPU time itself goes
        # Which of the trainers' own functions (and generate) the time is spent under.
        stats.sort_stats("cumulative").print_stats(r"distillm/|trl/|generation/utils|trainer\.py", 40)
    else:
        runner(paths, args, recorder, out)
    return recorder.result(args.warmup)


# --------------------------------------------------------------------------------------------------------
# Driver: interleaved runs and the table.


def run_worker(args: argparse.Namespace, paths: dict[str, str], trainer: str, setting: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--trainer",
        trainer,
        "--setting",
        setting,
        "--paths",
        json.dumps(paths),
        *_shared_flags(args),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-5000:])
        raise SystemExit(f"{trainer}/{setting} worker failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return [
        f"--workdir={args.workdir}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--batch-size={args.batch_size}",
        f"--max-length={args.max_length}",
        f"--max-prompt-length={args.max_prompt_length}",
        f"--max-new-tokens={args.max_new_tokens}",
        f"--beta={args.beta}",
        f"--seed={args.seed}",
        f"--threads={args.threads}",
        *(["--ours-overrides", *args.ours_overrides] if args.ours_overrides else []),
    ]


def summarise(runs: list[dict], setting: str) -> dict[str, float]:
    """Pooled medians over the timed steps of all runs; for gkd, per step kind and their mixture."""
    seconds = [s for run in runs for s in run["seconds"]]
    generated = [g for run in runs for g in run["generated"]]
    widths = [w for run in runs for w in run["widths"]]
    data = [s for s, g in zip(seconds, generated) if not g]
    fresh = [s for s, g in zip(seconds, generated) if g]
    summary = {
        "steps": len(seconds),
        "generated_steps": len(fresh),
        "mean": statistics.fmean(seconds),
        "run_medians": [statistics.median(run["seconds"]) for run in runs],
        "width_dataset": statistics.fmean(w for w, g in zip(widths, generated) if not g) if data else 0.0,
        "width_generated": statistics.fmean(w for w, g in zip(widths, generated) if g) if fresh else 0.0,
        "dataset_median": statistics.median(data) if data else float("nan"),
        "generated_median": statistics.median(fresh) if fresh else float("nan"),
    }
    if setting == "gkd":
        summary["per_step"] = (
            STUDENT_RATIO * summary["generated_median"] + (1 - STUDENT_RATIO) * summary["dataset_median"]
        )
    else:
        summary["per_step"] = statistics.median(seconds)
    return summary


def paired_ratios(runs: dict[str, list[dict]], setting: str) -> list[float]:
    """TRL / ours per repeat, from the two runs made back to back (load drift between repeats cancels)."""
    return [
        summarise([theirs], setting)["per_step"] / summarise([ours], setting)["per_step"]
        for ours, theirs in zip(runs["ours"], runs["trl"])
    ]


def print_table(
    results: dict[str, dict[str, dict]], runs: dict[str, dict[str, list[dict]]], args: argparse.Namespace
) -> None:
    print()
    print(
        "| setting | ours s/step | TRL s/step | TRL / ours | paired TRL / ours per repeat "
        "| ours run medians | TRL run medians |"
    )
    print("|---|---:|---:|---:|---|---|---|")
    for setting, by_trainer in results.items():
        ours, trl = by_trainer["ours"], by_trainer["trl"]
        spread = {k: ", ".join(f"{m:.3f}" for m in v["run_medians"]) for k, v in by_trainer.items()}
        paired = ", ".join(f"{r:.2f}" for r in paired_ratios(runs[setting], setting))
        print(
            f"| {setting} | {ours['per_step']:.4f} | {trl['per_step']:.4f} | "
            f"{trl['per_step'] / ours['per_step']:.2f}x | {paired} | {spread['ours']} | {spread['trl']} |"
        )
    if "gkd" in results:
        print()
        print("gkd by step kind (median s/step; steps timed; mean trained sequence width):")
        print("| trainer | dataset steps | generated steps | per step (0.5 g + 0.5 d) | measured mean |")
        print("|---|---:|---:|---:|---:|")
        for trainer, s in results["gkd"].items():
            print(
                f"| {trainer} | {s['dataset_median']:.4f} ({s['steps'] - s['generated_steps']}; "
                f"w {s['width_dataset']:.1f}) | {s['generated_median']:.4f} ({s['generated_steps']}; "
                f"w {s['width_generated']:.1f}) | {s['per_step']:.4f} | {s['mean']:.4f} |"
            )
        ours, trl = results["gkd"]["ours"], results["gkd"]["trl"]
        print(
            f"ratios TRL / ours: dataset steps {trl['dataset_median'] / ours['dataset_median']:.2f}x, "
            f"generated steps {trl['generated_median'] / ours['generated_median']:.2f}x"
        )
    if "kd" in results:
        kd = results["kd"]
        print(
            f"\nkd mean trained sequence width: ours {kd['ours']['width_dataset']:.1f}, "
            f"TRL {kd['trl']['width_dataset']:.1f} (TRL also feeds the final EOS as an input)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (setting, trainer)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=192, help="prompt + response tokens")
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.1, help="generalized JSD beta of the gkd setting")
    parser.add_argument("--vocab", type=int, default=1024, help="tokenizer vocabulary (the demo's 1024)")
    parser.add_argument(
        "--model-vocab",
        type=int,
        default=0,
        help="rows of the models' embedding and head (e.g. 50257, GPT-2's); 0: the tokenizer's size. "
        "The tokenizer stays the suite's: the extra rows are never produced by it, but both trainers score "
        "and sample over all of them, as they would with a real LM's vocabulary",
    )
    parser.add_argument("--rows", type=int, default=4000, help="task-suite training rows")
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker; 0: torch's default")
    parser.add_argument(
        "--ours-overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides for our trainer only (e.g. objective.chunk_size=512 "
        "model.teacher_dtype=bf16): what ours gains from options TRL lacks; no longer equal settings",
    )
    parser.add_argument("--workdir", help="folder for data, models and runs (default: a temporary one)")
    parser.add_argument(
        "--profile", choices=TRAINERS, help="run one trainer once per setting under cProfile, print hot spots"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trainer", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step has no previous step end to time from)")

    if args.worker:
        result = worker(args)
        print(json.dumps(result))
        return 0

    import torch
    import trl

    args.workdir = args.workdir or tempfile.mkdtemp(prefix="vs-trl-")
    paths = prepare(Path(args.workdir), args)
    check = compare_tokenization(paths, args)
    print(
        f"torch {torch.__version__} ({args.threads or torch.get_num_threads()} threads), "
        f"trl {trl.__version__}, CPU fp32; "
        f"batch {args.batch_size}, max_length {args.max_length}, max_prompt_length {args.max_prompt_length}, "
        f"max_new_tokens {args.max_new_tokens}, gkd beta {args.beta}, tokenizer {args.vocab}, "
        f"model vocabulary {args.model_vocab or args.vocab}; {args.warmup} warm-up + {args.steps} "
        f"timed steps x {args.repeats} repeats"
    )
    if args.ours_overrides:
        print(f"ours also runs with {' '.join(args.ours_overrides)} (not equal settings)")
    print(
        f"tokenization of the {check['rows']} rows used: {check['rows_differing']} differ between TRL's "
        f"collator and ours; mean prompt {check['mean_prompt_tokens']:.1f}, response "
        f"{check['mean_response_tokens']:.1f} tokens (EOS included)"
    )
    if args.profile:
        for setting in args.settings:
            args.setting, args.trainer = setting, args.profile
            command = [sys.executable, __file__, "--worker", "--trainer", args.profile, "--setting", setting]
            command += ["--paths", json.dumps(paths), "--profile", args.profile, *_shared_flags(args)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            subprocess.run(command, check=True, env=env)  # the profile goes to stderr
        return 0

    runs: dict[str, dict[str, list[dict]]] = {s: {t: [] for t in TRAINERS} for s in args.settings}
    for repeat in range(args.repeats):
        for setting in args.settings:
            order = TRAINERS if repeat % 2 == 0 else TRAINERS[::-1]  # A B, then B A: drift hits both alike
            for trainer in order:
                result = run_worker(args, paths, trainer, setting)
                runs[setting][trainer].append(result)
                print(
                    f"  repeat {repeat + 1} {setting:>3} {trainer:>4}: median "
                    f"{statistics.median(result['seconds']):.4f} s/step over {len(result['seconds'])} steps, "
                    f"{sum(result['generated'])} with generation",
                    flush=True,
                )
    results = {s: {t: summarise(runs[s][t], s) for t in TRAINERS} for s in args.settings}
    print_table(results, runs, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
