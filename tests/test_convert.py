"""`distillm convert-gguf`: a GGUF checkpoint to a clean Hugging Face folder.

The reference: a tiny Llama the test writes as GGUF itself with the `gguf` package, in llama.cpp's layout;
its logits before the round trip must come out of the converted folder exactly.
"""

from __future__ import annotations

import json

import pytest
import torch

from distillm.cli import main
from distillm.convert import convert_gguf
from distillm.errors import UserError

gguf = pytest.importorskip("gguf", reason="convert-gguf needs the `gguf` package (pip install gguf)")

PROMPT = "alpha beta gamma reverse the list"


def _permute_for_llama_cpp(weight, heads):
    """llama.cpp's converter reorders the rows of q/k projections (rotary halves interleaved); transformers'
    GGUF reader undoes it. Doing it here as llama.cpp does makes the file a real llama.cpp-layout one."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_llama_gguf(model, tokenizer_dir, path, chat_template):
    """Write ``model`` (a small LlamaForCausalLM with tied embeddings) and its byte-level BPE tokenizer as an
    F32 GGUF file, with the metadata keys llama.cpp's own converter writes."""
    import numpy as np

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tokens = [None] * config.vocab_size
    for token, index in data["model"]["vocab"].items():
        tokens[index] = token
    special = {added["content"] for added in data["added_tokens"]}
    for added in data["added_tokens"]:
        tokens[added["id"]] = added["content"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    writer.add_token_types([3 if token in special else 1 for token in tokens])  # 3: control, 1: normal
    writer.add_bos_token_id(config.eos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_chat_template(chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to token_embd: llama.cpp writes it once
        array = value.numpy()
        if key.endswith("q_proj.weight"):
            array = _permute_for_llama_cpp(array, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            array = _permute_for_llama_cpp(array, config.num_key_value_heads)
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer_dir):
    """(reference model, tokenizer, GGUF path) of a 2-layer Llama with grouped-query attention."""
    from transformers import AutoTokenizer

    from distillm.models import build_small_model

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    model = build_small_model(
        "llama",
        vocab_size=len(tokenizer),
        layers=2,
        hidden=64,
        heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        seed=3,
    ).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_llama_gguf(model, tiny_tokenizer_dir, path, CHAT_TEMPLATE)
    return model, tokenizer, path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_a_tiny_gguf_becomes_a_folder_with_the_original_models_logits(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference, tokenizer, path = tiny_gguf
    out = tmp_path / "hf"
    assert main(["convert-gguf", str(path), "--out", str(out)]) == 0

    converted = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    converted_tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert converted_tokenizer(PROMPT).input_ids == ids[0].tolist()
    # F32 tensors go through the file unchanged: the same weights give the same logits, exactly.
    torch.testing.assert_close(_logits(converted, ids), _logits(reference, ids), rtol=0, atol=0)
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()


def test_the_folder_is_clean_safetensors_with_tokenizer_chat_template_and_generation_config(
    tiny_gguf, tmp_path
):
    from transformers import AutoTokenizer

    _, tokenizer, path = tiny_gguf
    out = convert_gguf(path, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 2 and config["num_key_value_heads"] == 2
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    reloaded = AutoTokenizer.from_pretrained(str(out))
    assert reloaded.chat_template == CHAT_TEMPLATE
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary folder was renamed into place


def test_a_file_that_is_not_gguf_is_refused_naming_it(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(UserError, match=r"model\.gguf: not a GGUF file"):
        convert_gguf(bogus, tmp_path / "out")
    with pytest.raises(UserError, match=r"missing\.gguf: no such file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_output_folder_is_kept_unless_forced(tiny_gguf, tmp_path, capsys):
    _, _, path = tiny_gguf
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert-gguf", str(path), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["convert-gguf", str(path), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


# The packaged SmolLM2's conversion is checked against transformers' own GGUF load in tests/test_demo_real.py,
# on the folder the quick real demo converts (one conversion of the 135M model for the whole suite, not two).
