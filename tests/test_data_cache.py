"""The prepared-data cache: content, alignment, memory mapping, reuse, keys and atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

import distillm.data.cache as cache_module
from distillm.data import Example, TokenizedDataset, encode_example, prepare_dataset, render_prompt
from distillm.errors import UserError


def make_examples(n=6):
    return [
        Example(
            f"reverse list {k}",
            "one two three" if k % 2 else "",
            (f"three two one {k}", "alt"),
            None,
            f"f:{k}",
        )
        for k in range(n)
    ]


def test_prepared_items_are_the_encoded_examples_in_order_with_aligned_prompts_and_references(
    tiny_tokenizer, tmp_path
):
    examples = make_examples()
    dataset = prepare_dataset(examples, tiny_tokenizer, "alpaca", 64, 32, tmp_path)
    assert len(dataset) == len(examples) and not dataset.from_cache
    for i, example in enumerate(examples):
        prompt = render_prompt(example, "alpaca")
        assert dataset[i] == encode_example(prompt, example.response, tiny_tokenizer, 64, 32)
        assert dataset.prompts[i] == prompt
        assert dataset.examples[i] == example
        assert dataset.references[i] == example.references
    prompt_ids, response_ids = dataset[-1]
    assert (prompt_ids, response_ids) == dataset[len(examples) - 1]
    assert dataset.prompt_lengths.tolist() == [len(dataset[i][0]) for i in range(len(dataset))]
    assert dataset.response_lengths.tolist() == [len(dataset[i][1]) for i in range(len(dataset))]
    with pytest.raises(IndexError):
        dataset[len(examples)]


def test_the_tokens_are_memory_mapped_from_disk(tiny_tokenizer, tmp_path):
    dataset = prepare_dataset(make_examples(), tiny_tokenizer, cache_dir=tmp_path)
    assert isinstance(dataset._tokens, np.memmap) and dataset._tokens.dtype == np.int32


def test_a_second_call_reuses_the_cache_without_tokenizing(tiny_tokenizer, tmp_path, monkeypatch):
    examples = make_examples()
    first = prepare_dataset(examples, tiny_tokenizer, "alpaca", 64, 32, tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache was valid")

    monkeypatch.setattr(cache_module, "encode_example_detailed", fail)
    second = prepare_dataset(examples, tiny_tokenizer, "alpaca", 64, 32, tmp_path)
    assert second.from_cache and second.folder == first.folder
    assert [second[i] for i in range(len(second))] == [first[i] for i in range(len(first))]


def test_changing_lengths_template_data_or_tokenizer_gives_a_new_cache_entry(tiny_tokenizer, tmp_path):
    from distillm.tokenizer import train_bpe_tokenizer

    examples = make_examples()
    base = prepare_dataset(examples, tiny_tokenizer, "alpaca", 64, 32, tmp_path).folder
    other_tokenizer = train_bpe_tokenizer(["reverse list one two three"] * 10, vocab_size=300)
    variants = [
        prepare_dataset(examples, tiny_tokenizer, "alpaca", 64, 16, tmp_path),
        prepare_dataset(examples, tiny_tokenizer, "alpaca", 48, 32, tmp_path),
        prepare_dataset(examples, tiny_tokenizer, "chat", 64, 32, tmp_path),
        prepare_dataset(examples[:-1], tiny_tokenizer, "alpaca", 64, 32, tmp_path),
        prepare_dataset(examples, other_tokenizer, "alpaca", 64, 32, tmp_path),
    ]
    assert all(not variant.from_cache for variant in variants)
    assert len({base, *(variant.folder for variant in variants)}) == 6


def test_a_failure_while_preparing_leaves_no_cache_entry_behind(tiny_tokenizer, tmp_path, monkeypatch):
    calls = []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise UserError("boom")
        return encode_example_detailed(*args, **kwargs)

    encode_example_detailed = cache_module.encode_example_detailed
    monkeypatch.setattr(cache_module, "encode_example_detailed", fail_on_third)
    with pytest.raises(UserError, match="boom"):
        prepare_dataset(make_examples(), tiny_tokenizer, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    dataset = prepare_dataset(make_examples(), tiny_tokenizer, cache_dir=tmp_path)
    assert not dataset.from_cache and [path.name for path in tmp_path.iterdir()] == [dataset.folder.name]


def test_preparing_no_examples_is_an_error(tiny_tokenizer, tmp_path):
    with pytest.raises(UserError, match="no examples"):
        prepare_dataset([], tiny_tokenizer, cache_dir=tmp_path)


def test_opening_a_folder_that_is_not_a_prepared_dataset_is_an_error(tmp_path):
    with pytest.raises(UserError, match="not a prepared dataset"):
        TokenizedDataset(tmp_path)


def test_a_damaged_cache_entry_is_prepared_again_with_a_warning(tiny_tokenizer, tmp_path, caplog):
    first = prepare_dataset(make_examples(), tiny_tokenizer, cache_dir=tmp_path)
    expected = [first[i] for i in range(len(first))]
    tokens = first.folder / "tokens.npy"
    del first
    tokens.write_bytes(tokens.read_bytes()[:-4])  # a bad copy cut the last token
    with caplog.at_level("WARNING"):
        again = prepare_dataset(make_examples(), tiny_tokenizer, cache_dir=tmp_path)
    assert f"{tokens}: " in caplog.text and "preparing it again" in caplog.text
    assert not again.from_cache and [again[i] for i in range(len(again))] == expected


def test_opening_a_damaged_prepared_dataset_names_the_file(tiny_tokenizer, tmp_path):
    dataset = prepare_dataset(make_examples(), tiny_tokenizer, cache_dir=tmp_path)
    examples = dataset.folder / "examples.jsonl"
    examples.write_text(examples.read_text().replace("a", "b", 1))
    with pytest.raises(UserError, match=f"{examples}: its content differs"):
        TokenizedDataset(dataset.folder)
