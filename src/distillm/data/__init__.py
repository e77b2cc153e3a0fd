"""Instruction data: formats, the paper's template, tokenization and collation, the prepared-data cache,
the pretraining corpus, and the bundled task suite. See docs/data.md."""

from distillm.data.cache import TokenizedDataset, prepare_dataset, tokenizer_fingerprint
from distillm.data.encode import collate, encode_example, encode_prompt
from distillm.data.formats import FORMATS, Example, ReadReport, read_examples, split_dev
from distillm.data.indexed import (
    IndexedInstructionData,
    IndexedPretrainChunks,
    find_shards,
    load_indexed_instruction,
)
from distillm.data.pretrain import (
    PretrainChunks,
    collate_chunks,
    load_pretrain,
    pack_corpus,
    prepare_pretrain,
)
from distillm.data.tasks import generate_task_suite, write_task_suite
from distillm.data.template import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, TEMPLATES, render_prompt

__all__ = [
    "ALPACA_NO_INPUT",
    "ALPACA_WITH_INPUT",
    "FORMATS",
    "IndexedInstructionData",
    "IndexedPretrainChunks",
    "TEMPLATES",
    "Example",
    "PretrainChunks",
    "ReadReport",
    "TokenizedDataset",
    "collate",
    "collate_chunks",
    "encode_example",
    "encode_prompt",
    "find_shards",
    "generate_task_suite",
    "load_indexed_instruction",
    "load_pretrain",
    "pack_corpus",
    "prepare_dataset",
    "prepare_pretrain",
    "read_examples",
    "render_prompt",
    "split_dev",
    "tokenizer_fingerprint",
    "write_task_suite",
]
