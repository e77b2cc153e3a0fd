"""distillm.allocator: freed CPU memory kept for the next tensor, measured by the page faults of a fresh process."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest

from distillm import allocator


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (AttributeError, ValueError, OSError):
        return False


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


glibc_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _glibc() or _cuda(),
    reason="the setting is for glibc's malloc on Linux machines without a CUDA device",
)

# A fresh interpreter runs a "training step" twelve times: a product, a log-softmax and its backward over
# [256 x 49,152] (48 MiB temporaries, above glibc's largest mmap threshold, 32 MiB: by default each gets its
# own mapping), and counts the minor page faults of each step; the digest covers every result.
CHILD = textwrap.dedent(
    """
    import hashlib, json, logging, resource
    import torch
    logging.basicConfig(level=logging.WARNING)
    from distillm.allocator import keep_freed_memory

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    applied = keep_freed_memory()
    torch.manual_seed(0)
    logits = torch.randn(256, 49152)  # [tokens, vocab], 48 MiB
    # Scaled so that the logits stay of unit size: unscaled (std ~23) most probabilities underflow to
    # subnormal floats, and a product over subnormals runs ~100x slower on Intel CPUs (14 s a step).
    weight = (torch.randn(512, 49152) / 512**0.5).requires_grad_()
    hidden = torch.randn(256, 512)
    per_step, digest = [], hashlib.sha256()
    for _ in range(12):
        before = faults()
        logprobs = (hidden @ weight + logits).log_softmax(-1)  # [tokens, vocab]
        entropy = -(logprobs.exp() * logprobs).sum()
        entropy.backward()
        per_step.append(faults() - before)
        digest.update(entropy.detach().numpy().tobytes() + weight.grad.numpy().tobytes())
        del logprobs, entropy
        weight.grad = None
    print(json.dumps({"applied": applied, "faults": per_step, "digest": digest.hexdigest()}))
    """
)


# The child's environment without anything that would change its malloc: our switch, glibc's own settings,
# a preloaded allocator, a multi-process launch.
_MALLOC_ENVIRONMENT = ("DISTILLM_KEEP_FREED_MEMORY", "GLIBC_TUNABLES", "LD_PRELOAD", "WORLD_SIZE")


@functools.cache  # one child per setting for the whole file
def run_child(switch: str | None) -> tuple[dict, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in _MALLOC_ENVIRONMENT and not k.startswith("MALLOC_")
    }
    if switch is not None:
        env["DISTILLM_KEEP_FREED_MEMORY"] = switch
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def later_faults(result: dict) -> float:
    """Mean page faults of steps 7-12, once the heap has grown."""
    later = result["faults"][6:]
    return sum(later) / len(later)


@glibc_linux
def test_freed_blocks_are_reused_without_page_faults_once_the_heap_has_grown():
    on, _ = run_child(None)  # the default
    off, _ = run_child("0")
    assert on["applied"] is True and off["applied"] is False
    if later_faults(off) < 1000:
        pytest.skip(
            f"glibc's default costs only {later_faults(off):.0f} page faults a step here (huge pages, or "
            "faults not counted): nothing to compare"
        )
    # Each step of the default faults both 48 MiB blocks in again (~24,600 faults at 4 KiB pages). With the
    # setting the heap grows over the first steps (a freed hole is reused once it is large enough for the
    # next step's aligned request), now and then later too, and most later steps fault nothing; seen here:
    # 0-8% of the default's faults.
    assert later_faults(on) < later_faults(off) / 4, (on, off)


@glibc_linux
def test_where_memory_comes_from_does_not_change_any_result():
    on, _ = run_child(None)
    off, _ = run_child("0")
    assert on["applied"] and not off["applied"]
    assert on["digest"] == off["digest"]  # bit for bit: loss and gradients of every step


@glibc_linux
def test_an_unknown_switch_value_warns_and_keeps_the_setting_on():
    result, stderr = run_child("yes")
    assert result["applied"] is True
    assert "DISTILLM_KEEP_FREED_MEMORY='yes' is neither 0 (off) nor 1 (on)" in stderr


@pytest.mark.parametrize(
    "variable, value",
    [
        ("MALLOC_TRIM_THRESHOLD_", "131072"),
        ("MALLOC_MMAP_MAX_", "65536"),
        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576"),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
        ("WORLD_SIZE", "2"),
    ],
)
def test_malloc_is_left_alone_under_the_users_settings_and_in_multi_process_launches(
    monkeypatch, variable, value
):
    # Refused before mallopt is called, so this process's malloc is untouched.
    monkeypatch.delenv("DISTILLM_KEEP_FREED_MEMORY", raising=False)
    monkeypatch.setenv(variable, value)
    allocator.keep_freed_memory.cache_clear()
    try:
        assert allocator.keep_freed_memory() is False
    finally:
        allocator.keep_freed_memory.cache_clear()


def test_a_cuda_device_leaves_malloc_alone(monkeypatch):
    import torch

    monkeypatch.delenv("DISTILLM_KEEP_FREED_MEMORY", raising=False)
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    allocator.keep_freed_memory.cache_clear()
    try:
        assert allocator.keep_freed_memory() is False
    finally:
        allocator.keep_freed_memory.cache_clear()


def test_the_command_line_applies_it_before_running_a_command(monkeypatch, tmp_path):
    from distillm import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("kept") or True)
    # A command that fails at once on its input: the setting came first.
    code = cli.main(["convert-gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "out")])
    assert code != 0
    assert calls == ["kept"]
