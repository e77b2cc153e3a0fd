"""Several processes on CPU (gloo): torchrun data parallelism and DeepSpeed ZeRO through accelerate launch.

Each test launches the real CLI (``python -m distillm train``) in 2 processes, 1 thread each, and checks the
world size it reports, since a misbuilt accelerator silently runs two independent single-process jobs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# fp32 on 2 CPU processes vs 1: the same rows and the same normalisation, only the summation order of the
# all-reduce differs, so the losses and weights agree to float32 rounding after a few steps.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def overrides(task_data, pair, out: Path, **extra) -> list[str]:
    values = {
        "model.student": pair["student"],
        "model.teacher": pair["teacher"],
        "data.train": task_data / "train.jsonl",
        "data.dev": task_data / "dev.jsonl",
        "data.max_length": 64,
        "data.max_prompt_length": 48,
        "data.cache_dir": out.parent / "cache",
        "train.output_dir": out,
        "train.max_steps": 4,
        "train.lr": 3e-3,
        "train.warmup_steps": 0,
        "train.eval_every": 2,
        "train.save_every": 4,
        "train.eval_rouge": False,
        "train.select_by": "dev_loss",
        "train.log_every": 1,
        "train.progress": False,
        "generation.max_new_tokens": 6,
        "seed": 3,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def launch(launcher: list[str], args: list[str], timeout: int = 240) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [*launcher, "-m", "distillm", "train", "--config", str(CONFIGS / "tiny" / "kd.yaml"), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_run(one: Path, two: Path) -> None:
    assert len(losses(one)) == len(losses(two)) == 4
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=LOSS_RTOL, atol=0)
    first, second = weights(one / "last"), weights(two / "last")
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=WEIGHT_ATOL, msg=name)


@pytest.fixture(scope="module")
def one_process_run(task_data, quiet_pair, tmp_path_factory) -> Path:
    """The reference: 1 process, micro-batch 4 (the global batch of 2 processes x 2)."""
    from distillm.config import load_config
    from distillm.train import train

    one = tmp_path_factory.mktemp("reference") / "one"
    train(
        load_config(
            CONFIGS / "tiny" / "kd.yaml", overrides(task_data, quiet_pair, one, **{"train.batch_size": 4})
        )
    )
    return one


def test_two_processes_of_batch_2_train_like_one_process_of_batch_4(
    task_data, quiet_pair, one_process_run, tmp_path
):
    one, two = one_process_run, tmp_path / "two"
    launch(TORCHRUN, overrides(task_data, quiet_pair, two, **{"train.batch_size": 2}))

    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    assert json.loads((one / "summary.json").read_text())["world_size"] == 1
    assert_same_run(one, two)
    # The run moved the weights by far more than the tolerance, so the agreement is not vacuous.
    moved = max(
        (weights(one / "last")[k] - weights(quiet_pair["student"])[k]).abs().max().item()
        for k in weights(one / "last")
    )
    assert moved > 100 * WEIGHT_ATOL


def test_with_student_generation_both_processes_choose_the_same_source_each_step(
    task_data, quiet_pair, tmp_path
):
    run = tmp_path / "mixed"
    launch(
        TORCHRUN,
        overrides(
            task_data,
            quiet_pair,
            run,
            **{
                "train.batch_size": 2,
                "train.max_steps": 6,
                "sources.kind": "mixed",
                "sources.student_ratio": 0.5,
            },
        ),
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    rank0, rank1 = summary["sources_by_rank"]
    assert rank0 == rank1
    assert {"dataset", "fresh"} <= set(rank0.split(","))  # both kinds occurred: the check is not vacuous
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert ",".join(r["sources"] for r in rows if "sources" in r) == rank0


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed extra")
def test_deepspeed_zero2_on_two_cpu_processes_trains_like_one_process(
    task_data, quiet_pair, one_process_run, tmp_path
):
    one, two = one_process_run, tmp_path / "zero2"
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch"]
    launch(
        [*accelerate, "--config_file", str(CONFIGS / "accelerate" / "zero2-cpu.yaml")],
        overrides(task_data, quiet_pair, two, **{"train.batch_size": 2}),
        timeout=400,
    )
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    assert_same_run(one, two)
