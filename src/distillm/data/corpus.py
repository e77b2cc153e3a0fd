"""Streaming documents for the pretraining corpus: text files, folders, gzip'd text, hub datasets.

A corpus yields one document (a ``str``) at a time and never holds more than one document in memory. It
also keeps its ``position`` (a small JSON-able dict, updated before each document is yielded), so an
interrupted preparation can reopen it exactly after the last document it packed:

| source                             | document                              | position                     |
|------------------------------------|---------------------------------------|------------------------------|
| a text file (``.gz``: gzip'd)      | each non-blank line                   | file, byte offset, line      |
| a folder                           | each ``.txt`` / ``.txt.gz`` file, recursively in name order | file |
| a hub dataset ``name[:split]``     | each row's text field (streaming mode) | rows read                   |

The original's ``get_openwebtext.py`` stores one document per line with its newlines replaced by
``<@x(x!>``; that marker is mapped back to a newline in every document (as its ``process_data_pretrain.py``
does), so such a file trains on the text, not on the marker.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillm.errors import UserError

logger = logging.getLogger(__name__)

NEWLINE_MARKER = "<@x(x!>"  # the original's stand-in for "\n" in its one-document-per-line dump
_HASH_PIECE = 1 << 20  # bytes hashed at a time: the content hash never holds a whole file


@dataclass
class ReadStats:
    """What a corpus read so far: documents yielded, and lines dropped because they were not UTF-8."""

    documents: int = 0
    invalid_lines: int = 0
    first_invalid: str | None = None  # "file:line" of the first dropped line, for the report


def _not_utf8(where: str) -> UserError:
    return UserError(
        f"{where}: bytes that are not valid UTF-8; save the file as UTF-8, or skip such lines "
        "(`--skip-invalid-utf8`, or `skip_invalid=True`)"
    )


def _decode_line(raw: bytes, where: str, skip_invalid: bool, stats: ReadStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if not skip_invalid:
            raise _not_utf8(where) from None
        stats.invalid_lines += 1
        stats.first_invalid = stats.first_invalid or where
        return None


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _is_document_file(path: Path) -> bool:
    return path.is_file() and (path.name.endswith(".txt") or path.name.endswith(".txt.gz"))


@dataclass
class TextCorpus:
    """Documents from text files and folders, in the order given (see the module docstring)."""

    paths: Sequence[str | Path]
    skip_invalid: bool = False
    stats: ReadStats = field(default_factory=ReadStats)
    position: dict[str, int] = field(default_factory=lambda: {"entry": 0, "offset": 0, "line": 0})

    def __post_init__(self) -> None:
        self._entries: list[tuple[Path, bool]] = []  # (file, whether each line is a document)
        if not self.paths:
            raise UserError("no pretraining corpus given; pass text files or folders of .txt files")
        for raw in self.paths:
            path = Path(raw)
            if not path.exists():
                raise UserError(
                    f"{path}: no such pretraining corpus; give a text file (one document per line), "
                    "a .gz of one, or a folder of .txt files"
                )
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if _is_document_file(p))
                if not files:
                    raise UserError(
                        f"{path} holds no .txt or .txt.gz files; give a text file (one document per line) "
                        "or a folder of such files (one document each)"
                    )
                self._entries += [(file, False) for file in files]
            else:
                self._entries.append((path, True))

    def describe(self) -> str:
        return ", ".join(str(p) for p in self.paths)

    def identity(self) -> list[Any]:
        """Cheap identity for resuming an interrupted preparation: every file's path, size and mtime."""
        return [
            [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path, _ in self._entries
        ]

    def content_hash(self) -> str:
        """SHA-256 of every file's name and bytes, read in 1 MiB pieces."""
        digest = hashlib.sha256()
        for path, per_line in self._entries:
            digest.update(f"{path.name}\0{int(per_line)}\0".encode())
            with open(path, "rb") as handle:
                while piece := handle.read(_HASH_PIECE):
                    digest.update(piece)
            digest.update(b"\0")
        return digest.hexdigest()

    def documents(self) -> Iterator[str]:
        """Documents from ``position`` on; ``position`` and ``stats`` follow what was yielded."""
        start = dict(self.position)
        for entry in range(start["entry"], len(self._entries)):
            path, per_line = self._entries[entry]
            if per_line:
                resume = start if entry == start["entry"] else {"offset": 0, "line": 0}
                yield from self._line_documents(entry, path, resume["offset"], resume["line"])
            else:
                text = self._file_document(path)
                self.position = {"entry": entry + 1, "offset": 0, "line": 0}
                if text is not None:
                    self.stats.documents += 1
                    yield text
            self.position = {"entry": entry + 1, "offset": 0, "line": 0}

    def _line_documents(self, entry: int, path: Path, offset: int, line: int) -> Iterator[str]:
        with _open_binary(path) as handle:
            if offset:
                handle.seek(offset)  # gzip seeks by decompressing forward: slow but exact
            for raw in handle:
                offset += len(raw)
                line += 1
                text = _decode_line(raw, f"{path}:{line}", self.skip_invalid, self.stats)
                if text is None:
                    continue
                text = text.rstrip("\r\n").replace(NEWLINE_MARKER, "\n")
                if not text.strip():
                    continue
                self.position = {"entry": entry, "offset": offset, "line": line}
                self.stats.documents += 1
                yield text

    def _file_document(self, path: Path) -> str | None:
        with _open_binary(path) as handle:
            raw = handle.read()  # one document: bounded by the largest document, not by the corpus
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            if not self.skip_invalid:
                line = raw[: error.start].count(b"\n") + 1
                raise _not_utf8(f"{path}:{line}") from None
            pieces = [
                _decode_line(piece, f"{path}:{number}", True, self.stats)
                for number, piece in enumerate(raw.split(b"\n"), 1)
            ]
            text = "\n".join(piece for piece in pieces if piece is not None)
        text = text.replace(NEWLINE_MARKER, "\n")
        return text if text.strip() else None


def load_streaming_dataset(name: str, split: str):
    """``datasets.load_dataset(name, split=split, streaming=True)``; tests replace this function."""
    import datasets

    return datasets.load_dataset(name, split=split, streaming=True)


@dataclass
class HubCorpus:
    """Documents from a Hugging Face dataset read in streaming mode (nothing is downloaded up front)."""

    name: str
    split: str = "train"
    text_field: str = "text"
    stats: ReadStats = field(default_factory=ReadStats)
    position: dict[str, int] = field(default_factory=lambda: {"rows": 0})

    @classmethod
    def parse(cls, spec: str, text_field: str = "text") -> HubCorpus:
        name, _, split = spec.partition(":")
        return cls(name=name, split=split or "train", text_field=text_field)

    def describe(self) -> str:
        return f"{self.name}:{self.split}"

    def identity(self) -> list[Any]:
        return [self.name, self.split, self.text_field]

    def content_hash(self) -> str:
        return hashlib.sha256(repr(self.identity()).encode()).hexdigest()

    def documents(self) -> Iterator[str]:
        try:
            stream = load_streaming_dataset(self.name, self.split)
        except Exception as error:  # the hub raises many types; the user needs the one line either way
            raise UserError(
                f"cannot stream the dataset {self.describe()} ({error}); without a network, prepare a local "
                "copy with --text"
            ) from None
        rows = self.position["rows"]
        if rows:
            stream = stream.skip(rows)  # resume: the rows already packed are not read again
        for row in stream:
            rows += 1
            if self.text_field not in row:
                raise UserError(
                    f"{self.describe()} row {rows}: no field {self.text_field!r} (fields: "
                    f"{', '.join(sorted(row))}); pass --text-field"
                )
            text = str(row[self.text_field]).replace(NEWLINE_MARKER, "\n")
            self.position = {"rows": rows}
            if text.strip():
                self.stats.documents += 1
                yield text


def open_corpus(
    text: Sequence[str | Path] | None = None,
    dataset: str | None = None,
    text_field: str = "text",
    skip_invalid: bool = False,
) -> TextCorpus | HubCorpus:
    """The corpus of ``text`` paths, or of the hub ``dataset`` (``name[:split]``); exactly one is given."""
    if bool(text) == bool(dataset):
        raise UserError("give either text files / folders (--text) or a hub dataset (--dataset), not both")
    if dataset:
        return HubCorpus.parse(dataset, text_field)
    return TextCorpus(list(text or ()), skip_invalid=skip_invalid)
