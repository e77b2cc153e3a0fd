"""Train a small byte-level BPE tokenizer, for the bundled demo and for tests (no hub needed)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"

# A minimal chat template so that `data.template=chat` also works with the tokenizers we train ourselves.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path | None = None,
    phrases: Sequence[str] = (),
):
    """A GPT-2-style byte-level BPE tokenizer trained on ``texts``; EOS doubles as BOS and padding.

    ``phrases`` (say, a prompt template's fixed text) become one ordinary token each, added after the
    ``vocab_size`` learned ones: wherever a phrase occurs in a text it is that single token, and decoding
    gives it back verbatim. Returns a ``PreTrainedTokenizerFast``; when ``out_dir`` is given it is also saved
    there, so that ``AutoTokenizer.from_pretrained(out_dir)`` loads it like any hub tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    if phrases:
        # Not normalized and not special: matched on the raw text, and kept when decoding.
        core.add_tokens([AddedToken(phrase, normalized=False, special=False) for phrase in phrases])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=1024,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
