"""distillm.allocator: freed CPU memory kept for the next tensor, measured by the page faults of a fresh process."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (AttributeError, ValueError, OSError):
        return False


glibc_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _glibc(), reason="the setting is for glibc's malloc on Linux"
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
    weight = torch.randn(512, 49152, requires_grad=True)
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


@functools.cache  # one child per setting for the whole file
def run_child(switch: str | None) -> tuple[dict, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "DISTILLM_KEEP_FREED_MEMORY" and not k.startswith("MALLOC_")
    }
    if switch is not None:
        env["DISTILLM_KEEP_FREED_MEMORY"] = switch
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@glibc_linux
def test_freed_blocks_are_reused_without_page_faults_once_the_heap_has_grown():
    result, _ = run_child(None)
    assert result["applied"] is True
    first, later = result["faults"][0], result["faults"][6:]
    assert first >= 48 * 2**20 // (2 * 2**20)  # the first step faulted its blocks in (>= 1 per 2 MiB page)
    # The heap grows over the first steps (a freed hole is reused once it is large enough for the next
    # step's aligned request), now and then later too; from then on most steps find all their memory
    # resident. Seen here: later steps average 0-8% of the first's faults (glibc's default: ~100%).
    assert sum(later) / len(later) < first / 4, result


@glibc_linux
def test_switched_off_every_step_faults_its_blocks_in_again():
    result, _ = run_child("0")
    assert result["applied"] is False
    first, later = result["faults"][0], result["faults"][6:]
    assert sum(later) / len(later) > first / 2, result  # each freed block went back to the kernel


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


def test_the_command_line_applies_it_before_running_a_command(monkeypatch, tmp_path):
    from distillm import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("kept") or True)
    # A command that fails at once on its input: the setting came first.
    code = cli.main(["convert-gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "out")])
    assert code != 0
    assert calls == ["kept"]
