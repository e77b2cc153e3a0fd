"""The per-step objective: supervised-position logits, the pretraining LM term, and the chunked path's limits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from distillm import IGNORE_INDEX
from distillm.config import ObjectiveConfig
from distillm.data import collate
from distillm.errors import UserError
from distillm.models import build_small_model
from distillm.objective import StudentObjective, supervised_logits, teacher_forward
from numerics import assert_as_accurate_as


@pytest.fixture
def batch(tiny_tokenizer):
    encode = lambda text: tiny_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    eos = tiny_tokenizer.eos_token_id
    return collate(
        [(encode("sort one two"), encode(" one two") + [eos]), (encode("count"), encode(" 3") + [eos])],
        tiny_tokenizer.pad_token_id,
    )


@pytest.fixture
def model(tiny_tokenizer):
    return build_small_model(
        "gpt2",
        len(tiny_tokenizer),
        layers=1,
        hidden=16,
        heads=2,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
        attn_pdrop=0.0,
    ).eval()


@pytest.fixture
def model64(model):
    """``model`` in float64: the reference float32 results are measured against (tests/numerics.py)."""
    return copy.deepcopy(model).double()


def test_supervised_logits_equal_the_full_forward_at_the_supervised_positions(
    model, model64, batch, monkeypatch
):
    mask = batch["labels"] != IGNORE_INDEX
    full, reference = (
        m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask]
        for m in (model, model64)
    )
    assert_as_accurate_as(
        supervised_logits(model, batch, full.shape[-1]).detach(), full.detach(), reference.detach()
    )
    monkeypatch.setattr("distillm.objective.has_plain_head", lambda m: False)  # the generic fallback
    assert_as_accurate_as(
        supervised_logits(model, batch, full.shape[-1]).detach(), full.detach(), reference.detach()
    )


def test_the_language_model_term_adds_lm_coef_times_the_corpus_cross_entropy(model, model64, batch):
    vocab = model.get_output_embeddings().weight.shape[0]
    objective = StudentObjective(model, ObjectiveConfig(lm_coef=0.5), vocab)
    corpus = {k: batch[k] for k in ("input_ids", "attention_mask")}
    corpus["labels"] = torch.where(
        batch["attention_mask"].bool(), batch["input_ids"].roll(-1, 1), IGNORE_INDEX
    )
    tokens = batch["labels"].ne(IGNORE_INDEX).sum()
    corpus_tokens = corpus["labels"].ne(IGNORE_INDEX).sum()
    loss = objective(batch, tokens, None, corpus, corpus_tokens)

    def reference_ce(b, m=model):  # plain PyTorch on the full logits: the independent reference
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.cross_entropy(
            logits.flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE_INDEX
        ).detach()

    ce, lm = reference_ce(batch), reference_ce(corpus)
    ce64, lm64 = reference_ce(batch, model64), reference_ce(corpus, model64)
    assert_as_accurate_as(loss.ce.detach(), ce, ce64)
    assert_as_accurate_as(loss.lm.detach(), lm, lm64)
    assert_as_accurate_as(loss.total.detach(), ce + 0.5 * lm, ce64 + 0.5 * lm64)


def test_chunked_and_dense_objectives_agree_with_a_teacher(model, model64, batch, tiny_tokenizer):
    teacher = build_small_model("gpt2", len(tiny_tokenizer), layers=1, hidden=24, heads=2, seed=5).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    tokens = batch["labels"].ne(IGNORE_INDEX).sum()

    def total(student, teacher, chunk):
        config = ObjectiveConfig(divergence="skew_reverse_kl", kd_ratio=0.6, chunk_size=chunk)
        teacher_out = teacher_forward(teacher, batch, vocab, chunked=chunk > 0)
        return StudentObjective(student, config, vocab)(batch, tokens, teacher_out).total.detach()

    # Dense is the established path, chunked sums in another order; the dense objective in float64 is the reference.
    reference = total(model64, copy.deepcopy(teacher).double(), 0)
    assert_as_accurate_as(total(model, teacher, 3), total(model, teacher, 0), reference)


def test_the_chunked_path_refuses_a_model_whose_head_it_cannot_apply(model, batch, monkeypatch):
    monkeypatch.setattr("distillm.objective.has_plain_head", lambda m: False)
    objective = StudentObjective(model, ObjectiveConfig(chunk_size=4), model.config.vocab_size)
    with pytest.raises(UserError, match="objective.chunk_size=0"):
        objective(batch, torch.tensor(4))


@pytest.mark.parametrize(
    "lengths",
    [[7, 7, 7, 7], [3], [100, 10, 10, 10], [75, 40, 60, 50, 117, 55, 66, 70, 45, 52, 60, 61, 58, 49, 80, 66]],
)
def test_length_groups_cover_every_row_once_and_never_pad_more_than_the_whole_batch(lengths):
    from distillm.objective import length_groups

    groups = length_groups(lengths)
    assert sorted(r for group in groups for r in group) == list(range(len(lengths)))
    padded = sum(len(group) * max(lengths[r] for r in group) for group in groups)
    assert padded <= len(lengths) * max(lengths)
    if len(set(lengths)) == 1:
        assert len(groups) == 1  # nothing to save: one forward


def test_rows_of_very_different_lengths_are_split_and_one_long_row_runs_alone():
    from distillm.objective import length_groups

    assert length_groups([100, 10, 10, 10]) == [[1, 2, 3], [0]]  # 130 positions instead of 400


@pytest.fixture
def uneven_batch(tiny_tokenizer):
    """Two short rows and a long one: the supervised states are computed in two sub-batches."""
    encode = lambda text: tiny_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    eos = tiny_tokenizer.eos_token_id
    long_prompt = encode(" ".join(["sort these words and count them"] * 6))
    return collate(
        [
            (encode("count"), encode(" 3") + [eos]),
            (long_prompt, encode(" done") + [eos]),
            (encode("a"), [eos]),
        ],
        tiny_tokenizer.pad_token_id,
    )


def test_supervised_states_of_an_uneven_batch_match_the_full_forward_in_value_and_gradient(
    model, model64, uneven_batch
):
    from distillm.objective import length_groups, supervised_hidden_states

    lengths = uneven_batch["attention_mask"].sum(-1).tolist()
    assert len(length_groups(lengths)) > 1  # the split path is the one under test
    mask = uneven_batch["labels"] != IGNORE_INDEX
    weights = torch.randn(int(mask.sum()), model.config.n_embd, generator=torch.Generator().manual_seed(0))

    def full_forward(m):  # the established path: one forward over the padded batch
        m.zero_grad()
        states = m.transformer(
            input_ids=uneven_batch["input_ids"], attention_mask=uneven_batch["attention_mask"]
        ).last_hidden_state[mask]
        (states * weights.to(states.dtype)).sum().backward()
        return states.detach(), [p.grad.clone() for p in m.parameters()]

    full, full_grads = full_forward(model)
    reference, reference_grads = full_forward(model64)
    model.zero_grad()
    grouped = supervised_hidden_states(model, uneven_batch)
    (grouped * weights).sum().backward()
    assert_as_accurate_as(grouped.detach(), full, reference)
    for grad, base, want in zip((p.grad for p in model.parameters()), full_grads, reference_grads):
        assert_as_accurate_as(grad, base, want)


def test_a_left_padded_batch_is_not_cut_and_still_gives_the_full_forward_states(model, model64, uneven_batch):
    from distillm.objective import supervised_hidden_states

    flipped = {k: uneven_batch[k].flip(-1) for k in ("input_ids", "attention_mask", "labels")}  # left padding
    mask = flipped["labels"] != IGNORE_INDEX
    full, reference = (
        m.transformer(
            input_ids=flipped["input_ids"], attention_mask=flipped["attention_mask"]
        ).last_hidden_state[mask]
        for m in (model, model64)
    )
    with torch.no_grad():
        assert_as_accurate_as(supervised_hidden_states(model, flipped), full.detach(), reference.detach())


def test_without_length_grouping_an_uneven_batch_runs_as_exactly_one_forward(model, model64, uneven_batch):
    # Sharded students (ZeRO-3, FSDP) gather parameters per forward: every process must run the same number.
    from distillm.objective import supervised_hidden_states

    calls = []  # embedding lookups: one per forward, the model's own or distillm.fast_forward's
    hook = model.transformer.wte.register_forward_hook(lambda *args: calls.append(1))
    try:
        grouped = supervised_hidden_states(model, uneven_batch)
        assert len(calls) > 1  # the default splits this batch
        calls.clear()
        single = supervised_hidden_states(model, uneven_batch, sharded=True)
        assert len(calls) == 1
        calls.clear()
        config = ObjectiveConfig(divergence=None, kd_ratio=0.0)
        StudentObjective(model, config, model.config.vocab_size, sharded=True)(
            uneven_batch, torch.tensor(3.0)
        )
        assert len(calls) == 1
    finally:
        hook.remove()
    # Two of our paths (one forward, length groups), both measured against the full forward in float64.
    mask = uneven_batch["labels"] != IGNORE_INDEX
    reference = model64.transformer(
        input_ids=uneven_batch["input_ids"], attention_mask=uneven_batch["attention_mask"]
    ).last_hidden_state[mask]
    assert_as_accurate_as(single.detach(), grouped.detach(), reference.detach())
