"""The tokenizer trained for the demo and the tests: template phrases held as single tokens."""

from __future__ import annotations

from conftest import tokenizer_training_texts
from distillm.data import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
from distillm.data.template import template_segments
from distillm.tokenizer import train_bpe_tokenizer


def test_template_segments_are_exactly_the_fixed_text_between_the_templates_fields():
    segments = template_segments()
    # Reassembling each template from its segments and its fields gives it back.
    preamble_with, input_header, response_header = (
        ALPACA_WITH_INPUT.split("{instruction}")[0],
        "\n\n### Input:\n",
        "\n\n### Response:\n",
    )
    preamble_without = ALPACA_NO_INPUT.split("{instruction}")[0]
    assert set(segments) == {preamble_with, preamble_without, input_header, response_header}
    assert ALPACA_WITH_INPUT == preamble_with + "{instruction}" + input_header + "{input}" + response_header
    assert ALPACA_NO_INPUT == preamble_without + "{instruction}" + response_header
    assert [len(s) for s in segments] == sorted((len(s) for s in segments), reverse=True)


def test_phrases_become_one_token_each_and_decode_back_verbatim(tmp_path):
    from transformers import AutoTokenizer

    phrases = template_segments()
    train_bpe_tokenizer(tokenizer_training_texts(), vocab_size=300, out_dir=tmp_path, phrases=phrases)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))  # the saved form, as users load it
    assert len(tokenizer) == 300 + len(phrases)
    prompt = ALPACA_WITH_INPUT.format(instruction="Sort the words.", input="red blue")
    ids = tokenizer(prompt)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == phrases[0] and tokens[-1] == "\n\n### Response:\n" and "\n\n### Input:\n" in tokens
    # Everything between the phrases is ordinary byte-level BPE pieces.
    assert tokenizer.decode(ids) == prompt
    assert tokenizer.decode(ids[1:-1]) == "Sort the words.\n\n### Input:\nred blue"
    # Text without a phrase tokenizes as it would without them.
    plain = train_bpe_tokenizer(tokenizer_training_texts(), vocab_size=300)
    assert tokenizer("red blue green")["input_ids"] == plain("red blue green")["input_ids"]
