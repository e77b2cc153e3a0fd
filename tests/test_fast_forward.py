"""Our own decoder forward (``distillm.fast_forward``) against the Hugging Face forward of each family."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import distillm.kernels.packing as packing
from distillm.fast_forward import fast_decoder
from distillm.kernels import skinny
from distillm.models import enable_gradient_checkpointing
from numerics import assert_as_accurate_as, rounding_bound

VOCAB = 61
FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "mistral"]
# Those whose decoding layer our kernel runs whole (skinny.DecodeLayer).
NATIVE_LAYER_FAMILIES = ["llama", "qwen2", "mistral"]


def build(family: str, seed: int = 1, **extra):
    """A 3-layer random model; the Llama layout gets grouped keys/values (4 query heads, 2 KV heads)."""
    ids = {"vocab_size": VOCAB, "eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 0}
    if family == "gpt2":
        sizes = {
            "n_layer": 3,
            "n_embd": 32,
            "n_head": 4,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    else:
        sizes = {
            "num_hidden_layers": 3,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 256,
        }
        if family == "mistral":
            sizes["sliding_window"] = None
    config = AutoConfig.for_model(family, **{**ids, **sizes, **extra})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def right_padded_batch():
    """Three rows of lengths 12, 7, 9 (right-padded) and the response span each keeps."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, VOCAB, (3, 12), generator=generator)
    attention_mask = (torch.arange(12)[None, :] < torch.tensor([12, 7, 9])[:, None]).long()
    keep = torch.zeros(3, 12, dtype=torch.bool)
    keep[0, 8:12], keep[1, 4:7], keep[2, 6:8] = True, True, True
    return input_ids, attention_mask, keep


def hf_hidden_states(model, input_ids, attention_mask):
    return model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state


def float64_copy(model):
    """The same model in float64: the reference both float32 forwards are measured against (tests/numerics.py)."""
    return copy.deepcopy(model).double()


def gradients(model, hidden_states, weights):
    """The parameter gradients of ``sum(hidden_states * weights)``, by name."""
    model.zero_grad()
    (hidden_states * weights.to(hidden_states.dtype)).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_gradients_as_accurate(actual, baseline, reference):
    assert actual.keys() == baseline.keys() == reference.keys()
    for name in reference:
        assert_as_accurate_as(actual[name], baseline[name], reference[name], msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_at_the_kept_positions_equal_the_hugging_face_forward(family):
    model = build(family).eval()
    input_ids, attention_mask, keep = right_padded_batch()
    decoder = fast_decoder(model)
    assert decoder is not None
    with torch.no_grad():
        baseline = hf_hidden_states(model, input_ids, attention_mask)
        reference = hf_hidden_states(float64_copy(model), input_ids, attention_mask)
        # A few positions per row (the last layer runs there only), and every real position (it runs in full).
        for kept in (keep, attention_mask.bool()):
            actual = decoder.hidden_states(input_ids, attention_mask, kept)
            assert_as_accurate_as(actual, baseline[kept], reference[kept])


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_gradients_equal_the_hugging_face_forward(family):
    input_ids, attention_mask, keep = right_padded_batch()
    weights = torch.randn(int(keep.sum()), 32, generator=torch.Generator().manual_seed(3))
    model = build(family).train()  # dropout 0: train mode changes nothing else
    exact = float64_copy(model)
    reference = gradients(exact, hf_hidden_states(exact, input_ids, attention_mask)[keep], weights)
    baseline = gradients(model, hf_hidden_states(model, input_ids, attention_mask)[keep], weights)
    actual = gradients(model, fast_decoder(model).hidden_states(input_ids, attention_mask, keep), weights)
    assert_gradients_as_accurate(actual, baseline, reference)


def use_kind(kind: str, monkeypatch) -> None:
    """Make :class:`PackedLinears` pack as ``kind``: ``"native"`` (skipped where our kernel cannot run here)
    or ``"onednn"`` (our kernel hidden)."""
    if kind == "native" and not skinny.available():
        pytest.skip("the native kernel is unavailable here (tests/test_kernels.py says why)")
    if kind == "onednn":
        monkeypatch.setattr(skinny, "available", lambda: False)


@pytest.mark.parametrize("packed", [None, "native", "onednn"], ids=["unpacked", "native", "onednn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_logits_equal_the_hugging_face_forward_over_the_whole_sequence(family, packed, monkeypatch):
    assert_decoding_logits_as_accurate(build(family).eval(), family, packed, monkeypatch)


@pytest.mark.parametrize("padding", [[0, 3, 1], [0, 0, 0]], ids=["left-padded", "unpadded"])
def test_decoding_a_llama_with_every_bias_and_a_wider_head_through_whole_layers(padding, monkeypatch):
    # Biases on all seven maps (random: Hugging Face initialises them to zero) and head_dim 12 where
    # hidden / heads is 8; without padding the layers get no key mask.
    model = build("llama", attention_bias=True, mlp_bias=True, head_dim=12).eval()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    assert_decoding_logits_as_accurate(model, "llama", "native", monkeypatch, padding)


def assert_decoding_logits_as_accurate(model, family, packed, monkeypatch, padding=(0, 3, 1)):
    """Prefill and 4 decoding steps of ``model`` (3 rows, left-padded by ``padding``), packed as ``packed``
    (or not), give logits as accurate as the Hugging Face forward over the whole sequence."""
    generator = torch.Generator().manual_seed(5)
    prompt_len, new = 6, 5
    prompt_mask = (torch.arange(prompt_len)[None, :] >= torch.tensor(padding)[:, None]).long()
    prompt_ids = torch.where(
        prompt_mask.bool(), torch.randint(1, VOCAB, (3, prompt_len), generator=generator), 0
    )
    new_ids = torch.randint(1, VOCAB, (3, new), generator=generator)
    positions = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
    decoder = fast_decoder(model)
    if packed:  # every linear map of the 3 layers (GPT-2: 4 per layer, Llama layout: 7) and the head
        use_kind(packed, monkeypatch)
        assert (
            decoder.pack_weights(3, head=model.lm_head, min_weights=0)
            == 3 * (4 if family == "gpt2" else 7) + 1
        )
        assert decoder._packed.kind(model.lm_head) == packed
        # With every map packed for our kernel, each Llama-layout layer's step is one call of it (not
        # Qwen3's, whose q/k norms the kernel lacks): these logits check that path too.
        whole = packed == "native" and family in NATIVE_LAYER_FAMILIES
        assert decoder.native_layers == (3 if whole else 0)
    with torch.no_grad():
        hidden, cache = decoder.prefill(prompt_ids, prompt_mask, positions, capacity=prompt_len + new)
        steps = [hidden]
        next_position = positions[:, -1:] + 1
        for k in range(new - 1):
            steps.append(decoder.step(new_ids[:, k], next_position, cache))
            next_position = next_position + 1
        logits = decoder.linear(model.lm_head, torch.stack(steps, 1))  # [B, new, V]

        sequence = torch.cat([prompt_ids, new_ids[:, :-1]], 1)
        mask = torch.cat([prompt_mask, torch.ones(3, new - 1, dtype=torch.long)], 1)
        baseline, reference = (
            m(
                input_ids=sequence,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                use_cache=False,
            ).logits[:, prompt_len - 1 :]
            for m in (model, float64_copy(model))
        )
    assert_as_accurate_as(logits, baseline, reference)


def shared_prefix_batch(prefix: int = 4):
    """``right_padded_batch`` with the first ``prefix`` tokens made the same in every row."""
    input_ids, attention_mask, keep = right_padded_batch()
    input_ids[:, :prefix] = input_ids[0, :prefix]
    return input_ids, attention_mask, keep


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prefix_shared_by_every_row_runs_once_with_the_same_states_and_gradients(family):
    input_ids, attention_mask, keep = shared_prefix_batch()
    model = build(family).train()  # dropout 0
    decoder = fast_decoder(model)
    assert decoder._shared_prefix(input_ids, attention_mask, keep) == 4
    calls = []  # embedding lookups and the rows each one covers
    model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: calls.append(tuple(args[0].shape))
    )
    weights = torch.randn(int(keep.sum()), 32, generator=torch.Generator().manual_seed(3))
    exact = float64_copy(model)
    reference = hf_hidden_states(exact, input_ids, attention_mask)[keep]
    reference_grads = gradients(exact, reference, weights)
    baseline = hf_hidden_states(model, input_ids, attention_mask)[keep]
    baseline_grads = gradients(model, baseline, weights)
    calls.clear()
    actual = decoder.hidden_states(input_ids, attention_mask, keep)
    actual_grads = gradients(model, actual, weights)
    assert calls == [(1, 4), (3, 8)]  # the prefix once, then every row from position 4
    assert_as_accurate_as(actual, baseline, reference)
    # The prefix's gradient is summed over the rows in another order than Hugging Face's: float32 rounding.
    assert_gradients_as_accurate(actual_grads, baseline_grads, reference_grads)


def test_the_shared_prefix_stops_at_the_first_kept_position_and_padding_and_is_off_under_dropout():
    input_ids, attention_mask, keep = shared_prefix_batch(prefix=8)
    decoder = fast_decoder(build("gpt2"))
    assert decoder._shared_prefix(input_ids, attention_mask, keep) == 4  # row 1 keeps position 4
    keep[1, 4] = False
    assert decoder._shared_prefix(input_ids, attention_mask, keep) == 5  # row 1 keeps position 5
    assert decoder._shared_prefix(input_ids[:1], attention_mask[:1], keep[:1]) == 0  # one row: nothing shared
    attention_mask[2, 3:] = 0  # row 2 is padding from position 3 on
    assert decoder._shared_prefix(input_ids, attention_mask, keep) == 0  # 3 < _MIN_SHARED_PREFIX
    dropout = fast_decoder(build("gpt2", resid_pdrop=0.1))
    input_ids, attention_mask, keep = shared_prefix_batch()
    dropout.model.eval()
    assert dropout._shared_prefix(input_ids, attention_mask, keep) == 4
    dropout.model.train()  # one dropout mask per row: no sharing
    assert dropout._shared_prefix(input_ids, attention_mask, keep) == 0


def test_lora_adapters_apply_in_the_fast_forward():
    from peft import LoraConfig, get_peft_model  # peft is optional (the lora extra)

    model = get_peft_model(
        build("gpt2"), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    )
    model.eval()
    input_ids, attention_mask, keep = right_padded_batch()
    with torch.no_grad():
        baseline = hf_hidden_states(model.get_base_model(), input_ids, attention_mask)[keep]
        reference = hf_hidden_states(float64_copy(model).get_base_model(), input_ids, attention_mask)[keep]
        with model.disable_adapter():
            without = hf_hidden_states(model.get_base_model(), input_ids, attention_mask)[keep]
        actual = fast_decoder(model).hidden_states(input_ids, attention_mask, keep)
    assert not torch.allclose(baseline, without)  # the adapters change the output...
    assert_as_accurate_as(actual, baseline, reference)  # ...and the fast forward applies them


def test_gradient_checkpointing_recomputes_layers_and_keeps_the_gradients():
    input_ids, attention_mask, keep = right_padded_batch()

    def run(checkpointing: bool, dtype=torch.float32):
        model = build("llama").to(dtype).train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
        fast_decoder(model).hidden_states(input_ids, attention_mask, keep).square().sum().backward()
        return len(calls), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain_calls, plain = run(False)
    checkpointed_calls, checkpointed = run(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the first layer's MLP runs again in backward
    assert_gradients_as_accurate(checkpointed, plain, run(False, torch.float64)[1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attention_dropout_applies_in_train_mode_only(family):
    extra = {"attn_pdrop": 0.5} if family == "gpt2" else {"attention_dropout": 0.5}
    model = build(family, **extra)
    input_ids, attention_mask, keep = right_padded_batch()
    decoder = fast_decoder(model)
    with torch.no_grad():
        model.eval()
        baseline = hf_hidden_states(model, input_ids, attention_mask)[keep]
        reference = hf_hidden_states(float64_copy(model), input_ids, attention_mask)[keep]
        assert_as_accurate_as(decoder.hidden_states(input_ids, attention_mask, keep), baseline, reference)
        model.train()
        assert not torch.allclose(decoder.hidden_states(input_ids, attention_mask, keep), baseline)


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("opt", {}),
        ("gpt2", {"reorder_and_upcast_attn": True}),
        ("mistral", {"sliding_window": 4}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    ],
)
def test_families_and_settings_it_does_not_reproduce_get_no_fast_forward(family, extra):
    if family == "opt":
        config = AutoConfig.for_model(
            "opt", vocab_size=VOCAB, num_hidden_layers=1, hidden_size=16, num_attention_heads=2, ffn_dim=32
        )
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = build(family, **extra)
    assert fast_decoder(model) is None


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("mistral", {"sliding_window": 12}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1}),
    ],
)
def test_a_sliding_window_that_covers_the_sequence_keeps_the_fast_forward(family, extra):
    model = build(family, **extra).eval()
    input_ids, attention_mask, keep = right_padded_batch()  # 12 positions
    assert fast_decoder(model) is None  # the model takes 256 positions, which the window would restrict
    assert fast_decoder(model, positions=13) is None
    decoder = fast_decoder(model, positions=12)
    with torch.no_grad():
        baseline = hf_hidden_states(model, input_ids, attention_mask)[keep]
        reference = hf_hidden_states(float64_copy(model), input_ids, attention_mask)[keep]
        assert_as_accurate_as(decoder.hidden_states(input_ids, attention_mask, keep), baseline, reference)
        # The test has teeth: a window shorter than the sequence does change the Hugging Face forward.
        narrow = build(family, **{**extra, "sliding_window": 4}).eval()
        assert not torch.allclose(hf_hidden_states(narrow, input_ids, attention_mask)[keep], baseline)


def test_a_model_with_deepspeed_partitioned_parameters_gets_no_fast_forward():
    model = build("gpt2")
    assert fast_decoder(model) is not None
    next(model.parameters()).ds_id = 0  # how ZeRO-3 tags the parameters it partitions
    assert fast_decoder(model) is None


def assert_same_linear_map(actual, projection, inputs):
    """``actual`` is ``projection(inputs)`` up to the rounding of another summation order (oneDNN vs MKL)."""
    expected = projection(inputs)
    magnitude = inputs.abs() @ projection.weight.abs().T  # [rows, out]: sum of |x_i w_ji| per output
    if projection.bias is not None:
        magnitude = magnitude + projection.bias.abs()
    bound = rounding_bound(torch.float32, projection.in_features + 1, 1.0) * magnitude
    assert bool(((actual - expected).abs() <= bound).all()), float((actual - expected).abs().max())


@pytest.mark.parametrize("kind", ["native", "onednn"])
def test_packed_maps_are_used_without_gradients_only_and_follow_the_weights_once_packed_again(
    kind, monkeypatch
):
    use_kind(kind, monkeypatch)
    model = build("llama")
    decoder = fast_decoder(model)
    assert decoder.pack_weights(3, head=model.lm_head, min_weights=0) == 22
    projection = model.model.layers[0].self_attn.q_proj
    assert decoder._packed.kind(projection) == kind
    inputs = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_same_linear_map(decoder.linear(projection, inputs), projection, inputs)
    # With gradients on, the module's own forward runs (the packed form has no autograd), so training through
    # a decoder that was packed still reaches the parameters.
    decoder.linear(projection, inputs).sum().backward()
    assert projection.weight.grad is not None
    with torch.no_grad():
        projection.weight.mul_(2)
        # oneDNN's copy is taken when packing and misses the change until packing again; our kernel reads the
        # module's own weight.
        assert torch.allclose(decoder.linear(projection, inputs), projection(inputs)) == (kind == "native")
        decoder.pack_weights(3, min_weights=0)
        assert_same_linear_map(decoder.linear(projection, inputs), projection, inputs)
    assert not decoder.packed(model.lm_head)  # packing again without the head drops the head's entry
    # Only maps of at least min_weights weights: the MLP's 32 x 64 maps, not the 32 x 32 attention maps
    # or the 61 x 32 head.
    assert decoder.pack_weights(3, head=model.lm_head, min_weights=32 * 64) == 3 * 3
    assert decoder.packed(model.model.layers[0].mlp.up_proj) and not decoder.packed(projection)


def test_our_kernel_gets_a_transposed_copy_of_gpt2_s_conv1d_maps(monkeypatch):
    use_kind("native", monkeypatch)
    model = build("gpt2")
    decoder = fast_decoder(model)
    decoder.pack_weights(3, min_weights=0)
    projection = model.transformer.h[0].mlp.c_fc  # Conv1D: weight [in 32, out 128], x @ W + b
    assert decoder._packed.kind(projection) == "native"
    inputs = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))

    def assert_close_to_module():
        expected = projection(inputs)
        magnitude = inputs.abs() @ projection.weight.abs() + projection.bias.abs()
        bound = rounding_bound(torch.float32, 32 + 1, 1.0) * magnitude
        assert bool(((decoder.linear(projection, inputs) - expected).abs() <= bound).all())

    with torch.no_grad():
        assert_close_to_module()
        projection.weight.mul_(2)  # the copy does not see it until packing again
        assert not torch.allclose(decoder.linear(projection, inputs), projection(inputs))
        decoder.pack_weights(3, min_weights=0)
        assert_close_to_module()


def test_the_kind_follows_the_batch_size_and_each_kind_has_its_own_default_threshold(monkeypatch):
    if not skinny.available():
        pytest.skip("the native kernel is unavailable here (tests/test_kernels.py says why)")
    # Our kernel up to NATIVE_MAX_ROWS rows, oneDNN beyond; and a prompt-sized call (more rows than that)
    # through a natively packed map runs the module's own forward, exactly.
    assert packing.PackedLinears.kind_for(packing.NATIVE_MAX_ROWS) == "native"
    assert packing.PackedLinears.kind_for(packing.NATIVE_MAX_ROWS + 1) == "onednn"
    model = build("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4)
    decoder = fast_decoder(model)
    # 256 x 256 = 65,536 weights: above MIN_NATIVE_WEIGHTS, under MIN_PACKED_WEIGHTS
    assert packing.MIN_NATIVE_WEIGHTS <= 256 * 256 < packing.MIN_PACKED_WEIGHTS
    projection = model.model.layers[0].self_attn.q_proj
    decoder.pack_weights(4)
    assert decoder._packed.kind(projection) == "native"
    decoder.pack_weights(packing.NATIVE_MAX_ROWS + 1)
    assert not decoder.packed(projection)
    decoder.pack_weights(4)
    wide = torch.randn(packing.NATIVE_MAX_ROWS + 1, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(decoder.linear(projection, wide), projection(wide))


def test_packing_skips_lora_layers_other_dtypes_and_torch_builds_without_onednn(monkeypatch):
    from peft import LoraConfig, get_peft_model  # peft is optional (the lora extra)

    model = get_peft_model(
        build("gpt2"), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)
    ).eval()
    decoder = fast_decoder(model)
    # c_attn carries the adapter and keeps its own forward; c_proj, c_fc and the MLP's c_proj are packed.
    assert decoder.pack_weights(2, min_weights=0) == 3 * 3
    assert not decoder.packed(model.get_base_model().transformer.h[0].attn.c_attn)
    # LoRA on one map of a gated MLP: the MLP runs its own forward, so none of its maps is packed.
    llama = get_peft_model(
        build("llama"), LoraConfig(r=4, target_modules=["gate_proj"], init_lora_weights=False)
    )
    llama_decoder = fast_decoder(llama)
    assert llama_decoder.pack_weights(2, min_weights=0) == 3 * 4  # q, k, v and o of each layer
    assert llama_decoder.native_layers == 0  # a layer runs as one kernel call only with all its maps packed
    assert fast_decoder(build("llama").double()).pack_weights(2, min_weights=0) == 0
    llama = fast_decoder(build("llama"))

    def refuse(*args):
        raise RuntimeError("not supported by this build")

    monkeypatch.setattr(skinny, "available", lambda: False)  # oneDNN's kind only from here on
    with monkeypatch.context() as patch:  # a build whose private op refuses to run: nothing is packed
        patch.setattr(torch.ops.mkldnn, "_linear_pointwise", refuse)
        assert llama.pack_weights(2, min_weights=0) == 0 and not llama._packed
    monkeypatch.setattr(packing, "onednn_packing_available", lambda: False)
    assert llama.pack_weights(2, min_weights=0) == 0


def test_onednn_bf16_support_is_a_bool_and_false_where_torch_s_private_op_is_missing_or_refuses(
    monkeypatch,
):
    assert isinstance(packing.onednn_bf16_supported(), bool)

    def refuse():
        raise RuntimeError("not supported by this build")

    with monkeypatch.context() as patch:
        patch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", refuse)
        assert packing.onednn_bf16_supported() is False
    with monkeypatch.context() as patch:
        # A build without the op: torch.ops resolves a deleted attribute again, so the namespace is replaced.
        patch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())
        assert packing.onednn_bf16_supported() is False


def test_a_whole_layer_runs_as_one_kernel_call_only_without_gradients_or_attention_dropout(monkeypatch):
    use_kind("native", monkeypatch)
    calls = []
    original = skinny.DecodeLayer.__call__
    monkeypatch.setattr(
        skinny.DecodeLayer, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    model = build("llama", attention_dropout=0.5)
    decoder = fast_decoder(model)
    assert decoder.pack_weights(2, min_weights=0, native_layers=False) == 3 * 7 and decoder.native_layers == 0
    assert decoder.pack_weights(2, min_weights=0) == 3 * 7 and decoder.native_layers == 3
    ids = torch.randint(1, VOCAB, (2, 4), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(4)[None].expand(2, -1)

    def decode(grad: bool = False):
        with torch.set_grad_enabled(grad):
            _, cache = decoder.prefill(ids, torch.ones_like(ids), positions, capacity=6)
            return decoder.step(ids[:, 0], positions[:, -1:] + 1, cache)

    model.eval()
    decode()
    assert len(calls) == 3  # one call a layer
    model.train()  # attention dropout in effect: the torch operations, which draw its masks
    decode()
    assert len(calls) == 3
    model.eval()
    decode(grad=True)  # gradients on: the modules' own forwards
    assert len(calls) == 3
