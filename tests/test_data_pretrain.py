"""Packing a plain-text corpus into fixed-length chunks for the pretraining LM term."""

from __future__ import annotations

import pytest

import distillm.data.pretrain as pretrain_module
from distillm.data import PretrainChunks, collate_chunks, prepare_pretrain
from distillm.errors import UserError

DOCS = ["alpha beta gamma delta", "apple banana cherry river mountain ocean", "one two three four five six"]


def token_stream(tokenizer, documents):
    stream = []
    for document in documents:
        stream += tokenizer.encode(document, add_special_tokens=False) + [tokenizer.eos_token_id]
    return stream


def test_documents_are_encoded_with_eos_concatenated_and_cut_into_full_chunks(tiny_tokenizer, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(DOCS[:2]) + "\n\n" + DOCS[2] + "\n")  # a blank line is not a document
    chunks = prepare_pretrain(corpus, tiny_tokenizer, chunk_length=5, cache_dir=tmp_path / "cache")
    stream = token_stream(tiny_tokenizer, DOCS)
    assert len(chunks) == len(stream) // 5 and chunks.chunk_length == 5
    assert [chunks[i] for i in range(len(chunks))] == [
        stream[i : i + 5] for i in range(0, len(chunks) * 5, 5)
    ]


def test_a_folder_of_text_files_makes_one_document_per_file_in_name_order(tiny_tokenizer, tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text(DOCS[1])
    (folder / "a.txt").write_text(DOCS[0])
    (folder / "sub" / "c.txt").write_text(DOCS[2])
    (folder / "notes.md").write_text("not part of the corpus")
    chunks = prepare_pretrain(folder, tiny_tokenizer, chunk_length=4, cache_dir=tmp_path / "cache")
    stream = token_stream(tiny_tokenizer, DOCS)  # a.txt, b.txt, sub/c.txt
    assert [token for i in range(len(chunks)) for token in chunks[i]] == stream[: len(chunks) * 4]


def test_collated_chunks_are_shifted_language_model_batches(tiny_tokenizer):
    batch = collate_chunks([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 6, 7]]
    assert batch["labels"].tolist() == [[2, 3, 4], [6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    assert PretrainChunks.collate([[1, 2, 3, 4]])["labels"].tolist() == [[2, 3, 4]]


def test_the_packed_corpus_is_reused_until_the_corpus_changes(tiny_tokenizer, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(DOCS))
    first = prepare_pretrain(corpus, tiny_tokenizer, 4, tmp_path / "cache")
    monkeypatch.setattr(pretrain_module, "pack_documents", lambda *a: pytest.fail("packed again"))
    again = prepare_pretrain(corpus, tiny_tokenizer, 4, tmp_path / "cache")
    assert again.from_cache and again.folder == first.folder
    monkeypatch.undo()
    corpus.write_text("\n".join(reversed(DOCS)))
    changed = prepare_pretrain(corpus, tiny_tokenizer, 4, tmp_path / "cache")
    assert not changed.from_cache and changed.folder != first.folder


def test_a_corpus_shorter_than_one_chunk_or_missing_or_not_utf8_is_an_error(tiny_tokenizer, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("alpha")
    with pytest.raises(UserError, match="shorter than one chunk of 512 tokens"):
        prepare_pretrain(corpus, tiny_tokenizer, 512, tmp_path / "cache")
    with pytest.raises(UserError, match="no such pretraining corpus"):
        prepare_pretrain(tmp_path / "missing.txt", tiny_tokenizer, 4, tmp_path / "cache")
    corpus.write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(UserError, match=r"corpus.txt:2: .*not valid UTF-8"):
        prepare_pretrain(corpus, tiny_tokenizer, 4, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []
