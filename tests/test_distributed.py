"""Several processes on CPU (gloo): torchrun data parallelism and DeepSpeed ZeRO through accelerate launch.

Each test launches the real CLI (``python -m distillm train``) in 2 processes, 1 thread each, and checks the
world size it reports, since a misbuilt accelerator silently runs two independent single-process jobs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from numerics import FACTOR, max_error

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# fp32 on 2 CPU processes vs 1: the same rows and the same normalisation, only the summation order of the
# all-reduce (and of batch-shaped kernels) differs, so the losses and weights agree to float32 rounding after
# a few steps. Adam amplifies that rounding unevenly (m / sqrt(v) turns a rounding-sized change of a near-zero
# gradient into a change of up to lr), so no bound follows from the dtype alone, and there is no float64
# training to measure against (tests/numerics.py). Two bounds, the larger applies:
# - measured on an AMD EPYC: largest weight difference 1.0e-5 with seed 3, 3.5e-6 / 1.5e-6 with seeds 4 / 5
#   (hence 2e-5), losses within 1e-5 relative;
# - where the run has a one-process twin (the same steps as micro-batches of 1 row, accumulated: `spread_run`),
#   FACTOR times how far rounding alone moved the twin from the reference on this machine. On a CPU whose
#   kernels round further apart the twin moves further too, so the bound follows the machine.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 2e-5


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


def assert_same_run(
    one: Path, two: Path, steps: int = 4, spread: Path | None = None, loss_scale: float = 0.0
) -> None:
    """``two`` (several processes) trained like ``one`` (one process), within the bounds above.

    ``loss_scale``: the magnitude of the terms a loss is summed from, where it can be far smaller than they
    are (a difference of terms, near zero): the loss bound is then relative to it, not to the loss.
    """
    assert len(losses(one)) == len(losses(two)) == steps
    first, second = weights(one / "last"), weights(two / "last")
    assert first.keys() == second.keys()
    reference_losses = torch.tensor(losses(one), dtype=torch.float64)
    allowed_losses = LOSS_RTOL * reference_losses.abs().clamp_min(loss_scale)
    twin = {}
    if spread is not None:
        twin_distance = max_error(torch.tensor(losses(spread), dtype=torch.float64), reference_losses)
        allowed_losses = allowed_losses.clamp_min(FACTOR * twin_distance)
        twin = weights(spread / "last")
    distance = (torch.tensor(losses(two), dtype=torch.float64) - reference_losses).abs()
    assert bool((distance <= allowed_losses).all()), (distance.tolist(), allowed_losses.tolist())
    for name in first:
        allowed = max(WEIGHT_ATOL, FACTOR * max_error(twin[name], first[name])) if twin else WEIGHT_ATOL
        assert max_error(second[name], first[name]) <= allowed, (
            name,
            max_error(second[name], first[name]),
            allowed,
        )


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


@pytest.fixture(scope="module")
def spread_run(task_data, quiet_pair, tmp_path_factory) -> Path:
    """The reference's one-process twin: the same steps as micro-batches of 1 row, 4 accumulated."""
    from distillm.config import load_config
    from distillm.train import train

    twin = tmp_path_factory.mktemp("spread") / "twin"
    extra = {"train.batch_size": 1, "train.grad_accum": 4}
    train(load_config(CONFIGS / "tiny" / "kd.yaml", overrides(task_data, quiet_pair, twin, **extra)))
    return twin


def test_two_processes_of_batch_2_train_like_one_process_of_batch_4(
    task_data, quiet_pair, one_process_run, spread_run, tmp_path
):
    one, two = one_process_run, tmp_path / "two"
    launch(TORCHRUN, overrides(task_data, quiet_pair, two, **{"train.batch_size": 2}))

    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    assert json.loads((one / "summary.json").read_text())["world_size"] == 1
    assert_same_run(one, two, spread=spread_run)
    # The run moved the weights by far more than the tolerance, so the agreement is not vacuous.
    moved = max(
        (weights(one / "last")[k] - weights(quiet_pair["student"])[k]).abs().max().item()
        for k in weights(one / "last")
    )
    assert moved > 100 * WEIGHT_ATOL


# Student-generated sequences half of the time, and ROUGE-L (generations) at every evaluation.
MIXED = {
    "train.batch_size": 2,
    "train.max_steps": 6,
    "sources.kind": "mixed",
    "sources.student_ratio": 0.5,
    "train.eval_rouge": True,
    "train.eval_rouge_rows": 4,
}


@pytest.fixture(scope="module")
def mixed_run(task_data, quiet_pair, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("mixed") / "run"
    launch(TORCHRUN, overrides(task_data, quiet_pair, run, **MIXED))
    return run


def test_with_student_generation_both_processes_choose_the_same_source_each_step(mixed_run):
    summary = json.loads((mixed_run / "summary.json").read_text())
    assert summary["world_size"] == 2
    rank0, rank1 = summary["sources_by_rank"]
    assert rank0 == rank1
    assert {"dataset", "fresh"} <= set(rank0.split(","))  # both kinds occurred: the check is not vacuous
    rows = [json.loads(line) for line in (mixed_run / "metrics.jsonl").read_text().splitlines()]
    assert ",".join(r["sources"] for r in rows if "sources" in r) == rank0


needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed extra"
)
ACCELERATE = [str(Path(sys.executable).parent / "accelerate"), "launch"]


def deepspeed_launcher(stage: int) -> list[str]:
    return [*ACCELERATE, "--config_file", str(CONFIGS / "accelerate" / f"zero{stage}-cpu.yaml")]


# 2 processes x micro-batch 1 x accumulation 2: the global batch of the 1-process reference (4), with
# DeepSpeed owning the accumulation.
ACCUMULATED = {"train.batch_size": 1, "train.grad_accum": 2}


@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_with_accumulation_on_two_cpu_processes_trains_like_one_process(
    stage, task_data, quiet_pair, one_process_run, spread_run, tmp_path
):
    run = tmp_path / f"zero{stage}"
    launch(deepspeed_launcher(stage), overrides(task_data, quiet_pair, run, **ACCUMULATED), timeout=400)
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    assert_same_run(one_process_run, run, spread=spread_run)


@pytest.fixture(scope="module")
def zero3_run(task_data, quiet_pair, tmp_path_factory) -> Path:
    """ZeRO-3, 2 processes, accumulation, the chunked loss (the partitioned lm_head read inside the
    engine's forward); checkpoints at steps 2 and 4, both kept for the resume test."""
    run = tmp_path_factory.mktemp("zero3") / "run"
    extra = {**ACCUMULATED, "objective.chunk_size": 16, "train.save_every": 2, "train.keep_checkpoints": 2}
    launch(deepspeed_launcher(3), overrides(task_data, quiet_pair, run, **extra), timeout=400)
    return run


@needs_deepspeed
def test_deepspeed_zero3_on_two_cpu_processes_trains_like_one_process(one_process_run, spread_run, zero3_run):
    assert json.loads((zero3_run / "summary.json").read_text())["world_size"] == 2
    # The reference computes full logits; the chunked loss is the same sum in another order.
    assert_same_run(one_process_run, zero3_run, spread=spread_run)


@needs_deepspeed
def test_deepspeed_zero3_resumes_from_a_checkpoint_to_the_same_run(
    task_data, quiet_pair, zero3_run, tmp_path
):
    """Cut the finished run back to its step-2 checkpoint (as if killed right after writing it), resume:
    the optimizer partitions come back from the checkpoint's deepspeed/ folder, so steps 3-4 repeat exactly."""
    from distillm.checkpoint import DEEPSPEED_STATE, list_checkpoints

    resumed = tmp_path / "resumed"
    shutil.copytree(zero3_run, resumed)
    first, last = list_checkpoints(resumed)
    assert [first.name, last.name] == ["step-0000002", "step-0000004"]
    optimizer_partitions = sorted(p.name for p in (first / DEEPSPEED_STATE).rglob("*optim_states.pt"))
    assert len(optimizer_partitions) == 2  # one per process
    for later in (last, resumed / "last", resumed / "best", resumed / "summary.json"):
        shutil.rmtree(later) if later.is_dir() else later.unlink()
    extra = {**ACCUMULATED, "objective.chunk_size": 16, "train.save_every": 2, "train.keep_checkpoints": 2}
    launch(deepspeed_launcher(3), overrides(task_data, quiet_pair, resumed, **extra), timeout=400)

    assert json.loads((resumed / "summary.json").read_text())["world_size"] == 2
    assert losses(resumed) == losses(zero3_run)  # rows of steps 1-2 kept, 3-4 recomputed
    expected, got = weights(zero3_run / "last"), weights(resumed / "last")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@needs_deepspeed
def test_deepspeed_zero3_generates_from_the_student_like_data_parallel(
    task_data, quiet_pair, mixed_run, tmp_path
):
    """Under ZeRO-3, generations (training sequences, ROUGE-L) come from a whole copy of the student
    refreshed every step: the same samples, so the same losses and weights as the data-parallel run."""
    run = tmp_path / "zero3-mixed"
    launch(deepspeed_launcher(3), overrides(task_data, quiet_pair, run, **MIXED), timeout=400)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert (
        summary["sources_by_rank"] == json.loads((mixed_run / "summary.json").read_text())["sources_by_rank"]
    )
    assert_same_run(mixed_run, run, steps=MIXED["train.max_steps"])

    # ROUGE-L of the untrained tiny student is 0, so only that the evaluations ran (each process generating
    # from its copy, with no collective per token that could hang) is checked here.
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "dev_rougeL" in r] == [0, 2, 4, 6]


@needs_deepspeed
def test_a_deepspeed_checkpoint_is_not_resumed_without_deepspeed(task_data, quiet_pair, zero3_run, tmp_path):
    """Its optimizer state lives in the engine's partitions; a plain run would silently start Adam afresh."""
    from distillm.config import load_config
    from distillm.errors import UserError
    from distillm.train import train

    run = tmp_path / "plain"
    shutil.copytree(zero3_run / "checkpoints", run / "checkpoints")
    config = load_config(
        CONFIGS / "tiny" / "kd.yaml", overrides(task_data, quiet_pair, run, **{"train.max_steps": 6})
    )
    with pytest.raises(UserError, match="written under DeepSpeed"):
        train(config)


def test_an_fsdp_launch_without_a_gpu_is_refused(monkeypatch):
    """accelerate shards with FSDP only over accelerator devices; on CPU it would silently run DDP."""
    from distillm.config import load_config
    from distillm.distributed import build_accelerator
    from distillm.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("FSDP runs where there is a GPU")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="FSDP needs GPUs"):
        build_accelerator(load_config(CONFIGS / "tiny" / "kd.yaml", []))


# Run by torchrun in 2 processes: a StudentObjective sharded by torch's FSDP (version argv[1]) on CPU, each
# process changes its own shard, and WholeStudent must hand every process the whole changed weights.
FSDP_WHOLE_STUDENT = """
import functools, sys
import torch, torch.distributed as dist
from distillm.config import ObjectiveConfig
from distillm.models import build_small_model
from distillm.objective import StudentObjective
from distillm.distributed import WholeStudent

dist.init_process_group("gloo")
student = build_small_model("llama", 64, layers=2, hidden=32, heads=4, num_key_value_heads=2)
start = {name: p.detach().clone() for name, p in student.named_parameters()}
objective = StudentObjective(student, ObjectiveConfig(chunk_size=0), 64, sharded=True)
whole = WholeStudent(student, fsdp=True)
if sys.argv[1] == "1":
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    policy = functools.partial(size_based_auto_wrap_policy, min_num_params=2000)
    engine = FullyShardedDataParallel(
        objective, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=policy
    )
    assert sum(isinstance(m, FullyShardedDataParallel) for m in engine.modules()) > 1
else:
    from torch.distributed.fsdp import fully_shard

    for layer in student.model.layers:
        fully_shard(layer)
    engine = fully_shard(objective)
local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in engine.parameters())
assert 0 < local < sum(p.numel() for p in start.values()), local  # each process holds a part only


def shift():
    with torch.no_grad():
        for p in engine.parameters():  # this process's shard of every parameter
            p.add_(1.0)


def assert_whole(model, shifts):
    for name, p in model.named_parameters():
        expected = start[name]
        for _ in range(shifts):
            expected = expected + 1.0
        assert torch.equal(p, expected), name


shift()
assert_whole(whole.refreshed(None, engine, step=1), 1)
shift()
assert_whole(whole.refreshed(None, engine, step=1), 1)  # the same step: no new gather
assert_whole(whole.refreshed(None, engine, step=2), 2)
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.txt", "w") as done:  # stdout of the ranks interleaves
    done.write(f"whole on rank {dist.get_rank()} of {dist.get_world_size()}")
dist.destroy_process_group()
from distillm.cli import _exit_before_teardown  # as `distillm` ends a launched process
_exit_before_teardown(0)
"""


@pytest.mark.parametrize("version", ["1", "2"])
def test_under_fsdp_every_process_gets_the_whole_refreshed_student(version, tmp_path):
    """Evaluation and generation under FSDP run on WholeStudent's copy (no per-forward collectives that
    processes generating different lengths would desynchronise). accelerate runs FSDP on GPUs only, so this
    shards with torch's FSDP directly on 2 CPU processes (gloo)."""
    script = tmp_path / "fsdp_whole_student.py"
    script.write_text(FSDP_WHOLE_STUDENT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*TORCHRUN, str(script), version, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == f"whole on rank {rank} of 2"
