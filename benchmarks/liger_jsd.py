"""Our chunked divergences against Liger-Kernel's JSD losses: peak memory and forward + backward time.

Every implementation starts from the same inputs, as a distillation step hands them over: the student's
final hidden states [N, H] and head [V, H] (both get gradients) and the teacher's hidden states [N, H] and
head [V, H] (frozen); every token is supervised, the divergence has weight 1 (no cross-entropy), and the
result is the token mean, beta 0.5 for the JSD (where all conventions agree):

| name | what runs |
|---|---|
| ours chunked jsd | `distillm.losses.chunked_distillation_loss` with `generalized_jsd`: the common ground |
| ours chunked skew rkl / skew fkl | the same with `skew_reverse_kl` / `skew_forward_kl` (alpha 0.1), which Liger lacks |
| ours dense jsd | full [N, V] logits of both, `distillation_loss` (the path without chunking) |
| liger chunked jsd | `liger_kernel.chunked_loss.LigerFusedLinearJSDLoss` (torch.compile'd chunks) |
| liger fused linear jsd | `liger_kernel.transformers.LigerFusedLinearJSD` (Triton, head fused in) |
| liger jsd | full logits, `log_softmax`, `liger_kernel.transformers.LigerJSD` (Triton, on logits) |

Shapes: `liger` is Liger's own JSD benchmark (B x T = 8192, H = 4096, V = 128,256, bf16); `gpt2-xl` is
GPT-2 XL's head (H = 1600, V = 50,257) at the same 8192 tokens. Chunks: 1024 tokens for ours and Liger's
chunked loss (Liger's default). Memory is the peak *above* the inputs during one timed forward + backward
(`torch.cuda.max_memory_allocated`); time is the median of `--repeats` after `--warmup` runs (the compiled
and Triton paths compile then). The loss of every path is printed beside its figures, with its relative
difference from ours dense, so a fast wrong answer shows.

Liger needs CUDA (Triton): without it, or without the `liger-kernel` package (`make gpu-wheels` carries it
to the lent GPU machine), its rows say why they were skipped. `--tiny` runs tiny shapes on any device.

    python benchmarks/liger_jsd.py --shapes liger gpt2-xl      # on a GPU
    python benchmarks/liger_jsd.py --tiny                       # anywhere: checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from distillm.losses import chunked_distillation_loss, distillation_loss, get_divergence

# name -> (tokens N = B x T, hidden H, vocab V)
SHAPES = {"liger": (8192, 4096, 128256), "gpt2-xl": (8192, 1600, 50257), "tiny": (64, 32, 512)}
OURS = ("ours dense jsd", "ours chunked jsd", "ours chunked skew rkl", "ours chunked skew fkl")
# The compiled one last: its compilation is the slowest start, and a time limit then cuts it alone.
LIGER = ("liger fused linear jsd", "liger jsd", "liger chunked jsd")
BETA, ALPHA = 0.5, 0.1


def make_inputs(shape: tuple[int, int, int], device, dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Student and teacher hidden states and heads of the scale a trained model's have (logits of std ~2)."""
    n, h, v = shape
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale):
        return (torch.randn(*size, device=device, generator=generator) * scale).to(dtype)

    return {
        "student_hidden": randn(n, h, scale=1.0).requires_grad_(),
        "student_weight": randn(v, h, scale=2 / h**0.5).requires_grad_(),
        "teacher_hidden": randn(n, h, scale=1.0),
        "teacher_weight": randn(v, h, scale=2 / h**0.5),
        "labels": torch.randint(0, v, (n,), device=device, generator=generator),
    }


def ours(name: str, chunk_size: int) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    if name.endswith("skew rkl"):
        divergence = get_divergence("skew_reverse_kl", skew_alpha=ALPHA)
    elif name.endswith("skew fkl"):
        divergence = get_divergence("skew_forward_kl", skew_alpha=ALPHA)
    else:
        divergence = get_divergence("generalized_jsd", jsd_beta=BETA)
    if name.startswith("ours dense"):

        def dense(x):
            student_logits = F.linear(x["student_hidden"], x["student_weight"])  # [N, V]
            with torch.no_grad():
                teacher_logits = F.linear(x["teacher_hidden"], x["teacher_weight"])  # [N, V]
            return distillation_loss(
                student_logits, x["labels"], divergence, 1.0, teacher_logits=teacher_logits
            ).total

        return dense

    def chunked(x):
        return chunked_distillation_loss(
            x["student_hidden"],
            x["student_weight"],
            x["labels"],
            divergence,
            1.0,
            teacher_hidden=x["teacher_hidden"],
            teacher_head_weight=x["teacher_weight"],
            chunk_size=chunk_size,
        ).total

    return chunked


def liger(name: str, chunk_size: int, device) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """Liger-Kernel's path called ``name``; raises ImportError where the package is missing."""
    if name == "liger chunked jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # Plain PyTorch chunks, compiled on CUDA as Liger does by default (eager elsewhere: no compiler needed).
        loss = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0,
            weight_soft_loss=1.0,
            beta=BETA,
            chunk_size=chunk_size,
            compiled=device.type == "cuda",
        )
        return lambda x: loss(
            x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["labels"]
        )
    if name == "liger fused linear jsd":
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        loss = LigerFusedLinearJSD(jsd_beta=BETA)
        return lambda x: loss(
            x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["labels"]
        )
    from liger_kernel.transformers.jsd import LigerJSD

    jsd = LigerJSD(beta=BETA)

    def on_logits(x):
        # As in Liger's own benchmark: log-softmaxes in the input dtype, then the Triton JSD.
        log_q = F.linear(x["student_hidden"], x["student_weight"]).log_softmax(-1)  # [N, V]
        with torch.no_grad():
            log_p = F.linear(x["teacher_hidden"], x["teacher_weight"]).log_softmax(-1)  # [N, V]
        return jsd(log_q, log_p, x["labels"])

    return on_logits


def liger_unavailable(name: str, device) -> str | None:
    """Why Liger's path ``name`` cannot run here, or None. Its chunked loss is plain PyTorch and runs anywhere."""
    try:
        import liger_kernel  # noqa: F401  (needs triton, also on a CPU)
    except ImportError as error:
        return f"skipped: liger-kernel cannot be imported ({error}); `make gpu-wheels` carries it"
    if device.type != "cuda" and name != "liger chunked jsd":
        return "skipped: Liger-Kernel's Triton kernels need CUDA"
    return None


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, inputs, device, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of forward + backward, peak memory above the inputs (GiB, CUDA only), the loss."""
    leaves = [inputs["student_hidden"], inputs["student_weight"]]

    def run() -> float:
        for leaf in leaves:
            leaf.grad = None
        loss = fn(inputs)
        loss.backward()
        return float(loss.detach().float())

    for _ in range(warmup):
        run()
    times, peaks, loss = [], [], float("nan")
    for _ in range(repeats):
        for leaf in leaves:
            leaf.grad = None
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        loss = run()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peaks.append((torch.cuda.max_memory_allocated(device) - before) / 2**30)
    for leaf in leaves:
        leaf.grad = None
    return {
        "seconds": statistics.median(times),
        "peak_memory_gib": max(peaks) if peaks else None,
        "loss": loss,
    }


def run_shape(shape_name: str, args, device, dtype) -> list[dict]:
    shape = SHAPES[shape_name]
    inputs = make_inputs(shape, device, dtype)
    rows = []
    for name in args.impls:
        row = {"shape": shape_name, "tokens": shape[0], "hidden": shape[1], "vocab": shape[2], "impl": name}
        skip = liger_unavailable(name, device) if name in LIGER else None
        if skip:
            row["status"] = skip
        else:
            try:
                fn = ours(name, args.chunk_size) if name in OURS else liger(name, args.chunk_size, device)
                row.update(measure(fn, inputs, device, args.warmup, args.repeats), status="ok")
            except torch.cuda.OutOfMemoryError:
                row["status"] = "out of memory"
            except Exception as error:  # a failing path is a figure too; the others still run
                row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row) if args.json else format_row(row, rows), flush=True)
    return rows


def format_row(row: dict, rows: list[dict]) -> str:
    if row.get("status") != "ok":
        return f"| {row['shape']} | {row['impl']} | - | - | - | {row.get('status')} |"
    reference = next((r for r in rows if r["impl"] == "ours dense jsd" and r.get("status") == "ok"), None)
    memory = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else "n/a (CPU)"
    difference = "-"
    if reference is not None and "jsd" in row["impl"] and row is not reference:
        difference = f"{abs(row['loss'] - reference['loss']) / max(abs(reference['loss']), 1e-30):.1e}"
    return (
        f"| {row['shape']} | {row['impl']} | {1000 * row['seconds']:.1f} | {memory} | "
        f"{row['loss']:.5f} (rel. diff {difference}) | ok |"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["liger", "gpt2-xl"])
    parser.add_argument("--impls", nargs="+", choices=OURS + LIGER, default=list(OURS + LIGER))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--chunk-size", type=int, default=1024, help="Tokens per chunk (ours and Liger's).")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="The tiny shape, 1 warm-up, 2 repeats.")
    parser.add_argument("--json", action="store_true", help="One JSON object per row.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.shapes, args.warmup, args.repeats, args.chunk_size = ["tiny"], 1, 2, 16
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else args.device
    if not args.json:
        print(
            f"device {device_name}, {args.dtype}, chunk {args.chunk_size}, median of {args.repeats} "
            f"after {args.warmup} warm-up runs; memory above the inputs"
        )
        print()
        print("| shape | implementation | fwd+bwd ms | peak GiB | loss | status |")
        print("|---|---|---:|---:|---|---|")
    for shape_name in args.shapes:
        run_shape(shape_name, args, device, dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
