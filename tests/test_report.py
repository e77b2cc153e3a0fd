"""The report writer on hand-made inputs: tables, findings, Markdown/HTML agreement, the PNG."""

from __future__ import annotations

import json

import pytest

from distillm import report
from distillm.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _evaluation(scores: dict[str, tuple[float, float]]) -> dict:
    """An evaluation summary in ``distillm evaluate``'s format with the given ROUGE-L (mean, std) per model."""
    models = {
        name: {
            "path": f"/models/{name}",
            "datasets": {
                "tasks": {
                    "rows": 4,
                    "rougeL": {"mean": mean, "std": std},
                    "exact_match": {"mean": mean / 2, "std": std / 2},
                    "length": {"mean": 3.0, "std": 0.0},
                }
            },
        }
        for name, (mean, std) in scores.items()
    }
    return {"settings": {"seeds": [10, 20]}, "datasets": {"tasks": {"rows": 4}}, "models": models}


def _run(name: str, losses: list[float], rouges: list[float], counts: dict[str, int]) -> report.RunRecord:
    metrics = [{"step": 1, "loss": 3.0}]
    metrics += [
        {"step": 10 * (i + 1), "dev_loss": loss, "dev_rougeL": rouge, "phi": 0.1 * i}
        for i, (loss, rouge) in enumerate(zip(losses, rouges))
    ]
    summary = {
        "steps": 10 * len(losses),
        "tokens": 1234,
        "seconds": {"generation": 1.0, "teacher": 2.0, "student": 3.0, "evaluation": 4.0},
        "source_counts": counts,
    }
    return report.RunRecord(name, metrics, summary)


def _predictions(models: list[str]) -> dict[str, list[dict]]:
    prompt = "Below is ...\n\n### Instruction:\nReverse the words.\n\n### Input:\na b\n\n### Response:\n"
    return {m: [{"prompt": prompt, "references": ["b a"], "prediction": f"answer of {m}"}] for m in models}


@pytest.fixture
def inputs():
    scores = {"teacher": (60.0, 1.0), "SFT": (30.0, 1.0), "KD": (40.0, 2.0), "GKD": (31.0, 0.5)}
    runs = [
        _run("SFT", [2.0, 1.5], [20.0, 30.0], {"dataset": 20}),
        _run("KD", [1.9, 1.4], [25.0, 40.0], {"dataset": 20}),
        _run("GKD", [1.8, 1.7], [22.0, 31.0], {"dataset": 5, "fresh": 10, "replay": 5}),
    ]
    return report.ReportInputs(
        title="test report",
        evaluation=_evaluation(scores),
        dataset="tasks",
        models=list(scores),
        reference="SFT",
        runs=runs,
        method_runs=["SFT", "KD", "GKD"],
        predictions=_predictions(list(scores)),
        example_indices=[0],
        setup=["Machine: test."],
        findings=report.findings(_evaluation(scores), "tasks", "teacher", "SFT", ["SFT", "KD", "GKD"]),
    )


def test_rouge_table_has_one_row_per_model_with_the_summary_numbers(inputs):
    table = report.rouge_table(inputs.evaluation, "tasks", inputs.models, "SFT")
    assert [row[0] for row in table.rows] == ["teacher", "SFT", "KD", "GKD"]
    kd = table.rows[2]
    assert float(kd[1]) == 40.0 and float(kd[2]) == 2.0
    assert kd[-1] == "+10.00"  # 40 - 30, by hand


def test_budget_table_sums_the_four_parts_and_adds_generation_done_before_the_run():
    run = _run("SeqKD", [1.0], [1.0], {"dataset": 1})
    run.extra_generation_seconds = 5.0
    (row,) = report.budget_table([run]).rows
    assert row[:3] == ["SeqKD", "10", "1,234"]
    assert float(row[3]) == 6.0  # 1 in the loop + 5 before it
    assert float(row[-1]) == 6.0 + 2.0 + 3.0 + 4.0


def test_source_table_gives_the_student_generated_share_and_the_last_phi():
    run = _run("GKD", [1.0, 1.0, 1.0], [0, 0, 0], {"dataset": 5, "fresh": 10, "replay": 5})
    (row,) = report.source_table([run]).rows
    assert row[1:4] == ["5", "10", "5"]
    assert row[4] == "75%"  # (10 + 5) / 20
    assert float(row[5]) == pytest.approx(0.2)  # phi at the third evaluation: 0.1 * 2


def test_findings_separate_gaps_beyond_the_seed_spread_from_those_within_it(inputs):
    text = " ".join(inputs.findings)
    assert "30.00 ROUGE-L points above the SFT student" in text  # 60 - 30
    assert "KD (+10.00) beat SFT" in text  # 10 > 2 + 1
    assert "GKD (+1.00) are within the seed-to-seed spread of SFT" in text  # 1 < 0.5 + 1
    assert text.index("KD 40.00") < text.index("GKD 31.00") < text.index("SFT 30.00")


def test_markdown_and_html_render_the_same_table_cells(inputs):
    blocks = report.build_blocks(inputs, "curves.png")
    markdown, page = report.to_markdown(blocks), report.to_html(blocks, "t")
    assert "| KD | 40.00 | 2.00 |" in markdown
    assert '<td class="num">40.00</td>' in page
    assert "answer of GKD" in markdown and "answer of GKD" in page
    assert "![dev loss and ROUGE-L over training](curves.png)" in markdown
    assert '<img src="curves.png"' in page


def test_html_escapes_model_output():
    page = report.to_html([report.Table(["a"], [["<script>x</script>"]])], "t")
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_markdown_table_cells_keep_pipes_and_newlines_inside_the_cell():
    markdown = report.to_markdown([report.Table(["a", "b"], [["x|y", "1. a\n2. b"]])])
    assert "| x\\|y | 1. a<br>2. b |" in markdown


def test_example_table_strips_the_template_and_lists_every_model(inputs):
    table = report.example_table(inputs.predictions, [0])
    assert table.header == ["prompt (instruction and input)", "reference", "teacher", "SFT", "KD", "GKD"]
    assert table.rows[0][0] == "Reverse the words.\n\na b"
    assert table.rows[0][2:] == [f"answer of {m}" for m in ["teacher", "SFT", "KD", "GKD"]]


def test_write_report_writes_markdown_html_and_a_png(inputs, tmp_path):
    paths = report.write_report(inputs, tmp_path)
    assert paths["plot"].read_bytes().startswith(PNG_SIGNATURE)
    assert paths["markdown"].read_text().startswith("# test report")
    assert paths["html"].read_text().startswith("<!DOCTYPE html>")


def test_load_run_names_the_missing_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "dev_loss": 1.0}) + "\n")
    with pytest.raises(UserError, match="summary.json is missing"):
        report.load_run("KD", tmp_path)


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UserError, match=r"pip install 'distillm\[report\]'"):
        report.pyplot()


def test_group_scores_average_rouge_over_seeds_and_each_groups_rows():
    seeds = [
        [{"rougeL": 10.0}, {"rougeL": 50.0}, {"rougeL": 30.0}],
        [{"rougeL": 20.0}, {"rougeL": 70.0}, {"rougeL": 0.0}],
    ]
    scores = report.group_scores(seeds, ["copy", "sort", "copy"])
    assert scores == pytest.approx({"copy": (10 + 30 + 20 + 0) / 4, "sort": (50 + 70) / 2})
    with pytest.raises(ValueError, match="2 prediction rows for 3 test rows"):
        report.group_scores([seeds[0][:2]], ["copy", "sort", "copy"])


def test_the_family_table_has_a_row_per_family_and_a_column_per_model(inputs):
    inputs.group_scores = {m: {"reverse": 10.0 * i, "sort": 1.0} for i, m in enumerate(inputs.models)}
    table = report.group_table(inputs.group_scores, inputs.models)
    assert table.header == ["family", *inputs.models]
    assert table.rows[0] == ["reverse", "0.00", "10.00", "20.00", "30.00"]
    assert [row[0] for row in table.rows] == ["reverse", "sort"]
    assert "ROUGE-L per task family" in report.to_markdown(report.build_blocks(inputs, "curves.png"))


def test_time_to_quality_adds_up_each_steps_seconds_until_the_first_evaluation_at_the_mark():
    from distillm.report import RunRecord, time_to_quality_table

    def steps(n, generation, teacher, student):
        return [
            {"step": k, "loss": 1.0, "generation_s": generation, "teacher_s": teacher, "student_s": student}
            for k in range(1, n + 1)
        ]

    kd = RunRecord(
        "KD",
        [{"step": 0, "dev_loss": 1.0, "dev_rougeL": 5.0}, {"step": 4, "dev_loss": 1.0, "dev_rougeL": 20.0}],
        {},
    )
    fast = RunRecord(
        "fast",
        steps(4, 1.0, 0.5, 0.25)
        + [
            {"step": 2, "dev_loss": 1.0, "dev_rougeL": 21.0},
            {"step": 4, "dev_loss": 1.0, "dev_rougeL": 30.0},
        ],
        {},
    )
    # Its starting student (step 0) scored above KD's final and above what the run reached: neither counts.
    never = RunRecord(
        "never",
        [{"step": 0, "dev_loss": 1.0, "dev_rougeL": 25.0}]
        + steps(4, 0.0, 0.0, 1.0)
        + [{"step": 4, "dev_loss": 1.0, "dev_rougeL": 10.0}],
        {},
    )
    table = time_to_quality_table([kd, fast, never], kd, ["fast", "never"])
    # fast: KD's final 20 first reached at step 2 = 2 x (1 + 0.5 + 0.25) s; its best 30 at step 4.
    assert table.rows[0] == [
        "fast",
        "yes",
        "2",
        "3.5 (2.0 / 1.0 / 0.5)",
        "30.00",
        "4",
        "7.0 (4.0 / 2.0 / 1.0)",
    ]
    assert table.rows[1] == ["never", "no", "-", "-", "10.00", "4", "4.0 (0.0 / 0.0 / 4.0)"]
