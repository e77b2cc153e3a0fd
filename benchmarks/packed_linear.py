"""Decoding-sized linear maps: F.linear, oneDNN's packed weights and our kernel (`FastDecoder.pack_weights`).

The figures behind `generation.pack_weights`' limits (docs/generation.md, point 5), fp32 on the CPU:

1. One map at a time, weights hot in the cache, 8 and 16 rows: where each packed kind starts to pay
   (`MIN_PACKED_WEIGHTS` for oneDNN, `MIN_NATIVE_WEIGHTS` for ours, in `distillm.kernels.packing`).
2. 24 distinct 576 x 1536 maps in turn (the SmolLM2 shape's MLPs, more than the cache holds), 8 rows.
3. The SmolLM2 head (49,152 x 576) at 1 to 64 rows: where oneDNN's GEMM overtakes our kernel
   (`NATIVE_MAX_ROWS`).
4. The SmolLM2-shaped 4-layer student (random weights): the time to pack it, and the prompt's forward
   (8 x 32 tokens, left-padded) with and without packed weights, which is why decoding packs after it.
5. The block maps of `distillm demo --real`'s 6-layer student (SmolLM2-135M shapes: q 576, k and v 192 each,
   o 576, gate and up 1536, down; 8 rows, more weights than the cache holds) in turn, as one decoding step
   runs them: through our kernel (what the decoder does where it is available) and through oneDNN (its
   fallback; k and v, under `MIN_PACKED_WEIGHTS`, through F.linear).

Every figure is the median of `--repeats` alternating rounds, measured in the same run; GB/s counts the
weights read once per pass. Our kernel's columns are missing where it is unavailable (no C compiler, no AVX2).

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
from distillm.kernels import skinny  # noqa: E402
from distillm.kernels.packing import (  # noqa: E402
    MIN_NATIVE_WEIGHTS,
    MIN_PACKED_WEIGHTS,
    pack_weight,
    packed_linear,
)
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

    native = skinny.available()
    print(
        f"our kernel: {f'available, {skinny.instruction_set()} path' if native else 'unavailable (see the log)'}; "
        "thresholds: oneDNN from "
        f"{MIN_PACKED_WEIGHTS:,} weights, ours from {MIN_NATIVE_WEIGHTS:,}"
    )

    def kinds(weight, inputs, rows):
        packed = pack_weight(weight, rows)
        functions = {
            "linear": lambda: F.linear(inputs, weight),
            "onednn": lambda: packed_linear(inputs, packed, None),
        }
        if native:
            functions["native"] = lambda: skinny.skinny_linear(inputs, weight)
        return functions

    def cells(times, unit):
        return " | ".join(
            f"{times[k] * unit:.1f}" if k in times else "-" for k in ("linear", "onednn", "native")
        )

    print("\n1. one map, weights hot in the cache (us per call)\n")
    print("| in x out | weights | rows | F.linear | oneDNN | ours | F.linear / ours |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for rows in (8, 16):
            for fan_in, fan_out in SHAPES:
                weight, inputs = torch.randn(fan_out, fan_in), torch.randn(rows, 1, fan_in)
                us = alternating(kinds(weight, inputs, rows), args.repeats, calls=200)
                ratio = f"{us['linear'] / us['native']:.2f}x" if native else "-"
                print(
                    f"| {fan_in} x {fan_out} | {weight.numel():,} | {rows} | {cells(us, 1e6)} | {ratio} |",
                    flush=True,
                )

        weights = [torch.randn(1536, 576) for _ in range(24)]
        packs = [pack_weight(w, 8) for w in weights]
        inputs = torch.randn(8, 1, 576)
        functions = {
            "linear": lambda: [F.linear(inputs, w) for w in weights],
            "onednn": lambda: [packed_linear(inputs, p, None) for p in packs],
        }
        if native:
            functions["native"] = lambda: [skinny.skinny_linear(inputs, w) for w in weights]
        ms = alternating(functions, args.repeats, calls=10)
        megabytes = sum(w.numel() for w in weights) * 4 / 1e6
        print("\n2. 24 distinct 576 x 1536 maps in turn, 8 rows (ms for all 24)\n")
        print(
            ", ".join(f"{name} {t * 1e3:.2f} ms ({megabytes / 1e3 / t:.1f} GB/s)" for name, t in ms.items())
        )

        print("\n3. the SmolLM2 head, 49,152 x 576 (113 MB), by rows (ms per call)\n")
        print("| rows | oneDNN | ours | oneDNN / ours |")
        print("|---:|---:|---:|---:|")
        head = torch.randn(49152, 576)
        for rows in (1, 8, 16, 32, 64):
            inputs = torch.randn(rows, 576)
            functions = kinds(head, inputs, rows)
            del functions["linear"]
            ms = alternating(functions, args.repeats, calls=5)
            ratio = f"{ms['onednn'] / ms['native']:.2f}x" if native else "-"
            ours = f"{ms['native'] * 1e3:.2f}" if native else "-"
            print(f"| {rows} | {ms['onednn'] * 1e3:.2f} | {ours} | {ratio} |", flush=True)
        del head

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
        kind = packed_decoder._packed.kind(model.lm_head)
        print("\n4. SmolLM2-shaped 4-layer student\n")
        print(
            f"packing {count} maps (head included) as {kind}: {statistics.median(pack_seconds) * 1e3:.1f} ms"
        )
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
        maps = [w for block in blocks for w in block.values()]
        onednn = [(w, pack_weight(w, 8) if w.numel() >= MIN_PACKED_WEIGHTS else None) for w in maps]

        def run_onednn():
            for weight, packed in onednn:
                x = rows[weight.shape[1]]
                packed_linear(x, packed, None) if packed is not None else F.linear(x, weight)

        functions = {"onednn": run_onednn}
        wide = skinny.instruction_set() == "avx512"
        if native:
            functions["native"] = lambda: [skinny.skinny_linear(rows[w.shape[1]], w) for w in maps]
            # As the decoder calls them: q/k/v in one call, o, gate/up in one call, down; checked once.
            groups = [
                (skinny.Maps([b[n] for n in names]), rows[b[names[0]].shape[1]])
                for b in blocks
                for names in (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
            ]
            functions["grouped"] = lambda: [group(x) for group, x in groups]
            if wide:  # the same bits through the AVX2 path
                functions["avx2"] = lambda: [
                    skinny.skinny_linear(rows[w.shape[1]], w, avx512=False) for w in maps
                ]
        ms = alternating(functions, args.repeats, calls=10)
        megabytes = sum(w.numel() for w in maps) * 4 / 1e6
        print(
            f"\n5. the real-pair student's block maps, {layers} layers, {len(maps)} maps, {megabytes:.0f} MB, 8 rows\n"
        )
        unpacked = sum(packed is None for _, packed in onednn)
        line = f"oneDNN ({unpacked} maps unpacked): {ms['onednn'] * 1e3:.2f} ms ({megabytes / 1e3 / ms['onednn']:.1f} GB/s)"
        if native:
            line += (
                f"; ours (all {len(maps)}): {ms['native'] * 1e3:.2f} ms ({megabytes / 1e3 / ms['native']:.1f} GB/s); "
                f"oneDNN / ours {ms['onednn'] / ms['native']:.2f}x; ours as the decoder groups them "
                f"({len(groups)} calls): {ms['grouped'] * 1e3:.2f} ms ({megabytes / 1e3 / ms['grouped']:.1f} GB/s), "
                f"{ms['native'] / ms['grouped']:.2f}x the {len(maps)} calls"
            )
            if wide:
                line += (
                    f"; ours through its AVX2 path (this CPU takes the AVX-512 one): {ms['avx2'] * 1e3:.2f} ms "
                    f"({megabytes / 1e3 / ms['avx2']:.1f} GB/s), AVX2 / AVX-512 {ms['avx2'] / ms['native']:.2f}x"
                )
        print(line)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
