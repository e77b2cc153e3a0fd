"""Packing a corpus into fixed-length chunks for the pretraining LM term: streaming, the on-disk format,
interrupted preparations and bad input (MiniLLM's MMIDIDX files: test_data_indexed.py)."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import distillm.data.pretrain as pretrain_module
from distillm.cli import main
from distillm.data import (
    PretrainChunks,
    collate_chunks,
    load_pretrain,
    pack_corpus,
    prepare_pretrain,
)
from distillm.data.corpus import NEWLINE_MARKER, HubCorpus, TextCorpus
from distillm.errors import UserError
from distillm.storage import write_manifest

DOCS = ["alpha beta gamma delta", "apple banana cherry river mountain ocean", "one two three four five six"]
WORDS = "alpha beta gamma delta apple banana cherry river mountain ocean red green blue one two three".split()


def corpus_documents(count=40, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(count)]


def token_stream(tokenizer, documents):
    """The in-memory reference: every document encoded alone, EOS after each, concatenated."""
    stream = []
    for document in documents:
        stream += tokenizer.encode(document, add_special_tokens=False) + [tokenizer.eos_token_id]
    return stream


def reference_chunks(tokenizer, documents, length, dev=0, max_chunks=None):
    stream = token_stream(tokenizer, documents)
    chunks = [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]
    train = chunks[dev:] if max_chunks is None else chunks[dev : dev + max_chunks]
    return chunks[:dev], train


def read_split(folder, split="train"):
    chunks = PretrainChunks(folder, split)
    return [chunks[i] for i in range(len(chunks))]


def write_corpus(path, documents):
    path.write_text("".join(document + "\n" for document in documents), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------
# Streaming preparation against the in-memory reference.


@pytest.mark.parametrize("batch_chars", [1, 60, 1 << 20])
def test_streamed_chunks_equal_the_in_memory_reference_token_for_token(tiny_tokenizer, tmp_path, batch_chars):
    documents = corpus_documents()
    corpus = write_corpus(tmp_path / "corpus.txt", documents)
    out = tmp_path / "prepared"
    meta = pack_corpus(TextCorpus([corpus]), tiny_tokenizer, out, 7, dev_chunks=3, batch_chars=batch_chars)
    dev, train = reference_chunks(tiny_tokenizer, documents, 7, dev=3)
    assert read_split(out, "dev") == dev and read_split(out) == train
    assert meta["documents"] == len(documents)
    assert meta["tokens"] == len(token_stream(tiny_tokenizer, documents))
    assert meta["dtype"] == "uint16"  # the tiny vocabulary fits
    assert (out / "train.bin").stat().st_size == len(train) * 7 * 2  # raw uint16, nothing else


def test_max_chunks_counts_train_chunks_after_the_dev_chunks_exactly(tiny_tokenizer, tmp_path):
    documents = corpus_documents()
    corpus = write_corpus(tmp_path / "corpus.txt", documents)
    meta = pack_corpus(TextCorpus([corpus]), tiny_tokenizer, tmp_path / "a", 5, dev_chunks=2, max_chunks=3)
    dev, train = reference_chunks(tiny_tokenizer, documents, 5, dev=2, max_chunks=3)
    assert len(dev) == 2 and len(train) == 3
    assert read_split(tmp_path / "a", "dev") == dev and read_split(tmp_path / "a") == train
    assert (meta["train_chunks"], meta["dev_chunks"]) == (3, 2)
    # The corpus runs out before the cap: everything there is, no more.
    available = len(token_stream(tiny_tokenizer, documents)) // 5 - 2
    meta = pack_corpus(
        TextCorpus([corpus]), tiny_tokenizer, tmp_path / "b", 5, dev_chunks=2, max_chunks=10**6
    )
    assert meta["train_chunks"] == available


def test_the_original_newline_marker_becomes_a_newline(tiny_tokenizer, tmp_path):
    corpus = tmp_path / "data.txt"
    corpus.write_text(f"alpha beta{NEWLINE_MARKER}gamma delta{NEWLINE_MARKER}{NEWLINE_MARKER}one two\n")
    pack_corpus(TextCorpus([corpus]), tiny_tokenizer, tmp_path / "out", 2)
    expected = token_stream(tiny_tokenizer, ["alpha beta\ngamma delta\n\none two"])
    got = [token for chunk in read_split(tmp_path / "out") for token in chunk]
    assert got == expected[: len(got)] and len(got) == len(expected) // 2 * 2
    assert "<@x" not in tiny_tokenizer.decode(got)


def test_gzip_files_and_folders_read_like_plain_text(tiny_tokenizer, tmp_path):
    documents = corpus_documents(12)
    with gzip.open(tmp_path / "corpus.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(documents[:6]) + "\n")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text(documents[7])
    (folder / "a.txt").write_text(documents[6])
    with gzip.open(folder / "sub" / "c.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write(documents[8])
    (folder / "notes.md").write_text("not part of the corpus")
    corpus = TextCorpus([tmp_path / "corpus.txt.gz", folder])  # the line file first, then a, b, sub/c
    pack_corpus(corpus, tiny_tokenizer, tmp_path / "out", 3)
    assert read_split(tmp_path / "out") == reference_chunks(tiny_tokenizer, documents[:9], 3)[1]


def test_a_hub_dataset_is_read_in_streaming_mode(tiny_tokenizer, tmp_path, monkeypatch):
    import datasets

    documents = corpus_documents(20)
    calls = []

    def fake_load_dataset(name, split=None, streaming=False, **kwargs):
        calls.append((name, split, streaming))
        return datasets.Dataset.from_dict({"text": documents, "url": ["u"] * 20}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pack_corpus(
        HubCorpus.parse("someone/openwebtext:train"), tiny_tokenizer, tmp_path / "out", 6, dev_chunks=1
    )
    assert calls == [("someone/openwebtext", "train", True)]
    dev, train = reference_chunks(tiny_tokenizer, documents, 6, dev=1)
    assert read_split(tmp_path / "out", "dev") == dev and read_split(tmp_path / "out") == train
    with pytest.raises(UserError, match=r"no field 'content' \(fields: text, url\); pass --text-field"):
        pack_corpus(HubCorpus.parse("someone/openwebtext", "content"), tiny_tokenizer, tmp_path / "o2", 6)


def test_a_vocabulary_above_65536_is_stored_as_uint32():
    assert pretrain_module.token_dtype(65536) == np.uint16
    assert pretrain_module.token_dtype(65537) == np.uint32
    assert pretrain_module.token_dtype(151_646) == np.uint32


def test_collated_chunks_are_shifted_language_model_batches():
    batch = collate_chunks([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 6, 7]]
    assert batch["labels"].tolist() == [[2, 3, 4], [6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    assert PretrainChunks.collate([[1, 2, 3, 4]])["labels"].tolist() == [[2, 3, 4]]


def test_the_command_line_prepares_a_folder_training_loads(
    tiny_tokenizer_dir, tiny_tokenizer, tmp_path, capsys
):
    documents = corpus_documents()
    corpus = write_corpus(tmp_path / "corpus.txt", documents)
    out = tmp_path / "owt"
    argv = [
        "prepare-pretrain",
        "--text",
        str(corpus),
        "--tokenizer",
        str(tiny_tokenizer_dir),
        "--out",
        str(out),
    ]
    assert main([*argv, "--chunk-length", "8", "--dev-chunks", "2", "--max-chunks", "4"]) == 0
    assert "wrote 4 train + 2 dev chunks of 8 uint16 tokens" in capsys.readouterr().out
    chunks = load_pretrain(out, tiny_tokenizer)
    assert isinstance(chunks, PretrainChunks) and chunks.chunk_length == 8
    assert [chunks[i] for i in range(len(chunks))] == reference_chunks(tiny_tokenizer, documents, 8, 2, 4)[1]
    assert main([*argv, "--chunk-length", "8"]) == 2  # exists: refused without --force
    assert "already exists and is not empty; pass --force" in capsys.readouterr().err
    assert main([*argv, "--chunk-length", "8", "--force"]) == 0
    assert len(load_pretrain(out, tiny_tokenizer)) == len(reference_chunks(tiny_tokenizer, documents, 8)[1])


# --------------------------------------------------------------------------------------------------------
# The on-the-fly cache for a small text file (data.pretrain = a .txt).


def test_the_packed_corpus_is_reused_until_the_corpus_changes(tiny_tokenizer, tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.txt", DOCS)
    first = prepare_pretrain(corpus, tiny_tokenizer, 4, tmp_path / "cache")
    assert [first[i] for i in range(len(first))] == reference_chunks(tiny_tokenizer, DOCS, 4)[1]
    monkeypatch.setattr(pretrain_module, "pack_corpus", lambda *a, **k: pytest.fail("packed again"))
    again = load_pretrain(corpus, tiny_tokenizer, 4, tmp_path / "cache")
    assert again.from_cache and again.folder == first.folder
    monkeypatch.undo()
    write_corpus(corpus, list(reversed(DOCS)))
    changed = prepare_pretrain(corpus, tiny_tokenizer, 4, tmp_path / "cache")
    assert not changed.from_cache and changed.folder != first.folder


def test_the_content_hash_covers_bytes_beyond_the_first_piece(tmp_path):
    corpus = tmp_path / "big.txt"
    body = bytearray(b"alpha beta\n" * 200_000)  # 2.2 MB: three 1 MiB pieces
    corpus.write_bytes(bytes(body))
    before = TextCorpus([corpus]).content_hash()
    body[-3] = ord("x")
    corpus.write_bytes(bytes(body))
    assert TextCorpus([corpus]).content_hash() != before


# --------------------------------------------------------------------------------------------------------
# Interrupted preparations: nothing training accepts is left behind, and a rerun finishes.


_KILLER = """
import os, signal, sys
from transformers import AutoTokenizer
import distillm.data.pretrain as pretrain
from distillm.data.corpus import TextCorpus

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
calls = [0]
add = pretrain._ChunkWriter.add

def add_then_die(self, stream):
    calls[0] += 1
    if calls[0] == 7:  # after the checkpoint of batch 6: bytes past it, then a kill no handler sees
        self.files["train"].write(b"written after the checkpoint")
        self.files["train"].flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return add(self, stream)

pretrain._ChunkWriter.add = add_then_die
pretrain.pack_corpus(
    TextCorpus([sys.argv[2]]), tokenizer, sys.argv[3], 6, dev_chunks=2, batch_chars=40, checkpoint_every=3
)
"""


def _count_encoded(monkeypatch):
    """Spy on the batch encoder: how many documents a preparation encodes."""
    encoded = [0]
    real = pretrain_module.batch_encoder

    def counting(tokenizer):
        encode = real(tokenizer)

        def wrapped(documents):
            encoded[0] += len(documents)
            return encode(documents)

        return wrapped

    monkeypatch.setattr(pretrain_module, "batch_encoder", counting)
    return encoded


def test_a_killed_preparation_leaves_nothing_training_accepts_and_a_rerun_resumes_it(
    tiny_tokenizer_dir, tiny_tokenizer, tmp_path, monkeypatch
):
    documents = corpus_documents(60)
    corpus = write_corpus(tmp_path / "corpus.txt", documents)
    out = tmp_path / "owt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    killed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILLER), str(tiny_tokenizer_dir), str(corpus), str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    partial = tmp_path / ".owt.partial"
    assert not out.exists() and partial.is_dir() and not (partial / "meta.json").exists()
    with pytest.raises(UserError, match="unfinished `distillm prepare-pretrain`.*run the same command again"):
        load_pretrain(partial, tiny_tokenizer)
    with pytest.raises(UserError):
        PretrainChunks(partial)
    saved = json.loads((partial / "progress.json").read_text())
    assert saved["stats"]["documents"] > 0

    encoded = _count_encoded(monkeypatch)
    pack_corpus(
        TextCorpus([corpus]), tiny_tokenizer, out, 6, dev_chunks=2, batch_chars=40, checkpoint_every=3
    )
    assert encoded[0] == len(documents) - saved["stats"]["documents"]  # resumed, not redone
    dev, train = reference_chunks(tiny_tokenizer, documents, 6, dev=2)
    assert read_split(out, "dev") == dev and read_split(out) == train
    assert not partial.exists() and not (out / "progress.json").exists()


@pytest.mark.parametrize("source", ["text", "gzip", "hub"])
def test_a_preparation_that_fails_mid_way_resumes_to_the_same_chunks(
    tiny_tokenizer, tmp_path, monkeypatch, source
):
    import datasets

    documents = corpus_documents(50)
    corpus_file = write_corpus(tmp_path / "corpus.txt", documents)
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda *a, **k: datasets.Dataset.from_dict({"text": documents}).to_iterable_dataset(),
    )

    with gzip.open(tmp_path / "corpus.txt.gz", "wb") as handle:
        handle.write(corpus_file.read_bytes())

    def corpus():  # a gzip'd file resumes at its uncompressed offset, a hub stream by skipping rows
        if source == "hub":
            return HubCorpus.parse("local/corpus")
        return TextCorpus([corpus_file if source == "text" else tmp_path / "corpus.txt.gz"])

    settings = {"dev_chunks": 1, "max_chunks": 12, "batch_chars": 30, "checkpoint_every": 2}
    add, calls = pretrain_module._ChunkWriter.add, [0]

    def add_then_fail(self, stream):
        calls[0] += 1
        if calls[0] == 6:
            raise OSError("disk full")
        return add(self, stream)

    monkeypatch.setattr(pretrain_module._ChunkWriter, "add", add_then_fail)
    with pytest.raises(OSError, match="disk full"):
        pack_corpus(corpus(), tiny_tokenizer, tmp_path / "out", 5, **settings)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(pretrain_module._ChunkWriter, "add", add)
    encoded = _count_encoded(monkeypatch)
    pack_corpus(corpus(), tiny_tokenizer, tmp_path / "out", 5, **settings)
    assert 0 < encoded[0] < len(documents)
    dev, train = reference_chunks(tiny_tokenizer, documents, 5, dev=1, max_chunks=12)
    assert read_split(tmp_path / "out", "dev") == dev and read_split(tmp_path / "out") == train


def test_a_rerun_with_other_settings_starts_over(tiny_tokenizer, tmp_path, monkeypatch):
    documents = corpus_documents(30)
    corpus = write_corpus(tmp_path / "corpus.txt", documents)
    add = pretrain_module._ChunkWriter.add
    monkeypatch.setattr(
        pretrain_module._ChunkWriter, "add", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    with pytest.raises(KeyboardInterrupt):
        pack_corpus(
            TextCorpus([corpus]), tiny_tokenizer, tmp_path / "out", 5, batch_chars=30, checkpoint_every=1
        )
    monkeypatch.setattr(pretrain_module._ChunkWriter, "add", add)
    pack_corpus(TextCorpus([corpus]), tiny_tokenizer, tmp_path / "out", 4)  # another chunk length
    assert read_split(tmp_path / "out") == reference_chunks(tiny_tokenizer, documents, 4)[1]


def test_a_damaged_prepared_folder_is_refused(tiny_tokenizer, tmp_path):
    write_corpus(tmp_path / "corpus.txt", corpus_documents())
    pack_corpus(TextCorpus([tmp_path / "corpus.txt"]), tiny_tokenizer, tmp_path / "out", 5)
    with open(tmp_path / "out" / "train.bin", "r+b") as handle:
        handle.truncate(6)
    # The folder's manifest (docs/faults.md) catches it first, naming the file and both sizes.
    with pytest.raises(UserError, match=r"out is damaged: .*train.bin: 6 bytes, the manifest says \d+"):
        PretrainChunks(tmp_path / "out")


# --------------------------------------------------------------------------------------------------------
# Bad input.


def test_an_empty_corpus_or_one_shorter_than_a_chunk_is_an_error(tiny_tokenizer, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n   \n\n")
    with pytest.raises(UserError, match="corpus.txt holds no documents"):
        pack_corpus(TextCorpus([corpus]), tiny_tokenizer, tmp_path / "out", 4)
    corpus.write_text("alpha\n")
    with pytest.raises(UserError, match="not enough for 0 dev chunks and one train chunk of 512 tokens"):
        prepare_pretrain(corpus, tiny_tokenizer, 512, tmp_path / "cache")
    with pytest.raises(UserError, match="no such pretraining corpus"):
        prepare_pretrain(tmp_path / "missing.txt", tiny_tokenizer, 4, tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .txt or .txt.gz files"):
        TextCorpus([tmp_path / "empty"])
    assert not (tmp_path / "out").exists() and list((tmp_path / "cache").iterdir()) == []


def test_a_line_that_is_not_utf8_is_refused_with_file_and_line_or_skipped_and_counted(
    tiny_tokenizer, tmp_path
):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"alpha beta gamma\nbad \xff byte\none two three\n")
    with pytest.raises(UserError, match=r"corpus.txt:2: bytes that are not valid UTF-8.*--skip-invalid-utf8"):
        pack_corpus(TextCorpus([corpus]), tiny_tokenizer, tmp_path / "out", 2)
    meta = pack_corpus(TextCorpus([corpus], skip_invalid=True), tiny_tokenizer, tmp_path / "out", 2)
    assert meta["invalid_lines_skipped"] == 1 and meta["first_invalid_line"].endswith("corpus.txt:2")
    expected = reference_chunks(tiny_tokenizer, ["alpha beta gamma", "one two three"], 2)[1]
    assert read_split(tmp_path / "out") == expected
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"fine\nalso fine\n\xfe\n")
    with pytest.raises(UserError, match=r"a.txt:3: bytes that are not valid UTF-8"):
        pack_corpus(TextCorpus([folder]), tiny_tokenizer, tmp_path / "out2", 2)


def test_a_tokenizer_without_eos_is_an_error(tiny_tokenizer, tmp_path):
    import copy

    write_corpus(tmp_path / "corpus.txt", DOCS)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.eos_token = None
    with pytest.raises(UserError, match="has no EOS token, which separates the packed documents"):
        pack_corpus(TextCorpus([tmp_path / "corpus.txt"]), tokenizer, tmp_path / "out", 4)


def test_a_chunk_longer_than_the_models_positions_is_refused(tiny_student_dir, tmp_path, capsys):
    write_corpus(tmp_path / "corpus.txt", DOCS)
    positions = json.loads((tiny_student_dir / "config.json").read_text())["n_positions"]
    argv = ["prepare-pretrain", "--text", str(tmp_path / "corpus.txt"), "--tokenizer", str(tiny_student_dir)]
    assert main([*argv, "--out", str(tmp_path / "out"), "--chunk-length", str(positions + 2)]) == 2
    error = capsys.readouterr().err
    assert f"gives inputs of {positions + 1} tokens, more than the {positions} positions" in error
    assert f"use a chunk length of {positions + 1} or less" in error and not (tmp_path / "out").exists()


def test_a_prepared_folder_made_with_another_vocabulary_is_refused(tiny_tokenizer, tmp_path):
    write_corpus(tmp_path / "corpus.txt", corpus_documents())
    pack_corpus(TextCorpus([tmp_path / "corpus.txt"]), tiny_tokenizer, tmp_path / "out", 5)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    meta["vocab_size"] = 50257
    (tmp_path / "out" / "meta.json").write_text(json.dumps(meta))
    write_manifest(tmp_path / "out")  # as a folder really prepared with that tokenizer would be
    with pytest.raises(UserError, match=rf"a tokenizer of 50257 tokens .* has {len(tiny_tokenizer)} tokens"):
        load_pretrain(tmp_path / "out", tiny_tokenizer)


# --------------------------------------------------------------------------------------------------------
# The presets that use the LM term.

_PAPER_CHUNKS = {"gpt2": 10_000_000, "opt": 1_000_000, "openllama2": 1_000_000}  # method reference, 3.1


@pytest.mark.parametrize("family", sorted(_PAPER_CHUNKS))
def test_presets_with_the_lm_term_point_at_the_folder_their_header_command_prepares_at_the_papers_size(
    family,
):
    import argparse
    import shlex
    from pathlib import Path

    from distillm.config import load_config

    presets = sorted((Path(__file__).resolve().parent.parent / "configs" / family).glob("*.yaml"))
    using = [(path, load_config(path)) for path in presets]
    using = [(path, config) for path, config in using if config.objective.lm_coef > 0]
    assert using, f"no {family} preset uses the LM term"
    parser = argparse.ArgumentParser()
    pretrain_module.add_arguments(parser)
    for path, config in using:
        header = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
        start = next(i for i, line in enumerate(header) if line.startswith("distillm prepare-pretrain"))
        command = " ".join(line.rstrip("\\").strip() for line in header[start : start + 2])
        args = parser.parse_args(shlex.split(command)[2:])  # a command the real parser accepts
        assert args.out == config.data.pretrain, path
        assert (args.max_chunks, args.dev_chunks, args.chunk_length) == (
            _PAPER_CHUNKS[family],
            10_000,
            512,
        ), path
        assert args.dataset == "openwebtext" and args.chunk_length <= config.data.max_length, path
