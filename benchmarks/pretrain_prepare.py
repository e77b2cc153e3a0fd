"""Throughput and peak memory of `distillm prepare-pretrain` against the fast tokenizer's own batch call.

For each corpus size (synthetic text, written to a temporary folder, one document per line with the
original's `<@x(x!>` paragraph marker, Zipf-distributed words from a 50,000-word vocabulary, documents of
log-normal length around 900 words, like OpenWebText), in child processes:

- `prepare`: `pack_corpus` on the file (what `distillm prepare-pretrain --text FILE` runs): reading,
  marker decoding, batched encoding, packing into 512-token chunks and writing them. Tokens/s counts the
  encoded stream (EOS included) over the whole call; peak memory is the process' resident-set high-water
  mark (VmHWM), shown with the resident set after imports and set-up (`base`).
- `encode`: the same documents in the same batches, read the same way, but only the Rust tokenizer's
  calls are timed: `encode_batch` (the goal's floor, and what `prepare` calls) and `encode_batch_fast` (no
  offsets), interleaved batch by batch so that load hits both alike. Tokens/s over the timed calls alone.

Both children get the same `RAYON_NUM_THREADS` (`--threads`). The tokenizer is a byte-level BPE
(vocabulary `--vocab`) trained on the first megabytes of the corpus. Goals: peak memory within 10% between
sizes and under 1 GB; `prepare` at least 90% of `encode_batch`.

    python benchmarks/pretrain_prepare.py                          # 100 MB and 1 GB, 1 thread
    python benchmarks/pretrain_prepare.py --sizes 100M --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = 50_000
_BLOCK_WORDS = 2_000_000


def _parse_size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def write_corpus(path: Path, size: int, seed: int = 0) -> int:
    """Write about ``size`` bytes of synthetic documents to ``path``; returns the documents written."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 11, size=WORDS)
    vocabulary = np.array(["".join(rng.choice(letters, n)) for n in lengths], dtype=object)
    capital = rng.random(WORDS) < 0.1
    vocabulary[capital] = [word.capitalize() for word in vocabulary[capital]]
    written = documents = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < size:
            ranks = np.minimum(rng.zipf(1.2, _BLOCK_WORDS), WORDS) - 1
            words = vocabulary[ranks]
            separators = np.full(_BLOCK_WORDS, " ", dtype=object)
            separators[rng.random(_BLOCK_WORDS) < 1 / 80] = ".<@x(x!>"  # a paragraph break
            separators[rng.random(_BLOCK_WORDS) < 1 / 15] = ", "
            ends = np.cumsum(np.maximum(rng.lognormal(6.5, 0.8, _BLOCK_WORDS // 200).astype(int), 5))
            ends = ends[ends < _BLOCK_WORDS]
            separators[ends] = ".\n"
            text = "".join(w + s for w, s in zip(words.tolist(), separators.tolist()))
            text = text[: text.rfind("\n", 0, size - written) + 1]  # whole documents, up to the size
            if not text:
                break
            handle.write(text)
            written += len(text)
            documents += text.count("\n")
    return documents


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child_prepare(corpus: str, tokenizer_dir: str, out: str) -> dict:
    from transformers import AutoTokenizer

    from distillm.data import pack_corpus
    from distillm.data.corpus import TextCorpus

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = _rss("VmRSS")
    start = time.perf_counter()
    meta = pack_corpus(TextCorpus([corpus]), tokenizer, out, 512)
    seconds = time.perf_counter() - start
    return {"tokens": meta["tokens"], "seconds": seconds, "base": base, "peak": _rss("VmHWM")}


def child_encode(corpus: str, tokenizer_dir: str) -> dict:
    from transformers import AutoTokenizer

    from distillm.data.corpus import TextCorpus
    from distillm.data.pretrain import _BATCH_CHARS, _batches

    backend = AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer
    seconds = {"encode_batch": 0.0, "encode_batch_fast": 0.0}
    tokens = 0
    for number, batch in enumerate(_batches(TextCorpus([corpus]).documents(), _BATCH_CHARS)):
        calls = [("encode_batch", backend.encode_batch), ("encode_batch_fast", backend.encode_batch_fast)]
        for name, call in calls if number % 2 else reversed(calls):
            start = time.perf_counter()
            encodings = call(batch, add_special_tokens=False)
            seconds[name] += time.perf_counter() - start
        tokens += sum(len(e.ids) for e in encodings) + len(batch)  # + one EOS per document, as prepared
    return {"tokens": tokens, "seconds": seconds, "peak": _rss("VmHWM")}


def _run_child(args: list[str], threads: int) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
    result = subprocess.run(
        [sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100M,1G", help="Corpus sizes in bytes (K/M/G), comma-separated.")
    parser.add_argument("--threads", type=int, default=1, help="Tokenizer threads (RAYON_NUM_THREADS).")
    parser.add_argument("--repeats", type=int, default=1, help="Runs of each child per size (median).")
    parser.add_argument("--vocab", type=int, default=16384, help="Vocabulary of the trained BPE tokenizer.")
    parser.add_argument("--tmp", default=None, help="Where the corpora go (default: the system temp folder).")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(child_prepare(*rest) if kind == "prepare" else child_encode(*rest)))
        return

    from distillm.tokenizer import train_bpe_tokenizer

    print(f"CPU: {_cpu()}; load average before: {os.getloadavg()[0]:.2f}; tokenizer threads: {args.threads}")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="pretrain-bench-") as folder:
        folder = Path(folder)
        for label in args.sizes.split(","):
            size = _parse_size(label)
            corpus = folder / f"corpus-{label}.txt"
            start = time.perf_counter()
            documents = write_corpus(corpus, size)
            print(
                f"{label}: wrote {corpus.stat().st_size / 1e6:.0f} MB, {documents} documents in {time.perf_counter() - start:.0f} s"
            )
            tokenizer_dir = folder / "tokenizer"
            if not tokenizer_dir.exists():
                with open(corpus, encoding="utf-8") as handle:
                    sample = handle.read(20_000_000).splitlines()
                train_bpe_tokenizer(sample, vocab_size=args.vocab, out_dir=tokenizer_dir)
            prepared, encoded = [], []
            for _ in range(args.repeats):
                out = folder / f"prepared-{label}"
                prepared.append(
                    _run_child(["prepare", str(corpus), str(tokenizer_dir), str(out)], args.threads)
                )
                encoded.append(_run_child(["encode", str(corpus), str(tokenizer_dir)], args.threads))
                subprocess.run(["rm", "-rf", str(out)], check=True)
                print(
                    f"  run: prepare {prepared[-1]['tokens'] / prepared[-1]['seconds']:,.0f} tok/s, encode_batch {encoded[-1]['tokens'] / encoded[-1]['seconds']['encode_batch']:,.0f} tok/s; load {os.getloadavg()[0]:.2f}"
                )
            corpus.unlink()
            assert prepared[0]["tokens"] == encoded[0]["tokens"], "the two children saw different text"
            rows.append((label, prepared, encoded))

    print(f"\nload average after: {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[1]:.2f} (5 min)")
    print(
        "| corpus | tokens | prepare tok/s | encode_batch tok/s | encode_batch_fast tok/s | prepare / encode_batch | prepare / encode_batch_fast | peak RSS | RSS after set-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    peaks = []
    for label, prepared, encoded in rows:
        tokens = prepared[0]["tokens"]
        ours = statistics.median(tokens / p["seconds"] for p in prepared)
        slow = statistics.median(tokens / e["seconds"]["encode_batch"] for e in encoded)
        fast = statistics.median(tokens / e["seconds"]["encode_batch_fast"] for e in encoded)
        peak = statistics.median(p["peak"] for p in prepared)
        base = statistics.median(p["base"] for p in prepared)
        peaks.append(peak)
        print(
            f"| {label} | {tokens:,} | {ours:,.0f} | {slow:,.0f} | {fast:,.0f} | {ours / slow:.2f} | {ours / fast:.2f} | {peak / 2**20:.0f} MiB | {base / 2**20:.0f} MiB |"
        )
    if len(peaks) > 1:
        print(f"peak RSS, largest / smallest corpus: {max(peaks) / min(peaks):.3f}")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    return "unknown"


if __name__ == "__main__":
    main()
