"""LoRA students and teachers through peft: adapters train alone, save alone, merge, resume, continue."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from numerics import assert_as_accurate_as

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def lora_config(task_data, pair, out: Path, preset: str = "kd", **extra):
    from distillm.config import load_config

    values = {
        "model.student": pair["student"],
        "model.teacher": pair["teacher"],
        "model.lora.enabled": True,
        "model.lora.r": 4,
        "model.lora.alpha": 16,
        "model.lora.dropout": 0.0,
        "model.lora.target_modules": "[c_attn]",
        "data.train": task_data / "train.jsonl",
        "data.dev": task_data / "dev.jsonl",
        "data.max_length": 64,
        "data.max_prompt_length": 48,
        "data.cache_dir": out.parent / "cache",
        "train.output_dir": out,
        "train.max_steps": 2,
        "train.batch_size": 4,
        "train.lr": 1e-2,
        "train.warmup_steps": 0,
        "train.scheduler": "constant",
        "train.eval_every": 2,
        "train.save_every": 2,
        "train.eval_rouge": False,
        "train.select_by": "dev_loss",
        "train.log_every": 1,
        "train.progress": False,
        "seed": 0,
        **extra,
    }
    return load_config(CONFIGS / "tiny" / f"{preset}.yaml", [f"{k}={v}" for k, v in values.items()])


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def dev_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["dev_loss"] for r in rows if "dev_loss" in r]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_lora_student_trains_only_its_adapter_and_saves_it_alone_plus_a_merged_model(
    task_data, quiet_pair, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distillm.train import train

    out = tmp_path / "lora"
    train(lora_config(task_data, quiet_pair, out, **{"model.lora.merge_on_save": True}))

    for folder in (out / "best", out / "last"):
        assert (folder / "adapter_config.json").is_file()
        assert (folder / "adapter_model.safetensors").is_file()
        assert not (folder / "model.safetensors").exists()
        adapter = tensors(folder / "adapter_model.safetensors")
        assert adapter and all("lora_" in name for name in adapter)
    adapter = tensors(out / "last" / "adapter_model.safetensors")
    assert any(t.abs().max() > 0 for n, t in adapter.items() if "lora_B" in n)  # B starts at zero: it trained

    base = AutoModelForCausalLM.from_pretrained(str(quiet_pair["student"]))
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    base_state, merged_state = base.state_dict(), merged.state_dict()
    assert base_state.keys() == merged_state.keys()
    for name, weight in base_state.items():
        same = torch.equal(weight, merged_state[name])
        assert same != ("c_attn.weight" in name), name  # only adapted weights differ from the base

    # The merged model computes what base + adapter computes.
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(quiet_pair["student"])), str(out / "last")
    ).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        # W + BA merged into one weight vs W x + B(A x): float32 rounding of two orders, both against float64.
        exact = copy.deepcopy(with_adapter).double()
        assert_as_accurate_as(
            merged.eval()(input_ids=ids).logits,
            with_adapter(input_ids=ids).logits,
            exact(input_ids=ids).logits,
        )


def test_a_lora_run_killed_after_its_checkpoint_resumes_to_the_same_adapter(task_data, quiet_pair, tmp_path):
    from distillm.train import train

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(lora_config(task_data, quiet_pair, straight, **{"train.max_steps": 4}))
    train(lora_config(task_data, quiet_pair, resumed, **{"train.max_steps": 2}))  # "killed" at its checkpoint
    train(lora_config(task_data, quiet_pair, resumed, **{"train.max_steps": 4}))

    assert losses(resumed) == losses(straight)
    expected = tensors(straight / "last" / "adapter_model.safetensors")
    got = tensors(resumed / "last" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_gradient_checkpointing_gives_a_lora_student_the_same_losses(task_data, quiet_pair, tmp_path):
    from distillm.train import train

    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    train(lora_config(task_data, quiet_pair, plain, **{"train.max_steps": 3}))
    train(
        lora_config(
            task_data,
            quiet_pair,
            checkpointed,
            **{"train.max_steps": 3, "model.gradient_checkpointing": True},
        )
    )
    # Step 2 and 3 losses depend on step 1's gradient: they only match if gradients reached the adapter.
    torch.testing.assert_close(
        torch.tensor(losses(checkpointed)), torch.tensor(losses(plain)), rtol=1e-5, atol=0
    )
    assert losses(plain)[2] != losses(plain)[0]


def random_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter on ``model_dir`` with random (non-zero) A and B, saved on its own."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(model_dir)),
        LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(str(out))
    return out


def test_a_teacher_given_as_base_plus_adapter_is_merged_on_load(task_data, quiet_pair, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillm.train import train

    adapter = random_adapter(quiet_pair["teacher"], tmp_path / "teacher-adapter", seed=7)
    merged_dir = tmp_path / "teacher-merged"  # the reference: merged by hand with peft
    base = AutoModelForCausalLM.from_pretrained(str(quiet_pair["teacher"]))
    PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(str(merged_dir))
    AutoTokenizer.from_pretrained(str(quiet_pair["teacher"])).save_pretrained(str(merged_dir))

    runs = {}
    for name, teacher, teacher_adapter in (
        ("adapter", quiet_pair["teacher"], adapter),
        ("merged", merged_dir, None),
        ("base", quiet_pair["teacher"], None),
    ):
        out = tmp_path / name
        extra = {
            "model.teacher": teacher,
            "model.teacher_adapter": teacher_adapter or "null",
            "train.max_steps": 1,
        }
        train(lora_config(task_data, quiet_pair, out, **{**extra, "model.lora.enabled": False}))
        runs[name] = losses(out)[0]
    assert runs["adapter"] == pytest.approx(runs["merged"], rel=1e-6)
    assert runs["adapter"] != pytest.approx(runs["base"], rel=1e-3)  # the adapter mattered


def test_an_initialised_lora_student_keeps_training_its_own_adapter(task_data, quiet_pair, tmp_path):
    from peft import PeftConfig

    from distillm.train import train

    initial = random_adapter(quiet_pair["student"], tmp_path / "init-adapter", seed=3)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(quiet_pair["student"])).save_pretrained(str(initial))

    continued, merged = tmp_path / "continued", tmp_path / "merged"
    train(lora_config(task_data, quiet_pair, continued, **{"model.student": initial}))
    train(
        lora_config(task_data, quiet_pair, merged, **{"model.student": initial, "model.lora.enabled": False})
    )

    # Both start from base + the initial adapter: the untrained dev loss is the same.
    assert dev_losses(continued)[0] == pytest.approx(dev_losses(merged)[0], rel=1e-6)
    # The continued run trained that very adapter (its rank and targets), and saved it on its own.
    saved = PeftConfig.from_pretrained(str(continued / "last"))
    assert saved.r == 4 and set(saved.target_modules) == {"c_attn"}
    before = tensors(initial / "adapter_model.safetensors")
    after = tensors(continued / "last" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # Without LoRA the adapter folder is merged into a full student, which is saved whole.
    assert (merged / "last" / "model.safetensors").is_file()
