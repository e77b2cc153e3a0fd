"""Reading the MiniLLM / DistiLLM binary format (Megatron's MMIDIDX ``.bin`` + ``.idx``), memory-mapped.

Users of the original code hold their data in this format (MiniLLM publishes its processed OpenWebText in
it), so ``data.pretrain`` can point at it directly. A split is stored as shards ``{prefix}{split}_{k}.bin``
/ ``.idx``, k = 0, 1, ...; the ``.idx`` is little-endian:

| bytes            | content                                                                  |
|------------------|--------------------------------------------------------------------------|
| 9                | magic ``b"MMIDIDX\\x00\\x00"``                                           |
| 8                | ``u64`` version, 1                                                       |
| 1                | ``u8`` dtype code: 1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f32, 7 f64, 8 u16, 9 u32 |
| 8 + 8            | ``u64`` item count N, ``u64`` document count D                           |
| 4 N, 8 N, 8 D    | ``int32`` sizes, ``int64`` byte offsets into the ``.bin``, ``int64`` document index |

Item i is ``sizes[i]`` tokens of the dtype at byte ``pointers[i]`` of the ``.bin``. Instruction data stores
``prompt + [-1] + response``: the -1, cast to the dtype, separates them (65535 in uint16).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from distillm.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
DTYPES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    7: np.float64,
    8: np.uint16,
    9: np.uint32,
}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, items, documents
_CHECKED_ITEMS = 1000  # items at each end of a file whose ids are compared with the vocabulary


class IndexedShard:
    """One ``.bin`` / ``.idx`` pair, memory-mapped: ``shard[i]`` is item i as a read-only numpy view."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        idx, bin_path = Path(self.prefix + ".idx"), Path(self.prefix + ".bin")
        for path in (idx, bin_path):
            if not path.is_file():
                raise UserError(f"{path}: missing; an MMIDIDX shard is a .bin and an .idx of the same name")
        with open(idx, "rb") as handle:
            header = handle.read(_HEADER.size)
        if len(header) < _HEADER.size or header[:9] != MAGIC:
            raise UserError(f"{idx}: not an MMIDIDX index (its first bytes are not {MAGIC!r})")
        _, version, code, items, documents = _HEADER.unpack(header)
        if version != 1:
            raise UserError(f"{idx}: MMIDIDX version {version}; only version 1 is known")
        if code not in DTYPES:
            raise UserError(f"{idx}: unknown dtype code {code} (known: {sorted(DTYPES)})")
        self.dtype = np.dtype(DTYPES[code])
        if self.dtype.kind == "f":
            raise UserError(f"{idx}: dtype {self.dtype} holds floats, not token ids")
        expected = _HEADER.size + 4 * items + 8 * items + 8 * documents
        if idx.stat().st_size != expected:
            raise UserError(
                f"{idx}: {idx.stat().st_size} bytes, but its header ({items} items, {documents} documents) "
                f"needs {expected}: the file is truncated or not MMIDIDX"
            )
        self.sizes = np.memmap(idx, np.int32, "r", offset=_HEADER.size, shape=(items,))
        self.pointers = np.memmap(idx, np.int64, "r", offset=_HEADER.size + 4 * items, shape=(items,))
        self._bin = (
            np.memmap(bin_path, self.dtype, "r") if bin_path.stat().st_size else np.empty(0, self.dtype)
        )
        if items:
            end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize
            if end > bin_path.stat().st_size or int(self.pointers[-1]) % self.dtype.itemsize:
                raise UserError(
                    f"{bin_path}: {bin_path.stat().st_size} bytes, but its index points to byte {end}: "
                    "the .bin is truncated or belongs to another .idx"
                )

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> np.ndarray:
        start = int(self.pointers[index]) // self.dtype.itemsize
        return self._bin[start : start + int(self.sizes[index])]


def find_shards(path: str | Path, split: str = "train") -> list[str]:
    """Shard prefixes of ``split`` at ``path``: a folder holding ``{split}_0.idx``, ``_1``, ...; one ``.idx``
    or ``.bin`` file; or a raw prefix (``dir/train`` for ``dir/train_0.idx``, as the original joins paths).
    Returns ``[]`` when there is no MMIDIDX data there."""
    text = str(path)
    if text.endswith((".idx", ".bin")):
        return [text[:-4]] if Path(text[:-4] + ".idx").is_file() else []
    base = str(Path(text) / split) if Path(text).is_dir() else text
    shards = []
    while Path(f"{base}_{len(shards)}.idx").is_file():
        shards.append(f"{base}_{len(shards)}")
    return shards


class IndexedTokens:
    """The items of several shards as one sequence (shard 0's items first): ``tokens[i] -> np.ndarray``."""

    def __init__(self, prefixes: list[str]):
        if not prefixes:
            raise UserError("no MMIDIDX shards given")
        self.shards = [IndexedShard(prefix) for prefix in prefixes]
        self.dtype = self.shards[0].dtype
        for shard in self.shards[1:]:
            if shard.dtype != self.dtype:
                raise UserError(
                    f"{shard.prefix}.idx: dtype {shard.dtype}, but {prefixes[0]}.idx has {self.dtype}"
                )
        self._starts = np.cumsum([0] + [len(shard) for shard in self.shards])  # [S + 1]
        self.source = prefixes[0] if len(prefixes) == 1 else f"{prefixes[0]} (+{len(prefixes) - 1} shards)"

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.shards[shard][index - int(self._starts[shard])]

    def sizes(self) -> np.ndarray:
        return np.concatenate([np.asarray(shard.sizes) for shard in self.shards])

    def separator(self) -> int:
        """The original's -1 prompt/response separator as stored in this dtype (65535 for uint16)."""
        return int(np.array(-1).astype(self.dtype))

    def check_vocabulary(
        self, tokenizer, reserved: int | None = None, remedy: str = "distillm prepare-pretrain"
    ) -> None:
        """Refuse data whose dtype cannot hold the tokenizer's ids, or whose ids exceed its vocabulary.

        ``reserved`` is an id the format uses for itself (the separator), which the vocabulary must not need.
        Ids are compared on the first and last items only, so opening a 10M-chunk corpus stays instant.
        """
        vocab = len(tokenizer)
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        limit = int(np.iinfo(self.dtype).max) + 1  # ids 0 .. max fit
        if reserved is not None and reserved >= 0:
            limit = min(limit, reserved)  # the separator is not a token
        if vocab > limit:
            raise UserError(
                f"{self.source}: dtype {self.dtype} holds token ids below {limit}, but the tokenizer {name} has "
                f"{vocab} tokens; these files were made for another tokenizer: prepare the data again with "
                f"this one (`{remedy}`)"
            )
        count = len(self)
        for index in [
            *range(min(count, _CHECKED_ITEMS)),
            *range(max(_CHECKED_ITEMS, count - _CHECKED_ITEMS), count),
        ]:
            ids = np.asarray(self[index])
            if reserved is not None:
                ids = ids[ids != reserved]
            if ids.size and (int(ids.max()) >= vocab or int(ids.min()) < 0):
                bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
                raise UserError(
                    f"{self.source}: item {index} holds token id {bad}, outside the tokenizer {name}'s "
                    f"{vocab} tokens; these files were made with another tokenizer: prepare the data again "
                    f"with this one (`{remedy}`)"
                )


class IndexedPretrainChunks:
    """MiniLLM's packed pretraining corpus (``openwebtext/.../512/10M``): equal-length chunks of ids.

    Same interface as :class:`distillm.data.pretrain.PretrainChunks`: ``chunks[i] -> list[int]``.
    """

    def __init__(self, path: str | Path, tokenizer, split: str = "train"):
        prefixes = find_shards(path, split)
        if not prefixes:
            raise UserError(f"{path}: no MMIDIDX shards {split}_0.idx / .bin there")
        self.tokens = IndexedTokens(prefixes)
        self.folder = Path(prefixes[0]).parent
        self.from_cache = False
        sizes = self.tokens.sizes()
        if len(sizes) == 0:
            raise UserError(f"{self.tokens.source}: holds no chunks")
        if (sizes != sizes[0]).any():
            odd = int(np.flatnonzero(sizes != sizes[0])[0])
            raise UserError(
                f"{self.tokens.source}: chunk {odd} has {sizes[odd]} tokens but chunk 0 has {sizes[0]}; a "
                "pretraining corpus holds equal-length chunks (this looks like instruction data)"
            )
        self.chunk_length = int(sizes[0])
        self.tokens.check_vocabulary(tokenizer)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> list[int]:
        return self.tokens[index].tolist()

    @staticmethod
    def collate(items):
        from distillm.data.pretrain import collate_chunks

        return collate_chunks(items)


class IndexedInstructionData:
    """Instruction data the original's ``process_data_dolly.py`` wrote: ``data[i] -> (prompt_ids, response_ids)``.

    Items without a separator (its ``--only-prompt`` data) are prompts with an empty response.
    """

    def __init__(self, path: str | Path, tokenizer, split: str = "train"):
        prefixes = find_shards(path, split)
        if not prefixes:
            raise UserError(f"{path}: no MMIDIDX shards {split}_0.idx / .bin there")
        self.tokens = IndexedTokens(prefixes)
        self.separator = self.tokens.separator()
        self.tokens.check_vocabulary(tokenizer, reserved=self.separator, remedy="distillm prepare")

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        ids = self.tokens[index]
        where = np.flatnonzero(ids == self.separator)
        if where.size == 0:
            return ids.tolist(), []
        return ids[: where[0]].tolist(), ids[where[0] + 1 :].tolist()
