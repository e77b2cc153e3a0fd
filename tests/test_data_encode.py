"""Tokenization rules, truncation, and the batch contract of collate, position by position."""

from __future__ import annotations

import pytest
import torch

from distillm import IGNORE_INDEX
from distillm.data import Example, collate, encode_example, encode_prompt, render_prompt
from distillm.errors import UserError

PROMPT = render_prompt(Example("sort the words", "banana apple cherry", ("r",), None, "t:1"))
RESPONSE = "apple banana cherry"


def test_the_prompt_is_encoded_without_special_tokens_and_the_response_ends_with_eos(tiny_tokenizer):
    prompt_ids, response_ids = encode_example(PROMPT, RESPONSE, tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    assert prompt_ids == tiny_tokenizer.encode(PROMPT, add_special_tokens=False)
    assert eos not in prompt_ids  # no BOS (which is EOS in this tokenizer)
    assert response_ids[-1] == eos and eos not in response_ids[:-1]
    assert tiny_tokenizer.decode(prompt_ids + response_ids[:-1]) == PROMPT + RESPONSE


def test_training_and_generation_prompts_are_encoded_the_same_way(tiny_tokenizer):
    assert encode_prompt(PROMPT, tiny_tokenizer, 256) == encode_example(PROMPT, RESPONSE, tiny_tokenizer)[0]
    assert (
        encode_prompt(PROMPT, tiny_tokenizer, 10)
        == encode_example(PROMPT, RESPONSE, tiny_tokenizer, 512, 10)[0]
    )


def test_an_overlong_prompt_keeps_its_end_so_the_response_marker_survives(tiny_tokenizer):
    full = tiny_tokenizer.encode(PROMPT, add_special_tokens=False)
    limit = len(full) // 2
    prompt_ids, response_ids = encode_example(PROMPT, RESPONSE, tiny_tokenizer, 512, limit)
    assert len(prompt_ids) == limit and prompt_ids == full[-limit:]
    assert tiny_tokenizer.decode(prompt_ids).endswith("### Response:\n")
    assert tiny_tokenizer.decode(response_ids[:-1]) == RESPONSE  # the response is untouched


def test_an_overlong_response_is_cut_to_the_total_budget_and_gets_no_invented_eos(tiny_tokenizer):
    # The same rule as student samples cut at max_new_tokens (generation.samples_to_batch): the text goes on.
    response = " ".join(["apple banana cherry"] * 20)
    prompt_ids, untruncated = encode_example(PROMPT, response, tiny_tokenizer, 4096, 256)
    max_length = len(prompt_ids) + 7
    prompt_cut, response_ids = encode_example(PROMPT, response, tiny_tokenizer, max_length, len(prompt_ids))
    assert prompt_cut == prompt_ids
    assert len(prompt_cut) + len(response_ids) == max_length
    assert response_ids == untruncated[:7] and tiny_tokenizer.eos_token_id not in response_ids


def test_a_response_that_fits_exactly_keeps_its_eos(tiny_tokenizer):
    prompt_ids, untruncated = encode_example(PROMPT, RESPONSE, tiny_tokenizer, 4096, 256)
    max_length = len(prompt_ids) + len(untruncated)
    assert encode_example(PROMPT, RESPONSE, tiny_tokenizer, max_length, len(prompt_ids)) == (
        prompt_ids,
        untruncated,
    )
    assert untruncated[-1] == tiny_tokenizer.eos_token_id


def test_when_the_prompt_fills_the_budget_the_response_is_its_first_token_alone(tiny_tokenizer):
    _, untruncated = encode_example(PROMPT, RESPONSE, tiny_tokenizer, 4096, 256)
    prompt_ids, response_ids = encode_example(
        PROMPT, RESPONSE, tiny_tokenizer, max_length=9, max_prompt_length=8
    )
    assert len(prompt_ids) == 8 and response_ids == untruncated[:1] != [tiny_tokenizer.eos_token_id]


def test_a_prompt_limit_not_below_the_total_limit_is_an_error(tiny_tokenizer):
    with pytest.raises(UserError, match="max_prompt_length=512"):
        encode_example(PROMPT, RESPONSE, tiny_tokenizer, max_length=512, max_prompt_length=512)


def test_collate_builds_the_batch_contract_position_by_position():
    eos, pad = 2, 0
    batch = collate([([5, 6, 7], [8, 9, eos]), ([5], [8, eos])], pad_token_id=pad)
    # Row 0: ids 5 6 7 | 8 9 E. The model reads 5 6 7 8 9; position 2 (token 7) predicts 8, ..., 4 predicts E.
    # Row 1: ids 5 | 8 E. It reads 5 8; position 0 predicts 8, position 1 predicts E; then padding.
    expected = {
        "input_ids": [[5, 6, 7, 8, 9], [5, 8, pad, pad, pad]],
        "attention_mask": [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]],
        "labels": [
            [IGNORE_INDEX, IGNORE_INDEX, 8, 9, eos],
            [8, eos, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
        ],
        "prompt_ids": [[5, 6, 7], [pad, pad, 5]],
        "prompt_attention_mask": [[1, 1, 1], [0, 0, 1]],
    }
    assert set(batch) == set(expected)
    for key, value in expected.items():
        assert batch[key].dtype == torch.long, key
        assert batch[key].tolist() == value, key


def test_collated_labels_supervise_exactly_the_response_of_real_tokenized_examples(tiny_tokenizer):
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    items = [
        encode_example(PROMPT, RESPONSE, tiny_tokenizer),
        encode_example("write one", " two", tiny_tokenizer),
    ]
    batch = collate(items, pad)
    assert batch["input_ids"].shape[1] == max(len(p) + len(r) for p, r in items) - 1  # dynamic padding
    for b, (prompt_ids, response_ids) in enumerate(items):
        ids = prompt_ids + response_ids
        for t in range(batch["input_ids"].shape[1]):
            real = t < len(ids) - 1
            assert batch["attention_mask"][b, t] == int(real)
            assert batch["input_ids"][b, t] == (ids[t] if real else pad)
            in_response = len(prompt_ids) - 1 <= t < len(ids) - 1
            assert batch["labels"][b, t] == (ids[t + 1] if in_response else IGNORE_INDEX)
        supervised = batch["labels"][b][batch["labels"][b] != IGNORE_INDEX].tolist()
        assert supervised == response_ids and supervised[-1] == eos
        row_prompt = batch["prompt_ids"][b][batch["prompt_attention_mask"][b].bool()].tolist()
        assert row_prompt == prompt_ids
        assert batch["prompt_attention_mask"][b, -1] == 1  # left padding: the prompt ends at the right edge


def test_collate_rejects_an_item_without_prompt_or_response():
    with pytest.raises(ValueError):
        collate([([], [2])], pad_token_id=0)
