"""The pretraining corpus for the language-model term of the objective (the original's OpenWebText term).

``distillm prepare-pretrain`` streams documents (:mod:`distillm.data.corpus`), encodes them in batches with
the fast tokenizer, without special tokens, each followed by EOS, concatenates them and cuts chunks of
exactly ``chunk_length`` tokens (the incomplete tail is dropped), as the original's
``process_data_pretrain.py``. The first ``dev_chunks`` chunks go to ``dev.bin``, the next ``max_chunks`` to
``train.bin``. Memory stays bounded by one batch of documents, whatever the corpus size.

A prepared corpus is a folder:

| file         | content                                                                          |
|--------------|----------------------------------------------------------------------------------|
| `train.bin`  | the train chunks, raw little-endian ``uint16`` (vocabulary <= 65536) or ``uint32``, ``[N, C]`` |
| `dev.bin`    | the dev chunks, same layout                                                      |
| `meta.json`  | format, dtype, chunk length, counts, tokenizer; written last                     |

It is built in ``.<name>.partial`` beside the output with a ``progress.json`` checkpoint (corpus position,
counts, the leftover tokens), renamed into place only when complete. A rerun after an interruption resumes
from the last checkpoint; the partial folder has no ``meta.json``, so training never accepts it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distillm.data.cache import META_FILE, tokenizer_fingerprint
from distillm.data.corpus import HubCorpus, ReadStats, TextCorpus, open_corpus
from distillm.data.indexed import IndexedPretrainChunks, find_shards
from distillm.errors import UserError
from distillm.storage import DamagedError, publish_folder, remove_folder, require_intact

logger = logging.getLogger(__name__)

FORMAT = "distillm-pretrain"
FORMAT_VERSION = 1  # bump when the layout or the packing rules change, so old folders are not reused
PROGRESS_FILE = "progress.json"
_BATCH_CHARS = 1 << 21  # characters of text encoded per batch: bounds memory, amortises the call
_CHECKPOINT_EVERY = 64  # batches between checkpoints (~128 MB of text)


# --------------------------------------------------------------------------------------------------------
# Reading a prepared corpus.


class PretrainChunks:
    """A prepared corpus' split, memory-mapped: ``chunks[i] -> list[int]`` of ``chunk_length`` ids."""

    def __init__(self, folder: str | Path, split: str = "train", from_cache: bool = False):
        self.folder = Path(folder)
        meta_path = self.folder / META_FILE
        if not meta_path.exists():
            raise UserError(
                f"{self.folder} is not a prepared pretraining corpus (no {META_FILE}); "
                "run `distillm prepare-pretrain`"
            )
        require_intact(
            self.folder, "prepared pretraining corpus", "Prepare it again (distillm prepare-pretrain)"
        )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT or self.meta.get("version") != FORMAT_VERSION:
            raise UserError(
                f"{self.folder} was prepared by another distillm version (format "
                f"{self.meta.get('format')!r} v{self.meta.get('version')}); prepare it again"
            )
        if split not in ("train", "dev"):
            raise UserError(f"split {split!r}: a prepared pretraining corpus has 'train' and 'dev'")
        self.from_cache = from_cache
        self.split = split
        self.chunk_length = int(self.meta["chunk_length"])
        dtype = np.dtype(self.meta["dtype"])
        count = int(self.meta[f"{split}_chunks"])
        path = self.folder / f"{split}.bin"
        expected = count * self.chunk_length * dtype.itemsize
        if not path.exists() or path.stat().st_size != expected:
            size = path.stat().st_size if path.exists() else "no"
            raise UserError(
                f"{path}: {size} bytes, but {META_FILE} says {count} chunks of {self.chunk_length} "
                f"{dtype} ids ({expected} bytes); the folder is damaged: prepare it again"
            )
        # A read-only map: nothing is read until a chunk is indexed; DataLoader workers share the pages.
        self._chunks = (
            np.memmap(path, dtype, "r", shape=(count, self.chunk_length))
            if count
            else np.empty((0, self.chunk_length), dtype)
        )  # [N, C]

    def __len__(self) -> int:
        return int(self._chunks.shape[0])

    def __getitem__(self, index: int) -> list[int]:
        return self._chunks[index].tolist()

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a corpus made with a tokenizer of another vocabulary or EOS; warn if only its definition differs."""
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        vocab, eos = len(tokenizer), tokenizer.eos_token_id
        if self.meta["vocab_size"] != vocab or self.meta["eos_token_id"] != eos:
            raise UserError(
                f"{self.folder} was prepared with a tokenizer of {self.meta['vocab_size']} tokens and EOS "
                f"{self.meta['eos_token_id']}, but the tokenizer {name} has {vocab} tokens and EOS {eos}; "
                "prepare the corpus again with this tokenizer"
            )
        if self.meta.get("tokenizer") != tokenizer_fingerprint(tokenizer):
            logger.warning(
                "%s was prepared with a tokenizer whose definition differs from %s (same vocabulary size "
                "and EOS); if its ids differ, prepare the corpus again",
                self.folder,
                name,
            )

    @staticmethod
    def collate(items: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        """Same as :func:`collate_chunks`."""
        return collate_chunks(items)


def collate_chunks(items: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    """Stack equal-length chunks into ``input_ids``, ``attention_mask``, ``labels`` ``[B, C - 1]``.

    Labels are shifted as in the batch contract (``labels[:, t] = chunk[:, t + 1]``) and every position is
    supervised; there is no prompt.
    """
    chunks = torch.tensor([list(item) for item in items], dtype=torch.long)  # [B, C]
    return {
        "input_ids": chunks[:, :-1].contiguous(),
        "attention_mask": torch.ones_like(chunks[:, :-1]),
        "labels": chunks[:, 1:].contiguous(),
    }


def load_pretrain(
    path: str | Path, tokenizer, chunk_length: int = 512, cache_dir: str | Path | None = None
) -> PretrainChunks | IndexedPretrainChunks:
    """The pretraining corpus at ``path`` (``data.pretrain``), checked against ``tokenizer``:

    - a folder made by ``distillm prepare-pretrain`` (its own chunk length);
    - MiniLLM's processed corpus, MMIDIDX (a folder holding ``train_0.bin`` / ``.idx``, a prefix, or a file);
    - otherwise a text file or folder of ``.txt``, packed into ``chunk_length`` chunks in ``cache_dir``.
    """
    folder = Path(path)
    if folder.is_dir() and (folder / META_FILE).exists():
        chunks = PretrainChunks(folder)
        chunks.check_tokenizer(tokenizer)
        return chunks
    if folder.is_dir() and (folder / PROGRESS_FILE).exists():
        raise UserError(
            f"{folder} is an unfinished `distillm prepare-pretrain` (it holds {PROGRESS_FILE}); "
            "run the same command again to finish it"
        )
    if find_shards(path):
        return IndexedPretrainChunks(path, tokenizer)
    return prepare_pretrain(path, tokenizer, chunk_length, cache_dir)


def prepare_pretrain(
    path: str | Path | Sequence[str | Path],
    tokenizer,
    chunk_length: int = 512,
    cache_dir: str | Path | None = None,
    skip_invalid: bool = False,
) -> PretrainChunks:
    """Pack the text corpus at ``path`` into chunks cached under ``cache_dir`` (reused when the corpus bytes,
    the tokenizer and the chunk length are unchanged); ``cache_dir=None`` uses a fresh temporary folder."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    corpus = TextCorpus(paths, skip_invalid=skip_invalid)
    _check_chunk_length(chunk_length)
    if cache_dir is None:
        cache_dir = tempfile.mkdtemp(prefix="distillm-pretrain-")
    digest = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}/{chunk_length}/{skip_invalid}".encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    digest.update(corpus.content_hash().encode())  # hashed in pieces: memory stays flat
    final = Path(cache_dir) / f"pretrain-{digest.hexdigest()[:24]}"
    if (final / META_FILE).exists():
        try:
            chunks = PretrainChunks(final, from_cache=True)
            logger.info("reusing the packed pretraining corpus in %s", final)
            return chunks
        except DamagedError as error:
            logger.warning("%s; packing it again", error)
            remove_folder(final)
    pack_corpus(corpus, tokenizer, final, chunk_length)
    return PretrainChunks(final)


# --------------------------------------------------------------------------------------------------------
# Writing one.


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocabulary <= 65536), else ``uint32``."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def batch_encoder(tokenizer):
    """``encode(documents) -> list[list[int]]`` without special tokens: the Rust tokenizer's batch call
    (parallel over its threads) for a fast tokenizer, else one ``encode`` per document."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        logger.warning(
            "%s is not a fast tokenizer: encoding one document at a time", type(tokenizer).__name__
        )
        return lambda documents: [tokenizer.encode(d, add_special_tokens=False) for d in documents]
    # encode_batch, not encode_batch_fast: skipping offsets measured no faster (benchmarks/README.md).
    return lambda documents: [e.ids for e in backend.encode_batch(documents, add_special_tokens=False)]


def _flatten_with_eos(ids: list[list[int]], eos: int, dtype: np.dtype) -> np.ndarray:
    """``ids[0] + [eos] + ids[1] + [eos] + ...`` as one array (the documents' token stream)."""
    lengths = np.fromiter((len(x) for x in ids), np.int64, count=len(ids)) + 1
    stream = np.empty(int(lengths.sum()), dtype)
    ends = np.cumsum(lengths)
    stream[ends - 1] = eos
    starts = ends - lengths
    for start, x in zip(starts.tolist(), ids):
        stream[start : start + len(x)] = x
    return stream


@dataclass
class _Progress:
    """What a checkpoint of a preparation holds (``progress.json``)."""

    key: str
    position: dict[str, int]
    stats: dict[str, Any]
    train_chunks: int = 0
    dev_chunks: int = 0
    tokens: int = 0
    carry: list[int] = field(default_factory=list)


class _ChunkWriter:
    """Appends the token stream to ``dev.bin`` then ``train.bin`` in whole chunks; keeps the leftover."""

    def __init__(
        self,
        folder: Path,
        dtype: np.dtype,
        chunk_length: int,
        dev_chunks: int,
        max_chunks: int | None,
        progress: _Progress,
    ):
        self.dtype, self.chunk_length = dtype, chunk_length
        self.dev_target, self.max_chunks = dev_chunks, max_chunks
        self.progress = progress
        self.carry = np.asarray(progress.carry, dtype)
        self.files = {}
        for split in ("dev", "train"):
            path = folder / f"{split}.bin"
            size = getattr(progress, f"{split}_chunks") * chunk_length * dtype.itemsize
            with open(path, "ab") as handle:  # create if missing
                handle.truncate(size)  # drop whatever was written after the checkpoint
            self.files[split] = open(path, "r+b")
            self.files[split].seek(size)

    @property
    def full(self) -> bool:
        return self.max_chunks is not None and self.progress.train_chunks >= self.max_chunks

    def add(self, stream: np.ndarray) -> int:
        """Write the whole chunks of ``carry + stream``; returns how many were written."""
        stream = np.concatenate([self.carry, stream]) if len(self.carry) else stream
        whole = len(stream) // self.chunk_length
        written = 0
        dev = min(whole, self.dev_target - self.progress.dev_chunks)
        if dev > 0:
            self.files["dev"].write(stream[: dev * self.chunk_length].tobytes())
            self.progress.dev_chunks += dev
            written += dev
        train = whole - max(dev, 0)
        if self.max_chunks is not None:
            train = min(train, self.max_chunks - self.progress.train_chunks)
        if train > 0:
            begin = (written) * self.chunk_length
            self.files["train"].write(stream[begin : begin + train * self.chunk_length].tobytes())
            self.progress.train_chunks += train
            written += train
        self.carry = stream[whole * self.chunk_length :].copy()
        return written

    def sync(self) -> None:
        for handle in self.files.values():
            handle.flush()
            os.fsync(handle.fileno())

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


def _check_chunk_length(chunk_length: int, max_positions: int | None = None, where: str = "") -> None:
    if chunk_length < 2:
        raise UserError(f"chunk length {chunk_length} is invalid: must be >= 2 (an input and a label)")
    if max_positions is not None and chunk_length - 1 > max_positions:
        raise UserError(
            f"chunk length {chunk_length} gives inputs of {chunk_length - 1} tokens, more than the "
            f"{max_positions} positions of {where or 'the model'}; use a chunk length of {max_positions + 1} "
            "or less"
        )


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(payload, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)  # a checkpoint is the old one or the new one, never half of either


def _batches(documents: Iterator[str], batch_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for document in documents:
        batch.append(document)
        size += len(document)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _open_partial(partial: Path, key: str, chunk_bytes: int) -> _Progress | None:
    """The checkpoint of an interrupted run with the same settings and files that hold what it counts, or
    None (the folder is then cleared)."""
    try:
        saved = _Progress(**json.loads((partial / PROGRESS_FILE).read_text()))
        if saved.key == key and all(
            (partial / f"{split}.bin").stat().st_size >= getattr(saved, f"{split}_chunks") * chunk_bytes
            for split in ("dev", "train")
        ):
            return saved
    except (OSError, ValueError, TypeError):
        pass
    if partial.exists():
        logger.info("discarding %s: it was started with other settings, or is damaged", partial)
        shutil.rmtree(partial)
    return None


def pack_corpus(
    corpus: TextCorpus | HubCorpus,
    tokenizer,
    out: str | Path,
    chunk_length: int = 512,
    dev_chunks: int = 0,
    max_chunks: int | None = None,
    *,
    force: bool = False,
    progress: bool = False,
    batch_chars: int = _BATCH_CHARS,
    checkpoint_every: int = _CHECKPOINT_EVERY,
) -> dict[str, Any]:
    """Stream ``corpus`` into a prepared folder ``out``; returns its meta (see the module docstring).

    ``max_chunks`` counts train chunks (the original's ``train_num``; None: the whole corpus); the
    ``dev_chunks`` dev chunks come first and on top. ``out`` must not hold anything unless ``force``.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    _check_inputs(tokenizer, out, chunk_length, dev_chunks, max_chunks, force)
    dtype = token_dtype(len(tokenizer))
    settings = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "corpus": corpus.identity(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chunk_length": chunk_length,
        "dev_chunks": dev_chunks,
        "max_chunks": max_chunks,
        "skip_invalid": getattr(corpus, "skip_invalid", False),
    }
    partial = out.parent / f".{out.name}.partial"
    state = _start_or_resume(partial, settings, corpus, chunk_length * dtype.itemsize)
    writer = _ChunkWriter(partial, dtype, chunk_length, dev_chunks, max_chunks, state)
    bar = tqdm(
        total=dev_chunks + max_chunks if max_chunks is not None else None,
        initial=state.train_chunks + state.dev_chunks,
        unit="chunk",
        desc="packing",
        disable=not progress,
    )
    try:
        _pack(corpus, tokenizer, partial, writer, state, bar, batch_chars, checkpoint_every)
        meta = _meta(settings, state, dtype, tokenizer, corpus.describe())
    except UserError:
        shutil.rmtree(partial, ignore_errors=True)  # bad input: nothing worth resuming
        raise
    finally:
        writer.close()
        bar.close()
    _write_json(partial / META_FILE, meta)  # the mark of a complete folder, written last
    (partial / PROGRESS_FILE).unlink()
    publish_folder(partial, out)  # its manifest last, then renamed into place (an older --force'd one aside)
    logger.info(
        "packed %s: %d train + %d dev chunks in %s", meta["source"], state.train_chunks, state.dev_chunks, out
    )
    return meta


def _check_inputs(tokenizer, out: Path, chunk_length: int, dev_chunks: int, max_chunks, force: bool) -> None:
    _check_chunk_length(chunk_length)
    if dev_chunks < 0:
        raise UserError(f"--dev-chunks {dev_chunks} is invalid: must be >= 0")
    if max_chunks is not None and max_chunks < 1:
        raise UserError(f"--max-chunks {max_chunks} is invalid: must be >= 1 (or left out: the whole corpus)")
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token, which separates "
            "the packed documents; set tokenizer.eos_token (and save it) first"
        )
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; pass --force to replace it")


def _start_or_resume(partial: Path, settings: dict[str, Any], corpus, chunk_bytes: int) -> _Progress:
    """The checkpoint of an interrupted run with these settings, with ``corpus`` moved to its position; or
    a fresh partial folder."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    state = _open_partial(partial, key, chunk_bytes)
    if state is None:
        partial.mkdir(parents=True)
        return _Progress(key=key, position=dict(corpus.position), stats=asdict(corpus.stats))
    logger.info(
        "resuming the preparation in %s after %d documents (%d chunks)",
        partial,
        state.stats["documents"],
        state.train_chunks + state.dev_chunks,
    )
    corpus.position = dict(state.position)
    corpus.stats = ReadStats(**state.stats)
    return state


def _meta(
    settings: dict[str, Any], state: _Progress, dtype: np.dtype, tokenizer, source: str
) -> dict[str, Any]:
    """The finished folder's ``meta.json``; an error if the corpus gave no train chunk."""
    if state.train_chunks == 0:
        what = (
            "holds no documents"
            if state.stats["documents"] == 0
            else f"gives {state.tokens} tokens, not enough for {settings['dev_chunks']} dev chunks and one "
            f"train chunk of {settings['chunk_length']} tokens"
        )
        raise UserError(f"the corpus {source} {what}; add text, or lower --chunk-length / --dev-chunks")
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "chunk_length": settings["chunk_length"],
        "train_chunks": state.train_chunks,
        "dev_chunks": state.dev_chunks,
        "max_chunks": settings["max_chunks"],
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer": settings["tokenizer"],
        "tokenizer_name": str(getattr(tokenizer, "name_or_path", "")),
        "source": source,
        "documents": state.stats["documents"],
        "tokens": state.tokens,
        "invalid_lines_skipped": state.stats["invalid_lines"],
        "first_invalid_line": state.stats["first_invalid"],
    }


def _pack(
    corpus, tokenizer, folder: Path, writer: _ChunkWriter, state: _Progress, bar, batch_chars: int, every: int
) -> None:
    """Encode the corpus batch by batch into ``writer``, checkpointing ``state`` every ``every`` batches.

    The Rust tokenizer releases the GIL, so a worker thread encodes batch k + 1 while this thread reads the
    documents of batch k + 2 and packs and writes batch k: reading and writing hide behind the tokenizer
    (benchmarks/pretrain_prepare.py). At most three batches are in memory at once.
    """
    from concurrent.futures import ThreadPoolExecutor

    encode, eos = batch_encoder(tokenizer), tokenizer.eos_token_id

    def encode_stream(batch: list[str]) -> np.ndarray:
        return _flatten_with_eos(encode(batch), eos, writer.dtype)

    def write(stream: np.ndarray, position: dict[str, int], stats: dict[str, Any], number: int) -> bool:
        state.tokens += len(stream)
        bar.update(writer.add(stream))
        state.stats = stats  # what was read to make the chunks written so far
        if writer.full:
            return True
        if number % every == 0:
            _checkpoint(folder, writer, state, position, stats)
            bar.set_postfix(documents=stats["documents"], refresh=False)
        return False

    _checkpoint(folder, writer, state, dict(corpus.position), asdict(corpus.stats))
    pending = None  # (future stream, corpus position and stats after its batch, batch number)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="distillm-encode") as pool:
        for number, batch in enumerate(_batches(corpus.documents(), batch_chars), 1):
            submitted = (
                pool.submit(encode_stream, batch),
                dict(corpus.position),
                asdict(corpus.stats),
                number,
            )
            if pending is not None:
                future, position, stats, done = pending
                if write(future.result(), position, stats, done):
                    submitted[0].cancel()
                    return
            pending = submitted
        if pending is not None:
            future, position, stats, done = pending
            write(future.result(), position, stats, done)
    writer.sync()


def _checkpoint(folder: Path, writer: _ChunkWriter, state: _Progress, position, stats) -> None:
    """Make the chunks written so far durable, then record how far the corpus was read to make them."""
    writer.sync()
    state.position, state.stats, state.carry = position, stats, writer.carry.tolist()
    _write_json(folder / PROGRESS_FILE, asdict(state))


# --------------------------------------------------------------------------------------------------------
# ``distillm prepare-pretrain``.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--text",
        nargs="+",
        metavar="PATH",
        help="Text files (one document per line; .gz read as gzip) or folders (each .txt / .txt.gz a document).",
    )
    source.add_argument(
        "--dataset", metavar="NAME[:SPLIT]", help="A hub dataset, read in streaming mode (needs a network)."
    )
    parser.add_argument("--text-field", default="text", help="The dataset's text column (default: text).")
    parser.add_argument("--tokenizer", required=True, help="Tokenizer folder or hub name (a fast tokenizer).")
    parser.add_argument("--out", required=True, help="Output folder (must not exist unless --force).")
    parser.add_argument("--chunk-length", type=int, default=512, help="Tokens per chunk (default: 512).")
    parser.add_argument(
        "--max-chunks",
        type=int,
        default=None,
        help="Stop after this many train chunks (default: the whole corpus).",
    )
    parser.add_argument(
        "--dev-chunks", type=int, default=0, help="Chunks written to dev.bin first (default: 0)."
    )
    parser.add_argument(
        "--skip-invalid-utf8",
        action="store_true",
        help="Skip and count lines that are not UTF-8 (default: stop, naming the file and line).",
    )
    parser.add_argument("--force", action="store_true", help="Replace --out if it exists.")


def _max_positions(name: str, tokenizer) -> tuple[int | None, str]:
    """The model's positions, from the tokenizer folder's ``config.json`` if it holds a model, else the
    tokenizer's ``model_max_length`` (when it is set to a real limit)."""
    config_path = Path(name) / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        for key in ("n_positions", "max_position_embeddings"):
            if isinstance(config.get(key), int):
                return config[key], f"{config_path} ({key})"
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 10**7:  # transformers uses a huge sentinel for "unknown"
        return limit, f"the tokenizer {name} (model_max_length)"
    return None, ""


def run(args: argparse.Namespace) -> int:
    from distillm.data.prepare import _load_tokenizer

    corpus = open_corpus(args.text, args.dataset, args.text_field, args.skip_invalid_utf8)
    tokenizer = _load_tokenizer(args.tokenizer)
    positions, where = _max_positions(args.tokenizer, tokenizer)
    _check_chunk_length(args.chunk_length, positions, where)
    start = time.perf_counter()
    meta = pack_corpus(
        corpus,
        tokenizer,
        args.out,
        args.chunk_length,
        args.dev_chunks,
        args.max_chunks,
        force=args.force,
        progress=True,
    )
    seconds = time.perf_counter() - start
    print(
        f"documents: {meta['documents']}, tokens: {meta['tokens']} (EOS included), {meta['tokens'] / max(seconds, 1e-9):,.0f} tokens/s"
    )
    if meta["invalid_lines_skipped"]:
        print(
            f"skipped {meta['invalid_lines_skipped']} lines that were not UTF-8 (the first: {meta['first_invalid_line']})"
        )
    if args.max_chunks is not None and meta["train_chunks"] < args.max_chunks:
        print(
            f"the corpus ran out after {meta['train_chunks']} of the {args.max_chunks} train chunks asked for"
        )
    print(
        f"wrote {meta['train_chunks']} train + {meta['dev_chunks']} dev chunks of {meta['chunk_length']} "
        f"{meta['dtype']} tokens to {args.out}"
    )
    return 0
