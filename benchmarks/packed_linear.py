"""Decoding-sized linear maps: F.linear against oneDNN's packed weights (`FastDecoder.pack_weights`).

The figures behind `generation.pack_weights`' limits (docs/generation.md, point 5), fp32 on the CPU:

1. One map at a time, weights hot in the cache, 8 and 16 rows: where packing starts to pay (the 256K-weight
   threshold of `distillm.kernels.packing.MIN_PACKED_WEIGHTS`).
2. 24 distinct 576 x 1536 maps in turn (the SmolLM2 shape's MLPs, more than the cache holds), 8 rows.
3. The SmolLM2-shaped 4-layer student (random weights): the time to pack it, and the prompt's forward
   (8 x 32 tokens, left-padded) with and without packed weights, which is why decoding packs after it.
4. The block maps of `distillm demo --real`'s 6-layer student (SmolLM2-135M shapes: q 576, k and v 192 each,
   o 576, gate and up 1536, down; 8 rows, more weights than the cache holds) in turn, as one decoding step
   runs them: as the decoder has them (k and v under `MIN_PACKED_WEIGHTS`, so unpacked) against q/k/v and
   gate/up each fused into one packed map (not what the decoder does: a lead for its decoding step).

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
from distillm.kernels.packing import MIN_PACKED_WEIGHTS, pack_weight, packed_linear  # noqa: E402
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
        layers = 6
        shapes = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576),
                  "gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}  # fmt: skip
        blocks = [
            {name: torch.randn(out, fan_in) for name, (fan_in, out) in shapes.items()} for _ in range(layers)
        ]
        rows = {576: torch.randn(8, 1, 576), 1536: torch.randn(8, 1, 1536)}

        def as_decoder(weight):  # (fan-in, packed?, weight): what the decoder does with a map of this size
            packed = weight.numel() >= MIN_PACKED_WEIGHTS
            return weight.shape[1], packed, pack_weight(weight, 8) if packed else weight

        def run(maps):
            for fan_in, packed, weight in maps:
                packed_linear(rows[fan_in], weight, None) if packed else F.linear(rows[fan_in], weight)

        current = [as_decoder(w) for block in blocks for w in block.values()]
        fused = []
        for block in blocks:
            fused.append((576, True, pack_weight(torch.cat([block["q"], block["k"], block["v"]]), 8)))
            fused.append(as_decoder(block["o"]))
            fused.append((576, True, pack_weight(torch.cat([block["gate"], block["up"]]), 8)))
            fused.append(as_decoder(block["down"]))
        ms = alternating(
            {"current": lambda: run(current), "fused": lambda: run(fused)}, args.repeats, calls=10
        )
        megabytes = sum(w.numel() for block in blocks for w in block.values()) * 4 / 1e6
        print(f"\n4. the real-pair student's block maps, {layers} layers, {megabytes:.0f} MB, 8 rows\n")
        print(
            f"as the decoder has them ({len(current)} maps, "
            f"{sum(not packed for _, packed, _ in current)} unpacked): {ms['current'] * 1e3:.2f} ms "
            f"({megabytes / 1e3 / ms['current']:.1f} GB/s); q/k/v and gate/up fused ({len(fused)} maps): "
            f"{ms['fused'] * 1e3:.2f} ms ({megabytes / 1e3 / ms['fused']:.1f} GB/s); current / fused "
            f"{ms['current'] / ms['fused']:.2f}x"
        )
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
