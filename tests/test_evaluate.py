"""`distillm evaluate` and its library functions, on tiny models and a few rows."""

from __future__ import annotations

import copy
import json
import statistics

import pytest
import torch

from distillm.cli import main
from distillm.config import GenerationConfig
from distillm.data import Example
from distillm.errors import UserError
from distillm.evaluate import (
    PAPER_TEST_SETS,
    generate_predictions,
    generate_responses,
    load_eval_set,
    load_model_and_tokenizer,
    results_table,
    score_predictions,
    unique_names,
)
from distillm.metrics import rouge_l
from numerics import assert_as_accurate_as

FAST = GenerationConfig(max_new_tokens=8, no_repeat_ngram_size=6, batch_size=4)


@pytest.fixture(scope="module")
def student(tiny_student_dir):
    return load_model_and_tokenizer(str(tiny_student_dir), device="cpu")


@pytest.fixture(scope="module")
def task_rows():
    return load_eval_set("tasks", limit=6).examples


def write_minillm_file(path, n_rows: int) -> None:
    """A MiniLLM-style test file: instruction, input, a ready-made prompt with <n> newlines, a list output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for i in range(n_rows):
            row = {
                "instruction": f"Say the number {i}.",
                "input": "",
                "prompt": f"### Instruction:<n>Say the number {i}.<n><n>### Response:<n>",
                "output": [f"the number is {i}", f"{i}"],
            }
            handle.write(json.dumps(row) + "\n")


def test_the_same_seed_gives_the_same_predictions_and_another_seed_different_ones(student, task_rows):
    model, tokenizer = student
    first = generate_predictions(model, tokenizer, task_rows, FAST, seed=10)
    again = generate_predictions(model, tokenizer, task_rows, FAST, seed=10)
    other = generate_predictions(model, tokenizer, task_rows, FAST, seed=20)
    assert first == again
    assert first != other


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(student, task_rows):
    # Greedy decoding has no randomness: each row must come out as it does alone, whatever its batch-mates,
    # its padding and the length-sorted batching order.
    model, tokenizer = student
    greedy = GenerationConfig(max_new_tokens=6, do_sample=False, no_repeat_ngram_size=0, batch_size=3)
    batched = generate_responses(model, tokenizer, task_rows, greedy, seed=0)
    alone = [generate_responses(model, tokenizer, [row], greedy, seed=0)[0] for row in task_rows]
    assert batched == alone
    assert all(len(response) <= 6 and tokenizer.eos_token_id not in response for response in batched)


def test_score_predictions_averages_the_best_reference_rouge_per_row():
    examples = [
        Example("i", "", ("the cat sat", "a dog"), None, "x:1"),
        Example("i", "", ("red green blue",), None, "x:2"),
    ]
    scores = score_predictions(["the cat sat", "red"], examples)
    # Row 1 matches its first reference exactly (100); row 2: LCS 1, P 1, R 1/3 -> F = 2/4 = 50.
    assert scores["rougeL"] == pytest.approx((100 + 50) / 2)
    assert scores["exact_match"] == pytest.approx((100 + 0) / 2)
    with pytest.raises(ValueError):
        score_predictions(["only one"], examples)


def test_results_table_has_one_row_per_model_and_one_column_per_dataset():
    def stats(mean, std):
        return {"rougeL": {"mean": mean, "std": std}}

    summary = {
        "models": {
            "teacher": {"datasets": {"dolly": stats(26.126, 0.4), "vicuna": stats(17.0, 0.333)}},
            "student": {"datasets": {"dolly": stats(24.5, 0.05)}},
        }
    }
    lines = results_table(summary).strip().splitlines()
    assert lines[0] == "| model | dolly | vicuna |"
    assert lines[1].count("|") == 4  # separator row: three columns
    assert lines[2] == "| teacher | 26.13 (0.40) | 17.00 (0.33) |"
    assert lines[3] == "| student | 24.50 (0.05) | - |"
    assert len(lines) == 4


def test_model_names_are_folder_names_made_unique_with_their_parents(tmp_path):
    assert unique_names([str(tmp_path / "runs/a/best"), str(tmp_path / "runs/b/last")]) == ["best", "last"]
    assert unique_names([str(tmp_path / "runs/a/best"), str(tmp_path / "runs/b/best")]) == [
        "a-best",
        "b-best",
    ]
    with pytest.raises(UserError):
        unique_names([str(tmp_path / "m"), str(tmp_path / "m")])


def test_a_paper_test_set_resolves_under_the_data_root_and_unni_keeps_its_first_10000_rows(tmp_path):
    write_minillm_file(tmp_path / PAPER_TEST_SETS["uinst"][0], 10_003)
    eval_set = load_eval_set("uinst", data_root=tmp_path)
    assert eval_set.name == "uinst" and len(eval_set.examples) == 10_000
    assert eval_set.examples[-1].references == ("the number is 9999", "9999")
    assert eval_set.examples[0].prompt == "### Instruction:\nSay the number 0.\n\n### Response:\n"
    assert len(load_eval_set("uinst", data_root=tmp_path, limit=5).examples) == 5


def test_a_missing_test_set_file_is_an_error_naming_the_expected_path(tiny_student_dir, tmp_path, capsys):
    code = main(
        ["evaluate", "--model", str(tiny_student_dir), "--data", "sinst", "--data-root", str(tmp_path),
         "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "sinst/11_/valid.jsonl") in error
    assert not (tmp_path / "out").exists()


def test_end_to_end_two_models_two_datasets_and_a_summary_that_the_prediction_files_reproduce(
    tiny_student_dir, tiny_teacher_dir, tmp_path
):
    write_minillm_file(tmp_path / "data/vicuna/valid.jsonl", 3)
    out = tmp_path / "eval"
    seeds = [10, 20]
    code = main(
        ["evaluate", "--model", str(tiny_student_dir), str(tiny_teacher_dir), "--data", "tasks", "vicuna",
         "--data-root", str(tmp_path / "data"), "--limit", "4", "--seeds", *map(str, seeds),
         "--max-new-tokens", "8", "--batch-size", "4", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    models = [tiny_student_dir.name, tiny_teacher_dir.name]
    assert list(summary["models"]) == models
    assert summary["settings"]["generation"]["no_repeat_ngram_size"] == 6  # the paper's default

    for model in models:
        for dataset, n_rows in (("tasks", 4), ("vicuna", 3)):
            stats = summary["models"][model]["datasets"][dataset]
            per_seed = []
            for seed in seeds:
                rows = [
                    json.loads(line)
                    for line in (out / "predictions" / model / dataset / f"seed{seed}.jsonl").open()
                ]
                assert len(rows) == n_rows
                for row in rows:
                    assert set(row) >= {
                        "prompt",
                        "references",
                        "prediction",
                        "rougeL",
                        "exact_match",
                        "length",
                    }
                    assert row["rougeL"] == pytest.approx(rouge_l(row["prediction"], row["references"]))
                    assert 0 <= row["length"] <= 8
                mean = statistics.fmean(row["rougeL"] for row in rows)
                assert stats["seeds"][str(seed)]["rougeL"] == pytest.approx(mean)
                assert stats["seeds"][str(seed)]["length"] == pytest.approx(
                    statistics.fmean(r["length"] for r in rows)
                )
                per_seed.append(mean)
            assert stats["rougeL"]["mean"] == pytest.approx(statistics.fmean(per_seed))
            assert stats["rougeL"]["std"] == pytest.approx(statistics.stdev(per_seed))

    vicuna_rows = [
        json.loads(line) for line in (out / "predictions" / models[0] / "vicuna/seed10.jsonl").open()
    ]
    assert vicuna_rows[1]["references"] == ["the number is 1", "1"]
    assert vicuna_rows[1]["prompt"] == "### Instruction:\nSay the number 1.\n\n### Response:\n"

    table = (out / "results.md").read_text().splitlines()
    assert "| model | tasks | vicuna |" in table
    teacher_row = next(line for line in table if line.startswith(f"| {models[1]} |"))
    tasks_stats = summary["models"][models[1]]["datasets"]["tasks"]["rougeL"]
    assert f"{tasks_stats['mean']:.2f} ({tasks_stats['std']:.2f})" in teacher_row


def test_a_lora_adapter_folder_loads_merged_onto_its_base_model(tiny_student_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_student_dir))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    torch.manual_seed(0)
    adapted = get_peft_model(base, config).eval()  # non-zero LoRA weights, so the adapter changes outputs
    adapted.save_pretrained(str(tmp_path / "adapter"))  # adapter files only, no tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "adapter"), device="cpu")
    plain, _ = load_model_and_tokenizer(str(tiny_student_dir), device="cpu")
    ids = torch.tensor([tokenizer.encode("reverse the list: one two three")])  # [1, T]
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        # Merged weights W + BA against W x + B(A x): two float32 orders, both measured against float64.
        exact = copy.deepcopy(adapted).double()(input_ids=ids).logits
        assert_as_accurate_as(model(input_ids=ids).logits, expected, exact)
        assert not torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-3)

    code = main(
        ["evaluate", "--model", str(tmp_path / "adapter"), "--data", "tasks", "--limit", "2", "--seeds", "1",
         "--max-new-tokens", "4", "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 0
    assert (tmp_path / "out/predictions/adapter/tasks/seed1.jsonl").is_file()


def test_packed_decoding_weights_are_on_by_default_and_the_cli_turns_them_off():
    import argparse

    from distillm.evaluate import _generation_config, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    required = ["--model", "m", "--data", "tasks", "--out", "o"]
    assert _generation_config(parser.parse_args(required)).pack_weights
    assert not _generation_config(parser.parse_args([*required, "--no-pack-weights"])).pack_weights
