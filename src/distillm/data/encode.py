"""Tokenization of prompt/response pairs and their collation into the batch contract of docs/design.md.

The original's rules (method reference, section 3.3), with two fixes:

- the prompt is encoded without special tokens both for training and for generation (the original added a
  BOS to evaluation prompts only, for OPT and LLaMA);
- an overlong prompt keeps its **last** ``max_prompt_length`` tokens, so the template's final
  ``### Response:`` marker (or a chat template's assistant header) survives; the original kept the first
  tokens and cut that marker off.

One rule for every cut response, dataset rows and student samples alike (``generation.samples_to_batch``): a
response cut at the length budget keeps the tokens that fit and gets **no** EOS, since its text goes on and an
EOS there would teach the model to stop mid-answer. Only a response that really ended carries an EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from distillm import IGNORE_INDEX
from distillm.errors import UserError


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example, and whether truncation touched them."""

    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS unless the response was cut
    prompt_truncated: bool
    response_truncated: bool


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(
            "the tokenizer has no EOS token; responses must end with one (set tokenizer.eos_token)"
        )
    return int(eos)


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not 1 <= max_prompt_length < max_length:
        raise UserError(
            f"max_prompt_length={max_prompt_length} is invalid: must be >= 1 and < max_length ({max_length})"
        )


def encode_prompt(prompt: str, tokenizer, max_prompt_length: int) -> list[int]:
    """Prompt ids without special tokens, keeping the last ``max_prompt_length`` (the end of the prompt)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    return ids[-max_prompt_length:] if len(ids) > max_prompt_length else ids


def encode_example_detailed(
    prompt: str, response: str, tokenizer, max_length: int = 512, max_prompt_length: int = 256
) -> EncodedExample:
    """:func:`encode_example` plus which parts were truncated (for summaries)."""
    _check_lengths(max_length, max_prompt_length)
    eos = _eos_id(tokenizer)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    # As the original: encode prompt + response together, so the response's tokens are those the model sees
    # in context; if a merge crosses the boundary the prompt is no longer a prefix: encode the response alone.
    full = tokenizer.encode(prompt + response, add_special_tokens=False)
    if full[: len(prompt_ids)] == prompt_ids:
        response_ids = full[len(prompt_ids) :]
    else:
        response_ids = tokenizer.encode(response, add_special_tokens=False)
    response_ids = response_ids + [eos]

    prompt_truncated = len(prompt_ids) > max_prompt_length
    if prompt_truncated:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)  # >= 1 because max_prompt_length < max_length
    response_truncated = len(response_ids) > room
    if response_truncated:
        response_ids = response_ids[:room]  # no invented EOS: the response goes on (module docstring)
    return EncodedExample(prompt_ids, response_ids, prompt_truncated, response_truncated)


def encode_example(
    prompt: str, response: str, tokenizer, max_length: int = 512, max_prompt_length: int = 256
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)``: at most ``max_prompt_length`` prompt tokens (the tail is kept), at most
    ``max_length`` in all; the response ends with EOS, unless it was cut to fit (then it ends where it was cut)."""
    encoded = encode_example_detailed(prompt, response, tokenizer, max_length, max_prompt_length)
    return encoded.prompt_ids, encoded.response_ids


def collate(items: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int) -> dict[str, Tensor]:
    """Batch ``(prompt_ids, response_ids)`` pairs into the batch contract, padded to the longest row.

    Row b holds ``ids = prompt + response`` of length L. As in the original, the model reads ``ids[:-1]``
    (the final EOS is never an input, it is only predicted) and ``labels[t] = ids[t + 1]`` where that token
    belongs to the response, ``IGNORE_INDEX`` elsewhere: the first supervised position is the prompt's last
    token (predicting the first response token), the last one predicts EOS (or, in a cut response, its last
    kept token).

    Returns ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` (right-padded, T = max L - 1) and
    ``prompt_ids``, ``prompt_attention_mask`` ``[B, P]`` (left-padded, P = longest prompt).
    """
    if not items:
        raise ValueError("collate needs at least one item")
    for prompt_ids, response_ids in items:
        if len(prompt_ids) == 0 or len(response_ids) == 0:
            raise ValueError("every item needs at least one prompt token and one response token")
    batch = len(items)
    width = max(len(p) + len(r) for p, r in items) - 1
    prompt_width = max(len(p) for p, _ in items)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((batch, width), dtype=torch.long)  # [B, T]
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    prompt_ids_out = torch.full((batch, prompt_width), pad_token_id, dtype=torch.long)  # [B, P]
    prompt_attention_mask = torch.zeros((batch, prompt_width), dtype=torch.long)  # [B, P]
    for b, (prompt_ids, response_ids) in enumerate(items):
        ids = torch.tensor(list(prompt_ids) + list(response_ids), dtype=torch.long)  # [L]
        length, prompt_length = len(ids) - 1, len(prompt_ids)
        input_ids[b, :length] = ids[:-1]
        attention_mask[b, :length] = 1
        labels[b, prompt_length - 1 : length] = ids[prompt_length:]  # response tokens, EOS included
        prompt_ids_out[b, prompt_width - prompt_length :] = ids[:prompt_length]
        prompt_attention_mask[b, prompt_width - prompt_length :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompt_ids": prompt_ids_out,
        "prompt_attention_mask": prompt_attention_mask,
    }
