"""Milliseconds of the tanh-approximated GELU: distillm's `SigmoidTanhGELU` against torch's and transformers'.

Three implementations of 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) on the same fp32 activations:

- `F.gelu`: `torch.nn.functional.gelu(x, approximate="tanh")`, one fused kernel (transformers' `GELUTanh`,
  activation `gelu_pytorch_tanh`);
- `gelu_new`: transformers' `NewGELUActivation` (GPT-2's activation), a chain of elementwise ops;
- `ours`: `distillm.kernels.gelu.SigmoidTanhGELU`, what `fuse_tanh_gelu` swaps in at load time (x * sigmoid(2z) on
  CPU, torch's backward).

"forward" runs without grad (a frozen teacher, generation); "forward + backward" runs on an input that needs
grad and back-propagates a fixed upstream gradient (training). Each repeat times `--iters` calls of every
variant in turn, so background load hits all alike; the table gives the median over `--repeats` of the
per-call time and the ratios of the medians.

    python benchmarks/gelu.py                     # GPT-2's MLP [8, 256, 3072] and [2080, 1024], 2 threads
    python benchmarks/gelu.py --shapes 16x128x512 --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers.activations import NewGELUActivation

from distillm.kernels.gelu import SigmoidTanhGELU


def torch_gelu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


VARIANTS = {"F.gelu": torch_gelu, "gelu_new": NewGELUActivation(), "ours": SigmoidTanhGELU()}


def seconds_per_call(gelu, x: torch.Tensor, upstream: torch.Tensor | None, iters: int) -> float:
    """Seconds per call of ``gelu(x)`` without grad, or, given ``upstream``, of ``gelu(x).backward(upstream)``
    with ``x`` a leaf that needs grad."""
    if upstream is None:
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(iters):
                gelu(x)
            return (time.perf_counter() - start) / iters
    x = x.detach().requires_grad_()
    start = time.perf_counter()
    for _ in range(iters):
        gelu(x).backward(upstream)
        x.grad = None
    return (time.perf_counter() - start) / iters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["8x256x3072", "2080x1024"],
        help="activation shapes, dimensions joined by x (GPT-2 124M's MLP at batch 8 x 256 is 8x256x3072)",
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed rounds of every variant; medians reported"
    )
    parser.add_argument("--iters", type=int, default=10, help="calls per variant per round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads; 0 keeps torch's default")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, fp32 CPU, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} rounds, load average {os.getloadavg()[0]:.2f} at the start"
    )  # other jobs' load moves these figures, ours' (four kernels) more than F.gelu's (one)
    print()
    print("| shape | pass | F.gelu ms | gelu_new ms | ours ms | F.gelu / ours | gelu_new / ours |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape_text in args.shapes:
        shape = tuple(int(n) for n in shape_text.split("x"))
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=generator) * 2
        upstream = torch.randn(shape, generator=generator)
        for pass_name, pass_upstream in (("forward", None), ("forward + backward", upstream)):
            for gelu in VARIANTS.values():  # warm-up: allocator, first-call dispatch
                seconds_per_call(gelu, x, pass_upstream, args.iters)
            seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
            for _ in range(args.repeats):
                for name, gelu in VARIANTS.items():
                    seconds[name].append(seconds_per_call(gelu, x, pass_upstream, args.iters))
            ms = {name: statistics.median(values) * 1e3 for name, values in seconds.items()}
            print(
                f"| {list(shape)} | {pass_name} | {ms['F.gelu']:.2f} | {ms['gelu_new']:.2f} | "
                f"{ms['ours']:.2f} | {ms['F.gelu'] / ms['ours']:.2f}x | {ms['gelu_new'] / ms['ours']:.2f}x |",
                flush=True,
            )
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
