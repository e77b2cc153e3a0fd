"""Every supported model family trains through the loop, saves, and reloads through the Auto classes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers.activations
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distillm.config import ObjectiveConfig, load_config
from distillm.kernels import gelu as gelu_kernel
from distillm.kernels.gelu import SigmoidTanhGELU
from distillm.models import build_small_model, load_causal_lm
from distillm.objective import StudentObjective, teacher_forward
from distillm.train import train
from numerics import assert_as_accurate_as, unit_roundoff

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FAMILIES = ["gpt2", "opt", "llama", "qwen2", "mistral"]


def run_config(preset: str, task_data, out: Path, **extra):
    values = {
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
        "train.eval_rouge": False,
        "train.select_by": "dev_loss",
        "train.log_every": 1,
        "train.progress": False,
        "seed": 0,
        **extra,
    }
    return load_config(CONFIGS / "tiny" / f"{preset}.yaml", [f"{k}={v}" for k, v in values.items()])


def first_loss(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if r.get("step") == 1 and "loss" in r)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_two_steps_saves_and_reloads_through_auto_classes(
    family, task_data, tiny_model_factory, tmp_path
):
    student = tiny_model_factory(family, seed=1, layers=2, hidden=32, heads=2)
    out = tmp_path / family
    result = train(run_config("sft", task_data, out, **{"model.student": student}))
    assert result.steps == 2

    reloaded = AutoModelForCausalLM.from_pretrained(str(out / "last"))
    initial = AutoModelForCausalLM.from_pretrained(str(student))
    assert reloaded.config.model_type == family
    saved = load_file(str(out / "last" / "model.safetensors"))
    state = reloaded.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    changed = [n for n, p in initial.state_dict().items() if not torch.equal(p, state[n])]
    assert changed, "two steps at lr 1e-2 must move the weights"
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(reloaded(input_ids=ids).logits).all()


@pytest.mark.parametrize(
    ("family", "tied"),
    [("gpt2", True), ("llama", False)],
)
def test_the_chunked_loss_path_gives_the_dense_first_step_loss(
    family, tied, task_data, tiny_model_factory, tmp_path
):
    extra = {} if family == "gpt2" else {"tie_word_embeddings": tied}
    student = tiny_model_factory(family, seed=1, layers=2, hidden=32, heads=2, **extra)
    teacher = tiny_model_factory(family, seed=2, layers=2, hidden=48, heads=2, **extra)
    model = AutoModelForCausalLM.from_pretrained(str(student))
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head.data_ptr() == embeddings.data_ptr()) == tied

    losses = {}
    for chunk in (0, 16):
        out = tmp_path / f"chunk{chunk}"
        config = run_config(
            "kd",
            task_data,
            out,
            **{
                "model.student": student,
                "model.teacher": teacher,
                "objective.chunk_size": chunk,
                "train.max_steps": 1,
            },
        )
        train(config)
        losses[chunk] = first_loss(out)
    assert losses[16] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.gpu
def test_on_a_gpu_in_bf16_the_chunked_and_dense_losses_and_gradients_agree(tiny_tokenizer):
    device, vocab = torch.device("cuda"), len(tiny_tokenizer)
    teacher = build_small_model(
        "llama", vocab, seed=2, layers=2, hidden=128, heads=4, tie_word_embeddings=False
    )
    teacher = teacher.to(device, torch.bfloat16).eval()
    ids = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(0)).to(device)  # [B, T]
    labels = torch.roll(ids, -1, dims=1)
    labels[:, :32] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    num_tokens = (labels != -100).sum()
    results = {}
    for chunk in (0, 16):
        student = build_small_model(
            "llama", vocab, seed=1, layers=2, hidden=64, heads=4, tie_word_embeddings=False
        )
        config = ObjectiveConfig(divergence="skew_reverse_kl", kd_ratio=0.5, chunk_size=chunk)
        objective = StudentObjective(student.to(device, torch.bfloat16), config, vocab)
        loss = objective(batch, num_tokens, teacher_forward(teacher, batch, vocab, chunked=chunk > 0))
        loss.total.backward()
        results[chunk] = (loss.total.float().item(), student.lm_head.weight.grad.float())
    assert results[16][0] == pytest.approx(results[0][0], rel=2e-2)  # bf16: about 3 significant digits
    torch.testing.assert_close(results[16][1], results[0][1], rtol=5e-2, atol=1e-3)


def tanh_gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in float64, straight from the formula."""
    x = x.double()
    return 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))


@pytest.fixture
def sigmoid_form_calls(monkeypatch):
    """Counts calls of the sigmoid-form forward, so a test can tell which path ``SigmoidTanhGELU`` took."""
    calls = []
    original = gelu_kernel.tanh_gelu_as_sigmoid
    monkeypatch.setattr(gelu_kernel, "tanh_gelu_as_sigmoid", lambda x: calls.append(x) or original(x))
    return calls


def sigmoid_form_bound(x: torch.Tensor) -> torch.Tensor:
    """How far float32 ``x * sigmoid(2z)``, ``z = c (x + 0.044715 x^3)``, can be from the exact value, per element.

    ``z`` takes 4 roundings (relative error <= 4u); ``sigmoid(2z)`` adds <= 4u of its own (exp to ~1 ulp, the
    add, the division) plus ``s (1 - s) 2 |dz| <= 2u`` carried from ``z`` (``s (1 - s) |z| < 0.23``); the product
    with ``x`` one more: ``|y - exact| <= (4 + 2 + 1) u |x| s + 2u |x|`` < ``8u |x|`` (tests/numerics.py).
    """
    return 8 * unit_roundoff(torch.float32) * x.double().abs()


@pytest.mark.parametrize("requires_grad", [True, False])
def test_sigmoid_tanh_gelu_matches_the_tanh_formula_in_float64(sigmoid_form_calls, requires_grad):
    x = torch.linspace(-20, 20, 200_001).requires_grad_(requires_grad)
    y = SigmoidTanhGELU()(x)
    assert len(sigmoid_form_calls) == 1 and y.dtype == torch.float32
    error = (y.double() - tanh_gelu_reference(x.detach())).abs()
    assert bool((error <= sigmoid_form_bound(x.detach())).all()), float(
        (error / sigmoid_form_bound(x.detach())).max()
    )


def test_sigmoid_tanh_gelu_gradient_matches_the_formula_s_float64_gradient(sigmoid_form_calls):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 512, generator=generator) * 4).requires_grad_()
    upstream = torch.randn(64, 512, generator=generator)
    SigmoidTanhGELU()(x).backward(upstream)
    x64 = x.detach().double().requires_grad_()
    tanh_gelu_reference(x64).backward(upstream.double())
    assert len(sigmoid_form_calls) == 1
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


def test_sigmoid_tanh_gelu_passes_gradcheck_and_gradgradcheck_in_float64(sigmoid_form_calls):
    x = (torch.randn(6, 7, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(SigmoidTanhGELU(), (x,))
    assert torch.autograd.gradgradcheck(SigmoidTanhGELU(), (x,))
    assert sigmoid_form_calls


def test_sigmoid_tanh_gelu_agrees_with_torch_at_edge_values():
    inf, nan = float("inf"), float("nan")
    for dtype in (torch.float32, torch.float64):
        values = [inf, -inf, 0.0, -0.0, 1e30, -1e30, 1e3, -1e3, 30.0, -30.0, 1e-40, -1e-40, nan]
        x = torch.tensor(values, dtype=dtype)
        ours, theirs = SigmoidTanhGELU()(x), F.gelu(x, approximate="tanh")
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        assert ours[0] == inf and torch.isnan(ours[1])  # gelu(-inf) is NaN (0 * -inf) in both
        assert torch.equal(torch.signbit(ours[:-1]), torch.signbit(theirs[:-1]))  # -0.0 stays -0.0


def test_sigmoid_tanh_gelu_handles_non_contiguous_input_and_its_gradient(sigmoid_form_calls):
    base = (torch.randn(512, 64) * 4).requires_grad_()
    x = base.t()[:, ::2]  # [64, 256], strided both ways
    assert not x.is_contiguous()
    y = SigmoidTanhGELU()(x)
    y.backward(torch.ones_like(y))
    assert len(sigmoid_form_calls) == 1 and y.shape == x.shape
    assert bool(
        ((y.double() - tanh_gelu_reference(x.detach())).abs() <= sigmoid_form_bound(x.detach())).all()
    )
    base64 = base.detach().double().requires_grad_()
    tanh_gelu_reference(base64.t()[:, ::2]).sum().backward()
    torch.testing.assert_close(base.grad.double(), base64.grad, rtol=1e-5, atol=1e-5)


def test_sigmoid_tanh_gelu_saves_only_its_input_and_builds_no_graph_without_grad(sigmoid_form_calls):
    gelu = SigmoidTanhGELU()
    x = torch.randn(16, 1024, requires_grad=True)
    y = gelu(x)
    assert [t.data_ptr() for t in y.grad_fn.saved_tensors] == [x.data_ptr()]
    with torch.no_grad():
        assert gelu(x).grad_fn is None
    assert gelu(x.detach()).grad_fn is None
    assert len(sigmoid_form_calls) == 3


def test_sigmoid_tanh_gelu_leaves_bf16_and_half_inputs_to_torch_s_kernel(sigmoid_form_calls):
    gelu = SigmoidTanhGELU()
    for dtype in (torch.bfloat16, torch.float16):  # the form would round each of its steps in 16 bits
        x = torch.randn(64, 512).to(dtype)
        assert torch.equal(gelu(x), F.gelu(x, approximate="tanh"))
    assert sigmoid_form_calls == []


@pytest.mark.parametrize(
    "activation, transformers_class",
    [
        ("gelu_new", "NewGELUActivation"),
        ("gelu_fast", "FastGELUActivation"),
        ("gelu_pytorch_tanh", "GELUTanh"),
    ],
)
def test_loading_swaps_tanh_gelus_for_the_sigmoid_form_with_the_same_outputs_gradients_and_config(
    tiny_model_factory, tmp_path, sigmoid_form_calls, activation, transformers_class
):
    hf_class = getattr(transformers.activations, transformers_class)
    folder = tiny_model_factory("gpt2", seed=3, layers=2, hidden=32, heads=2, activation_function=activation)
    reference = AutoModelForCausalLM.from_pretrained(str(folder)).eval()  # transformers' own modules
    model = load_causal_lm(str(folder)).eval()
    assert sum(type(m) is hf_class for m in reference.modules()) == 2
    assert not any(type(m) is hf_class for m in model.modules())
    assert sum(isinstance(m, SigmoidTanhGELU) for m in model.modules()) == 2

    exact = copy.deepcopy(reference).double()  # transformers' own modules in float64 (tests/numerics.py)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out, ref = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    ref64 = exact(input_ids=ids, labels=ids)
    assert len(sigmoid_form_calls) == 2  # one per layer
    assert_as_accurate_as(out.logits.detach(), ref.logits.detach(), ref64.logits.detach())
    out.loss.backward()
    ref.loss.backward()
    ref64.loss.backward()
    for (name, p), q, r in zip(model.named_parameters(), reference.parameters(), exact.parameters()):
        assert_as_accurate_as(p.grad, q.grad, r.grad, msg=name)

    model.save_pretrained(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["activation_function"] == activation  # the saved model is unchanged


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is about CPUs")
def test_a_bf16_gpt2_on_a_cpu_is_warned_about_and_a_bf16_llama_or_fp32_gpt2_is_not(
    tiny_model_factory, caplog
):
    gpt2 = tiny_model_factory("gpt2", seed=3, layers=1, hidden=32, heads=2)
    llama = tiny_model_factory("llama", seed=3, layers=1, hidden=32, heads=2)
    with caplog.at_level("WARNING", logger="distillm.models"):
        load_causal_lm(str(gpt2), dtype="bf16", role="teacher")
    assert "teacher is bf16 and uses Conv1D" in caplog.text and "model.teacher_dtype=fp32" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="distillm.models"):
        load_causal_lm(str(gpt2), dtype="fp32", role="teacher")
        load_causal_lm(str(llama), dtype="bf16", role="teacher")
    assert "Conv1D" not in caplog.text
