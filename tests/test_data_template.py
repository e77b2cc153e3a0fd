"""The paper's Alpaca-style template, byte for byte, and the chat-template option."""

from __future__ import annotations

import pytest

from distillm.data import Example, render_prompt
from distillm.data.template import instruction_and_input
from distillm.errors import UserError


def example(instruction, input="", prompt=None):
    return Example(instruction, input, ("r",), prompt, "test:1")


def test_the_template_without_input_is_byte_exact():
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName three colors.\n\n### Response:\n"
    )
    assert render_prompt(example("Name three colors.")) == expected


def test_the_template_with_input_is_byte_exact():
    expected = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSort the words."
        "\n\n### Input:\npear apple\n\n### Response:\n"
    )
    assert render_prompt(example("Sort the words.", "pear apple")) == expected


def test_a_whitespace_only_input_counts_as_no_input_and_braces_are_kept_verbatim():
    rendered = render_prompt(example("Print {x}.", "  "))
    assert "### Input:" not in rendered and "\n### Instruction:\nPrint {x}.\n" in rendered


def test_a_ready_made_prompt_is_used_as_is_with_either_template(tiny_tokenizer):
    assert render_prompt(example("ignored", prompt="Q: why?\nA:")) == "Q: why?\nA:"
    assert render_prompt(example("ignored", prompt="Q: why?\nA:"), "chat", tiny_tokenizer) == "Q: why?\nA:"


def test_the_chat_template_puts_instruction_and_input_in_the_user_turn_and_opens_the_assistant_turn(
    tiny_tokenizer,
):
    # The tiny tokenizer's chat template (distillm.tokenizer.CHAT_TEMPLATE): "<|role|>\ncontent\n" per message.
    assert (
        render_prompt(example("Sort.", "b a"), "chat", tiny_tokenizer)
        == "<|user|>\nSort.\n\nb a\n<|assistant|>\n"
    )
    assert render_prompt(example("Hi."), "chat", tiny_tokenizer) == "<|user|>\nHi.\n<|assistant|>\n"


def test_the_chat_template_without_a_tokenizer_that_has_one_is_an_error(tiny_tokenizer):
    with pytest.raises(UserError, match="needs a tokenizer with a chat template"):
        render_prompt(example("Hi."), "chat", None)


def test_an_unknown_template_is_an_error():
    with pytest.raises(UserError, match="unknown template 'vicuna'"):
        render_prompt(example("Hi."), "vicuna")


def test_instruction_and_input_strip_exactly_the_templates_fixed_text():
    assert instruction_and_input(render_prompt(example("Name three colors."))) == "Name three colors."
    assert instruction_and_input(render_prompt(example("Sort the words.", "pear apple"))) == (
        "Sort the words.\n\npear apple"
    )
    assert instruction_and_input("Q: 1+1?\nA:") is None  # not an Alpaca prompt
