"""Prepared (tokenized) data on disk, memory-mapped, keyed by everything that changes the tokens.

A prepared dataset is a folder:

| file                 | content                                                                 |
|----------------------|-------------------------------------------------------------------------|
| `tokens.npy`         | int32, every example's prompt then response ids, concatenated           |
| `offsets.npy`        | int64 `[N + 1]`: example i spans `tokens[offsets[i]:offsets[i + 1]]`    |
| `prompt_lengths.npy` | int32 `[N]`: how many of those are prompt tokens                        |
| `examples.jsonl`     | the examples in the same order (rendered prompt, references) for ROUGE-L |
| `meta.json`          | settings, counts of truncations                                         |
| `manifest.json`      | every file's size and SHA-256, written last (``distillm.storage``)      |

Folders are written under a temporary name and renamed into place (``storage.atomic_folder``), so a crash
never leaves a half-written cache that a later run would trust; a folder is opened only after its files
match its manifest, and a damaged cache entry is prepared again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distillm.data.encode import encode_example_detailed
from distillm.data.formats import Example
from distillm.data.template import render_prompt
from distillm.errors import UserError
from distillm.storage import DamagedError, atomic_folder, remove_folder, require_intact

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the layout or the encoding rules change, so old caches are not reused
META_FILE = "meta.json"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about ``tokenizer`` that decides its ids: its full definition when it is a fast
    (Rust) tokenizer, else its vocabulary and name; plus special tokens and the chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())  # vocab, merges, normalizer, pre-tokenizer, added tokens
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        digest.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    extra = {
        "eos": tokenizer.eos_token_id,
        "special": sorted(str(token) for token in tokenizer.all_special_tokens),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _example_to_json(example: Example, rendered_prompt: str) -> dict[str, Any]:
    return {
        "instruction": example.instruction,
        "input": example.input,
        "references": list(example.references),
        "prompt": example.prompt,
        "source": example.source,
        "category": example.category,
        "rendered_prompt": rendered_prompt,
    }


def write_tokenized(
    folder: Path,
    examples: Sequence[Example],
    tokenizer,
    template: str,
    max_length: int,
    max_prompt_length: int,
    progress: bool = False,
) -> dict[str, Any]:
    """Render, tokenize and write ``examples`` into ``folder`` (which must exist); returns the meta dict."""
    if not examples:
        raise UserError("there are no examples to prepare (every row was skipped, or the file has none)")
    tokens: list[int] = []
    offsets = [0]
    prompt_lengths: list[int] = []
    prompt_truncated = response_truncated = 0
    iterable: Any = examples
    if progress:
        from tqdm.auto import tqdm

        iterable = tqdm(examples, desc="tokenizing", unit="ex")
    with open(folder / "examples.jsonl", "w", encoding="utf-8") as handle:
        for example in iterable:
            prompt = render_prompt(example, template, tokenizer)
            encoded = encode_example_detailed(
                prompt, example.response, tokenizer, max_length, max_prompt_length
            )
            tokens += encoded.prompt_ids + encoded.response_ids
            offsets.append(len(tokens))
            prompt_lengths.append(len(encoded.prompt_ids))
            prompt_truncated += encoded.prompt_truncated
            response_truncated += encoded.response_truncated
            handle.write(json.dumps(_example_to_json(example, prompt), ensure_ascii=False) + "\n")
    np.save(folder / "tokens.npy", np.asarray(tokens, dtype=np.int32))
    np.save(folder / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(folder / "prompt_lengths.npy", np.asarray(prompt_lengths, dtype=np.int32))
    meta = {
        "version": CACHE_VERSION,
        "num_examples": len(examples),
        "template": template,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "prompt_truncated": prompt_truncated,
        "response_truncated": response_truncated,
        "eos_token_id": tokenizer.eos_token_id,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class TokenizedDataset:
    """A prepared dataset, memory-mapped: ``dataset[i] -> (prompt_ids, response_ids)``.

    Also holds the examples in the same order (``examples``, ``prompts`` as rendered, ``references``) so that
    generations can be scored with ROUGE-L against all references.
    """

    def __init__(self, folder: str | Path, from_cache: bool = False):
        self.folder = Path(folder)
        meta_path = self.folder / META_FILE
        if not meta_path.exists():
            raise UserError(
                f"{self.folder} is not a prepared dataset (no {META_FILE}); run `distillm prepare`"
            )
        require_intact(self.folder, "prepared dataset", "Prepare it again (`distillm prepare --force`)")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("version") != CACHE_VERSION:
            raise UserError(f"{self.folder} was prepared by another distillm version; prepare it again")
        self.from_cache = from_cache
        self._tokens = np.load(self.folder / "tokens.npy", mmap_mode="r")  # shared by DataLoader workers
        self._offsets = np.load(self.folder / "offsets.npy")
        self.prompt_lengths = np.load(self.folder / "prompt_lengths.npy")
        self.examples: list[Example] = []
        self.prompts: list[str] = []
        with open(self.folder / "examples.jsonl", encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                self.prompts.append(row.pop("rendered_prompt"))
                row["references"] = tuple(row["references"])
                self.examples.append(Example(**row))

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        index %= len(self)
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        split = start + int(self.prompt_lengths[index])
        return self._tokens[start:split].tolist(), self._tokens[split:end].tolist()

    @property
    def references(self) -> list[tuple[str, ...]]:
        return [example.references for example in self.examples]

    @property
    def response_lengths(self) -> np.ndarray:
        return np.diff(self._offsets) - self.prompt_lengths


def prepare_dataset(
    examples: Sequence[Example],
    tokenizer,
    template: str = "alpaca",
    max_length: int = 512,
    max_prompt_length: int = 256,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> TokenizedDataset:
    """Tokenize ``examples`` into ``cache_dir/<key>``, or open it if a previous call already did.

    The key hashes the tokenizer (its full definition), the template, both lengths and every example's
    content, so any change re-tokenizes and nothing else does. ``cache_dir=None`` uses a fresh temporary
    folder (no reuse).
    """
    if cache_dir is None:
        cache_dir = tempfile.mkdtemp(prefix="distillm-data-")
    key = _cache_key(examples, tokenizer, template, max_length, max_prompt_length)
    final = Path(cache_dir) / f"sft-{key[:24]}"
    if (final / META_FILE).exists():
        try:
            dataset = TokenizedDataset(final, from_cache=True)
            logger.info("reusing prepared data in %s", final)
            return dataset
        except DamagedError as error:
            logger.warning("%s; preparing it again", error)
            remove_folder(final)
    with atomic_folder(final, replace=False) as temporary:
        write_tokenized(temporary, examples, tokenizer, template, max_length, max_prompt_length, progress)
    logger.info("prepared %d examples into %s", len(examples), final)
    return TokenizedDataset(final)


def _cache_key(
    examples: Sequence[Example], tokenizer, template: str, max_length: int, max_prompt_length: int
) -> str:
    digest = hashlib.sha256()
    settings = {"version": CACHE_VERSION, "template": template, "lengths": [max_length, max_prompt_length]}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    for example in examples:
        row = [example.instruction, example.input, list(example.references), example.prompt, example.category]
        digest.update(json.dumps(row, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()
