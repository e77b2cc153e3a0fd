"""Reading instruction data: JSON Lines or a JSON array, local files or hub datasets, in one of the row formats
of the ``FORMATS`` table (dolly: databricks-dolly-15k; minillm: MiniLLM / DistiLLM's processed files; alpaca;
plain prompt / response pairs), each a :class:`Format` record: its fields, detection and parsing.

``format="auto"`` picks the format from the fields of the first row; every later row must then carry the
fields that format requires. Rows whose prompt or response is empty are skipped and counted in the
:class:`ReadReport` (or rejected with ``strict=True``).
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distillm.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One instruction example, whatever file format it came from.

    ``references[0]`` is the training response; all references count for ROUGE-L. ``prompt``, when the file
    carries a ready-made prompt, is used as is instead of rendering ``instruction`` and ``input``.
    ``ground_truth``: the dataset's own responses when the training response is someone else's text (the
    teacher's, in a file written by ``distillm generate`` for SeqKD, which keeps the ground truth as
    ``reference``); empty when ``references`` are the ground truth.
    """

    instruction: str
    input: str
    references: tuple[str, ...]
    prompt: str | None
    source: str
    category: str = ""
    ground_truth: tuple[str, ...] = ()

    @property
    def response(self) -> str:
        """The training target: the first reference."""
        return self.references[0]

    def for_evaluation(self) -> Example:
        """This example scored against its ground truth: dev loss and ROUGE-L never measure against a teacher."""
        return replace(self, references=self.ground_truth, ground_truth=()) if self.ground_truth else self


@dataclass
class ReadReport:
    """What :func:`read_examples` did: rows read, kept, and skipped with the reason."""

    source: str
    format: str
    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        """A human-readable summary, one fact per line."""
        out = [f"{self.source}: format {self.format}, {self.rows_read} rows read, {self.rows_kept} kept"]
        out += [f"  skipped {count}: {reason}" for reason, count in sorted(self.skipped.items())]
        return out


# ----------------------------------------------------------------------------------------------------------
# Raw rows: (source, dict) pairs from JSON Lines, a JSON array, or a hub dataset.


def _decode_utf8(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark written by some editors
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise UserError(
            f"{path}:{line}: byte 0x{raw[error.start]:02x} at column {column} is not valid UTF-8; "
            "save the file as UTF-8"
        ) from None


def _json_lines(text: str, path: Path) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno}); "
                "each line of a JSON Lines file must hold one complete JSON object"
            ) from None


def _json_array(text: str, path: Path) -> Iterator[tuple[str, Any]]:
    """The items of a top-level JSON array, each with the line it starts on (for error messages)."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1

    def skip_space(i: int) -> int:
        while i < len(text) and text[i].isspace():
            i += 1
        return i

    def fail(i: int, what: str) -> UserError:
        line = text.count("\n", 0, i) + 1
        return UserError(
            f"{path}:{line}: malformed JSON array ({what}); fix the file or convert it to JSON Lines"
        )

    position = skip_space(position)
    if position < len(text) and text[position] == "]":
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise fail(error.pos, error.msg) from None
        yield f"{path}:{text.count(chr(10), 0, position) + 1}", item
        position = skip_space(end)
        if position >= len(text):
            raise fail(position, "the closing ']' is missing")
        if text[position] == "]":
            if skip_space(position + 1) < len(text):
                raise fail(skip_space(position + 1), "text after the closing ']'")
            return
        if text[position] != ",":
            raise fail(position, f"expected ',' or ']', found {text[position]!r}")
        position = skip_space(position + 1)


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a .jsonl or .json file")
    text = _decode_utf8(path.read_bytes(), path)
    if not text.strip():
        raise UserError(f"{path} is empty; it should hold JSON Lines (one object per line) or a JSON array")
    if text.lstrip().startswith("["):
        return _json_array(text, path)
    return _json_lines(text, path)


def _hub_rows(name: str) -> Iterator[tuple[str, Any]]:
    """Rows of a hub dataset; ``name`` or ``name:split`` (default split: train)."""
    dataset_name, _, split = name.partition(":")
    try:
        import datasets

        dataset = datasets.load_dataset(dataset_name, split=split or "train")
    except Exception as error:  # the hub raises many types; the user needs the one line either way
        raise UserError(
            f"{name} is neither a local file nor a dataset that could be loaded from the hub ({error})"
        ) from None
    for index, row in enumerate(dataset):
        yield f"{name}:{index + 1}", row


# ----------------------------------------------------------------------------------------------------------
# Formats: each turns a row (a dict) into an Example. One record per format in FORMATS.


def _text(row: Mapping[str, Any], key: str, source: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(
            f"{source}: field {key!r} should be a string, found {type(value).__name__} {value!r:.60}"
        )
    return value


def _references(row: Mapping[str, Any], key: str, source: str) -> tuple[str, ...]:
    value = row.get(key)
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise UserError(
        f"{source}: field {key!r} should be a string or a list of strings, "
        f"found {type(value).__name__} {value!r:.60}"
    )


def _parse_dolly(row: Mapping[str, Any], source: str) -> Example:
    return Example(
        instruction=_text(row, "instruction", source),
        input=_text(row, "context", source),
        references=(_text(row, "response", source),),
        prompt=None,
        source=source,
        category=_text(row, "category", source),
    )


def _parse_alpaca(row: Mapping[str, Any], source: str, prompt: str | None = None) -> Example:
    return Example(
        instruction=_text(row, "instruction", source),
        input=_text(row, "input", source),
        references=_references(row, "output", source),
        prompt=prompt or None,
        source=source,
        category=_text(row, "category", source),
        ground_truth=_references(row, "reference", source) if "reference" in row else (),
    )


def _parse_minillm(row: Mapping[str, Any], source: str) -> Example:
    prompt = _text(row, "prompt", source) if "prompt" in row else None
    if prompt is not None:
        prompt = prompt.replace("<n>", "\n")  # MiniLLM's files store the prompt's newlines as "<n>"
    return _parse_alpaca(row, source, prompt)


def _parse_plain(row: Mapping[str, Any], source: str) -> Example:
    key = "references" if "references" in row else "response"
    return Example(
        instruction="",
        input="",
        references=_references(row, key, source),
        prompt=_text(row, "prompt", source),
        source=source,
        category=_text(row, "category", source),
    )


@dataclass(frozen=True)
class Format:
    """One row format: its fields (for help and errors), the fields it requires, how it is recognised, parsed.

    ``required``: each inner tuple lists alternatives, one of which must be present. ``detects(row)``: whether
    a row is of this format, for ``format="auto"`` (tried in the order of ``FORMATS``, so a format that is a
    special case of another comes before it). ``parse(row, source)``: the row as an Example.
    """

    name: str
    fields: str
    required: tuple[tuple[str, ...], ...]
    detects: Callable[[Mapping[str, Any]], bool]
    parse: Callable[[Mapping[str, Any], str], Example]


# To add a format: write its parse function above and its record here (then test_data_formats.py's
# ROUND_TRIPS gets one row of it). Detection, --format choices and every help text read this table.
FORMATS: dict[str, Format] = {
    format.name: format
    for format in (
        Format(
            name="dolly",
            fields="instruction, context, response, category",
            required=(("instruction",), ("response",)),
            detects=lambda row: "instruction" in row and "response" in row,
            parse=_parse_dolly,
        ),
        Format(
            # MiniLLM's processed files differ from Alpaca by a ready-made prompt or a list of references.
            name="minillm",
            fields="instruction, input, output (string or list), optional prompt",
            required=(("instruction",), ("output",)),
            detects=lambda row: (
                "instruction" in row
                and "output" in row
                and ("prompt" in row or isinstance(row["output"], list))
            ),
            parse=_parse_minillm,
        ),
        Format(
            name="alpaca",
            fields="instruction, input, output",
            required=(("instruction",), ("output",)),
            detects=lambda row: "instruction" in row and "output" in row,
            parse=_parse_alpaca,
        ),
        Format(
            name="plain",
            fields="prompt, response (or references, a list)",
            required=(("prompt",), ("response", "references")),
            detects=lambda row: "prompt" in row and ("response" in row or "references" in row),
            parse=_parse_plain,
        ),
    )
}
"""Name -> :class:`Format`, in detection order."""


def format_choices(last: str = " or ") -> str:
    """``auto, dolly, minillm, alpaca or plain``: the values ``--format`` / ``data.format`` accept, for help."""
    names = ["auto", *FORMATS]
    return ", ".join(names[:-1]) + last + names[-1]


def detect_format(row: Mapping[str, Any], source: str) -> str:
    """The format whose fields ``row`` carries; raises UserError naming the fields found otherwise."""
    for format in FORMATS.values():
        if format.detects(row):
            return format.name
    expected = "; ".join(f"{format.name} ({format.fields})" for format in FORMATS.values())
    raise UserError(
        f"{source}: cannot tell the data format from the fields found ({', '.join(sorted(row)) or 'none'}); "
        f"expected one of: {expected}. Rename the fields or pass --format"
    )


def _check_fields(row: Mapping[str, Any], format: str, source: str) -> None:
    for alternatives in FORMATS[format].required:
        if not any(key in row for key in alternatives):
            wanted = " or ".join(repr(key) for key in alternatives)
            raise UserError(
                f"{source}: missing field {wanted} required by the {format} format "
                f"(fields found: {', '.join(sorted(row)) or 'none'})"
            )


def _parse_row(row: Mapping[str, Any], format: str, source: str) -> Example:
    _check_fields(row, format, source)
    return FORMATS[format].parse(row, source)


def _skip_reason(example: Example) -> str | None:
    has_prompt = bool((example.prompt or "").strip()) or bool(example.instruction.strip())
    if not has_prompt:
        return "empty prompt (no instruction)"
    if not any(reference.strip() for reference in example.references):
        return "empty response"
    return None


def _drop_empty_references(example: Example) -> Example:
    references = tuple(reference for reference in example.references if reference.strip())
    if references == example.references:
        return example
    return replace(example, references=references)


def read_examples(
    path_or_name: str, format: str = "auto", strict: bool = False
) -> tuple[list[Example], ReadReport]:
    """Read instruction examples from a JSON Lines file, a JSON array file, or a hub dataset name.

    A local path is read when it exists; otherwise ``path_or_name`` (``name`` or ``name:split``) goes to
    ``datasets.load_dataset``. Raises UserError naming the file and line for malformed JSON, a missing field
    (listing the fields found), non-UTF-8 bytes, an empty file or an unknown format. Rows with an empty
    prompt or response are skipped and counted in the report, or raise with ``strict=True``.
    """
    if format != "auto" and format not in FORMATS:
        raise UserError(f"unknown data format {format!r}; use one of: auto, {', '.join(FORMATS)}")
    path = Path(path_or_name)
    if path.exists():
        rows = _file_rows(path)
    elif _looks_like_a_path(path_or_name):
        raise UserError(f"{path_or_name}: no such file; check the path")
    else:
        rows = _hub_rows(path_or_name)

    report = ReadReport(source=str(path_or_name), format=format)
    examples: list[Example] = []
    for source, row in rows:
        if not isinstance(row, Mapping):
            raise UserError(f"{source}: expected a JSON object with named fields, found {type(row).__name__}")
        if report.format == "auto":
            report.format = detect_format(row, source)
            logger.info("%s: detected the %s format", path_or_name, report.format)
        report.rows_read += 1
        example = _parse_row(row, report.format, source)
        reason = _skip_reason(example)
        if reason is not None:
            if strict:
                raise UserError(f"{source}: {reason}; fix the row, or drop --strict to skip such rows")
            report.skipped[reason] += 1
            continue
        examples.append(_drop_empty_references(example))
    if report.rows_read == 0:
        raise UserError(
            f"{path_or_name} holds no rows; it should hold JSON objects (one per line, or an array)"
        )
    report.rows_kept = len(examples)
    return examples, report


def _looks_like_a_path(name: str) -> bool:
    """A missing local file, rather than a hub name: it has a file extension or starts like a path."""
    return name.startswith((".", "/", "~")) or name.endswith((".json", ".jsonl", ".txt")) or "\\" in name


# ----------------------------------------------------------------------------------------------------------


def split_dev(
    examples: Sequence[Example], dev_size: int, how: str = "first", seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Take ``dev_size`` examples out of the training pool: ``(train, dev)``.

    ``how="first"`` takes the first rows as dev (what the original code does with ``--dev-num 1000``);
    ``how="random"`` takes a sample drawn with ``seed``. Both keep the pool's order within each split.
    """
    if dev_size < 0:
        raise UserError(f"dev_size={dev_size} is invalid: must be >= 0")
    if dev_size >= len(examples) and dev_size > 0:
        raise UserError(
            f"dev_size={dev_size} leaves no training examples out of {len(examples)}; lower data.dev_size"
        )
    if how == "first":
        dev_indices = set(range(dev_size))
    elif how == "random":
        dev_indices = set(random.Random(seed).sample(range(len(examples)), dev_size))
    else:
        raise UserError(f"dev split how={how!r} is invalid: use 'first' or 'random'")
    train = [example for i, example in enumerate(examples) if i not in dev_indices]
    dev = [example for i, example in enumerate(examples) if i in dev_indices]
    return train, dev
