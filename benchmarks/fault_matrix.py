"""The fault matrix of docs/faults.md: each fault tried ``--trials`` times on a real tiny run, then resumed.

Builds a tiny GPT-2 student (dropout on) and teacher, the bundled task suite and a byte-level tokenizer in a
temporary folder, runs KD for 12 optimizer steps uninterrupted (the reference), then for each trial:

- ``sigterm``: ``python -m distillm train`` gets SIGTERM after a random step (1-11);
- ``sigkill``: SIGKILL at a random moment (saves slowed by ``DISTILLM_TEST_SAVE_DELAY=0.3`` so that many moments
  fall inside one);
- ``truncated`` / ``bit-flip``: a random file of the latest checkpoint of a run cut back to step 8 is cut to
  half / has one bit flipped;
- ``full-disk`` (root only): ``train.output_dir`` on a tmpfs that holds best/ and about one checkpoint.

The run is then resumed (in this process, one torch thread like the subprocesses) and its final weights and
every logged loss are compared with the reference, bit for bit. Prints one row per fault: trials, how many
ended identical, steps redone, and what the user saw (exit codes, the first words of the message).

    .venv/bin/python benchmarks/fault_matrix.py --trials 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
STEPS = 12


def setup(root: Path) -> dict[str, Path]:
    import conftest  # the test suite's offline tokenizer text and model builder
    from distillm.data import write_task_suite
    from distillm.tokenizer import train_bpe_tokenizer

    write_task_suite(root / "tasks", seed=0, n_train=64, n_dev=16, n_test=8)
    train_bpe_tokenizer(conftest.tokenizer_training_texts(), vocab_size=512, out_dir=root / "tokenizer")
    conftest._save_model(root / "student", "gpt2", root / "tokenizer", seed=1, layers=2, hidden=32, heads=2)
    conftest._save_model(root / "teacher", "gpt2", root / "tokenizer", seed=2, layers=2, hidden=64, heads=4)
    return {"root": root}


def argv(root: Path, out: Path, **extra) -> list[str]:
    values = {
        "model.student": root / "student",
        "model.teacher": root / "teacher",
        "data.train": root / "tasks" / "train.jsonl",
        "data.dev": root / "tasks" / "dev.jsonl",
        "data.cache_dir": root / "cache",
        "train.output_dir": out,
        "objective.divergence": "skew_forward_kl",
        "objective.kd_ratio": 0.7,
        "data.max_length": 64,
        "data.max_prompt_length": 48,
        "train.max_steps": STEPS,
        "train.batch_size": 4,
        "train.lr": 3e-3,
        "train.warmup_steps": 0,
        "train.eval_every": 4,
        "train.save_every": 4,
        "train.eval_rouge": False,
        "train.select_by": "dev_loss",
        "train.log_every": 1,
        "train.progress": False,
        "seed": 3,
        **extra,
    }
    return ["train", *(f"{k}={v}" for k, v in values.items())]


def run_here(args: list[str]) -> tuple[int, str]:
    """``distillm.cli.main(args)`` in this process: exit code and what it printed and logged."""
    from distillm.cli import main

    text = io.StringIO()
    handler = logging.StreamHandler(text)
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stderr(text):
            code = main(args)
    finally:
        logging.getLogger().removeHandler(handler)
    return code, text.getvalue()


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return max((json.loads(line)["step"] for line in lines), default=0)


def identical(reference: Path, out: Path) -> bool:
    from safetensors.torch import load_file

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    a, b = (
        load_file(str(reference / "last" / "model.safetensors")),
        load_file(str(out / "last" / "model.safetensors")),
    )
    return (
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and losses(reference) == losses(out)
    )


def newest_step(out: Path) -> int:
    from distillm.checkpoint import list_checkpoints

    found = list_checkpoints(out)
    return int(found[-1].name.split("-")[1]) if found else 0


def first_words(text: str, marker: str, words: int = 12) -> str:
    line = next((line for line in text.splitlines() if marker in line), "")
    return " ".join(line.split(marker, 1)[-1].split()[:words]) if line else ""


def interrupted(root: Path, out: Path, signum: int, rng: random.Random, delay: str | None) -> tuple[int, int]:
    """Run in a subprocess and signal it; (exit code, step it had logged when signalled)."""
    env = {**ENV, **({"DISTILLM_TEST_SAVE_DELAY": delay} if delay else {})}
    extra = {"train.save_every": 2} if signum == signal.SIGKILL else {}
    process = subprocess.Popen(
        [sys.executable, "-m", "distillm", *argv(root, out, **extra)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    target = rng.randint(1, STEPS - 1)
    if signum == signal.SIGKILL:
        while logged_steps(out) < 1 and process.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 2.0))
    else:
        while logged_steps(out) < target and process.poll() is None:
            time.sleep(0.002)
    at = logged_steps(out)
    process.send_signal(signum)
    _, stderr = process.communicate()
    interrupted.stderr = stderr  # type: ignore[attr-defined]
    return process.returncode, at


def cut_back(reference: Path, out: Path) -> Path:
    shutil.copytree(reference, out)
    for name in ("last", "summary.json", "checkpoints/step-0000012"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return out / "checkpoints" / "step-0000008"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--faults", nargs="+", default=["sigterm", "sigkill", "truncated", "bit-flip", "full-disk"]
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    rows: dict[str, dict] = defaultdict(lambda: {"trials": 0, "identical": 0, "redone": [], "saw": Counter()})
    with tempfile.TemporaryDirectory(prefix="distillm-faults-") as tmp:
        root = Path(tmp)
        setup(root)
        reference = root / "reference"
        code, _ = run_here(argv(root, reference, **{"train.keep_checkpoints": 10}))
        assert code == 0
        for trial in range(args.trials):
            for fault in args.faults:
                out = root / f"{fault}-{trial}"
                row = rows[fault]
                if fault in ("sigterm", "sigkill"):
                    signum = signal.SIGTERM if fault == "sigterm" else signal.SIGKILL
                    code, at = interrupted(root, out, signum, rng, "0.3" if fault == "sigkill" else None)
                    saved = newest_step(out)
                    staging = (
                        bool(list((out / "checkpoints").glob(".tmp-*")))
                        if (out / "checkpoints").exists()
                        else False
                    )
                    saw = f"exit {code}" + (", killed inside a save" if staging else "")
                    if fault == "sigterm":
                        saw += f": {first_words(interrupted.stderr, 'WARNING distillm: ', 8)}"  # type: ignore[attr-defined]
                    extra = {"train.save_every": 2} if fault == "sigkill" else {}
                    resumed, _ = run_here(argv(root, out, **extra))
                    row["redone"].append(max(0, at - saved))
                elif fault in ("truncated", "bit-flip"):
                    latest = cut_back(reference, out)
                    victim = rng.choice(
                        sorted(p for p in latest.rglob("*") if p.is_file() and p.name != "manifest.json")
                    )
                    data = bytearray(victim.read_bytes())
                    if fault == "truncated":
                        data = data[: len(data) // 2]
                    else:
                        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                    victim.write_bytes(bytes(data))
                    resumed, text = run_here(argv(root, out))
                    saw = f"{victim.name}: " + first_words(text, f"{victim.name}: ", 8)
                    row["redone"].append(4)
                else:
                    if os.geteuid() != 0:
                        continue
                    mount = root / f"mnt-{trial}"
                    mount.mkdir()
                    sizes = {
                        name: sum(p.stat().st_size for p in (reference / name).rglob("*") if p.is_file())
                        for name in ("best", "checkpoints/step-0000004")
                    }
                    size = (
                        sizes["best"]
                        + int(rng.uniform(1.2, 1.9) * sizes["checkpoints/step-0000004"])
                        + 256 * 1024
                    )
                    subprocess.run(
                        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True
                    )
                    try:
                        out = mount / "run"
                        code, text = run_here(argv(root, out))
                        saw = f"exit {code}: " + first_words(text, "error: ", 14)
                        good = newest_step(out)
                        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
                        resumed, _ = run_here(argv(root, out))
                        row["redone"].append(
                            int(first_words(text, "training stopped at step ", 1).rstrip(",") or good) - good
                        )
                        ok = resumed == 0 and identical(reference, out)
                    finally:
                        subprocess.run(["umount", "-l", str(mount)], check=False)
                    row["trials"] += 1
                    row["identical"] += ok
                    row["saw"][saw] += 1
                    continue
                row["trials"] += 1
                row["identical"] += resumed == 0 and identical(reference, out)
                row["saw"][saw] += 1
    print(f"load average {os.getloadavg()[0]:.1f}; {STEPS} steps of KD on the tiny pair, dropout on")
    print("| fault | trials | resumed identical | steps redone | what the user saw |")
    print("|---|---|---|---|---|")
    for fault, row in rows.items():
        saw = "; ".join(f"{text} (x{n})" if n > 1 else text for text, n in row["saw"].items())
        print(f"| {fault} | {row['trials']} | {row['identical']} | {row['redone']} | {saw} |")


if __name__ == "__main__":
    main()
