"""Decoding-sized linear maps: F.linear against oneDNN's packed weights (`FastDecoder.pack_weights`).

The figures behind `generation.pack_weights`' limits (docs/generation.md, point 5), fp32 on the CPU:

1. One map at a time, weights hot in the cache, 8 and 16 rows: where packing starts to pay (the 256K-weight
   threshold of `distillm.kernels.packing.MIN_PACKED_WEIGHTS`).
2. 24 distinct 576 x 1536 maps in turn (the SmolLM2 shape's MLPs, more than the cache holds), 8 rows.
3. The SmolLM2-shaped 4-layer student (random weights): the time to pack it, and the prompt's forward
   (8 x 32 tokens, left-padded) with and without packed weights, which is why decoding packs after it.

Every figure is the median of `--repeats` alternating rounds; ratios are F.linear / packed (above 1: packed
is faster), measured in the same run.

    python benchmarks/packed_linear.py --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distillm.fast_forward import fast_decoder  # noqa: E402
from distillm.kernels.packing import pack_weight, packed_linear  # noqa: E402
from distillm.models import build_small_model  # noqa: E402
from generation import MODELS, left_padded_prompts  # noqa: E402

SHAPES = [
    (128, 384),
    (128, 1024),
    (256, 1024),
    (576, 192),
    (576, 576),
    (576, 1536),
    (128, 8192),
    (1024, 4096),
]


def seconds(function, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def alternating(functions: dict, repeats: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each function, over rounds that run them in turn."""
    for function in functions.values():
        seconds(function, max(1, calls // 4))  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            runs[name].append(seconds(function, calls))
    return {name: statistics.median(values) for name, values in runs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, fp32, median of {args.repeats} alternating rounds")

    print("\n1. one map, weights hot in the cache (us per call)\n")
    print("| in x out | weights | rows | F.linear | packed | F.linear / packed |")
    print("|---|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for rows in (8, 16):
            for fan_in, fan_out in SHAPES:
                weight, inputs = torch.randn(fan_out, fan_in), torch.randn(rows, 1, fan_in)
                packed = pack_weight(weight, rows)
                us = alternating(
                    {
                        "linear": lambda x=inputs, w=weight: F.linear(x, w),
                        "packed": lambda x=inputs, p=packed: packed_linear(x, p, None),
                    },
                    args.repeats,
                    calls=200,
                )
                print(
                    f"| {fan_in} x {fan_out} | {weight.numel():,} | {rows} | {us['linear'] * 1e6:.1f} | "
                    f"{us['packed'] * 1e6:.1f} | {us['linear'] / us['packed']:.2f}x |",
                    flush=True,
                )

        weights = [torch.randn(1536, 576) for _ in range(24)]
        packs = [pack_weight(w, 8) for w in weights]
        inputs = torch.randn(8, 1, 576)
        ms = alternating(
            {
                "linear": lambda: [F.linear(inputs, w) for w in weights],
                "packed": lambda: [packed_linear(inputs, p, None) for p in packs],
            },
            args.repeats,
            calls=10,
        )
        megabytes = sum(w.numel() for w in weights) * 4 / 1e6
        print("\n2. 24 distinct 576 x 1536 maps in turn, 8 rows (ms for all 24)\n")
        print(
            f"F.linear {ms['linear'] * 1e3:.2f} ms ({megabytes / 1e3 / ms['linear']:.1f} GB/s), packed "
            f"{ms['packed'] * 1e3:.2f} ms ({megabytes / 1e3 / ms['packed']:.1f} GB/s): "
            f"{ms['linear'] / ms['packed']:.2f}x"
        )

        family, vocab, sizes = MODELS["smollm4"]
        model = build_small_model(family, vocab, **sizes).eval()
        ids, mask = left_padded_prompts(8, 32, vocab)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        plain, packed_decoder = fast_decoder(model), fast_decoder(model)
        pack_seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            count = packed_decoder.pack_weights(8, head=model.lm_head)
            pack_seconds.append(time.perf_counter() - start)
        ms = alternating(
            {
                "plain": lambda: plain.prefill(ids, mask, positions, 64),
                "packed": lambda: packed_decoder.prefill(ids, mask, positions, 64),
            },
            args.repeats,
            calls=3,
        )
        print("\n3. SmolLM2-shaped 4-layer student\n")
        print(f"packing {count} maps (head included): {statistics.median(pack_seconds) * 1e3:.1f} ms")
        print(
            f"prompt forward 8 x 32: unpacked {ms['plain'] * 1e3:.1f} ms, packed {ms['packed'] * 1e3:.1f} ms "
            f"(packed / unpacked {ms['packed'] / ms['plain']:.2f}x)"
        )
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
