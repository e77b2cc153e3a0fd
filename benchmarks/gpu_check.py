"""The GPU check: every section of benchmarks/README.md's "GPU check", time-boxed, into one Markdown file.

Run it through `benchmarks/gpu_check.sh`, which installs the carried wheels and puts `src/` on the path:

    benchmarks/gpu_check.sh                  # on the lent GPU machine: writes $OUT/gpu_check.md
    benchmarks/gpu_check.sh --tiny           # anywhere: tiny shapes, checks that every section runs
    benchmarks/gpu_check.sh --out DIR        # another folder for the report

Sections (each a child process with its own time limit, so one failure or hang is recorded and the next
section still runs; the limits add up to under 8 minutes):

1. `cli`: `distillm train` with the GPT-2 presets of SFT, KD, GKD and DistiLLM (and MiniLLM's, once
   configs/gpt2 has one) for a few steps in bf16 on random GPT-2-medium-shaped teacher and student (vocabulary
   50,257), then `distillm evaluate` of the DistiLLM student with each sampler: no error, finite losses,
   seconds per step;
2. `distill_step`: benchmarks/distill_step.py (GPT-2 XL-shaped teacher into GPT-2-shaped student, bf16,
   8 x 512): s/step, tokens/s, MFU against the matmul peak measured in the same run, peak memory, dense vs
   chunked loss;
3. `liger`: benchmarks/liger_jsd.py at Liger's benchmark shape and GPT-2 XL's;
4. `sampling`: benchmarks/generation.py, our sampler against `model.generate` (batch 32, 256 new tokens),
   and which one `generation.sampler=auto` should run on this device;
5. `tests`: the tests marked `gpu`, and the training-loop tests of every method preset, which run on CUDA
   there (accelerate picks the device).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
PRESETS = ROOT / "configs" / "gpt2"
# Seconds each section may take, full and --tiny; together under 8 minutes with the set-up around them.
# --tiny runs on 2 shared CPU cores, where each `distillm train` costs ~40 s of imports and set-up.
LIMITS = {
    "cli": (190, 600),
    "distill_step": (50, 180),
    "liger": (120, 180),  # two shapes, each a process that also compiles Liger's chunked loss
    "sampling": (60, 180),
    "tests": (35, 300),
}
# Test files whose training and evaluation runs pick CUDA by themselves where it is there (accelerate), so that
# CPU tests which pass here but fail on CUDA show; plus every test marked `gpu`.
CUDA_TESTS = (
    "tests/test_train.py::test_each_method_preset_trains_and_lowers_its_objective_on_a_fixed_batch",
)
PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "tokenizers",
    "safetensors",
    "triton",
    "liger-kernel",
    "rouge-score",
    "nltk",
)
MFU_GOAL = 0.40


# ---- running a child process within a time limit ---------------------------------------------------------


@dataclass
class Run:
    command: list[str]
    returncode: int | None  # None: killed at its time limit
    seconds: float
    output: str

    @property
    def status(self) -> str:
        if self.returncode is None:
            return f"timed out after {self.seconds:.0f} s"
        return "ok" if self.returncode == 0 else f"failed (exit {self.returncode})"


def run(command: list[str], timeout: float, log: Path) -> Run:
    """``command`` with stdout and stderr into ``log``; killed with its children after ``timeout`` seconds."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        try:
            returncode: int | None = process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the children go too
            process.wait()
            returncode = None
    output = log.read_text(encoding="utf-8", errors="replace")
    return Run(command, returncode, time.perf_counter() - start, output)


def tail(text: str, limit: int = 2500) -> str:
    text = text.strip()
    return text if len(text) <= limit else "...\n" + text[-limit:]


def json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


# ---- section 0: the machine ---------------------------------------------------------------------------------


def environment() -> str:
    import torch

    lines = [f"- Python {platform.python_version()} ({sys.executable}), {os.cpu_count()} CPUs"]
    cuda = torch.cuda.is_available()
    lines.append(
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    )
    if cuda:
        props = torch.cuda.get_device_properties(0)
        lines.append(
            f"- device: **{torch.cuda.get_device_name(0)}**, {props.total_memory / 2**30:.0f} GiB, compute "
            f"capability {props.major}.{props.minor}, {torch.cuda.device_count()} device(s), bf16 "
            f"{'supported' if torch.cuda.is_bf16_supported() else 'not supported'}"
        )
    else:
        lines.append("- device: **none (CPU only)**: the figures below are a check that the script runs")
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
            result = subprocess.run(
                [smi, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            )
            lines.append(f"- nvidia-smi: {result.stdout.strip() or result.stderr.strip()}")
        except (OSError, subprocess.SubprocessError) as error:
            lines.append(f"- nvidia-smi failed: {error}")
    else:
        lines.append("- nvidia-smi: not found")
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} missing")
    lines.append("- packages: " + ", ".join(versions))
    return "\n".join(lines)


# ---- section 1: the CLI on CUDA -------------------------------------------------------------------------------

CLI_SHAPES = {
    # GPT-2 medium (24 layers, 1024 wide, 16 heads) for both, GPT-2's 50,257-token vocabulary.
    "full": dict(
        teacher=(24, 1024, 16), student=(24, 1024, 16), vocab=50257, steps=8, batch=8, new_tokens=None
    ),
    "tiny": dict(teacher=(2, 64, 4), student=(2, 32, 2), vocab=1024, steps=3, batch=4, new_tokens=8),
}


def cli_methods() -> list[str]:
    """The methods whose GPT-2 medium preset exists (MiniLLM joins once configs/gpt2 has its preset)."""
    methods = ["sft", "kd", "gkd", "distillm", "minillm"]
    return [m for m in methods if (PRESETS / f"{m}-medium.yaml").is_file()]


def prepare_cli(work: Path, shape: dict, device: str) -> dict[str, Path]:
    """The task suite, a pretraining text, a BPE tokenizer and random teacher and student, saved."""
    import torch

    from distillm.data import read_examples, render_prompt, write_task_suite
    from distillm.data.template import template_segments
    from distillm.models import build_small_model
    from distillm.tokenizer import train_bpe_tokenizer

    paths = write_task_suite(work / "data", seed=0, n_train=96, n_dev=16, n_test=16)
    examples, _ = read_examples(str(paths["train"]), "dolly")
    texts = [render_prompt(example, "alpaca") + example.references[0] for example in examples]
    paths["pretrain"] = work / "data" / "pretrain.txt"
    paths["pretrain"].write_text("\n".join(e.references[0] for e in examples) + "\n", encoding="utf-8")
    tokenizer = train_bpe_tokenizer(texts, 600, phrases=template_segments())
    if len(tokenizer) > shape["vocab"]:
        raise RuntimeError(f"tokenizer of {len(tokenizer)} tokens exceeds the models' vocabulary")
    for role, seed in (("teacher", 1), ("student", 2)):
        layers, hidden, heads = shape[role]
        with torch.device(device):  # random init where the model runs: seconds, not minutes, at 355M
            model = build_small_model(
                "gpt2",
                shape["vocab"],
                seed=seed,
                layers=layers,
                hidden=hidden,
                heads=heads,
                positions=1024,
                eos_token_id=tokenizer.eos_token_id,
            )
        paths[role] = work / "models" / role
        model.save_pretrained(str(paths[role]))
        tokenizer.save_pretrained(str(paths[role]))
        del model
    return paths


def train_overrides(method: str, paths: dict[str, Path], work: Path, shape: dict) -> list[str]:
    steps = shape["steps"]
    overrides = [
        f"model.student={paths['student']}",
        f"model.teacher={paths['teacher']}",
        "model.teacher_dtype=bf16",
        f"data.train={paths['train']}",
        f"data.dev={paths['dev']}",
        f"data.cache_dir={work / '.cache'}",
        f"train.output_dir={work / 'runs' / method}",
        f"train.max_steps={steps}",
        f"train.batch_size={shape['batch']}",
        f"train.eval_every={steps}",
        f"train.save_every={steps}",
        "train.log_every=1",
        "train.eval_rouge=false",
        "train.select_by=dev_loss",
        "train.precision=bf16",
        "train.progress=false",
        "train.resume=false",
    ]
    if method == "distillm":
        # phi starts at 0.5 (the preset's 0 would train on the dataset alone in so few steps): the check
        # then also samples from the student, fills the replay buffer and replays from it.
        overrides += [f"data.pretrain={paths['pretrain']}", "sources.init_threshold=0.5"]
    if shape["new_tokens"]:
        overrides.append(f"generation.max_new_tokens={shape['new_tokens']}")
    return overrides


def train_figures(run_dir: Path) -> dict:
    """Steps, seconds per step (median from step 2), losses finite, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    seconds = [r["tokens"] / r["tokens_per_s"] for r in steps if r["tokens_per_s"] > 0]
    timed = seconds[1:] or seconds
    losses = [r["loss"] for r in steps]
    dev = [r["dev_loss"] for r in rows if "dev_loss" in r]
    summary = (
        json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    )
    return {
        "steps": len(steps),
        "seconds_per_step": statistics.median(timed) if timed else float("nan"),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[1:] or steps) if steps else 0.0,
        "finite": bool(losses) and all(math.isfinite(x) for x in losses + dev),
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": losses[-1] if losses else float("nan"),
        "dev": dev,
        "sources": summary.get("source_counts", {}),
        "generation_s": summary.get("seconds", {}).get("generation", 0.0),
    }


def train_row(method: str, result: Run, run_dir: Path) -> tuple[str, bool]:
    """One table row for ``distillm train`` of ``method`` and whether it passed."""
    if result.returncode != 0:
        return f"| train {method} | {result.status} | | | | | | | | |", False
    try:
        f = train_figures(run_dir)
    except (OSError, ValueError, KeyError) as error:  # ran, but left no readable metrics
        return f"| train {method} | ran, no figures: {type(error).__name__}: {error} | | | | | | | | |", False
    dev = " -> ".join(f"{x:.3f}" for x in f["dev"])
    sources = ", ".join(f"{k} {v}" for k, v in f["sources"].items())
    row = (
        f"| train {method} | {'ok' if f['finite'] else '**non-finite loss**'} | {f['steps']} | "
        f"{f['seconds_per_step']:.3f} | {f['tokens_per_s']:,.0f} | {f['finite']} | "
        f"{f['first_loss']:.3f} -> {f['last_loss']:.3f} | {dev} | {sources} | {f['generation_s']:.1f} |"
    )
    return row, f["finite"]


def evaluate_row(sampler: str, result: Run, out: Path) -> tuple[str, bool]:
    """One table row for ``distillm evaluate --sampler`` and whether it passed."""
    status, passed = result.status, result.returncode == 0
    if passed:
        try:
            summary = json.loads((out / "summary.json").read_text())
            stats = next(iter(next(iter(summary["models"].values()))["datasets"].values()))
            status = f"ok, ROUGE-L {stats['rougeL']['mean']:.2f} (random weights: near 0 expected)"
        except (OSError, ValueError, KeyError, StopIteration) as error:
            status, passed = f"ran, no summary: {type(error).__name__}: {error}", False
    name = f"evaluate --sampler {sampler} (16 prompts, whole command {result.seconds:.1f} s)"
    return f"| {name} | {status} | | | | | | | | |", passed


def cli_section(work: Path, tiny: bool, budget: float) -> str:
    import torch

    deadline = time.perf_counter() + budget
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = CLI_SHAPES["tiny" if tiny else "full"]
    paths = prepare_cli(work, shape, device)
    lines = [
        f"Teacher {shape['teacher']} and student {shape['student']} (layers, hidden, heads), vocabulary "
        f"{shape['vocab']:,}, random weights; configs/gpt2/<method>-medium.yaml with {shape['steps']} steps, "
        f"batch {shape['batch']}, bf16 (teacher weights bf16, student under autocast), on {device}.",
        "",
        "| command | status | steps | s/step (median, step 2 on) | tokens/s | losses finite | loss first -> last "
        "| dev loss | sources | generation s |",
        "|---|---|---:|---:|---:|---|---|---|---|---:|",
    ]
    failures = []
    evaluated = None
    for method in cli_methods():
        preset = str(PRESETS / f"{method}-medium.yaml")
        command = [sys.executable, "-m", "distillm", "train", "--config", preset]
        command += train_overrides(method, paths, work, shape)
        result = run(command, deadline - time.perf_counter() - 15, work / f"train-{method}.log")
        run_dir = work / "runs" / method
        row, passed = train_row(method, result, run_dir)
        lines.append(row)
        if not passed:
            failures.append((f"train {method}", result))
        if method == "distillm" and passed:
            evaluated = run_dir / "last"
        else:  # a 355M student's checkpoints are gigabytes: keep the disk for the next method
            shutil.rmtree(run_dir, ignore_errors=True)
    if evaluated is None:
        lines.append("| evaluate | not run: the DistiLLM run failed | | | | | | | | |")
    for sampler in ("distillm", "generate") if evaluated is not None else ():
        out = work / f"eval-{sampler}"
        command = [sys.executable, "-m", "distillm", "evaluate", "--model", str(evaluated)]
        command += ["--data", str(paths["test"]), "--out", str(out), "--seeds", "10", "--limit", "16"]
        command += ["--max-new-tokens", str(shape["new_tokens"] or 64), "--dtype", "bf16"]
        command += ["--device", device, "--sampler", sampler]
        result = run(command, deadline - time.perf_counter() - 5, work / f"evaluate-{sampler}.log")
        row, passed = evaluate_row(sampler, result, out)
        lines.append(row)
        if not passed:
            failures.append((f"evaluate --sampler {sampler}", result))
    for name, result in failures:
        lines += ["", f"{name}: {result.status}", "```", tail(result.output), "```"]
    return "\n".join(lines)


# ---- sections 2-4: the benchmarks ------------------------------------------------------------------------------


def distill_step_args(tiny: bool) -> list[str]:
    return ["--json", "--steps", "5"] + (["--tiny"] if tiny else [])


def liger_args(tiny: bool, shape: str) -> list[str]:
    return ["--json"] + (["--tiny"] if tiny else ["--shapes", shape])


def sampling_args(tiny: bool, device: str) -> list[str]:
    args = ["--device", device, "--recommend"]
    if tiny:
        return args + ["--models", "tiny", "--batch", "2", "--new-tokens", "8", "--repeats", "1"]
    return args + [
        "--dtype", "bf16", "--models", "gpt2", "gpt2-medium", "--batch", "32", "--new-tokens", "256",
        "--repeats", "3",
    ]  # fmt: skip


def distill_step_section(work: Path, tiny: bool, budget: float) -> str:
    command = [sys.executable, str(BENCHMARKS / "distill_step.py"), *distill_step_args(tiny)]
    result = run(command, budget, work / "distill_step.log")
    rows = json_lines(result.output)
    lines = []
    peak = next((r for r in rows if "matmul_peak_tflops" in r), None)
    if peak:
        lines.append(
            f"bf16 matmul peak measured in this run ({peak['matmul_size']}^3, best of 10): "
            f"**{peak['matmul_peak_tflops']:.1f} TFLOP/s** (the MFU's denominator)."
        )
    paths = [r for r in rows if "loss" in r]
    if paths:
        first = paths[0]
        lines += [
            "",
            f"Teacher {first['teacher_params_m']:.1f}M, student {first['student_params_m']:.1f}M parameters.",
            "",
            "| loss path | s/step | tokens/s | TFLOP/s | MFU | peak memory GiB | losses finite |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in paths:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            lines.append(
                f"| {r['loss']} (chunk {r['chunk_size']}) | {r['seconds_per_step']:.3f} | "
                f"{r['tokens_per_s']:,.0f} | {r['achieved_tflops']:.1f} | {mfu} | {r['peak_memory_gib']:.2f} | "
                f"{r['losses_finite']} |"
            )
        best = max((r["mfu"] or 0.0) for r in paths)
        lines += [
            "",
            f"MFU goal >= {MFU_GOAL:.0%}: {'met' if best >= MFU_GOAL else 'not met'} (best {best:.1%}).",
        ]
    if result.returncode != 0 or len(paths) < 2:
        lines += ["", f"distill_step.py: {result.status}", "```", tail(result.output), "```"]
    return "\n".join(lines)


def liger_verdict(rows: list[dict]) -> list[str]:
    """Ours chunked JSD against each Liger path that ran: time and memory ratios, and the issue's goal."""
    ok = [r for r in rows if r.get("status") == "ok"]
    ours = next((r for r in ok if r["impl"] == "ours chunked jsd"), None)
    theirs = [r for r in ok if r["impl"].startswith("liger")]
    if ours is None or not theirs:
        return ["No comparison: ours chunked jsd or every Liger path did not run (see the status column)."]
    lines = []
    for r in theirs:
        memory = (
            f", memory {ours['peak_memory_gib'] / r['peak_memory_gib']:.2f}x theirs"
            if ours["peak_memory_gib"] and r["peak_memory_gib"]
            else ""
        )
        lines.append(f"- vs {r['impl']}: time {ours['seconds'] / r['seconds']:.2f}x theirs{memory}")
    fastest = min(r["seconds"] for r in theirs)
    memories = [r["peak_memory_gib"] for r in theirs if r["peak_memory_gib"] is not None]
    time_ok = ours["seconds"] <= fastest
    memory_ok = ours["peak_memory_gib"] is not None and memories and ours["peak_memory_gib"] <= min(memories)
    lines.append(
        f"- goal (no slower and no more memory than Liger's best): time {'met' if time_ok else 'not met'}, "
        f"memory {'met' if memory_ok else 'not met' if memories else 'not measured'}"
    )
    return lines


def liger_section(work: Path, tiny: bool, budget: float) -> str:
    deadline = time.perf_counter() + budget
    shapes = ["tiny"] if tiny else ["liger", "gpt2-xl"]
    lines = [
        "Forward + backward of the distillation loss from hidden states and heads (student's get gradients), "
        "every token supervised, JSD beta 0.5; ms is the median of 5 after 2 warm-up runs; peak GiB is above "
        "the inputs.",
        "",
        "| shape (N, H, V) | implementation | fwd+bwd ms | peak GiB | loss (rel. diff to ours dense) | status |",
        "|---|---|---:|---:|---|---|",
    ]
    verdicts, failures = [], []
    for k, shape in enumerate(shapes):
        command = [sys.executable, str(BENCHMARKS / "liger_jsd.py"), *liger_args(tiny, shape)]
        share = (deadline - time.perf_counter()) / (len(shapes) - k)
        result = run(command, share, work / f"liger-{shape}.log")
        rows = json_lines(result.output)
        reference = next((r for r in rows if r["impl"] == "ours dense jsd" and r.get("status") == "ok"), None)
        for r in rows:
            size = f"{r['shape']} ({r['tokens']}, {r['hidden']}, {r['vocab']:,})"
            if r.get("status") != "ok":
                lines.append(f"| {size} | {r['impl']} | | | | {r.get('status')} |")
                continue
            difference = ""
            if reference is not None and "jsd" in r["impl"] and r is not reference:
                difference = (
                    f" ({abs(r['loss'] - reference['loss']) / max(abs(reference['loss']), 1e-30):.1e})"
                )
            memory = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a (CPU)"
            lines.append(
                f"| {size} | {r['impl']} | {1000 * r['seconds']:.1f} | {memory} | {r['loss']:.5f}{difference} | ok |"
            )
        verdicts += [f"{shape}:"] + liger_verdict(rows)
        if result.returncode != 0:
            failures.append((shape, result))
    lines += [""] + verdicts
    for shape, result in failures:
        lines += ["", f"liger_jsd.py --shapes {shape}: {result.status}", "```", tail(result.output), "```"]
    return "\n".join(lines)


def sampling_section(work: Path, tiny: bool, budget: float) -> str:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    command = [sys.executable, str(BENCHMARKS / "generation.py"), *sampling_args(tiny, device)]
    result = run(command, budget, work / "sampling.log")
    table = [
        line for line in result.output.splitlines() if line.startswith(("|", "device ", "Recommendation"))
    ]
    lines = table or ["(no table)"]
    # Markdown needs a blank line between a paragraph and a table, and after the table.
    if lines[0].startswith("device "):
        lines.insert(1, "")
    lines = [part for line in lines for part in (["", line] if line.startswith("Recommendation") else [line])]
    if tiny:
        lines += ["", "(--tiny: 2 rows x 8 tokens on a CPU say nothing about which sampler is faster.)"]
    else:
        lines = [line if not line.startswith("Recommendation") else f"**{line}**" for line in lines]
    if result.returncode != 0:
        lines += ["", f"generation.py: {result.status}", "```", tail(result.output), "```"]
    return "\n".join(lines)


def tests_section(work: Path, tiny: bool, budget: float) -> str:
    """The suite's `gpu` tests and CUDA_TESTS, with pytest's summary line."""
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    runs = (
        ("gpu", "pytest -m gpu tests", [*pytest, "-m", "gpu", "tests"]),
        ("train", "pytest " + " ".join(CUDA_TESTS), [*pytest, *CUDA_TESTS]),
    )
    lines = []
    deadline = time.perf_counter() + budget
    for key, name, command in runs:
        command = [*command, "--basetemp", str(work / f"pytest-{key}")]
        result = run(command, deadline - time.perf_counter(), work / f"pytest-{key}.log")
        summary = next((line for line in reversed(result.output.splitlines()) if " in " in line), "")
        # pytest's exit 5: no test ran (the gpu marks are skipped without CUDA).
        status = "ok" if result.returncode in (0, 5) else result.status
        lines.append(f"- `{name}`: {status}; {summary.strip(' =') or 'no summary line'}")
        if result.returncode not in (0, 5):
            lines += ["", "```", tail(result.output), "```"]
    return "\n".join(lines)


SECTIONS = {
    "cli": ("1. The CLI on CUDA in bf16", cli_section),
    "distill_step": (
        "2. One distillation step: GPT-2 XL-shaped teacher into GPT-2-shaped student",
        distill_step_section,
    ),
    "liger": ("3. Chunked divergences against Liger-Kernel", liger_section),
    "sampling": ("4. Student sampling: ours against model.generate", sampling_section),
    "tests": ("5. Tests on this machine: the `gpu` marks and the training loop on its device", tests_section),
}


def run_section_child(name: str, work: Path, tiny: bool, budget: float, out: Path) -> int:
    """Inside the child process of a section: its Markdown into ``out``."""
    text = SECTIONS[name][1](work, tiny, budget)
    out.write_text(text + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="Tiny shapes: checks that every section runs.")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="Report folder.")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--work", default=None, help="Scratch folder (default: a fresh temporary one).")
    parser.add_argument("--section-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--section-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section_child:
        return run_section_child(
            args.section_child, Path(args.work), args.tiny, args.budget, Path(args.section_out)
        )

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="distillm-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report = [
        "# distillm GPU check"
        + (" (--tiny: a check that the script runs, not figures)" if args.tiny else ""),
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {git_commit()}; "
        "`benchmarks/gpu_check.sh" + (" --tiny" if args.tiny else "") + "`",
        "",
        environment(),
    ]
    logs = []
    for name in args.sections:
        title = SECTIONS[name][0]
        limit = LIMITS[name][1 if args.tiny else 0]
        section_dir = work / name
        section_dir.mkdir(parents=True, exist_ok=True)
        section_out = section_dir / "section.md"
        command = [
            sys.executable, str(Path(__file__).resolve()), "--section-child", name, "--work", str(section_dir),
            "--budget", str(limit - 10), "--section-out", str(section_out),
        ] + (["--tiny"] if args.tiny else [])  # fmt: skip
        print(f"gpu_check: {name} (limit {limit} s)", file=sys.stderr, flush=True)
        result = run(command, limit, work / f"{name}.log")
        body = section_out.read_text(encoding="utf-8") if section_out.is_file() else ""
        report += [
            "",
            f"## {title}",
            "",
            f"Section {result.status} in {result.seconds:.0f} s (limit {limit} s).",
            "",
        ]
        report.append(body.strip() or "(no figures)")
        if result.returncode != 0:
            report += ["", "```", tail(result.output), "```"]
        logs.append(f"===== {name}: {result.status}\n{result.output}")
        for log in sorted(section_dir.glob("*.log")):
            logs.append(f"===== {name}/{log.name}\n{log.read_text(encoding='utf-8', errors='replace')}")
        print(f"gpu_check: {name} {result.status} in {result.seconds:.0f} s", file=sys.stderr, flush=True)
    report += ["", f"Whole check: {time.perf_counter() - started:.0f} s."]
    (out / "gpu_check.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    (out / "gpu_check-logs.txt").write_text("\n\n".join(logs) + "\n", encoding="utf-8")
    print(f"gpu_check: wrote {out / 'gpu_check.md'} and {out / 'gpu_check-logs.txt'}", file=sys.stderr)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def git_commit() -> str:
    """``$COMMIT`` where given (the copy on the device machine may have no .git), else git's short hash."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10
        )
        return result.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
