"""Tokens per second of `distillm.generation.sample` against Hugging Face `model.generate`.

Both sample with temperature 1, top-k off, top-p 1 from the same left-padded prompts, and both are forced to
produce exactly `max_new_tokens` tokens per row (the EOS id is one past the vocabulary, so it can never be
sampled while both loops still check for it). Runs alternate, so background load hits all alike; the table
shows the median of `--repeats` runs and the ratios of the medians.

"ours" runs on the very model object `generate` runs on: the sampler alone. Where distillm's loader changes
the model (`distillm.kernels.gelu.fuse_tanh_gelu`: GPT-2's `gelu_new` becomes `SigmoidTanhGELU`, the same function
up to float rounding), a third column "ours, as loaded" runs our sampler on a copy of the model with
that swap, which is what `distillm train/generate/evaluate` actually sample from; `generate` keeps the
Hugging Face modules. For Llama-family models the loader changes nothing, and the column repeats "ours".

Our sampler runs its decoding steps' linear maps through our own kernel, or packs the weights for oneDNN
where that cannot run (`GenerationConfig.pack_weights`, on by default; docs/generation.md, point 5) inside
each timed call, so any packing cost is counted; `--no-pack-weights` measures it without.

    python benchmarks/generation.py                      # tiny GPT-2 student and SmolLM2-shaped 4-layer Llama
    python benchmarks/generation.py --models tiny --new-tokens 64 --repeats 3
    python benchmarks/generation.py --device cuda --dtype bf16 --models gpt2 gpt2-medium --batch 32 --new-tokens 256

On another device than the CPU (or with `--recommend`) the last line says which loop `generation.sampler=auto` should run there
(`distillm.generation.AUTO_SAMPLER`): ours where its tokens/s beat `generate`'s in the geometric mean of the
rows, else `generate`. Timings wait for the device (CUDA runs asynchronously) and our sampler's generator
lives on the model's device, as in `distillm evaluate`.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch

from distillm.config import GenerationConfig
from distillm.generation import AUTO_SAMPLER, sample
from distillm.kernels.gelu import fuse_tanh_gelu
from distillm.models import build_small_model

# name -> (family, vocab, build_small_model keyword arguments)
MODELS = {
    # The bundled demo student: GPT-2 shape, 2 layers, hidden 128, vocab 8192 (1.5M parameters).
    "tiny": ("gpt2", 8192, dict(layers=2, hidden=128, heads=4)),
    # SmolLM2-135M's shape cut to 4 layers (the layer-subset student of a SmolLM2 teacher), random weights.
    "smollm4": (
        "llama",
        49152,
        dict(
            layers=4,
            hidden=576,
            heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            tie_word_embeddings=True,
        ),
    ),
    # The paper's GPT-2 students, random weights (for GPUs: on 2 CPU cores these take minutes).
    "gpt2": ("gpt2", 50257, dict(layers=12, hidden=768, heads=12)),
    "gpt2-medium": ("gpt2", 50257, dict(layers=24, hidden=1024, heads=16)),
}


def left_padded_prompts(
    batch: int, length: int, vocab: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of lengths between length/2 and length, left-padded with 0: ([B, P], [B, P])."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator).tolist()
    lengths[0] = length
    ids = torch.zeros((batch, length), dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, length - n :] = torch.randint(1, vocab, (n,), generator=generator)
        mask[row, length - n :] = 1
    return ids, mask


# The sampling settings both loops get.
SETTINGS = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(model, ids, mask, new_tokens: int, vocab: int, seed: int, pack_weights: bool = True) -> float:
    config = GenerationConfig(
        max_new_tokens=new_tokens, pack_weights=pack_weights, sampler="distillm", **SETTINGS
    )
    generator = torch.Generator(device=ids.device).manual_seed(seed)
    synchronize(ids.device)
    start = time.perf_counter()
    out = sample(model, ids, mask, config, eos_token_id=vocab, pad_token_id=0, generator=generator)
    synchronize(ids.device)
    elapsed = time.perf_counter() - start
    assert out.shape == (ids.shape[0], new_tokens), out.shape
    return elapsed


def time_generate(model, ids, mask, new_tokens: int, vocab: int, seed: int) -> float:
    torch.manual_seed(seed)
    synchronize(ids.device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        **SETTINGS,
        max_new_tokens=new_tokens,
        eos_token_id=vocab,
        pad_token_id=0,
    )
    synchronize(ids.device)
    elapsed = time.perf_counter() - start
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
    return elapsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "smollm4"])
    parser.add_argument("--new-tokens", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each; the median is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the models' weights")
    parser.add_argument(
        "--recommend", action="store_true", help="print the sampler recommendation on a CPU too"
    )
    parser.add_argument(
        "--no-pack-weights",
        dest="pack_weights",
        action="store_false",
        help="sample with torch's own linear maps: no native kernel, no oneDNN packing (GenerationConfig.pack_weights=false)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else args.device
    print(
        f"device {device_name}, {args.dtype}, torch threads {torch.get_num_threads()}, batch {args.batch}, "
        f"prompt length {args.prompt_length} (left-padded, mixed lengths), median of {args.repeats} runs, "
        f"ours with pack_weights={args.pack_weights}"
    )
    print()
    print(
        "| model | new tokens | ours tokens/s | ours, as loaded | generate tokens/s | ratio | ratio, as loaded |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    ratios: list[float] = []
    for name in args.models:
        family, vocab, sizes = MODELS[name]
        with torch.device(device):  # built where it runs: no CPU initialisation of large models
            model = build_small_model(family, vocab, **sizes).to(dtype).eval()
        loaded = copy.deepcopy(model)
        swapped = fuse_tanh_gelu(loaded) > 0
        ids, mask = (t.to(device) for t in left_padded_prompts(args.batch, args.prompt_length, vocab))
        for new_tokens in args.new_tokens:
            # Warm-up (allocator, first-call dispatch); 16 tokens, the fewest that pack the weights.
            time_ours(model, ids, mask, 16, vocab, 0, args.pack_weights)
            time_ours(loaded, ids, mask, 16, vocab, 0, args.pack_weights)
            time_generate(model, ids, mask, 8, vocab, 0)
            ours, ours_loaded, theirs = [], [], []
            for repeat in range(args.repeats):
                ours.append(time_ours(model, ids, mask, new_tokens, vocab, repeat, args.pack_weights))
                if swapped:
                    ours_loaded.append(
                        time_ours(loaded, ids, mask, new_tokens, vocab, repeat, args.pack_weights)
                    )
                theirs.append(time_generate(model, ids, mask, new_tokens, vocab, repeat))
            tokens = args.batch * new_tokens
            ours_rate, theirs_rate = tokens / statistics.median(ours), tokens / statistics.median(theirs)
            loaded_rate = tokens / statistics.median(ours_loaded) if swapped else ours_rate
            print(
                f"| {name} | {new_tokens} | {ours_rate:,.0f} | {loaded_rate:,.0f} | {theirs_rate:,.0f} | "
                f"{ours_rate / theirs_rate:.2f}x | {loaded_rate / theirs_rate:.2f}x |",
                flush=True,
            )
            ratios.append(loaded_rate / theirs_rate)
    if device.type != "cpu" or args.recommend:
        print()
        print(recommendation(device.type, ratios))
    return 0


def recommendation(device_type: str, ratios: list[float]) -> str:
    """Which loop `generation.sampler=auto` should run on ``device_type``, from ours/generate tokens/s ratios."""
    mean = math.exp(statistics.fmean(math.log(r) for r in ratios))
    choice = "distillm" if mean >= 1.0 else "generate"
    current = AUTO_SAMPLER.get(device_type, "distillm")
    verdict = (
        "keep it"
        if choice == current
        else f"change AUTO_SAMPLER[{device_type!r}] to {choice!r} in src/distillm/generation.py"
    )
    return (
        f"Recommendation for {device_type}: ours/generate tokens/s geometric mean {mean:.2f}x over "
        f"{len(ratios)} rows (as loaded), so generation.sampler=auto should run {choice!r} there; "
        f"AUTO_SAMPLER says {current!r}: {verdict}."
    )


if __name__ == "__main__":
    raise SystemExit(main())
