"""The pretraining corpus for the language-model term of the objective (the original's OpenWebText term).

Documents (one per line of a text file, or one per ``.txt`` file of a folder) are encoded without special
tokens, each followed by EOS, concatenated, and cut into chunks of exactly ``chunk_length`` tokens; the
incomplete tail is dropped, as in the original's ``process_data_pretrain.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distillm.data.cache import CACHE_VERSION, META_FILE, tokenizer_fingerprint
from distillm.errors import UserError
from distillm.storage import DamagedError, atomic_folder, remove_folder, require_intact

logger = logging.getLogger(__name__)


class PretrainChunks:
    """Fixed-length token chunks, memory-mapped: ``chunks[i] -> list[int]`` of ``chunk_length`` ids."""

    def __init__(self, folder: str | Path, from_cache: bool = False):
        self.folder = Path(folder)
        if not (self.folder / META_FILE).exists():
            raise UserError(f"{self.folder} is not a prepared pretraining corpus (no {META_FILE})")
        require_intact(self.folder, "packed pretraining corpus", "Delete it to pack the corpus again")
        self.meta = json.loads((self.folder / META_FILE).read_text())
        self.from_cache = from_cache
        self._chunks = np.load(self.folder / "chunks.npy", mmap_mode="r")  # [N, chunk_length] int32

    @property
    def chunk_length(self) -> int:
        return int(self._chunks.shape[1])

    def __len__(self) -> int:
        return int(self._chunks.shape[0])

    def __getitem__(self, index: int) -> list[int]:
        return self._chunks[index].tolist()

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


def _documents(path: Path) -> Iterator[str]:
    """The corpus' documents: non-empty lines of a file, or whole ``.txt`` files of a folder (sorted)."""
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UserError(
                f"{path} holds no .txt files; give a text file (one document per line) or such a folder"
            )
        for file in files:
            text = _read_text(file)
            if text.strip():
                yield text
        return
    for line in _read_text(path).splitlines():
        if line.strip():
            yield line


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: bytes that are not valid UTF-8; save the file as UTF-8") from None


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def pack_documents(documents: Iterator[str], tokenizer, chunk_length: int) -> np.ndarray:
    """Encode each document + EOS, concatenate, and cut into ``[N, chunk_length]`` int32 chunks."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token, which separates the packed documents")
    chunks: list[list[int]] = []
    buffer: list[int] = []
    for document in documents:
        buffer += tokenizer.encode(document, add_special_tokens=False) + [eos]
        while len(buffer) >= chunk_length:
            chunks.append(buffer[:chunk_length])
            buffer = buffer[chunk_length:]
    return np.asarray(chunks, dtype=np.int32).reshape(len(chunks), chunk_length)


def prepare_pretrain(
    path: str | Path, tokenizer, chunk_length: int = 512, cache_dir: str | Path | None = None
) -> PretrainChunks:
    """Pack the corpus at ``path`` into chunks cached under ``cache_dir`` (reused when the corpus, the tokenizer
    and the chunk length are unchanged); ``cache_dir=None`` uses a fresh temporary folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such pretraining corpus; give a text file or a folder of .txt files")
    if chunk_length < 2:
        raise UserError(f"chunk_length={chunk_length} is invalid: must be >= 2 (an input and a label)")
    if cache_dir is None:
        cache_dir = tempfile.mkdtemp(prefix="distillm-pretrain-")
    digest = hashlib.sha256(f"{CACHE_VERSION}/{chunk_length}".encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    digest.update(_content_hash(path).encode())
    final = Path(cache_dir) / f"pretrain-{digest.hexdigest()[:24]}"
    if (final / META_FILE).exists():
        try:
            chunks = PretrainChunks(final, from_cache=True)
            logger.info("reusing the packed pretraining corpus in %s", final)
            return chunks
        except DamagedError as error:
            logger.warning("%s; packing it again", error)
            remove_folder(final)

    chunks = pack_documents(_documents(path), tokenizer, chunk_length)
    if len(chunks) == 0:
        raise UserError(
            f"{path} is shorter than one chunk of {chunk_length} tokens; add text or lower the chunk length"
        )
    with atomic_folder(final, replace=False) as temporary:
        np.save(temporary / "chunks.npy", chunks)
        meta = {
            "version": CACHE_VERSION,
            "source": str(path),
            "chunks": len(chunks),
            "chunk_length": chunk_length,
        }
        (temporary / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("packed %s into %d chunks of %d tokens", path, len(chunks), chunk_length)
    return PretrainChunks(final)
