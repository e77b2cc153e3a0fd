"""`distillm prepare`, through `distillm.cli.main`: summaries, outputs, and nothing written on failure."""

from __future__ import annotations

import json

from distillm.cli import main
from distillm.data import TokenizedDataset, encode_example, render_prompt
from distillm.data.formats import Example


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


ROWS = [
    {
        "instruction": "sort the words",
        "context": "banana apple",
        "response": "apple banana",
        "category": "sort",
    },
    {"instruction": "count", "context": "", "response": "", "category": "count"},
    {"instruction": "first word", "context": "red green blue", "response": "red", "category": "nth"},
]


def test_prepare_tokenizes_into_out_and_prints_the_summary(
    tmp_path, tiny_tokenizer_dir, tiny_tokenizer, capsys
):
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    out = tmp_path / "prepared"
    argv = ["prepare", "--data", str(data), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(out)]
    assert main([*argv, "--max-length", "80", "--max-prompt-length", "40"]) == 0
    printed = capsys.readouterr().out
    assert "format dolly, 3 rows read, 2 kept" in printed
    assert "skipped 1: empty response" in printed
    assert "prompt tokens:" in printed and "response tokens:" in printed and "truncated:" in printed
    dataset = TokenizedDataset(out)
    assert len(dataset) == 2
    kept = [ROWS[0], ROWS[2]]
    for i, row in enumerate(kept):
        prompt = render_prompt(Example(row["instruction"], row["context"], (row["response"],), None, "x"))
        assert dataset[i] == encode_example(prompt, row["response"], tiny_tokenizer, 80, 40)
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no temp folders


def test_prepare_counts_truncated_prompts(tmp_path, tiny_tokenizer_dir, capsys):
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    argv = [
        "prepare",
        "--data",
        str(data),
        "--tokenizer",
        str(tiny_tokenizer_dir),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--max-length", "12", "--max-prompt-length", "8"]) == 0
    assert "truncated: 2 prompts" in capsys.readouterr().out
    assert TokenizedDataset(tmp_path / "o").prompt_lengths.tolist() == [8, 8]


def test_bad_data_fails_with_file_and_line_and_writes_nothing(tmp_path, tiny_tokenizer_dir, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    out = tmp_path / "prepared"
    argv = ["prepare", "--data", str(data), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(out)]
    assert main(argv) == 2
    assert f"{data}:2: malformed JSON" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["train.jsonl"]


def test_strict_mode_fails_on_an_empty_response_and_writes_nothing(tmp_path, tiny_tokenizer_dir, capsys):
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    out = tmp_path / "prepared"
    argv = [
        "prepare",
        "--data",
        str(data),
        "--tokenizer",
        str(tiny_tokenizer_dir),
        "--out",
        str(out),
        "--strict",
    ]
    assert main(argv) == 2
    assert f"{data}:2: empty response" in capsys.readouterr().err
    assert not out.exists()


def test_a_failure_after_reading_leaves_no_partial_output(tmp_path, tiny_tokenizer_dir, capsys):
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    out = tmp_path / "prepared"
    # The data reads fine; the tokenizer folder does not exist.
    argv = ["prepare", "--data", str(data), "--tokenizer", str(tmp_path / "nothing"), "--out", str(out)]
    assert main(argv) == 2
    assert "cannot load the tokenizer" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["train.jsonl"]


def test_an_existing_out_folder_is_kept_unless_force_is_given(tmp_path, tiny_tokenizer_dir, capsys):
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    argv = ["prepare", "--data", str(data), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(out)]
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err and (out / "old.txt").exists()
    assert main([*argv, "--force"]) == 0
    assert not (out / "old.txt").exists() and len(TokenizedDataset(out)) == 2


def test_missing_data_or_tokenizer_and_bad_lengths_are_errors(tmp_path, tiny_tokenizer_dir, capsys):
    assert main(["prepare", "--out", str(tmp_path / "o")]) == 2
    assert "--data and --tokenizer are required" in capsys.readouterr().err
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    argv = [
        "prepare",
        "--data",
        str(data),
        "--tokenizer",
        str(tiny_tokenizer_dir),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--max-length", "100", "--max-prompt-length", "100"]) == 2
    assert "max_prompt_length=100" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bundled_tasks_are_written_as_three_dolly_splits(tmp_path, capsys):
    out = tmp_path / "tasks"
    argv = ["prepare", "--bundled-tasks", "--out", str(out), "--seed", "2"]
    assert main([*argv, "--n-train", "30", "--n-dev", "6", "--n-test", "9"]) == 0
    sizes = {name: len((out / f"{name}.jsonl").read_text().splitlines()) for name in ("train", "dev", "test")}
    assert sizes == {"train": 30, "dev": 6, "test": 9}
    assert "train: 30 rows" in capsys.readouterr().out
    first = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"instruction", "context", "response", "category"}
