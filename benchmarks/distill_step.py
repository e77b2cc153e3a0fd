"""Time one distillation step: a frozen teacher's forward, the student's forward and backward, AdamW.

Default shapes are the paper's largest GPT-2 pair: a GPT-2 XL-shaped teacher (48 layers, 1600 wide) into a
GPT-2-shaped student (12 layers, 768 wide), vocabulary 50257, random weights, bf16, sequence 512, batch 8.
Prints seconds per step, tokens/s, model-FLOPs utilisation, peak memory, for the dense loss (full
[B, T, V] logits) and the chunked one. MFU is against the device's matrix-multiply peak *measured in the same
run* (the best of several square matmuls in the run's dtype; `--peak-tflops` overrides it), so it says how
much of what this device really reaches the step uses. ``--tiny`` shrinks everything so that it runs on a
CPU in seconds:

    python benchmarks/distill_step.py              # on a GPU
    python benchmarks/distill_step.py --tiny       # anywhere

The models are built once, on the device, and both loss paths train the same pair (each with a fresh
AdamW); peak memory is counted from after the warm-up step of each path.

Model FLOPs are 6 N per token for the student and 2 N for the frozen teacher, every position through every
parameter (N counts GPT-2's tied embedding and head once). The step computes less than that: both heads
and the last layer run at the supervised positions only (half of them here, distillm.fast_forward), about
6% of those FLOPs at these shapes, so the MFU overstates the device's utilisation by about that much.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from distillm import IGNORE_INDEX
from distillm.config import ObjectiveConfig
from distillm.models import build_small_model
from distillm.objective import StudentObjective, teacher_forward

TINY = {"teacher": (2, 64, 4), "student": (2, 32, 2), "vocab": 512, "seq": 64, "batch": 2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--teacher", type=int, nargs=3, default=(48, 1600, 25), metavar=("LAYERS", "HIDDEN", "HEADS")
    )
    parser.add_argument(
        "--student", type=int, nargs=3, default=(12, 768, 12), metavar=("LAYERS", "HIDDEN", "HEADS")
    )
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--chunk-size", type=int, default=1024, help="Tokens per chunk of the chunked loss.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps (after one warm-up step).")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="Device peak for the MFU; default: the matmul peak measured in this run.",
    )
    parser.add_argument(
        "--matmul-size", type=int, default=8192, help="Side of the square matmuls that measure the peak."
    )
    parser.add_argument("--tiny", action="store_true", help="Tiny shapes for a CPU check.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object per loss path.")
    args = parser.parse_args(argv)
    if args.tiny:
        args.teacher, args.student = TINY["teacher"], TINY["student"]
        args.vocab, args.seq, args.batch = TINY["vocab"], TINY["seq"], TINY["batch"]
        args.steps = min(args.steps, 2)
        args.matmul_size = min(args.matmul_size, 256)
    return args


def make_batch(args, device) -> dict[str, torch.Tensor]:
    """Random tokens; the first half of each row is the prompt (unsupervised), as in instruction data."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)  # [B, T]
    labels = torch.roll(ids, -1, dims=1)  # already shifted, as the batch contract says
    labels[:, : args.seq // 2] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB; process peak


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device, dtype, size: int, repeats: int = 10) -> float:
    """The best TFLOP/s of ``repeats`` [size, size] x [size, size] matmuls in ``dtype``: the MFU's denominator.

    The best, not the median: the peak is what the device can reach (clocks, cache state), and the step's
    share of it is the figure of interest.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(3):  # warm-up: kernel selection, clocks
        a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def build_pair(args, device):
    """The frozen teacher and the student, built on ``device`` (no CPU initialisation of 1.5B weights)."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with torch.device(device):
        layers, hidden, heads = args.teacher
        teacher = build_small_model("gpt2", args.vocab, seed=0, layers=layers, hidden=hidden, heads=heads)
        layers, hidden, heads = args.student
        student = build_small_model("gpt2", args.vocab, seed=1, layers=layers, hidden=hidden, heads=heads)
    return teacher.to(dtype).eval().requires_grad_(False), student.to(dtype).train()


def measure(args, chunk_size: int, device, teacher, student, peak_tflops: float | None) -> dict[str, float]:
    objective_config = ObjectiveConfig(
        divergence="skew_reverse_kl", kd_ratio=1.0, skew_alpha=0.1, chunk_size=chunk_size
    )
    objective = StudentObjective(student, objective_config, args.vocab)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-5)
    batch = make_batch(args, device)
    num_tokens = (batch["labels"] != IGNORE_INDEX).sum()
    losses = []

    def step() -> None:
        teacher_out = teacher_forward(teacher, batch, args.vocab, chunked=chunk_size > 0)
        loss = objective(batch, num_tokens, teacher_out)
        loss.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.total.detach())

    step()  # warm-up: allocator, kernels, optimizer state
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    tokens = args.batch * args.seq
    # Model FLOPs: 6 N per token for the student (forward + backward), 2 N for the frozen teacher's forward.
    flops = tokens * (6 * parameters(student) + 2 * parameters(teacher))
    result = {
        "loss": "chunked" if chunk_size > 0 else "dense",
        "chunk_size": chunk_size,
        "seconds_per_step": seconds,
        "tokens_per_s": tokens / seconds,
        "achieved_tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / (peak_tflops * 1e12) if peak_tflops else None,
        "peak_memory_gib": peak_memory_gib(device),
        "losses_finite": bool(torch.isfinite(torch.stack(losses)).all()),
        "teacher_params_m": parameters(teacher) / 1e6,
        "student_params_m": parameters(student) / 1e6,
    }
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(
        f"device {name}; teacher {tuple(args.teacher)}, student {tuple(args.student)}, vocab {args.vocab}, "
        f"batch {args.batch} x seq {args.seq}, {args.dtype}, {args.steps} timed steps",
        file=sys.stderr,
    )
    measured_peak = matmul_peak_tflops(device, dtype, args.matmul_size)
    peak = args.peak_tflops if args.peak_tflops is not None else measured_peak
    if args.json:
        print(
            json.dumps({"device": name, "matmul_size": args.matmul_size, "matmul_peak_tflops": measured_peak})
        )
    else:
        print(
            f"{args.dtype} matmul peak measured ({args.matmul_size}^3, best of 10): {measured_peak:.1f} TFLOP/s; "
            f"MFU against {peak:.1f} TFLOP/s"
        )
    teacher, student = build_pair(args, device)
    for chunk_size in (0, args.chunk_size):
        result = measure(args, chunk_size, device, teacher, student, peak)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous path's optimizer state is gone; start the next one clean
        if args.json:
            print(json.dumps({"device": name, **result}), flush=True)
            continue
        mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
        print(
            f"{result['loss']:>7} loss (chunk {chunk_size}): {result['seconds_per_step']:.3f} s/step, "
            f"{result['tokens_per_s']:,.0f} tokens/s, {result['achieved_tflops']:.2f} TFLOP/s, MFU {mfu}, "
            f"peak memory {result['peak_memory_gib']:.2f} GiB, losses finite {result['losses_finite']} "
            f"(teacher {result['teacher_params_m']:.0f}M, student {result['student_params_m']:.0f}M params)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
