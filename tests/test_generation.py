"""Sampling with a KV cache (`distillm.generation.sample`) and building training batches from samples."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import distillm.generation as generation
from distillm import IGNORE_INDEX
from distillm.config import ConfigError, GenerationConfig, load_config
from distillm.fast_forward import FastDecoder, fast_decoder
from distillm.generation import AUTO_SAMPLER, resolve_sampler, sample, sample_mixed, samples_to_batch
from numerics import assert_as_accurate_as

EOS = 0  # the tiny tokenizer's EOS, which is also its pad token (as with GPT-2)
PAD = 0


@pytest.fixture(scope="module")
def gpt2(tiny_student_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_student_dir)).eval()


@pytest.fixture(scope="module")
def llama_dir(tiny_model_factory):
    return tiny_model_factory("llama", seed=3, layers=2, hidden=32, heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def llama(llama_dir):
    return AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()


@pytest.fixture(scope="module")
def llama_eager(llama_dir):
    return AutoModelForCausalLM.from_pretrained(str(llama_dir), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def mistral(tiny_model_factory):
    """Mistral-7B-v0.1's attention: a 4,096-position sliding window over 32k positions.

    The window binds only beyond 4,096 positions, so these short runs take the fast decoding step.
    """
    folder = tiny_model_factory(
        "mistral",
        seed=5,
        layers=2,
        hidden=32,
        heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
    )
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert model.config.sliding_window == 4096
    assert fast_decoder(model) is None and fast_decoder(model, positions=64) is not None
    return model


@pytest.fixture(scope="module")
def mistral_window(tiny_model_factory):
    """Mistral with a 6-position sliding window, which these runs exceed: Hugging Face's own forward."""
    folder = tiny_model_factory(
        "mistral", seed=6, layers=2, hidden=32, heads=4, num_key_value_heads=2, sliding_window=6
    )
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert model.config.sliding_window == 6 and fast_decoder(model, positions=7) is None
    return model


@pytest.fixture(scope="module")
def opt(tiny_model_factory):
    return AutoModelForCausalLM.from_pretrained(
        str(tiny_model_factory("opt", seed=4, layers=2, hidden=32, heads=4))
    ).eval()


def left_padded_prompts(
    lengths: list[int], vocab: int = 512, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with PAD: ([B, P], [B, P])."""
    rng = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(1, vocab, (length,), generator=rng)
        mask[row, width - length :] = 1
    return ids, mask


class ScriptedModel(nn.Module):
    """A stand-in causal LM that emits ``script[:, k]`` at decoding step k (all other tokens impossible).

    The "cache" it hands back counts the steps, so the test also checks that the sampler threads the cache.
    """

    def __init__(self, script: torch.Tensor, vocab: int = 16):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.dropout = nn.Dropout(0.1)

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True
    ):
        step = 0 if past_key_values is None else past_key_values["step"] + 1
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], self.vocab), -1e4)
        logits[:, -1].scatter_(1, self.script[:, step : step + 1], 0.0)
        return SimpleNamespace(logits=logits, past_key_values={"step": step})


def test_same_generator_seed_gives_same_samples_and_another_seed_different(gpt2):
    prompts, mask = left_padded_prompts([5, 9, 3, 7])
    config = GenerationConfig(max_new_tokens=24)
    first = sample(gpt2, prompts, mask, config, EOS, PAD, torch.Generator().manual_seed(7))
    again = sample(gpt2, prompts, mask, config, EOS, PAD, torch.Generator().manual_seed(7))
    other = sample(gpt2, prompts, mask, config, EOS, PAD, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("pad", [PAD, 9])
def test_each_row_stops_at_its_own_eos_and_is_padded_after_it(pad):
    eos = 3
    script = torch.tensor(
        [
            [5, 6, eos, 7, 7, 7, 7, 7],  # EOS at step 2
            [eos, 5, 5, 5, 5, 5, 5, 5],  # EOS at once
            [4, 4, 4, 4, eos, 8, 8, 8],  # EOS at step 4: the last row to finish, so decoding stops there
        ]
    )
    prompts, mask = left_padded_prompts([2, 4, 3], vocab=16)
    out = sample(ScriptedModel(script), prompts, mask, GenerationConfig(max_new_tokens=8), eos, pad)
    expected = torch.tensor([[5, 6, eos, pad, pad], [eos, pad, pad, pad, pad], [4, 4, 4, 4, eos]])
    assert torch.equal(out, expected)


def test_rows_without_eos_run_to_max_new_tokens():
    script = torch.tensor([[5, 6, 7, 8, 9, 10], [1, 3, 4, 4, 4, 4]])
    prompts, mask = left_padded_prompts([2, 2], vocab=16)
    out = sample(ScriptedModel(script), prompts, mask, GenerationConfig(max_new_tokens=4), 3, PAD)
    assert torch.equal(out, torch.tensor([[5, 6, 7, 8], [1, 3, PAD, PAD]]))


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama_eager", "mistral", "mistral_window", "opt"])
def test_greedy_decoding_equals_hf_generate_with_left_padded_prompts(family, request):
    model = request.getfixturevalue(family)
    prompts, mask = left_padded_prompts([3, 11, 6, 1], seed=1)
    ours = sample(model, prompts, mask, GenerationConfig(max_new_tokens=20, do_sample=False), EOS, PAD)
    reference = model.generate(
        input_ids=prompts,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=20,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )[:, prompts.shape[1] :]
    assert torch.equal(ours, reference)


@pytest.fixture
def packed(monkeypatch) -> list[int]:
    """What each ``FastDecoder.pack_weights`` call packed; it packs every map whatever its size (the test
    models are tiny)."""
    counts: list[int] = []
    pack_weights = FastDecoder.pack_weights

    def pack_every_size(self, *args, **kwargs):
        counts.append(pack_weights(self, *args, **{**kwargs, "min_weights": 0}))

    monkeypatch.setattr(FastDecoder, "pack_weights", pack_every_size)
    return counts


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_runs_of_16_steps_or_more_pack_the_weights_and_sample_the_same_tokens(family, request, packed):
    model = request.getfixturevalue(family)
    prompts, mask = left_padded_prompts([3, 9, 6], seed=4)

    def run(max_new_tokens: int, pack: bool) -> torch.Tensor:
        packed.clear()
        config = GenerationConfig(max_new_tokens=max_new_tokens, pack_weights=pack)
        generator = torch.Generator().manual_seed(7)
        # An EOS id past the vocabulary: every row runs to max_new_tokens.
        return sample(model, prompts, mask, config, model.config.vocab_size, PAD, generator)

    unpacked = run(20, pack=False)
    assert packed == []
    # 2 layers of 4 (GPT-2) or 7 (Llama layout) linear maps, and the head.
    assert torch.equal(run(20, pack=True), unpacked) and packed == [2 * (4 if family == "gpt2" else 7) + 1]
    run(15, pack=True)
    assert packed == []  # too short a run to repay the packing


def test_sampling_under_cpu_autocast_packs_nothing_and_samples_like_unpacked(llama, packed):
    prompts, mask = left_padded_prompts([3, 9, 6], seed=4)

    def run(pack: bool) -> torch.Tensor:
        config = GenerationConfig(max_new_tokens=20, pack_weights=pack)
        # bf16 activations, which float32 packed maps would refuse
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sample(llama, prompts, mask, config, EOS, PAD, torch.Generator().manual_seed(7))

    assert torch.equal(run(pack=True), run(pack=False))
    assert packed == [0]


def test_greedy_decoding_of_a_peft_model_equals_its_generate_and_uses_the_adapters(gpt2):
    peft = pytest.importorskip("peft")

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    wrapped = peft.get_peft_model(copy.deepcopy(gpt2), lora).eval()
    prompts, mask = left_padded_prompts([4, 8], seed=2)
    config = GenerationConfig(max_new_tokens=16, do_sample=False)
    ours = sample(wrapped, prompts, mask, config, EOS, PAD)
    reference = wrapped.generate(
        input_ids=prompts,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=16,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )[:, prompts.shape[1] :]
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, sample(gpt2, prompts, mask, config, EOS, PAD))  # the random adapters matter


def test_top_k_of_one_equals_greedy(llama):
    prompts, mask = left_padded_prompts([5, 2, 7], seed=3)
    greedy = sample(llama, prompts, mask, GenerationConfig(max_new_tokens=12, do_sample=False), EOS, PAD)
    top1 = sample(
        llama, prompts, mask, GenerationConfig(max_new_tokens=12, top_k=1), EOS, PAD, torch.Generator()
    )
    assert torch.equal(top1, greedy)


def test_a_tiny_top_p_equals_greedy(gpt2):
    prompts, mask = left_padded_prompts([5, 2, 7], seed=4)
    greedy = sample(gpt2, prompts, mask, GenerationConfig(max_new_tokens=12, do_sample=False), EOS, PAD)
    nucleus = sample(
        gpt2, prompts, mask, GenerationConfig(max_new_tokens=12, top_p=1e-6), EOS, PAD, torch.Generator()
    )
    assert torch.equal(nucleus, greedy)


def expected_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then the smallest top set of mass >= top_p, written out token by token."""
    probs = (logits.double() / temperature).softmax(-1)
    ranked = sorted(range(len(probs)), key=lambda i: -probs[i].item())
    kept = ranked[:top_k] if top_k else ranked
    kept_probs = (logits.double()[kept] / temperature).softmax(-1)
    nucleus, mass = [], 0.0
    for token, p in zip(kept, kept_probs.tolist()):
        nucleus.append(token)
        mass += p
        if mass >= top_p:
            break
    expected = torch.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    return expected


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 3, 1.0), (1.0, 0, 0.7), (1.5, 4, 0.8)],
)
def test_sampled_tokens_follow_the_temperature_top_k_top_p_distribution(temperature, top_k, top_p):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    rows = 20_000

    class Fixed(nn.Module):
        def forward(
            self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True
        ):
            return SimpleNamespace(logits=logits.expand(input_ids.shape[0], input_ids.shape[1], -1).clone())

    prompts = torch.ones((rows, 1), dtype=torch.long)
    config = GenerationConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    out = sample(
        Fixed(), prompts, torch.ones_like(prompts), config, 99, PAD, torch.Generator().manual_seed(0)
    )
    frequencies = torch.bincount(out[:, 0], minlength=len(logits)).double() / rows
    expected = expected_distribution(logits, temperature, top_k, top_p)
    assert torch.all(frequencies[expected == 0] == 0)
    torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)  # ~4 standard errors at 20k draws


def ngrams(tokens: list[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + size]) for i in range(len(tokens) - size + 1)]


@pytest.mark.parametrize("size", [1, 2, 3])
def test_no_repeat_ngram_size_leaves_no_repeated_ngram_in_prompt_plus_response(gpt2, size):
    prompts, mask = left_padded_prompts([6, 3, 9, 4], seed=5)
    config = GenerationConfig(max_new_tokens=40, no_repeat_ngram_size=size, temperature=0.3)
    out = sample(gpt2, prompts, mask, config, EOS, PAD, torch.Generator().manual_seed(0))
    for row in range(len(prompts)):
        response = out[row].tolist()
        if EOS in response:
            response = response[: response.index(EOS) + 1]
        sequence = prompts[row][mask[row].bool()].tolist() + response
        grams = ngrams(sequence, size)
        assert len(grams) == len(set(grams)), f"row {row} repeats an n-gram: {sequence}"


def test_greedy_no_repeat_ngram_equals_hf_generate_on_unpadded_prompts(llama):
    prompts, mask = left_padded_prompts([6, 6, 6], seed=6)
    ours = sample(
        llama,
        prompts,
        mask,
        GenerationConfig(max_new_tokens=30, do_sample=False, no_repeat_ngram_size=2),
        EOS,
        PAD,
    )
    reference = llama.generate(
        input_ids=prompts,
        attention_mask=mask,
        do_sample=False,
        no_repeat_ngram_size=2,
        max_new_tokens=30,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )[:, prompts.shape[1] :]
    assert torch.equal(ours, reference)


def test_train_mode_is_restored_and_eval_mode_kept():
    script = torch.tensor([[5, 3]])
    model = ScriptedModel(script).train()
    sample(
        model,
        torch.ones((1, 2), dtype=torch.long),
        torch.ones((1, 2), dtype=torch.long),
        GenerationConfig(max_new_tokens=4),
        3,
        PAD,
    )
    assert model.training and model.dropout.training
    model.eval()
    sample(
        model,
        torch.ones((1, 2), dtype=torch.long),
        torch.ones((1, 2), dtype=torch.long),
        GenerationConfig(max_new_tokens=4),
        3,
        PAD,
    )
    assert not model.training and not model.dropout.training


def test_samples_are_usable_as_inputs_of_a_training_step(gpt2):
    prompts, mask = left_padded_prompts([4, 6], seed=7)
    response = sample(gpt2, prompts, mask, GenerationConfig(max_new_tokens=6), EOS, PAD, torch.Generator())
    batch = samples_to_batch(prompts, mask, response, EOS, PAD)
    gpt2.train()
    try:
        logits = gpt2(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits.sum().backward()  # fails if the sampled ids were inference tensors
    finally:
        gpt2.zero_grad(set_to_none=True)
        gpt2.eval()


@pytest.mark.parametrize("pad", [0, 99])
def test_samples_to_batch_labels_cover_the_response_and_the_eos_prediction(pad):
    eos, x = 0, IGNORE_INDEX
    prompts = torch.tensor([[pad, pad, pad, 5, 6], [pad, 7, 8, 9, 10], [pad, pad, pad, pad, 4]])
    prompt_mask = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    responses = torch.tensor(
        [
            [11, eos, pad, pad],  # stops at EOS: the EOS is kept and supervised
            [12, 13, 14, 15],  # no EOS within max_new_tokens: all tokens kept, no EOS invented
            [eos, pad, pad, pad],  # an empty answer: only the EOS prediction
        ]
    )
    batch = samples_to_batch(prompts, prompt_mask, responses, eos, pad)
    p = pad
    # The model reads prompt + response without its final token, which is never an input (as for the dataset).
    expected_ids = torch.tensor(
        [
            [5, 6, 11, p, p, p, p],
            [7, 8, 9, 10, 12, 13, 14],
            [4, p, p, p, p, p, p],
        ]
    )
    expected_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7, [1, 0, 0, 0, 0, 0, 0]])
    # labels[t] is the token that position t predicts (shifted once, here, and nowhere else).
    expected_labels = torch.tensor(
        [
            [x, 11, eos, x, x, x, x],
            [x, x, x, 12, 13, 14, 15],
            [eos, x, x, x, x, x, x],
        ]
    )
    # The prompts come back left-padded to the longest real prompt (the all-pad first column goes).
    expected_prompts = torch.tensor([[p, p, 5, 6], [7, 8, 9, 10], [p, p, p, 4]])
    expected_prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert torch.equal(batch["input_ids"], expected_ids)
    assert torch.equal(batch["attention_mask"], expected_mask)
    assert torch.equal(batch["labels"], expected_labels)
    assert torch.equal(batch["prompt_ids"], expected_prompts)
    assert torch.equal(batch["prompt_attention_mask"], expected_prompt_mask)


def test_sampling_is_exact_across_vocabulary_blocks_and_never_picks_impossible_tokens():
    # Mass on tokens at both edges of the sampler's 256-token blocks, the last token, and nowhere else.
    support = torch.tensor([0, 3, 255, 256, 511, 600, 699])
    logits = torch.full((700,), float("-inf"))
    logits[support] = torch.tensor([0.5, -1.0, 1.0, 0.0, 0.7, -0.3, 0.2])
    rows = 20_000

    class Fixed(nn.Module):
        def forward(
            self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True
        ):
            return SimpleNamespace(logits=logits.expand(input_ids.shape[0], input_ids.shape[1], -1).clone())

    prompts = torch.ones((rows, 1), dtype=torch.long)
    config = GenerationConfig(max_new_tokens=1)
    out = sample(
        Fixed(), prompts, torch.ones_like(prompts), config, 999, PAD, torch.Generator().manual_seed(1)
    )
    counts = torch.bincount(out[:, 0], minlength=700)
    assert counts[support].sum() == rows  # no draw outside the support
    frequencies, expected = counts.double() / rows, logits.double().softmax(-1)
    torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)


# ---- generation.sampler: our loop or Hugging Face's `generate` -------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_generate_sampler_decodes_greedily_like_ours(family, request):
    model = request.getfixturevalue(family)
    prompts, mask = left_padded_prompts([3, 11, 6, 1], seed=1)
    ours, theirs = (
        sample(
            model, prompts, mask, GenerationConfig(max_new_tokens=20, do_sample=False, sampler=s), EOS, PAD
        )
        for s in ("distillm", "generate")
    )
    assert torch.equal(theirs, ours)


def test_the_generate_sampler_stops_each_row_at_its_eos_and_pads_after_it_like_ours(gpt2):
    prompts, mask = left_padded_prompts([4, 9, 2], seed=2)
    greedy = GenerationConfig(max_new_tokens=12, do_sample=False)
    free = sample(gpt2, prompts, mask, greedy, eos_token_id=-1, pad_token_id=PAD)  # no row can stop
    eos = int(free[1, 5])  # a token row 1 emits: with it as EOS that row (at least) stops early
    pad = 7 if eos != 7 else 8
    ours, theirs = (
        sample(gpt2, prompts, mask, GenerationConfig(max_new_tokens=12, do_sample=False, sampler=s), eos, pad)
        for s in ("distillm", "generate")
    )
    assert torch.equal(theirs, ours)
    first_eos = int((ours[1] == eos).nonzero()[0])
    assert first_eos <= 5 and (ours[1, first_eos + 1 :] == pad).all()


def test_the_generate_sampler_is_seeded_by_the_generator_and_leaves_the_global_rng_alone(gpt2):
    prompts, mask = left_padded_prompts([5, 9, 3, 7])
    config = GenerationConfig(max_new_tokens=16, sampler="generate")
    global_state = torch.random.get_rng_state()
    first = sample(gpt2, prompts, mask, config, EOS, PAD, torch.Generator().manual_seed(7))
    again = sample(gpt2, prompts, mask, config, EOS, PAD, torch.Generator().manual_seed(7))
    other = sample(gpt2, prompts, mask, config, EOS, PAD, torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.random.get_rng_state(), global_state)


def test_the_generate_sampler_gets_the_sampling_settings(gpt2):
    """top-k 1 leaves one token, so sampling through `generate` must equal greedy decoding."""
    prompts, mask = left_padded_prompts([5, 2, 8], seed=3)
    top1 = GenerationConfig(max_new_tokens=16, top_k=1, temperature=1.7, sampler="generate")
    greedy = GenerationConfig(max_new_tokens=16, do_sample=False)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(
        sample(gpt2, prompts, mask, top1, EOS, PAD, generator), sample(gpt2, prompts, mask, greedy, EOS, PAD)
    )


def test_auto_sampler_follows_the_device_type_table():
    assert resolve_sampler("auto", "cpu") == AUTO_SAMPLER["cpu"] == "distillm"  # measured: ours is faster
    assert resolve_sampler("auto", torch.device("cuda", 0)) == AUTO_SAMPLER["cuda"]
    assert resolve_sampler("auto", "meta") == "distillm"  # device types not in the table
    assert resolve_sampler("generate", "cpu") == "generate"
    assert resolve_sampler("distillm", "cuda") == "distillm"
    with pytest.raises(ValueError, match="unknown sampler 'hf'"):
        resolve_sampler("hf", "cpu")


def test_auto_sampler_runs_the_loop_the_table_names_for_the_prompts_device(gpt2, monkeypatch):
    calls: list[str] = []
    hf_generate = generation._hf_generate

    def spy(*args, **kwargs):
        calls.append("generate")
        return hf_generate(*args, **kwargs)

    monkeypatch.setattr(generation, "_hf_generate", spy)
    prompts, mask = left_padded_prompts([3, 4])
    sample(gpt2, prompts, mask, GenerationConfig(max_new_tokens=4), EOS, PAD)
    assert calls == []
    monkeypatch.setitem(generation.AUTO_SAMPLER, "cpu", "generate")
    sample(gpt2, prompts, mask, GenerationConfig(max_new_tokens=4), EOS, PAD)
    assert calls == ["generate"]


def test_an_unknown_sampler_is_refused_by_the_config_naming_the_key():
    with pytest.raises(ConfigError, match="generation.sampler='hf'"):
        load_config(overrides=["generation.sampler=hf"], validate=False)


# ------------------------------------------------------------------------------------------------------------
# Teacher-mixed sampling (MiniLLM's rollouts): `sample_mixed`.


@pytest.fixture(scope="module")
def gpt2_teacher(tiny_teacher_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir)).eval()


@pytest.fixture(scope="module")
def llama_teacher(tiny_model_factory):
    folder = tiny_model_factory("llama", seed=8, layers=2, hidden=48, heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


@pytest.fixture(scope="module")
def opt_teacher(tiny_model_factory):
    return AutoModelForCausalLM.from_pretrained(
        str(tiny_model_factory("opt", seed=9, layers=2, hidden=48, heads=4))
    ).eval()


MIXED_PAIRS = {
    "gpt2": ("gpt2", "gpt2_teacher"),
    "llama": ("llama", "llama_teacher"),
    "opt": ("opt", "opt_teacher"),
}


def mixed_pair(family: str, request) -> tuple[nn.Module, nn.Module]:
    student, teacher = MIXED_PAIRS[family]
    return request.getfixturevalue(student), request.getfixturevalue(teacher)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "config",
    [GenerationConfig(max_new_tokens=10), GenerationConfig(max_new_tokens=10, temperature=0.7, top_k=5)],
    ids=["plain", "temperature-top-k"],
)
def test_mixed_sampling_with_alpha_0_draws_the_students_samples_and_with_alpha_1_the_teachers(
    family, config, request
):
    student, teacher = mixed_pair(family, request)
    prompts, mask = left_padded_prompts([5, 9, 3, 7], seed=2)
    for alpha, model in ((0.0, student), (1.0, teacher)):
        mixed = sample_mixed(
            student, teacher, prompts, mask, config, alpha, EOS, PAD, torch.Generator().manual_seed(11)
        )
        alone = sample(model, prompts, mask, config, EOS, PAD, torch.Generator().manual_seed(11))
        assert torch.equal(mixed.tokens, alone), alpha
    other = sample_mixed(
        student, teacher, prompts, mask, config, 0.5, EOS, PAD, torch.Generator().manual_seed(11)
    )
    assert not torch.equal(other.tokens, alone)  # the mixture is neither


@pytest.mark.parametrize(
    ("alpha", "temperature", "top_k", "top_p"),
    [(0.2, 1.0, 0, 1.0), (0.5, 1.0, 0, 1.0), (0.2, 1.5, 4, 1.0), (0.3, 1.0, 0, 0.7)],
)
def test_mixed_tokens_follow_the_mixture_of_the_two_processed_distributions(alpha, temperature, top_k, top_p):
    student_logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    teacher_logits = torch.tensor([-1.0, 0.0, 2.5, 0.3, 1.0, -2.0, 0.0, 1.2])
    rows = 20_000

    def fixed(logits: torch.Tensor) -> nn.Module:
        class Fixed(nn.Module):
            def forward(
                self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True
            ):
                return SimpleNamespace(
                    logits=logits.expand(input_ids.shape[0], input_ids.shape[1], -1).clone()
                )

        return Fixed()

    prompts = torch.ones((rows, 1), dtype=torch.long)
    config = GenerationConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    out = sample_mixed(
        fixed(student_logits),
        fixed(teacher_logits),
        prompts,
        torch.ones_like(prompts),
        config,
        alpha,
        99,
        PAD,
        torch.Generator().manual_seed(0),
    )
    frequencies = torch.bincount(out.tokens[:, 0], minlength=len(student_logits)).double() / rows
    expected = (1 - alpha) * expected_distribution(student_logits, temperature, top_k, top_p) + alpha * (
        expected_distribution(teacher_logits, temperature, top_k, top_p)
    )
    assert torch.all(frequencies[expected == 0] == 0)
    # Each frequency is a mean of `rows` Bernoulli draws: within 5 of its standard errors.
    standard_error = (expected * (1 - expected) / rows).sqrt()
    assert torch.all((frequencies - expected).abs() <= 5 * standard_error + 1e-12), (frequencies, expected)


def full_forward_logprobs(model: nn.Module, prompts, prompt_mask, tokens, mask) -> torch.Tensor:
    """log model(y_t | x, y_<t) of the sampled tokens from one forward over prompt + response. -> [B, N]."""
    inputs = torch.cat([prompts, tokens], 1)
    attention = torch.cat([prompt_mask, mask.long()], 1)
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=inputs, attention_mask=attention, position_ids=positions).logits
    width = prompts.shape[1]
    predicting = logits[:, width - 1 : width - 1 + tokens.shape[1]].log_softmax(-1)  # [B, N, V]
    return predicting.gather(-1, tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_mixed_samples_log_probabilities_equal_a_full_forward_of_each_model_on_left_padded_prompts(
    family, request
):
    student, teacher = mixed_pair(family, request)
    prompts, prompt_mask = left_padded_prompts([3, 9, 6, 1], seed=4)
    config = GenerationConfig(max_new_tokens=12)
    out = sample_mixed(
        student, teacher, prompts, prompt_mask, config, 0.2, EOS, PAD, torch.Generator().manual_seed(3)
    )
    assert out.tokens.shape == out.mask.shape == out.student_logprobs.shape == out.teacher_logprobs.shape
    real = out.mask
    for name, model, ours in (
        ("student", student, out.student_logprobs),
        ("teacher", teacher, out.teacher_logprobs),
    ):
        baseline = full_forward_logprobs(model, prompts, prompt_mask, out.tokens, real)
        reference = full_forward_logprobs(
            copy.deepcopy(model).double(), prompts, prompt_mask, out.tokens, real
        )
        assert_as_accurate_as(ours[real], baseline[real], reference[real], msg=name)
        assert torch.equal(ours[~real], torch.zeros_like(ours[~real]))


def test_mixed_sampling_stops_each_row_at_its_eos_masks_after_it_and_restores_the_modes():
    eos = 3
    script = torch.tensor([[5, 6, eos, 7, 7, 7], [eos, 5, 5, 5, 5, 5], [4, 4, 4, 4, eos, 8]])
    student, teacher = ScriptedModel(script).train(), ScriptedModel(script).eval()
    prompts, mask = left_padded_prompts([2, 4, 3], vocab=16)
    out = sample_mixed(student, teacher, prompts, mask, GenerationConfig(max_new_tokens=6), 0.2, eos, PAD)
    assert torch.equal(
        out.tokens, torch.tensor([[5, 6, eos, PAD, PAD], [eos, PAD, PAD, PAD, PAD], [4, 4, 4, 4, eos]])
    )
    # The first EOS is a real (scored) token; everything after it is not.
    lengths = torch.tensor([3, 1, 5])
    assert torch.equal(out.mask, torch.arange(5)[None, :] < lengths[:, None])
    assert student.training and not teacher.training
    with pytest.raises(ValueError, match="teacher_mix_alpha"):
        sample_mixed(student, teacher, prompts, mask, GenerationConfig(max_new_tokens=6), 1.2, eos, PAD)


class Bigram(nn.Module):
    """A model whose next-token logits are a fixed table's row of the last token: the same numbers whatever
    else is in the batch, so row-by-row comparisons of samples are exact."""

    def __init__(self, vocab: int, seed: int):
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True
    ):
        return SimpleNamespace(logits=self.table[input_ids])


def test_with_a_generator_per_row_each_row_draws_the_same_response_in_any_batch():
    """MiniLLM's rollouts: row i draws from generator i only, so it gets the same response alone, in a batch,
    or in a batch in another order (what makes 2 processes sample like 1)."""
    student, teacher = Bigram(12, seed=1), Bigram(12, seed=2)
    prompts, mask = left_padded_prompts([3, 1, 5, 2], vocab=12, seed=7)
    config = GenerationConfig(max_new_tokens=16)

    def draw(rows: list[int]):
        generators = [torch.Generator().manual_seed(100 + row) for row in rows]
        width = int(mask[rows].sum(-1).max())  # left padding of this batch only
        return sample_mixed(
            student, teacher, prompts[rows, -width:], mask[rows, -width:], config, 0.2, EOS, PAD, generators
        )

    together = draw([0, 1, 2, 3])
    assert together.mask.sum(-1).min() < together.mask.shape[1]  # some rows stopped at EOS before others
    for row in range(4):
        alone = draw([row])
        length = int(alone.mask.sum())
        assert torch.equal(alone.tokens[0, :length], together.tokens[row, :length]), row
        assert int(together.mask[row].sum()) == length
    reordered = draw([3, 1, 0, 2])
    assert torch.equal(reordered.tokens, together.tokens[[3, 1, 0, 2], : reordered.tokens.shape[1]])
    with pytest.raises(ValueError, match="3 row generators for a batch of 4 rows"):
        sample_mixed(student, teacher, prompts, mask, config, 0.2, EOS, PAD, [torch.Generator()] * 3)
    # One generator for the batch draws row by row from one stream: a row's response depends on its company.
    shared = sample_mixed(
        student, teacher, prompts, mask, config, 0.2, EOS, PAD, torch.Generator().manual_seed(5)
    )
    alone = sample_mixed(
        student, teacher, prompts[[2]], mask[[2]], config, 0.2, EOS, PAD, torch.Generator().manual_seed(5)
    )
    assert not torch.equal(alone.tokens[0], shared.tokens[2, : alone.tokens.shape[1]])


def test_mixed_samples_real_tokens_are_the_supervised_tokens_of_their_training_batch(gpt2, gpt2_teacher):
    """The loop trains on `samples_to_batch`: its supervised labels, row by row, are the mask's tokens."""
    prompts, prompt_mask = left_padded_prompts([4, 8, 2], seed=6)
    config = GenerationConfig(max_new_tokens=6)
    out = sample_mixed(
        gpt2, gpt2_teacher, prompts, prompt_mask, config, 0.2, EOS, PAD, torch.Generator().manual_seed(5)
    )
    # An EOS in the middle of one row, so that the cut after it is exercised too.
    tokens, mask = out.tokens.clone(), out.mask.clone()
    tokens[1, 2], tokens[1, 3:], mask[1, 3:] = EOS, PAD, False
    batch = samples_to_batch(prompts, prompt_mask, tokens, EOS, PAD)
    supervised = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][supervised], tokens[mask])
    assert torch.equal(supervised.sum(-1), mask.sum(-1))
