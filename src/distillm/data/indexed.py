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
``prompt + [-1] + response``: the -1, cast to the dtype, separates them (65535 in uint16); beside the shards
the original writes ``{split}.jsonl``, one row per item in the same order (``instruction``, ``prompt``,
``input``, ``output``): the text that ROUGE-L needs, which the ids alone do not carry exactly.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np

from distillm.errors import UserError

logger = logging.getLogger(__name__)

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
    if not text:
        return []  # Path("") is the current folder: an unset path is no data
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

    def first_positions(self, value: int) -> np.ndarray:
        """Per item, the index of its first token equal to ``value``, or -1: ``[N]`` int64.

        Compares every token of every ``.bin`` once (instruction data is megabytes; never called on a
        pretraining corpus)."""
        found = []
        for shard in self.shards:
            starts = np.asarray(shard.pointers) // shard.dtype.itemsize  # [n] token offsets in the .bin
            ends = starts + np.asarray(shard.sizes)  # [n]
            hits = np.flatnonzero(np.asarray(shard._bin) == value)  # [h], ascending
            if len(hits) == 0:
                found.append(np.full(len(starts), -1, np.int64))
                continue
            after = np.searchsorted(hits, starts)  # [n] the first hit at or after each item's start
            first = hits[np.minimum(after, len(hits) - 1)]
            inside = (after < len(hits)) & (first < ends)
            found.append(np.where(inside, first - starts, -1).astype(np.int64))
        return np.concatenate(found)

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


_CHECKED_ROWS = 8  # items whose ids are re-encoded from the .jsonl beside them, to prove the tokenizer


class IndexedInstructionData:
    """Instruction data the original's ``process_data_dolly.py`` wrote (MiniLLM's ``processed_data/dolly/full/
    <model>/``): ``data[i] -> (prompt_ids, response_ids)``, the same interface as
    :class:`~distillm.data.cache.TokenizedDataset`, so ``data.train`` / ``data.dev`` can point at it.

    Each item is ``prompt + [-1] + response`` (the -1 stored as the dtype's maximum, 65535 in ``uint16``); the
    response ends with EOS. The ids are used as stored, then cut by our rules (``distillm.data.encode``): a
    prompt over ``max_prompt_length`` keeps its last tokens, a response is cut to ``max_length`` in all
    (without EOS). ``examples`` (ROUGE-L's prompts and references) come from ``{split}.jsonl`` beside the
    shards, which the original writes in the same order as the items; without it they are the decoded ids.

    Refused: a dtype or ids that cannot match ``tokenizer``, an item without separator (the original's
    ``--only-prompt`` data, unless ``allow_prompt_only``: then its response is empty) or without a prompt,
    and a ``.jsonl`` whose first rows do not encode, with ``tokenizer``, to the items' ids (another
    tokenizer made the files, or the ``.jsonl`` is not theirs).
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer,
        split: str = "train",
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        allow_prompt_only: bool = False,
    ):
        prefixes = find_shards(path, split)
        if not prefixes:
            raise UserError(f"{path}: no MMIDIDX shards {split}_0.idx / .bin there")
        self.tokens = IndexedTokens(prefixes)
        self.separator = self.tokens.separator()
        self.tokens.check_vocabulary(tokenizer, reserved=self.separator, remedy="distillm prepare")
        self.folder = Path(prefixes[0]).parent
        self.from_cache = False
        self.tokenizer = tokenizer
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self._sizes = self.tokens.sizes()  # [N]
        self._separators = self.tokens.first_positions(self.separator)  # [N], -1: none
        self._rows = np.arange(len(self._sizes))  # the items this view holds (see select)
        self._check_separators(allow_prompt_only)
        self.jsonl = _jsonl_beside(prefixes[0])
        self._examples = None
        if self.jsonl is not None:
            self._check_against_jsonl(tokenizer)
        else:
            self._check_eos(tokenizer)

    # ---- the items

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        row = int(self._rows[index])
        ids, cut = self.tokens[row], int(self._separators[row])
        if cut < 0:  # prompt-only data
            return self._cut(ids.tolist(), [])
        return self._cut(ids[:cut].tolist(), ids[cut + 1 :].tolist())

    def _cut(self, prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        if self.max_prompt_length is not None and len(prompt) > self.max_prompt_length:
            prompt = prompt[-self.max_prompt_length :]  # the tail, where "### Response:" is
        if self.max_length is not None:
            response = response[: max(self.max_length - len(prompt), 0)]  # no EOS invented
        return prompt, response

    @property
    def prompt_lengths(self) -> np.ndarray:
        """Prompt tokens of each item, after the cut: ``[N]``."""
        lengths = self._stored_prompt_lengths()[self._rows]
        if self.max_prompt_length is not None:
            lengths = np.minimum(lengths, self.max_prompt_length)
        return lengths

    @property
    def response_lengths(self) -> np.ndarray:
        """Response tokens of each item (EOS included), after the cut: ``[N]``."""
        stored = self._stored_response_lengths()[self._rows]
        if self.max_length is not None:
            stored = np.minimum(stored, np.maximum(self.max_length - self.prompt_lengths, 0))
        return stored

    def truncated(self) -> tuple[int, int]:
        """``(prompts, responses)`` of this view that the cut shortens."""
        prompts = self.prompt_lengths < self._stored_prompt_lengths()[self._rows]
        responses = self.response_lengths < self._stored_response_lengths()[self._rows]
        return int(prompts.sum()), int(responses.sum())

    def _stored_prompt_lengths(self) -> np.ndarray:
        return np.where(self._separators >= 0, self._separators, self._sizes).astype(np.int64)

    def _stored_response_lengths(self) -> np.ndarray:
        return np.where(self._separators >= 0, self._sizes - self._separators - 1, 0).astype(np.int64)

    def select(self, indices) -> IndexedInstructionData:
        """A view on the items ``indices`` (of this view), in that order; nothing is copied."""
        view = object.__new__(IndexedInstructionData)
        view.__dict__.update(self.__dict__)
        view._rows = self._rows[np.asarray(indices, dtype=np.int64)]
        return view

    # ---- the text, for ROUGE-L

    @property
    def examples(self) -> list:
        """One :class:`~distillm.data.formats.Example` per item: the ``.jsonl`` row (its rendered prompt, used as
        is, and its outputs as references), or, without a ``.jsonl``, the decoded prompt and response."""
        if self._examples is None:
            self._examples = self._read_jsonl() if self.jsonl is not None else None
        if self._examples is not None:
            return [self._examples[row] for row in self._rows.tolist()]
        return [self._decoded(row) for row in self._rows.tolist()]

    @property
    def prompts(self) -> list[str]:
        return [example.prompt for example in self.examples]

    @property
    def references(self) -> list[tuple[str, ...]]:
        return [example.references for example in self.examples]

    def _decoded(self, row: int):
        from distillm.data.formats import Example

        ids, cut = self.tokens[row], int(self._separators[row])
        prompt, response = (ids, ids[:0]) if cut < 0 else (ids[:cut], ids[cut + 1 :])
        eos = self.tokenizer.eos_token_id
        if len(response) and int(response[-1]) == eos:
            response = response[:-1]
        decode = self.tokenizer.decode
        return Example(
            instruction="",
            input="",
            references=(decode(response.tolist()),),
            prompt=decode(prompt.tolist()),
            source=f"{self.tokens.source} item {row}",
        )

    def _read_jsonl(self) -> list:
        return [row for _, _, row in _jsonl_rows(self.jsonl)]

    # ---- checks

    def _check_separators(self, allow_prompt_only: bool) -> None:
        missing = np.flatnonzero(self._separators < 0)
        if len(missing) and not allow_prompt_only:
            raise UserError(
                f"{self.tokens.source}: item {int(missing[0])} (and {len(missing) - 1} more) has no prompt/"
                f"response separator {self.separator}: this is prompt-only data (the original's "
                "--only-prompt, processed_data/dolly/prompt); training needs prompts and responses "
                "(processed_data/dolly/full)"
            )
        empty = np.flatnonzero(self._separators == 0)
        if len(empty):
            raise UserError(
                f"{self.tokens.source}: item {int(empty[0])} has an empty prompt (it starts with the "
                f"separator {self.separator}); prepare the data again"
            )

    def _check_eos(self, tokenizer) -> None:
        """Without a .jsonl, the ids alone: a full item's response ends with the tokenizer's EOS."""
        for row in range(min(len(self._sizes), _CHECKED_ROWS)):
            if self._separators[row] < 0:
                continue
            last = int(self.tokens[row][-1])
            if last != tokenizer.eos_token_id:
                raise UserError(
                    f"{self.tokens.source}: item {row} ends with token id {last}, but the tokenizer "
                    f"{_name(tokenizer)}'s EOS is {tokenizer.eos_token_id}; these files were made with another "
                    "tokenizer: prepare the data again with this one (`distillm prepare`)"
                )

    def _check_against_jsonl(self, tokenizer) -> None:
        """Re-encode the first rows of the .jsonl as the original did and compare with the stored ids:
        ``prompt = encode(prompt)[:len(stored)]``, ``response = (encode(prompt + output) + [eos])[len(encode(prompt)):]``."""
        with open(self.jsonl, "rb") as handle:
            rows = sum(1 for line in handle if line.strip())
        if rows != len(self._sizes):
            raise UserError(
                f"{self.jsonl}: {rows} rows, but {self.tokens.source} holds {len(self._sizes)} items; the "
                "original writes one row per item, in the same order: this .jsonl belongs to other files "
                "(remove it, and the references are decoded from the ids)"
            )
        for line, item, row in _jsonl_rows(self.jsonl, limit=min(len(self._sizes), _CHECKED_ROWS)):
            ids, cut = self.tokens[item], int(self._separators[item])
            stored_prompt = (ids if cut < 0 else ids[:cut]).tolist()
            prompt = tokenizer.encode(row.prompt, add_special_tokens=False)
            same = prompt[: len(stored_prompt)] == stored_prompt
            if same and cut >= 0:
                full = tokenizer.encode(row.prompt + row.references[0], add_special_tokens=False)
                same = full[len(prompt) :] + [tokenizer.eos_token_id] == ids[cut + 1 :].tolist()
            if not same:
                raise UserError(
                    f"{self.jsonl}:{line}: the tokenizer {_name(tokenizer)} encodes this row to other ids than "
                    f"item {item} of {self.tokens.source} holds: the files were made with another tokenizer "
                    "(prepare the data again with this one, `distillm prepare`), or the .jsonl is not theirs"
                )


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _jsonl_beside(prefix: str) -> Path | None:
    """``{split}.jsonl`` beside the shard ``{split}_k``, as the original writes it; None if there is none."""
    path = Path(prefix)
    split = path.name.rsplit("_", 1)[0] if path.name.rsplit("_", 1)[-1].isdigit() else path.name
    jsonl = path.with_name(f"{split}.jsonl")
    return jsonl if jsonl.is_file() else None


def _jsonl_rows(path: Path, limit: int | None = None):
    """``(line, item, Example)`` of the original's ``{split}.jsonl``, blank lines skipped: ``instruction``,
    ``prompt`` (the rendered template, as encoded), ``input``, ``output`` (a string or a list)."""
    import json

    from distillm.data.formats import Example

    with open(path, "rb") as handle:
        item = 0
        for line, raw in enumerate(handle, 1):
            if limit is not None and item >= limit:
                return
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                outputs = row["output"]
                outputs = [outputs] if isinstance(outputs, str) else list(outputs)
                prompt = str(row["prompt"])  # the exact text the original encoded
                example = Example(
                    instruction=str(row.get("instruction", "")),
                    input=str(row.get("input", "")),
                    references=tuple(str(output) for output in outputs) or ("",),
                    prompt=prompt,
                    source=f"{path}:{line}",
                )
            except (ValueError, KeyError, TypeError) as error:
                raise UserError(
                    f"{path}:{line}: not a row of the original's processed data ({error!r}); each line is a "
                    "JSON object with prompt and output (instruction and input too)"
                ) from None
            yield line, item, example
            item += 1


def load_indexed_instruction(data, tokenizer, cache_dir: str | Path, seed: int = 0, batch_size: int = 1):
    """``data.train`` (a ``DataConfig``) as MiniLLM's processed instruction data: ``(train, dev, dev_examples)``.

    The dev split is ``data.dev`` (MMIDIDX: its ``valid`` split when it is a folder; or any file
    ``distillm prepare`` reads), else the ``valid`` split beside the train shards (the original's
    ``--dev-num`` rows), else ``data.dev_size`` items taken out of the train items (``data.dev_split``).
    ``data.dev_size = 0`` means no dev split.
    """
    from distillm.data.cache import prepare_dataset
    from distillm.data.formats import read_examples, split_dev

    def indexed(path, split: str) -> IndexedInstructionData:
        return IndexedInstructionData(path, tokenizer, split, data.max_length, data.max_prompt_length)

    train = indexed(data.train, "train")
    dev = None
    if data.dev is not None and find_shards(data.dev, "valid"):
        dev = indexed(data.dev, "valid")
    elif data.dev is not None:
        rows, _ = read_examples(data.dev, data.format)
        rows = [example.for_evaluation() for example in rows]
        dev = prepare_dataset(
            rows, tokenizer, data.template, data.max_length, data.max_prompt_length, cache_dir
        )
    elif data.dev_size > 0 and find_shards(train.folder, "valid"):
        dev = indexed(train.folder, "valid")
    elif data.dev_size > 0:
        train_rows, dev_rows = split_dev(list(range(len(train))), data.dev_size, data.dev_split, seed)
        train, dev = train.select(train_rows), train.select(dev_rows)
    if len(train) < batch_size:
        raise UserError(
            f"{data.train}: {len(train)} training items is fewer than train.batch_size={batch_size}"
        )
    dev_examples = list(dev.examples) if dev is not None else []
    prompts, responses = train.truncated()
    logger.info(
        "%s: %d train items, %d dev (%d prompts cut to data.max_prompt_length, %d responses to max_length)",
        train.tokens.source,
        len(train),
        len(dev) if dev is not None else 0,
        prompts,
        responses,
    )
    return train, dev, dev_examples
