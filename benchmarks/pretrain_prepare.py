"""Throughput and peak memory of `distillm prepare-pretrain` against the fast tokenizer's own batch call.

For each corpus size, synthetic text is written to a temporary folder in parts (`--part`, 16 MB) (one document per
line with the original's `<@x(x!>` paragraph marker; Zipf-distributed words from a 50,000-word vocabulary;
documents of log-normal length around 900 words, like OpenWebText). Then, in child processes:

- `prepare`: `pack_corpus` on all parts as one corpus (what `distillm prepare-pretrain --text PARTS...`
  runs): reading, marker decoding, batched encoding, packing into 512-token chunks, writing. Tokens/s
  counts the encoded stream (EOS included) over the whole call; peak memory is the process' resident-set
  high-water mark (VmHWM), shown with the resident set after imports and set-up (`base`).
- `compare`: part by part, the same `pack_corpus` on the part, and the Rust tokenizer's `encode_batch` on
  the part's documents in the same batches, read the same way, timing only the tokenizer calls: the floor.
  The two alternate part by part (which goes first alternates too), so that the other users' load, which
  drifts over minutes on a shared machine, hits both alike. The ratio is over the whole text, in wall time
  and in CPU time (all the process' threads): on a loaded machine the wall-time ratio favours `prepare`,
  whose two busy threads (reading, encoding) get two shares of the scheduler; the CPU-time ratio says what
  reading, packing and writing cost on top of the tokenizer whatever the load.

Both children get the same `RAYON_NUM_THREADS` (`--threads`). The tokenizer is a byte-level BPE
(vocabulary `--vocab`) trained on the start of the corpus. Goals: peak memory within 10% between sizes and
under 1 GB; `prepare` at least 90% of `encode_batch`. `--fast` also times `encode_batch_fast` (no
offsets), interleaved with `encode_batch` batch by batch.

    python benchmarks/pretrain_prepare.py                          # 100 MB and 1 GB, 1 thread
    python benchmarks/pretrain_prepare.py --sizes 30M,100M --threads 2
    python benchmarks/pretrain_prepare.py --sizes 30M,300M --compare 30M --part 4M   # a loaded machine
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = 50_000
_BLOCK_WORDS = 2_000_000  # about 15 MB of text generated at a time


def _parse_size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    suffix = text[-1].upper()
    return int(float(text[:-1]) * units[suffix]) if suffix in units else int(text)


def write_corpus(folder: Path, size: int, seed: int = 0, part_bytes: int = 16_000_000) -> int:
    """Write about ``size`` bytes of synthetic documents to ``folder/part-*.txt``; returns the documents."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = np.array(["".join(rng.choice(letters, n)) for n in rng.integers(2, 11, WORDS)], dtype=object)
    capital = rng.random(WORDS) < 0.1
    vocabulary[capital] = [word.capitalize() for word in vocabulary[capital]]
    folder.mkdir(parents=True)
    written = documents = parts = 0
    while written < size:
        ranks = np.minimum(rng.zipf(1.2, _BLOCK_WORDS), WORDS) - 1
        separators = np.full(_BLOCK_WORDS, " ", dtype=object)
        separators[rng.random(_BLOCK_WORDS) < 1 / 80] = ".<@x(x!>"  # a paragraph break, as the original
        separators[rng.random(_BLOCK_WORDS) < 1 / 15] = ", "
        ends = np.cumsum(np.maximum(rng.lognormal(6.5, 0.8, _BLOCK_WORDS // 200).astype(int), 5))
        separators[ends[ends < _BLOCK_WORDS]] = ".\n"
        text = "".join(w + s for w, s in zip(vocabulary[ranks].tolist(), separators.tolist()))
        text = text[: text.rfind("\n", 0, min(size - written, part_bytes)) + 1]  # whole documents
        if not text:
            break
        (folder / f"part-{parts:05d}.txt").write_text(text, encoding="utf-8")
        parts += 1
        written += len(text)
        documents += text.count("\n")
    return documents


def _parts(corpus: str | Path) -> list[Path]:
    return sorted(Path(corpus).glob("part-*.txt"))


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
    meta = pack_corpus(TextCorpus(_parts(corpus)), tokenizer, out, 512)
    seconds = time.perf_counter() - start
    return {"tokens": meta["tokens"], "seconds": seconds, "base": base, "peak": _rss("VmHWM")}


def child_compare(corpus: str, tokenizer_dir: str, out: str, fast: str) -> dict:
    from transformers import AutoTokenizer

    from distillm.data import pack_corpus
    from distillm.data.corpus import TextCorpus
    from distillm.data.pretrain import _BATCH_CHARS, _batches

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    backend = tokenizer.backend_tokenizer
    calls = {"encode_batch": backend.encode_batch}
    if fast == "1":
        calls["encode_batch_fast"] = backend.encode_batch_fast
    seconds = dict.fromkeys(["prepare", *calls], 0.0)
    cpu = dict.fromkeys(["prepare", *calls], 0.0)  # CPU seconds of the whole process, all its threads
    tokens = {"prepare": 0, "encode": 0}

    def prepare(part: Path) -> None:
        start, start_cpu = time.perf_counter(), time.process_time()
        tokens["prepare"] += pack_corpus(TextCorpus([part]), tokenizer, out, 512)["tokens"]
        seconds["prepare"] += time.perf_counter() - start
        cpu["prepare"] += time.process_time() - start_cpu
        shutil.rmtree(out)

    def encode(part: Path) -> None:
        for number, batch in enumerate(_batches(TextCorpus([part]).documents(), _BATCH_CHARS)):
            order = list(calls.items()) if number % 2 else list(calls.items())[::-1]
            for name, call in order:
                start, start_cpu = time.perf_counter(), time.process_time()
                encodings = call(batch, add_special_tokens=False)
                seconds[name] += time.perf_counter() - start
                cpu[name] += time.process_time() - start_cpu
            tokens["encode"] += sum(len(e.ids) for e in encodings) + len(batch)  # + EOS per document

    for number, part in enumerate(_parts(corpus)):
        for step in (prepare, encode) if number % 2 == 0 else (encode, prepare):
            step(part)
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu}


def _run_child(args: list[str], threads: int) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
    result = subprocess.run(
        [sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _print_table(rows) -> None:
    print(
        "| corpus | tokens | prepare, whole corpus | prepare, part by part | encode_batch, part by part "
        "| prepare / encode_batch | the same in CPU time | peak RSS | RSS after set-up |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    peaks = []
    for megabytes, prepared, compared in rows:
        tokens = prepared["tokens"]
        peaks.append(prepared["peak"])
        if compared is None:
            print(
                f"| {megabytes:.0f} MB | {tokens:,} | {tokens / prepared['seconds']:,.0f} tok/s | - | - | - | - | "
                f"{prepared['peak'] / 2**20:.0f} MiB | {prepared['base'] / 2**20:.0f} MiB |"
            )
            continue
        rates = {name: tokens / seconds for name, seconds in compared["seconds"].items()}
        cpu = compared["cpu_seconds"]
        print(
            f"| {megabytes:.0f} MB | {tokens:,} | {tokens / prepared['seconds']:,.0f} tok/s | "
            f"{rates['prepare']:,.0f} tok/s | {rates['encode_batch']:,.0f} tok/s | "
            f"{rates['prepare'] / rates['encode_batch']:.2f} | {cpu['encode_batch'] / cpu['prepare']:.2f} | "
            f"{prepared['peak'] / 2**20:.0f} MiB | "
            f"{prepared['base'] / 2**20:.0f} MiB |"
        )
        if "encode_batch_fast" in rates:
            print(f"  encode_batch_fast: {rates['encode_batch_fast']:,.0f} tok/s")
    if len(peaks) > 1:
        print(f"peak RSS, largest / smallest corpus: {max(peaks) / min(peaks):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100M,1G", help="Corpus sizes in bytes (K/M/G), comma-separated.")
    parser.add_argument("--threads", type=int, default=1, help="Tokenizer threads (RAYON_NUM_THREADS).")
    parser.add_argument("--vocab", type=int, default=16384, help="Vocabulary of the trained BPE tokenizer.")
    parser.add_argument("--fast", action="store_true", help="Also time encode_batch_fast.")
    parser.add_argument(
        "--compare", default=None, help="Sizes (of --sizes) to run the comparison on (default: all)."
    )
    parser.add_argument("--part", default="16M", help="Size of the corpus parts (the comparison's unit).")
    parser.add_argument("--tmp", default=None, help="Where the corpora go (default: the system temp folder).")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(child_prepare(*rest) if kind == "prepare" else child_compare(*rest)))
        return

    from distillm.tokenizer import train_bpe_tokenizer

    print(f"CPU: {_cpu()}; tokenizer threads: {args.threads}; {_uptime()}")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="pretrain-bench-") as folder:
        folder = Path(folder)
        for label in args.sizes.split(","):
            corpus = folder / f"corpus-{label}"
            start = time.perf_counter()
            documents = write_corpus(corpus, _parse_size(label), part_bytes=_parse_size(args.part))
            megabytes = sum(p.stat().st_size for p in _parts(corpus)) / 1e6
            print(
                f"{label}: {megabytes:.0f} MB, {documents} documents, written in {time.perf_counter() - start:.0f} s"
            )
            tokenizer_dir = folder / "tokenizer"
            if not tokenizer_dir.exists():
                sample = _parts(corpus)[0].read_text(encoding="utf-8").splitlines()
                train_bpe_tokenizer(sample, vocab_size=args.vocab, out_dir=tokenizer_dir)
            out = folder / f"prepared-{label}"
            paths = [str(corpus), str(tokenizer_dir), str(out)]
            prepared = _run_child(["prepare", *paths], args.threads)
            shutil.rmtree(out)
            print(f"  prepare: {json.dumps(prepared)}; {_uptime()}")
            compared = None
            if args.compare is None or label in args.compare.split(","):
                compared = _run_child(["compare", *paths, "1" if args.fast else "0"], args.threads)
                assert prepared["tokens"] == compared["tokens"]["prepare"] == compared["tokens"]["encode"]
                print(f"  compare: {json.dumps(compared)}; {_uptime()}")
            shutil.rmtree(corpus)
            rows.append((megabytes, prepared, compared))
    print(f"\nafter: {_uptime()}")
    _print_table(rows)


def _uptime() -> str:
    """The clock and the load averages, as `uptime` prints them: the figures of a shared machine need them."""
    one, five, fifteen = os.getloadavg()
    return f"{time.strftime('%H:%M:%S')} load average: {one:.2f}, {five:.2f}, {fifteen:.2f}"


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    return "unknown"


if __name__ == "__main__":
    main()
