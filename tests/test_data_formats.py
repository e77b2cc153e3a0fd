"""Reading instruction data: every format, JSON Lines and arrays, skipped rows, every bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from distillm.data import Example, read_examples, split_dev
from distillm.data.formats import FORMATS, format_choices
from distillm.errors import UserError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_dolly_rows_become_examples_with_context_as_input(tmp_path):
    path = write_jsonl(
        tmp_path / "dolly.jsonl",
        [
            {"instruction": "Name a fruit.", "context": "", "response": "apple", "category": "open_qa"},
            {
                "instruction": "Summarise.",
                "context": "A long text.",
                "response": "Short.",
                "category": "summarization",
            },
        ],
    )
    examples, report = read_examples(str(path))
    assert report.format == "dolly"
    assert (report.rows_read, report.rows_kept, sum(report.skipped.values())) == (2, 2, 0)
    assert examples[0] == Example("Name a fruit.", "", ("apple",), None, f"{path}:1", "open_qa")
    assert examples[1] == Example(
        "Summarise.", "A long text.", ("Short.",), None, f"{path}:2", "summarization"
    )


def test_minillm_rows_keep_every_reference_and_restore_newlines_in_the_prompt(tmp_path):
    path = write_jsonl(
        tmp_path / "valid.jsonl",
        [
            {"instruction": "Say hi.", "input": "", "output": ["hi", "hello"], "prompt": "P:<n>Say hi.<n>"},
            {"instruction": "Add.", "input": "1 2", "output": "3"},
        ],
    )
    examples, report = read_examples(str(path))
    assert report.format == "minillm"
    assert examples[0].references == ("hi", "hello")
    assert examples[0].response == "hi"
    assert examples[0].prompt == "P:\nSay hi.\n"
    assert examples[1] == Example("Add.", "1 2", ("3",), None, f"{path}:2")


def test_alpaca_rows_are_detected_when_there_is_no_prompt_and_output_is_a_string(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add.", "input": "1 2", "output": "3"}])
    examples, report = read_examples(str(path))
    assert report.format == "alpaca"
    assert examples == [Example("Add.", "1 2", ("3",), None, f"{path}:1")]


def test_plain_rows_use_the_prompt_as_is_with_a_response_or_a_list_of_references(tmp_path):
    path = write_jsonl(
        tmp_path / "plain.jsonl",
        [
            {"prompt": "Q: 1+1?\nA:", "response": " 2"},
            {"prompt": "Q: hi\nA:", "references": ["hello", "hey"]},
        ],
    )
    examples, report = read_examples(str(path))
    assert report.format == "plain"
    assert examples[0].prompt == "Q: 1+1?\nA:" and examples[0].references == (" 2",)
    assert examples[1].references == ("hello", "hey")


def test_a_json_array_reads_like_json_lines_and_sources_name_the_line_each_item_starts_on(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(
        '[\n  {"instruction": "a", "input": "", "output": "b"},\n\n  {"instruction": "c", "input": "", "output": "d"}\n]\n'
    )
    examples, report = read_examples(str(path))
    assert [example.instruction for example in examples] == ["a", "c"]
    assert [example.source for example in examples] == [f"{path}:2", f"{path}:4"]
    assert report.rows_read == 2


def test_an_empty_json_array_is_an_error_saying_there_are_no_rows(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("[ ]")
    with pytest.raises(UserError, match="no rows"):
        read_examples(str(path))


def test_a_named_format_overrides_detection(tmp_path):
    # These rows would be detected as minillm (they have a prompt); as alpaca the prompt is ignored.
    path = write_jsonl(
        tmp_path / "x.jsonl", [{"instruction": "i", "input": "", "output": "o", "prompt": "p"}]
    )
    examples, report = read_examples(str(path), format="alpaca")
    assert report.format == "alpaca" and examples[0].prompt is None


def test_blank_lines_and_a_byte_order_mark_are_tolerated(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "response": "r"}\n\n{"prompt": "q", "response": "s"}\n')
    examples, report = read_examples(str(path))
    assert [example.prompt for example in examples] == ["p", "q"]
    assert examples[1].source == f"{path}:3"


def test_rows_with_an_empty_prompt_or_response_are_skipped_and_counted(tmp_path):
    path = write_jsonl(
        tmp_path / "x.jsonl",
        [
            {"instruction": "ok", "context": "", "response": "fine"},
            {"instruction": "  ", "context": "c", "response": "r"},
            {"instruction": "q", "context": "", "response": ""},
            {"instruction": "q2", "context": "", "response": " \n"},
        ],
    )
    examples, report = read_examples(str(path))
    assert [example.instruction for example in examples] == ["ok"]
    assert (report.rows_read, report.rows_kept) == (4, 1)
    assert report.skipped == {"empty prompt (no instruction)": 1, "empty response": 2}
    assert any("skipped 2: empty response" in line for line in report.lines())


def test_empty_references_are_dropped_but_the_row_is_kept_when_one_remains(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "i", "input": "", "output": ["", "yes"]}])
    examples, _ = read_examples(str(path))
    assert examples[0].references == ("yes",)


def test_strict_mode_rejects_an_empty_response_naming_its_line(tmp_path):
    path = write_jsonl(
        tmp_path / "x.jsonl",
        [
            {"instruction": "a", "context": "", "response": "b"},
            {"instruction": "a", "context": "", "response": ""},
        ],
    )
    with pytest.raises(UserError, match=rf"{path}:2: empty response"):
        read_examples(str(path), strict=True)


def test_a_malformed_json_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": \n')
    with pytest.raises(UserError, match=rf"{path}:2: malformed JSON"):
        read_examples(str(path))


def test_a_malformed_json_array_names_the_line_of_the_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[\n{"prompt": "p", "response": "r"},\n{"prompt": "p" "response": "r"}\n]')
    with pytest.raises(UserError, match=rf"{path}:3: malformed JSON array"):
        read_examples(str(path))


def test_a_missing_field_names_the_field_the_line_and_the_fields_found(tmp_path):
    path = write_jsonl(
        tmp_path / "x.jsonl",
        [
            {"instruction": "a", "context": "", "response": "b"},
            {"instruction": "a", "context": "", "answer": "b"},
        ],
    )
    with pytest.raises(UserError) as error:
        read_examples(str(path))
    message = str(error.value)
    assert f"{path}:2" in message and "'response'" in message and "answer, context, instruction" in message


def test_rows_whose_fields_match_no_format_are_an_error_listing_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(
        UserError, match=r"x.jsonl:1: cannot tell the data format .*answer, question.*--format"
    ):
        read_examples(str(path))


def test_non_utf8_bytes_are_an_error_naming_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "caf\xe9", "response": "r"}\n')
    with pytest.raises(UserError, match=rf"{path}:2: byte 0xe9 .* not valid UTF-8"):
        read_examples(str(path))


def test_an_empty_file_is_an_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(UserError, match="is empty"):
        read_examples(str(path))


def test_an_unknown_format_name_is_an_error_listing_the_known_ones(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(UserError, match="unknown data format 'sharegpt'.*dolly, minillm, alpaca, plain"):
        read_examples(str(path), format="sharegpt")


def test_a_missing_local_file_is_an_error_and_not_a_hub_lookup(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_examples(str(tmp_path / "missing.jsonl"))


def test_a_row_that_is_not_an_object_or_a_field_of_the_wrong_type_is_an_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('["prompt", "response"]\n')
    with pytest.raises(UserError, match=rf"{path}:1: expected a JSON object"):
        read_examples(str(path))
    write_jsonl(path, [{"instruction": "i", "input": "", "output": 3}])
    with pytest.raises(UserError, match=r"x.jsonl:1: field 'output' should be a string or a list of strings"):
        read_examples(str(path))


def examples_numbered(n):
    return [Example(f"i{k}", "", (f"r{k}",), None, f"f:{k}") for k in range(n)]


def test_the_first_dev_split_takes_the_first_rows_like_the_original():
    pool = examples_numbered(10)
    train, dev = split_dev(pool, 3, how="first")
    assert dev == pool[:3] and train == pool[3:]


def test_the_random_dev_split_is_a_seeded_disjoint_sample_that_keeps_the_order():
    pool = examples_numbered(50)
    train, dev = split_dev(pool, 10, how="random", seed=1)
    assert len(dev) == 10 and len(train) == 40
    assert sorted(train + dev, key=pool.index) == pool  # disjoint, nothing lost
    assert dev == sorted(dev, key=pool.index) and train == sorted(train, key=pool.index)
    assert split_dev(pool, 10, how="random", seed=1) == (train, dev)
    assert split_dev(pool, 10, how="random", seed=2)[1] != dev


def test_a_dev_split_that_leaves_no_training_rows_or_an_unknown_method_is_an_error():
    with pytest.raises(UserError, match="leaves no training examples"):
        split_dev(examples_numbered(3), 3)
    with pytest.raises(UserError, match="'last'"):
        split_dev(examples_numbered(3), 1, how="last")
    assert split_dev(examples_numbered(3), 0) == (examples_numbered(3), [])


# ---- the FORMATS table -----------------------------------------------------------------------------------------

# format -> (a row of it, the example it reads as, its source aside): a new format adds one entry.
ROUND_TRIPS = {
    "dolly": (
        {"instruction": "Sort.", "context": "b a", "response": "a b", "category": "c"},
        Example("Sort.", "b a", ("a b",), None, "", "c"),
    ),
    "minillm": (
        {"instruction": "Sort.", "input": "b a", "output": ["a b", "ab"], "prompt": "S:<n>b a"},
        Example("Sort.", "b a", ("a b", "ab"), "S:\nb a", ""),
    ),
    "alpaca": (
        {"instruction": "Sort.", "input": "b a", "output": "a b", "reference": "a  b"},
        Example("Sort.", "b a", ("a b",), None, "", ground_truth=("a  b",)),
    ),
    "plain": (
        {"prompt": "Sort: b a\n", "references": ["a b"], "category": "c"},
        Example("", "", ("a b",), "Sort: b a\n", "", "c"),
    ),
}


def test_every_format_has_a_round_trip_row():
    assert set(ROUND_TRIPS) == set(FORMATS), "add a row of the new format to ROUND_TRIPS"


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_is_detected_from_its_row_and_parsed_into_its_example(tmp_path, name):
    row, expected = ROUND_TRIPS[name]
    path = write_jsonl(tmp_path / "x.jsonl", [row, row])
    for format in ("auto", name):
        examples, report = read_examples(str(path), format=format)
        assert report.format == name
        assert examples == [replace(expected, source=f"{path}:{line}") for line in (1, 2)]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_required_field_of_every_format_is_reported_missing_by_name(tmp_path, name):
    row, _ = ROUND_TRIPS[name]
    for alternatives in FORMATS[name].required:
        partial_row = {key: value for key, value in row.items() if key not in alternatives}
        path = write_jsonl(tmp_path / "x.jsonl", [partial_row])
        with pytest.raises(
            UserError, match=rf"x\.jsonl:1: missing field '{alternatives[0]}'.* the {name} format"
        ):
            read_examples(str(path), format=name)


def test_undetectable_rows_list_every_format_with_its_fields(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError) as error:
        read_examples(str(path))
    assert all(f"{name} ({format.fields})" in str(error.value) for name, format in FORMATS.items())
    assert format_choices() == "auto, " + ", ".join(list(FORMATS)[:-1]) + " or " + list(FORMATS)[-1]
