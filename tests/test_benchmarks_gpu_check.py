"""The GPU check's pieces (benchmarks/gpu_check.py, liger_jsd.py, generation.py), on the CPU.

The whole `benchmarks/gpu_check.sh --tiny` takes minutes on 2 cores (a `distillm train` process per method);
these tests check the parts that decide what the report says, and the Liger benchmark's tiny path.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return load("gpu_check")


def test_a_section_that_hangs_is_killed_at_its_limit_and_keeps_what_it_printed(gpu_check, tmp_path):
    script = "import time; print('before the hang', flush=True); time.sleep(60)"
    result = gpu_check.run([sys.executable, "-c", script], timeout=3, log=tmp_path / "hang.log")
    assert result.returncode is None and result.status.startswith("timed out")
    assert result.seconds < 30
    assert "before the hang" in result.output


def test_a_failing_section_reports_its_exit_code(gpu_check, tmp_path):
    result = gpu_check.run([sys.executable, "-c", "raise SystemExit(3)"], timeout=30, log=tmp_path / "f.log")
    assert result.status == "failed (exit 3)"


def write_metrics(run_dir: Path, losses: list[float], seconds: list[float], tokens: int = 100) -> None:
    run_dir.mkdir(parents=True)
    rows = [{"step": 0, "dev_loss": 7.0}]
    rows += [
        {"step": k + 1, "loss": loss, "tokens": tokens, "tokens_per_s": tokens / s}
        for k, (loss, s) in enumerate(zip(losses, seconds))
    ]
    rows.append({"step": len(losses), "dev_loss": 6.5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text(
        json.dumps({"source_counts": {"dataset": 2, "fresh": 1}, "seconds": {"generation": 1.5}})
    )


def test_train_figures_take_the_median_step_time_after_the_first_step(gpu_check, tmp_path):
    write_metrics(tmp_path / "run", [7.0, 6.9, 6.8, 6.7], seconds=[9.0, 0.2, 0.4, 0.3])
    figures = gpu_check.train_figures(tmp_path / "run")
    assert figures["steps"] == 4
    # The median of 0.2, 0.4 and 0.3: the first step (9 s of warm-up) is left out.
    assert figures["seconds_per_step"] == pytest.approx(0.3)
    assert figures["finite"] and figures["dev"] == [7.0, 6.5]
    assert (figures["first_loss"], figures["last_loss"]) == (7.0, 6.7)
    assert figures["sources"] == {"dataset": 2, "fresh": 1} and figures["generation_s"] == 1.5


def test_a_non_finite_loss_is_reported_as_such(gpu_check, tmp_path):
    write_metrics(tmp_path / "run", [7.0, math.nan, 6.8], seconds=[1.0, 1.0, 1.0])
    assert not gpu_check.train_figures(tmp_path / "run")["finite"]


def test_the_liger_verdict_compares_ours_with_each_liger_path_that_ran(gpu_check):
    rows = [
        {"impl": "ours chunked jsd", "status": "ok", "seconds": 0.10, "peak_memory_gib": 2.0},
        {"impl": "liger chunked jsd", "status": "ok", "seconds": 0.20, "peak_memory_gib": 4.0},
        {"impl": "liger fused linear jsd", "status": "ok", "seconds": 0.05, "peak_memory_gib": 1.0},
        {"impl": "liger jsd", "status": "out of memory"},
    ]
    lines = gpu_check.liger_verdict(rows)
    assert "- vs liger chunked jsd: time 0.50x theirs, memory 0.50x theirs" in lines
    assert "- vs liger fused linear jsd: time 2.00x theirs, memory 2.00x theirs" in lines
    assert not any("liger jsd:" in line for line in lines)  # did not run: no ratio
    assert lines[-1].endswith("time not met, memory not met")  # the fused path beats ours on both


def test_the_liger_verdict_says_when_there_is_nothing_to_compare(gpu_check):
    rows = [{"impl": "ours chunked jsd", "status": "ok", "seconds": 0.1, "peak_memory_gib": None}]
    rows.append({"impl": "liger jsd", "status": "skipped: Liger-Kernel's Triton kernels need CUDA"})
    assert gpu_check.liger_verdict(rows)[0].startswith("No comparison")


def test_the_methods_checked_are_those_with_a_gpt2_medium_preset(gpu_check):
    methods = gpu_check.cli_methods()
    assert methods[:4] == ["sft", "kd", "gkd", "distillm"]
    assert all((gpu_check.PRESETS / f"{m}-medium.yaml").is_file() for m in methods)


def test_the_section_limits_leave_the_full_check_under_8_minutes(gpu_check):
    assert sum(full for full, _tiny in gpu_check.LIMITS.values()) <= 8 * 60 - 20  # 20 s for set-up and wheels


@pytest.mark.parametrize(
    ("ratios", "choice"), [([2.0, 0.5], "distillm"), ([1.3, 1.1], "distillm"), ([0.5, 0.8], "generate")]
)
def test_the_sampler_recommendation_follows_the_geometric_mean_of_the_speed_ratios(ratios, choice):
    from distillm.generation import AUTO_SAMPLER

    text = load("generation").recommendation("cuda", ratios)
    assert f"should run {choice!r}" in text
    mean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    assert f"geometric mean {mean:.2f}x" in text
    if choice == AUTO_SAMPLER["cuda"]:
        assert text.endswith("keep it.")
    else:
        assert f"change AUTO_SAMPLER['cuda'] to {choice!r}" in text


def test_the_liger_benchmark_runs_tiny_on_a_cpu_and_our_chunked_jsd_equals_the_dense_one(capsys):
    liger_jsd = load("liger_jsd")
    assert liger_jsd.main(["--tiny", "--json", "--dtype", "fp32", "--repeats", "1"]) == 0
    rows = {r["impl"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == set(liger_jsd.OURS + liger_jsd.LIGER)
    assert all(rows[name]["status"] == "ok" for name in liger_jsd.OURS)
    # The same sums in float32, chunked or not: rounding of a few V-term sums (V = 512) apart.
    dense, chunked = rows["ours dense jsd"]["loss"], rows["ours chunked jsd"]["loss"]
    assert chunked == pytest.approx(dense, rel=512 * 2**-23)
    # Without CUDA the Triton paths are skipped, saying why (or all of Liger's where it is not installed).
    for name in ("liger fused linear jsd", "liger jsd"):
        assert rows[name]["status"].startswith("skipped:")
    if rows["liger chunked jsd"]["status"] == "ok":  # plain PyTorch chunks: they run on a CPU too
        assert rows["liger chunked jsd"]["loss"] == pytest.approx(dense, rel=512 * 2**-23)


@pytest.mark.parametrize("tiny", [False, True])
def test_every_benchmark_accepts_the_command_line_the_check_gives_it(gpu_check, tiny):
    """A misspelt option would only show on the lent GPU machine, in its few minutes."""
    distill_step = load("distill_step").parse_args(gpu_check.distill_step_args(tiny))
    assert distill_step.json and distill_step.steps == (2 if tiny else 5)
    if not tiny:  # the shapes: GPT-2 XL into GPT-2, bf16, 8 x 512
        assert (tuple(distill_step.teacher), tuple(distill_step.student)) == ((48, 1600, 25), (12, 768, 12))
        assert (distill_step.batch, distill_step.seq, distill_step.dtype) == (8, 512, "bf16")
    liger_parser = load("liger_jsd").build_parser()
    for shape in ["tiny"] if tiny else ["liger", "gpt2-xl"]:
        liger = liger_parser.parse_args(gpu_check.liger_args(tiny, shape))
        assert liger.tiny or liger.shapes == [shape]
    sampling = load("generation").build_parser().parse_args(gpu_check.sampling_args(tiny, "cuda"))
    assert sampling.recommend and sampling.device == "cuda"
    if not tiny:  # the setting: batch 32, 256 new tokens, on the paper's GPT-2 student shapes
        assert (sampling.batch, sampling.new_tokens, sampling.dtype) == (32, [256], "bf16")
        assert sampling.models == ["gpt2", "gpt2-medium"]


@pytest.mark.parametrize("shape", ["full", "tiny"])
def test_every_method_preset_accepts_the_checks_overrides(gpu_check, tmp_path, shape):
    from distillm.config import load_config

    paths = {key: tmp_path / key for key in ("student", "teacher", "train", "dev", "pretrain")}
    sizes = gpu_check.CLI_SHAPES[shape]
    for method in gpu_check.cli_methods():
        overrides = gpu_check.train_overrides(method, paths, tmp_path, sizes)
        config = load_config(gpu_check.PRESETS / f"{method}-medium.yaml", overrides)
        assert (config.train.precision, config.model.teacher_dtype) == ("bf16", "bf16")
        assert config.train.max_steps == config.train.eval_every == sizes["steps"]
        assert config.model.student == str(paths["student"]) and not config.train.eval_rouge
        if method == "distillm":  # phi starts at 0.5: the few steps also sample and replay
            assert config.sources.kind == "adaptive" and config.sources.init_threshold == 0.5
            assert config.objective.lm_coef > 0 and config.data.pretrain == str(paths["pretrain"])


def test_a_train_run_that_left_no_metrics_is_a_failed_row_not_a_crash(gpu_check, tmp_path):
    ran = gpu_check.Run(["distillm"], 0, 1.0, "")
    row, passed = gpu_check.train_row("kd", ran, tmp_path / "missing")
    assert not passed and "ran, no figures: FileNotFoundError" in row
    killed = gpu_check.Run(["distillm"], None, 40.0, "")
    row, passed = gpu_check.train_row("kd", killed, tmp_path / "missing")
    assert not passed and "| train kd | timed out after 40 s |" in row
    write_metrics(tmp_path / "run", [7.0, 6.9], seconds=[1.0, 0.5])
    row, passed = gpu_check.train_row("kd", ran, tmp_path / "run")
    assert passed and row.startswith("| train kd | ok | 2 | 0.500 |")
