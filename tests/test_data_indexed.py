"""MiniLLM / DistiLLM's binary format (MMIDIDX ``.bin`` + ``.idx``): its pretraining chunks, and its processed
instruction data used directly as ``data.train`` / ``data.dev``. The files are written here from the format's
description (the data section of the method reference), independently of the reader."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from distillm.config import DataConfig, load_config
from distillm.data import (
    IndexedInstructionData,
    IndexedPretrainChunks,
    load_indexed_instruction,
    load_pretrain,
)
from distillm.errors import UserError

# --------------------------------------------------------------------------------------------------------
# MiniLLM's binary format, written here from its description (independently of the reader).

_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8, np.uint32: 9}


def write_mmididx(prefix, items, dtype, code=None):
    """``prefix.bin`` / ``prefix.idx`` as the format description says: magic, u64 version 1, u8 dtype code,
    u64 items, u64 docs, int32 sizes, int64 byte pointers, int64 doc index ``[0]``."""
    arrays = [np.asarray(item, dtype=np.int64).astype(dtype) for item in items]  # -1 wraps as the original's
    with open(f"{prefix}.bin", "wb") as handle:
        for array in arrays:
            handle.write(array.tobytes())
    sizes = np.array([len(a) for a in arrays], dtype="<i4")
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]) * np.dtype(dtype).itemsize
    with open(f"{prefix}.idx", "wb") as handle:
        handle.write(b"MMIDIDX\x00\x00")
        handle.write(struct.pack("<Q", 1))
        handle.write(struct.pack("<B", code or _CODES[dtype]))
        handle.write(struct.pack("<Q", len(arrays)))
        handle.write(struct.pack("<Q", 1))
        handle.write(sizes.tobytes())
        handle.write(pointers.astype("<i8").tobytes())
        handle.write(np.array([0], dtype="<i8").tobytes())


def test_minillm_pretraining_chunks_read_back_the_same_ids_across_shards(tiny_tokenizer, tmp_path):
    rng = np.random.default_rng(0)
    chunks = rng.integers(0, len(tiny_tokenizer), size=(7, 9)).tolist()
    folder = tmp_path / "openwebtext" / "gpt2" / "512" / "10M"
    folder.mkdir(parents=True)
    write_mmididx(folder / "train_0", chunks[:4], np.uint16)
    write_mmididx(folder / "train_1", chunks[4:], np.uint16)
    write_mmididx(folder / "valid_0", chunks[:1], np.uint16)
    for path in (folder, f"{folder}/train", folder / "train_0.idx"):
        loaded = load_pretrain(path, tiny_tokenizer)
        assert isinstance(loaded, IndexedPretrainChunks) and loaded.chunk_length == 9
        expected = chunks if path != folder / "train_0.idx" else chunks[:4]
        assert [loaded[i] for i in range(len(loaded))] == expected
    batch = loaded.collate([loaded[0], loaded[1]])
    assert batch["labels"].tolist() == [chunks[0][1:], chunks[1][1:]]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint32])
def test_minillm_instruction_data_splits_prompt_and_response_at_the_separator(
    tiny_tokenizer, tmp_path, dtype
):
    eos = tiny_tokenizer.eos_token_id
    samples = [([5, 6, 7], [8, 9, eos]), ([10], [11, eos]), ([12, 13], [])]
    items = [prompt + [-1] + response for prompt, response in samples[:2]] + [
        samples[2][0]
    ]  # last: prompt only
    write_mmididx(tmp_path / "train_0", items, dtype)
    with pytest.raises(
        UserError, match=r"item 2 \(and 0 more\) has no prompt/response separator .*--only-prompt"
    ):
        IndexedInstructionData(tmp_path, tiny_tokenizer)
    data = IndexedInstructionData(tmp_path, tiny_tokenizer, allow_prompt_only=True)
    assert [data[i] for i in range(len(data))] == samples
    assert data.prompt_lengths.tolist() == [3, 1, 2] and data.response_lengths.tolist() == [3, 2, 0]


def test_uint16_instruction_data_reserves_65535_for_its_separator(tmp_path):
    class Vocabulary65536:
        name_or_path = "v65536"

        def __len__(self):
            return 65536

    write_mmididx(tmp_path / "train_0", [[5, -1, 6]], np.uint16)
    with pytest.raises(
        UserError, match="holds token ids below 65535, but the tokenizer v65536 has 65536 tokens"
    ):
        IndexedInstructionData(tmp_path, Vocabulary65536())


class _BigVocabulary:
    name_or_path = "big-tokenizer"

    def __len__(self):
        return 151_646


def test_minillm_files_that_cannot_match_the_tokenizer_are_refused_naming_both(tiny_tokenizer, tmp_path):
    write_mmididx(tmp_path / "train_0", [[1, 2, 3], [4, 5, 6]], np.uint16)
    with pytest.raises(
        UserError,
        match=r"train_0: dtype uint16 holds token ids below 65536, but the tokenizer big-tokenizer has 151646",
    ):
        IndexedPretrainChunks(tmp_path, _BigVocabulary())
    write_mmididx(tmp_path / "train_0", [[1, 2, 3], [4, 5, len(tiny_tokenizer) + 7]], np.uint16)
    with pytest.raises(
        UserError,
        match=rf"item 1 holds token id {len(tiny_tokenizer) + 7}, outside the tokenizer .*'s {len(tiny_tokenizer)} tokens",
    ):
        load_pretrain(tmp_path, tiny_tokenizer)
    write_mmididx(tmp_path / "train_0", [[1, 2, 3], [4, 5]], np.uint16)
    with pytest.raises(UserError, match="chunk 1 has 2 tokens but chunk 0 has 3"):
        IndexedPretrainChunks(tmp_path, tiny_tokenizer)
    write_mmididx(tmp_path / "train_0", [[1, 2, 3]], np.float32, code=6)
    with pytest.raises(UserError, match="dtype float32 holds floats, not token ids"):
        IndexedPretrainChunks(tmp_path, tiny_tokenizer)
    write_mmididx(tmp_path / "train_0", [[1, 2, 3], [4, 5, 6]], np.uint16)
    with open(tmp_path / "train_0.bin", "r+b") as handle:
        handle.truncate(8)
    with pytest.raises(UserError, match=r"train_0.bin: 8 bytes, but its index points to byte 12"):
        IndexedPretrainChunks(tmp_path, tiny_tokenizer)


# --------------------------------------------------------------------------------------------------------
# The original's processed instruction data as data.train / data.dev.

# The original's templates and encoding (method reference, sections 3.2-3.4), written out here.
_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)


def original_encoding(tokenizer, row, max_prompt_length=256):
    """``(prompt_text, prompt_ids, response_ids)`` as ``process_data_dolly.py`` makes them: the prompt cut to
    its first ``max_prompt_length`` ids; the response sliced from ``encode(prompt + output) + [eos]``."""
    template = _WITH_INPUT if row["input"] else _NO_INPUT
    prompt = template.format(instruction=row["instruction"], input=row["input"])
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    full = tokenizer.encode(prompt + row["output"], add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt, prompt_ids[:max_prompt_length], full[len(prompt_ids) :]


def write_processed(folder, split, rows, tokenizer, dtype=np.uint16, jsonl=True, max_prompt_length=256):
    """``{split}_0.bin/.idx`` (``prompt + [-1] + response``) and ``{split}.jsonl`` as the original writes them;
    returns the ``(prompt_ids, response_ids)`` pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs, lines = [], []
    for row in rows:
        prompt, prompt_ids, response_ids = original_encoding(tokenizer, row, max_prompt_length)
        pairs.append((prompt_ids, response_ids))
        lines.append(
            json.dumps({**{k: row[k] for k in ("instruction", "input", "output")}, "prompt": prompt})
        )
    write_mmididx(folder / f"{split}_0", [p + [-1] + r for p, r in pairs], dtype)
    if jsonl:
        (folder / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
    return pairs


def task_rows(task_data, split):
    """The bundled tasks' Dolly rows as the original's raw.jsonl fields."""
    rows = [json.loads(line) for line in (task_data / f"{split}.jsonl").read_text().splitlines()]
    return [{"instruction": r["instruction"], "input": r["context"], "output": r["response"]} for r in rows]


def test_the_originals_processed_folder_gives_its_ids_token_for_token_and_its_jsonl_text(
    tiny_tokenizer, task_data, tmp_path
):
    folder = tmp_path / "processed_data" / "dolly" / "full" / "gpt2"
    train_rows, dev_rows = task_rows(task_data, "train"), task_rows(task_data, "dev")
    train_pairs = write_processed(folder, "train", train_rows, tiny_tokenizer)
    dev_pairs = write_processed(folder, "valid", dev_rows, tiny_tokenizer)
    for path in (folder, folder / "train", folder / "train_0.idx"):
        data = DataConfig(train=str(path), max_length=512, max_prompt_length=256)
        train, dev, dev_examples = load_indexed_instruction(data, tiny_tokenizer, tmp_path / "cache")
        assert [train[i] for i in range(len(train))] == train_pairs
        assert [dev[i] for i in range(len(dev))] == dev_pairs  # the valid split beside it is the dev split
    assert [e.references for e in dev_examples] == [(r["output"],) for r in dev_rows]
    assert [e.prompt for e in dev_examples] == [original_encoding(tiny_tokenizer, r)[0] for r in dev_rows]
    assert all(response[-1] == tiny_tokenizer.eos_token_id for _, response in train_pairs)


def test_the_processed_folder_trains_on_the_ids_distillm_prepares_from_the_same_rows(
    tiny_tokenizer, task_data, tmp_path
):
    """Short prompts and no merge across the prompt/response boundary: the two encodings are the same rules."""
    from distillm.train import load_data

    folder = tmp_path / "processed"
    write_processed(folder, "train", task_rows(task_data, "train"), tiny_tokenizer)
    write_processed(folder, "valid", task_rows(task_data, "dev"), tiny_tokenizer)

    def loaded(train, dev):
        config = load_config(None, [f"data.train={train}", f"data.dev={dev}", "train.batch_size=4"])
        return load_data(config, tiny_tokenizer, tmp_path / "cache")

    ours = loaded(task_data / "train.jsonl", task_data / "dev.jsonl")
    theirs = loaded(folder, folder)
    assert isinstance(theirs.train, IndexedInstructionData)
    assert [theirs.train[i] for i in range(len(theirs.train))] == [
        ours.train[i] for i in range(len(ours.train))
    ]
    assert [theirs.dev[i] for i in range(len(theirs.dev))] == [ours.dev[i] for i in range(len(ours.dev))]
    assert [e.references for e in theirs.dev_examples] == [e.references for e in ours.dev_examples]
    assert [e.prompt for e in theirs.dev_examples] == ours.dev.prompts


def test_stored_ids_are_cut_by_our_rules_the_prompt_keeps_its_tail_a_cut_response_has_no_eos(
    tiny_tokenizer, tmp_path
):
    eos = tiny_tokenizer.eos_token_id
    prompt, response = list(range(3, 13)), [20, 21, 22, 23, eos]  # 10 prompt, 5 response ids
    write_mmididx(tmp_path / "train_0", [prompt + [-1] + response, [7, -1, 8, eos]], np.uint16)
    data = IndexedInstructionData(tmp_path, tiny_tokenizer, max_length=10, max_prompt_length=6)
    assert data[0] == (prompt[-6:], response[:4])  # 6 + 4 = max_length; the cut response ends without EOS
    assert data[1] == ([7], [8, eos])
    assert data.prompt_lengths.tolist() == [6, 1] and data.response_lengths.tolist() == [4, 2]
    assert data.truncated() == (1, 1)


def test_without_a_jsonl_the_references_are_the_decoded_responses(tiny_tokenizer, task_data, tmp_path):
    rows = task_rows(task_data, "dev")[:6]
    write_processed(tmp_path, "train", rows, tiny_tokenizer, jsonl=False)
    examples = IndexedInstructionData(tmp_path, tiny_tokenizer).examples
    # Byte-level BPE decodes to the exact text: the original's output, and its rendered prompt.
    assert [e.references for e in examples] == [(r["output"],) for r in rows]
    assert [e.prompt for e in examples] == [original_encoding(tiny_tokenizer, r)[0] for r in rows]


def test_without_a_valid_split_dev_size_items_are_taken_out_of_the_train_items(
    tiny_tokenizer, task_data, tmp_path
):
    rows = task_rows(task_data, "train")[:20]
    pairs = write_processed(tmp_path, "train", rows, tiny_tokenizer)
    data = DataConfig(train=str(tmp_path), dev_size=5)
    train, dev, dev_examples = load_indexed_instruction(data, tiny_tokenizer, tmp_path / "cache")
    assert [dev[i] for i in range(len(dev))] == pairs[:5]  # dev_split "first", as the original's --dev-num
    assert [train[i] for i in range(len(train))] == pairs[5:]
    assert [e.references for e in dev_examples] == [(r["output"],) for r in rows[:5]]
    data = DataConfig(train=str(tmp_path), dev_size=5, dev_split="random")
    train, dev, _ = load_indexed_instruction(data, tiny_tokenizer, tmp_path / "cache", seed=1)
    assert sorted(map(str, [dev[i] for i in range(5)] + [train[i] for i in range(15)])) == sorted(
        map(str, pairs)
    )
    _, dev, dev_examples = load_indexed_instruction(
        DataConfig(train=str(tmp_path), dev_size=0), tiny_tokenizer, tmp_path
    )
    assert dev is None and dev_examples == []
    with pytest.raises(UserError, match=r"15 training items is fewer than train.batch_size=16"):
        load_indexed_instruction(
            DataConfig(train=str(tmp_path), dev_size=5), tiny_tokenizer, tmp_path, batch_size=16
        )


def test_files_made_with_another_tokenizer_are_refused_naming_both(tiny_tokenizer, task_data, tmp_path):
    from conftest import tokenizer_training_texts
    from distillm.tokenizer import train_bpe_tokenizer

    rows = task_rows(task_data, "train")[:4]
    write_processed(tmp_path, "train", rows, tiny_tokenizer)
    # Same vocabulary plus one phrase: every stored id is in range, but the template encodes differently.
    other = train_bpe_tokenizer(tokenizer_training_texts(), vocab_size=512, phrases=["### Response:"])
    other.name_or_path = "other-tokenizer"
    with pytest.raises(
        UserError,
        match=r"train.jsonl:1: the tokenizer other-tokenizer encodes this row to other ids than item 0",
    ):
        IndexedInstructionData(tmp_path, other)
    (tmp_path / "train.jsonl").unlink()  # the ids alone: a response ends with the tokenizer's EOS
    write_mmididx(tmp_path / "train_0", [[5, 6, -1, 7, 8]], np.uint16)
    with pytest.raises(
        UserError,
        match=rf"item 0 ends with token id 8, but the tokenizer .*'s EOS is {tiny_tokenizer.eos_token_id}",
    ):
        IndexedInstructionData(tmp_path, tiny_tokenizer)


def test_a_jsonl_that_is_not_the_items_own_is_refused(tiny_tokenizer, task_data, tmp_path):
    rows = task_rows(task_data, "train")[:4]
    write_processed(tmp_path, "train", rows, tiny_tokenizer)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text(
        "\n".join([lines[1], lines[0], *lines[2:]]) + "\n"
    )  # two rows swapped
    with pytest.raises(
        UserError, match=r"train.jsonl:1: .* encodes this row to other ids than item 0 .*not theirs"
    ):
        IndexedInstructionData(tmp_path, tiny_tokenizer)
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:3]) + "\n")  # a row short
    with pytest.raises(UserError, match=r"train.jsonl: 3 rows, but .*train_0 holds 4 items"):
        IndexedInstructionData(tmp_path, tiny_tokenizer)
    (tmp_path / "train.jsonl").write_text('{"instruction": "x"}\n' + "\n".join(lines[1:]) + "\n")
    with pytest.raises(UserError, match=r"train.jsonl:1: not a row of the original's processed data"):
        IndexedInstructionData(tmp_path, tiny_tokenizer)
    write_mmididx(tmp_path / "train_0", [[-1, 7, tiny_tokenizer.eos_token_id]], np.uint16)
    (tmp_path / "train.jsonl").unlink()
    with pytest.raises(UserError, match=r"item 0 has an empty prompt"):
        IndexedInstructionData(tmp_path, tiny_tokenizer)


def test_a_run_trains_and_scores_rouge_on_the_processed_folder(
    tiny_tokenizer, task_data, tiny_student_dir, tmp_path
):
    from distillm.cli import main

    folder = tmp_path / "processed"
    write_processed(folder, "train", task_rows(task_data, "train"), tiny_tokenizer)
    write_processed(folder, "valid", task_rows(task_data, "dev")[:4], tiny_tokenizer)
    out = tmp_path / "run"
    overrides = {
        "model.student": tiny_student_dir,
        "model.teacher": "null",
        "objective.kd_ratio": 0.0,
        "data.train": folder,
        "data.max_length": 96,
        "data.max_prompt_length": 64,
        "data.cache_dir": tmp_path / "cache",
        "train.output_dir": out,
        "train.max_steps": 2,
        "train.batch_size": 4,
        "train.eval_every": 2,
        "train.eval_rouge": True,
        "train.save_every": 2,
        "train.progress": False,
        "generation.max_new_tokens": 4,
        "generation.batch_size": 4,
    }
    assert main(["train", *[f"{k}={v}" for k, v in overrides.items()]]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [row for row in rows if "dev_rougeL" in row]
    assert evaluated and 0.0 <= evaluated[-1]["dev_rougeL"] <= 100.0 and evaluated[-1]["dev_loss"] > 0
