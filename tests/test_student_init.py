"""`distillm init-student`: a student by layer selection, for the Llama and GPT-2 families."""

from __future__ import annotations

import json

import pytest
import torch

from distillm.cli import main
from distillm.errors import UserError
from distillm.student_init import LAYOUTS, evenly_spaced_layers, init_student

FAMILIES = {
    # family -> (sizes, state-dict prefix of block i); the prefixes are written out here, not read from LAYOUTS
    "llama": ({"layers": 5, "hidden": 32, "heads": 4, "num_key_value_heads": 2}, "model.layers"),
    "gpt2": ({"layers": 5, "hidden": 32, "heads": 4}, "transformer.h"),
}


def _state(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    return model, model.state_dict()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_student_holds_exactly_the_named_layers_and_every_other_tensor(
    family, tiny_model_factory, tmp_path
):
    sizes, prefix = FAMILIES[family]
    source = tiny_model_factory(family, seed=4, **sizes)
    out = tmp_path / "student"
    assert main(["init-student", "--from", str(source), "--layers", "0,2,4", "--out", str(out)]) == 0

    _, teacher = _state(source)
    student_model, student = _state(out)
    for new, old in enumerate([0, 2, 4]):
        block = {
            k[len(f"{prefix}.{old}.") :]: v for k, v in teacher.items() if k.startswith(f"{prefix}.{old}.")
        }
        assert block, f"no tensors under {prefix}.{old}."
        for name, tensor in block.items():
            assert torch.equal(student[f"{prefix}.{new}.{name}"], tensor), f"{prefix}.{new}.{name}"
    assert not any(k.startswith(f"{prefix}.3.") for k in student)
    outside = {k: v for k, v in teacher.items() if not k.startswith(f"{prefix}.")}
    assert outside  # embeddings, final norm, head
    for name, tensor in outside.items():
        assert torch.equal(student[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config[LAYOUTS[family].count_field] == 3
    assert student_model.get_output_embeddings().weight is student_model.get_input_embeddings().weight


def test_the_student_computes_what_the_source_computes_through_those_layers(tiny_model_factory, tmp_path):
    """A forward through the student equals one through the source's embeddings, blocks 1 and 3, norm and head."""
    from transformers import AutoModelForCausalLM

    source = tiny_model_factory("llama", seed=5, layers=4, hidden=32, heads=4)
    init_student(source, tmp_path / "s", layers=[1, 3])
    teacher = AutoModelForCausalLM.from_pretrained(str(source)).eval()
    student = AutoModelForCausalLM.from_pretrained(str(tmp_path / "s")).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[1], teacher.model.layers[3]])
    teacher.config.num_hidden_layers = 2
    with torch.no_grad():
        # No cache: the reference's blocks keep their old layer_idx, which only the KV cache reads.
        torch.testing.assert_close(
            student(ids, use_cache=False).logits, teacher(ids, use_cache=False).logits, rtol=0, atol=0
        )


def test_an_untied_head_is_copied_and_stays_untied(tiny_model_factory, tmp_path):
    source = tiny_model_factory("llama", seed=6, layers=3, hidden=32, heads=4, tie_word_embeddings=False)
    init_student(source, tmp_path / "s", num_layers=2)
    model, state = _state(tmp_path / "s")
    _, teacher = _state(source)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert torch.equal(state["lm_head.weight"], teacher["lm_head.weight"])


def test_per_layer_config_fields_are_sliced_with_the_layers(tiny_model_factory, tmp_path):
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    source = tiny_model_factory(
        "qwen2", layers=5, hidden=32, heads=4, layer_types=types, use_sliding_window=True
    )
    init_student(source, tmp_path / "s", layers=[0, 1, 4])
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["layer_types"] == [types[0], types[1], types[4]]


@pytest.mark.parametrize(
    ("total", "count", "expected"),
    [
        (30, 6, [0, 6, 12, 17, 23, 29]),
        (30, 4, [0, 10, 19, 29]),
        (5, 5, [0, 1, 2, 3, 4]),
        (7, 1, [0]),
        (7, 2, [0, 6]),
    ],
)
def test_num_layers_keeps_evenly_spaced_layers_first_and_last_included(total, count, expected):
    assert evenly_spaced_layers(total, count) == expected


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ("0,2,5", r"layer 5 is out of range; the model has layers 0 to 4"),
        ("0,-1", r"layer -1 is out of range"),
        ("0,2,2", r"layer 2 is named twice"),
        ("0,3,1", r"layer 1 comes after layer 3"),
    ],
)
def test_a_bad_layer_list_is_refused_naming_the_index(layers, message, tiny_model_factory, tmp_path, capsys):
    source = tiny_model_factory("gpt2", layers=5, hidden=32, heads=4)
    assert (
        main(["init-student", "--from", str(source), f"--layers={layers}", "--out", str(tmp_path / "s")]) == 2
    )
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


def test_too_many_layers_and_an_unsupported_family_are_refused(tiny_model_factory, tmp_path):
    source = tiny_model_factory("gpt2", layers=3, hidden=32, heads=4)
    with pytest.raises(UserError, match=r"--num-layers 4: the model has 3 layers"):
        init_student(source, tmp_path / "s", num_layers=4)
    opt = tiny_model_factory("opt", layers=2, hidden=32, heads=4)
    with pytest.raises(UserError, match=r"model type 'opt' is not supported"):
        init_student(opt, tmp_path / "s", num_layers=1)
