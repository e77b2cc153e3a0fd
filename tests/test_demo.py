"""`distillm demo --quick`, run once through the real CLI: stages, report structure, reuse of finished stages."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import report_rouge_rows
from distillm import demo
from distillm.cli import main
from distillm.errors import UserError

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TABLE_MODELS = [demo.TEACHER, demo.INIT, *(m.name for m in demo.METHODS)]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_the_table_has_one_row_per_model_with_the_evaluation_summarys_numbers(quick_demo):
    rows = report_rouge_rows((quick_demo / "report.md").read_text())
    assert list(rows) == TABLE_MODELS
    for name, _, eval_dir in demo.evaluated_models(quick_demo):
        # Each model's own `distillm evaluate` summary, read independently of the report code.
        summary = json.loads((eval_dir / "summary.json").read_text())
        (entry,) = summary["models"].values()
        (stats,) = entry["datasets"].values()
        assert len(stats["seeds"]) == 5
        assert rows[name][0] == f"{stats['rougeL']['mean']:.2f}"
        assert rows[name][1] == f"{stats['rougeL']['std']:.2f}"


def test_the_html_report_shows_the_same_table(quick_demo):
    page = (quick_demo / "report.html").read_text()
    markdown_rows = report_rouge_rows((quick_demo / "report.md").read_text())
    for name, cells in markdown_rows.items():
        assert re.search(rf"<td>{re.escape(name)}</td><td class=\"num\">{re.escape(cells[0])}</td>", page)


def test_the_plot_is_a_png_and_the_report_links_it(quick_demo):
    assert (quick_demo / "curves.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "(curves.png)" in (quick_demo / "report.md").read_text()


def test_every_method_gets_the_same_number_of_optimizer_steps(quick_demo):
    for method in demo.METHODS:
        summary = json.loads((quick_demo / method.folder / "summary.json").read_text())
        assert summary["steps"] == demo.QUICK_PLAN.method_steps
        assert set(summary["seconds"]) == {"generation", "teacher", "student", "evaluation"}


def test_each_method_ran_its_own_objective_and_sources(quick_demo):
    import yaml

    def config(folder):
        return yaml.safe_load((quick_demo / folder / "config.yaml").read_text())

    assert config("distillm-skl")["objective"]["divergence"] == "skew_forward_kl"
    assert config("distillm-srkl")["objective"]["divergence"] == "skew_reverse_kl"
    assert config("distillm-srkl")["sources"]["kind"] == "adaptive"
    assert config("imitkd")["sources"]["student_ratio"] == 1.0
    assert config("sft")["objective"]["kd_ratio"] == 0.0
    assert config("minillm")["loop"] == "minillm" and config("kd")["loop"] == "tokens"
    # SeqKD trains on the teacher's answers, one per prompt asked.
    assert config("seqkd")["data"]["train"] == str(quick_demo / "data" / "teacher.jsonl")
    rows = (quick_demo / "data" / "teacher.jsonl").read_text().splitlines()
    assert len(rows) == demo.QUICK_PLAN.seqkd_rows
    # Every run points at --out, never at the presets' runs/demo.
    for method in demo.METHODS:
        assert config(method.folder)["model"]["student"] == str(quick_demo / "init" / "best")


def test_the_report_times_the_on_policy_methods_to_kds_final_dev_rouge(quick_demo):
    markdown = (quick_demo / "report.md").read_text()
    section = markdown.split("### Time to quality", 1)[1].split("\n#", 1)[0]
    for name in demo.TIME_TO_QUALITY:
        assert f"| {name} |" in section, name


def test_imitkd_trains_on_student_outputs_at_every_step(quick_demo):
    counts = json.loads((quick_demo / "imitkd" / "summary.json").read_text())["source_counts"]
    assert counts.get("fresh", 0) == demo.QUICK_PLAN.method_steps and counts.get("dataset", 0) == 0


def test_a_rerun_reuses_every_finished_stage_and_redoes_a_removed_one(quick_demo):
    record_before = json.loads((quick_demo / "demo.json").read_text())
    summaries = {m.folder: (quick_demo / m.folder / "summary.json").stat().st_mtime_ns for m in demo.METHODS}
    (quick_demo / "kd" / "summary.json").unlink()  # an unfinished run: only it is redone

    assert main(["demo", "--quick", "--out", str(quick_demo)]) == 0

    record_after = json.loads((quick_demo / "demo.json").read_text())
    for folder, mtime in summaries.items():
        now = (quick_demo / folder / "summary.json").stat().st_mtime_ns
        assert (now != mtime) if folder == "kd" else (now == mtime), folder
    changed = {
        k for k in record_after["seconds"] if record_after["seconds"][k] != record_before["seconds"].get(k)
    }
    assert changed == {"kd", "eval kd"}  # the retrained model is evaluated again
    assert list(report_rouge_rows((quick_demo / "report.md").read_text())) == TABLE_MODELS


def test_a_folder_with_another_plan_is_refused_without_force(quick_demo, capsys):
    assert main(["demo", "--out", str(quick_demo)]) == 2  # the full plan, in a quick demo's folder
    assert "--force" in capsys.readouterr().err


def test_stages_redo_what_was_built_from_a_redone_stage(tmp_path):
    ran = []

    def stage(name):
        def work():
            ran.append(name)
            (tmp_path / name).write_text("done")

        return work

    def done(name):
        return lambda: (tmp_path / name).exists()

    stages = demo.Stages(tmp_path, demo.QUICK_PLAN, quick=True, force=False)
    stages.run("a", done("a"), stage("a"))
    stages.run("b", done("b"), stage("b"), after=["a"])
    stages.run("c", done("c"), stage("c"))
    assert ran == ["a", "b", "c"]

    (tmp_path / "a").unlink()  # "a" is incomplete: it runs again, "b" was built from it, "c" was not
    again = demo.Stages(tmp_path, demo.QUICK_PLAN, quick=True, force=False)
    again.run("a", done("a"), stage("a"))
    again.run("b", done("b"), stage("b"), after=["a"])
    again.run("c", done("c"), stage("c"))
    assert ran == ["a", "b", "c", "a", "b"]


def test_a_record_without_finish_times_is_refused_with_what_to_do(tmp_path):
    """demo.json from before finish times were kept cannot say which stages are stale: --force redoes it."""
    record = {"plan": None, "quick": True, "seconds": {"a": 1.0, "b": 2.0}, "machine": "m"}
    stages = demo.Stages(tmp_path, demo.QUICK_PLAN, quick=True, force=False)
    record["plan"] = stages.record["plan"]
    (tmp_path / "demo.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"demo\.json was written by an older distillm.*--force"):
        demo.Stages(tmp_path, demo.QUICK_PLAN, quick=True, force=False)
    assert demo.Stages(tmp_path, demo.QUICK_PLAN, quick=True, force=True).record["finished"] == {}


def test_a_stage_stopped_by_sigterm_exits_75_and_resumes_on_rerun_to_the_same_weights(
    quick_demo, monkeypatch, caplog
):
    """SIGTERM arrives right after the kd stage's step-2 checkpoint: the demo stops there with exit code 75
    and the command that resumes; the rerun resumes kd from step 2 and ends with the same weights as the
    uninterrupted kd run of the fixture."""
    import distillm.distributed as distributed_module

    before = load_file(str(quick_demo / "kd" / "last" / "model.safetensors"))
    shutil.rmtree(quick_demo / "kd")  # kd is redone from its start
    save = distributed_module.save_checkpoint

    def save_then_sigterm(run_dir, step, *args, **kwargs):
        path = save(run_dir, step, *args, **kwargs)
        if step == 2 and Path(run_dir).name == "kd":
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to this process's handler, as from a scheduler
        return path

    monkeypatch.setattr(distributed_module, "save_checkpoint", save_then_sigterm)
    argv = ["demo", "--quick", "--out", str(quick_demo)]
    with caplog.at_level("INFO"):
        assert main(argv) == 75
    resume = shlex.join([sys.executable, "-m", "distillm", *argv])
    assert (
        "stopped by SIGTERM after optimizer step 2" in caplog.text and f"resume with: {resume}" in caplog.text
    )
    assert not (quick_demo / "kd" / "last").exists()

    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert "resuming the interrupted run" in caplog.text and "(step 2)" in caplog.text
    after = load_file(str(quick_demo / "kd" / "last" / "model.safetensors"))
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
