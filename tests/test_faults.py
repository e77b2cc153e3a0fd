"""What clusters do to training, on real tiny runs through the CLI: preemption (SIGTERM, Ctrl-C), SIGKILL at
any moment (inside a checkpoint save too), damaged checkpoints, a full or unwritable disk, and a signal on one
of two processes. Every case ends with the same final weights as an uninterrupted run, bit for bit.

The interrupted runs are real processes (``python -m distillm train``); the reference and the resumed runs call
``distillm.cli.main`` in this process, with one torch thread like the subprocesses (``OMP_NUM_THREADS=1``), so
that both compute with the same kernels: importing torch and transformers is most of a tiny run's cost.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distillm.faults import EXIT_STOPPED
from distillm.storage import EXIT_STORAGE, MANIFEST, verify_folder

STEPS = 12
# Dropout is on in the tiny student, so identical weights also mean every RNG state was restored.
BASE = {
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
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def overrides(task_data, student, teacher, out: Path, cache: Path, **extra) -> list[str]:
    values = {
        **BASE,
        "model.student": student,
        "model.teacher": teacher,
        "data.train": task_data / "train.jsonl",
        "data.dev": task_data / "dev.jsonl",
        "data.cache_dir": cache,
        "train.output_dir": out,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_here(argv: list[str]) -> int:
    from distillm.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def run_args(task_data, tiny_student_dir, tiny_teacher_dir, tmp_path_factory):
    """``run_args(out, **extra) -> argv`` of ``distillm train`` (one data cache for the whole module)."""
    cache = tmp_path_factory.mktemp("cache")

    def make(out: Path, **extra) -> list[str]:
        return ["train", *overrides(task_data, tiny_student_dir, tiny_teacher_dir, out, cache, **extra)]

    return make


def cli(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "distillm", *argv]


def start(argv: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen(
        cli(argv), env={**ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def assert_same_run(reference: Path, run: Path) -> None:
    expected, got = weights(reference / "last"), weights(run / "last")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert losses(run) == losses(reference), "every step's loss, in order, once"


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended first: {process.communicate()[1][-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def checkpoint_steps(run: Path) -> list[int]:
    from distillm.checkpoint import list_checkpoints

    return [int(p.name.split("-")[1]) for p in list_checkpoints(run)]


@pytest.fixture(scope="module")
def reference(run_args, tmp_path_factory) -> Path:
    """The uninterrupted run, keeping every checkpoint (steps 4, 8, 12) for the damaged-checkpoint tests."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_here(run_args(out, **{"train.keep_checkpoints": 10})) == 0
    assert checkpoint_steps(out) == [4, 8, 12]
    return out


# --------------------------------------------------------------------------------------------------------
# Preemption.


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_only_requests_a_stop_and_its_repeat_within_a_second_is_the_same_request(signum):
    from distillm.faults import GracefulStop

    before = signal.getsignal(signum)
    with GracefulStop() as stop:
        assert not stop.agreed()
        os.kill(os.getpid(), signum)  # handled here, between bytecodes: no KeyboardInterrupt, no exit
        os.kill(os.getpid(), signum)  # a launcher forwarding the same request
        assert stop.agreed() and stop.signal_name == signal.Signals(signum).name
    assert signal.getsignal(signum) is before, "the previous handler is back"


def test_the_stop_is_agreed_on_every_process_when_any_process_was_signalled():
    from distillm.faults import GracefulStop

    signalled_elsewhere = lambda flag: True  # noqa: E731 - an all-reduce where another rank said yes
    stop = GracefulStop()
    assert stop.agreed(signalled_elsewhere) and not stop.agreed(lambda flag: flag)
    assert stop.signal_name == "a signal on another process"


def test_the_resume_command_is_the_command_minus_what_would_start_over(monkeypatch):
    from distillm.faults import resume_command

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/distillm"])
    assert resume_command(["-v", "train", "--config", "a b.yaml", "train.resume=false", "seed=1"]) == (
        "distillm -v train --resume --config 'a b.yaml' seed=1"
    )
    assert resume_command(["demo", "--force", "--out", "train"]) == "distillm demo --out train"


def test_sigterm_mid_run_stops_at_a_step_boundary_with_a_checkpoint_and_the_printed_command_resumes_it(
    run_args, reference, tmp_path, caplog
):
    signum = signal.SIGTERM
    out = tmp_path / "run"
    process = start(run_args(out))
    wait_for(lambda: logged_steps(out) >= 5, process)  # past the step-4 checkpoint, before the step-8 one
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_STOPPED, stderr[-3000:]
    stopped_at = checkpoint_steps(out)[-1]
    assert 5 <= stopped_at < STEPS and stopped_at % 4 != 0, "the stop wrote its own checkpoint"
    assert not verify_folder(out / "checkpoints" / f"step-{stopped_at:07d}")
    assert not (out / "last").exists()
    (line,) = [line for line in stderr.splitlines() if "resume with: " in line]
    assert f"stopped by {signal.Signals(signum).name} after optimizer step {stopped_at}" in line
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:4] == [sys.executable, "-m", "distillm", "train"]
    assert command[4:] == ["--resume", *run_args(out)[1:]], "the same command, which resumes"

    with caplog.at_level("INFO"):
        assert run_here(command[3:]) == 0
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped_at:07d}'}" in caplog.text
    assert_same_run(reference, out)


def test_a_second_signal_exits_at_once_and_the_run_resumes_from_the_checkpoint_before(
    run_args, reference, tmp_path
):
    """The stop's own checkpoint is slowed down (a test-only delay) so that the second signal lands in it."""
    out = tmp_path / "run"
    process = start(run_args(out), DISTILLM_TEST_SAVE_DELAY="3")
    wait_for(lambda: logged_steps(out) >= 9, process)  # the step-8 checkpoint (3 s) is done
    process.send_signal(signal.SIGTERM)
    wait_for(lambda: list((out / "checkpoints").glob(".tmp-step-*")), process)  # the stop's save began
    time.sleep(1.2)  # a repeat within a second counts as the same request
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGTERM, "killed by the second signal, not stopped cleanly"
    assert checkpoint_steps(out)[-1] == 8

    assert run_here(run_args(out)) == 0
    assert_same_run(reference, out)


# --------------------------------------------------------------------------------------------------------
# SIGKILL at any moment.


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_moment_then_resume_gives_the_uninterrupted_run(
    seed, run_args, reference, tmp_path
):
    """Saves are slowed down (0.3 s, test-only) so that a good share of random moments fall inside one."""
    out = tmp_path / "run"
    process = start(run_args(out, **{"train.save_every": 2}), DISTILLM_TEST_SAVE_DELAY="0.3")
    wait_for(lambda: logged_steps(out) >= 1, process)
    time.sleep(random.Random(seed).uniform(0.0, 2.0))  # the 12 steps and 6 saves take ~2-4 s from here
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (out / "summary.json").exists(), "the run finished before the kill"
    assert run_here(run_args(out, **{"train.save_every": 2})) == 0
    assert_same_run(reference, out)


def test_sigkill_inside_a_checkpoint_save_leaves_the_previous_one_and_resume_is_identical(
    run_args, reference, tmp_path
):
    out = tmp_path / "run"
    process = start(run_args(out), DISTILLM_TEST_SAVE_DELAY="1")
    wait_for(
        lambda: checkpoint_steps(out) == [4] and list((out / "checkpoints").glob(".tmp-step-*")), process
    )
    process.send_signal(signal.SIGKILL)  # inside step 8's save: weights written, trainer state not yet
    process.communicate()
    assert checkpoint_steps(out) == [4] and not (out / "last").exists()
    assert run_here(run_args(out)) == 0
    assert not list((out / "checkpoints").glob(".tmp-*")), "the staging folder was cleaned up"
    assert_same_run(reference, out)


# --------------------------------------------------------------------------------------------------------
# Damaged checkpoints.


def cut_back_to_step_8(reference: Path, out: Path) -> Path:
    """A copy of the reference run as it was right after its step-8 checkpoint (step 4's kept before it)."""
    shutil.copytree(reference, out)
    for name in ("last", "summary.json", "checkpoints/step-0000012"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return out / "checkpoints" / "step-0000008"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("file", "damage", "what"),
    [
        ("model.safetensors", truncate, "bytes, the manifest says"),
        ("trainer_state.pt", flip_a_bit, "differs from the manifest's SHA-256"),
    ],
)
def test_a_damaged_latest_checkpoint_is_skipped_and_the_run_redoes_its_steps_to_the_same_end(
    file, damage, what, run_args, reference, tmp_path, caplog
):
    latest = cut_back_to_step_8(reference, tmp_path / "run")
    damage(latest / file)
    with caplog.at_level("INFO"):
        assert run_here(run_args(tmp_path / "run")) == 0
    (warning,) = [
        r.getMessage() for r in caplog.records if "skipping checkpoint step-0000008" in r.getMessage()
    ]
    assert str(latest / file) in warning and what in warning
    assert f"resumed from {latest.with_name('step-0000004')} (step 4)" in caplog.text
    assert_same_run(reference, tmp_path / "run")


def test_with_every_checkpoint_damaged_resume_says_so_and_what_to_do(run_args, reference, tmp_path, capsys):
    out = tmp_path / "run"
    cut_back_to_step_8(reference, out)
    truncate(out / "checkpoints" / "step-0000008" / "model.safetensors")
    (out / "checkpoints" / "step-0000004" / MANIFEST).unlink()
    assert run_here(run_args(out)) == 2
    error = capsys.readouterr().err
    assert "no intact checkpoint" in error and "step-0000008" in error and "step-0000004" in error
    assert "train.resume=false" in error


def test_a_damaged_best_model_is_refused_by_evaluate_naming_the_file(reference, task_data, tmp_path, capsys):
    best = tmp_path / "best"
    shutil.copytree(reference / "best", best)
    flip_a_bit(best / "model.safetensors")
    argv = [
        "evaluate",
        "--model",
        str(best),
        "--data",
        str(task_data / "test.jsonl"),
        "--out",
        str(tmp_path / "e"),
    ]
    assert run_here([*argv, "--seeds", "1", "--max-new-tokens", "4", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert f"{best / 'model.safetensors'}: its content differs" in error
    assert not (tmp_path / "e").exists()


# --------------------------------------------------------------------------------------------------------
# A full or unwritable disk.


def assert_stopped_cleanly(out: Path, good_step: int) -> None:
    from distillm.checkpoint import load_model_weights, load_trainer_state
    from distillm.models import load_causal_lm

    assert checkpoint_steps(out)[-1] == good_step
    previous = out / "checkpoints" / f"step-{good_step:07d}"
    assert not verify_folder(previous), "the previous checkpoint is untouched"
    assert load_trainer_state(previous)["step"] == good_step
    load_model_weights(load_causal_lm(str(previous)), previous)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], (
        "no staging folder left"
    )
    assert not (out / "last").exists()


@pytest.mark.parametrize(
    ("code", "says"), [(errno.ENOSPC, "not enough space in"), (errno.EROFS, "cannot write to")]
)
def test_a_disk_error_while_saving_names_the_folder_and_keeps_the_previous_checkpoint(
    code, says, run_args, reference, tmp_path, capsys, monkeypatch
):
    """The write of step 8's trainer state fails as the OS would report it; then the disk is fine again."""
    import distillm.checkpoint as checkpoint_module

    saves = []
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(code, os.strerror(code), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    out = tmp_path / "run"
    assert run_here(run_args(out)) == EXIT_STORAGE
    error = capsys.readouterr().err
    assert says in error and str(out / "checkpoints") in error and "free" in error
    assert "could not write the checkpoint of step 8" in error and "step-0000004 is untouched" in error
    assert "resume with: " in error
    assert_stopped_cleanly(out, 4)
    monkeypatch.undo()
    assert run_here(run_args(out)) == 0
    assert_same_run(reference, out)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real file system of limited size (root only); skipped where it cannot be mounted."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the ENOSPC test covers it")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_gives_the_clear_error_and_a_rerun_with_room_resumes_identically(
    run_args, reference, small_tmpfs, capsys
):
    """The run folder on a tmpfs that holds best/ and one checkpoint, not a second."""
    sizes = {
        name: sum(p.stat().st_size for p in (reference / name).rglob("*") if p.is_file())
        for name in ("best", "checkpoints/step-0000004")
    }
    size = sizes["best"] + int(1.6 * sizes["checkpoints/step-0000004"]) + 256 * 1024  # page rounding, logs
    subprocess.run(["mount", "-o", f"remount,size={size}", str(small_tmpfs)], check=True)
    out = small_tmpfs / "run"
    assert run_here(run_args(out)) == EXIT_STORAGE
    error = capsys.readouterr().err
    assert "not enough space in" in error
    assert str(small_tmpfs) in error and "free" in error
    good = checkpoint_steps(out)[-1]
    assert_stopped_cleanly(out, good)

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    assert run_here(run_args(out)) == 0
    assert_same_run(reference, out)


# --------------------------------------------------------------------------------------------------------
# Two processes.

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def worker_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of ``launcher``'s worker of ``rank`` (its child whose environment says RANK=rank)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def torchrun(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [*TORCHRUN, "-m", "distillm", *argv],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_on_one_of_two_processes_stops_both_at_the_same_step_and_they_resume_identically(
    run_args, tmp_path
):
    two = {"train.batch_size": 2}
    reference = tmp_path / "reference"
    launched = torchrun(run_args(reference, **two))
    _, stderr = launched.communicate(timeout=300)
    assert launched.returncode == 0, stderr[-3000:]

    out = tmp_path / "run"
    launched = torchrun(run_args(out, **two))
    wait_for(lambda: logged_steps(out) >= 5, launched)
    os.kill(worker_pid(launched, rank=1), signal.SIGTERM)  # not the rank that writes checkpoints and metrics
    _, stderr = launched.communicate(timeout=300)
    assert launched.returncode != 0, "torchrun reports its workers' exit code 75 as a failure"
    stopped_at = checkpoint_steps(out)[-1]
    assert 5 <= stopped_at < STEPS and stopped_at % 4 != 0 and not (out / "last").exists()
    (line,) = [line for line in stderr.splitlines() if "resume with: " in line]  # from rank 0 only
    assert f"stopped by a signal on another process after optimizer step {stopped_at}" in line
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[: len(TORCHRUN)] == TORCHRUN and "--resume" in command, "the launcher's own command"

    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(reference, out)
