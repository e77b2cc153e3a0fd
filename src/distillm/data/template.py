"""Prompt templates: the paper's Alpaca-style text (two variants), or the tokenizer's own chat template."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from distillm.errors import UserError

if TYPE_CHECKING:
    from distillm.data.formats import Example

TEMPLATES = ("alpaca", "chat")

# The Alpaca templates' headers: the one home of this text (report.py strips them from prompts with
# instruction_and_input). Byte-exact with the original's tools/process_data_dolly.py (method reference, 3.2).
INSTRUCTION_HEADER = "### Instruction:\n"
INPUT_HEADER = "### Input:\n"
RESPONSE_HEADER = "### Response:\n"
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    f"request.\n\n{INSTRUCTION_HEADER}{{instruction}}\n\n{RESPONSE_HEADER}"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    f"Write a response that appropriately completes the request.\n\n{INSTRUCTION_HEADER}{{instruction}}\n\n"
    f"{INPUT_HEADER}{{input}}\n\n{RESPONSE_HEADER}"
)


def template_segments() -> tuple[str, ...]:
    """The fixed text between the Alpaca templates' fields (the preamble up to the instruction, the Input and
    Response headers), each once, longest first.

    A tokenizer trained for the bundled demo holds each as one token, so that the ~40 template tokens of every
    prompt cost 2-3 positions instead.
    """
    pieces: list[str] = []
    for template in (ALPACA_WITH_INPUT, ALPACA_NO_INPUT):
        for piece in re.split(r"\{instruction\}|\{input\}", template):
            if piece and piece not in pieces:
                pieces.append(piece)
    return tuple(sorted(pieces, key=len, reverse=True))


def render_prompt(example: Example, template: str = "alpaca", tokenizer=None) -> str:
    """The prompt text of ``example``: its ready-made ``prompt`` if the file had one, else the template.

    ``alpaca``: the paper's template, the variant without input when ``example.input`` is empty (or only
    whitespace). ``chat``: ``tokenizer``'s chat template, with the instruction (and the input after a blank
    line) as the user message, ending with the assistant's generation prompt.
    """
    if template not in TEMPLATES:
        raise UserError(f"unknown template {template!r}; use one of: {', '.join(TEMPLATES)}")
    if example.prompt is not None:
        return example.prompt
    has_input = bool(example.input.strip())
    if template == "alpaca":
        if has_input:
            return ALPACA_WITH_INPUT.format(instruction=example.instruction, input=example.input)
        return ALPACA_NO_INPUT.format(instruction=example.instruction)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "template 'chat' needs a tokenizer with a chat template; this tokenizer has none "
            "(use template 'alpaca', or a chat model's tokenizer)"
        )
    message = example.instruction + (f"\n\n{example.input}" if has_input else "")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )


def instruction_and_input(prompt: str) -> str | None:
    """The instruction and input of an Alpaca-template prompt without the template's fixed text, stripped;
    None for a prompt without the template's instruction header."""
    if INSTRUCTION_HEADER not in prompt:
        return None
    core = prompt.split(INSTRUCTION_HEADER, 1)[1].replace(RESPONSE_HEADER.rstrip("\n"), "")
    return core.replace(INPUT_HEADER, "").strip()
